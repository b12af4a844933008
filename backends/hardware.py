"""Which backend to train on, what hardware it runs on, and the device helpers both scripts share.

detect_backend() turns AUTORESEARCH_BACKEND (auto|mlx|mps|cuda|cpu) into a backend that works on
this machine, or fails with one line saying what to install or set. get_hardware_info() describes
the machine once per process. sync() and peak_memory_mb() hide the per-framework calls.

torch and mlx are imported inside functions only: `import backends` stays cheap, and a Mac without
torch (or Linux without mlx) can still use the other framework.
"""

import ctypes
import functools
import os
import platform
from pathlib import Path

import psutil

from backends import apple

BACKENDS = ("mlx", "mps", "cuda", "cpu")
BACKEND_ENV = "AUTORESEARCH_BACKEND"
# NVIDIA architecture by compute capability; (major, minor) first, then major alone.
NVIDIA_ARCHITECTURES = {(7, 5): "Turing", (8, 9): "Ada", 7: "Volta", 8: "Ampere", 9: "Hopper",
                        10: "Blackwell", 12: "Blackwell"}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message is one line naming the fix."""


# ---------------------------------------------------------------------------
# Probes: each answers one question about this machine. detect_backend() takes replacements so
# every branch can be tested on any machine.

def probe_mlx():
    """"metal" if mlx imports and sees a Metal GPU, "cpu" if it imports without one, None if missing."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    return "metal" if mx.metal.is_available() else "cpu"


