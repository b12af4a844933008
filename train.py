"""
Pretrain a small GPT for a fixed time budget with PyTorch (CUDA, MPS or CPU) and report val_bpb.

This is one of the two files the agent edits. train_mlx.py is its MLX twin: the same model, the
same loop and the same summary, section by section under the same names, so that
`diff train.py train_mlx.py` shows only what the frameworks force. Anything here is fair game:
the constants, the model, the optimizer set-up, the schedules, the loop. The harness (prepare.py:
data, tokenizer, evaluate_bpb, TIME_BUDGET) and backends/ are locked.

    uv run train.py                                   # backend from backends.detect_backend()
    AUTORESEARCH_BACKEND=cpu uv run train.py          # or mps, cuda; mlx runs train_mlx.py
    AUTORESEARCH_PROFILE=smoke AUTORESEARCH_TIME_BUDGET=10 uv run train.py   # a quick try
    uv run torchrun --nproc_per_node 2 train.py       # data parallel: 2 processes (GPUs or cores)
"""

import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import backends
from backends import distributed
from backends.report import format_summary, run_context, write_run_json


def exit_with_error(error):
    """End the run with one line on stderr and no traceback: the message says what to do."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


try:
    BACKEND = backends.detect_backend()
    PROFILE = backends.current_profile()
    import prepare  # reads AUTORESEARCH_TIME_BUDGET, which may be malformed
except (backends.BackendUnavailable, ValueError) as error:
    exit_with_error(error)
if BACKEND == "mlx" and __name__ == "__main__":
    # Hand the whole run to the MLX twin (same interpreter, same arguments) before torch loads.
    mlx_script = str(Path(__file__).with_name("train_mlx.py"))
    os.execv(sys.executable, [sys.executable, mlx_script, *sys.argv[1:]])

import torch  # noqa: E402  (imported only once the run is known to stay in PyTorch)
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: E402

from backends.muon_torch import MuonAdamW  # noqa: E402
from backends.optim import param_groups  # noqa: E402
from prepare import MAX_SEQ_LEN, TIME_BUDGET  # noqa: E402

# Data parallel: under `torchrun --nproc_per_node N` this process is rank RANK of WORLD_SIZE. Each
# rank trains on its own rows of every batch and the gradients are averaged, so all ranks take the
# same step; rank 0 alone prints, evaluates and reports. Without torchrun: rank 0 of 1.
try:
    RANKS = distributed.torchrun_ranks(BACKEND)
except distributed.DistributedError as error:
    exit_with_error(error)
RANK, WORLD_SIZE = RANKS.rank, RANKS.world_size

# ---------------------------------------------------------------------------------------------
# Hyperparameters. The size and batch ones default to what backends suggests for this machine;
# replace any of them by a literal to experiment.

HARDWARE = backends.get_hardware_info()
# Precision: the dtype the model and Muon's orthogonalisation compute in, "bf16" or "fp32". The
# default is measured on this machine (bf16 only where its matmuls really beat fp32's: the CPU
# calibration, an NVIDIA GPU's compute capability, a timed matmul on an Apple GPU); replace it by
# a literal to force one. MFU counts against this dtype's peak, and the CPU tier's batch follows it.
PRECISION = backends.choose_compute_dtype(HARDWARE, BACKEND)
COMPUTE_DTYPE = PRECISION["dtype"]
PEAK_FLOPS, PEAK_SOURCE = backends.peak_flops_and_source(HARDWARE, BACKEND, dtype=COMPUTE_DTYPE)
SUGGESTED = backends.suggest_hyperparameters(HARDWARE, BACKEND, flops=PEAK_FLOPS)

# Model
DEPTH = SUGGESTED["depth"]                    # transformer layers
ASPECT_RATIO = SUGGESTED["aspect_ratio"]      # model_dim = DEPTH * ASPECT_RATIO, rounded up to HEAD_DIM
HEAD_DIM = SUGGESTED["head_dim"]              # channels per attention head
WINDOW_PATTERN = SUGGESTED["window_pattern"]  # per layer, tiled: L = full SEQ_LEN, S = half
# Batch
SEQ_LEN = SUGGESTED["seq_len"]                      # tokens per training row
DEVICE_BATCH_SIZE = SUGGESTED["device_batch_size"]  # rows per forward/backward
TOTAL_BATCH_SIZE = SUGGESTED["total_batch_size"]    # tokens per optimizer step
EVAL_BATCH_SIZE = SUGGESTED["eval_batch_size"]      # rows of MAX_SEQ_LEN per evaluation forward
# Optimizer
EMBEDDING_LR = 0.6      # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, lm_head
MATRIX_LR = 0.04        # Muon, the transformer's matrices
SCALAR_LR = 0.5         # AdamW, resid_lambdas and x0_lambdas
WEIGHT_DECAY = 0.2      # Muon's cautious weight decay, decayed linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)
NS_STEPS = 5            # Polar Express (Newton-Schulz) iterations in Muon
# Schedule, as fractions of the time budget
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0
MUON_MOMENTUM_START, MUON_MOMENTUM_END, MUON_MOMENTUM_RAMP_STEPS = 0.85, 0.95, 300
# Loop
UNTIMED_STEPS = 2      # steps 0 and 1 (compilation, allocator warm-up) train but are not timed: on
                       # torch's CPU tier step 1 still page-faults ~108k new pages (0.8-1.3 s)
GC_EVERY_STEPS = 5000  # the garbage collector is off during training except every this many steps

# Device, precision and compilation: parameters stay fp32; in bf16 the forward pass runs under
# autocast, and Muon orthogonalises in DTYPE either way.
DEVICE = torch.device(BACKEND if BACKEND in ("cuda", "mps") else "cpu")
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[COMPUTE_DTYPE]
COMPILE = BACKEND in ("cuda", "cpu") and PROFILE != "smoke"  # smoke: compiling costs more than it saves
# On a CPU the final evaluation runs as fast eager as compiled (~1.0 s per 8 x 2048 batch on 2
# cores) and compiling its inference graphs would add 10-28 s to the run.
EVAL_EAGER = BACKEND == "cpu"

# ---------------------------------------------------------------------------------------------
# Model

ROPE_BASE = 10000.0
SOFTCAP = 15.0
LOSS_CHUNK_ROWS = 256   # rows of logits alive at once in the loss: made and consumed in cache. 256
                        # rather than 128 halves the calls per step: the CPU tier's bf16 step 5% faster
                        # on 2 AMX cores (paired medians of 12 steps), fp32's unchanged
LOSS_GROUP_ROWS = 2048  # rows per backward matmul of the loss (their logit gradients: 32 MB in bf16)
NORM_EPS = 1e-6
ATTENTION_BLOCKS = 4    # query blocks of matmul_attention (CPU): each skips the keys after it
# Short-window (S) layers on CUDA: FlexAttention, whose compiled kernel skips the blocks of scores
# outside the causal window. False: SDPA with a dense [T, T] mask, which computes every score and
# rules out the flash kernel. Smoke runs compile nothing, so they keep the mask.
FLEX_WINDOWS = BACKEND == "cuda" and COMPILE
VE_GATE_CHANNELS = 32   # value-embedding gates read this many leading channels of the block input


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training row length: sets the windows (L = this, S = half)
    vocab_size: int = 8192
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    """Parameter-free RMSNorm over the channels."""
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


class StreamNorm(nn.Module):
    """norm() of the residual stream outside the blocks (after the embedding, before lm_head) as a
    module, so that main() compiles it like the blocks. Eager, its forward and backward passes
    over [B, T, dim] cost 18-42 ms more a step at the CPU tier on 2 cores (paired medians of
    16-20 steps, three runs)."""

    def forward(self, x):
        return norm(x)


def has_value_embedding(layer_idx, n_layer):
    """Value embeddings sit on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Attention window (in tokens) of each layer: the pattern tiled over the layers, last layer L.

    Inputs longer than sequence_len (evaluation runs at MAX_SEQ_LEN) keep these windows, so no
    layer attends further back than it did in training.
    """
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"window_pattern {config.window_pattern!r} must be made of S and L only")
    size = {"L": config.sequence_len, "S": config.sequence_len // 2}
    windows = [size[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = size["L"]
    return tuple(windows)


def window_mask(T, window, device):
    """Boolean [T, T] mask (True = attend) for causal attention over the last `window` tokens;
    None when plain causal attention already fits in the window."""
    if window >= T:
        return None
    pos = torch.arange(T, device=device)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


@functools.cache
def sliding_window_block_mask(T, window, device):
    """FlexAttention's BlockMask for causal attention over the last `window` of T tokens, built
    once per shape and device. At T = 2048 and window 1024 its kernel computes 108 of the 256
    blocks of 128 x 128 scores, causal attention 136 and SDPA with a dense mask all 256."""

    def in_window(batch, head, query, key):
        return (query >= key) & (query - key < window)

    return create_block_mask(in_window, None, None, T, T, device=device)


def attention_mask(T, window, device):
    """The mask attention() takes for a layer of this window at row length T: None where plain
    causal attention fits in the window, a FlexAttention block mask with FLEX_WINDOWS, else
    window_mask's dense one."""
    if window >= T:
        return None
    if FLEX_WINDOWS:
        return sliding_window_block_mask(T, window, device)
    return window_mask(T, window, device)


