"""train_mlx.py: the MLX model's structure and dtypes, its compiled training step, and whole runs as
a subprocess on the tiny prepared dataset (summary, JSON, fast-fail). The model's agreement with
train.py's is in test_parity.py."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train_mlx
from backends.muon_mlx import MuonAdamW
from backends.optim import param_groups
from test_train_torch import REPO_ROOT, check_finished_run, check_trained_in, run_script, run_with_calibration

SMALL = dict(sequence_len=16, vocab_size=96, n_layer=4, n_head=2, n_kv_head=2, n_embd=64,
             window_pattern="SSSL")


def test_importing_the_script_builds_nothing_and_starts_no_run():
    assert callable(train_mlx.main)
    assert train_mlx.GPTConfig().window_pattern == "SSSL"


def test_initialisation_follows_upstream():
    mx.random.seed(0)
    config = train_mlx.GPTConfig(**dict(SMALL, vocab_size=4096, n_embd=128))
    model = train_mlx.GPT(config)
    s = 3 ** 0.5 * config.n_embd ** -0.5
    assert np.std(np.array(model.transformer["wte"].weight)) == pytest.approx(1.0, rel=0.02)
    assert np.std(np.array(model.lm_head.weight)) == pytest.approx(0.001, rel=0.02)
    for block in model.transformer["h"]:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            weight = np.array(linear.weight)
            assert np.abs(weight).max() <= s
            assert np.std(weight) == pytest.approx(config.n_embd ** -0.5, rel=0.05)
        assert not np.array(block.attn.c_proj.weight).any()
        assert not np.array(block.mlp.c_proj.weight).any()
        if block.attn.ve_gate is not None:
            assert not np.array(block.attn.ve_gate.weight).any()
    assert sorted(model.value_embeds) == ["1", "3"]
    for embedding in model.value_embeds.values():
        assert np.abs(np.array(embedding.weight)).max() <= s
    np.testing.assert_array_equal(np.array(model.resid_lambdas), np.ones(4))
    np.testing.assert_allclose(np.array(model.x0_lambdas), np.full(4, 0.1))


def test_residual_stream_stays_bf16_in_bf16_mode(monkeypatch):
    model = train_mlx.GPT(train_mlx.GPTConfig(**SMALL), compute_dtype=mx.bfloat16)
    dtypes = []
    block_call = train_mlx.Block.__call__

    def recording_call(self, x, *args):
        output = block_call(self, x, *args)
        dtypes.append((x.dtype, output.dtype))
        return output

    monkeypatch.setattr(train_mlx.Block, "__call__", recording_call)
    logits = model(mx.zeros((2, 16), dtype=mx.int32))
    assert dtypes == [(mx.bfloat16, mx.bfloat16)] * SMALL["n_layer"]
    assert logits.dtype == mx.float32
    # Parameters stay fp32: the optimizer updates full-precision weights.
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}


def test_compiled_step_lowers_the_loss_and_matches_the_eager_step():
    """Both compiled pieces of a step (micro-batch forward+backward, optimizer update) give the
    eager result, and a few steps on one batch fit it."""
    def setup():
        mx.random.seed(1)
        model = train_mlx.GPT(train_mlx.GPTConfig(**SMALL))
        shapes = {name: p.shape for name, p in tree_flatten(model.trainable_parameters())}
        groups = param_groups(shapes, SMALL["n_embd"], matrix_lr=0.02, embedding_lr=0.2,
                              unembedding_lr=0.004, scalar_lr=0.1, weight_decay=0.1,
                              adam_betas=(0.8, 0.95))
        optimizer = MuonAdamW(groups, orth_dtype=mx.float32)
        optimizer.init(model.trainable_parameters())
        loss_and_grad = nn.value_and_grad(model, lambda model, x, y: model(x, y))
        state = [model.state, optimizer.state]

        def micro_step(x, y):
            return loss_and_grad(model, x, y)

        def optimizer_step(grads):
            optimizer.update(model, grads)

        return model, optimizer, state, micro_step, optimizer_step

    rng = np.random.default_rng(2)
    x = mx.array(rng.integers(0, SMALL["vocab_size"], (2, 16)).astype(np.int32))
    y = mx.array(rng.integers(0, SMALL["vocab_size"], (2, 16)).astype(np.int32))
    losses = {}
    for compiled in (False, True):
        model, optimizer, state, micro_step, optimizer_step = setup()
        if compiled:
            micro_step = mx.compile(micro_step, inputs=state, outputs=state)
            optimizer_step = mx.compile(optimizer_step, inputs=state, outputs=state)
        losses[compiled] = []
        for step in range(4):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / 4)  # the schedule must get through
            optimizer.sync_schedule()
            loss, grads = micro_step(x, y)
            optimizer_step(grads)
            mx.eval(state)
            losses[compiled].append(loss.item())
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][-1] < losses[True][0] - 0.5


def test_smoke_run_trains_evaluates_and_reports(tiny_dataset, tmp_path):
    result = run_script(REPO_ROOT / "train_mlx.py", {**tiny_dataset.env,
                                                     "AUTORESEARCH_TIME_BUDGET": "2",
                                                     "AUTORESEARCH_RUNS_DIR": str(tmp_path)})
    check_finished_run(result, tmp_path, "mlx", tiny_dataset.env)
    assert "\rstep 00000" in result.stdout and "\rstep 00001" in result.stdout
    assert "\nstep" not in result.stdout  # one progress line, rewritten in place


def test_nan_loss_fails_fast_with_exit_1(tiny_dataset, tmp_path):
    source = (REPO_ROOT / "train_mlx.py").read_text()
    assert "\nMATRIX_LR = 0.04 " in source
    script = tmp_path / "train_mlx.py"
    script.write_text(source.replace("\nMATRIX_LR = 0.04 ", "\nMATRIX_LR = float('nan') "))
    result = run_script(script, {**tiny_dataset.env, "AUTORESEARCH_TIME_BUDGET": "30",
                                 "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs")}, cwd=tmp_path)
    assert result.returncode == 1
    fail_lines = [line for line in result.stdout.replace("\r", "\n").split("\n") if line.startswith("FAIL")]
    assert fail_lines == ["FAIL: training diverged at step 1: loss nan"]
    # The agent reads the tail: FAIL is the last thing printed, with no leak report after it.
    assert result.stdout.strip().splitlines()[-1] == fail_lines[0]
    assert result.stderr == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bf16, fp32, forced, dtype", [
    pytest.param(0.05e12, 0.2e12, None, "fp32", marks=pytest.mark.slow), (2e12, 0.5e12, None, "bf16"),
    pytest.param(2e12, 0.5e12, "fp32", "fp32", marks=pytest.mark.slow),
])
def test_a_run_computes_in_the_dtype_its_calibration_measured_faster(calibrated_dataset, tmp_path,
                                                                     bf16, fp32, forced, dtype):
    result, saved = run_with_calibration(calibrated_dataset, tmp_path, "train_mlx", "mlx", bf16, fp32, forced)
    check_trained_in(dtype, result, saved, {"bf16": bf16, "fp32": fp32}, forced, train_mlx,
                     calibrated_dataset.vocab_size)
