"""The machine's own speed, apart from the code's: a short fixed probe a run takes before training,
every PROBE_EVERY_SECONDS of timed training and after it, so the keep rule can take the machine out
of the noise (tools/verdict.py).

The probe does the same work on the same shapes in every run of every commit, whatever the training
script does, so its rate moves only when the machine does: another tenant on the host, a clock
that changed, a GPU that throttles. It times a float32 matmul (compute) and a large array copy
(memory bandwidth), the two things a training step waits on, and keeps the median of PROBE_REPEATS
timings of each. The work is fixed (no growing the matrix until it takes long enough, as the peak
calibration in backends/flops.py does): a different amount of work would be a different probe. One
probe costs about 0.06 s on a 2-core CPU; the run's clock does not count it (it runs between steps).

Why many short probes rather than a few long ones: between training steps a probe's readings move
by 10% and more within one run as the host's other tenants come and go (alone on an idle VM they
repeat to about 1%), and the run's speed is an average over the run, so what limits it is how often
the probe samples the host. A probe that lands on a moment of other work reads half the speed while
300 s of training hardly notice it, so the run's speed leaves out the highest and lowest PROBE_TRIM
of its probes. What this bought, measured: docs/measurements.md (2026-12-06).

    measure(device="cpu") -> {
        "matmul_gflops":   float32 matmul rate, GFLOP/s (MATMUL_SIZE[device] square, MATMULS_PER_TIMING a timing)
        "memory_gb_per_s": bytes read plus written per second by COPIES_PER_TIMING copies of COPY_MB[device] MB
        "speed_index":     sqrt(matmul_gflops * memory_gb_per_s): the machine's speed as one number
        "probe_seconds":   the probe's own wall time, warm-up included
        "device":          what was measured (below)
    }
    summarize(probes) -> {               the run's record from its probes in order (None: one failed)
        "machine_speed":          the run's machine speed: geometric mean of the speed indexes, less
                                  the PROBE_TRIM share of them at each end
        "machine_speed_change":   last / first - 1 (the host moved during the run)
        "machine_speed_probes":   every probe's speed index, in order
        "probe_matmul_gflops", "probe_memory_gb_per_s": the run's two rates, trimmed as machine_speed
                                  is; the verdict corrects for each apart (tools/verdict.py)
        "probe_matmul_series", "probe_memory_series": every probe's two rates, in order
        "probe_seconds":          the probes' cost together
    }

Devices: "cpu" is torch on the CPU, with the threads a torch run trains on (numpy's BLAS brings a
thread pool of its own: over six probes beside compiled training its matmul read 130-197 GFLOP/s,
torch's 193-198); "numpy" is numpy on the CPU, for MLX runs on a CPU (MLX's CPU matmul is too slow
a probe on Linux); "cuda" and "mps" are torch on that device and "mlx" MLX's default device (a Mac's GPU),
synchronized around every timing. Only ratios of speed indexes between runs of one kind mean
anything: the verdict regresses val_bpb on log(machine_speed), so the unit cancels.
"""

import math
import statistics
import time

PROBE_REPEATS = 5                       # timings per operation; their median is the rate
MATMULS_PER_TIMING = 4                  # products in one timing, so a timing is not a single call
COPIES_PER_TIMING = 4                   # copies in one timing: one alone lasts about a millisecond
PROBE_EVERY_SECONDS = 10                # of timed training between two probes (backends/run.py)
PROBE_TRIM = 0.1                        # share of a run's probes left out at each end of their range
# Fixed shapes per device: the probe's work never changes. A Mac's GPU gets a smaller product
# than a CUDA one so that a probe stays near 0.1 s on the smallest of them.
MATMUL_SIZE = {"cpu": 512, "numpy": 512, "cuda": 4096, "mps": 2048, "mlx": 2048}
COPY_MB = {"cpu": 32, "numpy": 32, "cuda": 256, "mps": 128, "mlx": 128}  # past any last-level cache: the copy hits memory


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
        for _ in range(COPIES_PER_TIMING):
            copy()
        synchronize()
        copy_seconds.append(time.perf_counter() - started)
    flops = 2 * size ** 3 * MATMULS_PER_TIMING
    moved = 2 * copy_bytes * COPIES_PER_TIMING  # each byte is read once and written once
    return flops / statistics.median(matmul_seconds) / 1e9, moved / statistics.median(copy_seconds) / 1e9


