"""Peak dense matmul throughput (FLOP/s) of the device a backend trains on: the denominator of MFU.

GPUs come from tables of published figures (Apple per GPU core, NVIDIA per product). A CPU, or a
GPU missing from the tables, is measured instead: a short bf16 and fp32 matmul benchmark whose
result is cached on disk (AUTORESEARCH_CACHE_DIR or ~/.cache/autoresearch, calibration.json),
keyed by device, library version and thread count.

Other processes sharing the cores can only make a measurement slower, never faster, so the cache
keeps the best of all measurements taken, and a new one can only raise it. Until it holds
CALIBRATION_MEASUREMENTS of them, the peak is measured again (about a second) whenever it is needed
and the last measurement is more than REMEASURE_AFTER_S old: a machine that was busy at the first
measurement is usually idle at one of the next. recalibrate=True measures again now (`uv run
python -m backends --recalibrate`, `uv run tools/bench.py --recalibrate`); forget_calibration()
is the only way to lower the cached peak.
"""

import json
import os
import re
import time
from pathlib import Path

CALIBRATION_FILE = "calibration.json"
CPU_SIZES = (256, 512, 1024, 2048)  # bf16 on 2 cores reaches its peak only at 2048 (~20 ms a product)
GPU_SIZES = (2048, 4096, 8192)
MAX_PRODUCT_S = 0.25  # grow the matrix while the next size (8x the work) should stay under this...
REPEATS = 5           # ...then keep the best of this many timings (other processes share the cores)
# A cached peak is trusted once it is the best of this many measurements at least
# REMEASURE_AFTER_S apart (spread in time, so a busy spell on the machine cannot spoil them all).
CALIBRATION_MEASUREMENTS = 3
REMEASURE_AFTER_S = 600

# Apple GPUs: dense fp16/bf16 FLOP/s per GPU core. M1-M4 cores have 128 FP32 ALUs and run
# fp16/bf16 matmuls at the FP32 rate, so a core does 256 FLOP per clock (one FMA per ALU). Where
# Apple quotes no TFLOPS, that is multiplied by a third-party GPU clock reading (approximate).
APPLE_FLOPS_PER_GPU_CORE = {
    "M1": 0.325e12,  # Apple M1 launch (Nov 2020): 2.6 TFLOPS from 8 GPU cores; M1 Pro/Max: 5.2/10.4 from 16/32
    "M2": 0.358e12,  # 256 FLOP/clock x 1.398 GHz (TechPowerUp GPU database, "Apple M2 GPU"): 3.6 TFLOPS at 10 cores
    "M3": 0.353e12,  # 256 FLOP/clock x 1.38 GHz (TechPowerUp GPU database, "Apple M3 GPU")
    "M4": 0.376e12,  # 256 FLOP/clock x 1.47 GHz (TechPowerUp GPU database, "Apple M4 GPU")
    "M5": 1.505e12,  # Apple M5 announcement (Oct 2025): a Neural Accelerator in every GPU core gives "over 4x
                     # the peak GPU compute for AI" of M4 at the same 10 cores, so 4 x the M4 figure
}
# Only used when system_profiler gave no core count: a common configuration of each tier.
APPLE_TYPICAL_GPU_CORES = {"base": 10, "Pro": 16, "Max": 32, "Ultra": 64}

# NVIDIA: dense (no sparsity) BF16 tensor-core FLOP/s, matched against torch.cuda.get_device_name()
# in order (first match wins). Datasheets quote "with sparsity" figures; dense is half of those.
NVIDIA_BF16_FLOPS = (
    (r"GB200|B200", 2.25e15),    # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity
    (r"H200 NVL", 835e12),       # NVIDIA H200 datasheet: H200 NVL BF16 1,671 TFLOPS with sparsity
    (r"H200", 989e12),           # NVIDIA H200 datasheet (H200 SXM) and GH200 datasheet: 1,979 with sparsity
    (r"H100 NVL", 835e12),       # NVIDIA H100 datasheet: H100 NVL BF16 1,671 TFLOPS with sparsity
    (r"H100 PCIe", 756e12),      # NVIDIA H100 datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity
    (r"H100", 989e12),           # NVIDIA H100 datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity
    (r"A100", 312e12),           # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)
    (r"L40S", 362e12),           # NVIDIA L40S datasheet: BF16 Tensor 362.05 TFLOPS (733 with sparsity)
    (r"L40\b", 181e12),          # NVIDIA L40 datasheet: BF16 Tensor 181.05 TFLOPS (362.1 with sparsity)
    (r"\bL4\b", 121e12),         # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    (r"\bA40\b", 149.7e12),      # NVIDIA A40 datasheet: BF16 Tensor 149.7 TFLOPS (299.4 with sparsity)
    (r"\bA10\b", 125e12),        # NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)
    (r"RTX 5090", 209.5e12),     # NVIDIA RTX Blackwell GPU architecture whitepaper: BF16 FP32-accumulate 209.5
    (r"RTX 4090(?! ?D)", 165.2e12),  # NVIDIA Ada Lovelace GPU architecture whitepaper: BF16 FP32-acc. 165.2
    (r"RTX 3090(?! Ti)", 71e12),     # NVIDIA Ampere GA102 GPU architecture whitepaper: BF16 FP32-acc. 71
    (r"V100", 125e12),           # NVIDIA V100 datasheet: 125 TFLOPS tensor (FP16; Volta has no BF16)
    (r"\bT4\b", 65e12),          # NVIDIA T4 datasheet: 65 TFLOPS mixed precision (FP16; Turing has no BF16)
)


