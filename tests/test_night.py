"""tools/night.py: the supervisor, with fake agents on the runner's temporary kit (test_experiment.py).

The agents are small Python scripts that do what a coding agent does through the runner (edit
train.py, `experiment.py run`) with the fake training script; the clock is injected, so a night
of hours passes as fast as the agents run.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_experiment import RUNNER, baseline, git, plan, rows, wait_for, wait_for_death
from test_experiment import env, measured_kits, repo  # noqa: F401 (fixtures)
from test_report_tool import night, report  # noqa: F401 (night is a fixture)
from tools import night as supervisor
from tools import report as morning
from tools import scheduler

KIT = Path(__file__).resolve().parent.parent
NIGHT = KIT / "tools" / "night.py"
HOUR = 3600.0

AGENT = '''"""A fake agent: its first start runs two experiments through the runner, later starts only keep
the digest they were given (stdin and the file named on their command line) and stop."""
import subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
start = len(list(out.glob("stdin-*.md"))) + 1
(out / f"stdin-{start}.md").write_text(sys.stdin.read())
(out / f"file-{start}.md").write_text(Path(sys.argv[2]).read_text())
if start == 1:
    for idea in ("idea one", "idea two"):
        with open("train.py", "a") as script:
            script.write(f"# {idea}\\n")
        subprocess.run([sys.executable, sys.argv[3], "run", idea, "--script", "train.py",
                        "--max-disturbance", "1", "--max-load-change", "1"], check=True)
'''

HANGING_AGENT = '''"""A fake agent whose experiment hangs in training until it is stopped."""
import subprocess, sys
with open("train.py", "a") as script:
    script.write("# slow idea\\n")
subprocess.call([sys.executable, sys.argv[1], "run", "slow idea", "--script", "train.py", "--max-disturbance", "1"])
'''

SLEEPING_AGENT = '''"""A fake agent that writes its pid once started, then works (sleeps) far past the deadline."""
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)
'''


def agent_runs_clock(start=1_800_000_000.0):
    """An hour passes with every run of the agent the supervisor logs."""
    def now():
        logged = supervisor.AGENT_LOG.read_text().count("\n") if supervisor.AGENT_LOG.exists() else 0
        return start + logged * HOUR
    return now


def logged_agent_runs():
    return [json.loads(line) for line in supervisor.AGENT_LOG.read_text().splitlines()]


@pytest.fixture
def checkout(repo, env, monkeypatch):  # noqa: F811 (pytest fixtures)
    """The runner's temporary kit as the current directory, the fake trainer's settings in the
    environment an agent inherits."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def kit(checkout, env, monkeypatch):  # noqa: F811 (pytest fixtures)
    """The checkout with its baseline done; the best commit. baseline() may put a copy of a kit
    measured earlier in the checkout's place, so the current directory is entered again."""
    best = baseline(checkout, env)
    monkeypatch.chdir(checkout)
    return best


def test_an_agent_that_exits_early_is_restarted_with_a_digest_until_the_deadline(kit, repo, tmp_path):  # noqa: F811
    plan(dict(os.environ), 1.40, 1.45)  # two clear losers, one run each
    (tmp_path / "agent.py").write_text(AGENT)
    command = f"{shlex.quote(sys.executable)} {tmp_path / 'agent.py'} {tmp_path} {{digest}} {RUNNER}"
    clock = agent_runs_clock()
    supervised = supervisor.Supervisor(command, clock() + 2 * HOUR - 1, clock=clock, quick_seconds=0)
    assert supervised.run() == 0
    first, second = logged_agent_runs()
    assert (first["agent_run"], first["ended_by"], first["exit_code"], first["experiments"], first["runs"]) == (
        1, "exit", 0, 2, 2)
    assert (second["agent_run"], second["experiments"], second["started_at"] - first["started_at"]) == (2, 0, HOUR)
    assert [r[4].split(" [")[0] for r in rows(repo)[6:]] == ["idea one", "idea two"]
    assert git(repo, "rev-parse", "HEAD") == kit  # both discarded, nothing half made
    digest = (tmp_path / "stdin-2.md").read_text()
    assert (tmp_path / "file-2.md").read_text() == digest  # on stdin and in the file the command names
    assert "start 2 of the night" in digest
    assert "Your previous run ended at" in digest and "(exit, exit code 0) after 2 experiment(s)" in digest
    assert "best         1.300000 mean of 6 runs" in digest and "last verdict DISCARD" in digest
    assert "## Ideas already tried (2 experiments, oldest first)" in digest
    ideas = digest.split("## Ideas already tried")[1].split("##")[0]
    assert "- discard 1.400000 " in ideas and ideas.index("idea one") < ideas.index("idea two")
    assert "This is your first start of the night." in (tmp_path / "stdin-1.md").read_text()


