"""
Pretrain a small GPT for a fixed time budget with PyTorch (CUDA, MPS or CPU) and report val_bpb.

This is one of the two files the agent edits. train_mlx.py is its MLX twin: the same model, the
same loop, section by section under the same names, so that `diff train.py train_mlx.py` shows
only what the frameworks force. Anything here is fair game: the constants, the model, the
optimizer set-up, the schedules, the loop. Locked (see program.md): prepare.py (data, tokenizer,
the evaluation, TIME_BUDGET) and backends/, among them backends/torch_ops.py (fast attention and
loss, which an experiment may replace by its own code) and backends/run.py (the budget, the
faults, the final evaluation and the record).

    uv run train.py                                   # backend from backends.detect_backend()
    AUTORESEARCH_BACKEND=cpu uv run train.py          # or mps, cuda; mlx runs train_mlx.py
    AUTORESEARCH_PROFILE=smoke AUTORESEARCH_TIME_BUDGET=10 uv run train.py   # a quick try
    uv run torchrun --nproc_per_node 2 train.py       # data parallel: 2 processes (GPUs or cores)
"""

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import backends
from backends import distributed
from backends.run import exit_with_error

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

from backends import torch_ops  # noqa: E402
from backends.muon_torch import MuonAdamW  # noqa: E402
from backends.optim import param_groups  # noqa: E402
from backends.run import DataWait, TrainingRun, exit_if_model_cannot_fit, require_constant, run_main  # noqa: E402
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
WARMUP_RATIO = 0.0    # learning rate rises linearly from 0 over this first part
WARMDOWN_RATIO = 0.5  # ... and falls linearly to FINAL_LR_FRAC over this last part
FINAL_LR_FRAC = 0.0   # the learning rate at the end, as a fraction of the peak
MUON_MOMENTUM_START, MUON_MOMENTUM_END, MUON_MOMENTUM_RAMP_STEPS = 0.85, 0.95, 300  # linear, by step
# Loop
UNTIMED_STEPS = 2  # the first steps (compilation, allocator warm-up) train but are not timed

# Device, precision and compilation: parameters stay fp32; in bf16 the forward pass runs under
# autocast, and Muon orthogonalises in DTYPE either way.
DEVICE = torch.device(BACKEND if BACKEND in ("cuda", "mps") else "cpu")
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[COMPUTE_DTYPE]
COMPILE = BACKEND in ("cuda", "cpu") and PROFILE != "smoke"  # smoke: compiling costs more than it saves
EVAL_EAGER = BACKEND == "cpu"  # a CPU evaluates as fast eager, without compiling inference graphs

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
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


