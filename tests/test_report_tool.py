"""tools/report.py: the morning report, on a generated night in a temporary git repository.

(tests/test_report.py is about backends/report.py, the summary of one run.)
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent.parent
REPORT = KIT / "tools" / "report.py"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
T0 = 1_700_000_000  # the night starts here (epoch seconds)
RUN_SECONDS, TRAINING_SECONDS = 100.0, 80.0

# (description, status, val_bpb, steps, commit time or None for the baseline's commit, run end or None)
NIGHT = [
    ("baseline (run 1/3)", "keep", 1.500, 200, None, 100),
    ("baseline (run 2/3)", "discard", 1.502, 200, None, 200),
    ("baseline (run 3/3)", "discard", 1.498, 200, None, 300),
    ("matrix lr 0.04 -> 0.05", "keep", 1.490, 200, 310, 410),
    ("softcap 20", "discard", 1.4916, 200, 420, 520),         # +0.0016 = 0.8x the noise: a near miss
    ("depth 8 [crash: out of memory]", "crash", 0.0, None, 530, None),  # 70 s until the next start
    ("wider mlp", "discard", 1.560, 100, 600, 700),           # half the baseline's steps: disturbed
    ("warmdown 0.7", "keep", 1.480, 200, 710, 810),
    ("lr x10", "discard", 1.700, 200, 820, 920),              # far worse, normal steps: nothing to rerun
    ("rope base as a string", "crash", 0.0, None, 930, None),  # the last run: run.log says why
]


def git(repo, *args, when=None):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e")
    if when is not None:
        env["GIT_COMMITTER_DATE"] = env["GIT_AUTHOR_DATE"] = f"@{when} +0000"
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def run_json(runs, val_bpb, steps, end):
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(end))
    fields = {"val_bpb": val_bpb, "training_seconds": TRAINING_SECONDS, "total_seconds": RUN_SECONDS,
              "peak_vram_mb": 2048.0, "num_steps": steps, "backend": "cpu", "chip": "Test EPYC (AVX-512 bf16)",
              "dataset": "pystdlib", "time_budget": 300, "harness": "abc123def456", "standard": True,
              "profile": "standard", "world_size": 1}
    (runs / f"run_{stamp}_{end}.json").write_text(json.dumps(fields))


@pytest.fixture
def night(tmp_path):
    """A repository with one commit per experiment, its results.tsv, runs/ and the last run.log."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    (repo / "train.py").write_text("LR = 0.04\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "--quiet", "-m", "base", when=T0 - 3600)
    git(repo, "checkout", "--quiet", "-b", "autoresearch/test")
    base = git(repo, "rev-parse", "--short=7", "HEAD")
    runs = repo / "runs"
    runs.mkdir()
    lines = []
    for number, (description, status, val_bpb, steps, committed, end) in enumerate(NIGHT):
        commit = base
        if committed is not None:
            (repo / "train.py").write_text(f"LR = 0.04  # experiment {number}\n")
            git(repo, "commit", "--quiet", "-am", description, when=T0 + committed)
            commit = git(repo, "rev-parse", "--short=7", "HEAD")
        if end is not None:
            run_json(runs, val_bpb, steps, T0 + end)
        lines.append(f"{commit}\t{val_bpb:.6f}\t{2.0 if end else 0.0:.1f}\t{status}\t{description}")
    (repo / "results.tsv").write_text(HEADER + "\n".join(lines) + "\n")
    (repo / "run.log").write_text("step 0\nTraceback (most recent call last):\n  File \"train.py\"\n"
                                  "TypeError: unsupported operand type(s) for ** or pow(): 'str' and 'Tensor'\n")
    return repo


def report(repo, *args):
    return subprocess.run([sys.executable, str(REPORT), *args], cwd=repo, capture_output=True, text=True,
                          timeout=120)


