"""Attention and the output layer's loss for train.py, each written for speed on its device (locked).

An experiment calls these as plain functions; what they compute is the textbook formula (the
reference_* functions below, which the tests compare them with), only faster:

    attention(q, k, v, window)          causal attention over the last `window` keys of each query
    SoftcapLinearCrossEntropy(softcap)  cross-entropy of softcap * tanh(x @ W.T / softcap), with
                                        its gradient computed chunk by chunk in the forward pass
    target_nats(logits, targets)        per-token nats of logits the model returned (evaluation)

An experiment that wants another kernel writes its own in train.py and calls it instead.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_BLOCKS = 4    # query blocks of blocked_attention (CPU): each skips the keys after it
LOSS_CHUNK_ROWS = 256   # rows of logits alive at once in the CPU loss: made and consumed in cache
LOSS_GROUP_ROWS = 2048  # rows per backward matmul of the CPU loss (their logit gradients together)
NATS_CHUNK_ROWS = 1     # evaluation: rows of [T, V] logits turned into nats at a time
FLEX_DEVICES = ("cuda",)  # where compiled code runs windowed attention as FlexAttention


# ---------------------------------------------------------------------------------------------
# Attention

def window_mask(T, window, device):
    """Boolean [T, T] mask (True = attend) of causal attention over the last `window` tokens;
    None when plain causal attention already fits in the window."""
    if window >= T:
        return None
    pos = torch.arange(T, device=device)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


_BLOCK_MASKS = {}  # (T, window, device) -> BlockMask


def sliding_window_block_mask(T, window, device):
    """FlexAttention's BlockMask of causal attention over the last `window` of T tokens, built
    once per shape and device. Its kernel computes only the 128 x 128 blocks of scores that hold
    an attended pair: at T = 2048 and window 1024, 108 of 256, where a dense mask computes all.

    A plain dict rather than functools.cache, which torch.compile would trace through (building
    the mask on every call): compiled code that finds the dict without this mask builds it once,
    and the dict's new entry makes torch.compile retrace the block to read it from there."""
    key = (T, window, torch.device(device))
    if key not in _BLOCK_MASKS:

        from torch.nn.attention.flex_attention import create_block_mask

        def in_window(batch, head, query, key):
            return (query >= key) & (query - key < window)

        _BLOCK_MASKS[key] = create_block_mask(in_window, None, None, T, T, device=device)
    return _BLOCK_MASKS[key]


def _repeat_kv(q, k, v):
    """Grouped-query attention: each of k, v's heads serves q.size(1) // k.size(1) query heads."""
    if k.size(1) == q.size(1):
        return k, v
    return (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))


def reference_attention(q, k, v, window):
    """The plain formula: softmax(q k^T / sqrt(D) + mask) v over all [T, T] scores, in fp32."""
    T = q.size(-2)
    k, v = _repeat_kv(q, k, v)
    mask = window_mask(T, window, q.device)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.size(-1) ** -0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ v.float()).to(v.dtype)


def blocked_attention(q, k, v, window):
    """For a CPU: the queries in ATTENTION_BLOCKS row blocks, each scoring only the keys up to its
    last row (a query never sees a later key), so at 4 blocks 37.5% of the [T, T] scores are
    never computed; batched matmuls around a softmax in the input's dtype otherwise."""
    T = q.size(-2)
    k, v = _repeat_kv(q, k, v)
    block = -(-T // ATTENTION_BLOCKS)
    outputs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        query = torch.arange(start, stop, device=q.device)[:, None]
        key = torch.arange(stop, device=q.device)[None, :]
        allowed = (key <= query) & (query - key < window)
        scores = (q[:, :, start:stop] @ k[:, :, :stop].transpose(-2, -1)) * q.size(-1) ** -0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, :, :stop])
    return torch.cat(outputs, dim=2)


_COMPILED_FLEX = []  # the compiled FlexAttention, made on first use


