"""
Pretrain a small GPT for a fixed time budget with MLX (Apple GPU, or the CPU on Linux) and report
val_bpb.

This is one of the two files the agent edits. train.py is its PyTorch twin: the same model, the
same loop and the same summary, section by section under the same names, so that
`diff train.py train_mlx.py` shows only what the frameworks force. Anything here is fair game:
the constants, the model, the optimizer set-up, the schedules, the loop. The harness (prepare.py:
data, tokenizer, evaluate_bpb, TIME_BUDGET) and backends/ are locked.

    uv run train_mlx.py                               # or AUTORESEARCH_BACKEND=mlx uv run train.py
    AUTORESEARCH_PROFILE=smoke AUTORESEARCH_TIME_BUDGET=10 uv run train_mlx.py   # a quick try
    uv run mlx.launch -n 2 --python .venv/bin/python train_mlx.py   # data parallel: 2 processes
"""

import gc
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import psutil

import backends
from backends import distributed
from backends.report import format_summary, run_context, write_run_json


def exit_with_error(error):
    """End the run with one line on stderr and no traceback: the message says what to do."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


try:
    BACKEND = backends.detect_mlx_backend()  # this script runs MLX only; is it usable here?
    PROFILE = backends.current_profile()
    import prepare  # reads AUTORESEARCH_TIME_BUDGET, which may be malformed
except (backends.BackendUnavailable, ValueError) as error:
    exit_with_error(error)

import mlx.core as mx  # noqa: E402  (imported only once MLX is known to be usable)
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from backends.muon_mlx import MuonAdamW  # noqa: E402
from backends.optim import param_groups  # noqa: E402
from prepare import TIME_BUDGET  # noqa: E402

# Data parallel: under `mlx.launch` (-n N on one machine, --hostfile across Macs) this process is
# rank RANK of WORLD_SIZE in GROUP. Each rank trains on its own rows of every batch and the
# gradients are averaged, so all ranks take the same step; rank 0 alone prints, evaluates and
# reports. Without mlx.launch: rank 0 of 1.
try:
    GROUP = distributed.init_mlx()
except distributed.DistributedError as error:
    exit_with_error(error)
RANK, WORLD_SIZE = GROUP.rank(), GROUP.size()

# ---------------------------------------------------------------------------------------------
# Hyperparameters. The size and batch ones default to what backends suggests for this machine;
# replace any of them by a literal to experiment.

HARDWARE = backends.get_hardware_info()
# Precision: the dtype the model and Muon's orthogonalisation compute in, "bf16" or "fp32". The
# default is measured on this machine (bf16 only where its matmuls really beat fp32's: the CPU
# calibration, a timed matmul on an Apple GPU); replace it by a literal to force one. MFU counts
# against this dtype's peak, and the CPU tier's batch follows it.
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

# Device, precision and compilation: parameters stay fp32; the forward pass computes in DTYPE,
# and Muon orthogonalises in it.
DTYPE = {"bf16": mx.bfloat16, "fp32": mx.float32}[COMPUTE_DTYPE]
COMPILE = True  # mx.compile traces in well under a second, so even smoke runs use it

# ---------------------------------------------------------------------------------------------
# Model

ROPE_BASE = 10000.0
SOFTCAP = 15.0
NORM_EPS = 1e-6
VE_GATE_CHANNELS = 32  # value-embedding gates read this many leading channels of the block input


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
    return mx.fast.rms_norm(x, None, NORM_EPS)


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


def window_mask(T, window):
    """Boolean [T, T] mask (True = attend) for causal attention over the last `window` tokens;
    "causal" when plain causal attention already fits in the window."""
    if window >= T:
        return "causal"
    pos = mx.arange(T)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


class Linear(nn.Linear):
    """Bias-free linear layer that computes in its input's dtype (fp32 weights, bf16 matmuls);
    a plain nn.Linear would promote a bf16 input to fp32."""

    def __init__(self, input_dims, output_dims):
        super().__init__(input_dims, output_dims, bias=False)

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve else None

    def __call__(self, x, ve, mask):
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Input-dependent gate in (0, 2) on how much of the token's value embedding to add.
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate[..., None] * ve.reshape(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        # mx.fast.rope rotates the pairs (first half, second half) of [B, H, T, D] by position.
        q = norm(mx.fast.rope(q, self.head_dim, traditional=False, base=ROPE_BASE, scale=1.0, offset=0))
        k = norm(mx.fast.rope(k, self.head_dim, traditional=False, base=ROPE_BASE, scale=1.0, offset=0))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, x0, resid_lambda, x0_lambda, ve, mask):
        # Mix in the embedding x0 first: inside the block, as in train.py (where that helps compile).
        x = resid_lambda.astype(x.dtype) * x + x0_lambda.astype(x.dtype) * x0
        x = x + self.attn(norm(x), ve, mask)
        return x + self.mlp(norm(x))


class SoftcapCrossEntropy(nn.Module):
    """The elementwise-heavy tail of the model: logits in fp32, capped smoothly to
    (-SOFTCAP, SOFTCAP); with targets, their cross-entropy instead (a scalar for reduction='mean',
    per-token nats [B, T] for 'none'). train.py computes the same loss in row chunks with its
    gradient in the same pass (SoftcapLinearCrossEntropy) because torch on a CPU ran the full
    [B, T, V] logits' elementwise passes from memory; here the plain form stays."""

    def __call__(self, logits, targets=None, reduction="mean"):
        logits = logits.astype(mx.float32)
        logits = SOFTCAP * mx.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = nn.losses.cross_entropy(logits, targets)
        return loss.mean() if reduction == "mean" else loss


