"""Replay of another branch's kept changes (tools/replay.py), end to end on the fake kit of
test_experiment.py with a fake trainer whose ideas act differently on two fake machines.

The trainer's val_bpb is 1.3 plus the effect, on $FAKE_MACHINE, of every idea its script holds
("# idea: <name>" lines), plus a small alternating residual, so the runner's rule decides as it
would on real runs: "wider" helps on both machines, "smaller batch" only on machine a.
"""

import json
import shlex
import signal
import subprocess
import sys

from test_experiment import KIND, RUNNER, git, make_kit, rows, runner, wait_for
from test_experiment import env  # noqa: F401 (fixture)

EFFECTS = {"a": {"wider": -0.05, "smaller batch": -0.04, "mlx only": -0.03},
           "b": {"wider": -0.05, "smaller batch": +0.02, "mlx only": -0.03}}

MACHINE_TRAIN = '''"""Fake trainer: val_bpb from the ideas in this script and the machine in $FAKE_MACHINE."""
import json, os, sys, time
from pathlib import Path
from backends.report import format_summary, write_run_json

effects = json.loads(os.environ["FAKE_EFFECTS"])[os.environ["FAKE_MACHINE"]]
here = Path(__file__)  # the runner's script: the candidate's, or the best's copy when it rechecks the best
mlx = here.with_name("train_mlx.py") if here.with_name("train_mlx.py").exists() else Path("train_mlx.py")
ideas = [line.split("# idea: ", 1)[1].strip() for script in (here, mlx) for line in script.read_text().splitlines()
         if line.startswith("# idea: ")]
counter = Path(os.environ["FAKE_COUNTER"])
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
hang = os.environ.get("FAKE_HANG_ON")
if hang and hang in ideas:
    Path(os.environ["FAKE_MARKER"]).write_text("started")
    time.sleep(60)
value = 1.3 + sum(effects.get(idea, 0.0) for idea in ideas) + (0.001, -0.001, 0.0005, -0.0005)[n % 4]
steps, batch = 20, 512
fields = {
    "val_bpb": round(value, 6), "training_seconds": 1.0, "total_seconds": 2.0, "peak_vram_mb": 2048.0,
    "mfu_percent": 1.0, "total_tokens_M": steps * batch / 1e6, "num_steps": steps, "num_params_M": 0.1,
    "depth": 2, "backend": "cpu", "chip": "fake", "dataset": "pystdlib", "eval_tokens": 8192,
    "time_budget": 300.0, "harness": "0" * 12, "standard": True, "profile": "standard", "world_size": 1,
    "train_tokens_per_second": 1000.0, "untimed_steps": 2, "untimed_tokens": 2 * batch,
    "timed_tokens": (steps - 2) * batch, "total_batch_size": batch,
}
print(format_summary(fields))
write_run_json(fields)
'''


def on_machine(env, machine, tmp_path):
    return dict(env, FAKE_MACHINE=machine, FAKE_EFFECTS=json.dumps(EFFECTS), FAKE_COUNTER=str(tmp_path / "counter"),
                FAKE_MARKER=str(tmp_path / "hanging"),
                AUTORESEARCH_TRAIN_CMD=f"{shlex.quote(sys.executable)} {{script}}")


def idea(repo, name, script="train.py"):
    with open(repo / script, "a") as f:
        f.write(f"# idea: {name}\n")


def night(repo, env, *ideas):
    """A night on this branch: the baseline, then each idea as an experiment."""
    assert runner(repo, env, "baseline").returncode == 0
    for name in ideas:
        idea(repo, name)
        done = runner(repo, env, "run", name)
        assert done.returncode == 0, done.stderr


def source_branch(kit, env, tmp_path, *ideas, name="autoresearch/src", mlx_ideas=()):
    """The other machine: a clone of the kit's main on branch `name`, a night of these ideas there
    (mlx_ideas edit train_mlx.py), its results.tsv committed, and the branch fetched into the kit."""
    clone = tmp_path / name.replace("/", "-")
    subprocess.run(["git", "clone", "--quiet", "--branch", "main", str(kit), str(clone)], check=True, capture_output=True)
    git(clone, "checkout", "--quiet", "-b", name)
    night(clone, env, *ideas)
    for name_ in mlx_ideas:
        idea(clone, name_, "train_mlx.py")
        done = runner(clone, env, "run", name_)
        assert done.returncode == 0, done.stderr
    git(clone, "add", "results.tsv")
    git(clone, "commit", "--quiet", "-m", "the night's results")
    git(kit, "fetch", "--quiet", str(clone), f"{name}:{name}")
    return clone


