"""Peak dense matmul throughput (FLOP/s) of the device a backend trains on: the denominator of MFU.

GPUs come from tables of published figures (backends/gpu_specs.py: Apple per GPU core, NVIDIA per
product). A CPU, or a GPU missing from the tables, is measured instead: a short bf16 and fp32
matmul benchmark whose result is cached on disk (AUTORESEARCH_CACHE_DIR or ~/.cache/autoresearch,
calibration.json), keyed by device, library version and thread count.

Other processes sharing the cores can only make a measurement slower, never faster, so the cache
keeps the best of all measurements taken, and a new one can only raise it. Until it holds
CALIBRATION_MEASUREMENTS of them, the peak is measured again (about a second) whenever it is needed
and the last measurement is more than REMEASURE_AFTER_S old: a machine that was busy at the first
measurement is usually idle at one of the next. recalibrate=True measures again now (`uv run
python -m backends --recalibrate`, `uv run tools/bench.py --recalibrate`); forget_calibration()
is the only way to lower the cached peak.

The same measurements choose the dtype a run computes in (choose_compute_dtype): bf16 only where
its matmuls really beat fp32's (BF16_MIN_SPEEDUP). A CPU reads its calibration; an NVIDIA GPU its
compute capability (native bf16 from sm80; torch.cuda.is_bf16_supported() also counts emulation);
an Apple GPU, whose bf16 rate no table states, a short timed matmul at the default model's shapes.
MFU is then counted against the peak of that dtype (peak_flops(..., dtype=)).
"""

import json
import os
import time
from pathlib import Path

from backends.gpu_specs import apple_gpu_flops, nvidia_gpu_flops
from backends.tiers import suggest_hyperparameters

CALIBRATION_FILE = "calibration.json"
CPU_SIZES = (256, 512, 1024, 2048)  # bf16 on 2 cores reaches its peak only at 2048 (~20 ms a product)
GPU_SIZES = (2048, 4096, 8192)
MAX_PRODUCT_S = 0.25  # grow the matrix while the next size (8x the work) should stay under this...
REPEATS = 5           # ...then keep the best of this many timings (other processes share the cores)
# A cached peak is trusted once it is the best of this many measurements at least
# REMEASURE_AFTER_S apart (spread in time, so a busy spell on the machine cannot spoil them all).
CALIBRATION_MEASUREMENTS = 3
REMEASURE_AFTER_S = 600
DTYPES = ("bf16", "fp32")
# bf16 trains only where its matmuls run at least this much faster than fp32's: autocast re-casts
# every weight each micro-step and bf16 rounds, so a smaller gain is not worth having, and two
# calibrations on a shared 2-core machine differ by about this much anyway.
BF16_MIN_SPEEDUP = 1.2
# An Apple GPU keeps bf16 down to this fraction of its fp32 rate: MLX has no autocast, so bf16
# also halves every activation's memory traffic, and a tie in the matmul still favours it there;
# emulated bf16 shows as far slower.
APPLE_BF16_MIN_SPEEDUP = 0.9
NATIVE_BF16_CAPABILITY = (8, 0)  # NVIDIA Ampere (sm80) and later: bf16 tensor cores
# The thread-count probe times products of at most this many rows at the model's width: enough
# to tell whether the shape keeps every core busy, short enough to run at every start (about 1 s
# with its three rounds at the CPU tier's width on the 2-core Xeon).
THREAD_PROBE_ROWS = 2048
# ...and trains on one thread only where one thread multiplies at least this much faster than all:
# the probe times the matmul alone, the rest of a step still gains from every core, and on the
# busy 2-core Xeon two probes a minute apart at the CPU tier's shapes gave 1 thread the edge once
# and 2 threads 1.7x the rate the next time.
SINGLE_THREAD_MIN_SPEEDUP = 1.25
# The two counts are timed in turn, this many rounds of THREAD_PROBE_REPEATS timings, and each keeps
# its best: a few seconds of other work on the machine during one count's timings (a tool, another
# tenant) once made a 2-core run train on one thread at half its speed.
THREAD_PROBE_ROUNDS = 3
THREAD_PROBE_REPEATS = 2


def cache_dir():
    """Cache root: $AUTORESEARCH_CACHE_DIR, else ~/.cache/autoresearch (the same rule as prepare.py)."""
    return Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or Path.home() / ".cache" / "autoresearch")


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
        rate = _timed_rate(make_product(n), 2 * n**3)
        if rate >= best_rate:
            best_rate, best_n = rate, n
        if 8 * 2 * n**3 / rate > MAX_PRODUCT_S:
            break
    return best_rate, best_n


def _timed_rate(product, flop, repeats=REPEATS):
    """FLOP/s of one product of `flop` FLOPs: the best of `repeats` timings after a warm-up
    (allocation, kernel choice, thread-pool start)."""
    product()
    return flop / min(_seconds(product) for _ in range(repeats))


