"""tools/gpu_check.py: the pieces that run before any GPU does. The wheel too big for one device
call is split and joined back byte for byte (a missing part is one clear error), the dense-mask
variant of train.py can still be made, a step's failure or time-out is recorded and the next
step still runs, and the report holds every figure. The steps themselves run in
`uv run tools/gpu_check.py --dry-run` (minutes) and on a GPU."""

import hashlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.fixture
def staged(tmp_path, monkeypatch):
    """A staging folder holding a fake 'wheel' of 2.5 parts, as --stage leaves it."""
    monkeypatch.setattr(gpu_check, "STAGE_DIR", tmp_path / "stage")
    monkeypatch.setattr(gpu_check, "DOWNLOAD_DIR", tmp_path / "download")
    monkeypatch.setattr(gpu_check, "STASH_DIR", tmp_path / "stash")
    monkeypatch.setattr(gpu_check, "PART_BYTES", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: parts of 1000, 1000, 560
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "mlx_cuda_13-9.9-py3-none-any.whl").write_bytes(data)
    wheels = tmp_path / "stage" / "wheels"
    wheels.mkdir(parents=True)
    names = [f"mlx_cuda_13-9.9-py3-none-any.whl.part{i}" for i in range(3)]
    (wheels / "parts.json").write_text(json.dumps(
        {"wheel": "mlx_cuda_13-9.9-py3-none-any.whl", "sha256": hashlib.sha256(data).hexdigest(),
         "parts": names}))
    return SimpleNamespace(data=data, names=names, wheels=wheels)


def test_wheel_parts_cut_the_wheel_at_part_bytes(staged):
    gpu_check.write_wheel_parts(staged.names[:2])
    assert (staged.wheels / staged.names[0]).read_bytes() == staged.data[:1000]
    assert (staged.wheels / staged.names[1]).read_bytes() == staged.data[1000:2000]
    assert not (staged.wheels / staged.names[2]).exists()
    gpu_check.write_wheel_parts(staged.names[2:])  # the second call's parts replace the first's
    assert sorted(p.name for p in staged.wheels.glob("*.part*")) == staged.names[2:]
    assert (staged.wheels / staged.names[2]).read_bytes() == staged.data[2000:]


def test_the_mlx_call_joins_the_stashed_and_carried_parts_into_the_wheel(staged):
    gpu_check.write_wheel_parts(staged.names[:2])
    gpu_check.stash_wheel_parts()  # what the torch call does on the machine
    gpu_check.write_wheel_parts(staged.names[2:])
    figures = gpu_check.step_mlx_install(dry_run=True)  # joins and checks, installs nothing
    assert figures["parts"] == staged.names
    joined = gpu_check.STAGE_DIR / "joined" / "mlx_cuda_13-9.9-py3-none-any.whl"
    assert joined.read_bytes() == staged.data
    assert figures["mlx"].startswith("0.")  # this machine's mlx, imported in a subprocess


def test_a_part_lost_with_the_machine_is_one_clear_error(staged):
    gpu_check.write_wheel_parts(staged.names[2:])  # the stash is empty: the machine went back
    with pytest.raises(RuntimeError, match=r"part0.*part1.*are missing: the machine went back"):
        gpu_check.step_mlx_install(dry_run=True)


def test_train_py_still_has_the_constant_the_dense_mask_variant_switches_off():
    assert gpu_check.FLEX_CONSTANT in (REPO_ROOT / "train.py").read_text()


def test_a_failing_or_late_step_is_recorded_and_the_report_shows_every_figure(tmp_path, monkeypatch):
    def broken(dry_run):
        raise ValueError("no GPU here")

    monkeypatch.setattr(gpu_check, "PARTS", {"torch": [("broken", broken, 60)]})
    args = SimpleNamespace(part_of={"broken": "torch"}, dry_run=True, seconds=60,
                           ends_at=gpu_check.time.perf_counter() + 5)
    with open(tmp_path / "log", "w") as log:
        assert gpu_check.run_step("broken", args, log) == {
            "ok": False, "error": "skipped: the call's --deadline left no time", "seconds": 0}
    report = {"date": "today", "commit": "abc", "dry_run": True, "seconds": 60, "steps": {
        "broken": {"ok": False, "error": "ValueError: no GPU here", "seconds": 1.0},
        "machine": {"ok": True, "seconds": 2.0, "figures": {"gpu": "H200", "mfu_percent": 41.234}}}}
    gpu_check.write_report(tmp_path, "torch", report)
    assert json.loads((tmp_path / "gpu_check_torch.json").read_text()) == report
    markdown = (tmp_path / "gpu_check_torch.md").read_text()
    assert "## broken: FAILED: ValueError: no GPU here (1.0 s)" in markdown
    assert "- gpu: H200" in markdown and "- mfu_percent: 41.23" in markdown


def test_a_step_past_its_timeout_is_ended_and_recorded(tmp_path, monkeypatch):
    # A step that would run for a minute (a stand-in for the step's subprocess): the 1 s timeout
    # ends it (and what it started), whatever the speed of the machine.
    hanging = tmp_path / "hanging_step.py"
    hanging.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "__file__", str(hanging))
    monkeypatch.setattr(gpu_check, "PARTS", {"mlx": [("mlx_windows", gpu_check.step_mlx_windows, 1)]})
    args = SimpleNamespace(part_of={"mlx_windows": "mlx"}, dry_run=True, seconds=60,
                           ends_at=gpu_check.time.perf_counter() + 120)
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step("mlx_windows", args, log)
    assert record["ok"] is False and record["error"] == "timed out after 1 s"
    assert record["seconds"] < 60


def test_a_step_runs_in_a_subprocess_of_its_own_and_returns_its_figures(tmp_path):
    args = SimpleNamespace(part_of={"mlx_windows": "mlx"}, dry_run=True, seconds=60,
                           ends_at=gpu_check.time.perf_counter() + 120)
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step("mlx_windows", args, log)
    assert record["ok"] is True and record["figures"]["shape_BHTD"] == [2, 2, 256, 32]
    assert record["figures"]["causal_ms_fwd_bwd"] > 0 and record["figures"]["window_mask_ms_fwd_bwd"] > 0
    assert "===== mlx_windows" in (tmp_path / "log").read_text()
