"""tools/bench.py: the benchmark runs end to end in smoke mode on the tiny prepared dataset and
writes every figure for every backend; its pieces (figures of a run, medians, targets, table,
backend choice) on fixed inputs. Nothing here asserts a speed."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "tools" / "bench.py"
BENCH_TIMEOUT = 300

spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

FIGURES = [field for field, _, _ in bench.COLUMNS if field != "compute_dtype"] + ["eval_seconds",
                                                                                   "overhead_seconds"]


def run_json(**overrides):
    """A training run's JSON fields as the scripts write them (only the ones bench reads)."""
    fields = {"val_bpb": 2.5, "training_seconds": 300.0, "total_seconds": 330.0,
              "peak_vram_mb": 900.0, "mfu_percent": 40.0, "num_steps": 50,
              "startup_seconds": 5.0, "untimed_seconds": 20.0, "train_tokens_per_second": 3000.0,
              "data_wait_percent": 0.5, "eval_seconds": 4.0, "eval_tokens_per_second": 16000.0,
              "compute_dtype": "fp32", "peak_tflops": 0.38}
    return {**fields, **overrides}


def test_time_outside_training_is_counted_against_the_standard_budget():
    figures = bench.run_fields(run_json(training_seconds=60.0, total_seconds=90.0))
    assert figures["overhead_seconds"] == 30.0
    assert figures["overhead_percent"] == pytest.approx(10.0)  # 30 s of 300 s, whatever --seconds was
    assert figures["peak_memory_mb"] == 900.0


def test_figures_are_medians_of_the_runs():
    runs = [bench.run_fields(run_json(train_tokens_per_second=rate, startup_seconds=start))
            for rate, start in ((3000.0, 9.0), (1000.0, 5.0), (2000.0, 6.0))]
    medians = bench.median_figures(runs)
    assert medians["train_tokens_per_second"] == 2000.0
    assert medians["startup_seconds"] == 6.0
    assert (medians["compute_dtype"], medians["peak_tflops"]) == ("fp32", 0.38)


def test_runs_in_different_dtypes_have_no_median():
    runs = [bench.run_fields(run_json(compute_dtype=dtype)) for dtype in ("fp32", "bf16")]
    with pytest.raises(bench.BenchError, match="different dtypes \\(bf16, fp32\\)"):
        bench.median_figures(runs)


def test_cpu_targets_say_which_are_met():
    figures = bench.run_fields(run_json(mfu_percent=51.0, data_wait_percent=2.0, total_seconds=340.0))
    checks = bench.target_checks(figures)
    assert {field: check["met"] for field, check in checks.items()} == {
        "mfu_percent": True, "data_wait_percent": False, "overhead_percent": True}
    assert checks["overhead_percent"]["value"] == pytest.approx(40 / 3)


def test_table_has_a_row_per_backend_and_a_column_per_figure():
    figures = {**bench.median_figures([bench.run_fields(run_json())]),
               "dataloader_tokens_per_second": 1.5e6}
    lines = bench.format_table({"cpu": figures, "mlx": figures}).splitlines()
    assert len(lines) == 4
    assert lines[0].split(" | ")[0].strip() == "backend"
    assert len(lines[2].split(" | ")) == len(bench.COLUMNS) + 1
    assert lines[2].startswith("cpu ") and "1,500,000" in lines[2] and "3,000" in lines[2]
    assert [cell.strip() for cell in lines[2].split(" | ")[1:3]] == ["fp32", "0.380"]


def test_an_unavailable_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(bench.hardware, "probe_cuda", lambda: False)
    with pytest.raises(bench.BenchError, match="AUTORESEARCH_BACKEND=cuda but torch sees no CUDA"):
        bench.chosen_backends("cuda")
    assert bench.chosen_backends("cpu") == ["cpu"]


@pytest.mark.slow
def test_a_variant_script_is_what_runs(tiny_env, tmp_path):
    # The variant diverges at once (train.py itself would not): its failure shows it was run.
    source = (REPO_ROOT / "train.py").read_text()
    assert "\nMATRIX_LR = 0.04 " in source
    variant = tmp_path / "variant.py"
    variant.write_text(source.replace("\nMATRIX_LR = 0.04 ", "\nMATRIX_LR = float('nan') "))
    with pytest.raises(bench.BenchError, match=r"cpu: variant.py failed \(exit 1\)"):
        bench.run_training("cpu", 30, "smoke", variant)


@pytest.mark.slow
def test_smoke_benchmark_runs_every_backend_end_to_end_and_writes_every_field(tiny_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(tiny_dataset.env, PYTHONPATH=str(REPO_ROOT))
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--profile", "smoke", "--seconds", "2",
                             "--repeats", "1", "-o", str(output)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=BENCH_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["profile"] == "smoke" and report["dataset"] == "local" and report["repeats"] == 1
    assert report["machine"]["chip"] and report["harness"]
    assert sorted(report["backends"]) == sorted(bench.available_backends())
    assert {"cpu", "mlx"} <= set(report["backends"])  # torch and mlx[cpu] are installed everywhere
    for name, figures in report["backends"].items():
        for field in FIGURES:
            assert isinstance(figures[field], (int, float)) and math.isfinite(figures[field]), (name, field)
            assert figures[field] >= 0, (name, field)
        assert figures["train_tokens_per_second"] > 0 and figures["peak_tflops"] > 0
        assert figures["compute_dtype"] in ("bf16", "fp32")
        assert figures["peak_source"].startswith(("measured", "table"))
        assert f" {figures['compute_dtype']} matmul " in figures["peak_source"]  # the dtype's peak
        assert figures["runs"][0]["compute_dtype"] == figures["compute_dtype"]
        assert figures["config"]["tier"] == "smoke"
        assert len(figures["runs"]) == 1 and len(figures["dataloader_runs"]) == 1
        assert "targets" not in figures  # the SPEC targets apply to the standard configuration
        assert any(line.startswith(f"{name} ") and " | " in line for line in result.stdout.splitlines())