def rotary_tables(seq_len, head_dim):
    """cos and sin [1, seq_len, 1, head_dim // 2], fp32, for rotating channel pairs (i, i + d/2)."""
    inv_freq = ROPE_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate the pairs (first half, second half) of x [B, T, H, D] by their position's angle;
    the same convention as mx.fast.rope(traditional=False)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def matmul_attention(q, k, v, mask):
    """Attention over q, k, v [B, H, T, D] as batched matmuls around a softmax, where mask [T, T]
    (True = attend, causal) or, if None, plain causality says which keys a query sees.

    For a CPU. A query never sees a later key, so the queries go in ATTENTION_BLOCKS row blocks
    and each block scores only the keys up to its last row: at 4 blocks 37.5% of the [T, T]
    scores are never computed. Compiled on 2 cores at the CPU tier's shapes (B=32, 4 heads of
    64, T=512), forward + backward per layer: flash kernel of F.scaled_dot_product_attention
    164 ms, one block with an fp32 softmax 110 ms, bf16 softmax 91 ms, 4 blocks 75 ms."""
    T = q.size(-2)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if k.size(1) != q.size(1):  # grouped-query attention: each kv head serves a group of q heads
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    block = -(-T // ATTENTION_BLOCKS)
    outputs = []
    for start in range(0, T, block):
        rows, keys = slice(start, min(start + block, T)), slice(0, min(start + block, T))
        scores = (q[:, :, rows] @ k[:, :, keys].transpose(-2, -1)) * q.size(-1) ** -0.5
        scores = scores.masked_fill(~mask[rows, keys], float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, :, keys])
    return torch.cat(outputs, dim=2)


