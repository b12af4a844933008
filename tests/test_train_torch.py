"""train.py: the PyTorch model's structure, dtypes and schedules, and whole runs as a subprocess on
the tiny prepared dataset (summary, JSON, fast-fail, bad backend, hand-over to MLX)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare
import train
from backends import torch_ops
from backends.optim import param_groups
from backends.report import (BUDGET_KEYS, CONTEXT_KEYS, EVAL_KEYS, MACHINE_KEYS, PRECISION_KEYS, RUN_EXTRA_KEYS,
                            SUMMARY_KEYS, TIMING_KEYS, parse_summary, score_problem)
from tools import budget

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(sequence_len=16, vocab_size=96, n_layer=4, n_head=2, n_kv_head=2, n_embd=64,
             window_pattern="SSSL")
RUN_TIMEOUT = 240


def test_importing_the_script_builds_nothing_and_starts_no_run():
    assert callable(train.main)
    assert train.GPTConfig().window_pattern == "SSSL"


def test_windows_tile_the_pattern_and_the_last_layer_is_full():
    def windows(pattern, n_layer):
        return train.window_sizes(train.GPTConfig(sequence_len=16, n_layer=n_layer,
                                                  window_pattern=pattern))
    assert windows("SSSL", 4) == (8, 8, 8, 16)
    assert windows("SSSL", 6) == (8, 8, 8, 16, 8, 16)
    assert windows("S", 3) == (8, 8, 16)
    assert windows("L", 2) == (16, 16)
    with pytest.raises(ValueError, match="S and L"):
        windows("SXL", 3)


def test_value_embeddings_sit_on_alternating_layers_ending_with_the_last():
    for n_layer, layers in ((4, ["1", "3"]), (5, ["0", "2", "4"]), (1, ["0"])):
        model = train.GPT(train.GPTConfig(**dict(SMALL, n_layer=n_layer)))
        assert sorted(model.value_embeds.keys()) == layers
        gated = [str(i) for i, block in enumerate(model.transformer.h) if block.attn.ve_gate is not None]
        assert gated == layers


def test_initialisation_follows_upstream():
    torch.manual_seed(0)
    config = train.GPTConfig(**dict(SMALL, vocab_size=4096, n_embd=128))
    model = train.GPT(config)
    s = 3 ** 0.5 * config.n_embd ** -0.5
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    for block in model.transformer.h:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            assert linear.weight.abs().max().item() <= s
            assert linear.weight.std().item() == pytest.approx(config.n_embd ** -0.5, rel=0.05)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        if block.attn.ve_gate is not None:
            assert not block.attn.ve_gate.weight.any()
    for embedding in model.value_embeds.values():
        assert embedding.weight.abs().max().item() <= s
    assert torch.equal(model.resid_lambdas.data, torch.ones(4))
    assert torch.allclose(model.x0_lambdas.data, torch.full((4,), 0.1))


def test_every_parameter_belongs_to_an_optimizer_group():
    model = train.GPT(train.GPTConfig(**SMALL))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    groups = param_groups(shapes, 64, matrix_lr=0.04, embedding_lr=0.6, unembedding_lr=0.004,
                          scalar_lr=0.5, weight_decay=0.2, adam_betas=(0.8, 0.95))
    assert sorted(name for group in groups for name in group["names"]) == sorted(shapes)


def test_residual_stream_stays_bf16_under_autocast():
    model = train.GPT(train.GPTConfig(**SMALL))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    dtypes = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda module, args, output: dtypes.append((args[0].dtype, output.dtype)))
    lm_head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: lm_head_inputs.append(args[0].dtype))
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * SMALL["n_layer"]
    assert lm_head_inputs == [torch.bfloat16]
    assert logits.dtype == torch.float32
    assert logits.abs().max().item() <= train.SOFTCAP


def test_model_loss_matches_its_capped_logits_in_training_and_evaluation():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(**SMALL))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    idx, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits = model(idx)
    assert logits.abs().max().item() <= train.SOFTCAP
    expected = torch.nn.functional.cross_entropy(logits.view(32, 96), targets.view(32), reduction="none")
    loss = model(idx, targets)
    assert loss.requires_grad and torch.allclose(loss, expected.mean(), atol=1e-5)
    with torch.inference_mode():
        nats = model(idx, targets, reduction="none")
    assert nats.shape == (2, 16) and torch.allclose(nats, expected.view(2, 16), atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_run_flex_attention_in_one_graph_each(monkeypatch):
    # As main() compiles them on CUDA: FlexAttention inside a compiled block, no graph break
    # (the block is traced once more when its block mask first enters the cache).
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(**dict(SMALL, sequence_len=256, n_layer=2, n_head=4,
                                             n_kv_head=4, n_embd=128, window_pattern="SL")))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
        idx = torch.randint(0, 96, (2, 256))
        dense = model(idx)
        monkeypatch.setattr(torch_ops, "FLEX_DEVICES", ("cpu",))
        for block in model.transformer.h:
            block.compile(dynamic=False)
        torch._dynamo.utils.counters.clear()
        flex = [model(idx) for _ in range(2)]
    for logits in flex:
        assert torch.allclose(logits, dense, atol=1e-4)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # the S block (twice), the L block


def test_flops_per_token_counts_matmul_weights_and_attention_windows():
    config = train.GPTConfig(**SMALL)
    model = train.GPT(config)
    # Per layer q, k, v, proj and fc, proj; a ve_gate on 2 of the 4 layers; lm_head. Embeddings
    # and the scalar lambdas are lookups, not matmuls.
    matmuls = 4 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * (32 * 2) + 96 * 64
    attention = 12 * 2 * 32 * (8 + 8 + 8 + 16)
    assert model.num_flops_per_token(16) == 6 * matmuls + attention
    # Rows shorter than a window only attend as far back as the row goes.
    assert model.num_flops_per_token(4) == 6 * matmuls + 12 * 2 * 32 * 4 * 4


def test_lr_multiplier_is_flat_then_warms_down_to_the_final_fraction(monkeypatch):
    assert [train.lr_multiplier(p) for p in (0.0, 0.3, 0.5, 0.75, 1.0)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.2)
    assert train.lr_multiplier(0.05) == pytest.approx(0.5)
    assert train.lr_multiplier(0.4) == 1.0
    assert train.lr_multiplier(0.75) == pytest.approx(0.6)
    assert train.lr_multiplier(1.0) == pytest.approx(0.2)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", 0.0)
    assert train.lr_multiplier(1.0) == 1.0


def test_muon_momentum_ramps_over_the_first_300_steps_and_weight_decay_fades():
    assert train.muon_momentum(0) == pytest.approx(0.85)
    assert train.muon_momentum(150) == pytest.approx(0.90)
    assert train.muon_momentum(300) == train.muon_momentum(10_000) == pytest.approx(0.95)
    assert [train.weight_decay_multiplier(p) for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]


# ---------------------------------------------------------------------------------------------
# Whole runs


def run_script(script, env_overrides, cwd=REPO_ROOT, timeout=RUN_TIMEOUT):
    """Run a training script in a clean AUTORESEARCH_* environment; stdout keeps its '\\r's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(env_overrides)
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True,
                            timeout=timeout)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def summary_keys(stdout):
    """Keys of the summary block in print order."""
    lines = stdout.replace("\r", "\n").split("\n")
    block = lines[lines.index("---") + 1:]
    return [line.split(":", 1)[0] for line in block if ":" in line]


