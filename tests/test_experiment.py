"""The experiment runner, end to end on a temporary git repository with a fake training script.

The fake script prints the summary (and writes the JSON) that a control file asks for, one result
per run, or fails, or hangs. Every test drives tools/experiment.py as a subprocess, as an agent
would, and checks git, results.tsv and the verdict afterwards.
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
print("step 1 | loss 9.0\\rstep 2 | loss 8.0")
fields = {
    "val_bpb": result["val_bpb"], "training_seconds": 1.0, "total_seconds": 2.0,
    "peak_vram_mb": result.get("peak_vram_mb", 2048.0), "mfu_percent": 1.0, "total_tokens_M": 0.1,
    "num_steps": 2, "num_params_M": 0.1, "depth": 2, "backend": "cpu", "chip": "fake",
    "dataset": "pystdlib", "eval_tokens": 8192, "time_budget": result.get("time_budget", 300.0),
    "harness": "0" * 12, "standard": result.get("standard", True), "profile": "standard", "world_size": 1,
}
print(format_summary(fields))
if mode != "summary-only":
    write_run_json(fields)
'''


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A miniature kit on branch autoresearch/test: stand-in harness, fake train.py, header-only results."""
    root = tmp_path / "kit"
    (root / "backends").mkdir(parents=True)
    shutil.copy(KIT / "backends" / "report.py", root / "backends" / "report.py")
    (root / "backends" / "__init__.py").write_text('"""Stand-in for the locked backends package."""\n')
    (root / "prepare.py").write_text('"""Stand-in for the locked harness."""\nTIME_BUDGET = 300\n')
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "results.tsv").write_text(HEADER + "\n")
    (root / ".gitignore").write_text("run.log\nruns/\n__pycache__/\n")
    git(root, "init", "--quiet", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "kit")
    git(root, "checkout", "--quiet", "-b", "autoresearch/test")
    return root


