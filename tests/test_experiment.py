"""The experiment runner, end to end on a temporary git repository with a fake training script.

The fake script acts out the next result that a control file lists (a val_bpb, a failure, a hang,
a set-up error...), one per run. Every test drives tools/experiment.py as a subprocess, as an
agent would, and checks git, results.tsv and the verdict afterwards. The verdict rule itself is
tested (and simulated) in test_verdict.py; here the values are chosen far from its boundaries.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent.parent
RUNNER = KIT / "tools" / "experiment.py"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
ROW = re.compile(r"^[0-9a-f]{7}\t\d+\.\d{6}\t\d+\.\d\t(keep|discard|crash)\t[^\t]+$")
KIND = "[standard 300s/standard/pystdlib/cpu/cpu/x1]"
BASELINE = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]  # mean 1.3, sigma 0.007

FAKE_TRAIN = '''"""Fake training script: acts out the next result listed in $FAKE_CONTROL."""
import json, os, subprocess, sys, time
from pathlib import Path
from backends.report import format_summary, write_run_json

control_path = Path(os.environ["FAKE_CONTROL"])
control = json.loads(control_path.read_text())
result = control["results"].pop(0)
control_path.write_text(json.dumps(control))
mode = result.get("mode", "ok")
if mode == "hang":
    helper = subprocess.Popen(["sleep", "60"])  # a grandchild: the runner must kill the whole group
    Path(control["marker"]).write_text(f"{os.getpid()} {helper.pid}")
    time.sleep(60)
if mode == "fail":
    print("step 3 | loss nan")
    print("FAIL: loss is nan at step 3")
    sys.exit(1)
if mode == "traceback":
    raise RuntimeError("out of memory")
if mode == "setup":
    print("error: no dataset prepared in /nowhere: run `uv run prepare.py --dataset pystdlib`", file=sys.stderr)
    sys.exit(2)
if mode == "spin":
    end = time.monotonic() + result["seconds"]
    while time.monotonic() < end:
        pass
print("step 1 | loss 9.0\\rstep 2 | loss 8.0")
steps, untimed, batch = result.get("num_steps", 20), result.get("untimed_steps", 2), 512
fields = {
    "val_bpb": result["val_bpb"], "training_seconds": 1.0, "total_seconds": 2.0,
    "peak_vram_mb": result.get("peak_vram_mb", 2048.0), "mfu_percent": 1.0,
    "total_tokens_M": steps * batch / 1e6, "num_steps": steps, "num_params_M": 0.1, "depth": 2,
    "backend": "cpu", "chip": "fake", "dataset": result.get("dataset", "pystdlib"), "eval_tokens": 8192,
    "time_budget": float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300)), "harness": "0" * 12,
    "standard": "AUTORESEARCH_TIME_BUDGET" not in os.environ, "profile": "standard",
    "world_size": result.get("world_size", 1), "train_tokens_per_second": result.get("tok_s", 1000.0),
    "untimed_steps": untimed, "untimed_tokens": untimed * batch, "timed_tokens": (steps - untimed) * batch,
    "total_batch_size": batch,
}
for key in ("machine_speed", "probe_matmul_gflops", "probe_memory_gb_per_s"):  # the probe, as a real run records it
    if key in result:
        fields[key] = result[key]
print(format_summary(fields))
if mode != "summary-only":
    write_run_json(fields)
'''

STAND_IN_PREPARE = '''"""Stand-in for the locked harness: the time budget, the kind of run, the dataset."""
import os
TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))  # a bad value raises ValueError
def is_standard_run():
    return "AUTORESEARCH_TIME_BUDGET" not in os.environ
def active_dataset():
    return os.environ.get("AUTORESEARCH_DATASET", "pystdlib")
'''

STAND_IN_BACKENDS = '''"""Stand-in for the locked backends package: one CPU tier."""
def get_hardware_info():
    return {"kind": "cpu"}
def suggest_hyperparameters(info, backend=None):
    return {"tier": "cpu"}
'''

STAND_IN_TIERS = '''import os
def current_profile():
    return os.environ.get("AUTORESEARCH_PROFILE", "standard")
'''


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def make_kit(root, fake_train):
    """A miniature kit in root on branch autoresearch/test: stand-in harness, the fake train.py
    given, header-only results."""
    (root / "backends").mkdir(parents=True)
    (root / "backends" / "report.py").write_text((KIT / "backends" / "report.py").read_text())
    (root / "backends" / "__init__.py").write_text(STAND_IN_BACKENDS)
    (root / "backends" / "tiers.py").write_text(STAND_IN_TIERS)
    (root / "prepare.py").write_text(STAND_IN_PREPARE)
    (root / "train.py").write_text(fake_train)
    return commit_kit(root)


def commit_kit(root):
    """Header-only results, the runner's ignores, and the files in root committed on main, then the
    branch autoresearch/test checked out."""
    (root / "results.tsv").write_text(HEADER + "\n")
    (root / ".gitignore").write_text("run.log\nruns/\n__pycache__/\n")
    git(root, "init", "--quiet", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "kit")
    git(root, "checkout", "--quiet", "-b", "autoresearch/test")
    return root


@pytest.fixture
def repo(tmp_path):
    return make_kit(tmp_path / "kit", FAKE_TRAIN)


@pytest.fixture
def env(tmp_path):
    environment = dict(os.environ)
    environment.update({
        "AUTORESEARCH_TRAIN_CMD": f"{shlex.quote(sys.executable)} train.py",
        "AUTORESEARCH_BACKEND": "cpu",
        "FAKE_CONTROL": str(tmp_path / "control.json"),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    for key in ("AUTORESEARCH_RUNS_DIR", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET"):
        environment.pop(key, None)
    return environment


def plan(env, *results, marker=None):
    """What the fake script does on its next runs: a dict per run, or a bare number for a val_bpb."""
    results = [r if isinstance(r, dict) else {"val_bpb": r} for r in results]
    Path(env["FAKE_CONTROL"]).write_text(json.dumps({"results": results, "marker": str(marker)}))


def runner(repo, env, command, *args, quiet_machine=True):
    """The runner as an agent calls it. quiet_machine: other tests share this machine, so the
    disturbance check is off unless a test is about it."""
    extra = ["--script", "train.py"] if command in ("run", "baseline") and quiet_machine else []
    if quiet_machine and command in ("run", "baseline"):
        extra += ["--max-disturbance", "1"] + (["--max-load-change", "1"] if command == "run" else [])
    return subprocess.run([sys.executable, str(RUNNER), command, *args, *extra],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


KIND_ENVIRONMENT = ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET",
                    "AUTORESEARCH_BACKEND", "AUTORESEARCH_TRAIN_CMD", "OMP_NUM_THREADS")
_measured = {}  # (train.py, the environment that decides the kind) -> a kit measured once


@pytest.fixture(scope="session", autouse=True)
def measured_kits(tmp_path_factory):
    """Where baseline() keeps the kits it measured, for the whole test run."""
    _measured["folder"] = tmp_path_factory.mktemp("measured_kits")
    yield
    _measured.clear()


def baseline(repo, env, values=BASELINE):
    """The best's runs: `values`, measured by the runner's own `baseline`. A fresh kit's six
    BASELINE runs are measured once per test run (same script, same kind) and copied after that,
    so the many tests that start from a measured best do not each train six more times."""
    key = ((repo / "train.py").read_text(), tuple(env.get(name) for name in KIND_ENVIRONMENT))
    fresh = values == BASELINE and not rows(repo) and git(repo, "rev-list", "--count", "HEAD") == "1"
    if fresh and key in _measured:
        shutil.rmtree(repo)
        shutil.copytree(_measured[key], repo, symlinks=True)
        return git(repo, "rev-parse", "HEAD")
    plan(env, *values)
    done = runner(repo, env, "baseline")
    assert done.returncode == 0, done.stderr
    if fresh:
        _measured[key] = _measured["folder"] / f"kit{len(_measured)}"
        shutil.copytree(repo, _measured[key], symlinks=True)
    return git(repo, "rev-parse", "HEAD")


def edit(repo, idea):
    """An experiment: a visible change to the training script."""
    with open(repo / "train.py", "a") as f:
        f.write(f"# idea: {idea}\n")


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_for_death(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not is_alive(pid)


def wait_for(path, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the fake training script never started"


def start_hanging_run(repo, env, tmp_path, idea, *before):
    """A `run` whose training hangs after the runs in `before`; returns (process, marker)."""
    marker = tmp_path / "started"
    plan(env, *before, {"mode": "hang"}, marker=marker)
    edit(repo, idea)
    process = subprocess.Popen([sys.executable, str(RUNNER), "run", idea, "--script", "train.py",
                                "--max-disturbance", "1"],
                               cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker)
    return process, marker


# ---------------------------------------------------------------------------------------------
# baseline, keep, discard, reruns

def test_baseline_runs_the_best_six_times_all_kept_and_tagged_with_their_kind(repo, env):
    start = baseline(repo, env)
    assert [r[0] for r in rows(repo)] == [start[:7]] * 6
    assert [r[3] for r in rows(repo)] == ["keep"] * 6
    assert [r[4] for r in rows(repo)] == [f"baseline {KIND}"] + [f"baseline [run {i}] {KIND}" for i in range(2, 7)]
    status = runner(repo, env, "status").stdout
    assert "best         1.300000 mean of 6 runs" in status
    assert "sigma 0.007071 from 6 runs, 5 degrees of freedom" in status


def test_clear_win_is_confirmed_kept_and_the_branch_advances(repo, env):
    start = baseline(repo, env)
    edit(repo, "wider mlp")
    plan(env, 1.20, 1.202, 1.30, 1.205, 1.20, 1.21, 1.195)  # the third run is the best's recheck
    done = runner(repo, env, "run", "wider mlp")
    assert done.returncode == 0, done.stderr
    head = git(repo, "rev-parse", "HEAD")
    assert git(repo, "rev-parse", "HEAD~1") == start
    assert git(repo, "log", "-1", "--format=%s") == "wider mlp"
    assert git(repo, "show", "--name-only", "--format=", "HEAD") == "train.py"
    assert rows(repo)[6] == [start[:7], "1.300000", "2.0", "keep", f"baseline [run 7] [recheck] {KIND}"]
    new = rows(repo)[7:]
    assert [r[0] for r in new] == [head[:7]] * 6 and [r[3] for r in new] == ["keep"] * 6
    assert new[1][4] == f"wider mlp [run 2] {KIND}"
    last = done.stdout.splitlines()[-1]
    assert last.startswith("KEEP     1.201000 (mean of 2, 20 steps, 1,000 tok/s; best 1.300000 mean of 7, 20 steps, "
                           "1,000 tok/s; -0.099000; sigma")
    assert last.endswith(f"; best now 1.202000 mean of 6) {head[:7]} wider mlp")
    assert runner(repo, env, "best").stdout.strip() == (
        f"{head[:7]}\t1.202000\t2.0\tkeep\twider mlp [mean of 6 runs] [{KIND[1:-1]}]")


def test_clear_loser_is_discarded_after_one_run_and_only_the_script_commit_reverted(repo, env):
    kept = baseline(repo, env)
    script_before = (repo / "train.py").read_text()
    (repo / "notes.txt").write_text("untracked notes survive\n")
    edit(repo, "deeper model")
    plan(env, 1.40)
    done = runner(repo, env, "run", "deeper model")
    assert done.returncode == 0, done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert (repo / "train.py").read_text() == script_before
    assert (repo / "notes.txt").exists()
    assert rows(repo)[6][1:] == ["1.400000", "2.0", "discard", f"deeper model {KIND}"]
    assert len(rows(repo)) == 7
    assert done.stdout.splitlines()[-1].startswith("DISCARD  1.400000 (mean of 1")
    assert git(repo, "status", "--porcelain", "--", "train.py") == ""


def test_grey_zone_result_is_rerun_before_the_verdict_and_every_run_is_a_row(repo, env):
    baseline(repo, env)
    edit(repo, "small change")
    plan(env, 1.295, 1.2965, 1.296, 1.297)
    done = runner(repo, env, "run", "small change")
    assert done.returncode == 0, done.stderr
    judged = rows(repo)[6:]
    assert 2 <= len(judged) <= 4
    assert len({r[0] for r in judged}) == 1 and {r[3] for r in judged} == {"discard"}
    assert done.stdout.count("rerun ") == len(judged) - 1


def test_crash_is_logged_as_zeros_with_its_kind_and_reverted(repo, env):
    kept = baseline(repo, env)
    for mode, reason in (("fail", "FAIL: loss is nan at step 3"), ("traceback", "RuntimeError: out of memory")):
        edit(repo, f"bad idea {mode}")
        plan(env, {"mode": mode})
        done = runner(repo, env, "run", f"bad idea {mode}")
        assert done.returncode == 0, done.stderr
        assert rows(repo)[-1][1:4] == ["0.000000", "0.0", "crash"]
        assert rows(repo)[-1][4] == f"bad idea {mode} [crash: exit code 1: {reason}] {KIND}"
        assert git(repo, "rev-parse", "HEAD") == kept
        assert done.stdout.splitlines()[-1].startswith("CRASH    0.000000 (exit code 1: ")
        assert reason in done.stdout


def test_non_numeric_val_bpb_is_a_crash_row_not_a_traceback(repo, env):
    baseline(repo, env)
    edit(repo, "odd summary")
    plan(env, {"val_bpb": "abc", "mode": "summary-only"})
    done = runner(repo, env, "run", "odd summary")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert rows(repo)[-1][3] == "crash"
    assert "val_bpb is 'abc'" in done.stdout


def test_summary_without_json_is_read_from_run_log(repo, env):
    plan(env, *[{"val_bpb": 1.2345678, "mode": "summary-only"}] * 6)
    assert runner(repo, env, "baseline").returncode == 0
    assert rows(repo)[0][1:4] == ["1.234568", "2.0", "keep"]


def test_unchanged_script_reruns_the_best_and_refines_its_mean(repo, env):
    head = baseline(repo, env)
    plan(env, 1.306)
    done = runner(repo, env, "run", "rerun as is")
    assert "has no changes" in done.stdout
    assert git(repo, "rev-parse", "HEAD") == head
    assert rows(repo)[-1] == [head[:7], "1.306000", "2.0", "keep", f"baseline [run 7] {KIND}"]
    assert "1.300857 mean of 7 runs" in done.stdout


def test_explicit_threshold_replaces_the_rule_and_judges_the_mean_of_two_runs(repo, env):
    baseline(repo, env)
    edit(repo, "tiny gain")
    plan(env, 1.299, 1.298)
    done = runner(repo, env, "run", "tiny gain", "--threshold", "0.01")
    assert [r[3] for r in rows(repo)[6:]] == ["discard", "discard"]
    assert "threshold 0.010000 given" in done.stdout
    # Its rows say the rule was replaced, so no reader takes them for the rule's verdicts.
    assert [r[4] for r in rows(repo)[6:]] == [f"tiny gain [threshold 0.01] {KIND}",
                                             f"tiny gain [threshold 0.01] [run 2] {KIND}"]


# ---------------------------------------------------------------------------------------------
# budget and kinds

def test_untimed_steps_that_carry_most_tokens_are_over_budget_and_never_kept(repo, env):
    kept = baseline(repo, env)
    edit(repo, "UNTIMED_STEPS = 18")
    plan(env, {"val_bpb": 1.0, "num_steps": 20, "untimed_steps": 18})
    done = runner(repo, env, "run", "UNTIMED_STEPS = 18")
    assert done.returncode == 0, done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    row = rows(repo)[-1]
    assert row[1:4] == ["1.000000", "2.0", "discard"]
    assert "[over budget: untimed steps trained 9,216 of 10,240 tokens (90%" in row[4]
    assert done.stdout.splitlines()[-1].startswith("DISCARD  1.000000 (over budget")


def test_a_run_that_spends_too_long_outside_its_timed_steps_is_over_budget(repo, env, monkeypatch, capsys):
    kept = baseline(repo, env)
    edit(repo, "slow start")
    plan(env, {"val_bpb": 1.0, "mode": "spin", "seconds": 1.0})
    from tools import budget, experiment, monitor
    # The allowance is 60 s + 20% of the budget; shrink it here instead of waiting for minutes.
    monkeypatch.setattr(budget, "ALLOWANCE_SECONDS", 0.0)
    monkeypatch.setattr(budget, "ALLOWANCE_FRACTION", 0.0)
    monkeypatch.setattr(monitor, "DISTURBED_SHARE", 1.0)  # other tests may share the machine
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "0.5")
    for key, value in env.items():
        if key != "AUTORESEARCH_TIME_BUDGET":
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(repo)  # the runner asks this checkout's stand-in harness for the kind
    monkeypatch.setattr(sys, "argv", ["experiment.py", "run", "slow start", "--script", "train.py",
                                      "--max-disturbance", "1"])
    with pytest.raises(SystemExit) as refused:  # no baseline of the 0.5 s kind yet
        experiment.main()
    assert refused.value.code == 2
    assert "has no results of kind non-standard 0.5s" in capsys.readouterr().err
    git(repo, "checkout", "--", "train.py")
    monkeypatch.setattr(sys, "argv", ["experiment.py", "baseline", "--script", "train.py", "--max-disturbance", "1",
                                      "--repeat", "1"])
    plan(env, {"val_bpb": 1.3, "mode": "spin", "seconds": 1.0})
    with pytest.raises(SystemExit) as unusable:
        experiment.main()
    assert unusable.value.code == 1
    assert "[over budget: 1 s wall for a 0.5 s budget, at most 0 s]" in rows(repo)[-1][4]
    assert rows(repo)[-1][3] == "discard"
    assert git(repo, "rev-parse", "HEAD") == kept
    # The same overrun while other work loads the machine (accepted with --max-disturbance 1) is
    # blamed on the load: not evidence, not over budget.
    monkeypatch.setattr(experiment.monitor, "DISTURBED_SHARE", 0.2)
    plan(env, *[{"val_bpb": 1.3, "mode": "spin", "seconds": 1.0}] * 3)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with pytest.raises(SystemExit):
            experiment.main()
    finally:
        burner.kill()
        burner.wait()
    assert "[disturbed: 1 s wall for a 0.5 s budget, at most 0 s while other processes used" in rows(repo)[-1][4]


def test_results_of_another_kind_are_never_compared(repo, env):
    baseline(repo, env)
    env["AUTORESEARCH_DATASET"] = "tinystories"
    edit(repo, "idea")
    plan(env, 1.0)
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "no results of kind standard 300s/standard/tinystories/cpu/cpu/x1" in done.stderr
    assert git(repo, "status", "--porcelain", "--", "train.py") == "M train.py"
    env.pop("AUTORESEARCH_DATASET")
    plan(env, {"val_bpb": 1.0, "world_size": 2})
    done = runner(repo, env, "run", "idea on two ranks")
    assert done.returncode == 0, done.stderr
    assert "ran as standard 300s/standard/pystdlib/cpu/cpu/x2" in rows(repo)[-1][4]
    assert done.stdout.splitlines()[-1].startswith("DISCARD  1.000000 (unjudged: ran as")
    assert all(r[3] != "keep" for r in rows(repo)[6:])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with two CPU threads or more")
def test_runs_on_part_of_the_cores_are_a_kind_of_their_own_never_compared_with_the_whole_machine(repo, env):
    """A run on one thread of a multi-core CPU trains fewer tokens in the budget: a best measured
    that way must never be the bar for a run with all the cores (a free win), nor the other way."""
    env["OMP_NUM_THREADS"] = "1"
    baseline(repo, env)
    assert all(r[4].endswith("/pystdlib/cpu/cpu-1t/x1]") for r in rows(repo))
    env.pop("OMP_NUM_THREADS")
    edit(repo, "idea")
    plan(env, 1.0)
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "no results of kind standard 300s/standard/pystdlib/cpu/cpu/x1" in done.stderr
    assert len(rows(repo)) == 6


# ---------------------------------------------------------------------------------------------
# nothing breaks it

def test_timeout_kills_the_whole_process_group_and_logs_crash(repo, env, tmp_path):
    kept = baseline(repo, env)
    marker = tmp_path / "started"
    plan(env, {"mode": "hang"}, marker=marker)
    edit(repo, "slow idea")
    started = time.monotonic()
    done = runner(repo, env, "run", "slow idea", "--timeout", "2")
    assert time.monotonic() - started < 15
    assert rows(repo)[-1][1:] == ["0.000000", "0.0", "crash",
                                  f"slow idea [crash: timed out after 2 s, process group killed] {KIND}"]
    assert "timed out after 2 s" in done.stdout
    assert git(repo, "rev-parse", "HEAD") == kept
    script_pid, helper_pid = map(int, marker.read_text().split())
    assert wait_for_death(script_pid) and wait_for_death(helper_pid)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_mid_run_kills_training_undoes_commit_and_records_nothing(repo, env, tmp_path, signum):
    kept = baseline(repo, env)
    results_before = (repo / "results.tsv").read_text()
    process, marker = start_hanging_run(repo, env, tmp_path, "interrupted idea")
    edited = (repo / "train.py").read_text()
    assert git(repo, "rev-parse", "HEAD") != kept
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130
    assert "interrupted: nothing recorded" in stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert (repo / "train.py").read_text() == edited
    assert git(repo, "diff", "--cached", "--name-only") == "train.py"
    assert (repo / "results.tsv").read_text() == results_before
    script_pid, helper_pid = map(int, marker.read_text().split())
    assert wait_for_death(script_pid) and wait_for_death(helper_pid)


def test_interrupt_during_a_rerun_records_the_finished_run_as_unjudged(repo, env, tmp_path):
    kept = baseline(repo, env)
    process, _ = start_hanging_run(repo, env, tmp_path, "grey idea", 1.295)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130
    assert "its finished runs are recorded as unjudged" in stderr
    assert rows(repo)[-1][1:] == ["1.295000", "2.0", "discard", f"grey idea [unjudged: interrupted] {KIND}"]
    assert git(repo, "rev-parse", "HEAD") == kept


def test_a_killed_runner_is_cleaned_up_by_the_next_one_and_nothing_is_kept_by_accident(repo, env, tmp_path):
    kept = baseline(repo, env)
    process, marker = start_hanging_run(repo, env, tmp_path, "orphaned idea")
    process.kill()  # no handler runs: the commit stays at HEAD, unjudged
    process.communicate(timeout=10)
    os.killpg(int(marker.read_text().split()[0]), signal.SIGKILL)
    assert git(repo, "rev-parse", "HEAD") != kept
    done = runner(repo, env, "status")
    assert "running" not in done.stdout
    plan(env, 1.40)
    edit(repo, "next idea")
    done = runner(repo, env, "run", "next idea")
    assert done.returncode == 2
    assert "the last runner stopped before judging" in done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    script = (repo / "train.py").read_text()
    assert "# idea: orphaned idea" in script and "# idea: next idea" in script  # nothing lost
    assert len(rows(repo)) == 6
    done = runner(repo, env, "run", "orphaned idea and next idea")
    assert done.returncode == 0, done.stderr
    assert rows(repo)[-1][3] == "discard" and git(repo, "rev-parse", "HEAD") == kept


def test_a_second_runner_refuses_at_once_while_one_runs(repo, env, tmp_path):
    baseline(repo, env)
    process, _ = start_hanging_run(repo, env, tmp_path, "first")
    started = time.monotonic()
    second = subprocess.run([sys.executable, str(RUNNER), "run", "second", "--script", "train.py"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 10
    assert second.returncode == 2
    assert "another experiment is running in this checkout (pid" in second.stderr
    assert "running      pid" in runner(repo, env, "status").stdout
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert len(rows(repo)) == 6


def test_set_up_error_of_the_script_is_refused_and_the_edit_stays(repo, env):
    kept = baseline(repo, env)
    edit(repo, "idea before data")
    plan(env, {"mode": "setup"})
    done = runner(repo, env, "run", "idea before data")
    assert done.returncode == 2
    assert "the training script stopped before training: error: no dataset prepared" in done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert "# idea: idea before data" in (repo / "train.py").read_text()
    assert len(rows(repo)) == 6


def test_bad_environment_is_refused_before_anything_is_committed(repo, env):
    kept = baseline(repo, env)
    env["AUTORESEARCH_TIME_BUDGET"] = "abc"
    edit(repo, "idea")
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert done.stderr.startswith("refusing to run: set-up error, nothing ran:")
    assert len(done.stderr.strip().splitlines()) == 1
    assert git(repo, "rev-parse", "HEAD") == kept


@pytest.mark.parametrize("damage", ["deleted", "malformed", "truncated"])
def test_a_damaged_results_file_is_refused_before_training_with_the_fix(repo, env, damage):
    baseline(repo, env)
    results = repo / "results.tsv"
    if damage == "deleted":
        results.unlink()
    elif damage == "malformed":
        results.write_text(results.read_text() + "not a row\n")
    else:
        results.write_text("\n".join(results.read_text().splitlines()[:3]) + "\n")
    edit(repo, "idea")
    (repo / "run.log").unlink()
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "cp .autoresearch/results.tsv results.tsv" in done.stderr
    assert not (repo / "run.log").exists()
    assert git(repo, "status", "--porcelain", "--", "train.py") == "M train.py"


@pytest.mark.parametrize("option", [["--timeout", "-5"], ["--timeout", "inf"], ["--threshold", "nan"],
                                    ["--max-disturbance", "2"]])
def test_bad_option_values_are_refused(repo, env, option):
    baseline(repo, env)
    edit(repo, "idea")
    done = subprocess.run([sys.executable, str(RUNNER), "run", "idea", "--script", "train.py", *option],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "error: argument" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("change", ["uncommitted prepare", "committed backends", "new backends file"])
def test_modified_harness_is_refused_before_anything_runs(repo, env, change):
    baseline(repo, env)
    if change == "uncommitted prepare":
        (repo / "prepare.py").write_text("TIME_BUDGET = 1\n")
    elif change == "committed backends":
        (repo / "backends" / "__init__.py").write_text(STAND_IN_BACKENDS + "EVAL_TOKENS = 1\n")
        git(repo, "commit", "--quiet", "-am", "sneaky")
    else:
        (repo / "backends" / "easier_eval.py").write_text("\n")
    head = git(repo, "rev-parse", "HEAD")
    edit(repo, "idea")
    (repo / "run.log").unlink()
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert done.stderr.startswith("refusing to run: the harness is locked")
    assert len(done.stderr.strip().splitlines()) == 1
    assert git(repo, "rev-parse", "HEAD") == head
    assert len(rows(repo)) == 6
    assert not (repo / "run.log").exists()


def test_runs_on_main_are_refused(repo, env):
    git(repo, "checkout", "--quiet", "main")
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "git checkout -b autoresearch/<tag>" in done.stderr


def test_a_run_before_any_baseline_is_refused_with_the_command(repo, env):
    edit(repo, "idea")
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "uv run tools/experiment.py baseline" in done.stderr


def test_rows_have_tabs_only_between_columns_and_fixed_decimals(repo, env):
    baseline(repo, env)
    edit(repo, "one")
    plan(env, {"val_bpb": 1.45, "peak_vram_mb": 5000.0})
    runner(repo, env, "run", "lr\t0.04\nand  warmup 0.1")
    edit(repo, "two")
    plan(env, {"mode": "fail"})
    runner(repo, env, "run", "crashing\tidea")
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == HEADER
    assert all(ROW.match(line) for line in lines[1:]), lines
    assert [line.split("\t")[1:] for line in lines[7:]] == [
        ["1.450000", "4.9", "discard", f"lr 0.04 and warmup 0.1 {KIND}"],
        ["0.000000", "0.0", "crash", f"crashing idea [crash: exit code 1: FAIL: loss is nan at step 3] {KIND}"],
    ]


def test_disturbed_runs_are_rerun_then_not_judged_and_the_edit_stays(repo, env):
    kept = baseline(repo, env)
    edit(repo, "idea on a busy machine")
    plan(env, *[{"val_bpb": 1.0, "mode": "spin", "seconds": 0.6}] * 3)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = runner(repo, env, "run", "idea on a busy machine", "--script", "train.py", quiet_machine=False)
    finally:
        burner.kill()
        burner.wait()
    assert done.returncode == 2, done.stdout + done.stderr
    judged = rows(repo)[6:]
    assert len(judged) == 3 and {r[3] for r in judged} == {"discard"}
    assert all("[disturbed: other processes used" in r[4] for r in judged)
    assert "not judged" in done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert "# idea: idea on a busy machine" in (repo / "train.py").read_text()
    assert runner(repo, env, "status").stdout.count("mean of 6 runs") == 1  # not evidence
    # Never judged, so the same edit is not refused once the machine is quiet.
    plan(env, 1.5)
    again = runner(repo, env, "run", "idea on a busy machine", "--script", "train.py")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith("DISCARD  1.500000")


def test_status_and_best_report_sigma_and_the_best_mean(repo, env):
    head = baseline(repo, env)
    edit(repo, "bad")
    plan(env, 1.5)
    last = runner(repo, env, "run", "bad idea").stdout.splitlines()[-1]
    status = runner(repo, env, "status")
    assert status.returncode == 0, status.stderr
    lines = {line[:13].strip(): line[13:] for line in status.stdout.splitlines()}
    assert lines["branch"].startswith("autoresearch/test (base ") and "harness unchanged" in lines["branch"]
    assert lines["best"] == f"1.300000 mean of 6 runs, {head[:7]} baseline [{KIND[1:-1]}]"
    assert lines["runs"] == "7 rows in results.tsv (6 keep, 1 discard, 0 crash)"
    assert lines["last verdict"] == last


def test_best_without_results_says_what_to_do(repo, env):
    done = runner(repo, env, "best")
    assert done.returncode == 1
    assert "baseline" in done.stderr


def test_a_win_measured_under_another_load_than_the_best_is_not_judged(repo, env):
    kept = baseline(repo, env)
    details = repo / "runs" / "experiments.jsonl"
    entries = [json.loads(line) for line in details.read_text().splitlines()]
    details.write_text("".join(json.dumps(dict(entry, other_cpu_share=0.9)) + "\n" for entry in entries))
    edit(repo, "faster only because the machine got quiet")
    plan(env, 1.20, 1.202, 1.30)  # the third is the best's recheck before the keep
    done = runner(repo, env, "run", "faster only because the machine got quiet", "--script", "train.py",
                  "--max-disturbance", "1", quiet_machine=False)
    assert done.returncode == 2
    assert "the machine's load changed" in done.stderr and "during the best's" in done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert {r[3] for r in rows(repo)[7:]} == {"discard"}


def test_max_load_change_1_turns_the_load_check_off(repo, env):
    baseline(repo, env)
    details = repo / "runs" / "experiments.jsonl"
    entries = [json.loads(line) for line in details.read_text().splitlines()]
    details.write_text("".join(json.dumps(dict(entry, other_cpu_share=0.9)) + "\n" for entry in entries))
    edit(repo, "judged although the machine got quiet")
    plan(env, 1.20, 1.202, 1.30, 1.205, 1.20, 1.21, 1.195)
    done = runner(repo, env, "run", "judged although the machine got quiet", "--script", "train.py",
                  "--max-disturbance", "1", "--max-load-change", "1", quiet_machine=False)
    assert done.returncode == 0, done.stderr
    assert "the machine's load changed" not in done.stderr
    assert done.stdout.splitlines()[-1].startswith("KEEP     1.201000")


def test_the_kind_comes_from_the_harness_of_the_checkout_being_run(tmp_path, monkeypatch):
    # This process has the kit's own prepare.py loaded; the checkout's stand-in must answer anyway.
    import prepare  # noqa: F401  (the kit's harness, loaded first on purpose)
    from tools import kind

    checkout = make_kit(tmp_path / "kit", FAKE_TRAIN)
    monkeypatch.setenv("AUTORESEARCH_DATASET", "its-own-dataset")
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    answer = kind.probe_harness(checkout)
    assert answer == {"backend": "cpu", "tier": "cpu", "apple": False, "time_budget": 300.0,
                      "profile": "standard", "dataset": "its-own-dataset", "standard": True}
    (checkout / "prepare.py").write_text("raise ValueError('no dataset prepared here')\n")
    monkeypatch.setenv("AUTORESEARCH_DATASET", "another")  # a new environment is asked again
    assert kind.probe_harness(checkout)["kind_error"] == "no dataset prepared here"


def test_the_kind_carries_the_defaults_the_machine_resolved_not_the_agent_s_constants(monkeypatch):
    from tools import kind, scheduler
    answer = {"backend": "cpu", "tier": "cpu", "apple": False, "time_budget": 300.0, "profile": "standard",
              "dataset": "pystdlib", "standard": True,
              "defaults": {"tier": "cpu", "depth": 2, "total_batch_size": 8192, "dtype": "bf16"}}
    monkeypatch.setattr(kind, "probe_harness", lambda root=".": answer)
    monkeypatch.setattr(scheduler, "machine_threads", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    bf16 = kind.kind_or_problem()[0]
    digest = kind.defaults_digest({**answer["defaults"], "threads": 2})
    assert bf16.tier == f"cpu:{digest}" and len(digest) == 6
    answer["defaults"] = dict(answer["defaults"], dtype="fp32")  # a calibration that now picks fp32
    fp32 = kind.kind_or_problem()[0]
    assert fp32 != bf16 and fp32.tier.startswith("cpu:")
    one_thread = kind.kind_or_problem(threads=1)[0]  # a slot of `submit --workers 2`
    assert one_thread.tier.endswith("-1t") and one_thread.tier != f"{fp32.tier}-1t"
    del answer["defaults"]  # a harness that cannot say keeps the plain tier
    assert kind.kind_or_problem()[0].tier == "cpu"


# ---------------------------------------------------------------------------------------------
# what a user sees after faults

def leader_start_time(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def leave_orphaned_training(repo):
    """A training process group as a runner killed with kill -9 leaves it: alive, recorded in the state."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    state_file = repo / ".autoresearch" / "state.json"
    state = json.loads(state_file.read_text())
    state["training_group"] = {"pgid": sleeper.pid, "started": leader_start_time(sleeper.pid)}
    state_file.write_text(json.dumps(state))
    return sleeper


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process start times from /proc")
def test_status_after_a_killed_runner_names_the_interrupted_experiment_and_ends_its_training(repo, env):
    kept = baseline(repo, env)
    edit(repo, "orphaned idea")
    git(repo, "commit", "--quiet", "-am", "orphaned idea")
    commit = git(repo, "rev-parse", "HEAD")
    state_file = repo / ".autoresearch" / "state.json"
    state = json.loads(state_file.read_text())
    state["in_progress"] = {"commit": commit, "kept": kept, "committed": True, "script": "train.py",
                            "description": "orphaned idea", "pending": [{
                                "commit": commit, "val_bpb": 1.25, "memory_gb": 2.0, "crash": False,
                                "evidence": True, "kind_tag": KIND, "description": f"orphaned idea {KIND}",
                                "details": {}}]}
    state_file.write_text(json.dumps(state))
    sleeper = leave_orphaned_training(repo)

    done = runner(repo, env, "status")
    assert done.returncode == 0, done.stderr
    lines = {line[:13].strip(): line[13:] for line in done.stdout.splitlines()}
    assert lines["interrupted"] == (f"the runner was stopped before judging {commit[:7]} (orphaned idea); the next "
                                    f"run undoes that commit, keeps its edit staged in train.py, records its 1 "
                                    f"finished run(s) as unjudged and stops so you can check the file")
    assert lines["best"] == f"1.300000 mean of 6 runs, {kept[:7]} baseline [{KIND[1:-1]}]"
    assert "has no results" not in done.stdout
    assert wait_for_death(sleeper.pid)
    sleeper.wait(timeout=5)
    assert "training_group" not in json.loads(state_file.read_text())

    sleeper = leave_orphaned_training(repo)  # a locked command ends it before anything else, too
    done = runner(repo, env, "run", "next idea")
    assert wait_for_death(sleeper.pid)
    sleeper.wait(timeout=5)
    assert done.returncode == 2 and "the last runner stopped before judging" in done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert git(repo, "status", "--porcelain", "--", "train.py") == "M  train.py"
    assert rows(repo)[-1] == [commit[:7], "1.250000", "2.0", "discard",
                              f"orphaned idea [unjudged: the runner was stopped] {KIND}"]