def test_an_agent_that_fails_at_once_is_given_up_after_repeated_quick_failures(checkout, capsys):
    supervised = supervisor.Supervisor("exit 3", time.time() + 10 * HOUR, quick_seconds=HOUR)
    assert supervised.run() == supervisor.EXIT_GAVE_UP
    agent_runs = logged_agent_runs()
    assert len(agent_runs) == supervisor.QUICK_FAILURES
    assert {(s["exit_code"], s["ended_by"], s["experiments"]) for s in agent_runs} == {(3, "exit", 0)}
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"night: giving up: the agent exited within {HOUR:g} s without an experiment "
                    f"{supervisor.QUICK_FAILURES} times in a row (last exit code 3); run its command by hand "
                    "to see why: exit 3")


def test_an_agent_still_working_at_the_deadline_is_stopped_with_its_whole_group(checkout, tmp_path):
    started = tmp_path / "started"
    (tmp_path / "agent.py").write_text(SLEEPING_AGENT)
    deadline = 1_800_000_000.0

    def clock():  # the deadline comes once the agent is at work
        return deadline + (1 if started.exists() else -HOUR)

    command = f"{shlex.quote(sys.executable)} {tmp_path / 'agent.py'} {started} & wait"  # the sleeper: a grandchild
    supervised = supervisor.Supervisor(command, deadline, clock=clock, poll_seconds=0.05, grace=10)
    begun = time.monotonic()
    assert supervised.run() == 0
    assert time.monotonic() - begun < 30
    (agent_run,) = logged_agent_runs()
    assert agent_run["ended_by"] == "deadline" and agent_run["exit_code"] == -signal.SIGTERM
    assert wait_for_death(int(started.read_text()))


