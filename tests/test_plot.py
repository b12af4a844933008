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


def test_plot_reads_the_checked_out_branch_from_the_working_tree(tmp_path, monkeypatch):
    """The runner appends to results.tsv without committing it: the branch being worked on is
    plotted from the file, another branch from its commit."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "results.tsv").write_text(HEADER)
    for command in (["init", "--quiet", "-b", "autoresearch/mar5-gpu"], ["add", "results.tsv"],
                    ["-c", "user.name=t", "-c", "user.email=t@e", "commit", "--quiet", "-m", "header only"],
                    ["branch", "autoresearch/mar5-cpu"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    (repo / "results.tsv").write_text(RESULTS)
    module = load_plot_module()
    monkeypatch.chdir(repo)
    series = module.load_series([], ["autoresearch/mar5-gpu", "autoresearch/mar5-cpu"])
    assert [(name, len(rows)) for name, rows in series] == [("autoresearch/mar5-gpu", 6), ("autoresearch/mar5-cpu", 0)]


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


def dense_history(experiments=120, every_kept=4):
    """A long night: a 3-run baseline, then a kept win every few experiments with a long
    description, discards just above the running best and a crash every 10th."""
    rows = [f"b000001\t{1.600 + d:.6f}\t3.1\t{'keep' if run == 1 else 'discard'}\tbaseline (run {run}/3)"
            for run, d in ((1, 0.0), (2, 0.0012), (3, -0.0009))]
    best = 1.600
    for i in range(experiments):
        if i % 10 == 9:
            rows.append(f"c{i:06d}\t0.000000\t0.0\tcrash\tdepth {i} (out of memory)")
        elif i % every_kept == 0:
            best -= 0.0004 + 0.0003 * (i % 3)
            rows.append(f"c{i:06d}\t{best:.6f}\t3.2\tkeep\tmatrix lr {0.04 + i / 1000:.3f} with warmdown "
                        f"ratio {0.5 + i / 500:.3f} [non-standard, 15s budget]")
        else:
            rows.append(f"c{i:06d}\t{best + 0.0005 * (i % 7):.6f}\t3.2\tdiscard\ttry {i}")
    return HEADER + "\n".join(rows) + "\n"


def label_boxes(fig):
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    texts = fig.axes[0].texts
    for text in texts:
        text.update_positions(renderer)
    return [(text.get_text(), Text.get_window_extent(text, renderer)) for text in texts]


def test_labels_of_a_dense_history_never_overlap():
    module = load_plot_module()
    rows = module.parse_results(dense_history())
    wins = [r for r in rows if r["status"] == "keep" and not r["description"].startswith("baseline")]
    fig = module.draw([("results.tsv", rows)])
    boxes = label_boxes(fig)
    module.plt.close(fig)
    texts = [text for text, _ in boxes]
    assert len(wins) == 30
    assert texts.count("baseline (3 runs)") == 1  # one label for the three runs, not three
    assert sum(text.startswith("matrix lr") for text in texts) == len(wins)  # every win labelled
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1:]:
            apart = a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0
            assert apart, f"{text_a!r} at {a.bounds} overlaps {text_b!r} at {b.bounds}"


def test_baseline_and_rerun_rows_are_not_drawn_as_kept_wins():
    module = load_plot_module()
    rows = module.parse_results(HEADER + (
        "b000001\t1.620000\t3.1\tkeep\tbaseline (run 1/2)\n"
        "b000001\t1.625000\t3.1\tdiscard\tbaseline (run 2/2)\n"
        "a000002\t1.600000\t3.1\tkeep\tlower lr\n"
        "a000002\t1.604000\t3.1\tkeep\tlower lr [rerun 2/3]\n"
        "a000003\t1.610000\t3.1\tdiscard\twider mlp\n"))
    fig = module.draw([("results.tsv", rows)])
    drawn = {c.get_gid(): [tuple(p) for p in c.get_offsets()] for c in fig.axes[0].collections if c.get_gid()}
    module.plt.close(fig)
    assert drawn["kept"] == [(3.0, 1.6)]
    assert drawn["baseline"] == [(1.0, 1.62), (2.0, 1.625)]
    assert drawn["rerun"] == [(4.0, 1.604)]
    assert drawn["discarded"] == [(5.0, 1.61)]


def test_split_tags_separates_the_runner_tags_from_the_description():
    module = load_plot_module()
    assert module.split_tags("lower lr [rerun 2/3] [non-standard, 15s budget]") == (
        "lower lr", ["rerun 2/3", "non-standard, 15s budget"])
    assert module.split_tags("a [b] in the middle") == ("a [b] in the middle", [])