def probe_torch():
    """True if torch imports."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def probe_cuda():
    """True if torch imports and sees at least one CUDA device."""
    if not probe_torch():
        return False
    import torch
    return torch.cuda.is_available()


def probe_mps():
    """True if torch imports and its MPS (Metal) device is usable."""
    if not probe_torch():
        return False
    import torch
    return torch.backends.mps.is_available()


DEFAULT_PROBES = {"mlx": probe_mlx, "torch": probe_torch, "cuda": probe_cuda, "mps": probe_mps}


def is_apple_silicon(system=None, machine=None):
    """True on macOS arm64 (an arm64 Python on an M-series Mac)."""
    system = system or platform.system()
    machine = machine or platform.machine()
    return system == "Darwin" and machine == "arm64"


def _require_torch(name, probe):
    if not probe["torch"]():
        raise BackendUnavailable(f"{BACKEND_ENV}={name} but torch is not installed; run `uv sync`")


def _check_requested(name, on_apple, probe):
    """Raise BackendUnavailable unless the explicitly requested backend can run here."""
    if name == "mlx":
        state = probe["mlx"]()
        if state is None and on_apple:
            raise BackendUnavailable(f"{BACKEND_ENV}=mlx but mlx is not installed; run `uv sync` "
                                     f"or set {BACKEND_ENV}=mps")
        if state is None:
            raise BackendUnavailable(f"{BACKEND_ENV}=mlx but mlx is not installed; run `uv sync` "
                                     f"(mlx[cpu] on Linux; MLX has no build for other systems) "
                                     f"or unset {BACKEND_ENV}")
        if state != "metal" and on_apple:
            raise BackendUnavailable(f"{BACKEND_ENV}=mlx but MLX sees no Metal GPU (virtual machine?); "
                                     f"set {BACKEND_ENV}=cpu")
    elif name == "mps":
        _require_torch(name, probe)
        if not probe["mps"]():
            raise BackendUnavailable(f"{BACKEND_ENV}=mps but torch sees no MPS device (it needs macOS "
                                     f"on Apple Silicon); unset it or set {BACKEND_ENV}=cpu")
    elif name == "cuda":
        _require_torch(name, probe)
        if not probe["cuda"]():
            raise BackendUnavailable(f"{BACKEND_ENV}=cuda but torch sees no CUDA device; "
                                     f"unset it or set {BACKEND_ENV}=cpu")
    else:
        _require_torch(name, probe)


def _auto_backend(on_apple, probe):
    """Apple Silicon: MLX on Metal, else MPS, else torch CPU. Elsewhere: CUDA, else torch CPU.

    MLX's Linux build runs on the CPU and is much slower than torch there, so auto never picks it.
    """
    if on_apple and probe["mlx"]() == "metal":
        return "mlx"
    if not probe["torch"]():
        hint = "run `uv sync`" if on_apple else f"run `uv sync`, or set {BACKEND_ENV}=mlx if only mlx is installed"
        raise BackendUnavailable(f"no usable backend: torch is not installed; {hint}")
    if on_apple and probe["mps"]():
        return "mps"
    if not on_apple and probe["cuda"]():
        return "cuda"
    return "cpu"


def detect_backend(requested=None, *, system=None, machine=None, probes=None):
    """The backend to train on: "mlx", "mps", "cuda" or "cpu".

    requested defaults to $AUTORESEARCH_BACKEND (unset or "auto" = pick the best one here). An
    unknown name, or one this machine cannot run, raises BackendUnavailable with a one-line fix.
    system/machine/probes replace platform.system(), platform.machine() and DEFAULT_PROBES entries
    (tests use them to walk every branch on one machine).
    """
    raw = requested if requested is not None else os.environ.get(BACKEND_ENV, "")
    name = raw.strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise BackendUnavailable(f"{BACKEND_ENV}={raw!r} is not a backend; set it to one of "
                                 f"auto, {', '.join(BACKENDS)} or unset it")
    probe = {**DEFAULT_PROBES, **(probes or {})}
    on_apple = is_apple_silicon(system, machine)
    if name == "auto":
        return _auto_backend(on_apple, probe)
    _check_requested(name, on_apple, probe)
    return name


def detect_mlx_backend(**overrides):
    """detect_backend() for train_mlx.py, which trains with MLX only: "mlx" when
    $AUTORESEARCH_BACKEND is unset, auto or mlx and MLX runs here. Any other value raises
    BackendUnavailable instead of being ignored (a torch backend is train.py's job)."""
    raw = os.environ.get(BACKEND_ENV, "")
    name = raw.strip().lower() or "auto"
    if name in BACKENDS and name != "mlx":
        raise BackendUnavailable(f"{BACKEND_ENV}={raw!r} but train_mlx.py trains with MLX only: "
                                 f"run `uv run train.py` for {name}, or unset {BACKEND_ENV}")
    if name != "auto":
        detect_backend(raw, **overrides)  # an unknown name: its one-line error
    return detect_backend("mlx", **overrides)


# ---------------------------------------------------------------------------
# Hardware description

def parse_cpuinfo_model(text):
    """The first "model name" in /proc/cpuinfo text, or None (ARM Linux kernels often print none)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def _host_cpu_info(machine):
    """CPU model, cores, threads and RAM from /proc/cpuinfo and psutil (any OS; the model may be generic)."""
    if hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))  # what this process may use, e.g. inside a container
    else:
        threads = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or threads
    cpuinfo = Path("/proc/cpuinfo")
    model = parse_cpuinfo_model(cpuinfo.read_text()) if cpuinfo.exists() else None
    return {
        "cpu_model": model or platform.processor() or machine,
        "cpu_cores": min(physical, threads),
        "cpu_threads": threads,
        "memory_gb": psutil.virtual_memory().total / 2**30,
    }


def nvidia_architecture(major, minor):
    """Architecture name for a CUDA compute capability: (9, 0) -> "Hopper", (8, 9) -> "Ada"."""
    return NVIDIA_ARCHITECTURES.get((major, minor)) or NVIDIA_ARCHITECTURES.get(major) or f"sm_{major}{minor}"


def read_cuda_device():
    """{name, sm_count, memory_bytes, capability, count} of CUDA device 0, or None without CUDA."""
    if not probe_cuda():
        return None
    import torch
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "capability": (props.major, props.minor),
        "count": torch.cuda.device_count(),
    }


def nvidia_fields(device):
    """Hardware-info fields for an NVIDIA machine from read_cuda_device()'s dict."""
    return {
        "kind": "nvidia",
        "chip": device["name"],
        "generation": nvidia_architecture(*device["capability"]),
        "tier": None,
        "gpu_name": device["name"],
        "gpu_capability": tuple(device["capability"]),
        "sm_count": device["sm_count"],
        "gpu_memory_gb": device["memory_bytes"] / 2**30,
        "gpu_count": device["count"],
    }


def read_hardware_info(system=None, machine=None, *, apple_reader=apple.read_apple_info,
                       cuda_reader=read_cuda_device):
    """Describe this machine (uncached; see get_hardware_info). The readers are replaceable for tests."""
    system = system or platform.system()
    machine = machine or platform.machine()
    info = {"os": system, "arch": machine, "kind": "cpu", "chip": None, "generation": None,
            "tier": None, "gpu_cores": None}
    info.update(_host_cpu_info(machine))
    info["chip"] = info["cpu_model"]
    if is_apple_silicon(system, machine):
        found = {k: v for k, v in apple_reader().items() if v is not None}
        info.update(found, kind="apple")
        info["cpu_model"] = info["chip"]
        return info
    device = cuda_reader()
    if device is not None:
        info.update(nvidia_fields(device))
    return info


@functools.lru_cache(maxsize=1)
def _cached_hardware_info():
    return read_hardware_info()


def get_hardware_info():
    """This machine, read once per process: os, arch, kind ("apple"|"nvidia"|"cpu"), chip,
    generation, tier, gpu_cores, memory_gb, cpu_cores (+ cpu_model, cpu_threads; on Apple also
    perf_cores, efficiency_cores; on NVIDIA gpu_name, gpu_capability, sm_count, gpu_memory_gb,
    gpu_count).
    Unknown values are None. Each call returns a fresh copy, so callers may modify it."""
    return dict(_cached_hardware_info())


# ---------------------------------------------------------------------------
# Device helpers

_mps_peak_bytes = 0  # MPS reports only current use, so sync() samples it and keeps the maximum


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _sample_mps_memory():
    global _mps_peak_bytes
    import torch
    _mps_peak_bytes = max(_mps_peak_bytes, torch.mps.driver_allocated_memory())
    return _mps_peak_bytes


def sync(backend):
    """Wait until the device has finished all queued work (for honest timings); no-op on CPU.

    On MPS it also samples allocated memory, so peak_memory_mb("mps") sees every synced step.
    """
    _check_backend(backend)
    if backend == "cuda":
        import torch
        torch.cuda.synchronize()
    elif backend == "mps":
        import torch
        torch.mps.synchronize()
        _sample_mps_memory()
    elif backend == "mlx":
        import mlx.core as mx
        mx.synchronize()


def keep_freed_memory(system=None):
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves every block over 32 MiB (an MLP activation, a batch of logit
    gradients) from a fresh mmap and unmaps it on free, so each training step page-faults and
    zeroes the same few hundred MiB again. On a 2-core x86 VM that halved the speed of bf16
    matmuls with large outputs (16384x256 @ 256x1024: 441 -> 888 GFLOP/s). Call it once, early,
    in the training process. Returns True where it applied (Linux with glibc), else False
    (macOS and musl allocators keep no such threshold; nothing to do there).
    """
    if (system or platform.system()) != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's <malloc.h>
    no_mmap = libc.mallopt(M_MMAP_MAX, 0)
    keep_top = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # hand back only a free top over 2 GiB
    return bool(no_mmap and keep_top)


# fp32 weight, its gradient and one optimizer buffer: the least memory a parameter takes in training
TRAINING_BYTES_PER_PARAM = 12


def memory_budget(backend):
    """(bytes, what they are) that a run on this backend can hold at most: the GPU's memory on
    cuda, its working-set limit on mps, the unified memory for MLX on Metal; else the RAM, or the
    address-space limit (`ulimit -v`) where that is lower."""
    _check_backend(backend)
    if backend == "cuda":
        import torch
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    if backend == "mps":
        import torch
        return torch.mps.recommended_max_memory(), "the GPU's working-set limit"
    if backend == "mlx":
        import mlx.core as mx
        if mx.metal.is_available():
            info = mx.device_info()
            memory = info.get("memory_size") or info.get("total_memory")
            return memory or psutil.virtual_memory().total, "unified memory"
    import resource
    ram = psutil.virtual_memory().total
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY and limit < ram:
        return limit, "the address-space limit, ulimit -v"
    return ram, "RAM"


def model_fits_in_memory(backend, num_params):
    """False when the weights, gradients and optimizer state alone pass memory_budget()."""
    return TRAINING_BYTES_PER_PARAM * num_params <= memory_budget(backend)[0]


def out_of_memory_message(backend, num_params):
    """The line both scripts end a run with when memory runs out: what the run had, what the
    model alone needs, and the constant to lower (the model's size when it alone does not fit,
    else the micro-batch, whose activations took the rest)."""
    budget, what = memory_budget(backend)
    needed = TRAINING_BYTES_PER_PARAM * num_params
    fix = "lower ASPECT_RATIO or DEPTH" if needed > budget else "lower DEVICE_BATCH_SIZE"
    return (f"out of memory: the run had {_in_gib(budget)} ({what}) and the model's "
            f"{num_params / 1e6:,.1f}M parameters need at least {_in_gib(needed)} to train; {fix}")


def _in_gib(size):
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def max_rss_mb(ru_maxrss, system=None):
    """resource.getrusage's ru_maxrss in MiB: it counts KiB on Linux but bytes on macOS."""
    system = system or platform.system()
    return ru_maxrss / 2**20 if system == "Darwin" else ru_maxrss / 2**10


def peak_memory_mb(backend):
    """Peak memory of this process on the backend's device so far, in MiB (a peak, not current use).

    cuda: torch.cuda.max_memory_allocated; mps: largest driver allocation seen at sync() or now;
    mlx: mx.get_peak_memory; cpu: the process's peak resident set size.
    """
    _check_backend(backend)
    if backend == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    if backend == "mps":
        return _sample_mps_memory() / 2**20
    if backend == "mlx":
        import mlx.core as mx
        return mx.get_peak_memory() / 2**20  # Metal memory on a Mac, host memory on the CPU build
    import resource
    return max_rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
