"""Parallel experiments end to end: submit and wait on a temporary git repository, on a local Ray
cluster of two CPU slots, with a fake training script (skipped when Ray is not installed).

The fake script finds the `# idea: X` lines in itself, so every candidate (and a rebased
combination of two) acts out its own list of results from a control file, whatever slot runs it
and in whatever order. Values are chosen far from the verdict rule's boundaries.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_experiment import HEADER, git, make_kit

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

# Every test here starts a Ray cluster and trains through it: end to end, so behind the marker
# (`uv run pytest -m slow`, which .ci/run runs too).
pytestmark = pytest.mark.slow

KIT = Path(__file__).resolve().parent.parent
RUNNER = KIT / "tools" / "experiment.py"
BASELINE = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]
WIN = [1.200, 1.202, 1.198, 1.201, 1.199, 1.200]

FAKE_TRAIN = '''"""Fake training script: acts out the next result listed for its ideas in $FAKE_CONTROL."""
import fcntl, json, os, signal, sys, time
from pathlib import Path
from backends.report import format_summary, write_run_json

ideas = sorted(line[len("# idea: "):].strip() for line in Path(__file__).read_text().splitlines()
               if line.startswith("# idea: "))
key = "+".join(ideas) or "base"
with open(os.environ["FAKE_CONTROL"], "r+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    control = json.load(f)
    result = control[key].pop(0)
    f.seek(0)
    f.truncate()
    json.dump(control, f)
if result.get("mode") == "kill-worker":
    os.kill(os.getppid(), signal.SIGKILL)  # the process that runs this one: a Ray worker
    sys.exit(1)
time.sleep(result.get("seconds", 0))
batch = 512
fields = {
    "val_bpb": result["val_bpb"], "training_seconds": 1.0, "total_seconds": 2.0, "peak_vram_mb": 2048.0,
    "mfu_percent": 1.0, "total_tokens_M": 0.01, "num_steps": 20, "num_params_M": 0.1, "depth": 2,
    "backend": "cpu", "chip": "fake", "dataset": "pystdlib", "eval_tokens": 8192,
    "time_budget": float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300)), "harness": "0" * 12,
    "standard": "AUTORESEARCH_TIME_BUDGET" not in os.environ, "profile": "standard", "world_size": 1,
    "train_tokens_per_second": 1000.0, "untimed_steps": 2, "untimed_tokens": 2 * batch,
    "timed_tokens": 18 * batch, "total_batch_size": batch,
}
print(format_summary(fields))
write_run_json(fields)
'''

@pytest.fixture
def ray_tmp():
    """A short private temp dir for Ray (its socket paths must stay short); every process whose
    command line names it is stopped afterwards, and nothing else."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield folder
    stop_processes_naming(folder)


def stop_processes_naming(text):
    mine = [p for p in psutil.process_iter(["cmdline", "environ"])
            if text in " ".join(p.info["cmdline"] or []) or text in (p.info["environ"] or {}).get("RAY_TMPDIR", "")]
    for process in mine:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


