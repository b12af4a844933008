"""The machine's own speed, apart from the code's: a short fixed probe the run takes before and after
training, so the keep rule can take the machine out of the noise (tools/verdict.py).

The probe does the same work on the same shapes in every run of every commit, whatever the training
script does, so its rate moves only when the machine does: another tenant on the host, a clock
that changed, a GPU that throttles. It times a float32 matmul (compute) and a large array copy
(memory bandwidth), the two things a training step waits on, and keeps the median of PROBE_REPEATS
timings of each. The work is fixed (no growing the matrix until it takes long enough, as the peak
calibration in backends/flops.py does): a different amount of work would be a different probe. It
costs about 0.1-0.3 s on a CPU, under 0.2% of a 300 s budget before and after together.

    measure(device="cpu") -> {
        "matmul_gflops":   float32 matmul rate, GFLOP/s (MATMUL_SIZE[kind] square, MATMULS_PER_TIMING a timing)
        "memory_gb_per_s": bytes read plus written per second by a copy of COPY_MB[kind] MB
        "speed_index":     sqrt(matmul_gflops * memory_gb_per_s): the machine's speed as one number
        "probe_seconds":   the probe's own wall time, warm-up included
        "device":          "cpu", "cuda" or "mps": what was measured
    }
    combine(before, after) -> {
        "machine_speed":        geometric mean of the two speed indexes: the run's machine speed
        "machine_speed_change": after / before - 1 (the host moved during the run)
        "machine_speed_before", "machine_speed_after": the two measure() dicts
    }

On "cpu" the probe uses numpy, whatever the backend, so MLX and torch runs of one machine read the
same probe; on "cuda" and "mps" it uses torch on that device (imported only then), synchronized
around every timing. Only ratios of speed indexes between runs of one kind mean anything: the
verdict regresses val_bpb on log(machine_speed), so the unit cancels.
"""

import math
import statistics
import time

PROBE_REPEATS = 5                       # timings per operation; their median is the rate
MATMULS_PER_TIMING = 4                  # products in one timing, so a timing is not a single call
MATMUL_SIZE = {"cpu": 512, "gpu": 4096}  # fixed shapes: the probe's work never changes
COPY_MB = {"cpu": 32, "gpu": 256}        # larger than any last-level cache, so the copy hits memory


def _rates(matmul, copy, synchronize, size, copy_bytes):
    """(GFLOP/s, GB/s): the medians of PROBE_REPEATS timings after one untimed warm-up of each."""
    matmul()
    copy()
    synchronize()
    matmul_seconds, copy_seconds = [], []
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        for _ in range(MATMULS_PER_TIMING):
            matmul()
        synchronize()
        matmul_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        copy()
        synchronize()
        copy_seconds.append(time.perf_counter() - started)
    flops = 2 * size ** 3 * MATMULS_PER_TIMING
    return (flops / statistics.median(matmul_seconds) / 1e9,
            2 * copy_bytes / statistics.median(copy_seconds) / 1e9)  # each byte is read once, written once


def _numpy_rates():
    import numpy as np
    size, count = MATMUL_SIZE["cpu"], COPY_MB["cpu"] * 2 ** 20 // 4
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    product = np.empty((size, size), dtype=np.float32)
    source, target = np.ones(count, dtype=np.float32), np.empty(count, dtype=np.float32)
    return _rates(lambda: np.matmul(a, b, out=product), lambda: np.copyto(target, source),
                        lambda: None, size, count * 4)


def _torch_rates(device):
    import torch
    size, count = MATMUL_SIZE["gpu"], COPY_MB["gpu"] * 2 ** 20 // 4
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    product = torch.empty(size, size, device=device)
    source, target = torch.ones(count, device=device), torch.empty(count, device=device)
    synchronize = torch.cuda.synchronize if device == "cuda" else torch.mps.synchronize
    return _rates(lambda: torch.matmul(a, b, out=product), lambda: target.copy_(source),
                        synchronize, size, count * 4)


def measure(device="cpu"):
    """Probe the machine's speed now; see the module's docstring for the keys."""
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"machine speed probe: unknown device {device!r}; use cpu, cuda or mps")
    started = time.perf_counter()
    gflops, gb_per_s = _numpy_rates() if device == "cpu" else _torch_rates(device)
    return {"matmul_gflops": round(gflops, 3), "memory_gb_per_s": round(gb_per_s, 3),
            "speed_index": round(speed_index(gflops, gb_per_s), 4),
            "probe_seconds": round(time.perf_counter() - started, 4), "device": device}


def speed_index(matmul_gflops, memory_gb_per_s):
    """One number for the machine's speed: the geometric mean of its compute and memory rates, so a
    host that lost 10% of either loses about 5% of the index, and one that lost 10% of both, 10%."""
    return math.sqrt(matmul_gflops * memory_gb_per_s)


def combine(before, after):
    """The run's record from the probes before and after training (see the module's docstring).
    Either may be None (a probe that failed): the other one stands alone; both None gives None."""
    indexes = [p["speed_index"] for p in (before, after) if p]
    if not indexes:
        return None
    speed = math.exp(sum(math.log(i) for i in indexes) / len(indexes))
    change = after["speed_index"] / before["speed_index"] - 1 if before and after else None
    return {"machine_speed": round(speed, 4),
            "machine_speed_change": None if change is None else round(change, 4),
            "machine_speed_before": before, "machine_speed_after": after}
