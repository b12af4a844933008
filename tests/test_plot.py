"""tools/plot.py: the picture of a run, from results files and from branches."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent.parent
PLOT = KIT / "tools" / "plot.py"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
RESULTS = HEADER + (
    "a000001\t1.620000\t3.1\tkeep\tbaseline\n"
    "a000002\t1.630000\t3.1\tdiscard\twider mlp\n"
    "a000003\t1.600000\t3.3\tkeep\tlower lr\n"
    "a000004\t0.000000\t0.0\tcrash\tdouble depth (OOM)\n"
    "a000005\t3.400000\t3.1\tdiscard\tlr x10 diverged\n"
    "a000006\t1.580000\t3.2\tkeep\tlonger warmdown\n"
)


def load_plot_module():
    spec = importlib.util.spec_from_file_location("plot", PLOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plot(*args, cwd):
    return subprocess.run([sys.executable, str(PLOT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_writes_progress_png_from_results_tsv(tmp_path):
    (tmp_path / "results.tsv").write_text(RESULTS)
    done = plot(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrote progress.png"
    assert is_png(tmp_path / "progress.png")


def test_plot_puts_several_files_and_a_branch_side_by_side(tmp_path):
    (tmp_path / "m4max.tsv").write_text(RESULTS)
    (tmp_path / "cpu.tsv").write_text(RESULTS.replace("1.5", "1.7"))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "results.tsv").write_text(RESULTS)
    for command in (["init", "--quiet", "-b", "autoresearch/mar5-gpu"], ["add", "results.tsv"],
                    ["-c", "user.name=t", "-c", "user.email=t@e", "commit", "--quiet", "-m", "results"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    done = plot(str(tmp_path / "m4max.tsv"), str(tmp_path / "cpu.tsv"), "--branch", "autoresearch/mar5-gpu",
                "-o", str(tmp_path / "compare.png"), cwd=repo)
    assert done.returncode == 0, done.stderr
    assert is_png(tmp_path / "compare.png")


def test_plot_explains_missing_or_empty_results(tmp_path):
    (tmp_path / "results.tsv").write_text(HEADER)
    empty = plot(cwd=tmp_path)
    assert empty.returncode == 1
    assert empty.stderr.strip() == "no experiments in results.tsv yet: run uv run tools/experiment.py baseline first"
    missing = plot("nowhere.tsv", cwd=tmp_path)
    assert "nowhere.tsv not found" in missing.stderr
    assert not (tmp_path / "progress.png").exists()


def test_running_best_steps_down_only_at_kept_results():
    module = load_plot_module()
    rows = module.parse_results(RESULTS)
    assert module.running_best(rows) == ([1, 2, 3, 4, 5, 6], [1.62, 1.62, 1.60, 1.60, 1.60, 1.58])


def test_diverged_result_is_drawn_off_scale_and_crash_band_sits_below_the_data():
    module = load_plot_module()
    bottom, top, clip = module.value_range([("results.tsv", module.parse_results(RESULTS))])
    assert clip == pytest.approx(1.62 + 0.5 * (1.62 - 1.58))  # 3.4 would flatten everything else
    assert top == pytest.approx(clip + 0.08 * (clip - 1.58))
    assert bottom < 1.58 - 0.08 * (clip - 1.58)
