"""tools/gpu_check.py: the pieces that run before any GPU does. A step's failure or time-out is
recorded and the next step still runs, the report holds every figure in a table, the dense-mask
variant of train.py can still be made, and the command says where its report must go. The steps
themselves run in `uv run tools/gpu_check.py --out DIR --dry-run` (minutes) and on a GPU."""

import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import REPO_ROOT
from tools import gpu_check


def test_train_py_still_has_the_constant_the_dense_mask_variant_switches_off():
    assert gpu_check.FLEX_CONSTANT in (REPO_ROOT / "train.py").read_text()


def test_a_failing_step_is_recorded_and_the_report_shows_every_figure_in_a_table(tmp_path, monkeypatch):
    def broken(dry_run):
        raise ValueError("no GPU here")

    monkeypatch.setattr(gpu_check, "STEPS", [("broken", broken, 60)])
    result = tmp_path / "result.json"
    gpu_check.run_inside_step(SimpleNamespace(step="broken", result=result, dry_run=True, seconds=60))
    assert json.loads(result.read_text()) == {"ok": False, "error": "ValueError: no GPU here"}
    report = {"date": "today", "commit": "abc", "dry_run": False, "seconds": 60, "steps": {
        "broken": {"ok": False, "error": "ValueError: no GPU here", "seconds": 1.0},
        "machine": {"ok": True, "seconds": 2.0, "figures": {"gpu": "H200", "mfu_percent": 41.234}}}}
    gpu_check.write_report(tmp_path, report)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert "| step | result | seconds | figures |" in table
    assert "| broken | FAILED: ValueError: no GPU here | 1.0 |  |" in table
    assert "| machine | ok | 2.0 | gpu H200; mfu_percent 41.23 |" in table


def test_a_step_past_its_timeout_is_ended_and_recorded(tmp_path, monkeypatch):
    # A step that would run for a minute (a stand-in for the step's subprocess): the 1 s timeout
    # ends it (and what it started), whatever the speed of the machine.
    hanging = tmp_path / "hanging_step.py"
    hanging.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "__file__", str(hanging))
    monkeypatch.setattr(gpu_check, "STEPS", [("mlx_windows", gpu_check.step_mlx_windows, 1)])
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step("mlx_windows", SimpleNamespace(dry_run=True, seconds=60), log)
    assert record["ok"] is False and record["error"] == "timed out after 1 s"
    assert record["seconds"] < 60


def test_a_step_runs_in_a_subprocess_of_its_own_and_returns_its_figures(tmp_path):
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step("mlx_windows", SimpleNamespace(dry_run=True, seconds=60), log)
    assert record["ok"] is True and record["figures"]["shape_BHTD"] == [2, 2, 256, 32]
    assert record["figures"]["causal_ms_fwd_bwd"] > 0 and record["figures"]["window_mask_ms_fwd_bwd"] > 0
    assert "===== mlx_windows" in (tmp_path / "log").read_text()


def test_the_command_asks_where_the_report_goes():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "say where the report goes: --out DIR" in done.stderr