# Compiled here, FlexAttention runs as its fused kernel wherever it is called (a compiled block
# traces into it); called as it is, it would run an unfused implementation instead.
compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def attention(q, k, v, mask):
    """Causal attention over q [B, H, T, D] and k, v [B, H_kv, T, D] (H_kv divides H) under an
    attention_mask(): FlexAttention for a block mask, else matmul_attention on a CPU and SDPA
    elsewhere, whose flash kernel serves mask None."""
    gqa = k.size(1) != q.size(1)
    if isinstance(mask, BlockMask):
        # CUDA's autocast leaves the rms-normed q and k in fp32, and FlexAttention takes one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        return compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if q.device.type == "cpu":
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Input-dependent gate in (0, 2) on how much of the token's value embedding to add.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = attention(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos, sin, mask):
        # Mix in the embedding x0 first: inside the block, so torch.compile fuses it too.
        x = resid_lambda.to(x.dtype) * x + x0_lambda.to(x.dtype) * x0
        x = x + self.attn(norm(x), ve, cos, sin, mask)
        return x + self.mlp(norm(x))


class SoftcapChunk(nn.Module):
    """Cross-entropy of one chunk of logits [rows, V] capped smoothly to (-SOFTCAP, SOFTCAP):
    per-token nats [rows] (fp32). Given grad_out [rows, V], it also writes there the gradient of
    grad_scale * sum(nats) with respect to the logits. Capped logits cannot overflow exp() in
    fp32, so log-sum-exp needs no max pass. A module of its own so that torch.compile fuses it."""

    def forward(self, logits, targets, grad_out=None, grad_scale=1.0):
        # tanh(u) = 1 - 2 / (exp(2u) + 1): compiled for the CPU this runs the whole chunk about
        # twice as fast as torch.tanh, and it is exact to fp32 rounding at both ends (exp -> 0, inf).
        tanh = 1 - 2 / (torch.exp(logits.float() * (2 / SOFTCAP)) + 1)
        exp = torch.exp(SOFTCAP * tanh)
        sum_exp = exp.sum(dim=-1, keepdim=True)
        nats = (sum_exp.log() - SOFTCAP * tanh.gather(-1, targets[:, None])).squeeze(-1)
        if grad_out is not None:
            is_target = torch.arange(logits.size(-1), device=logits.device) == targets[:, None]
            grad = (exp / sum_exp - is_target.float()) * (1 - tanh * tanh) * grad_scale
            grad_out.copy_(grad)
        return nats