def start_night(repo, env, agent, until=None):  # noqa: F811
    """night.py as a user starts it, in its own process."""
    until = until if until is not None else time.strftime("%H:%M", time.localtime(time.time() + 2 * HOUR))
    return subprocess.Popen([sys.executable, str(NIGHT), "--agent", agent, "--until", until], cwd=repo,
                            env=dict(env, PYTHONPATH=str(KIT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_night_mid_experiment_leaves_no_lock_and_no_half_made_commit(
        kit, repo, env, tmp_path, signum):  # noqa: F811
    marker = tmp_path / "training"
    plan(env, {"mode": "hang"}, marker=marker)
    (tmp_path / "agent.py").write_text(HANGING_AGENT)
    results_before = (repo / "results.tsv").read_text()
    process = start_night(repo, env, f"{shlex.quote(sys.executable)} {tmp_path / 'agent.py'} {RUNNER}")
    wait_for(marker)
    assert git(repo, "rev-parse", "HEAD") != kit  # the experiment commit exists while it trains
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "night: interrupted: stopping the agent" in stderr and "night: stopped after 1 agent run(s)" in stderr
    assert git(repo, "rev-parse", "HEAD") == kit
    assert git(repo, "diff", "--cached", "--name-only") == "train.py"  # the edit is back, staged
    assert (repo / "results.tsv").read_text() == results_before
    assert not scheduler.lock_is_held(repo / ".autoresearch" / "lock")
    assert not scheduler.lock_is_held(repo / ".autoresearch" / "night.lock")
    script_pid, helper_pid = map(int, marker.read_text().split())
    assert wait_for_death(script_pid) and wait_for_death(helper_pid)
    (agent_run,) = logged_agent_runs()
    assert agent_run["ended_by"] == "interrupted" and agent_run["experiments"] == 0


@pytest.mark.parametrize("until, why", [
    ("", "--until '' is not a time of day HH:MM"),
    ("7pm", "--until '7pm' is not a time of day HH:MM"),
    ("24:00", "--until '24:00' is not a time of day HH:MM"),
])
def test_an_empty_or_malformed_deadline_is_refused_with_one_line(repo, env, until, why):  # noqa: F811
    process = start_night(repo, env, "true", until=until)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [f"night: refusing to start: {why}, e.g. --until 07:00"]
    assert not (repo / ".autoresearch" / "agent_runs.jsonl").exists()


def test_a_branch_that_is_not_an_experiment_branch_is_refused(repo, env):  # noqa: F811
    git(repo, "checkout", "--quiet", "main")
    process = start_night(repo, env, "true")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip() == ("night: refusing to start: on main; the night runs on an experiment branch: "
                              "git checkout -b autoresearch/<tag> (program.md, set-up)")


def test_a_second_supervisor_of_the_same_checkout_is_refused(repo, env, tmp_path):  # noqa: F811
    started = tmp_path / "started"
    (tmp_path / "agent.py").write_text(SLEEPING_AGENT)
    first = start_night(repo, env, f"{shlex.quote(sys.executable)} {tmp_path / 'agent.py'} {started}")
    wait_for(started)
    second = start_night(repo, env, "true")
    _, stderr = second.communicate(timeout=60)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert second.returncode == 2
    assert stderr.startswith("night: refusing to start: another night.py supervises this checkout (pid ")
    assert stderr.strip().endswith("; one agent at a time")
    assert first.returncode == 130


@pytest.mark.parametrize("text, now, expected", [
    ("07:00", "2026-12-05 01:00", "2026-12-05 07:00"),
    ("07:00", "2026-12-05 08:00", "2026-12-06 07:00"),  # already past today: tomorrow's
    ("7:05", "2026-12-05 23:59", "2026-12-06 07:05"),
    ("01:00", "2026-12-05 01:00", "2026-12-06 01:00"),  # now is not in the future
])
def test_the_deadline_is_the_next_such_time_of_day(text, now, expected):
    stamp = lambda text: time.mktime(time.strptime(text, "%Y-%m-%d %H:%M"))  # noqa: E731
    assert supervisor.deadline_after(text, stamp(now)) == stamp(expected)


def test_the_digest_lists_near_misses_as_the_morning_report_finds_them(tmp_path, monkeypatch):
    kind = "[standard 300s/standard/pystdlib/cpu/cpu/x1]"
    lines = ["aaaaaaa\t1.300000\t2.0\tkeep\tbaseline", "aaaaaaa\t1.310000\t2.0\tkeep\tbaseline [run 2]",
             "aaaaaaa\t1.290000\t2.0\tkeep\tbaseline [run 3]", "bbbbbbb\t1.305000\t2.0\tdiscard\tsoftcap 20",
             "ccccccc\t1.500000\t2.0\tdiscard\tlr x10", "ddddddd\t0.000000\t0.0\tcrash\tdepth 40 [crash: oom]"]
    (tmp_path / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                          + "".join(f"{line} {kind}\n" for line in lines))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(supervisor, "runner_status", lambda: "best         1.300000 mean of 3 runs")
    text = supervisor.digest(4, None, 1_800_000_000.0, 1_800_000_000.0 - HOUR)
    near = text.split("## Near misses and changes worth another try\n\n")[1].strip().splitlines()
    assert near == ["- #4 bbbbbbb softcap 20: 1.305000 (+0.005000 against the best then): "
                    "within the noise of the best: 0.5x the noise above it"]
    ideas = text.split("## Ideas already tried (3 experiments, oldest first)\n\n")[1].split("\n\n")[0]
    assert ideas.splitlines() == ["- discard 1.305000 bbbbbbb softcap 20", "- discard 1.500000 ccccccc lr x10",
                                  "- crash ddddddd depth 40"]


def test_the_morning_report_counts_the_agents_runs_and_the_time_between_experiments(night):  # noqa: F811
    log = night / ".autoresearch" / "agent_runs.jsonl"
    log.parent.mkdir()
    t0 = 1_700_000_000
    entries = [(0, 400, "exit", 0, 3), (401, 402, "exit", 127, 0), (403, 930, "deadline", -15, 4)]
    log.write_text("".join(json.dumps({"started_at": t0 + start, "ended_at": t0 + end, "ended_by": how,
                                       "exit_code": code, "experiments": done, "runs": done}) + "\n"
                           for start, end, how, code, done in entries) + "not json\n")
    done = report(night)
    assert done.returncode == 0, done.stderr
    text = (night / "report.md").read_text()
    agents = text.split("## Agent runs\n\n")[1]
    assert agents.startswith(f"**3 runs of the agent** (tools/night.py) from {morning.clock(t0)} to "
                             f"{morning.clock(t0 + 930)}: 2 exited on their own, 1 stopped at the deadline, "
                             "1 exited with an error.")
    assert f"| 2 | {morning.clock(t0 + 401)} | 1 s | exit | 127 | 0 | 0 |" in agents
    timing = text.split("### Time")[1]
    assert "Between one run's end and the next one's start: median 10 s, longest 10 s (8 gaps)." in timing


def test_no_agent_section_without_the_supervisors_log(night):  # noqa: F811
    assert report(night).returncode == 0
    assert "## Agent runs" not in (night / "report.md").read_text()
