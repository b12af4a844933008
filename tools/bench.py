"""The benchmark (SPEC §10): how fast each backend on this machine trains, starts, evaluates and
loads data, as a table and as bench.json.

    uv run tools/bench.py                                  # every backend here, 3 runs of 60 s each
    uv run tools/bench.py --backend cpu --seconds 300      # one backend at the standard budget
    uv run tools/bench.py --recalibrate                    # measure the matmul peak again first
    uv run tools/bench.py --profile smoke --seconds 2 --repeats 1   # an end-to-end check in seconds
    uv run tools/bench.py --backend cuda --script /tmp/variant.py  # a variant of train.py instead

For each backend it runs the real training script (`train.py`, which hands MLX over to
`train_mlx.py`) --repeats times as a subprocess with AUTORESEARCH_TIME_BUDGET=--seconds, reads each
run's JSON (the summary plus the timing fields of backends.report.TIMING_KEYS) and reports the
median of every figure. The dataloader is timed on its own in this process with the backend's batch
shape. Each run uses the active dataset (`uv run prepare.py` first) and the default configuration
of the machine's tier, or the tiny smoke one.

Figures per backend (all medians): the dtype the runs computed in and the peak FLOP/s of that
dtype their MFU counts against (the run's own: measured on a CPU, a table on most GPUs), training
tok/s and MFU, time from process start to the first training step, time of the
untimed warm-up steps (compilation, allocator warm-up), evaluation tok/s, dataloader tok/s, the
share of training step time spent waiting for data, peak memory, and the time outside training
(start-up, warm-up, evaluation, summary) as a share of the standard 300 s budget.

Timing-sensitive: run it on an otherwise idle machine, or every figure is lower than it should be.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import backends
import prepare
from backends import hardware
from backends.report import harness_hash, read_run_json

REPO_ROOT = Path(__file__).resolve().parent.parent

ENVIRONMENT = """environment:
  AUTORESEARCH_CACHE_DIR  the data and the cached matmul peak (default ~/.cache/autoresearch)
  AUTORESEARCH_DATASET    which prepared dataset to train on (default: the one prepared last)
  AUTORESEARCH_BACKEND, AUTORESEARCH_PROFILE, AUTORESEARCH_TIME_BUDGET
                          not read: bench sets them for each run from --backend, --profile and
                          --seconds (and AUTORESEARCH_RUNS_DIR to a temporary folder)"""
BACKEND_ORDER = ("cpu", "cuda", "mps", "mlx")
DEFAULT_SECONDS = 60
DEFAULT_REPEATS = 3
LOADER_SECONDS = 1.0       # one dataloader measurement: batches for about this long
RUN_TIMEOUT_EXTRA = 1800   # seconds a run may take beyond its budget (start-up, compile, eval)
STANDARD_BUDGET = 300      # = prepare.STANDARD_TIME_BUDGET: the overhead target is 15% of it
# SPEC §10 targets for the torch CPU backend at the default configuration: (field, test, label).
CPU_TARGETS = (
    ("mfu_percent", lambda value: value >= 50, ">= 50% of the measured matmul peak of the dtype in use"),
    ("data_wait_percent", lambda value: value < 2, "< 2% of step time waiting for data"),
    ("overhead_percent", lambda value: value <= 15, "start-up + compile + eval + summary <= 15% of 300 s"),
)
# Table columns: (field, heading, format).
COLUMNS = (
    ("compute_dtype", "dtype", "{}"),
    ("peak_tflops", "peak TFLOP/s", "{:.3f}"),
    ("train_tokens_per_second", "train tok/s", "{:,.0f}"),
    ("mfu_percent", "MFU %", "{:.1f}"),
    ("startup_seconds", "start s", "{:.1f}"),
    ("untimed_seconds", "warm-up s", "{:.1f}"),
    ("eval_tokens_per_second", "eval tok/s", "{:,.0f}"),
    ("dataloader_tokens_per_second", "loader tok/s", "{:,.0f}"),
    ("data_wait_percent", "data wait %", "{:.2f}"),
    ("peak_memory_mb", "peak MB", "{:,.0f}"),
    ("overhead_percent", "overhead %", "{:.1f}"),
)
# Per-run fields kept in bench.json; medians are taken over these.
RUN_FIELDS = ("train_tokens_per_second", "mfu_percent", "startup_seconds", "untimed_seconds",
              "eval_seconds", "eval_tokens_per_second", "data_wait_percent", "peak_memory_mb",
              "overhead_seconds", "overhead_percent", "training_seconds", "total_seconds",
              "num_steps", "val_bpb", "peak_tflops")


class BenchError(RuntimeError):
    """A run or a measurement failed; the message says which and how."""


def available_backends():
    """The backends this machine can train on, in BACKEND_ORDER: torch CPU wherever torch imports,
    CUDA and MPS where torch sees them, MLX wherever mlx imports (GPU on a Mac, CPU on Linux)."""
    found = {"cpu": hardware.probe_torch(), "cuda": hardware.probe_cuda(),
             "mps": hardware.probe_mps(), "mlx": hardware.probe_mlx() is not None}
    return [name for name in BACKEND_ORDER if found[name]]


def chosen_backends(requested):
    """The backends to benchmark for --backend: all available ones, or the one named if it can run."""
    if requested == "all":
        return available_backends()
    try:
        return [hardware.detect_backend(requested)]
    except hardware.BackendUnavailable as error:
        raise BenchError(str(error)) from None


def run_fields(fields):
    """One run's figures from its JSON: the summary, timing and precision fields under bench's
    names, plus the time outside training (start-up, compile, evaluation, summary) in seconds and
    as a share of the standard budget."""
    overhead = fields["total_seconds"] - fields["training_seconds"]
    figures = {**fields, "peak_memory_mb": fields["peak_vram_mb"], "overhead_seconds": overhead,
               "overhead_percent": 100 * overhead / STANDARD_BUDGET}
    return {key: figures[key] for key in RUN_FIELDS + ("compute_dtype",)}


def run_training(backend, seconds, profile, script=REPO_ROOT / "train.py"):
    """Run train.py (or `script`, a variant of it that imports the harness from this repository)
    once on `backend` for `seconds` of training; returns run_fields of its JSON."""
    with tempfile.TemporaryDirectory(prefix="bench_runs_") as runs_dir:
        env = dict(os.environ, AUTORESEARCH_BACKEND=backend, AUTORESEARCH_TIME_BUDGET=str(seconds),
                   AUTORESEARCH_PROFILE=profile, AUTORESEARCH_RUNS_DIR=runs_dir,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        timeout = 2 * seconds + RUN_TIMEOUT_EXTRA
        try:
            result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT,
                                    env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{backend}: the training run took more than {timeout} s; "
                             f"try fewer --seconds or --profile smoke") from None
        fields = read_run_json(Path(runs_dir) / "last_run.json")
    if result.returncode != 0 or fields is None:
        output = (result.stdout + result.stderr).replace("\r", "\n").strip().splitlines()
        last = output[-1] if output else "no output"
        raise BenchError(f"{backend}: {Path(script).name} failed (exit {result.returncode}): {last}")
    return run_fields(fields)


def loader_rates(batch_size, seq_len, repeats, seconds=LOADER_SECONDS):
    """Tokens per second of prepare.make_dataloader alone (one process, the train split), measured
    `repeats` times for about `seconds` each. The first batch, which fills the packing buffer, is
    part of start-up and not counted."""
    loader = prepare.make_dataloader(prepare.get_tokenizer(), batch_size, seq_len, "train")
    next(loader)
    rates = []
    for _ in range(repeats):
        batches, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or batches == 0:
            next(loader)
            batches += 1
        rates.append(batches * batch_size * seq_len / elapsed)
    return rates


def median_figures(runs):
    """The median of every RUN_FIELDS figure, and the runs' compute dtype (one, or a BenchError)."""
    dtypes = sorted({run["compute_dtype"] for run in runs})
    if len(dtypes) != 1:
        raise BenchError(f"the runs computed in different dtypes ({', '.join(dtypes)}): rerun on a "
                         f"quieter machine, or force COMPUTE_DTYPE in train.py")
    return {"compute_dtype": dtypes[0],
            **{key: statistics.median(run[key] for run in runs) for key in RUN_FIELDS}}