def cache_dir():
    """Cache root: $AUTORESEARCH_CACHE_DIR, else ~/.cache/autoresearch (the same rule as prepare.py)."""
    return Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or Path.home() / ".cache" / "autoresearch")


def apple_gpu_flops(info):
    """(FLOP/s, how) for an Apple GPU from its generation and core count.

    A generation newer than the table uses the newest known per-core rate; an unknown core count
    assumes a common configuration of the tier. Both say so in `how`.
    """
    generation, tier = info.get("generation"), info.get("tier")
    known = sorted(APPLE_FLOPS_PER_GPU_CORE, key=lambda name: int(name[1:]))  # "M10" after "M9"
    rate_from = generation if generation in APPLE_FLOPS_PER_GPU_CORE else known[-1]
    cores = info.get("gpu_cores")
    how = f"table: {cores} GPU cores x {APPLE_FLOPS_PER_GPU_CORE[rate_from] / 1e12:.3f} TFLOP/s per {rate_from} core"
    if cores is None:
        cores = APPLE_TYPICAL_GPU_CORES.get(tier, APPLE_TYPICAL_GPU_CORES["base"])
        how = f"estimated: core count unknown, assumed {cores} ({tier or 'base'} tier), {rate_from} per-core rate"
    elif rate_from != generation:
        how += f" (newest in table; {generation or 'this chip'} is not)"
    return cores * APPLE_FLOPS_PER_GPU_CORE[rate_from], how


def nvidia_gpu_flops(name):
    """Dense BF16 FLOP/s of an NVIDIA GPU from NVIDIA_BF16_FLOPS, or None if the name is not there."""
    for pattern, flops in NVIDIA_BF16_FLOPS:
        if re.search(pattern, name or "", re.IGNORECASE):
            return flops
    return None


# ---------------------------------------------------------------------------
# Measurement

def _seconds(product):
    start = time.perf_counter()
    product()
    return time.perf_counter() - start


def _matmul_rate(make_product, sizes):
    """(FLOP/s, n): the best rate over the sizes tried, each the best of REPEATS timings, and the
    n it was reached at. n grows through `sizes` while doubling it (8x the work) should stay
    under MAX_PRODUCT_S: a fast library reaches the large sizes, a slow one stops early instead
    of taking minutes. The best size is not always the largest: on 2 AVX-512 cores 1024 x 1024
    bf16 products run ~5% faster than 2048 x 2048 ones, which spill out of the caches.

    make_product(n) returns a function that computes one n x n product and waits for it.
    """
    best_rate, best_n = 0.0, None
    for n in sizes:
        product = make_product(n)
        product()  # warm-up: allocation, kernel choice, thread-pool start
        seconds = min(_seconds(product) for _ in range(REPEATS))
        if 2 * n**3 / seconds >= best_rate:
            best_rate, best_n = 2 * n**3 / seconds, n
        if 8 * seconds > MAX_PRODUCT_S:
            break
    return best_rate, best_n


def _torch_products(device):
    import torch

    def products(dtype_name):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]

        def make(n):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)

            def product():
                a @ b
                if device == "cuda":
                    torch.cuda.synchronize()  # kernels are asynchronous: wait before stopping the clock
            return product
        return make
    return products, f"torch {torch.__version__}", torch.get_num_threads()


def _mlx_products():
    import importlib.metadata
    import mlx.core as mx

    def products(dtype_name):
        dtype = {"bf16": mx.bfloat16, "fp32": mx.float32}[dtype_name]

        def make(n):
            a = mx.random.normal((n, n)).astype(dtype)
            b = mx.random.normal((n, n)).astype(dtype)
            mx.eval(a, b)
            return lambda: mx.eval(a @ b)
        return make
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return products, f"mlx {importlib.metadata.version('mlx')}", threads


def _read_cache(path):
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _best_of(stored, new):
    """One new measurement merged into the stored record: the faster of the two dtype by dtype
    (each rate with the matrix size it was timed at), one more in the count."""
    if not stored:
        return new
    best = dict(new, measurements=stored["measurements"] + 1)
    for dtype_name in ("bf16", "fp32"):
        if stored[dtype_name] > new[dtype_name]:
            best[dtype_name], best[f"{dtype_name}_size"] = stored[dtype_name], stored[f"{dtype_name}_size"]
    return best