def _torch_products(device):
    import torch

    def products(dtype_name):
        return lambda n: _shaped_product("torch", device, dtype_name, (n, n, n))
    return products, f"torch {torch.__version__}", torch.get_num_threads()


def _shaped_product(library, device, dtype_name, shape):
    """One [m, k] @ [k, n] product in dtype_name on `device` (torch) or MLX's default device,
    waiting for the result (a GPU's kernels are asynchronous: the clock must not stop before
    them); shape is (m, k, n)."""
    m, k, n = shape
    if library == "mlx":
        import mlx.core as mx
        dtype = {"bf16": mx.bfloat16, "fp32": mx.float32}[dtype_name]
        key_a, key_b = mx.random.split(mx.random.key(0))  # leave the global RNG alone
        a = mx.random.normal((m, k), key=key_a).astype(dtype)
        b = mx.random.normal((k, n), key=key_b).astype(dtype)
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)
    import torch
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    # A generator of its own: a run that probes after seeding must draw the same weights as one
    # that does not (data-parallel ranks skip the thread probe).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=generator).to(dtype)
    b = torch.randn(k, n, device=device, generator=generator).to(dtype)
    wait = {"mps": torch.mps.synchronize, "cuda": torch.cuda.synchronize}.get(device, lambda: None)

    def product():
        a @ b
        wait()
    return product


def time_dtypes_at_shape(library, device, shape):
    """{"bf16", "fp32"}: FLOP/s of an [m, k] @ [k, n] product (shape (m, k, n)) in each dtype, best
    of REPEATS. A dtype the device cannot compute (MPS before macOS 14 has no bf16) rates 0."""
    rates = {}
    for dtype_name in DTYPES:
        try:
            product = _shaped_product(library, device, dtype_name, shape)
            rates[dtype_name] = _timed_rate(product, 2 * shape[0] * shape[1] * shape[2])
        except (RuntimeError, TypeError, ValueError):
            rates[dtype_name] = 0.0
    return rates


def _mlx_products():
    import importlib.metadata

    def products(dtype_name):
        return lambda n: _shaped_product("mlx", None, dtype_name, (n, n, n))
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


def calibration_key(library, device, device_name, threads, sizes):
    """Key of a calibration in the cache: what it measured with (library and version, e.g.
    "torch 2.5.1"), on what (device and its name), on how many threads, up to which size."""
    return f"{library} | {device}: {device_name} | {threads} threads | n<={max(sizes)}"


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
    key = calibration_key(version, device, device_name, threads, sizes)
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


def _rates(record):
    return f"bf16 {record['bf16'] / 1e12:.3f} / fp32 {record['fp32'] / 1e12:.3f} TFLOP/s"


def _measured(record, where, dtype):
    n = record[f"{dtype}_size"]
    how = (f"measured: {record['library']} {n}x{n} {dtype} matmul {where}, {_rates(record)}"
           f", best of {record['measurements']}{' (cached)' if record['cached'] else ''}")
    return record[dtype], how


def _cpu_calibration(info, backend, recalibrate):
    return measure_matmul_flops("mlx" if backend == "mlx" else "torch", info.get("cpu_model"),
                                recalibrate=recalibrate)


def faster_dtype(bf16_flops, fp32_flops, min_speedup=BF16_MIN_SPEEDUP):
    """"bf16" where its rate is at least min_speedup times fp32's, else "fp32"."""
    return "bf16" if bf16_flops >= min_speedup * fp32_flops else "fp32"


