"""
Pretrain a small GPT for a fixed time budget with MLX (Apple GPU, or the CPU on Linux) and report
val_bpb.

This is one of the two files the agent edits. train.py is its PyTorch twin: the same model, the
same loop, section by section under the same names, so that `diff train.py train_mlx.py` shows
only what the frameworks force. Anything here is fair game: the constants, the model, the
optimizer set-up, the schedules, the loop. Locked (see program.md): prepare.py (data, tokenizer,
the evaluation, TIME_BUDGET) and backends/, among them backends/mlx_ops.py (fast attention,
which an experiment may replace by its own code) and backends/run.py (the budget, the faults,
the final evaluation and the record).

    uv run train_mlx.py                               # or AUTORESEARCH_BACKEND=mlx uv run train.py
    AUTORESEARCH_PROFILE=smoke AUTORESEARCH_TIME_BUDGET=10 uv run train_mlx.py   # a quick try
    uv run mlx.launch -n 2 --python .venv/bin/python train_mlx.py   # data parallel: 2 processes
"""

import time
from dataclasses import dataclass

import numpy as np

import backends
from backends import distributed
from backends.run import exit_with_error

try:
    BACKEND = backends.detect_mlx_backend()  # this script runs MLX only; is it usable here?
    PROFILE = backends.current_profile()
    import prepare  # reads AUTORESEARCH_TIME_BUDGET, which may be malformed
except (backends.BackendUnavailable, ValueError) as error:
    exit_with_error(error)

import mlx.core as mx  # noqa: E402  (imported only once MLX is known to be usable)
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from backends import mlx_ops  # noqa: E402
from backends.muon_mlx import MuonAdamW  # noqa: E402
from backends.optim import param_groups  # noqa: E402
from backends.run import DataWait, TrainingRun, exit_if_model_cannot_fit, require_constant, run_main  # noqa: E402
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
WARMUP_RATIO = 0.0    # learning rate rises linearly from 0 over this first part
WARMDOWN_RATIO = 0.5  # ... and falls linearly to FINAL_LR_FRAC over this last part
FINAL_LR_FRAC = 0.0   # the learning rate at the end, as a fraction of the peak
MUON_MOMENTUM_START, MUON_MOMENTUM_END, MUON_MOMENTUM_RAMP_STEPS = 0.85, 0.95, 300  # linear, by step
# Loop
UNTIMED_STEPS = 2  # the first steps (compilation, allocator warm-up) train but are not timed

# Device, precision and compilation: parameters stay fp32; the forward pass computes in DTYPE,
# and Muon orthogonalises in it.
DTYPE = {"bf16": mx.bfloat16, "fp32": mx.float32}[COMPUTE_DTYPE]
COMPILE = True  # mx.compile traces in well under a second, so even smoke runs use it

# ---------------------------------------------------------------------------------------------
# Model

ROPE_BASE = 10000.0     # rotary embeddings: channel pair i turns at ROPE_BASE ** (-2i / head_dim)
SOFTCAP = 15.0          # logits are capped smoothly to (-SOFTCAP, SOFTCAP)
NORM_EPS = 1e-6         # RMSNorm's epsilon
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

    def __call__(self, x, ve, window):
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
        y = mlx_ops.attention(q, k, v, window)
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

    def __call__(self, x, x0, resid_lambda, x0_lambda, ve, window):
        # Mix in the embedding x0 first: inside the block, as in train.py (where that helps compile).
        x = resid_lambda.astype(x.dtype) * x + x0_lambda.astype(x.dtype) * x0
        x = x + self.attn(norm(x), ve, window)
        return x + self.mlp(norm(x))


class SoftcapCrossEntropy(nn.Module):
    """The tail of the model: logits in fp32, capped smoothly to (-SOFTCAP, SOFTCAP); with
    targets, their cross-entropy instead (a scalar for reduction='mean', per-token nats [B, T]
    for 'none'). train.py computes the same loss with backends.torch_ops' chunked kernel."""

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
        # Embeddings come out in fp32; cast so the whole residual stream is in the compute dtype.
        x = self.transformer["wte"](idx).astype(self.compute_dtype)
        x = norm(x)
        x0 = x
        for i, block in enumerate(self.transformer["h"]):
            ve = self.value_embeds[str(i)](idx).astype(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, self.window_sizes[i])
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


# ---------------------------------------------------------------------------------------------
# Training run (backends/run.py: the budget, the progress line, the evaluation and the record)

