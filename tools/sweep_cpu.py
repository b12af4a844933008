"""Sweep model size and batch for the CPU tier, with the real training script and the standard budget.

Each configuration runs a copy of train.py whose size/batch constants are replaced by literals,
on the active dataset (prepare pystdlib first), one after another on an otherwise idle machine.
Every finished run appends one row to tools/sweep_cpu_results.tsv; the configuration with the
lowest val_bpb is what backends/tiers.py uses as CPU_TIER.

    uv run tools/sweep_cpu.py                                   # the default grid below
    uv run tools/sweep_cpu.py --config depth=3,seq_len=1024     # one configuration (others default)

Timing-sensitive: run nothing else on the machine meanwhile, or the numbers mean little.
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
BASE = {"depth": 4, "aspect_ratio": 64, "head_dim": 64, "window_pattern": "L", "seq_len": 2048,
        "device_batch_size": 8, "total_batch_size": 2**14}
GRID = [
    {"depth": 2, "aspect_ratio": 96, "seq_len": 512, "device_batch_size": 32},
    {"depth": 4, "seq_len": 512, "device_batch_size": 32},
    {"depth": 4, "seq_len": 2048, "device_batch_size": 8},
    {"depth": 6, "seq_len": 512, "device_batch_size": 32},
]
CONSTANT_NAMES = {"depth": "DEPTH", "aspect_ratio": "ASPECT_RATIO", "head_dim": "HEAD_DIM",
                  "window_pattern": "WINDOW_PATTERN", "seq_len": "SEQ_LEN",
                  "device_batch_size": "DEVICE_BATCH_SIZE", "total_batch_size": "TOTAL_BATCH_SIZE"}
COLUMNS = list(BASE) + ["val_bpb", "num_steps", "num_params_M", "total_tokens_M", "mfu_percent",
                        "training_seconds", "total_seconds", "peak_vram_mb", "standard", "date"]


def script_with_config(source, config):
    """train.py's text with each size/batch constant set to a literal from config."""
    for key, value in config.items():
        name = CONSTANT_NAMES[key]
        pattern = re.compile(rf"^{name} = .*$", re.MULTILINE)
        if not pattern.search(source):
            raise SystemExit(f"sweep: train.py has no line '{name} = ...' to set; update CONSTANT_NAMES")
        source = pattern.sub(f"{name} = {value!r}", source, count=1)
    return source


def run_config(config, timeout):
    """Run one configuration to the end; returns the run's JSON fields, or None if it failed."""
    source = script_with_config((REPO_ROOT / "train.py").read_text(), config)
    with tempfile.TemporaryDirectory() as runs_dir:
        script = REPO_ROOT / f".sweep_train_{os.getpid()}.py"  # beside prepare.py so imports resolve
        script.write_text(source)
        env = dict(os.environ, AUTORESEARCH_BACKEND="cpu", AUTORESEARCH_RUNS_DIR=runs_dir)
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
        return json.loads(result_path.read_text())


def append_row(config, result):
    new_file = not RESULTS_PATH.exists()
    with RESULTS_PATH.open("a", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        if new_file:
            writer.writerow(COLUMNS)
        row = dict(config, date=time.strftime("%Y-%m-%d %H:%M"))
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
    args = parser.parse_args()
    configs = [parse_config(c) for c in args.config] if args.config else [dict(BASE, **g) for g in GRID]
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config}", flush=True)
        result = run_config(config, args.timeout)
        if result is None:
            continue
        append_row(config, result)
        print(f"  val_bpb {result['val_bpb']:.6f}  steps {result['num_steps']}  "
              f"mfu {result['mfu_percent']:.1f}%  total {result['total_seconds']:.0f} s", flush=True)
    print(f"results: {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
