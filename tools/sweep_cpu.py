"""Sweep model size and batch for the CPU tier, with the real training script and the standard budget.

Each configuration runs a copy of train.py whose size/batch constants (and, with --dtype, its
COMPUTE_DTYPE) are replaced by literals, on the active dataset (prepare pystdlib first), one after
another. Every finished run appends one row to tools/sweep_cpu_results.tsv: the configuration,
the CPU, its thread count, the dtype the run computed in and the peak FLOP/s of that dtype it
measured, the load average before and after the run, the dataset format it trained on
(dataset_builders.DATASET_FORMAT: rows of format 1 trained on pystdlib in path order, each file's first
row only), and the run's results. The best
configuration at each measured peak is what the rule in backends/tiers.py (CPU_TIER_BY_FLOPS,
docs/cpu-tier.md) is fitted to.

    uv run tools/sweep_cpu.py                                   # the default grid below
    uv run tools/sweep_cpu.py --config depth=3,seq_len=1024     # one configuration (others default)
    uv run tools/sweep_cpu.py --dtype fp32 --threads 1          # another measured throughput

Timing-sensitive: run nothing else on the machine meanwhile, or the numbers mean little (the
load average columns say how busy it was).
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dataset_builders
from backends.tiers import CPU_TIER

REPO_ROOT = Path(__file__).resolve().parent.parent

RESULTS_PATH = REPO_ROOT / "tools" / "sweep_cpu_results.tsv"
ENVIRONMENT = """environment:
  AUTORESEARCH_CACHE_DIR    the data and the cached matmul peak (default ~/.cache/autoresearch)
  AUTORESEARCH_DATASET      which prepared dataset to train on (default: the one prepared last)
  AUTORESEARCH_TIME_BUDGET  passed to every run; leave it unset for the standard 300 s (each row
                            records whether its run was standard)
  AUTORESEARCH_PROFILE      passed to every run; leave it unset (smoke replaces the swept sizes)
  AUTORESEARCH_BACKEND      not read: every run is set to cpu (and AUTORESEARCH_RUNS_DIR to a
                            temporary folder)"""
CONSTANT_NAMES = {"depth": "DEPTH", "aspect_ratio": "ASPECT_RATIO", "head_dim": "HEAD_DIM",
                  "window_pattern": "WINDOW_PATTERN", "seq_len": "SEQ_LEN",
                  "device_batch_size": "DEVICE_BATCH_SIZE", "total_batch_size": "TOTAL_BATCH_SIZE"}
# A configuration's keys not given default to the CPU tier's (backends/tiers.py).
BASE = {key: CPU_TIER[key] for key in CONSTANT_NAMES}
# The grid behind the CPU tier (docs/measurements.md; run per dtype and thread count with
# --dtype/--threads).
GRID = [
    {"depth": 2, "aspect_ratio": 64},
    {"depth": 2, "aspect_ratio": 96},
    {"depth": 3, "aspect_ratio": 64},
    {"depth": 4, "aspect_ratio": 64},
    {"depth": 6, "aspect_ratio": 64},
    {"depth": 2, "aspect_ratio": 64, "device_batch_size": 16, "total_batch_size": 2**13},
    {"depth": 2, "aspect_ratio": 96, "device_batch_size": 16, "total_batch_size": 2**13},
]
COLUMNS = list(BASE) + ["val_bpb", "num_steps", "num_params_M", "total_tokens_M", "mfu_percent",
                        "training_seconds", "total_seconds", "peak_vram_mb", "standard", "date",
                        "chip", "threads", "compute_dtype", "peak_tflops", "train_tokens_per_second",
                        "load_before", "load_after", "dataset_format"]


def script_with_config(source, config, dtype=None):
    """train.py's text with each size/batch constant set to a literal from config, and
    COMPUTE_DTYPE to dtype unless it is None."""
    constants = {CONSTANT_NAMES[key]: value for key, value in config.items()}
    if dtype is not None:
        constants["COMPUTE_DTYPE"] = dtype
    for name, value in constants.items():
        pattern = re.compile(rf"^{name} = .*$", re.MULTILINE)
        if not pattern.search(source):
            raise SystemExit(f"sweep: train.py has no line '{name} = ...' to set; update CONSTANT_NAMES")
        source = pattern.sub(f"{name} = {value!r}", source, count=1)
    return source


def run_config(config, timeout, dtype=None, threads=None):
    """Run one configuration to the end (in dtype, on threads torch CPU threads, where given);
    returns the run's JSON fields and "threads" (those it trained on), or None if it failed."""
    source = script_with_config((REPO_ROOT / "train.py").read_text(), config, dtype)
    with tempfile.TemporaryDirectory() as runs_dir:
        script = REPO_ROOT / f".sweep_train_{os.getpid()}.py"  # beside prepare.py so imports resolve
        script.write_text(source)
        env = dict(os.environ, AUTORESEARCH_BACKEND="cpu", AUTORESEARCH_RUNS_DIR=runs_dir)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's thread count at start
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  timed out after {timeout} s", file=sys.stderr)
            return None
        finally:
            script.unlink(missing_ok=True)
        result_path = Path(runs_dir) / "last_run.json"
        if proc.returncode != 0 or not result_path.exists():
            print(f"  failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                  file=sys.stderr)
            return None
        # The run may train on fewer threads than it was given (train.py's thread probe): the
        # peak it counts MFU against, last on its precision line, says how many.
        threads = re.findall(r"on (\d+) CPU threads", proc.stdout)
        return {**json.loads(result_path.read_text()), "threads": int(threads[-1]) if threads else None}


def append_row(config, result, threads, loads):
    """One row of COLUMNS for a finished run: its configuration, results, thread count and the
    1-minute load average before and after it."""
    new_file = not RESULTS_PATH.exists()
    with RESULTS_PATH.open("a", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        if new_file:
            writer.writerow(COLUMNS)
        # The loader refuses a dataset of another format, so a finished run trained on this one.
        row = dict(config, date=time.strftime("%Y-%m-%d %H:%M"), threads=threads,
                   load_before=f"{loads[0]:.2f}", load_after=f"{loads[1]:.2f}",
                   dataset_format=dataset_builders.DATASET_FORMAT)
        row.update({k: result.get(k) for k in COLUMNS if k in result})
        writer.writerow([row.get(c, "") for c in COLUMNS])


def parse_config(text):
    config = dict(BASE)
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in BASE:
            raise SystemExit(f"sweep: unknown key {key!r}; known: {', '.join(BASE)}")
        config[key] = value if key == "window_pattern" else int(value)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=ENVIRONMENT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="key=value,... (repeatable); default: the grid")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run before it is killed")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="force the compute dtype (default: measured)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.config] if args.config else [dict(BASE, **g) for g in GRID]
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config}", flush=True)
        load_before = os.getloadavg()[0]
        result = run_config(config, args.timeout, args.dtype, args.threads)
        if result is None:
            continue
        append_row(config, result, result["threads"], (load_before, os.getloadavg()[0]))
        print(f"  val_bpb {result['val_bpb']:.6f}  steps {result['num_steps']}  {result['compute_dtype']} "
              f"peak {result['peak_tflops']:.3f} TFLOP/s  mfu {result['mfu_percent']:.1f}%  "
              f"total {result['total_seconds']:.0f} s", flush=True)
    print(f"results: {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