def _numpy_rates():
    import numpy as np
    size, count = MATMUL_SIZE["numpy"], COPY_MB["numpy"] * 2 ** 20 // 4
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    product = np.empty((size, size), dtype=np.float32)
    source, target = np.ones(count, dtype=np.float32), np.empty(count, dtype=np.float32)
    return _rates(lambda: np.matmul(a, b, out=product), lambda: np.copyto(target, source),
                        lambda: None, size, count * 4)


def _torch_rates(device):
    import torch
    size, count = MATMUL_SIZE[device], COPY_MB[device] * 2 ** 20 // 4
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    product = torch.empty(size, size, device=device)
    source, target = torch.ones(count, device=device), torch.empty(count, device=device)
    synchronize = {"cpu": lambda: None, "cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}[device]
    return _rates(lambda: torch.matmul(a, b, out=product), lambda: target.copy_(source),
                        synchronize, size, count * 4)


def _mlx_rates():
    import mlx.core as mx
    size, count = MATMUL_SIZE["mlx"], COPY_MB["mlx"] * 2 ** 20 // 4
    key = mx.random.key(0)
    a, b = mx.random.normal((size, size), key=key), mx.random.normal((size, size), key=mx.random.split(key)[0])
    source = mx.ones((count,))
    results = []
    # MLX is lazy: each call builds the result and mx.eval runs it, so "synchronize" is the eval.
    return _rates(lambda: results.append(a @ b), lambda: results.append(source + 0),
                  lambda: (mx.eval(results), results.clear()), size, count * 4)


def measure(device="cpu"):
    """Probe the machine's speed now; see the module's docstring for the keys."""
    if device not in MATMUL_SIZE:
        raise ValueError(f"machine speed probe: unknown device {device!r}; use cpu, numpy, cuda, mps or mlx")
    started = time.perf_counter()
    rates = {"numpy": _numpy_rates, "mlx": _mlx_rates}
    gflops, gb_per_s = rates[device]() if device in rates else _torch_rates(device)
    return {"matmul_gflops": round(gflops, 3), "memory_gb_per_s": round(gb_per_s, 3),
            "speed_index": round(speed_index(gflops, gb_per_s), 4),
            "probe_seconds": round(time.perf_counter() - started, 4), "device": device}


def speed_index(matmul_gflops, memory_gb_per_s):
    """One number for the machine's speed: the geometric mean of its compute and memory rates, so a
    host that lost 10% of either loses about 5% of the index, and one that lost 10% of both, 10%."""
    return math.sqrt(matmul_gflops * memory_gb_per_s)


def summarize(probes):
    """The run's record from its probes in order (see the module's docstring). A probe that failed
    is None and is left out; no probe at all gives None."""
    done = [p for p in probes if p]
    if not done:
        return None
    indexes = [p["speed_index"] for p in done]
    return {"machine_speed": round(trimmed_geometric_mean(indexes), 4),
            "machine_speed_change": round(indexes[-1] / indexes[0] - 1, 4),
            "machine_speed_probes": indexes,
            "probe_matmul_gflops": round(trimmed_geometric_mean([p["matmul_gflops"] for p in done]), 3),
            "probe_memory_gb_per_s": round(trimmed_geometric_mean([p["memory_gb_per_s"] for p in done]), 3),
            "probe_matmul_series": [p["matmul_gflops"] for p in done],
            "probe_memory_series": [p["memory_gb_per_s"] for p in done],
            "probe_seconds": round(sum(p["probe_seconds"] for p in done), 3)}


def trimmed_geometric_mean(values):
    """The geometric mean of values less the PROBE_TRIM share of them at each end of their range."""
    cut = int(PROBE_TRIM * len(values))
    kept = sorted(values)[cut:len(values) - cut]
    return math.exp(sum(math.log(v) for v in kept) / len(kept))
