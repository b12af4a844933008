"""Muon+AdamW: parameter groups, Polar Express, and torch and MLX giving the same update.

Every comparison runs on a tiny model-shaped dict of parameters with every group kind. Where
torch and MLX must agree exactly, the orthogonalisation runs in fp32 (orth_dtype): bf16 matmuls
round differently in the two frameworks.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch

from backends.muon_mlx import MuonAdamW as MLXMuonAdamW
from backends.muon_torch import MuonAdamW as TorchMuonAdamW
from backends.optim import POLAR_NORM_EPS, POLAR_NORM_SAFETY, param_groups, polar_express

MODEL_DIM = 16
SHAPES = {
    "transformer.wte.weight": (32, 16),
    "value_embeds.1.weight": (32, 16),
    "lm_head.weight": (32, 16),
    "resid_lambdas": (2,),
    "x0_lambdas": (2,),
    "transformer.h.0.attn.c_q.weight": (16, 16),
    "transformer.h.0.attn.c_k.weight": (16, 16),
    "transformer.h.1.attn.c_q.weight": (16, 16),
    "transformer.h.0.mlp.c_fc.weight": (64, 16),
    "transformer.h.1.mlp.c_fc.weight": (64, 16),
    "transformer.h.0.mlp.c_proj.weight": (16, 64),
    "transformer.h.1.mlp.c_proj.weight": (16, 64),
    "transformer.h.1.attn.ve_gate.weight": (2, 8),
}
HYPERPARAMETERS = dict(matrix_lr=0.04, embedding_lr=0.6, unembedding_lr=0.004, scalar_lr=0.5,
                       weight_decay=0.2, adam_betas=(0.8, 0.95))
MUON_NAMES = [name for name in SHAPES if name.startswith("transformer.h.")]
# The band 5 bf16 Polar Express steps put singular values in, measured on 30 seeds of the
# matrices below in both frameworks: [0.795, 1.157].
SINGULAR_VALUE_BAND = (0.75, 1.2)


def make_groups(**overrides):
    return param_groups(SHAPES, MODEL_DIM, **{**HYPERPARAMETERS, **overrides})


def random_arrays(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in SHAPES.items()}


def set_schedule(groups, schedule):
    """What the training loop does before each step: lr from a multiplier, and for Muon groups
    momentum and weight decay when given."""
    for group in groups:
        group["lr"] = group["initial_lr"] * schedule.get("lr_multiplier", 1.0)
        if group["kind"] == "muon":
            for key in ("momentum", "weight_decay"):
                if key in schedule:
                    group[key] = schedule[key]


def run_torch(params, grads_per_step, schedules, orth_dtype=torch.float32, **overrides):
    named = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    groups = make_groups(**overrides)
    optimizer = TorchMuonAdamW(named, groups, orth_dtype=orth_dtype)
    for grads, schedule in zip(grads_per_step, schedules):
        for name, p in named.items():
            p.grad = torch.tensor(grads[name])
        set_schedule(optimizer.param_groups, schedule)
        optimizer.step()
    return {name: p.detach().numpy().copy() for name, p in named.items()}


def nest(flat):
    """{dotted name: array} -> nested dicts, with runs of keys 0..n-1 as lists (like
    transformer.h in a real model) and other numeric keys as dicts (like value_embeds)."""
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        children = {key: listify(child) for key, child in node.items()}
        if sorted(children) == [str(i) for i in range(len(children))]:
            return [children[str(i)] for i in range(len(children))]
        return children

    return listify(tree)


class ParamTree(nn.Module):
    """An MLX module holding exactly the given parameters under their dotted names."""

    def __init__(self, flat):
        super().__init__()
        for key, subtree in nest(flat).items():
            setattr(self, key, subtree)


def run_mlx(params, grads_per_step, schedules, orth_dtype=mx.float32, compiled=False,
            **overrides):
    model = ParamTree({name: mx.array(value) for name, value in params.items()})
    groups = make_groups(**overrides)
    optimizer = MLXMuonAdamW(groups, orth_dtype=orth_dtype)
    optimizer.init(model.trainable_parameters())
    update = optimizer.update
    if compiled:
        state = [model.state, optimizer.state]
        update = partial(mx.compile, inputs=state, outputs=state)(
            lambda grads: optimizer.update(model, grads))
    for grads, schedule in zip(grads_per_step, schedules):
        set_schedule(optimizer.param_groups, schedule)
        optimizer.sync_schedule()
        grads = nest({name: mx.array(value) for name, value in grads.items()})
        if compiled:
            update(grads)
        else:
            update(model, grads)
        mx.eval(model.parameters())
    return {name: np.array(value) for name, value in tree_flatten(model.trainable_parameters())}


def max_difference(a, b, names=SHAPES):
    return max(float(np.max(np.abs(a[name] - b[name]))) for name in names)


# --- parameter groups ---------------------------------------------------------------------------

def test_param_groups_route_each_parameter_to_its_rule():
    groups = make_groups()
    by_first_name = {group["names"][0]: group for group in groups}
    scale = (MODEL_DIM / 768) ** -0.5

    assert [g["kind"] for g in groups] == ["adamw"] * 5 + ["muon"] * 4
    assert by_first_name["lm_head.weight"]["lr"] == pytest.approx(0.004 * scale)
    assert by_first_name["transformer.wte.weight"]["lr"] == pytest.approx(0.6 * scale)
    assert by_first_name["value_embeds.1.weight"]["lr"] == pytest.approx(0.6 * scale)
    assert by_first_name["resid_lambdas"]["lr"] == pytest.approx(0.005)
    assert by_first_name["x0_lambdas"]["lr"] == pytest.approx(0.5)
    assert by_first_name["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert by_first_name["lm_head.weight"]["betas"] == (0.8, 0.95)
    for group in groups:
        assert group["initial_lr"] == group["lr"]
        if group["kind"] == "adamw":
            assert (group["eps"], group["weight_decay"]) == (1e-10, 0.0)
        else:
            assert (group["lr"], group["weight_decay"]) == (0.04, 0.2)
            assert (group["momentum"], group["beta2"], group["ns_steps"]) == (0.95, 0.95, 5)

    muon = {group["shape"]: group["names"] for group in groups if group["kind"] == "muon"}
    assert muon == {
        (2, 8): ["transformer.h.1.attn.ve_gate.weight"],
        (16, 16): ["transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_k.weight",
                   "transformer.h.1.attn.c_q.weight"],
        (16, 64): ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"],
        (64, 16): ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"],
    }


def test_param_groups_reject_unknown_parameter_by_name():
    with pytest.raises(ValueError, match="'transformer.extra_bias'"):
        param_groups({**SHAPES, "transformer.extra_bias": (16,)}, MODEL_DIM, **HYPERPARAMETERS)
    with pytest.raises(ValueError, match="'transformer.h.0.attn.bias'.*must be 2-D"):
        param_groups({**SHAPES, "transformer.h.0.attn.bias": (16,)}, MODEL_DIM, **HYPERPARAMETERS)
    with pytest.raises(ValueError, match="ns_steps=6"):
        param_groups(SHAPES, MODEL_DIM, ns_steps=6, **HYPERPARAMETERS)


def test_param_groups_accept_names_of_a_torch_compiled_model():
    compiled_names = {"_orig_mod." + name: shape for name, shape in SHAPES.items()}
    groups = param_groups(compiled_names, MODEL_DIM, **HYPERPARAMETERS)
    assert [g["names"] for g in groups] == [
        ["_orig_mod." + name for name in g["names"]] for g in make_groups()]


# --- Polar Express ------------------------------------------------------------------------------

def orthogonalised_singular_values(batch, framework):
    """Normalise and orthogonalise in bf16 exactly as the optimizers do; singular values."""
    if framework == "torch":
        g = torch.tensor(batch)
        norm = torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True)
        X = polar_express((g / (norm * POLAR_NORM_SAFETY + POLAR_NORM_EPS)).bfloat16(), 5)
        result = X.float().numpy()
    else:
        g = mx.array(batch)
        norm = mx.sqrt(mx.sum(g * g, axis=(-2, -1), keepdims=True))
        X = polar_express((g / (norm * POLAR_NORM_SAFETY + POLAR_NORM_EPS)).astype(mx.bfloat16), 5)
        result = np.array(X.astype(mx.float32))
    return np.linalg.svd(result, compute_uv=False)


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_polar_express_puts_singular_values_near_one(framework):
    rng = np.random.default_rng(0)
    tall = rng.standard_normal((4, 64, 16))
    wide = rng.standard_normal((4, 16, 64))
    # A Gaussian square matrix can be all but singular, which no 5-step polynomial can fix; the
    # square case gets random singular vectors and singular values spread over 100:1 instead.
    left, _ = np.linalg.qr(rng.standard_normal((4, 32, 32)))
    right, _ = np.linalg.qr(rng.standard_normal((4, 32, 32)))
    square = (left * np.geomspace(1.0, 0.01, 32)) @ right
    low, high = SINGULAR_VALUE_BAND
    for batch in (tall, wide, square):
        singular_values = orthogonalised_singular_values(batch.astype(np.float32), framework)
        assert low <= singular_values.min() and singular_values.max() <= high, batch.shape
    # Before: the spread is far wider (tall Gaussian 4:1 has sigma_max/sigma_min near 3).
    before = np.linalg.svd(tall, compute_uv=False)
    assert (before.max(axis=-1) / before.min(axis=-1)).min() > 2


# --- torch and MLX agree ------------------------------------------------------------------------

def test_one_step_gives_the_same_parameters_in_torch_and_mlx():
    params, grads = random_arrays(0), random_arrays(1)
    torch_result = run_torch(params, [grads], [{}])
    mlx_result = run_mlx(params, [grads], [{}])
    for name in SHAPES:  # every parameter really moved
        assert not np.allclose(torch_result[name], params[name]), name
    assert max_difference(torch_result, mlx_result) < 1e-5


def test_several_steps_with_a_changing_schedule_agree_in_torch_and_mlx():
    params = random_arrays(0)
    grads_per_step = [random_arrays(seed) for seed in (1, 2, 3, 4)]
    schedules = [{"lr_multiplier": 1.0},
                 {"lr_multiplier": 0.5, "momentum": 0.85, "weight_decay": 0.1},
                 {"lr_multiplier": 0.25, "momentum": 0.9, "weight_decay": 0.0},
                 {"lr_multiplier": 2.0}]
    torch_result = run_torch(params, grads_per_step, schedules)
    mlx_result = run_mlx(params, grads_per_step, schedules)
    mlx_compiled = run_mlx(params, grads_per_step, schedules, compiled=True)
    assert max_difference(torch_result, mlx_result) < 1e-5
    assert max_difference(mlx_result, mlx_compiled) < 1e-5


def test_bf16_orthogonalisation_agrees_loosely_across_frameworks():
    # bf16 rounding moves each framework's Muon update 3-18% (relative L2) from its fp32 one on
    # these Gaussian gradients, so the two bf16 updates differ by about as much: 8-19% measured.
    params, grads = random_arrays(0), random_arrays(1)
    torch_result = run_torch(params, [grads], [{}], orth_dtype=torch.bfloat16)
    mlx_result = run_mlx(params, [grads], [{}], orth_dtype=mx.bfloat16)
    for name in MUON_NAMES:
        torch_update = torch_result[name] - params[name]
        mlx_update = mlx_result[name] - params[name]
        relative = np.linalg.norm(torch_update - mlx_update) / np.linalg.norm(torch_update)
        assert relative < 0.3, name
    adamw_names = [name for name in SHAPES if name not in MUON_NAMES]
    assert max_difference(torch_result, mlx_result, adamw_names) < 1e-5


# --- schedules reach every group ----------------------------------------------------------------

@pytest.mark.parametrize("run", [run_torch, run_mlx, partial(run_mlx, compiled=True)],
                         ids=["torch", "mlx", "mlx-compiled"])
def test_doubling_the_lr_multiplier_doubles_every_update(run):
    params, grads = random_arrays(0), random_arrays(1)
    single = run(params, [grads], [{"lr_multiplier": 1.0}], weight_decay=0.0)
    double = run(params, [grads], [{"lr_multiplier": 2.0}], weight_decay=0.0)
    for name in SHAPES:
        np.testing.assert_allclose(double[name] - params[name], 2 * (single[name] - params[name]),
                                   rtol=1e-4, atol=1e-6, err_msg=name)


def test_compiled_mlx_step_reads_the_schedule_set_between_calls():
    params = random_arrays(0)
    grads_per_step = [random_arrays(1), random_arrays(2)]
    changed = [{}, {"lr_multiplier": 3.0, "momentum": 0.5, "weight_decay": 0.0}]
    eager = run_mlx(params, grads_per_step, changed)
    compiled = run_mlx(params, grads_per_step, changed, compiled=True)
    unchanged = run_mlx(params, grads_per_step, [{}, {}], compiled=True)
    assert max_difference(eager, compiled) < 1e-6
    assert max_difference(compiled, unchanged) > 1e-3


@pytest.mark.parametrize("run", [run_torch, run_mlx], ids=["torch", "mlx"])
def test_cautious_weight_decay_shrinks_only_where_the_update_agrees_with_the_parameter(run):
    params, grads = random_arrays(0), random_arrays(1)
    weight_decay = 0.5
    no_decay = run(params, [grads], [{}], weight_decay=0.0)
    decay = run(params, [grads], [{}], weight_decay=weight_decay)
    for group in make_groups():
        if group["kind"] != "muon":
            continue
        rows, cols = group["shape"]
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        for name in group["names"]:
            p = params[name]
            step = no_decay[name] - p  # = -lr * update
            expected_mask = (-step * p) >= 0
            assert 0 < expected_mask.mean() < 1, name
            np.testing.assert_allclose(decay[name] - no_decay[name],
                                       -lr * weight_decay * p * expected_mask,
                                       rtol=1e-4, atol=1e-7, err_msg=name)
    for name in SHAPES:  # AdamW groups carry no weight decay
        if name not in MUON_NAMES:
            np.testing.assert_array_equal(decay[name], no_decay[name])


def test_torch_optimizer_steps_the_parameters_of_a_compiled_model():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(16, 32, bias=False)
            self.transformer = torch.nn.ModuleDict({"h": torch.nn.ModuleList(
                [torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict(
                    {"c_fc": torch.nn.Linear(16, 64, bias=False)})})])})

        def forward(self, x):
            return self.lm_head(self.transformer.h[0].mlp.c_fc(x).relu()[:, :16])

    torch.manual_seed(0)
    model = torch.compile(Tiny(), backend="eager")
    named = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in named.items()}
    optimizer = TorchMuonAdamW(named, param_groups(shapes, MODEL_DIM, **HYPERPARAMETERS),
                               orth_dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in named.items()}
    model(torch.randn(4, 16)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in named.items())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_polar_express_runs_in_the_dtype_the_optimizer_is_given(monkeypatch, dtype):
    import backends.muon_mlx
    import backends.muon_torch

    seen = []

    def recording(X, ns_steps):
        seen.append(str(X.dtype))
        return polar_express(X, ns_steps)
    monkeypatch.setattr(backends.muon_torch, "polar_express", recording)
    monkeypatch.setattr(backends.muon_mlx, "polar_express", recording)
    params, grads = random_arrays(0), random_arrays(1)
    run_torch(params, [grads], [{}], orth_dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    run_mlx(params, [grads], [{}], orth_dtype={"bf16": mx.bfloat16, "fp32": mx.float32}[dtype])
    muon_groups = sum(group["kind"] == "muon" for group in make_groups())
    torch_dtype, mlx_dtype = {"bf16": ("torch.bfloat16", "mlx.core.bfloat16"),
                              "fp32": ("torch.float32", "mlx.core.float32")}[dtype]
    assert seen == [torch_dtype] * muon_groups + [mlx_dtype] * muon_groups