@pytest.fixture
def repo(tmp_path, ray_tmp):
    """A miniature kit on branch autoresearch/test; its scheduler is stopped at the end."""
    root = make_kit(tmp_path / "kit", FAKE_TRAIN)
    yield root
    lock = root / ".autoresearch" / "parallel" / "scheduler.lock"
    if lock.exists() and lock.read_text().strip().isdigit():
        try:
            os.kill(int(lock.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture
def env(tmp_path, ray_tmp):
    environment = dict(os.environ)
    environment.update({
        "AUTORESEARCH_TRAIN_CMD": f"{shlex.quote(sys.executable)} train.py",
        "AUTORESEARCH_BACKEND": "cpu",
        "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"),
        "FAKE_CONTROL": str(tmp_path / "control.json"),
        "RAY_TMPDIR": ray_tmp,
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    for key in ("AUTORESEARCH_RUNS_DIR", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET"):
        environment.pop(key, None)
    return environment


def plan(env, **results):
    """What the fake script does per idea key (sorted ideas joined by +, or base)."""
    control = {key: [r if isinstance(r, dict) else {"val_bpb": r} for r in values] for key, values in results.items()}
    Path(env["FAKE_CONTROL"]).write_text(json.dumps(control))


def runner(repo, env, command, *args, timeout=300):
    extra = ["--max-disturbance", "1"] if command in ("baseline", "submit") else []
    if command in ("baseline", "submit"):
        extra += ["--script", "train.py"]
    return subprocess.run([sys.executable, str(RUNNER), command, *args, *extra],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def baseline(repo, env, *options):
    """The best's six runs: on the whole machine, or with slot options on the scheduler's slots
    (then wait records them), so that they are the kind the candidates will be."""
    done = runner(repo, env, "baseline", *options)
    assert done.returncode == 0, done.stdout + done.stderr
    if options:
        assert "BASELINE" in wait_all(repo, env)
    return git(repo, "rev-parse", "HEAD")


def edit(repo, idea, at_top=False):
    path = repo / "train.py"
    text = path.read_text()
    path.write_text(f"# idea: {idea}\n{text}" if at_top else f"{text}# idea: {idea}\n")


def submit(repo, env, idea, *options, at_top=False):
    best_script = (repo / "train.py").read_text()
    edit(repo, idea, at_top)
    done = runner(repo, env, "submit", idea, *options)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (repo / "train.py").read_text() == best_script, "submit puts the working tree back to the best"
    return done.stdout.split()[1]


def wait_all(repo, env):
    """Call wait until nothing is open; returns everything it printed."""
    printed = ""
    for _ in range(60):
        done = runner(repo, env, "wait", timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        printed += done.stdout
        if "nothing to wait for" in done.stdout or not open_candidates(repo):
            return printed
    raise AssertionError(f"wait never finished:\n{printed}")


def open_candidates(repo):
    book = json.loads((repo / ".autoresearch" / "parallel" / "candidates.json").read_text())
    return [c for c in book["candidates"].values() if c["phase"] != "done"]


def candidates(repo):
    return json.loads((repo / ".autoresearch" / "parallel" / "candidates.json").read_text())["candidates"]


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def run_records(repo):
    return {p.parent.name: json.loads(p.read_text()) for p in (repo / "runs").glob("c*/result.json")}


def test_two_candidates_run_at_once_on_two_slots_are_judged_against_their_base_and_status_shows_the_slots_kind(repo, env):
    # The first runs last long enough to overlap however long a submit takes to return.
    plan(env, base=BASELINE, a=[dict(val_bpb=v, seconds=10 if i == 0 else 0) for i, v in enumerate(WIN)],
         b=[{"val_bpb": 1.45, "seconds": 10}])
    best = baseline(repo, env, "--workers", "2")
    first = submit(repo, env, "a", "--workers", "2")
    second = submit(repo, env, "b", "--workers", "2")
    status = runner(repo, env, "status")
    assert status.returncode == 0, status.stderr
    shown = [line for line in status.stdout.splitlines() if line.startswith(("slot", "queued", "finished"))]
    assert any(first in line for line in shown) and any(second in line for line in shown), status.stdout
    # While the slots split the cores, status judges by their kind: the slot baseline is the best.
    assert "-1t/x1 (what a run on the scheduler's slots now has;" in status.stdout, status.stdout
    assert "best         1.300000 mean of 6 runs" in status.stdout, status.stdout
    printed = wait_all(repo, env)

    book = candidates(repo)
    a, b = book[first], book[second]
    assert "KEEP" in printed and "DISCARD" in printed, printed
    assert git(repo, "rev-parse", "HEAD") == a["commit"], "the win based on the best fast-forwards the branch"
    assert git(repo, "rev-parse", "HEAD~1") == best
    ledger_rows = rows(repo)
    a_rows = [r for r in ledger_rows if r[0] == a["commit"][:7]]
    b_rows = [r for r in ledger_rows if r[0] == b["commit"][:7]]
    assert [r[3] for r in a_rows] == ["keep"] * 6, "two judging runs and four confirmations"
    assert sorted(float(r[1]) for r in a_rows) == sorted(WIN), "confirmations finish in any order"
    assert [(r[1], r[3]) for r in b_rows] == [("1.450000", "discard")]
    records = run_records(repo)
    first_a, first_b = records[f"{first}-1"], records[f"{second}-1"]
    assert first_a["slot"] != first_b["slot"]
    assert (first_b["training_started_at"] < first_a["training_finished_at"]
            and first_a["training_started_at"] < first_b["training_finished_at"]), "the two first runs trained at once"
    assert (repo / "runs" / f"{first}-1" / "run.log").read_text().count("val_bpb") == 1


def test_a_win_on_a_stale_base_is_rebased_onto_the_new_best_and_rerun(repo, env):
    plan(env, base=BASELINE, a=WIN, b=WIN, **{"a+b": [1.100, 1.101, 1.099, 1.100, 1.102, 1.098]})
    baseline(repo, env, "--workers", "2")
    first = submit(repo, env, "a", "--workers", "2", at_top=True)
    second = submit(repo, env, "b", "--workers", "2")
    printed = wait_all(repo, env)

    book = candidates(repo)
    assert "REBASED" in printed, printed
    combined = [c for c in book.values() if c["id"] not in (first, second) and c["commit"] != c["base"]]
    assert len(combined) == 1
    winner = next(c for c in (book[first], book[second]) if c["commit"] == combined[0]["base"])
    assert git(repo, "rev-parse", "HEAD") == combined[0]["commit"]
    assert git(repo, "rev-parse", "HEAD~1") == winner["commit"]
    assert "# idea: a" in git(repo, "show", "HEAD:train.py") and "# idea: b" in git(repo, "show", "HEAD:train.py")
    statuses = [r[3] for r in rows(repo) if r[0] == combined[0]["commit"][:7]]
    assert statuses == ["keep"] * 6
    stale = next(c for c in (book[first], book[second]) if c is not winner)
    stale_rows = [r for r in rows(repo) if r[0] == stale["commit"][:7]]
    assert [r[3] for r in stale_rows] == ["discard", "discard"]
    assert all(f"rebased onto the new best {winner['commit'][:7]}" in r[4] for r in stale_rows)


def test_a_win_that_does_not_rebase_is_a_discard_naming_the_conflict(repo, env):
    plan(env, base=BASELINE, a=WIN, b=WIN)
    baseline(repo, env, "--workers", "2")
    first = submit(repo, env, "a", "--workers", "2")
    second = submit(repo, env, "b", "--workers", "2")
    printed = wait_all(repo, env)

    book = candidates(repo)
    assert [c["id"] for c in book.values() if c["commit"] != c["base"]] == [first, second], \
        "a conflicting rebase makes no new candidate"
    kept = [c for c in book.values() if git(repo, "rev-parse", "HEAD") == c["commit"]]
    assert len(kept) == 1
    lost = book[second] if kept[0] is book[first] else book[first]
    lost_rows = [r for r in rows(repo) if r[0] == lost["commit"][:7]]
    assert [r[3] for r in lost_rows] == ["discard", "discard"]
    assert "does not rebase onto the new best" in lost_rows[0][4] and "conflict in train.py" in lost_rows[0][4]
    assert "conflict in train.py" in printed


def test_a_killed_worker_is_rerun_once_then_recorded_as_a_crash(repo, env):
    kill = {"mode": "kill-worker"}
    plan(env, base=BASELINE, a=[kill, 1.45], b=[kill, kill])
    baseline(repo, env, "--workers", "2")
    first = submit(repo, env, "a", "--workers", "2")
    second = submit(repo, env, "b", "--workers", "2")
    printed = wait_all(repo, env)

    book = candidates(repo)
    a_rows = [r for r in rows(repo) if r[0] == book[first]["commit"][:7]]
    b_rows = [r for r in rows(repo) if r[0] == book[second]["commit"][:7]]
    assert [(r[1], r[3]) for r in a_rows] == [("1.450000", "discard")], "one lost worker: rerun, then judged"
    assert [r[3] for r in b_rows] == ["crash"]
    assert "worker lost mid-run" in b_rows[0][4] and "twice" in b_rows[0][4]
    assert "CRASH" in printed


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with two CPU threads or more")
def test_slots_with_part_of_the_cores_need_their_own_baseline_and_refuse_another_kind(repo, env):
    plan(env, base=BASELINE)
    baseline(repo, env)
    edit(repo, "a")
    refused = runner(repo, env, "submit", "a", "--workers", "2")
    assert refused.returncode == 2
    assert "no results of kind" in refused.stderr and "-1t/x1" in refused.stderr
    assert "baseline --workers 2" in refused.stderr
    git(repo, "checkout", "--", "train.py")
    # A node whose slot is another kind than the run was queued as refuses it before training.
    assert rows(repo)[0][4].endswith("[standard 300s/standard/pystdlib/cpu/cpu/x1]")
    whole_machine = {"time_budget": 300.0, "profile": "standard", "dataset": "pystdlib", "backend": "cpu",
                     "tier": "cpu", "world_size": 1, "standard": True}
    request = {"kind": whole_machine, "threads": 1, "script": "train.py", "timeout": 60, "max_disturbance": 1}
    origin = {"env": {}}
    on_slot = subprocess.run(
        [sys.executable, "-c", "import sys, json; from tools import cluster; "
         "print(json.dumps(cluster.train_in(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))))",
         str(repo), json.dumps(request), json.dumps(origin)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert on_slot.returncode == 0, on_slot.stderr
    refusal = json.loads(on_slot.stdout.strip().splitlines()[-1])["refused"]
    assert "this slot (1 threads on" in refusal and "cpu-1t/x1" in refusal and "queued as kind" in refusal
    assert len(rows(repo)) == 6, "nothing was recorded"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_candidate_runs_on_the_second_node_of_a_two_node_cluster(repo, env, ray_tmp):
    plan(env, base=BASELINE, a=[1.45])
    baseline(repo, env)
    port = free_port()
    token = Path(ray_tmp) / "auth_token"  # the cluster's own token, so ~/.ray is left alone
    token.write_text(os.urandom(32).hex())
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                           "--num-cpus", "1", "--resources", '{"experiment_slot": 0}', "--include-dashboard", "false",
                           "--object-store-memory", str(100 * 1024 ** 2), "--temp-dir", ray_tmp, "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stderr
    second = subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", str(len(os.sched_getaffinity(0))), "--resources", '{"experiment_slot": 1, "second_node": 1}',
                             "--object-store-memory", str(100 * 1024 ** 2), "--disable-usage-stats"],
                            env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    first = submit(repo, env, "a", "--address", f"127.0.0.1:{port}")
    printed = wait_all(repo, env)

    assert "DISCARD" in printed
    record = run_records(repo)[f"{first}-1"]
    nodes = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
                            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and "
                            "n['Resources'].get('second_node')]))" % port],
                           env=env, capture_output=True, text=True, timeout=180)
    assert json.loads(nodes.stdout.strip().splitlines()[-1]) == [record["node"]]


def test_a_win_survives_ctrl_c_of_wait_and_waits_for_an_uncommitted_edit(repo, env):
    plan(env, base=BASELINE, a=[dict(val_bpb=v, seconds=10 if i == 0 else 0) for i, v in enumerate(WIN)])
    best = baseline(repo, env, "--workers", "2")
    first = submit(repo, env, "a", "--workers", "2")
    interrupted = subprocess.Popen([sys.executable, str(RUNNER), "wait"], cwd=repo, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert interrupted.stdout.readline().startswith(f"WAITING  for {first}")  # a keep needs two runs: not yet
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130
    assert "nothing is lost; the scheduler keeps running" in stderr
    edit(repo, "next idea, not submitted yet")
    edited = (repo / "train.py").read_text()
    blocked = None
    for _ in range(30):
        done = runner(repo, env, "wait", timeout=600)
        if "BLOCKED" in done.stdout:
            blocked = done
            break
    assert blocked is not None and blocked.returncode == 2
    assert "uncommitted changes" in blocked.stdout and "wait again" in blocked.stdout
    assert (repo / "train.py").read_text() == edited, "the edit is untouched"
    assert git(repo, "rev-parse", "HEAD") == best, "the branch did not move under the edit"
    git(repo, "stash", "push", "--", "train.py")
    wait_all(repo, env)
    assert git(repo, "rev-parse", "HEAD") == candidates(repo)[first]["commit"]
    assert "+# idea: next idea, not submitted yet" in git(repo, "stash", "show", "-p"), "the edit is safe in the stash"



def source_night(repo, *ideas):
    """Another machine's branch autoresearch/src in this repository: each idea kept in turn after a
    baseline (the first at the top of train.py, the next at its end, so each applies alone), its
    results.tsv committed."""
    git(repo, "checkout", "--quiet", "-b", "autoresearch/src")
    commits = [git(repo, "rev-parse", "HEAD")]
    for idea in ideas:
        edit(repo, idea, at_top=idea == ideas[0])
        git(repo, "commit", "--quiet", "-am", idea)
        commits.append(git(repo, "rev-parse", "HEAD"))
    lines = [HEADER]
    for step, commit in enumerate(commits):
        description = "baseline" if step == 0 else ideas[step - 1]
        for run, value in enumerate((1.300 - 0.05 * step, 1.302 - 0.05 * step), start=1):
            lines.append(f"{commit[:7]}\t{value:.6f}\t2.0\tkeep\t{description}{' [run 2]' if run == 2 else ''} "
                         "[standard 300s/standard/pystdlib/mps/mps/x1]")
    (repo / "results.tsv").write_text("\n".join(lines) + "\n")
    git(repo, "commit", "--quiet", "-am", "the night's results")
    git(repo, "checkout", "--quiet", "autoresearch/test")
    return commits[1:]


def test_replay_on_the_slots_submits_every_change_at_once_and_wait_judges_them(repo, env):
    plan(env, base=BASELINE, wider=WIN, narrower=[1.45])
    wider, narrower = source_night(repo, "wider", "narrower")
    baseline(repo, env, "--workers", "2")
    replay = [sys.executable, str(RUNNER), "replay", "autoresearch/src", "--script", "train.py",
              "--max-disturbance", "1", "--workers", "2"]
    done = subprocess.run(replay, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    submitted = [line for line in done.stdout.splitlines() if line.startswith("SUBMIT")]
    assert len(submitted) == 2 and "wait" in done.stdout.splitlines()[-1], done.stdout
    assert "# idea: " not in git(repo, "diff", "HEAD"), "the working tree is back at the best"
    again = subprocess.run(replay, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [line.split()[0] for line in again.stdout.splitlines()[1:]] == ["QUEUED", "QUEUED"], again.stdout

    printed = wait_all(repo, env)
    assert "KEEP" in printed and "DISCARD" in printed, printed
    ledger_rows = rows(repo)
    kept = [r for r in ledger_rows if f"[replay of autoresearch/src {wider[:7]}]" in r[4]]
    lost = [r for r in ledger_rows if f"[replay of autoresearch/src {narrower[:7]}]" in r[4]]
    assert {r[3] for r in kept} == {"keep"} and [r[3] for r in lost] == ["discard"]
    assert "# idea: wider" in git(repo, "show", "HEAD:train.py")
    report = subprocess.run([sys.executable, str(KIT / "tools" / "report.py")], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (repo / "report.md").read_text().split("## Transfer", 1)[1]
    assert next(line for line in table.splitlines() if "| wider |" in line).endswith("| held |")
    assert next(line for line in table.splitlines() if "| narrower |" in line).endswith("| did not hold |")
    finished = subprocess.run(replay, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert [line.split()[0] for line in finished.stdout.splitlines()[1:]] == ["JUDGED", "JUDGED"], finished.stdout