def compiled_flex_attention(*args, **kwargs):
    """FlexAttention compiled: so it runs as its fused kernel wherever it is called (a compiled
    block traces into it); called as it is, it would run an unfused implementation instead.
    Imported and compiled on first use, because importing it loads torch's compiler, seconds of
    start-up that a run which never takes the Flex path (every CPU run) should not pay."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](*args, **kwargs)


def flex_window_attention(q, k, v, window):
    """FlexAttention under sliding_window_block_mask: its kernel skips the blocks of scores
    outside the window instead of computing and masking them."""
    # CUDA's autocast leaves the rms-normed q and k in fp32, and FlexAttention takes one dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    block_mask = sliding_window_block_mask(q.size(-2), window, q.device)
    return compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


def sdpa_attention(q, k, v, window):
    """F.scaled_dot_product_attention: its flash kernel for plain causal attention, a dense
    [T, T] mask for a window shorter than the row."""
    mask = window_mask(q.size(-2), window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.size(1) != q.size(1))


def attention(q, k, v, window):
    """Causal attention of q [B, H, T, D] over k, v [B, H_kv, T, D] (H_kv divides H), each query
    seeing itself and the window - 1 keys before it: [B, H, T, D] in v's dtype.

    Per device: inside compiled code on FLEX_DEVICES (CUDA), a window shorter than the row runs
    as flex_window_attention; on a CPU, blocked_attention; elsewhere (MPS, eager CUDA)
    sdpa_attention."""
    if window < q.size(-2) and q.device.type in FLEX_DEVICES and torch.compiler.is_compiling():
        return flex_window_attention(q, k, v, window)
    if q.device.type == "cpu":
        return blocked_attention(q, k, v, window)
    return sdpa_attention(q, k, v, window)


# ---------------------------------------------------------------------------------------------
# Softcapped output layer and its cross-entropy

def reference_softcap_cross_entropy(x, weight, targets, softcap):
    """The plain formula: per-token nats of F.cross_entropy over softcap * tanh(x @ W.T / softcap)."""
    capped = softcap * torch.tanh((x @ weight.t()).float() / softcap)
    return F.cross_entropy(capped, targets, reduction="none")


class SoftcapChunk(nn.Module):
    """Cross-entropy of one chunk of logits [rows, V] capped to (-softcap, softcap): per-token
    nats [rows] (fp32). Given grad_out [rows, V], it also writes there the gradient of
    grad_scale * sum(nats) with respect to the logits. Capped logits cannot overflow exp() in
    fp32, so log-sum-exp needs no max pass. A module of its own so that torch.compile fuses it."""

    def __init__(self, softcap):
        super().__init__()
        self.softcap = softcap

    def forward(self, logits, targets, grad_out=None, grad_scale=1.0):
        # tanh(u) = 1 - 2 / (exp(2u) + 1): compiled for a CPU this runs about twice as fast as
        # torch.tanh, and it is exact to fp32 rounding at both ends (exp -> 0, inf).
        tanh = 1 - 2 / (torch.exp(logits.float() * (2 / self.softcap)) + 1)
        exp = torch.exp(self.softcap * tanh)
        sum_exp = exp.sum(dim=-1, keepdim=True)
        nats = (sum_exp.log() - self.softcap * tanh.gather(-1, targets[:, None])).squeeze(-1)
        if grad_out is not None:
            is_target = torch.arange(logits.size(-1), device=logits.device) == targets[:, None]
            grad = (exp / sum_exp - is_target.float()) * (1 - tanh * tanh) * grad_scale
            grad_out.copy_(grad)
        return nats


def chunked_softcap_loss(x, weight, targets, chunk, with_grad=False):
    """x @ weight.T and the softcapped cross-entropy over x [N, D]: per-token nats [N] and,
    with_grad, the gradients of mean(nats) with respect to x and weight (else None, None).

    On a CPU the [N, V] logits never exist at once: each LOSS_CHUNK_ROWS rows are made and
    consumed while they sit in the cache; their gradients gather in a LOSS_GROUP_ROWS buffer, so
    the backward matmuls run on large shapes and the fp32 weight gradient is added to once per
    group. A GPU has no such cache to fit and would only pay launches per chunk: one chunk there."""
    w = weight.to(x.dtype)
    n = x.size(0)
    chunk_rows, group_rows = (LOSS_CHUNK_ROWS, LOSS_GROUP_ROWS) if x.device.type == "cpu" else (n, n)
    nats = torch.empty(n, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if with_grad else None
    grad_w = torch.zeros_like(weight) if with_grad else None
    grad_logits = (torch.empty(min(n, group_rows), w.size(0), dtype=x.dtype, device=x.device)
                   if with_grad else None)
    for group_start in range(0, n, group_rows):
        group = slice(group_start, min(group_start + group_rows, n))
        for start in range(group.start, group.stop, chunk_rows):
            rows = slice(start, min(start + chunk_rows, group.stop))
            grad_out = grad_logits[start - group.start:rows.stop - group.start] if with_grad else None
            nats[rows] = chunk(x[rows] @ w.t(), targets[rows], grad_out, 1.0 / n)
        if with_grad:
            group_grad = grad_logits[:group.stop - group.start]
            torch.mm(group_grad, w, out=grad_x[group])
            grad_w += group_grad.t() @ x[group]
    return nats, grad_x, grad_w


class _MeanSoftcapLoss(torch.autograd.Function):
    """Mean of chunked_softcap_loss, whose gradients are computed in the forward pass and only
    scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk):
        nats, grad_x, grad_w = chunked_softcap_loss(x, weight, targets, chunk, with_grad=True)
        ctx.save_for_backward(grad_x, grad_w)
        return nats.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss, None, None