class GPT(nn.Module):
    def __init__(self, config, compute_dtype=mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # MLX has no autocast: the residual stream's dtype
        self.window_sizes = window_sizes(config)
        head_dim = config.n_embd // config.n_head
        self.transformer = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": [Block(config, i) for i in range(config.n_layer)],
        }
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.softcap_loss = SoftcapCrossEntropy()
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.full((config.n_layer,), 0.1)
        self.value_embeds = {
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * head_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        }
        self.init_weights()

    def init_weights(self):
        s = 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform(-s, s) has std n_embd ** -0.5

        def uniform(shape):
            return mx.random.uniform(-s, s, shape)

        wte = self.transformer["wte"]
        wte.weight = mx.random.normal(wte.weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer["h"]:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                linear.weight = uniform(linear.weight.shape)
            # Zero output projections: every block starts as the identity on the residual stream.
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)
        for embedding in self.value_embeds.values():
            embedding.weight = uniform(embedding.weight.shape)
        self.resid_lambdas = mx.ones((self.config.n_layer,))
        self.x0_lambdas = mx.full((self.config.n_layer,), 0.1)

    def __call__(self, idx, targets=None, reduction="mean"):
        """Logits [B, T, V] (fp32, softcapped); with targets, the cross-entropy loss instead:
        a scalar for reduction='mean', per-token nats [B, T] for reduction='none'."""
        T = idx.shape[1]
        # Embeddings come out in fp32; cast so the whole residual stream is in the compute dtype.
        x = self.transformer["wte"](idx).astype(self.compute_dtype)
        x = norm(x)
        x0 = x
        masks = {w: window_mask(T, w) for w in set(self.window_sizes)}
        for i, block in enumerate(self.transformer["h"]):
            ve = self.value_embeds[str(i)](idx).astype(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, masks[self.window_sizes[i]])
        return self.softcap_loss(self.lm_head(norm(x)), targets, reduction)

    def num_flops_per_token(self, T):
        """Training FLOPs per token at row length T: 6 per matmul weight (forward + backward)
        plus attention scores and values, 12 * heads * head_dim per attended position, counting
        min(window, T) positions per layer as upstream does."""
        embedding_like = (self.transformer["wte"].weight.size + self.resid_lambdas.size
                          + self.x0_lambdas.size
                          + sum(e.weight.size for e in self.value_embeds.values()))
        matmul_params = sum(p.size for _, p in tree_flatten(self.parameters())) - embedding_like
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
    stats = mx.distributed.all_sum(mx.array([train_loss / WORLD_SIZE,
                                             step_seconds if RANK == 0 else 0.0]), group=GROUP)
    return stats[0].item(), stats[1].item()


# ---------------------------------------------------------------------------------------------
# Training run

