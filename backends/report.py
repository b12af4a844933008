"""The result of one training run: the summary block both scripts print, its JSON twin, and the
hash of the locked harness that produced it.

The summary is the contract between a training script and whoever reads run.log (an agent with
grep, or tools/experiment.py). Its first keys and their order are fixed (SUMMARY_KEYS), then the
keys that make a result comparable (CONTEXT_KEYS), then any extras. The same fields are written as
JSON to runs/last_run.json (stable path) and runs/run_<timestamp>.json (archive).

Both scripts build the comparability fields with run_context() and add the TIMING_KEYS extras
(where the run's wall-clock time went) and the PRECISION_KEYS, which tools/bench.py reads, then
the BUDGET_KEYS (the token accounting tools/budget.py checks). total_tokens_M counts every step,
the untimed ones too: total_tokens_M = (timed_tokens + untimed_tokens) / 1e6 = num_steps *
total_batch_size / 1e6. Then come the EVAL_KEYS of the final evaluation (backends/run.py): what
it scored, which score_problem() checks before the runner takes val_bpb as a result. Last, the
MACHINE_KEYS: the machine's own speed during the run (backends/machine_speed.py), which the keep
rule uses to take the machine out of the noise.
"""

import hashlib
import json
import math
import os
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "backend", "chip",
)
CONTEXT_KEYS = ("dataset", "eval_tokens", "time_budget", "harness")
RUN_EXTRA_KEYS = ("standard", "profile", "world_size")  # run_context() adds these after CONTEXT_KEYS
# Where a run's time went, after the keys above. startup: process start to the first step;
# untimed: the untimed first step(s) (compilation, warm-up); data_wait_percent: share of timed
# step time spent in the loader (and the copy to the device); eval: the final evaluate_bpb.
TIMING_KEYS = ("startup_seconds", "untimed_seconds", "train_tokens_per_second", "data_wait_percent",
               "eval_seconds", "eval_tokens_per_second")
# What the run computed in, after the timing keys: its dtype ("bf16" or "fp32") and the peak
# FLOP/s of that dtype its mfu_percent is counted against, in TFLOP/s.
PRECISION_KEYS = ("compute_dtype", "peak_tflops")
# The tokens of the untimed and the timed steps and the batch they were counted in.
BUDGET_KEYS = ("untimed_steps", "untimed_tokens", "timed_tokens", "total_batch_size")
# What the evaluation scored: the targets that have bytes, their UTF-8 bytes and the nats summed
# over them (val_bpb = eval_nats / (ln 2 * eval_bytes)).
EVAL_KEYS = ("eval_scored_tokens", "eval_bytes", "eval_nats")
# The probes of the machine's speed (backends/machine_speed.summarize); absent when none ran.
MACHINE_KEYS = ("machine_speed", "machine_speed_change", "machine_speed_probes", "probe_matmul_gflops",
                "probe_memory_gb_per_s", "probe_matmul_series", "probe_memory_series", "probe_seconds")
# How each numeric field is written, so every run prints the same widths and decimals.
_FORMATS = {
    "val_bpb": "{:.6f}", "training_seconds": "{:.1f}", "total_seconds": "{:.1f}",
    "peak_vram_mb": "{:.1f}", "mfu_percent": "{:.2f}", "total_tokens_M": "{:.1f}",
    "num_params_M": "{:.1f}", "startup_seconds": "{:.2f}", "untimed_seconds": "{:.2f}",
    "train_tokens_per_second": "{:.0f}", "data_wait_percent": "{:.2f}", "eval_seconds": "{:.2f}",
    "eval_tokens_per_second": "{:.0f}", "peak_tflops": "{:.3f}", "eval_nats": "{:.6f}",
    "machine_speed": "{:.4f}", "machine_speed_change": "{:+.4f}", "probe_matmul_gflops": "{:.3f}",
    "probe_memory_gb_per_s": "{:.3f}", "probe_seconds": "{:.3f}",
}
LOCKED_PATHS = ("prepare.py", "dataset_builders.py", "backends")  # the harness; the agent never edits it


def runs_dir():
    """Where run JSON files go: AUTORESEARCH_RUNS_DIR, else ./runs under the current directory."""
    return Path(os.environ.get("AUTORESEARCH_RUNS_DIR", "runs"))


def harness_hash(root=REPO_ROOT):
    """Short sha256 over the locked files (LOCKED_PATHS: the files, and each folder's *.py), in a
    fixed order."""
    root = Path(root)
    files = [path for locked in LOCKED_PATHS
             for path in (sorted((root / locked).glob("*.py")) if (root / locked).is_dir() else [root / locked])]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes() if path.exists() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def run_context(world_size=1, backend=None):
    """CONTEXT_KEYS then RUN_EXTRA_KEYS for a run in this process, in summary order: the active
    dataset, the evaluation budget (of the backend that trains), the time budget, the harness
    hash, whether the result is standard (comparable), the profile and the number of training
    processes."""
    import prepare  # here, not at the top: the runner imports this module and needs no numpy
    from backends.tiers import current_profile

    return {
        "dataset": prepare.active_dataset(),
        "eval_tokens": prepare.eval_token_budget(backend),
        "time_budget": prepare.TIME_BUDGET,
        "harness": harness_hash(),
        "standard": prepare.is_standard_run(),
        "profile": current_profile(),
        "world_size": world_size,
    }


