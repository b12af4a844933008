"""Default training configuration per hardware tier: the starting point both scripts read.

A tier is a class of machine that shares one configuration (model size, batches, evaluation
budget). The values come from published runs (cited per table), except the CPU tier's, which come
from sweeps on 2-core machines (tools/sweep_cpu.py) at several measured throughputs: its batch
follows the measured matmul peak of the dtype that trains (CPU_TIER_BY_FLOPS, docs/cpu-tier.md).
AUTORESEARCH_PROFILE=smoke replaces everything with a tiny configuration that trains and evaluates
in seconds (tests, quick tries).
"""

import os

from backends.gpu_specs import nvidia_gpu_flops
from backends.hardware import detect_backend

MAX_SEQ_LEN = 2048  # = prepare.MAX_SEQ_LEN; evaluation reads rows of this length (prepare imports us)
PROFILE_ENV = "AUTORESEARCH_PROFILE"
PROFILES = ("standard", "smoke")
KEYS = ("tier", "depth", "aspect_ratio", "head_dim", "seq_len", "window_pattern", "device_batch_size",
        "total_batch_size", "eval_tokens", "eval_batch_size")

# Tiny: model dim 64 (2 x 32), two heads, two optimizer micro-steps, four evaluation rows.
SMOKE = dict(tier="smoke", depth=2, aspect_ratio=32, head_dim=32, seq_len=128, window_pattern="SL",
             device_batch_size=2, total_batch_size=512, eval_tokens=4 * MAX_SEQ_LEN, eval_batch_size=2)

# NVIDIA. H100-class is upstream autoresearch's train.py/prepare.py defaults, tuned on one H100:
# DEPTH=8, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL", TOTAL_BATCH_SIZE=2**19,
# DEVICE_BATCH_SIZE=128, EVAL_TOKENS=40*2**19 (=20,971,520, about 30 s of evaluation).
NVIDIA_H100 = dict(tier="nvidia-h100", depth=8, aspect_ratio=64, head_dim=128, seq_len=2048,
                   window_pattern="SSSL", device_batch_size=128, total_batch_size=2**19,
                   eval_tokens=40 * 2**19, eval_batch_size=128)
H100_CLASS_FLOPS = 600e12  # H100 PCIe (756 TFLOPS) and up; the A100 (312) is well below
# Smaller NVIDIA GPUs (A100, L40S, RTX 3090/4090/5090, A10, L4): nobody has published a tuned
# configuration, so this follows what every smaller machine in the overnight runs converged to
# (DEPTH=4 beat 8; smaller total batches beat 2**17) and the MLX port's 2**16 batch, with a quarter
# of the H100 evaluation budget. Device batch is halved again below 20 GB of GPU memory.
NVIDIA_SMALL = dict(tier="nvidia", depth=4, aspect_ratio=64, head_dim=128, seq_len=2048,
                    window_pattern="SSSL", device_batch_size=32, total_batch_size=2**16,
                    eval_tokens=10 * 2**19, eval_batch_size=32)

# Apple Silicon (MLX or MPS). The MLX port (trevin-creator/autoresearch-mlx) used DEPTH=4,
# TOTAL_BATCH_SIZE=2**16, DEVICE_BATCH_SIZE=16 and EVAL_TOKENS=1,572,864 (~52 s of evaluation);
# its overnight agent runs then found DEPTH=4 and TOTAL_BATCH_SIZE=2**14 best on both an M4 Max and
# a Mac Mini. Evaluation shrinks with the GPU so it stays under a minute on the smaller chips; an
# Ultra (two Max dies) doubles the batch (extrapolated, not measured). Machines with 8 GB or less
# halve the device and eval batches (same tokens, more micro-steps).
APPLE_TIERS = {
    "base": dict(tier="apple-base", depth=4, aspect_ratio=64, head_dim=128, seq_len=2048,
                 window_pattern="SSSL", device_batch_size=8, total_batch_size=2**14,
                 eval_tokens=192 * MAX_SEQ_LEN, eval_batch_size=8),
    "Pro": dict(tier="apple-pro", depth=4, aspect_ratio=64, head_dim=128, seq_len=2048,
                window_pattern="SSSL", device_batch_size=8, total_batch_size=2**14,
                eval_tokens=384 * MAX_SEQ_LEN, eval_batch_size=16),
    "Max": dict(tier="apple-max", depth=4, aspect_ratio=64, head_dim=128, seq_len=2048,
                window_pattern="SSSL", device_batch_size=8, total_batch_size=2**14,
                eval_tokens=768 * MAX_SEQ_LEN, eval_batch_size=16),
    "Ultra": dict(tier="apple-ultra", depth=4, aspect_ratio=64, head_dim=128, seq_len=2048,
                  window_pattern="SSSL", device_batch_size=16, total_batch_size=2**15,
                  eval_tokens=768 * MAX_SEQ_LEN, eval_batch_size=32),
}
# A tier name Apple has not used yet is placed by GPU cores: at least this many -> that tier.
APPLE_TIER_BY_GPU_CORES = ((60, "Ultra"), (30, "Max"), (14, "Pro"), (0, "base"))