def main():
    process_start = psutil.Process().create_time()
    backends.keep_freed_memory()  # reuse freed activations instead of page-faulting them back in
    mx.random.seed(42)

    tokens_per_micro_step = DEVICE_BATCH_SIZE * SEQ_LEN * WORLD_SIZE  # over all ranks
    if TOTAL_BATCH_SIZE % tokens_per_micro_step:
        exit_with_error(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE "
                        f"* SEQ_LEN * ranks = {tokens_per_micro_step}: change one of them")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step

    tokenizer = prepare.get_tokenizer()
    distributed.check_same_run_mlx(__file__, prepare.active_dataset(), GROUP)
    config = build_config(tokenizer.get_vocab_size())
    peak_flops, peak_source = PEAK_FLOPS, PEAK_SOURCE
    peak_flops *= WORLD_SIZE  # every rank's device
    model = GPT(config, compute_dtype=DTYPE)
    exit_if_model_cannot_fit(model)  # before mx.eval allocates its parameters
    mx.eval(model.parameters())
    distributed.broadcast_mlx_parameters(model, GROUP)
    num_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    flops_per_token = model.num_flops_per_token(SEQ_LEN)

    named_params = dict(tree_flatten(model.trainable_parameters()))
    groups = param_groups({name: tuple(p.shape) for name, p in named_params.items()}, config.n_embd,
                          matrix_lr=MATRIX_LR, embedding_lr=EMBEDDING_LR,
                          unembedding_lr=UNEMBEDDING_LR, scalar_lr=SCALAR_LR,
                          weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, ns_steps=NS_STEPS)
    for group in groups:
        group["initial_weight_decay"] = group["weight_decay"]
    optimizer = MuonAdamW(groups, orth_dtype=DTYPE)
    optimizer.init(model.trainable_parameters())

    # The two compiled pieces of a step: forward+backward of one micro-batch, and the update from
    # the accumulated gradients. Both take the model and optimizer state as inputs and outputs.
    loss_and_grad = nn.value_and_grad(model, lambda model, x, y: model(x, y))
    state = [model.state, optimizer.state]

    def micro_step(x, y):
        return loss_and_grad(model, x, y)

    def optimizer_step(grads):
        grads = distributed.average_mlx_gradients(grads, GROUP)  # the mean over the ranks
        optimizer.update(model, tree_map(lambda g: g / grad_accum_steps, grads))

    if COMPILE:
        micro_step = mx.compile(micro_step, inputs=state, outputs=state)
        optimizer_step = mx.compile(optimizer_step, inputs=state, outputs=state)

    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train",
                                           rank=RANK, world_size=WORLD_SIZE)

    def next_batch():
        inputs, targets, _ = next(train_loader)
        return mx.array(inputs.astype(np.int32)), mx.array(targets.astype(np.int32))

    print0(f"backend {BACKEND} ({HARDWARE['chip']}), {COMPUTE_DTYPE}, compile {COMPILE}, "
           f"profile {PROFILE}")
    print0(f"precision: {COMPUTE_DTYPE}{' (forced)' if COMPUTE_DTYPE != PRECISION['dtype'] else ''}, "
           f"chosen from {PRECISION['how']}; mfu against {peak_flops / 1e12:.3f} TFLOP/s, "
           f"{peak_source}")
    if WORLD_SIZE > 1:
        print0(f"data parallel: {WORLD_SIZE} ranks, mx.distributed")
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
    data_wait_time = 0.0   # of the timed steps, spent in next_batch(): mx.eval() has already
                           # waited for the device, so this host time is the device's wait too
    smooth_loss = 0.0
    startup_seconds = time.time() - process_start
    while True:
        backends.sync(BACKEND)
        step_start = time.perf_counter()
        step_data_wait = 0.0
        grads = None
        loss_sum = mx.array(0.0)
        for _ in range(grad_accum_steps):
            loss, micro_grads = micro_step(x, y)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss_sum = loss_sum + loss
            mx.eval(loss_sum, grads)  # one micro-batch's activations in memory at a time
            data_start = time.perf_counter()
            x, y = next_batch()
            step_data_wait += time.perf_counter() - data_start
        progress = min(training_time / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(progress)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.sync_schedule()  # copy the new values into the compiled step's state
        optimizer_step(grads)
        mx.eval(state)
        train_loss = loss_sum.item() / grad_accum_steps
        step_seconds = time.perf_counter() - step_start
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
    if RANK != 0:
        return  # the other ranks' work is done: rank 0 alone evaluates and reports

    untimed_tokens = UNTIMED_STEPS * TOTAL_BATCH_SIZE
    timed_tokens = (step - UNTIMED_STEPS) * TOTAL_BATCH_SIZE
    mfu_percent = 100 * flops_per_token * timed_tokens / training_time / peak_flops
    print(f"training: {timed_tokens / training_time:,.0f} tok/s, mfu {mfu_percent:.2f}% over "
          f"{training_time:.1f}s timed; total_tokens_M counts the {UNTIMED_STEPS} untimed steps too "
          f"({untimed_tokens:,} tokens in {untimed_seconds:.1f}s)", flush=True)

    # Final evaluation: no gradients are built; each batch is evaluated and its buffers released,
    # so memory stays at one EVAL_BATCH_SIZE x MAX_SEQ_LEN forward.
    def per_token_nats(inputs, targets):
        nats = model(mx.array(inputs.astype(np.int32)), mx.array(targets.astype(np.int32)),
                     reduction="none")
        nats = np.array(nats)  # evaluates this batch's graph
        mx.clear_cache()
        return nats

    eval_start = time.perf_counter()
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

def parameter_count(model):
    """Parameters of a model; until mx.eval they have shapes but no memory."""
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def exit_if_model_cannot_fit(model):
    """Refuse, before allocating it, a model whose training state alone passes the memory: MLX
    cannot raise when an allocation fails under a hard limit (ulimit -v), it crashes."""
    num_params = parameter_count(model)
    if not backends.model_fits_in_memory(BACKEND, num_params):
        exit_out_of_memory(num_params)


def exit_out_of_memory(num_params):
    print0()  # end the progress line
    print(backends.out_of_memory_message(BACKEND, num_params), file=sys.stderr, flush=True)
    sys.exit(1)


def is_out_of_memory(error):
    """Metal raises a RuntimeError that says it cannot allocate."""
    message = str(error)
    return isinstance(error, MemoryError) or "allocate" in message or "out of memory" in message


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
            exit_out_of_memory(parameter_count(GPT(config)))  # lazy: nothing is allocated
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
