"""train.py and train_mlx.py build the same model: one set of weights, copied by parameter name,
gives the same logits, loss and gradients in both frameworks, and in both every layer type is
causal (a token never influences the outputs before it)."""

import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map_with_path

import train
import train_mlx

# Four layers with pattern "LSS" (tiled, last layer L): L without value embedding, S with,
# S without, L with, so every combination of window and value embedding is present. GQA
# (n_kv_head < n_head) and rows longer than sequence_len (so that even L layers are windowed,
# as in evaluation at MAX_SEQ_LEN) are covered too.
CONFIG = dict(sequence_len=16, vocab_size=96, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
              window_pattern="LSS")
ROW_LEN = 40


def layer_types(config):
    windows = train.window_sizes(train.GPTConfig(**config))
    return {("S" if w < config["sequence_len"] else "L",
             train.has_value_embedding(i, config["n_layer"])) for i, w in enumerate(windows)}


def test_config_covers_every_layer_type():
    assert layer_types(CONFIG) == {("S", False), ("S", True), ("L", False), ("L", True)}


def twin_models(seed=0):
    """A torch GPT with every weight random (so zero-initialised projections and gates take part)
    and an MLX GPT holding the same weights, both fp32."""
    torch.manual_seed(seed)
    torch_model = train.GPT(train.GPTConfig(**CONFIG))
    with torch.no_grad():
        for param in torch_model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    weights = {name: param.detach().numpy() for name, param in torch_model.named_parameters()}
    mlx_model = train_mlx.GPT(train_mlx.GPTConfig(**CONFIG))
    mlx_model.update(tree_map_with_path(lambda name, _: mx.array(weights[name]),
                                        mlx_model.parameters()))
    return torch_model, mlx_model


def random_tokens(shape, seed):
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], shape)


def test_both_models_have_the_same_parameter_names_and_shapes():
    torch_model, mlx_model = twin_models()
    torch_shapes = {name: tuple(p.shape) for name, p in torch_model.named_parameters()}
    mlx_shapes = {name: tuple(p.shape) for name, p in tree_flatten(mlx_model.parameters())}
    assert torch_shapes == mlx_shapes


def test_same_weights_give_the_same_logits_and_loss():
    torch_model, mlx_model = twin_models()
    idx, targets = random_tokens((2, ROW_LEN), 1), random_tokens((2, ROW_LEN), 2)
    torch_logits = torch_model(torch.from_numpy(idx)).detach().numpy()
    mlx_logits = np.array(mlx_model(mx.array(idx)))
    np.testing.assert_allclose(mlx_logits, torch_logits, atol=1e-4, rtol=0)

    torch_nats = torch_model(torch.from_numpy(idx), torch.from_numpy(targets), reduction="none")
    mlx_nats = mlx_model(mx.array(idx), mx.array(targets), reduction="none")
    assert torch_nats.shape == mlx_nats.shape == (2, ROW_LEN)
    np.testing.assert_allclose(np.array(mlx_nats), torch_nats.detach().numpy(), atol=1e-4, rtol=0)
    torch_loss = torch_model(torch.from_numpy(idx), torch.from_numpy(targets)).item()
    mlx_loss = mlx_model(mx.array(idx), mx.array(targets)).item()
    assert mlx_loss == pytest.approx(torch_loss, abs=1e-5)
    assert torch_loss == pytest.approx(torch_nats.mean().item(), abs=1e-6)


def test_same_weights_give_the_same_gradients():
    torch_model, mlx_model = twin_models()
    idx, targets = random_tokens((2, ROW_LEN), 3), random_tokens((2, ROW_LEN), 4)
    torch_model(torch.from_numpy(idx), torch.from_numpy(targets)).backward()
    loss_and_grad = mnn.value_and_grad(mlx_model, lambda model, x, y: model(x, y))
    _, mlx_grads = loss_and_grad(mlx_model, mx.array(idx), mx.array(targets))
    mlx_grads = dict(tree_flatten(mlx_grads))
    for name, param in torch_model.named_parameters():
        expected = param.grad.numpy()
        scale = np.abs(expected).max()
        assert scale > 0, f"{name} got no gradient"
        np.testing.assert_allclose(np.array(mlx_grads[name]) / scale, expected / scale, atol=1e-4,
                                   rtol=0, err_msg=name)


def torch_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).numpy()


def mlx_logits(model, idx):
    return np.array(model(mx.array(idx)))


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_token_never_changes_the_outputs_before_it(framework):
    torch_model, mlx_model = twin_models(seed=5)
    model, logits_of = (torch_model, torch_logits) if framework == "torch" else (mlx_model, mlx_logits)
    idx = random_tokens((1, ROW_LEN), 6)
    before = logits_of(model, idx)
    for t in (0, 7, 8, 17, ROW_LEN - 1):  # inside, at and past the short and long windows
        changed = idx.copy()
        changed[0, t] = (changed[0, t] + 1) % CONFIG["vocab_size"]
        after = logits_of(model, changed)
        np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-6, rtol=0,
                                   err_msg=f"{framework}: token {t} changed an earlier output")
        assert np.abs(after[:, t] - before[:, t]).max() > 1e-3, "the change had no effect at all"


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_windows_bound_how_far_back_a_token_is_seen(framework):
    """An S layer (window 8) then an L layer (window 16): token 0 reaches position 7 + 15 = 22
    and nothing after it, even though the rows are longer than sequence_len."""
    config = dict(CONFIG, window_pattern="S", n_layer=2)
    torch.manual_seed(7)
    torch_model = train.GPT(train.GPTConfig(**config))
    with torch.no_grad():
        for param in torch_model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    if framework == "torch":
        model, logits_of = torch_model, torch_logits
    else:
        weights = {n: p.detach().numpy() for n, p in torch_model.named_parameters()}
        model = train_mlx.GPT(train_mlx.GPTConfig(**config))
        model.update(tree_map_with_path(lambda name, _: mx.array(weights[name]), model.parameters()))
        logits_of = mlx_logits
    idx = random_tokens((1, ROW_LEN), 8)
    changed = idx.copy()
    changed[0, 0] = (changed[0, 0] + 1) % CONFIG["vocab_size"]
    delta = np.abs(logits_of(model, changed) - logits_of(model, idx)).max(axis=-1)[0]
    reach = (8 - 1) + (16 - 1)
    assert delta[reach] > 1e-4
    np.testing.assert_allclose(delta[reach + 1:], 0, atol=1e-6)
