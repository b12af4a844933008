"""backends/mlx_ops.py against the plain formulas: attention's values and gradients in fp32 and
bf16 for every window and odd row lengths, and the evaluation's nats."""

import mlx.core as mx
import numpy as np
import pytest

from backends import mlx_ops

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 3e-2


def qkv(n_kv_head, T, seed=0):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((2, 4, T, 8)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((2, n_kv_head, T, 8)).astype(np.float32)) for _ in range(2))
    return q, k, v


def values_and_grads(function, q, k, v, window, grad_out):
    def weighted(q, k, v):
        return (function(q, k, v, window).astype(mx.float32) * grad_out).sum()
    out = function(q, k, v, window)
    grads = mx.grad(weighted, argnums=(0, 1, 2))(q, k, v)
    return np.array(out.astype(mx.float32)), [np.array(g.astype(mx.float32)) for g in grads]


def assert_close(got, expected, tolerance):
    assert np.abs(got - expected).max() <= tolerance * max(np.abs(expected).max(), 1.0)


def test_window_mask_is_causal_and_limited_to_the_window():
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(np.array(mlx_ops.window_mask(5, 2)), expected)
    assert mlx_ops.window_mask(5, 5) == "causal" and mlx_ops.window_mask(5, 9) == "causal"


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("T, window", [(12, 5), (13, 5), (13, 13), (13, 40), (9, 1), (1, 1)])
def test_attention_equals_the_reference_in_fp32(n_kv_head, T, window):
    q, k, v = qkv(n_kv_head, T)
    grad_out = mx.array(np.random.default_rng(1).standard_normal((2, 4, T, 8)).astype(np.float32))
    got, got_grads = values_and_grads(mlx_ops.attention, q, k, v, window, grad_out)
    expected, expected_grads = values_and_grads(mlx_ops.reference_attention, q, k, v, window, grad_out)
    assert_close(got, expected, FP32_TOLERANCE)
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert_close(grad, expected_grad, FP32_TOLERANCE)


@pytest.mark.parametrize("T, window", [(13, 5), (16, 16)])
def test_attention_in_bf16_stays_within_bf16_of_the_fp32_reference(T, window):
    q, k, v = qkv(2, T)
    grad_out = mx.array(np.random.default_rng(1).standard_normal((2, 4, T, 8)).astype(np.float32))
    bf16 = [t.astype(mx.bfloat16) for t in (q, k, v)]
    got, got_grads = values_and_grads(mlx_ops.attention, *bf16, window, grad_out)
    expected, expected_grads = values_and_grads(mlx_ops.reference_attention, q, k, v, window, grad_out)
    assert_close(got, expected, BF16_TOLERANCE)
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert_close(grad, expected_grad, BF16_TOLERANCE)


def test_target_nats_are_the_cross_entropy_in_float64():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, (3, 5))
    got = mlx_ops.target_nats(mx.array(logits), targets)
    top = logits.max(-1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    assert got.dtype == np.float64 and got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_target_nats_refuse_anything_but_logits_of_every_position():
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4\), expected \(2, 4, 'vocab'\)"):
        mlx_ops.target_nats(mx.zeros((2, 4)), np.zeros((2, 4), dtype=np.int64))