def load_report_module():
    spec = importlib.util.spec_from_file_location("report_tool", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_of_a_night_names_the_machine_baseline_best_and_gain(night):
    done = report(night)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrote report.md and progress.png"
    text = (night / "report.md").read_text()
    assert (night / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![progress](progress.png)" in text
    assert "- **Machine:** Test EPYC (AVX-512 bf16) (cpu)" in text
    assert ("- **Kind:** standard: profile standard, dataset pystdlib, time budget 300 s, 1 rank, "
            "harness abc123def456") in text
    assert "- **Experiments:** 7: 2 kept, 3 discarded, 2 crashed, in 10 runs (3 of them baseline runs)" in text
    assert "- **Baseline:** 1.500000 ± 0.002000 (3 runs)" in text
    assert "- **Best:** 1.480000 (1 run) at " in text and ", warmdown 0.7" in text
    assert "- **Gain:** -0.020000 (-1.33%)" in text
    assert "- **Noise:** std 0.002000 of single runs, pooled over 3 runs of 1 commit" in text


def test_report_lists_kept_changes_with_delta_and_diff_stat(night):
    assert report(night).returncode == 0
    text = (night / "report.md").read_text()
    kept = [line for line in text.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(kept) == 2
    assert kept[0].endswith("| matrix lr 0.04 -> 0.05 | 1.490000 | -0.010000 | 200 | train.py +1 -1 |")
    assert kept[1].endswith("| warmdown 0.7 | 1.480000 | -0.010000 | 200 | train.py +1 -1 |")


def test_report_finds_near_misses_and_disturbed_runs_but_not_plain_losses(night):
    assert report(night).returncode == 0
    worth = (night / "report.md").read_text().split("### Worth another try")[1].split("###")[0]
    assert "| softcap 20 | 1.491600 | +0.001600 | within the noise of the best: 0.8x the noise above it |" in worth
    assert "| wider mlp | 1.560000 | +0.070000 | disturbed: 100 steps against 200 for the baseline |" in worth
    assert "lr x10" not in worth
    assert worth.index("softcap 20") < worth.index("wider mlp")  # near misses first
    assert "warmdown 0.7" not in worth  # kept by 5x the noise: no doubt
    assert "**Note:** most changes landed within the noise" not in (night / "report.md").read_text()


def test_report_asks_to_confirm_a_win_inside_twice_the_noise(night):
    text = (night / "results.tsv").read_text().replace("1.480000\t2.0\tkeep", "1.487000\t2.0\tkeep")
    (night / "results.tsv").write_text(text)
    json_path = next(path for path in (night / "runs").glob("*.json") if '"val_bpb": 1.48,' in path.read_text())
    json_path.write_text(json_path.read_text().replace('"val_bpb": 1.48,', '"val_bpb": 1.487,'))
    assert report(night).returncode == 0
    worth = (night / "report.md").read_text().split("### Worth another try")[1].split("###")[0]
    assert "| warmdown 0.7 | 1.487000 | -0.003000 | kept on one run by 1.5x the noise: confirm it |" in worth


def test_report_groups_crashes_by_cause_from_tags_and_the_last_run_log(night):
    assert report(night).returncode == 0
    crashes = (night / "report.md").read_text().split("### Crashes")[1].split("###")[0]
    assert "- **out of memory** (1): " in crashes and " depth 8" in crashes
    assert "- **TypeError** (1): " in crashes
    assert ("rope base as a string (TypeError: unsupported operand type(s) for ** or pow(): 'str' and "
            "'Tensor')") in crashes


def test_report_counts_experiments_per_hour_and_where_the_time_went(night):
    assert report(night).returncode == 0
    timing = (night / "report.md").read_text().split("### Time")[1]
    # First start T0 (the first run ended at T0+100 after 100 s), last event T0+930 (the last crash).
    assert f"7 experiments in 10 runs from {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(T0))}" in timing
    assert f"({930 / 60:.1f} min): **{7 / (930 / 3600):.1f} experiments per hour**" in timing
    assert "| training (the budget) | 10.7 min | 69% |" in timing            # 8 runs x 80 s
    assert "| start-up, compiling, evaluation | 2.7 min | 17% |" in timing      # 8 runs x 20 s
    assert "| crashed runs, to the next start (1 crash not timed) | 70 s | 8% |" in timing
    assert "| between runs (runner, agent) | 60 s | 6% |" in timing           # 930 - 640 - 160 - 70


def test_report_puts_several_branches_side_by_side(night):
    other = (night / "results.tsv").read_text().replace("1.480000", "1.470000")
    git(night, "add", "results.tsv")
    git(night, "commit", "--quiet", "-m", "results")
    git(night, "checkout", "--quiet", "-b", "autoresearch/test-mac")
    (night / "results.tsv").write_text(other)
    git(night, "commit", "--quiet", "-am", "results of the other machine")
    done = report(night, "--branch", "autoresearch/test", "--branch", "autoresearch/test-mac", "-o", "both.md")
    assert done.returncode == 0, done.stderr
    text = (night / "both.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| autoresearch/")]
    assert table[0].startswith("| autoresearch/test | Test EPYC (AVX-512 bf16) (cpu) | standard | 7 | 2 | 2 | "
                               "1.500000 | 1.480000 | -0.020000 (-1.33%) |")
    # The other machine's 1.47 run has no run JSON here: its machine is not guessed.
    assert "| 1.500000 | 1.470000 | -0.030000 (-2.00%) |" in table[1]
    assert "## autoresearch/test\n" in text and "## autoresearch/test-mac\n" in text


def test_report_warns_when_most_changes_land_within_the_noise(tmp_path):
    rows = [f"a000001\t{1.50 + d:.6f}\t2.0\t{'keep' if i == 0 else 'discard'}\tbaseline (run {i + 1}/3)"
            for i, d in enumerate((0.0, 0.05, -0.05))]
    rows += [f"b00000{i}\t{1.51 + i / 1000:.6f}\t2.0\tdiscard\ttry {i}" for i in range(4)]
    (tmp_path / "results.tsv").write_text(HEADER + "\n".join(rows) + "\n")
    assert report(tmp_path).returncode == 0
    text = (tmp_path / "report.md").read_text()
    assert "- **Note:** most changes landed within the noise of the best" in text
    assert text.count("within the noise of the best: ") == 4


def test_report_skips_unreadable_lines_and_says_so(night):
    with open(night / "results.tsv", "a") as results:
        results.write("garbage line without tabs\nabc1234\tnot-a-number\t1.0\tkeep\tx\n"
                      "not-hex\t1.400000\t1.0\tkeep\tx\n")
    done = report(night)
    assert done.returncode == 0, done.stderr
    assert "- **Unreadable lines skipped:** 3" in (night / "report.md").read_text()


def test_report_explains_an_empty_results_file(tmp_path):
    (tmp_path / "results.tsv").write_text(HEADER)
    done = report(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == ("no experiments in results.tsv yet: run uv run tools/experiment.py "
                                   "baseline first")
    assert not (tmp_path / "report.md").exists()


def test_non_standard_rows_are_reported_apart_from_standard_ones():
    module = load_report_module()
    rows = module.parse_rows(HEADER + (
        "a000001\t1.500000\t2.0\tkeep\tbaseline\n"
        "a000002\t1.900000\t1.0\tkeep\tbaseline [non-standard, 15s budget]\n"
        "a000003\t0.000000\t0.0\tcrash\tdepth 9\n"
        "a000004\t1.880000\t1.0\tkeep\tlr 0.05 [non-standard, 15s budget]\n"))
    sections = module.build_sections([("results.tsv", rows)], [], None)
    assert [s["name"] for s in sections] == ["results.tsv, standard", "results.tsv, non-standard, 15s budget"]
    assert [len(s["rows"]) for s in sections] == [1, 3]  # the untagged crash follows the run before it
    assert sections[1]["best"][0] == pytest.approx(1.88)


def test_crash_causes_are_grouped_by_kind_of_failure():
    module = load_report_module()
    assert module.cause_group("timed out after 720 s, process group killed") == "timed out"
    assert module.cause_group("FAIL: loss is nan at step 41") == "diverged (NaN or exploding loss)"
    assert module.cause_group("torch.OutOfMemoryError: CPU out of memory") == "out of memory"
    assert module.cause_group("exit code 1: ValueError: bad shape") == "ValueError"
    assert module.cause_group("depth 16 (OOM)") == "out of memory"
    assert module.cause_group(None) == "cause not recorded"


def test_rows_written_by_the_runner_give_kind_reruns_and_crash_causes():
    module = load_report_module()
    kind = "[standard 300s/standard/pystdlib/cpu/cpu/x1]"
    rows = module.parse_rows(HEADER + (
        f"a000001\t1.500000\t2.0\tkeep\tbaseline {kind}\n"
        f"a000001\t1.502000\t2.0\tkeep\tbaseline [run 2] {kind}\n"
        f"a000002\t1.490000\t2.0\tdiscard\tlr 0.05 [run 2] [disturbed: other processes used 41% of the CPU] {kind}\n"
        f"a000003\t0.000000\t0.0\tcrash\tdepth 9 [crash: exit code 1: FAIL: loss is nan at step 3] {kind}\n"))
    assert {row["kind"] for row in rows} == {kind[1:-1]}
    assert [row["role"] for row in rows] == ["baseline", "baseline", "rerun", "experiment"]
    assert module.cause_group(module.crash_cause(rows[3], "")) == "diverged (NaN or exploding loss)"


def test_report_and_plot_reject_the_same_lines():
    """One parser: a line tools/plot.py refuses is an unreadable line for the report, never a row."""
    module = load_report_module()
    from tools import plot
    bad = "xyz!123\t1.400000\t1.0\tkeep\tnot a commit id\n"
    with pytest.raises(SystemExit, match="line 2"):
        plot.parse_results(HEADER + bad)
    rows = module.parse_rows(HEADER + "a000001\t1.500000\t2.0\tkeep\tbaseline\n" + bad)
    assert [row["commit"] for row in rows] == ["a000001"]
    assert rows[0]["unreadable_lines"] == 1


def test_a_near_miss_is_one_entry_judged_on_the_mean_of_all_its_runs(night):
    lines = (night / "results.tsv").read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.rstrip().endswith("\tsoftcap 20"))
    commit = lines[first].split("\t")[0]
    lines.insert(first + 1, f"{commit}\t1.491000\t2.0\tdiscard\tsoftcap 20 [run 2]\n")
    (night / "results.tsv").write_text("".join(lines))
    assert report(night).returncode == 0
    text = (night / "report.md").read_text()
    worth = text.split("### Worth another try")[1].split("###")[0]
    assert worth.count("softcap 20") == 1
    assert ("| softcap 20 | 1.491300 (2 runs) | +0.001300 | within the noise of the best: 0.8x the noise above it |"
            in worth)
    assert "The runner refuses the same change on the same best" in worth
    assert "7 experiments in 11 runs from " in text.split("### Time")[1]