class SoftcapLinearCrossEntropy(nn.Module):
    """loss(x [N, D], weight [V, D], targets [N], reduction): the cross-entropy of the logits
    softcap * tanh(x @ weight.T / softcap), as reference_softcap_cross_entropy computes it: their
    mean ('mean', differentiable) or per-token nats [N] ('none', no gradient).

    Fast because the [N, V] logits are never held whole: each chunk of rows is made, turned into
    nats and its logit gradient, and dropped, so every elementwise pass runs from cache instead
    of from memory. compile() compiles the per-chunk arithmetic (SoftcapChunk)."""

    def __init__(self, softcap):
        super().__init__()
        self.chunk = SoftcapChunk(softcap)

    def compile(self, *args, **kwargs):
        self.chunk.compile(*args, **kwargs)

    def forward(self, x, weight, targets, reduction="mean"):
        if torch.is_grad_enabled() and reduction == "mean":
            return _MeanSoftcapLoss.apply(x, weight, targets, self.chunk)
        nats, _, _ = chunked_softcap_loss(x, weight, targets, self.chunk)
        return nats.mean() if reduction == "mean" else nats


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def target_nats(logits, targets):
    """-log softmax(logits)[target] per position, as float64 numpy [rows, T], for logits
    [rows, T, V] on any device and targets a numpy [rows, T] array: log-sum-exp in fp32, on the
    logits' device, NATS_CHUNK_ROWS rows at a time so its temporaries stay one row's size."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != targets.shape:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected "
                         f"{targets.shape + ('vocab',)}")
    targets = torch.from_numpy(targets).to(logits.device)
    out = []
    for start in range(0, logits.size(0), NATS_CHUNK_ROWS):
        rows = logits[start:start + NATS_CHUNK_ROWS].float()
        picked = rows.gather(-1, targets[start:start + NATS_CHUNK_ROWS, :, None]).squeeze(-1)
        out.append((torch.logsumexp(rows, dim=-1) - picked).double().cpu())
    return torch.cat(out).numpy()