def check_finished_run(result, runs_dir, backend, dataset_env):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    expected = list(SUMMARY_KEYS + CONTEXT_KEYS + RUN_EXTRA_KEYS + TIMING_KEYS + PRECISION_KEYS + BUDGET_KEYS
                    + EVAL_KEYS + MACHINE_KEYS)
    series = ("machine_speed_probes", "probe_matmul_series", "probe_memory_series")  # the JSON's alone
    assert summary_keys(result.stdout) == [key for key in expected if key not in series]
    fields = parse_summary(result.stdout)
    assert math.isfinite(fields["val_bpb"]) and 0 < fields["val_bpb"] < 20
    assert fields["backend"] == backend
    assert fields["num_steps"] > train.UNTIMED_STEPS
    assert fields["training_seconds"] >= 1.0
    assert fields["total_seconds"] >= fields["training_seconds"]
    assert fields["dataset"] == "local" and fields["eval_tokens"] == 4 * 2048
    assert fields["standard"] is False and fields["profile"] == "smoke" and fields["world_size"] == 1
    saved = json.loads((runs_dir / "last_run.json").read_text())
    assert list(saved) == expected
    # Where the time went: start-up, the untimed first step(s) and evaluation fit in the total.
    assert saved["startup_seconds"] > 0 and saved["untimed_seconds"] > 0 and saved["eval_seconds"] > 0
    assert saved["startup_seconds"] + saved["untimed_seconds"] + saved["training_seconds"] \
        + saved["eval_seconds"] <= saved["total_seconds"]
    assert saved["train_tokens_per_second"] > 0 and saved["eval_tokens_per_second"] > 0
    assert 0 <= saved["data_wait_percent"] < 100
    assert saved["val_bpb"] == pytest.approx(fields["val_bpb"], abs=1e-6)
    assert len(list(runs_dir.glob("run_*.json"))) == 1
    # The runner's token check: the shipped script reports its untimed steps and stays inside.
    # (Its wall time against the allowance depends on the machine: measured, see docs/design.md.)
    assert saved["untimed_steps"] == 2 and saved["untimed_tokens"] == 2 * saved["total_batch_size"]
    assert saved["timed_tokens"] + saved["untimed_tokens"] == saved["num_steps"] * saved["total_batch_size"]
    assert budget.token_problem(saved) is None
    # The machine was probed before and after training (a 2 s budget has no probe in between),
    # outside the clock; the JSON keeps every probe's readings and the printed summary their means.
    assert len(saved["machine_speed_probes"]) == 2 and saved["machine_speed"] > 0
    assert saved["machine_speed"] == pytest.approx(math.sqrt(math.prod(saved["machine_speed_probes"])), rel=1e-3)
    assert saved["probe_matmul_gflops"] == pytest.approx(math.sqrt(math.prod(saved["probe_matmul_series"])), rel=1e-3)
    assert len(saved["probe_memory_series"]) == 2 and "probe_memory_series" not in fields
    assert saved["probe_seconds"] > 0 and saved["probe_matmul_gflops"] > 0
    # The runner takes the score: the evaluation scored the split's every token and byte.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dataset_env.items():
            patch.setenv(key, value)
        assert score_problem(saved, result.stdout, prepare.eval_split_counts(backend)) is None