def test_status_shows_the_best_of_the_kind_this_environment_runs_and_names_the_others(repo, env):
    best = baseline(repo, env)[:7]
    other = "standard 300s/standard/tinystories/cpu/cpu/x1"
    with open(repo / "results.tsv", "a") as results:  # the last runs were of another kind
        results.write(f"{best}\t1.800000\t2.0\tkeep\tbaseline [{other}]\n{best}\t1.810000\t2.0\tkeep\tbaseline [run 2] [{other}]\n")
    lines = {line[:13].strip(): line[13:] for line in runner(repo, env, "status").stdout.splitlines()}
    assert lines["kind"] == f"{KIND[1:-1]} (what a run started here now has; best and noise are of this kind)"
    assert lines["best"] == f"1.300000 mean of 6 runs, {best} baseline [{KIND[1:-1]}]"
    assert lines["other kinds"] == f"{best} also has results of kind {other} (2 runs)"
    env["AUTORESEARCH_DATASET"] = "tinystories"
    lines = {line[:13].strip(): line[13:] for line in runner(repo, env, "status").stdout.splitlines()}
    assert lines["kind"].startswith(f"{other} (")
    assert lines["best"] == f"1.805000 mean of 2 runs, {best} baseline [{other}]"
    assert lines["other kinds"] == f"{best} also has results of kind {KIND[1:-1]} (6 runs)"


