"""Attention and the evaluation's nats for train_mlx.py, the twins of backends/torch_ops.py (locked).

    attention(q, k, v, window)      causal attention over the last `window` keys of each query
    target_nats(logits, targets)    per-token nats of logits the model returned (evaluation)

The reference_* functions are the plain formulas the tests compare them with. An experiment
that wants another kernel writes its own in train_mlx.py and calls it instead.
"""

import functools

import mlx.core as mx
import numpy as np

NATS_CHUNK_ROWS = 1  # evaluation: rows of [T, V] logits turned into nats at a time


@functools.cache
def window_mask(T, window):
    """Boolean [T, T] mask (True = attend) of causal attention over the last `window` tokens;
    "causal" (mx.fast's own causal mask) when plain causal attention already fits the window."""
    if window >= T:
        return "causal"
    pos = mx.arange(T)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


def reference_attention(q, k, v, window):
    """The plain formula: softmax(q k^T / sqrt(D) + mask) v over all [T, T] scores, in fp32."""
    T, D = q.shape[-2], q.shape[-1]
    if k.shape[1] != q.shape[1]:
        k, v = (mx.repeat(t, q.shape[1] // k.shape[1], axis=1) for t in (k, v))
    pos = mx.arange(T)
    distance = pos[:, None] - pos[None, :]
    mask = (distance >= 0) & (distance < window)
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2)) * D ** -0.5
    weights = mx.softmax(mx.where(mask, scores, -mx.inf), axis=-1)
    return (weights @ v.astype(mx.float32)).astype(v.dtype)


def attention(q, k, v, window):
    """Causal attention of q [B, H, T, D] over k, v [B, H_kv, T, D] (H_kv divides H), each query
    seeing itself and the window - 1 keys before it: [B, H, T, D]. mx.fast's fused kernel, which
    takes grouped-query heads as they are and never writes the [T, T] scores to memory on a GPU."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                mask=window_mask(q.shape[-2], window))


def target_nats(logits, targets):
    """-log softmax(logits)[target] per position, as float64 numpy [rows, T], for logits
    [rows, T, V] and targets a numpy [rows, T] array: log-sum-exp in fp32 on the device,
    NATS_CHUNK_ROWS rows at a time, each evaluated and released before the next."""
    if logits.ndim != 3 or tuple(logits.shape[:2]) != targets.shape:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected "
                         f"{targets.shape + ('vocab',)}")
    out = []
    for start in range(0, logits.shape[0], NATS_CHUNK_ROWS):
        rows = logits[start:start + NATS_CHUNK_ROWS].astype(mx.float32)
        picked = mx.take_along_axis(rows, mx.array(targets[start:start + NATS_CHUNK_ROWS, :, None]),
                                    axis=-1)[..., 0]
        out.append(np.array(mx.logsumexp(rows, axis=-1) - picked).astype(np.float64))
        mx.clear_cache()
    return np.concatenate(out)