def chunked_softcap_loss(x, weight, targets, chunk, with_grad=False):
    """lm_head and the softcapped cross-entropy over x [N, D]: per-token nats [N] and, with_grad,
    the gradients of mean(nats) with respect to x and weight (else None, None).

    On a CPU the [N, V] logits never exist at once. Each LOSS_CHUNK_ROWS rows of logits are made and
    consumed while they sit in the CPU's cache; their gradients gather in a LOSS_GROUP_ROWS buffer,
    so the backward matmuls run on large, efficient shapes and the fp32 weight gradient is added
    to once per group rather than once per chunk."""
    w = weight.to(x.dtype)
    n = x.size(0)
    # A GPU has no such cache to fit and would only pay kernel launches per chunk: one chunk there.
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


class SoftcapLinearCrossEntropy(torch.autograd.Function):
    """Mean softcapped cross-entropy of x @ weight.T against targets, with its gradients computed
    during the forward pass (chunk by chunk) and scaled by the incoming gradient in backward.
    Against lm_head + a compiled loss over the whole [B*T, V] logits (268 MB of bf16 per step at
    the CPU tier, each elementwise pass over them running from memory) this took the CPU tier's
    step from 2.26 to 1.92 s on 2 cores (median of 9 steps, exp-based tanh included)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk):
        nats, grad_x, grad_w = chunked_softcap_loss(x, weight, targets, chunk, with_grad=True)
        ctx.save_for_backward(grad_x, grad_w)
        return nats.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        head_dim = config.n_embd // config.n_head
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.stream_norm = StreamNorm()
        self.softcap_chunk = SoftcapChunk()
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * head_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        # Evaluation runs at MAX_SEQ_LEN even when training rows are shorter.
        cos, sin = rotary_tables(max(config.sequence_len, MAX_SEQ_LEN), head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        s = 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform(-s, s) has std n_embd ** -0.5
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            # Zero output projections: every block starts as the identity on the residual stream.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits [B, T, V] (fp32, softcapped); with targets, the cross-entropy loss instead:
        a scalar for reduction='mean', per-token nats [B, T] for reduction='none'."""
        T = idx.size(1)
        device_type = idx.device.type
        x = self.transformer.wte(idx)
        if torch.is_autocast_enabled(device_type):
            # Embeddings come out in fp32; cast so the whole residual stream stays in bf16.
            x = x.to(torch.get_autocast_dtype(device_type))
        x = self.stream_norm(x)
        # A copy, not an alias: the first block then sees two distinct tensors like the others
        # and shares their compiled graph (an aliased input is a graph of its own: +20 s cold).
        x0 = x.clone()
        cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)
        masks = {w: attention_mask(T, w, idx.device) for w in set(self.window_sizes)}
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin,
                      masks[self.window_sizes[i]])
        x = self.stream_norm(x)
        if targets is None:
            return SOFTCAP * torch.tanh(self.lm_head(x).float() / SOFTCAP)
        x, targets = x.flatten(0, 1), targets.flatten()
        if torch.is_grad_enabled() and reduction == "mean":
            return SoftcapLinearCrossEntropy.apply(x, self.lm_head.weight, targets,
                                                   self.softcap_chunk)
        nats, _, _ = chunked_softcap_loss(x, self.lm_head.weight, targets, self.softcap_chunk)
        return nats.mean() if reduction == "mean" else nats.view(idx.shape)

    def num_flops_per_token(self, T):
        """Training FLOPs per token at row length T: 6 per matmul weight (forward + backward)
        plus attention scores and values, 12 * heads * head_dim per attended position, counting
        min(window, T) positions per layer as upstream does."""
        embedding_like = (self.transformer.wte.weight.numel() + self.resid_lambdas.numel()
                          + self.x0_lambdas.numel()
                          + sum(e.weight.numel() for e in self.value_embeds.values()))
        matmul_params = sum(p.numel() for p in self.parameters()) - embedding_like
        head_dim = self.config.n_embd // self.config.n_head
        attention = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.window_sizes)
        return 6 * matmul_params + attention


