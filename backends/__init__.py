"""Hardware-aware helpers shared by prepare.py, train.py and train_mlx.py (locked for the agent).

    detect_backend()                       -> "mlx" | "mps" | "cuda" | "cpu"
    detect_mlx_backend()                   -> "mlx", or BackendUnavailable (train_mlx.py)
    get_hardware_info()                    -> dict describing this machine (cached)
    choose_compute_dtype(info, backend)    -> {"dtype": "bf16" | "fp32", both rates, "how"}
    peak_flops(info, backend, dtype=)      -> dense matmul FLOP/s of the training device in dtype
    fastest_cpu_threads(rows, dim, dtype) -> torch CPU threads that multiply fastest at those shapes
    suggest_hyperparameters(info, backend, flops) -> default configuration for this tier
    eval_tokens(info)                      -> the tier's evaluation budget in tokens
    sync(backend), peak_memory_mb(backend), keep_freed_memory(), print_summary()
    memory_budget(backend), model_fits_in_memory(...), out_of_memory_message(...)

`uv run python -m backends` prints the summary. Importing this package never imports torch or mlx.
"""

import logging

from backends.flops import (
    choose_compute_dtype,
    fastest_cpu_threads,
    peak_flops,
    peak_flops_and_source,
)
from backends.hardware import (
    BACKENDS,
    BackendUnavailable,
    detect_backend,
    detect_mlx_backend,
    get_hardware_info,
    keep_freed_memory,
    memory_budget,
    model_fits_in_memory,
    out_of_memory_message,
    peak_memory_mb,
    sync,
)
from backends.summary import print_summary
from backends.tiers import current_profile, eval_tokens, suggest_hyperparameters



class _NoCudaToolkitNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." line. torch.utils.cpp_extension
    logs it whenever the CUDA toolkit is installed on a machine without a usable GPU, and inductor
    imports that module each time it compiles on the CPU; the kit builds no CUDA extension, so the
    line says nothing about a run. Every other message of that logger still shows."""

    def filter(self, record):
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaToolkitNotice())

__all__ = [
    "BACKENDS", "BackendUnavailable", "choose_compute_dtype", "current_profile", "detect_backend",
    "detect_mlx_backend", "eval_tokens", "fastest_cpu_threads", "get_hardware_info", "keep_freed_memory",
    "memory_budget", "model_fits_in_memory", "out_of_memory_message", "peak_flops", "peak_flops_and_source",
    "peak_memory_mb", "print_summary", "suggest_hyperparameters", "sync",
]
