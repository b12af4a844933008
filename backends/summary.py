"""A few lines saying what this machine is, which backend trains in which dtype, its peak FLOPS and
the default configuration (`uv run python -m backends`, or backends.print_summary())."""

import os
import sys

from backends.flops import choose_compute_dtype, peak_flops_and_source
from backends.hardware import BACKEND_ENV, detect_backend, get_hardware_info
from backends.tiers import current_profile, suggest_hyperparameters


def _tflops(flops):
    return f"{flops / 1e12:,.1f}" if flops >= 10e12 else f"{flops / 1e12:.3f}"


def hardware_lines(info):
    """The os, chip, cores and memory lines for a get_hardware_info() dict."""
    cores = f"{info.get('cpu_cores')} CPU"
    if info.get("perf_cores"):
        cores += f" ({info['perf_cores']} performance + {info.get('efficiency_cores') or 0} efficiency)"
    if info.get("kind") == "apple":
        cores += f", {info.get('gpu_cores') or 'unknown'} GPU"
    elif info.get("kind") == "nvidia":
        cores += (f", {info['gpu_count']} x GPU of {info['sm_count']} SMs and "
                  f"{info['gpu_memory_gb']:.1f} GB")
    memory = f"{info['memory_gb']:.1f} GB" if info.get("memory_gb") else "unknown"
    return [
        f"os:      {info.get('os')} {info.get('arch')}",
        f"chip:    {info.get('chip')} ({info.get('kind')}; generation {info.get('generation') or '-'}, "
        f"tier {info.get('tier') or '-'})",
        f"cores:   {cores}",
        f"memory:  {memory}{' unified' if info.get('kind') == 'apple' else ''}",
    ]


def precision_line(precision):
    """The line saying which dtype trains and why, for a choose_compute_dtype() dict."""
    return f"dtype:   {precision['dtype']} ({precision['how']})"


def backend_lines(backend, requested, flops, how, config, profile):
    """The backend, peak and config lines."""
    c = config
    return [
        f"backend: {backend} ({BACKEND_ENV}={requested or 'auto'})",
        f"peak:    {_tflops(flops)} TFLOP/s, {how}",
        f"config:  {c['tier']} ({profile}): depth {c['depth']}, aspect_ratio {c['aspect_ratio']}, "
        f"head_dim {c['head_dim']}, window {c['window_pattern']}, batch {c['device_batch_size']} x "
        f"{c['seq_len']} of {c['total_batch_size']:,} tokens/step, eval {c['eval_tokens']:,} tokens "
        f"in batches of {c['eval_batch_size']}",
    ]


def print_summary(file=None, recalibrate=False):
    """Print this machine's hardware, detected backend, the dtype it would train in, its peak FLOPS
    in that dtype (and how each was obtained) and the suggested configuration. May run the CPU
    calibration (about a second; recalibrate=True always measures again, which can only raise the
    cached peak). The hardware lines come first, so they are printed even when no backend can run."""
    file = file or sys.stdout
    info = get_hardware_info()
    print("\n".join(hardware_lines(info)), file=file)
    backend = detect_backend()
    precision = choose_compute_dtype(info, backend, recalibrate=recalibrate)
    flops, how = peak_flops_and_source(info, backend, dtype=precision["dtype"])
    config = suggest_hyperparameters(info, backend, flops=flops)
    lines = backend_lines(backend, os.environ.get(BACKEND_ENV), flops, how, config, current_profile())
    print("\n".join([lines[0], precision_line(precision), *lines[1:]]), file=file)