def test_smoke_run_trains_evaluates_and_reports(tiny_dataset, tmp_path):
    result = run_script(REPO_ROOT / "train.py", {**tiny_dataset.env, "AUTORESEARCH_BACKEND": "cpu",
                                                 "AUTORESEARCH_TIME_BUDGET": "2",
                                                 "AUTORESEARCH_RUNS_DIR": str(tmp_path)})
    check_finished_run(result, tmp_path, "cpu", tiny_dataset.env)
    assert "\rstep 00000" in result.stdout and "\rstep 00001" in result.stdout
    assert "\nstep" not in result.stdout  # one progress line, rewritten in place
    assert "nanobind" not in result.stderr  # no leak report at exit (the collector is back on)


def test_nan_loss_fails_fast_with_exit_1(tiny_dataset, tmp_path):
    # An agent's edit that diverges: a NaN learning rate makes every weight NaN after step 0.
    source = (REPO_ROOT / "train.py").read_text()
    assert "\nMATRIX_LR = 0.04 " in source
    script = tmp_path / "train.py"
    script.write_text(source.replace("\nMATRIX_LR = 0.04 ", "\nMATRIX_LR = float('nan') "))
    result = run_script(script, {**tiny_dataset.env, "AUTORESEARCH_BACKEND": "cpu",
                                 "AUTORESEARCH_TIME_BUDGET": "30",
                                 "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs")}, cwd=tmp_path)
    assert result.returncode == 1
    fail_lines = [line for line in result.stdout.replace("\r", "\n").split("\n") if line.startswith("FAIL")]
    assert fail_lines == ["FAIL: training diverged at step 1: loss nan"]
    # The agent reads the tail: FAIL is the last thing printed, with no leak report after it.
    assert result.stdout.strip().splitlines()[-1] == fail_lines[0]
    assert result.stderr == ""
    assert parse_summary(result.stdout) is None
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, value", [("AUTORESEARCH_BACKEND", "tpu"),
                                         ("AUTORESEARCH_PROFILE", "huge"),
                                         ("AUTORESEARCH_TIME_BUDGET", "5min")])