# CPU (torch CPU, and MLX's CPU build on Linux): the winner of tools/sweep_cpu.py (results in
# tools/sweep_cpu_results.tsv, docs/measurements.md) at the fastest CPU measured, a 2-vCPU Intel
# Xeon with AMX in bf16 (1.52 TFLOP/s, pystdlib, 300 s): depth 2 / dim 192 tied dim 128 and beat
# depths 3, 4 and 6: in 300 s on two cores, more steps beat a bigger model. Heads of 64,
# rows of 512 (short rows keep attention a small share of each step) and the window "L" (a banded
# mask saves nothing without a windowed kernel). The evaluation reads 32 rows of 2048, a few
# seconds, so start-up + eval stay within 15% of 300 s.
CPU_TIER = dict(tier="cpu", depth=2, aspect_ratio=96, head_dim=64, seq_len=512, window_pattern="L",
                device_batch_size=32, total_batch_size=2**14, eval_tokens=32 * MAX_SEQ_LEN,
                eval_batch_size=8)

# The CPU tier's batch by the measured matmul peak of the dtype that trains, at the threads it
# trains on: (at least this many FLOP/s, what differs from CPU_TIER), largest first, fitted to the
# same sweep (docs/cpu-tier.md). At 1.52 TFLOP/s 16,384 tokens a step won; at 0.38 and 0.195,
# 8,192: fewer steps a second want smaller ones. The threshold is the geometric mean of the two
# measured peaks where the winner changes (0.38 and 1.52).
CPU_TIER_BY_FLOPS = (
    (0.76e12, dict()),
    (0.0, dict(device_batch_size=16, total_batch_size=2**13)),
)


def current_profile():
    """$AUTORESEARCH_PROFILE: "standard" (default) or "smoke"; anything else raises ValueError."""
    raw = os.environ.get(PROFILE_ENV, "")
    name = raw.strip().lower() or "standard"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={raw!r} is not a profile; set it to smoke or standard, or unset it")
    return name


def _halve_batches(config):
    return {**config, "device_batch_size": max(1, config["device_batch_size"] // 2),
            "eval_batch_size": max(1, config["eval_batch_size"] // 2)}


def apple_tier(info):
    """APPLE_TIERS key for an Apple chip: its tier name if known, else placed by GPU core count."""
    if info.get("tier") in APPLE_TIERS:
        return info["tier"]
    cores = info.get("gpu_cores") or 0
    return next(tier for threshold, tier in APPLE_TIER_BY_GPU_CORES if cores >= threshold)


def is_h100_class(info):
    """True for GPUs in the H100's league: table peak >= H100_CLASS_FLOPS, or for a GPU missing from
    the table, a Hopper/Blackwell part with at least 70 GB (a data-centre card, not a GeForce)."""
    flops = nvidia_gpu_flops(info.get("gpu_name"))
    if flops is not None:
        return flops >= H100_CLASS_FLOPS
    return info.get("generation") in ("Hopper", "Blackwell") and (info.get("gpu_memory_gb") or 0) >= 70


def cpu_tier(flops):
    """The CPU tier's configuration for a measured matmul peak of `flops` FLOP/s (in the dtype that
    trains): the largest CPU_TIER_BY_FLOPS entry whose threshold it reaches; None: CPU_TIER."""
    if flops is None:
        return dict(CPU_TIER)
    sized = next(size for threshold, size in CPU_TIER_BY_FLOPS if flops >= threshold)
    return {**CPU_TIER, **sized}


def suggest_hyperparameters(info, backend=None, flops=None):
    """Default configuration for this hardware and backend: a dict with KEYS.

    backend defaults to detect_backend(). The CPU tier covers the cpu backend anywhere and MLX off
    Apple Silicon; its batch follows `flops`, the measured peak of the dtype that trains
    (cpu_tier; None: CPU_TIER, the fastest CPU's). AUTORESEARCH_PROFILE=smoke returns SMOKE
    whatever the hardware.
    """
    if current_profile() == "smoke":
        return dict(SMOKE)
    backend = backend or detect_backend()
    if backend in ("mlx", "mps") and info.get("kind") == "apple":
        config = APPLE_TIERS[apple_tier(info)]
        small_memory = (info.get("memory_gb") or 0) <= 8
        return _halve_batches(config) if small_memory else dict(config)
    if backend == "cuda":
        if is_h100_class(info):
            return dict(NVIDIA_H100)
        small_memory = (info.get("gpu_memory_gb") or 0) < 20
        return _halve_batches(NVIDIA_SMALL) if small_memory else dict(NVIDIA_SMALL)
    return cpu_tier(flops)


def eval_tokens(info, backend=None):
    """Tokens the final evaluation reads for this hardware (a multiple of MAX_SEQ_LEN); smoke: 4 rows."""
    return suggest_hyperparameters(info, backend)["eval_tokens"]
