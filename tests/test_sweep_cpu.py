"""tools/sweep_cpu.py: the copy of train.py it runs carries the configuration and the forced
dtype as literals, and a bad key is one clear error."""

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sweep_cpu", REPO_ROOT / "tools" / "sweep_cpu.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def constant_lines(source, names):
    return {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in source.splitlines()
            if line.split(" = ")[0] in names}


def test_the_swept_script_sets_the_configuration_and_the_forced_dtype():
    source = (REPO_ROOT / "train.py").read_text()
    config = sweep.parse_config("depth=3,aspect_ratio=48,window_pattern=SL")
    swept = sweep.script_with_config(source, config, "fp32")
    assert constant_lines(swept, {"DEPTH", "ASPECT_RATIO", "WINDOW_PATTERN", "SEQ_LEN", "COMPUTE_DTYPE"}) == {
        "DEPTH": "3", "ASPECT_RATIO": "48", "WINDOW_PATTERN": "'SL'", "SEQ_LEN": "512",
        "COMPUTE_DTYPE": "'fp32'"}
    measured = sweep.script_with_config(source, config)
    assert constant_lines(measured, {"COMPUTE_DTYPE"}) == {"COMPUTE_DTYPE": 'PRECISION["dtype"]'}


def test_keys_not_given_are_the_cpu_tiers():
    from backends.tiers import CPU_TIER
    config = sweep.parse_config("depth=6")
    assert config == {"depth": 6, "aspect_ratio": CPU_TIER["aspect_ratio"], "head_dim": CPU_TIER["head_dim"],
                      "window_pattern": CPU_TIER["window_pattern"], "seq_len": CPU_TIER["seq_len"],
                      "device_batch_size": CPU_TIER["device_batch_size"],
                      "total_batch_size": CPU_TIER["total_batch_size"]}
    assert (config["seq_len"], config["device_batch_size"]) == (512, 32)


def test_an_unknown_key_is_one_clear_error():
    with pytest.raises(SystemExit, match="unknown key 'width'"):
        sweep.parse_config("width=3")