def target_checks(figures):
    """The SPEC §10 targets for the torch CPU backend, each with its value and whether it is met."""
    return {field: {"target": label, "value": figures[field], "met": bool(test(figures[field]))}
            for field, test, label in CPU_TARGETS}


def bench_backend(backend, args, info, loader_cache):
    """Every figure of one backend: its configuration, the median of args.repeats training runs
    (the dtype and peak they measured against among them) and of the dataloader measurements, how
    that peak was obtained, and each run."""
    precision = backends.choose_compute_dtype(info, backend, recalibrate=args.recalibrate)
    peak = backends.peak_flops(info, backend, dtype=precision["dtype"])
    config = backends.suggest_hyperparameters(info, backend, flops=peak)
    shape = (config["device_batch_size"], config["seq_len"])
    if shape not in loader_cache:
        loader_cache[shape] = loader_rates(*shape, args.repeats)
    runs = []
    for index in range(args.repeats):
        run = run_training(backend, args.seconds, args.profile, args.script)
        runs.append(run)
        print(f"  {backend} run {index + 1}/{args.repeats}: {run['train_tokens_per_second']:,.0f} "
              f"tok/s, mfu {run['mfu_percent']:.1f}%, start-up {run['startup_seconds']:.1f} s, "
              f"warm-up {run['untimed_seconds']:.1f} s, eval {run['eval_seconds']:.1f} s", flush=True)
    figures = {**median_figures(runs),
               "dataloader_tokens_per_second": statistics.median(loader_cache[shape])}
    peak_source = backends.peak_flops_and_source(info, backend, dtype=figures["compute_dtype"])[1]
    result = {**figures, "peak_source": peak_source, "dtype_choice": precision["how"],
              "config": config, "dataloader_runs": loader_cache[shape], "runs": runs}
    if backend == "cpu" and args.profile == "standard":
        result["targets"] = target_checks(figures)
    return result