def test_submit_without_ray_is_a_one_line_set_up_refusal(repo, env, tmp_path):
    missing = tmp_path / "no_ray" / "ray"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(missing.parent), *filter(None, [env.get("PYTHONPATH")])])
    edit(repo, "idea")
    done = runner(repo, env, "submit", "idea")
    assert done.returncode == 2
    assert done.stderr == "refusing to run: Ray is not installed: run `uv sync --group parallel` (parallel experiments need it)\n"
    assert git(repo, "status", "--porcelain", "--", "train.py") == "M train.py"


def add_module(repo, idea):
    """An experiment that moves code into a new module the training script imports."""
    (repo / "my_layers.py").write_text(f"IDEA = {idea!r}\n")
    edit(repo, idea)
    with open(repo / "train.py", "a") as f:
        f.write("import my_layers\n")


def fresh_clone(repo, tmp_path, name):
    clone = tmp_path / name
    subprocess.run(["git", "clone", "--quiet", "--branch", "autoresearch/test", str(repo), str(clone)],
                   check=True, capture_output=True)
    return clone


@pytest.mark.parametrize("outcome", ["discard", "crash"])
def test_a_new_module_leaves_with_its_discarded_or_crashed_experiment(repo, env, tmp_path, outcome):
    kept = baseline(repo, env)
    add_module(repo, "layers in a module")
    plan(env, 1.5 if outcome == "discard" else {"mode": "fail"})
    done = runner(repo, env, "run", "layers in a module")
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith(outcome.upper()) and last.endswith("layers in a module [with my_layers.py]")
    assert git(repo, "show", "--name-only", "--format=", rows(repo)[-1][0]).split() == ["my_layers.py", "train.py"]
    assert git(repo, "rev-parse", "HEAD") == kept
    assert not (repo / "my_layers.py").exists()  # reset --keep took it out: nothing stale is left
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == "M results.tsv"
    assert not (fresh_clone(repo, tmp_path, "clone") / "my_layers.py").exists()