def _stored_record(cache, key):
    """The cached record under key, or None. Entries written before the count and the time were
    recorded count as one measurement taken long ago."""
    record = cache.get(key)
    return {"measurements": 1, "measured_at": 0.0, **record} if isinstance(record, dict) else None


def measure_matmul_flops(library, device_name, *, device="cpu", sizes=None, cache_root=None,
                         recalibrate=False):
    """Measured dense matmul throughput: {"bf16", "fp32" (FLOP/s), "bf16_size", "fp32_size" (n of
    the n x n products timed), "threads", "library", "measurements", "cached"}, the best of every
    measurement stored in <cache_root>/calibration.json for this (library version, device,
    threads, largest size).

    It measures (and merges the result into the cache, where it can only raise the rates) when
    the cache has no entry, when the entry holds fewer than CALIBRATION_MEASUREMENTS measurements
    and the last is more than REMEASURE_AFTER_S old, or when recalibrate is true; otherwise it
    reads the cache ("cached": True). library is "torch" (device "cpu" or "cuda") or "mlx" (its
    default device); device_name names the hardware in the cache key (CPU model or GPU name). A
    measurement takes about a second on 2 CPU cores.
    """
    if library == "torch":
        products, version, threads = _torch_products(device)
    elif library == "mlx":
        products, version, threads = _mlx_products()
    else:
        raise ValueError(f"unknown library {library!r}; expected torch or mlx")
    sizes = tuple(sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES))
    key = f"{version} | {device}: {device_name} | {threads} threads | n<={max(sizes)}"
    path = Path(cache_root or cache_dir()) / CALIBRATION_FILE
    cached = _stored_record(_read_cache(path), key)
    trusted = cached is not None and (cached["measurements"] >= CALIBRATION_MEASUREMENTS
                                      or time.time() - cached["measured_at"] < REMEASURE_AFTER_S)
    if trusted and not recalibrate:
        return {**cached, "cached": True}
    record = {"library": version, "threads": threads, "measurements": 1}
    for dtype_name in ("bf16", "fp32"):
        record[dtype_name], record[f"{dtype_name}_size"] = _matmul_rate(products(dtype_name), sizes)
    record["measured_at"] = time.time()
    # Re-read before writing so a calibration another process stored meanwhile is kept.
    stored = _read_cache(path)
    record = _best_of(_stored_record(stored, key), record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stored, key: record}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return {**record, "cached": False}


def forget_calibration(cache_root=None):
    """Delete the cached measurements (e.g. after a change that makes matmuls slower, since a new
    measurement can only raise them), so the next peak_flops() starts over. Returns True if
    there was something to delete."""
    path = Path(cache_root or cache_dir()) / CALIBRATION_FILE
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def _measured(record, where):
    # A CPU without native bf16 emulates it slower than fp32; training then runs in fp32, so the
    # peak is whichever dtype is faster.
    n = record["bf16_size"]
    how = (f"measured: {record['library']} {n}x{n} matmul {where}, "
           f"bf16 {record['bf16'] / 1e12:.3f} / fp32 {record['fp32'] / 1e12:.3f} TFLOP/s"
           f", best of {record['measurements']}{' (cached)' if record['cached'] else ''}")
    return max(record["bf16"], record["fp32"]), how


def peak_flops_and_source(info, backend, *, recalibrate=False):
    """(FLOP/s, how it was obtained) for the device `backend` trains on; see peak_flops."""
    if backend in ("mlx", "mps") and info.get("kind") == "apple":
        return apple_gpu_flops(info)
    if backend == "mps":
        raise ValueError("the mps backend needs an Apple Silicon Mac")
    if backend == "cuda":
        flops = nvidia_gpu_flops(info.get("gpu_name"))
        if flops is not None:
            return flops, f"table: {info.get('gpu_name')} dense BF16 (NVIDIA datasheet)"
        record = measure_matmul_flops("torch", info.get("gpu_name"), device="cuda",
                                      recalibrate=recalibrate)
        return _measured(record, f"on {info.get('gpu_name')} (not in the table)")
    if backend in ("mlx", "cpu"):
        record = measure_matmul_flops("mlx" if backend == "mlx" else "torch", info.get("cpu_model"),
                                      recalibrate=recalibrate)
        return _measured(record, f"on {record['threads']} CPU threads")
    raise ValueError(f"unknown backend {backend!r}; expected one of mlx, mps, cuda, cpu")


def peak_flops(info, backend, *, recalibrate=False):
    """Peak dense bf16 matmul FLOP/s of the device `backend` trains on (one device, not all of them).

    Apple GPUs (mlx, mps) and known NVIDIA GPUs come from tables; the CPU (cpu, and mlx off a Mac)
    and unknown NVIDIA GPUs are measured and cached (see measure_matmul_flops; recalibrate=True
    measures again, which can only raise the cached peak). A measured CPU peak is the faster of
    bf16 and fp32, since a CPU without native bf16 trains in fp32.
    """
    return peak_flops_and_source(info, backend, recalibrate=recalibrate)[0]