def check_constants():
    """One line and exit 2 for a constant the model or the batch cannot be built from."""
    for name in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "SEQ_LEN", "DEVICE_BATCH_SIZE",
                 "TOTAL_BATCH_SIZE", "EVAL_BATCH_SIZE"):
        value = globals()[name]
        require_constant(name, value, "a whole number, 1 or more", type(value) is int and value >= 1)
    require_constant("HEAD_DIM", HEAD_DIM, "even (rotary embeddings turn pairs of channels)",
                     HEAD_DIM % 2 == 0)
    require_constant("WINDOW_PATTERN", WINDOW_PATTERN, 'a non-empty string of "S" and "L"',
                     isinstance(WINDOW_PATTERN, str) and set(WINDOW_PATTERN.upper()) in ({"S"}, {"L"}, {"S", "L"}))
    per_micro_step = DEVICE_BATCH_SIZE * SEQ_LEN * WORLD_SIZE  # over all ranks
    require_constant("TOTAL_BATCH_SIZE", TOTAL_BATCH_SIZE, f"a multiple of DEVICE_BATCH_SIZE * SEQ_LEN "
                     f"* ranks = {per_micro_step}", TOTAL_BATCH_SIZE % per_micro_step == 0)
    return TOTAL_BATCH_SIZE // per_micro_step


def parameter_count(config):
    """Parameters of GPT(config): until mx.eval they have shapes but no memory."""
    return sum(p.size for _, p in tree_flatten(GPT(config).parameters()))


def build_optimizer(model, config):
    named_params = dict(tree_flatten(model.trainable_parameters()))
    groups = param_groups({name: tuple(p.shape) for name, p in named_params.items()}, config.n_embd,
                          matrix_lr=MATRIX_LR, embedding_lr=EMBEDDING_LR,
                          unembedding_lr=UNEMBEDDING_LR, scalar_lr=SCALAR_LR,
                          weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, ns_steps=NS_STEPS)
    for group in groups:
        group["initial_weight_decay"] = group["weight_decay"]
    optimizer = MuonAdamW(groups, orth_dtype=DTYPE)
    optimizer.init(model.trainable_parameters())
    return optimizer


def main():
    grad_accum_steps = check_constants()
    run = TrainingRun(BACKEND, RANK, WORLD_SIZE, time_budget=TIME_BUDGET, untimed_steps=UNTIMED_STEPS,
                      total_batch_size=TOTAL_BATCH_SIZE, group=GROUP)
    backends.keep_freed_memory()  # reuse freed activations instead of page-faulting them back in

    tokenizer = prepare.get_tokenizer()
    distributed.check_same_run_mlx(__file__, prepare.active_dataset(), GROUP)
    config = build_config(tokenizer.get_vocab_size())
    mx.random.seed(42)
    model = GPT(config, compute_dtype=DTYPE)
    # Before mx.eval allocates the parameters: MLX cannot raise when an allocation fails under a
    # hard limit (ulimit -v), it crashes.
    exit_if_model_cannot_fit(BACKEND, sum(p.size for _, p in tree_flatten(model.parameters())), RANK)
    mx.eval(model.parameters())
    distributed.broadcast_mlx_parameters(model, GROUP)
    optimizer = build_optimizer(model, config)

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

    run.start(chip=HARDWARE["chip"], precision=PRECISION, compute_dtype=COMPUTE_DTYPE, compile=COMPILE,
              profile=PROFILE, peak_flops=PEAK_FLOPS * WORLD_SIZE, peak_source=PEAK_SOURCE,
              engine="mx.distributed",
              model_line=f"{DEPTH} layers, dim {config.n_embd}, {config.n_head} heads, windows "
                         f"{list(model.window_sizes)}",
              num_params=sum(p.size for _, p in tree_flatten(model.parameters())),
              flops_per_token=model.num_flops_per_token(SEQ_LEN), depth=DEPTH,
              grad_accum_steps=grad_accum_steps, device_batch_size=DEVICE_BATCH_SIZE, seq_len=SEQ_LEN)

    x, y = next_batch()
    data_wait = DataWait("mlx")  # mx.eval() has waited for the device: host time is its wait too
    step = 0
    while True:
        backends.sync(BACKEND)
        step_start = time.perf_counter()
        grads = None
        loss_sum = mx.array(0.0)
        for _ in range(grad_accum_steps):
            loss, micro_grads = micro_step(x, y)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss_sum = loss_sum + loss
            mx.eval(loss_sum, grads)  # one micro-batch's activations in memory at a time
            data_wait.mark()
            x, y = next_batch()
            data_wait.mark()
        progress = run.progress
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
        run.end_step(step, train_loss, time.perf_counter() - step_start, data_wait.seconds(), lrm)
        step += 1
        if run.budget_spent(step):
            break
    run.end_training()
    if RANK != 0:
        return  # the other ranks' work is done: rank 0 alone evaluates and reports

    # Final evaluation: the model gives logits for the validation inputs, without gradients;
    # each batch is evaluated and its buffers released, so memory stays one batch's forward.
    def logits(inputs):
        return model(mx.array(inputs.astype(np.int32)))

    run.finish(logits, tokenizer, EVAL_BATCH_SIZE)


if __name__ == "__main__":
    run_main(main, BACKEND, RANK, WORLD_SIZE,
             lambda: parameter_count(build_config(prepare.get_tokenizer().get_vocab_size())))