def _format_value(key, value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in _FORMATS and isinstance(value, (int, float)):
        return _FORMATS[key].format(value)
    return str(value)


def format_summary(fields):
    """The summary block: '---' then 'key: value' lines, SUMMARY_KEYS, CONTEXT_KEYS, then extras
    (lists, the probes' series, only in the JSON).

    A missing required key is a bug in the training script, so it raises instead of printing a
    summary that tools would misread.
    """
    missing = [k for k in SUMMARY_KEYS + CONTEXT_KEYS if k not in fields]
    if missing:
        raise KeyError(f"summary is missing required keys: {', '.join(missing)}")
    # Series (every probe's reading) go to the JSON only: dozens of numbers on a line help no reader.
    ordered = list(SUMMARY_KEYS + CONTEXT_KEYS) + [k for k in fields if k not in SUMMARY_KEYS + CONTEXT_KEYS
                                                   and not isinstance(fields[k], list)]
    width = max(len(k) for k in ordered) + 2
    lines = ["---"] + [f"{k + ':':<{width}}{_format_value(k, fields[k])}" for k in ordered]
    return "\n".join(lines)


def _parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return text


def parse_summary(log_text):
    """Fields of the last summary block in a log, or None when the log holds no complete summary.

    Progress lines use '\\r', so the text is split on both kinds of line end. A block counts only
    if it has every SUMMARY_KEYS entry (a run killed mid-print is not a result).
    """
    lines = log_text.replace("\r", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    for start in reversed(starts):
        fields = {}
        for line in lines[start + 1:]:
            key, sep, value = line.partition(":")
            if not sep or not key or " " in key.strip():
                break
            fields[key.strip()] = _parse_value(value.strip())
        if all(k in fields for k in SUMMARY_KEYS):
            return fields
    return None


def write_run_json(fields, directory=None):
    """Write the fields to <dir>/last_run.json and a timestamped copy; returns the stable path.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    directory = Path(directory) if directory is not None else runs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(fields, indent=2, sort_keys=False) + "\n"
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for name in (f"run_{stamp}_{os.getpid()}.json", "last_run.json"):
        tmp = directory / (name + ".tmp")
        tmp.write_text(payload)
        os.replace(tmp, directory / name)
    return directory / "last_run.json"


def read_run_json(path):
    """Fields from a run JSON file, or None if it is absent or not a complete result."""
    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict) or not all(k in fields for k in SUMMARY_KEYS):
        return None
    return fields


def score_problem(record, log_text, expected_counts):
    """Why a run's val_bpb cannot be taken as its result (one line), or None when it can.

    record: the run's JSON record (read_run_json), or None; log_text: its run.log;
    expected_counts: {"eval_scored_tokens", "eval_bytes"} of the kind's validation split
    (prepare.eval_split_counts). A score is taken only from a record of the locked evaluation
    that scored exactly the split's tokens and bytes, whose val_bpb follows from its own nats
    and bytes, and whose summary in run.log says the same.
    """
    if record is None:
        return "no record of the evaluation in runs/last_run.json"
    missing = [key for key in EVAL_KEYS if not isinstance(record.get(key), (int, float))]
    if missing:
        return f"the record lacks {', '.join(missing)}: it was not written by the locked evaluation"
    for key, what in (("eval_scored_tokens", "tokens"), ("eval_bytes", "bytes")):
        if record[key] != expected_counts[key]:
            return (f"the evaluation scored {record[key]:,} {what}, the validation split holds "
                    f"{expected_counts[key]:,}")
    try:
        val_bpb = float(record["val_bpb"])
    except (TypeError, ValueError):
        return f"val_bpb is {record['val_bpb']!r}"
    measured = record["eval_nats"] / (math.log(2) * record["eval_bytes"])
    if not math.isclose(val_bpb, measured, rel_tol=1e-9):
        return f"the record's val_bpb {val_bpb:.6f} is not its evaluation's {measured:.6f}"
    printed = parse_summary(log_text)
    if printed is None:
        return "run.log holds no summary to check the record against"
    for key in ("val_bpb",) + EVAL_KEYS[:2]:
        if _format_value(key, printed.get(key)) != _format_value(key, record[key]):
            return f"run.log's summary says {key} {printed.get(key)}, the record {_format_value(key, record[key])}"
    return None


def runner_score_problem(log_text, backend, custom_command=False):
    """score_problem() of the run that just wrote runs/last_run.json, against the validation
    split of the active dataset at `backend`'s evaluation budget; what tools/experiment.py asks
    before it takes a val_bpb. A custom AUTORESEARCH_TRAIN_CMD (custom_command) whose record does
    not come from the locked evaluation (no EVAL_KEYS) is the user's own measurement: None."""
    record = read_run_json(runs_dir() / "last_run.json")
    if custom_command and (record is None or not any(key in record for key in EVAL_KEYS)):
        return None
    import prepare  # here, not at the top: the runner imports this module without numpy

    return score_problem(record, log_text, prepare.eval_split_counts(backend))