def replay(repo, env, branch="autoresearch/src", *extra):
    return subprocess.run([sys.executable, str(RUNNER), "replay", branch, "--script", "train.py",
                           "--max-disturbance", "1", "--max-load-change", "1", *extra],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def machine_kit(tmp_path):
    kit = make_kit(tmp_path / "kit", MACHINE_TRAIN)
    (kit / "train_mlx.py").write_text('"""The MLX script of the fake kit."""\n')
    git(kit, "add", "train_mlx.py")
    git(kit, "commit", "--quiet", "-m", "an mlx script")
    git(kit, "branch", "--quiet", "--force", "main", "HEAD")
    return kit


def test_a_win_that_holds_is_kept_and_one_that_needs_its_machine_is_not(env, tmp_path):  # noqa: F811
    repo = machine_kit(tmp_path)
    source_branch(repo, on_machine(env, "a", tmp_path), tmp_path, "wider", "smaller batch")
    here = on_machine(env, "b", tmp_path)
    night(repo, here)
    done = replay(repo, here)
    assert done.returncode == 0, done.stderr
    judged = [r for r in rows(repo) if "[replay of autoresearch/src" in r[4]]
    wider = [r for r in judged if r[4].startswith("wider")]
    smaller = [r for r in judged if r[4].startswith("smaller batch")]
    assert wider and {r[3] for r in wider} == {"keep"}
    assert smaller and {r[3] for r in smaller} == {"discard"}
    assert "# idea: wider" in (repo / "train.py").read_text()
    assert "# idea: smaller batch" not in (repo / "train.py").read_text()
    source = git(repo, "log", "--format=%h %s", "autoresearch/src")
    wider_commit = next(line.split()[0] for line in source.splitlines() if line.endswith(" wider"))
    assert wider[0][4] == f"wider [replay of autoresearch/src {wider_commit[:7]}] {KIND}"
    report = subprocess.run([sys.executable, str(RUNNER.parent / "report.py")], cwd=repo, env=here,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (repo / "report.md").read_text()
    table = text[text.index("## Transfer"):]
    wider_line = next(line for line in table.splitlines() if "| wider |" in line)
    smaller_line = next(line for line in table.splitlines() if "| smaller batch |" in line)
    there, here = (float(cell.split()[0]) for cell in wider_line.split("|")[4:6])
    assert wider_line.endswith("| held |") and there > 0.045 and here > 0.045
    there, here = (float(cell.split()[0]) for cell in smaller_line.split("|")[4:6])
    assert smaller_line.endswith("| did not hold |") and there > 0.035 and here < -0.015


def test_replay_resumes_after_an_interruption_and_never_judges_a_change_twice(env, tmp_path):  # noqa: F811
    repo = machine_kit(tmp_path)
    source_branch(repo, on_machine(env, "a", tmp_path), tmp_path, "wider", "smaller batch")
    here = on_machine(env, "b", tmp_path)
    night(repo, here)
    hanging = dict(here, FAKE_HANG_ON="smaller batch")
    process = subprocess.Popen([sys.executable, str(RUNNER), "replay", "autoresearch/src", "--script", "train.py",
                                "--max-disturbance", "1", "--max-load-change", "1"],
                               cwd=repo, env=hanging, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "hanging")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    wider_rows = len([r for r in rows(repo) if r[4].startswith("wider [replay")])
    assert wider_rows > 0
    assert git(repo, "status", "--porcelain", "--", "train.py")  # the interrupted edit is left staged...
    git(repo, "checkout", "HEAD", "--", "train.py")              # ...and the user drops it
    again = replay(repo, here)
    assert again.returncode == 0, again.stderr
    assert "judged here already" in again.stdout
    assert len([r for r in rows(repo) if r[4].startswith("wider [replay")]) == wider_rows
    judged = [r for r in rows(repo) if r[4].startswith("smaller batch [replay") and "unjudged" not in r[4]]
    assert judged and {r[3] for r in judged} == {"discard"}
    count = len(rows(repo))
    third = replay(repo, here)
    assert third.stdout.count("judged here already") == 2
    assert len(rows(repo)) == count and "running:" not in third.stdout


def test_other_framework_changes_need_porting_and_conflicts_name_the_file(env, tmp_path):  # noqa: F811
    repo = machine_kit(tmp_path)
    source_branch(repo, on_machine(env, "a", tmp_path), tmp_path, "wider", mlx_ideas=["mlx only"])
    here = on_machine(env, "b", tmp_path)
    # This branch rewrote the end of train.py, where the source's "wider" line goes: a conflict.
    script = (repo / "train.py").read_text().splitlines(keepends=True)
    (repo / "train.py").write_text("".join(script[:-1]) + "write_run_json(fields)  # the record\n")
    git(repo, "commit", "--quiet", "-am", "a comment on the last line")
    night(repo, here)
    before = len(rows(repo))
    done = replay(repo, here)
    assert done.returncode == 0, done.stderr
    assert "PORTING" in done.stdout and "changes train_mlx.py, not train.py: needs porting" in done.stdout
    assert "CONFLICT" in done.stdout and "train.py" in done.stdout.split("CONFLICT", 1)[1].splitlines()[0]
    assert len(rows(repo)) == before  # neither ran


def test_a_change_already_here_is_present_and_an_empty_branch_has_nothing_to_replay(env, tmp_path):  # noqa: F811
    repo = machine_kit(tmp_path)
    source = on_machine(env, "a", tmp_path)
    source_branch(repo, source, tmp_path, name="autoresearch/empty")
    source_branch(repo, source, tmp_path, "wider")
    here = on_machine(env, "b", tmp_path)
    night(repo, here, "wider")
    empty = replay(repo, here, "autoresearch/empty")
    assert empty.returncode == 0 and "nothing to replay" in empty.stdout
    before = len(rows(repo))
    done = replay(repo, here)
    assert done.returncode == 0, done.stderr
    assert "PRESENT" in done.stdout and len(rows(repo)) == before


def test_replay_without_the_source_results_says_how_to_give_them(env, tmp_path):  # noqa: F811
    repo = machine_kit(tmp_path)
    done = replay(repo, on_machine(env, "b", tmp_path), "autoresearch/nowhere")
    assert done.returncode == 2
    assert "no results.tsv committed on autoresearch/nowhere" in done.stderr and "--results" in done.stderr