@pytest.fixture
def env(tmp_path):
    environment = dict(os.environ)
    environment.update({
        "AUTORESEARCH_TRAIN_CMD": f"{shlex.quote(sys.executable)} train.py",
        "FAKE_CONTROL": str(tmp_path / "control.json"),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    environment.pop("AUTORESEARCH_RUNS_DIR", None)
    return environment


def plan(env, *results, marker=None):
    """What the fake script does on its next runs, one dict per run."""
    Path(env["FAKE_CONTROL"]).write_text(json.dumps({"results": list(results), "marker": str(marker)}))


def runner(repo, env, command, *args):
    script = ["--script", "train.py"] if command in ("run", "baseline") else []
    return subprocess.run([sys.executable, str(RUNNER), command, *args, *script],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=60)


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


def test_baseline_is_kept_then_better_result_kept_and_branch_advances(repo, env):
    start = git(repo, "rev-parse", "HEAD")
    plan(env, {"val_bpb": 1.3}, {"val_bpb": 1.25, "peak_vram_mb": 3123.0})
    assert runner(repo, env, "baseline").returncode == 0
    edit(repo, "wider mlp")
    done = runner(repo, env, "run", "wider mlp")
    assert done.returncode == 0, done.stderr
    head = git(repo, "rev-parse", "HEAD")
    assert git(repo, "rev-parse", "HEAD~1") == start
    assert git(repo, "log", "-1", "--format=%s") == "wider mlp"
    assert git(repo, "show", "--name-only", "--format=", "HEAD") == "train.py"
    assert rows(repo) == [[start[:7], "1.300000", "2.0", "keep", "baseline"],
                          [head[:7], "1.250000", "3.0", "keep", "wider mlp"]]
    assert done.stdout.splitlines()[-1] == f"KEEP     1.250000 (best was 1.300000, -0.050000) {head[:7]} wider mlp"


def test_worse_result_is_discarded_and_only_the_script_commit_reverted(repo, env):
    plan(env, {"val_bpb": 1.3}, {"val_bpb": 1.35})
    runner(repo, env, "baseline")
    kept = git(repo, "rev-parse", "HEAD")
    script_before = (repo / "train.py").read_text()
    (repo / "notes.txt").write_text("untracked notes survive\n")
    edit(repo, "deeper model")
    done = runner(repo, env, "run", "deeper model")
    assert done.returncode == 0, done.stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert (repo / "train.py").read_text() == script_before
    assert (repo / "notes.txt").exists() and "summary" not in (repo / "notes.txt").read_text()
    assert "val_bpb:" in (repo / "run.log").read_text()
    assert [r[2:4] for r in rows(repo)] == [["2.0", "keep"], ["2.0", "discard"]]
    assert rows(repo)[1][1] == "1.350000"
    assert done.stdout.splitlines()[-1].startswith("DISCARD  1.350000 (best is 1.300000, +0.050000)")
    assert git(repo, "status", "--porcelain", "--", "train.py") == ""


def test_equal_result_is_discarded(repo, env):
    plan(env, {"val_bpb": 1.3}, {"val_bpb": 1.3})
    runner(repo, env, "baseline")
    kept = git(repo, "rev-parse", "HEAD")
    edit(repo, "same thing")
    done = runner(repo, env, "run", "same thing")
    assert rows(repo)[1][3] == "discard"
    assert git(repo, "rev-parse", "HEAD") == kept
    assert "+0.000000" in done.stdout


@pytest.mark.parametrize("mode, reason", [("fail", "FAIL: loss is nan at step 3"),
                                          ("traceback", "RuntimeError: out of memory")])
def test_crash_is_logged_as_zeros_and_reverted(repo, env, mode, reason):
    plan(env, {"val_bpb": 1.3}, {"mode": mode})
    runner(repo, env, "baseline")
    kept = git(repo, "rev-parse", "HEAD")
    edit(repo, "bad idea")
    done = runner(repo, env, "run", "bad idea")
    assert done.returncode == 0, done.stderr
    crashed = rows(repo)[1]
    assert crashed[1:] == ["0.000000", "0.0", "crash", "bad idea"]
    assert crashed[0] != kept[:7]
    assert git(repo, "rev-parse", "HEAD") == kept
    assert done.stdout.splitlines()[-1].startswith("CRASH    0.000000 (exit code 1: ")
    assert reason in done.stdout


def test_summary_without_json_is_read_from_run_log(repo, env):
    plan(env, {"val_bpb": 1.2345678, "mode": "summary-only"})
    runner(repo, env, "baseline")
    assert rows(repo)[0][1:4] == ["1.234568", "2.0", "keep"]


def test_timeout_kills_the_whole_process_group_and_logs_crash(repo, env, tmp_path):
    marker = tmp_path / "started"
    plan(env, {"val_bpb": 1.3}, {"mode": "hang"}, marker=marker)
    runner(repo, env, "baseline")
    kept = git(repo, "rev-parse", "HEAD")
    edit(repo, "slow idea")
    started = time.monotonic()
    done = runner(repo, env, "run", "slow idea", "--timeout", "2")
    assert time.monotonic() - started < 10
    assert rows(repo)[1][1:] == ["0.000000", "0.0", "crash", "slow idea"]
    assert "timed out after 2 s" in done.stdout
    assert git(repo, "rev-parse", "HEAD") == kept
    script_pid, helper_pid = map(int, marker.read_text().split())
    assert wait_for_death(script_pid) and wait_for_death(helper_pid)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_run_kills_training_undoes_commit_and_records_nothing(repo, env, tmp_path, signum):
    marker = tmp_path / "started"
    plan(env, {"val_bpb": 1.3}, {"mode": "hang"}, marker=marker)
    runner(repo, env, "baseline")
    kept = git(repo, "rev-parse", "HEAD")
    results_before = (repo / "results.tsv").read_text()
    edit(repo, "interrupted idea")
    edited = (repo / "train.py").read_text()
    process = subprocess.Popen([sys.executable, str(RUNNER), "run", "interrupted idea", "--script", "train.py"],
                               cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the fake training script never started"
    assert git(repo, "rev-parse", "HEAD") != kept
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 130
    assert "interrupted: nothing recorded" in stderr
    assert git(repo, "rev-parse", "HEAD") == kept
    assert (repo / "train.py").read_text() == edited
    assert git(repo, "diff", "--cached", "--name-only") == "train.py"
    assert (repo / "results.tsv").read_text() == results_before
    script_pid, helper_pid = map(int, marker.read_text().split())
    assert wait_for_death(script_pid) and wait_for_death(helper_pid)


@pytest.mark.parametrize("change", ["uncommitted prepare", "committed backends", "new backends file"])
def test_modified_harness_is_refused_before_anything_runs(repo, env, change):
    plan(env, {"val_bpb": 1.0})
    if change == "uncommitted prepare":
        (repo / "prepare.py").write_text("TIME_BUDGET = 1\n")
    elif change == "committed backends":
        (repo / "backends" / "__init__.py").write_text("EVAL_TOKENS = 1\n")
        git(repo, "commit", "--quiet", "-am", "sneaky")
    else:
        (repo / "backends" / "easier_eval.py").write_text("\n")
    head = git(repo, "rev-parse", "HEAD")
    edit(repo, "idea")
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert done.stderr.startswith("refusing to run: the harness is locked")
    assert len(done.stderr.strip().splitlines()) == 1
    assert git(repo, "rev-parse", "HEAD") == head
    assert rows(repo) == []
    assert not (repo / "run.log").exists()


def test_runs_on_main_are_refused(repo, env):
    git(repo, "checkout", "--quiet", "main")
    done = runner(repo, env, "run", "idea")
    assert done.returncode == 2
    assert "git checkout -b autoresearch/<tag>" in done.stderr


def test_rows_have_tabs_only_between_columns_and_fixed_decimals(repo, env):
    plan(env, {"val_bpb": 1.0, "peak_vram_mb": 1536.0}, {"val_bpb": 0.9876543, "peak_vram_mb": 5000.0},
         {"mode": "fail"})
    runner(repo, env, "baseline")
    edit(repo, "one")
    runner(repo, env, "run", "lr\t0.04\nand  warmup 0.1")
    edit(repo, "two")
    runner(repo, env, "run", "crashing\tidea")
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == HEADER
    assert all(ROW.match(line) for line in lines[1:]), lines
    assert [line.split("\t")[1:] for line in lines[1:]] == [
        ["1.000000", "1.5", "keep", "baseline"],
        ["0.987654", "4.9", "keep", "lr 0.04 and warmup 0.1"],
        ["0.000000", "0.0", "crash", "crashing idea"],
    ]


def test_baseline_repeats_record_noise_floor_used_as_default_threshold(repo, env):
    plan(env, {"val_bpb": 1.30}, {"val_bpb": 1.31}, {"val_bpb": 1.29}, {"val_bpb": 1.295}, {"val_bpb": 1.285})
    done = runner(repo, env, "baseline", "--repeat", "3")
    assert done.returncode == 0, done.stderr
    assert [r[3:] for r in rows(repo)] == [["keep", "baseline (run 1/3)"], ["discard", "baseline (run 2/3)"],
                                          ["discard", "baseline (run 3/3)"]]
    state = json.loads((repo / ".autoresearch" / "state.json").read_text())
    assert state["noise_floor"]["n"] == 3
    assert state["noise_floor"]["mean"] == pytest.approx(1.30)
    assert state["noise_floor"]["std"] == pytest.approx(0.01)
    assert git(repo, "status", "--porcelain") == "M results.tsv"  # the state file keeps itself out of git
    edit(repo, "small gain")
    small = runner(repo, env, "run", "small gain")
    assert rows(repo)[3][3] == "discard"
    assert "threshold 0.010000" in small.stdout
    edit(repo, "real gain")
    runner(repo, env, "run", "real gain")
    assert rows(repo)[4][1:4] == ["1.285000", "2.0", "keep"]


def test_explicit_threshold_overrides_the_default(repo, env):
    plan(env, {"val_bpb": 1.30}, {"val_bpb": 1.299}, {"val_bpb": 1.30})
    runner(repo, env, "baseline")
    edit(repo, "tiny gain")
    done = runner(repo, env, "run", "tiny gain", "--threshold", "0.01")
    assert rows(repo)[1][3] == "discard"
    assert "threshold 0.010000" in done.stdout
    edit(repo, "simplification")
    runner(repo, env, "run", "simplification: drop the gate", "--threshold", "-0.001")
    assert rows(repo)[2][3] == "keep"  # a negative threshold accepts an equal result


def test_nonstandard_results_are_only_compared_with_the_same_budget(repo, env):
    short = {"standard": False, "time_budget": 60.0}
    plan(env, {"val_bpb": 1.30}, {"val_bpb": 1.50, **short}, {"val_bpb": 1.31}, {"val_bpb": 1.60, **short},
         {"val_bpb": 1.45, **short})
    runner(repo, env, "baseline")
    for idea in ("short a", "std b", "short c", "short d"):
        edit(repo, idea)
        runner(repo, env, "run", idea)
    assert [(r[1], r[3], r[4]) for r in rows(repo)] == [
        ("1.300000", "keep", "baseline"),
        ("1.500000", "keep", "short a [non-standard, 60s budget]"),
        ("1.310000", "discard", "std b"),
        ("1.600000", "discard", "short c [non-standard, 60s budget]"),
        ("1.450000", "keep", "short d [non-standard, 60s budget]"),
    ]


def test_unchanged_script_still_runs_and_says_so(repo, env):
    plan(env, {"val_bpb": 1.3}, {"val_bpb": 1.29})
    runner(repo, env, "baseline")
    head = git(repo, "rev-parse", "HEAD")
    done = runner(repo, env, "run", "rerun as is")
    assert "has no changes" in done.stdout
    assert git(repo, "rev-parse", "HEAD") == head
    assert rows(repo)[1][0] == head[:7]


def test_status_and_best_report_the_loop(repo, env):
    plan(env, {"val_bpb": 1.30}, {"val_bpb": 1.32}, {"val_bpb": 1.25}, {"val_bpb": 1.40}, {"mode": "fail"})
    runner(repo, env, "baseline", "--repeat", "2")
    edit(repo, "good")
    runner(repo, env, "run", "good idea")
    best_commit = git(repo, "rev-parse", "--short=7", "HEAD")
    edit(repo, "bad")
    runner(repo, env, "run", "bad idea")
    edit(repo, "broken")
    last = runner(repo, env, "run", "broken idea").stdout.splitlines()[-1]
    status = runner(repo, env, "status")
    assert status.returncode == 0, status.stderr
    lines = {line[:13].strip(): line[13:] for line in status.stdout.splitlines()}
    assert lines["branch"].startswith("autoresearch/test (base ")
    assert "harness unchanged" in lines["branch"]
    assert lines["best"] == f"1.250000 {best_commit} good idea"
    assert lines["experiments"] == "5 (2 keep, 2 discard, 1 crash)"
    assert lines["noise floor"].startswith("std 0.014142, mean 1.310000, n=2")
    assert lines["last verdict"] == last
    best = runner(repo, env, "best")
    assert best.stdout.strip() == f"{best_commit}\t1.250000\t2.0\tkeep\tgood idea"


def test_best_without_results_says_what_to_do(repo, env):
    done = runner(repo, env, "best")
    assert done.returncode == 1
    assert "baseline" in done.stderr