def model_matmul_shape(config):
    """(rows, model_dim, 4 * model_dim) of an MLP matmul of a suggest_hyperparameters() config:
    a micro-batch's tokens through the widest weight of the model, the shape most of a step runs."""
    dim = -(-config["depth"] * config["aspect_ratio"] // config["head_dim"]) * config["head_dim"]
    return config["device_batch_size"] * config["seq_len"], dim, 4 * dim


def choose_compute_dtype(info, backend, *, recalibrate=False):
    """{"dtype": "bf16" | "fp32", "bf16", "fp32" (FLOP/s, None where not measured), "how"}: the
    dtype `backend` should compute in on this machine, from a measurement.

    cpu and mlx off a Mac: the cached matmul calibration (measure_matmul_flops). cuda: the compute
    capability in info["gpu_capability"] (bf16 from NATIVE_BF16_CAPABILITY). mlx and mps on Apple
    Silicon: a timed matmul at the shapes of the default model (time_dtypes_at_shape; a few ms,
    not cached). bf16 must beat fp32 by BF16_MIN_SPEEDUP (APPLE_BF16_MIN_SPEEDUP on Apple GPUs).
    """
    if backend in ("mlx", "mps") and info.get("kind") == "apple":
        shape = model_matmul_shape(suggest_hyperparameters(info, backend))
        rates = time_dtypes_at_shape("mlx" if backend == "mlx" else "torch", backend, shape)
        how = f"timed {'x'.join(map(str, shape))} matmul on the GPU, {_rates(rates)}"
        dtype = faster_dtype(rates["bf16"], rates["fp32"], APPLE_BF16_MIN_SPEEDUP)
        return {"dtype": dtype, **rates, "how": how}
    if backend == "mps":
        raise ValueError("the mps backend needs an Apple Silicon Mac")
    if backend == "cuda":
        capability = tuple(info.get("gpu_capability") or (0, 0))
        native = capability >= NATIVE_BF16_CAPABILITY
        how = (f"compute capability {capability[0]}.{capability[1]}: "
               f"{'native bf16' if native else 'no native bf16 (before sm80 it is emulated)'}")
        return {"dtype": "bf16" if native else "fp32", "bf16": None, "fp32": None, "how": how}
    if backend in ("mlx", "cpu"):
        record = _cpu_calibration(info, backend, recalibrate)
        how = f"calibration on {record['threads']} CPU threads, {_rates(record)}"
        return {"dtype": faster_dtype(record["bf16"], record["fp32"]), "bf16": record["bf16"],
                "fp32": record["fp32"], "how": how}
    raise ValueError(f"unknown backend {backend!r}; expected one of mlx, mps, cuda, cpu")


def peak_flops_and_source(info, backend, *, dtype=None, recalibrate=False):
    """(FLOP/s, how it was obtained) for the device `backend` trains on, in `dtype` ("bf16" or
    "fp32"; None: the one choose_compute_dtype picks); see peak_flops."""
    if dtype is None:
        dtype = choose_compute_dtype(info, backend, recalibrate=recalibrate)["dtype"]
        recalibrate = False  # measured just now
    if dtype not in DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if backend in ("mlx", "mps") and info.get("kind") == "apple":
        return apple_gpu_flops(info)
    if backend == "mps":
        raise ValueError("the mps backend needs an Apple Silicon Mac")
    if backend == "cuda":
        flops = nvidia_gpu_flops(info.get("gpu_name")) if dtype == "bf16" else None
        if flops is not None:
            return flops, f"table: {info.get('gpu_name')} dense BF16 (NVIDIA datasheet)"
        why = "not in the table" if dtype == "bf16" else "the table is bf16"
        where = f"on {info.get('gpu_name')} ({why})"
        record = measure_matmul_flops("torch", info.get("gpu_name"), device="cuda",
                                      recalibrate=recalibrate)
        return _measured(record, where, dtype)
    if backend in ("mlx", "cpu"):
        record = _cpu_calibration(info, backend, recalibrate)
        return _measured(record, f"on {record['threads']} CPU threads", dtype)
    raise ValueError(f"unknown backend {backend!r}; expected one of mlx, mps, cuda, cpu")


def peak_flops(info, backend, *, dtype=None, recalibrate=False):
    """Peak dense matmul FLOP/s in `dtype` of the device `backend` trains on (one device, not all
    of them); dtype None: the dtype choose_compute_dtype picks.

    Apple GPUs (mlx, mps; M1-M4 run bf16 at the fp32 rate) and known NVIDIA GPUs in bf16 come from
    tables; the CPU (cpu, and mlx off a Mac) and other NVIDIA cases are measured and cached (see
    measure_matmul_flops; recalibrate=True measures again, which can only raise the cached peak).
    """
    return peak_flops_and_source(info, backend, dtype=dtype, recalibrate=recalibrate)[0]


def _thread_rates(shape, dtype):
    """{threads: FLOP/s} of a torch CPU product at shape in dtype, on one thread and on all of
    them, each the best over THREAD_PROBE_ROUNDS rounds in turn; the thread count is left as it was."""
    import torch

    all_threads = torch.get_num_threads()
    product = _shaped_product("torch", "cpu", dtype, shape)
    flop = 2 * shape[0] * shape[1] * shape[2]
    rates = {}
    try:
        for _ in range(THREAD_PROBE_ROUNDS):
            for threads in sorted({1, all_threads}):
                torch.set_num_threads(threads)
                rates[threads] = max(rates.get(threads, 0.0), _timed_rate(product, flop, THREAD_PROBE_REPEATS))
    finally:
        torch.set_num_threads(all_threads)
    return rates


def fastest_cpu_threads(rows, model_dim, dtype):
    """Torch CPU threads to train a model of width model_dim on micro-batches of `rows` tokens in
    dtype: 1 where one thread runs its MLP matmul (at most THREAD_PROBE_ROWS rows) at least
    SINGLE_THREAD_MIN_SPEEDUP times faster than all of them, as at tiny shapes where the threads
    wait on each other more than they compute; else all. Measured at each call."""
    rates = _thread_rates((min(rows, THREAD_PROBE_ROWS), model_dim, 4 * model_dim), dtype)
    all_threads = max(rates)
    return 1 if rates[1] >= SINGLE_THREAD_MIN_SPEEDUP * rates[all_threads] else all_threads