class StreamNorm(nn.Module):
    """norm() of the residual stream outside the blocks (after the embedding, before lm_head) as a
    module, so that main() compiles it like the blocks (eager, it is a measurably slower step)."""

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

    def forward(self, x, ve, cos, sin, window):
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
        y = torch_ops.attention(q, k, v, window)
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

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos, sin, window):
        # Mix in the embedding x0 first: inside the block, so torch.compile fuses it too.
        x = resid_lambda.to(x.dtype) * x + x0_lambda.to(x.dtype) * x0
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


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
        self.loss = torch_ops.SoftcapLinearCrossEntropy(SOFTCAP)
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
        # and shares their compiled graph (an aliased input is a compiled graph of its own).
        x0 = x.clone()
        cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin, self.window_sizes[i])
        x = self.stream_norm(x)
        if targets is None:
            return SOFTCAP * torch.tanh(self.lm_head(x).float() / SOFTCAP)
        loss = self.loss(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), reduction)
        return loss if reduction == "mean" else loss.view(idx.shape)

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
    """Parameters of GPT(config), counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def build_optimizer(model, config):
    named_params = dict(model.named_parameters())
    groups = param_groups({name: tuple(p.shape) for name, p in named_params.items()}, config.n_embd,
                          matrix_lr=MATRIX_LR, embedding_lr=EMBEDDING_LR,
                          unembedding_lr=UNEMBEDDING_LR, scalar_lr=SCALAR_LR,
                          weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, ns_steps=NS_STEPS)
    for group in groups:
        group["initial_weight_decay"] = group["weight_decay"]
    return MuonAdamW(named_params, groups, orth_dtype=DTYPE)


def main():
    grad_accum_steps = check_constants()
    run = TrainingRun(BACKEND, RANK, WORLD_SIZE, time_budget=TIME_BUDGET, untimed_steps=UNTIMED_STEPS,
                      total_batch_size=TOTAL_BATCH_SIZE, device=DEVICE)
    backends.keep_freed_memory()  # reuse freed activations instead of page-faulting them back in
    distributed.init_torch(BACKEND, RANKS)
    torch.manual_seed(42)
    if BACKEND == "cuda":
        torch.set_float32_matmul_precision("high")
    autocast = torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16,
                              enabled=COMPUTE_DTYPE == "bf16")

    tokenizer = prepare.get_tokenizer()
    distributed.check_same_run_torch(__file__, prepare.active_dataset(), DEVICE)
    config = build_config(tokenizer.get_vocab_size())
    exit_if_model_cannot_fit(BACKEND, parameter_count(config), RANK)
    peak_flops, peak_source = PEAK_FLOPS, PEAK_SOURCE
    if BACKEND == "cpu":
        if WORLD_SIZE == 1:
            # At tiny shapes one thread beats two (they wait on each other more than they compute).
            torch.set_num_threads(backends.fastest_cpu_threads(DEVICE_BATCH_SIZE * SEQ_LEN,
                                                               config.n_embd, COMPUTE_DTYPE))
        # The peak at the threads this process trains on (torchrun's ranks divide the cores).
        peak_flops, peak_source = backends.peak_flops_and_source(HARDWARE, BACKEND, dtype=COMPUTE_DTYPE)
    model = GPT(config).to(DEVICE)
    distributed.broadcast_torch_parameters(model)
    optimizer = build_optimizer(model, config)
    if COMPILE:
        # Regional compilation: the blocks (which share compiled graphs), the stream norm and the
        # loss, each on its own. A GPU's final evaluation runs through them too (see EVAL_EAGER).
        for module in [*model.transformer.h, model.stream_norm, model.loss]:
            module.compile(dynamic=False)

    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train",
                                           rank=RANK, world_size=WORLD_SIZE)

    def next_batch():
        inputs, targets, _ = next(train_loader)
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        if DEVICE.type == "cuda":
            # From pinned memory the copy is queued behind the step's kernels instead of waiting
            # for them on the host.
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(DEVICE, non_blocking=True), targets.to(DEVICE, non_blocking=True)

    run.start(chip=HARDWARE["chip"], precision=PRECISION, compute_dtype=COMPUTE_DTYPE, compile=COMPILE,
              profile=PROFILE, peak_flops=peak_flops * WORLD_SIZE, peak_source=peak_source,
              engine=f"torch.distributed over {dist.get_backend()}" if WORLD_SIZE > 1 else None,
              model_line=f"{DEPTH} layers, dim {config.n_embd}, {config.n_head} heads, windows "
                         f"{list(model.window_sizes)}",
              num_params=sum(p.numel() for p in model.parameters()),
              flops_per_token=model.num_flops_per_token(SEQ_LEN), depth=DEPTH,
              grad_accum_steps=grad_accum_steps, device_batch_size=DEVICE_BATCH_SIZE, seq_len=SEQ_LEN)

    x, y = next_batch()
    data_wait = DataWait(DEVICE.type)
    step = 0
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
        progress = run.progress
        lrm = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(progress)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = loss_sum.item() / grad_accum_steps  # .item() waits for the step to finish
        run.end_step(step, train_loss, time.perf_counter() - step_start, data_wait.seconds(), lrm)
        step += 1
        if run.budget_spent(step):
            break
    run.end_training()
    distributed.finish_torch()
    if RANK != 0:
        return  # the other ranks' work is done: rank 0 alone evaluates and reports

    # Final evaluation: the model gives logits for the validation inputs, without autograd.
    model.eval()

    def logits(inputs):
        with autocast:
            return model(torch.from_numpy(inputs).to(DEVICE))

    # The stance concerns compiled modules only, and setting it loads torch's compiler (seconds).
    stance = (torch.compiler.set_stance("force_eager" if EVAL_EAGER else "default") if COMPILE
              else contextlib.nullcontext())
    with torch.inference_mode(), stance:
        run.finish(logits, tokenizer, EVAL_BATCH_SIZE)


if __name__ == "__main__":
    run_main(main, BACKEND, RANK, WORLD_SIZE,
             lambda: parameter_count(build_config(prepare.get_tokenizer().get_vocab_size())))