def build_config(vocab_size):
    model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


# ---------------------------------------------------------------------------------------------
# Schedules, all driven by progress = training time / TIME_BUDGET (and Muon momentum by step)

def lr_multiplier(progress):
    """Linear warmup, flat, then linear warmdown to FINAL_LR_FRAC."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    cooldown = max(0.0, (1 - progress) / WARMDOWN_RATIO)
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def weight_decay_multiplier(progress):
    return 1 - progress


def muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def fail_if_diverged(loss, step):
    """Fast-fail: a NaN/inf or exploding loss will not recover, so stop instead of wasting the budget."""
    if not math.isfinite(loss) or loss > 100:
        print0(f"\nFAIL: training diverged at step {step}: loss {loss}", flush=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Data parallel (see RANK above; backends/distributed.py holds the engine's plumbing)

def print0(*args, **kwargs):
    """print on rank 0 only: one progress line and one summary however many ranks train."""
    if RANK == 0:
        print(*args, **kwargs)


def agree_across_ranks(train_loss, step_seconds):
    """Every rank takes the mean loss over the ranks and rank 0's step time, so all of them stop
    together on a diverged loss, follow the same schedules and end at the same step."""
    if WORLD_SIZE == 1:
        return train_loss, step_seconds
    stats = torch.tensor([train_loss / WORLD_SIZE, step_seconds if RANK == 0 else 0.0],
                         dtype=torch.float64, device=DEVICE)
    dist.all_reduce(stats)
    return stats[0].item(), stats[1].item()


# ---------------------------------------------------------------------------------------------
# Training run

class DataWait:
    """How long a step waits for its batches: mark() right before and right after each
    next_batch(), seconds() once the step has finished. A CPU computes as the host runs, so the
    wait is the host's time in next_batch(). A GPU runs the queued kernels meanwhile, so that host
    time is no wait (read as one, round 1 showed 87% on an H100); its wait is the device's time
    between an event queued after the micro-step's kernels and one queued after the batch's copy,
    which is idle time only when the batch came late."""

    def __init__(self, device):
        self.event = {"cuda": torch.cuda.Event, "mps": torch.mps.Event}.get(device.type)
        self.marks = []

    def mark(self):
        if self.event is None:
            self.marks.append(time.perf_counter())
        else:
            self.marks.append(self.event(enable_timing=True))
            self.marks[-1].record()

    def seconds(self):
        """The marked spans since the last call, summed; on a GPU every mark must have been
        reached (true after the step's .item())."""
        spans = zip(self.marks[0::2], self.marks[1::2])
        if self.event is None:
            total = sum(end - start for start, end in spans)
        else:
            total = sum(start.elapsed_time(end) for start, end in spans) / 1000  # ms
        self.marks = []
        return total


def main():
    process_start = psutil.Process().create_time()
    backends.keep_freed_memory()  # reuse freed activations instead of page-faulting them back in
    distributed.init_torch(BACKEND, RANKS)
    torch.manual_seed(42)
    if BACKEND == "cuda":
        torch.set_float32_matmul_precision("high")
    autocast = torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16,
                              enabled=COMPUTE_DTYPE == "bf16")

    tokens_per_micro_step = DEVICE_BATCH_SIZE * SEQ_LEN * WORLD_SIZE  # over all ranks
    if TOTAL_BATCH_SIZE % tokens_per_micro_step:
        exit_with_error(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE "
                        f"* SEQ_LEN * ranks = {tokens_per_micro_step}: change one of them")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step

    tokenizer = prepare.get_tokenizer()
    distributed.check_same_run_torch(__file__, prepare.active_dataset(), DEVICE)
    config = build_config(tokenizer.get_vocab_size())
    exit_if_model_cannot_fit(config)
    peak_flops, peak_source = PEAK_FLOPS, PEAK_SOURCE
    if BACKEND == "cpu":
        if WORLD_SIZE == 1:
            # At tiny shapes one thread beats two (they wait on each other more than they compute).
            torch.set_num_threads(backends.fastest_cpu_threads(DEVICE_BATCH_SIZE * SEQ_LEN,
                                                               config.n_embd, COMPUTE_DTYPE))
        # The peak at the threads this process trains on (torchrun's ranks divide the cores).
        peak_flops, peak_source = backends.peak_flops_and_source(HARDWARE, BACKEND, dtype=COMPUTE_DTYPE)
    peak_flops *= WORLD_SIZE  # every rank's device
    model = GPT(config).to(DEVICE)
    distributed.broadcast_torch_parameters(model)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.num_flops_per_token(SEQ_LEN)

    named_params = dict(model.named_parameters())
    groups = param_groups({name: tuple(p.shape) for name, p in named_params.items()}, config.n_embd,
                          matrix_lr=MATRIX_LR, embedding_lr=EMBEDDING_LR,
                          unembedding_lr=UNEMBEDDING_LR, scalar_lr=SCALAR_LR,
                          weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, ns_steps=NS_STEPS)
    for group in groups:
        group["initial_weight_decay"] = group["weight_decay"]
    optimizer = MuonAdamW(named_params, groups, orth_dtype=DTYPE)
    if COMPILE:
        # Regional compilation: the blocks (which share compiled graphs), the stream norm and the
        # loss chunk, each on its own, train as fast as the whole model compiled at once, in
        # about half the compile time. A GPU's final evaluation runs through them too (see
        # EVAL_EAGER).
        for module in [*model.transformer.h, model.stream_norm, model.softcap_chunk]:
            module.compile(dynamic=False)

    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train",
                                           rank=RANK, world_size=WORLD_SIZE)

    def next_batch():
        inputs, targets, _ = next(train_loader)
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        if DEVICE.type == "cuda":
            # From pinned memory the copy is queued behind the step's kernels instead of waiting
            # for them on the host, which showed up as data wait (87% on an H100).
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(DEVICE, non_blocking=True), targets.to(DEVICE, non_blocking=True)

    print0(f"backend {BACKEND} ({HARDWARE['chip']}), {COMPUTE_DTYPE}, compile {COMPILE}, "
           f"profile {PROFILE}")
    print0(f"precision: {COMPUTE_DTYPE}{' (forced)' if COMPUTE_DTYPE != PRECISION['dtype'] else ''}, "
           f"chosen from {PRECISION['how']}; mfu against {peak_flops / 1e12:.3f} TFLOP/s, "
           f"{peak_source}")
    if WORLD_SIZE > 1:
        print0(f"data parallel: {WORLD_SIZE} ranks, torch.distributed over {dist.get_backend()}")
    print0(f"model: {DEPTH} layers, dim {config.n_embd}, {config.n_head} heads, windows "
           f"{list(model.window_sizes)}, {num_params / 1e6:.1f}M params, "
           f"{flops_per_token / 1e6:.1f} MFLOP/token")
    print0(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows "
           f"x {SEQ_LEN} tokens{f' x {WORLD_SIZE} ranks' if WORLD_SIZE > 1 else ''}; "
           f"time budget {TIME_BUDGET:g}s", flush=True)

    x, y = next_batch()
    watchdog = distributed.Watchdog(RANK, WORLD_SIZE)
    step = 0
    training_time = 0.0
    untimed_seconds = 0.0  # the untimed steps: compilation, warm-up (the runner bounds them)
    data_wait_time = 0.0   # of the timed steps, spent waiting for next_batch() (see DataWait)
    data_wait = DataWait(DEVICE)
    smooth_loss = 0.0
    startup_seconds = time.time() - process_start
    while True:
        backends.sync(BACKEND)
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=DEVICE)
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            (loss / grad_accum_steps).backward()
            loss_sum += loss.detach()
            data_wait.mark()
            x, y = next_batch()
            data_wait.mark()
        distributed.average_torch_gradients(model.parameters())  # the mean over the ranks
        progress = min(training_time / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(progress)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = loss_sum.item() / grad_accum_steps  # .item() waits for the step to finish
        step_seconds = time.perf_counter() - step_start
        step_data_wait = data_wait.seconds()
        train_loss, step_seconds = agree_across_ranks(train_loss, step_seconds)
        watchdog.beat()
        fail_if_diverged(train_loss, step)
        if step >= UNTIMED_STEPS:
            training_time += step_seconds
            data_wait_time += step_data_wait
        else:
            untimed_seconds += step_seconds

        if step == 0:
            # Everything alive now lives for the whole run: stop the collector scanning it.
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % GC_EVERY_STEPS == 0:
            gc.collect()

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased_loss = smooth_loss / (1 - 0.9 ** (step + 1))
        tokens_per_second = TOTAL_BATCH_SIZE / step_seconds
        mfu = 100 * flops_per_token * tokens_per_second / peak_flops
        remaining = max(0.0, TIME_BUDGET - training_time)
        print0(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss {debiased_loss:.4f} | lrm {lrm:.2f} "
               f"| {tokens_per_second:,.0f} tok/s | mfu {mfu:.1f}% | remaining {remaining:.0f}s   ",
               end="", flush=True)
        step += 1
        if step > UNTIMED_STEPS and training_time >= TIME_BUDGET:
            break
    print0()
    # Collector back on: left frozen, the objects of compiled code outlive the interpreter and
    # their bindings print hundreds of "nanobind: leaked ..." lines at exit.
    gc.unfreeze()
    gc.enable()
    watchdog.stop()
    distributed.finish_torch()
    if RANK != 0:
        return  # the other ranks' work is done: rank 0 alone evaluates and reports

    untimed_tokens = UNTIMED_STEPS * TOTAL_BATCH_SIZE
    timed_tokens = (step - UNTIMED_STEPS) * TOTAL_BATCH_SIZE
    mfu_percent = 100 * flops_per_token * timed_tokens / training_time / peak_flops
    print(f"training: {timed_tokens / training_time:,.0f} tok/s, mfu {mfu_percent:.2f}% over "
          f"{training_time:.1f}s timed; total_tokens_M counts the {UNTIMED_STEPS} untimed steps too "
          f"({untimed_tokens:,} tokens in {untimed_seconds:.1f}s)", flush=True)

    # Final evaluation: no autograd, EVAL_BATCH_SIZE rows of MAX_SEQ_LEN at a time.
    model.eval()

    @torch.inference_mode()
    def per_token_nats(inputs, targets):
        inputs = torch.from_numpy(inputs).to(DEVICE)
        targets = torch.from_numpy(targets).to(DEVICE)
        with autocast:
            return model(inputs, targets, reduction="none").float().cpu().numpy()

    eval_start = time.perf_counter()
    with torch.compiler.set_stance("force_eager" if EVAL_EAGER else "default"):
        val_bpb = prepare.evaluate_bpb(per_token_nats, tokenizer, EVAL_BATCH_SIZE, BACKEND)
    eval_tokens = prepare.eval_token_budget(BACKEND)
    eval_seconds = time.perf_counter() - eval_start
    print(f"evaluation: {eval_tokens:,} tokens in {eval_seconds:.1f}s", flush=True)

    fields = {
        "val_bpb": val_bpb,
        "training_seconds": training_time,
        "total_seconds": time.time() - process_start,
        "peak_vram_mb": backends.peak_memory_mb(BACKEND),
        "mfu_percent": mfu_percent,
        "total_tokens_M": step * TOTAL_BATCH_SIZE / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": DEPTH,
        "backend": BACKEND,
        "chip": HARDWARE["chip"],
        **run_context(world_size=WORLD_SIZE, backend=BACKEND),
        "startup_seconds": startup_seconds,
        "untimed_seconds": untimed_seconds,
        "train_tokens_per_second": timed_tokens / training_time,
        "data_wait_percent": 100 * data_wait_time / training_time,
        "eval_seconds": eval_seconds,
        "eval_tokens_per_second": eval_tokens / eval_seconds,
        "compute_dtype": COMPUTE_DTYPE,
        "peak_tflops": peak_flops / 1e12,
        "untimed_steps": UNTIMED_STEPS,
        "untimed_tokens": untimed_tokens,
        "timed_tokens": timed_tokens,
        "total_batch_size": TOTAL_BATCH_SIZE,
    }
    print(format_summary(fields), flush=True)
    write_run_json(fields)


# ---------------------------------------------------------------------------------------------
# Runs that cannot finish: each ends with one line, and nothing is recorded

def parameter_count(config):
    """Parameters of GPT(config), counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def exit_if_model_cannot_fit(config):
    """Refuse, before allocating it, a model whose training state alone passes the memory."""
    num_params = parameter_count(config)
    if not backends.model_fits_in_memory(BACKEND, num_params):
        exit_out_of_memory(num_params)


def exit_out_of_memory(num_params):
    print0()  # end the progress line
    print(backends.out_of_memory_message(BACKEND, num_params), file=sys.stderr, flush=True)
    sys.exit(1)


def is_out_of_memory(error):
    """CUDA raises OutOfMemoryError; the CPU and MPS allocators a RuntimeError that says so."""
    message = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) \
        or "can't allocate memory" in message or "out of memory" in message


def step_reached(error):
    """The step main() was on when error went through it (0 before the training loop)."""
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is main.__code__:
            return traceback.tb_frame.f_locals.get("step", 0)
        traceback = traceback.tb_next
    return 0


def exit_interrupted(step):
    """Ctrl-C: exit 130 like any interrupted command, after one line on rank 0."""
    print0()
    if RANK == 0:
        print(f"interrupted at step {step}: nothing recorded", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:
        exit_interrupted(step_reached(interrupt))
    except (prepare.DataError, distributed.DistributedError) as error:
        exit_with_error(error)
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            config = build_config(prepare.get_tokenizer().get_vocab_size())
            exit_out_of_memory(parameter_count(config))
        if WORLD_SIZE == 1:
            raise
        # Usually the engine reporting a peer rank that stopped first: one line, not a traceback.
        exit_with_error(f"rank {RANK} of {WORLD_SIZE}: {str(error).strip().splitlines()[0]} "
                        f"(if another rank failed first, its output says why)")
    finally:
        # However the run ends (FAIL, Ctrl-C, an error), the collector goes back on, as after a
        # finished run: else the leak report of compiled code follows the last line.
        gc.unfreeze()
        gc.enable()