def test_a_bad_setting_is_one_clear_line_and_exit_2(name, value, tmp_path):
    result = run_script(REPO_ROOT / "train.py", {name: value, "AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}={value!r}" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_dataset_is_one_clear_line(tmp_path):
    result = run_script(REPO_ROOT / "train.py", {"AUTORESEARCH_BACKEND": "cpu",
                                                 "AUTORESEARCH_PROFILE": "smoke",
                                                 "AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "prepare.py" in result.stderr.strip().splitlines()[-1]


def test_mlx_backend_hands_the_run_to_train_mlx(tiny_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(tiny_dataset.env, AUTORESEARCH_BACKEND="mlx", AUTORESEARCH_TIME_BUDGET="1",
               AUTORESEARCH_RUNS_DIR=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    with subprocess.Popen([sys.executable, "train.py"], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        first_line = process.stdout.readline()
        process.kill()
    assert first_line.startswith("backend mlx ")  # train_mlx.py's first line; train.py has none


# The precision of a run follows the calibration it finds (faked here, so the machine running the
# tests does not matter): the model, its autocast and Muon's Polar Express all compute in it, and
# MFU counts against that dtype's peak. A driver imports the script, records the dtype every
# Polar Express call receives, then runs main() as `uv run train.py` would.
PRECISION_DRIVER = """
import backends.muon_{library} as muon
seen = set()
original = muon.polar_express


def recording(X, ns_steps):
    seen.add(str(X.dtype))
    return original(X, ns_steps)


muon.polar_express = recording
import {script}
{script}.main()
print("polar express dtypes:", sorted(seen))
"""


def run_with_calibration(dataset, tmp_path, script, library, bf16, fp32, forced=None):
    """A smoke run of script (train or train_mlx; COMPUTE_DTYPE replaced by the literal forced)
    on a machine calibrated at bf16 / fp32 FLOP/s: (result, the run's JSON)."""
    dataset.calibrate(library, bf16, fp32)
    source = (REPO_ROOT / f"{script}.py").read_text()
    assert '\nCOMPUTE_DTYPE = PRECISION["dtype"]\n' in source
    if forced:
        source = source.replace('\nCOMPUTE_DTYPE = PRECISION["dtype"]\n', f"\nCOMPUTE_DTYPE = {forced!r}\n")
    (tmp_path / f"{script}.py").write_text(source)
    driver = tmp_path / "driver.py"
    driver.write_text(PRECISION_DRIVER.format(library=library, script=script))
    result = run_script(driver, {**dataset.env, "AUTORESEARCH_BACKEND": "cpu" if library == "torch" else "mlx",
                                 "AUTORESEARCH_TIME_BUDGET": "1",
                                 "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs")}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, json.loads((tmp_path / "runs" / "last_run.json").read_text())


def check_trained_in(dtype, result, saved, peaks, forced, module, vocab_size):
    """The run trained in dtype ("bf16" or "fp32") throughout: every Polar Express call, the
    summary, and MFU against that dtype's peak (peaks: the faked {"bf16": .., "fp32": ..} FLOP/s)
    for the smoke model of module (train or train_mlx), as its precision line says."""
    names = {"train": {"bf16": "torch.bfloat16", "fp32": "torch.float32"},
             "train_mlx": {"bf16": "mlx.core.bfloat16", "fp32": "mlx.core.float32"}}[module.__name__]
    assert f"polar express dtypes: ['{names[dtype]}']" in result.stdout
    assert saved["compute_dtype"] == dtype
    peak = peaks[dtype]
    assert saved["peak_tflops"] == pytest.approx(peak / 1e12)
    smoke = module.GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                             n_embd=64, window_pattern="SL")
    flops_per_token = module.GPT(smoke).num_flops_per_token(128)
    assert saved["mfu_percent"] == pytest.approx(
        100 * flops_per_token * saved["train_tokens_per_second"] / peak, rel=1e-6)
    precision_line = next(line for line in result.stdout.splitlines() if line.startswith("precision:"))
    assert precision_line.startswith(f"precision: {dtype}{' (forced)' if forced else ''}, chosen from calibration")
    assert f"mfu against {peak / 1e12:.3f} TFLOP/s" in precision_line


@pytest.mark.parametrize("bf16, fp32, forced, dtype", [
    (0.05e12, 0.2e12, None, "fp32"),  # bf16 emulated (AVX2): fp32 trains
    (2e12, 0.5e12, None, "bf16"),     # AVX-512 bf16 / AMX: bf16 trains
    pytest.param(2e12, 0.5e12, "fp32", "fp32", marks=pytest.mark.slow),  # the constant overrides the measurement
])
def test_a_run_computes_in_the_dtype_its_calibration_measured_faster(calibrated_dataset, tmp_path,
                                                                     bf16, fp32, forced, dtype):
    result, saved = run_with_calibration(calibrated_dataset, tmp_path, "train", "torch", bf16, fp32, forced)
    check_trained_in(dtype, result, saved, {"bf16": bf16, "fp32": fp32}, forced, train, calibrated_dataset.vocab_size)