def test_a_kept_experiment_commits_its_new_module_so_a_fresh_clone_runs_it(repo, env, tmp_path):
    kept = baseline(repo, env)
    add_module(repo, "layers in a module")
    (repo / "run.log").write_text("an old log\n")
    plan(env, 1.20, 1.202, 1.30, 1.205, 1.20, 1.21, 1.195)  # the third is the best's recheck
    done = runner(repo, env, "run", "layers in a module")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("KEEP")
    assert "layers in a module [with my_layers.py]" in done.stdout.splitlines()[-1]
    assert git(repo, "rev-parse", "HEAD~1") == kept
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["my_layers.py", "train.py"]
    clone = fresh_clone(repo, tmp_path, "clone")
    imported = subprocess.run([sys.executable, "-c", "import my_layers; print(my_layers.IDEA)"], cwd=clone,
                              capture_output=True, text=True)
    assert imported.stdout == "layers in a module\n", imported.stderr
    assert (clone / "results.tsv").read_text() == HEADER + "\n"  # results.tsv and run.log are never committed
    assert not (clone / "run.log").exists()


def test_an_interrupted_experiment_leaves_its_new_module_staged_with_the_edit(repo, env, tmp_path):
    kept = baseline(repo, env)
    (repo / "my_layers.py").write_text("IDEA = 'interrupted'\n")
    process, marker = start_hanging_run(repo, env, tmp_path, "layers in a module")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "the change to train.py, my_layers.py is back in the working tree (staged)" in stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert git(repo, "status", "--porcelain", "--", "my_layers.py", "train.py").splitlines() == [
        "A  my_layers.py", "M  train.py"]