def git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return result.stdout.strip() or None


def format_table(results):
    """One row per backend, one column per COLUMNS figure, aligned for a terminal or README."""
    header = ["backend"] + [heading for _, heading, _ in COLUMNS]
    rows = [[name] + [fmt.format(result[field]) for field, _, fmt in COLUMNS]
            for name, result in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=ENVIRONMENT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("all",) + BACKEND_ORDER, default="all",
                        help="one backend, or all that this machine has (default)")
    parser.add_argument("--profile", choices=("standard", "smoke"), default="standard",
                        help="the tier's default configuration (default) or the tiny smoke one")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"training budget of each run (default {DEFAULT_SECONDS})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"runs per backend; figures are their medians (default {DEFAULT_REPEATS})")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure the matmul peak again before computing MFU (it can only go up)")
    parser.add_argument("--script", type=Path, default=REPO_ROOT / "train.py",
                        help="the training script to run (default train.py): a variant of it, "
                             "e.g. with one constant changed, to compare against it")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench.json"),
                        help="where to write the JSON (default bench.json)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be positive and --repeats at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["AUTORESEARCH_PROFILE"] = args.profile  # the configuration this process measures too
    try:
        dataset = prepare.active_dataset()
        prepare.get_tokenizer()
        names = chosen_backends(args.backend)
    except (prepare.DataError, BenchError) as error:
        raise SystemExit(f"bench: {error}") from None
    info = backends.get_hardware_info()
    print(f"bench: {', '.join(names)} on {info['chip']} ({info['cpu_cores']} CPU cores), dataset "
          f"{dataset}, profile {args.profile}, {args.repeats} x {args.seconds:g} s per backend",
          flush=True)
    results, loader_cache = {}, {}
    for name in names:
        try:
            results[name] = bench_backend(name, args, info, loader_cache)
        except BenchError as error:
            raise SystemExit(f"bench: {error}") from None
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {key: info.get(key) for key in ("chip", "cpu_model", "cpu_cores", "cpu_threads",
                                                   "memory_gb", "os", "arch", "kind", "gpu_name")},
        "python": platform.python_version(),
        "commit": git_commit(),
        "script": str(args.script),
        "harness": harness_hash(),
        "dataset": dataset,
        "profile": args.profile,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "backends": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(results))
    for name, result in results.items():
        print(f"{name}: {result['compute_dtype']}, chosen from {result['dtype_choice']}; peak "
              f"{result['peak_tflops']:.3f} TFLOP/s ({result['peak_source']})")
        for check in result.get("targets", {}).values():
            verdict = "met" if check["met"] else "NOT met"
            print(f"  target {check['target']}: {check['value']:.2f} ({verdict})")
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
