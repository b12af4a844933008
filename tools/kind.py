"""The kind of result a runner command produces, and the training script it runs.

A kind (tools/ledger.py) is what makes two results comparable: time budget, profile, dataset,
backend, hardware tier (with a digest of the defaults the machine resolved: resolved_defaults),
processes and whether the run is standard. It comes from the harness of
the checkout being run (its prepare.py and backends/) and the machine, never from the script. The
harness is asked in a child Python started in that checkout, so the runner always reads the
checkout's own harness, whichever installed copy of the tools runs it.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tools import ledger, scheduler
from tools.runner_state import refuse

# Run with the checkout as the current directory: `python -c` puts it first on the import path,
# so `prepare` and `backends` are that checkout's. Prints one JSON object.
HARNESS_PROBE = """
import json, os
def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
answer = {}
try:
    requested = os.environ.get("AUTORESEARCH_BACKEND", "").strip().lower()
    if requested in ("mlx", "mps", "cuda", "cpu"):
        answer["backend"] = requested
    else:
        from backends import detect_backend
        answer["backend"] = detect_backend()
except Exception as error:
    answer["backend_error"] = first_line(error)
else:
    try:
        import prepare
        from backends import get_hardware_info, suggest_hyperparameters
        from backends.tiers import current_profile
        info = get_hardware_info()
        answer.update(tier=suggest_hyperparameters(info, answer["backend"])["tier"],
                      apple=info.get("kind") == "apple", time_budget=float(prepare.TIME_BUDGET),
                      profile=current_profile(), dataset=prepare.active_dataset(),
                      standard=bool(prepare.is_standard_run()))
    except Exception as error:
        answer["kind_error"] = first_line(error)
    else:
        # What the scripts' defaults resolve to on this machine, as train.py resolves them.
        import backends
        if hasattr(backends, "choose_compute_dtype"):
            dtype = backends.choose_compute_dtype(info, answer["backend"])["dtype"]
            flops = backends.peak_flops_and_source(info, answer["backend"], dtype=dtype)[0]
            answer["defaults"] = dict(suggest_hyperparameters(info, answer["backend"], flops=flops), dtype=dtype)
print(json.dumps(answer))
"""
_probed = {}


def probe_harness(root="."):
    """What the harness of the checkout at `root` says about a run started now: {"backend",
    "tier", "apple", "time_budget", "profile", "dataset", "standard"}, or "backend_error" /
    "kind_error" with the one line that went wrong. Asked once per checkout and environment."""
    key = (str(Path(root).resolve()), tuple(sorted(os.environ.items())))
    if key not in _probed:
        done = subprocess.run([sys.executable, "-c", HARNESS_PROBE], cwd=root, capture_output=True, text=True)
        try:
            _probed[key] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            lines = done.stderr.strip().splitlines()
            _probed[key] = {"backend_error": lines[-1] if lines else f"the harness probe exited {done.returncode}"}
    return _probed[key]


def planned_backend():
    """The backend the training script will use: AUTORESEARCH_BACKEND when it names one, else
    detected (by the checkout's backends/). Raises RuntimeError when that fails."""
    answer = probe_harness()
    if "backend_error" in answer:
        raise RuntimeError(answer["backend_error"])
    return answer["backend"]


def allotted_threads():
    """CPU threads a run started now gets: OMP_NUM_THREADS when set (a parallel slot sets it), else all."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else scheduler.machine_threads()


def expected_kind(threads=None):
    """The Kind a run started now (on `threads` CPU threads; default allotted_threads()) will have,
    from the harness and the machine, not the script. A run that trains on the CPU with fewer
    threads than the machine has (a slot of `submit --workers N`) is a kind of its own, tier
    suffix -Nt: its runs train fewer tokens in the budget, so they are never compared with runs
    that had the whole machine. Refuses (one line) on a set-up problem: no data, bad environment."""
    kind, problem = kind_or_problem(threads)
    if problem:
        refuse(f"set-up error, nothing ran: {problem}")
    return kind


def kind_or_problem(threads=None):
    """(the Kind expected_kind gives, None), or (None, the set-up problem's one line)."""
    answer = probe_harness()
    problem = answer.get("backend_error") or answer.get("kind_error")
    if problem:
        return None, problem
    backend, tier = answer["backend"], answer["tier"]
    threads = threads or allotted_threads()
    defaults = resolved_defaults(threads)
    if defaults:
        tier = f"{tier}:{defaults_digest(defaults)}"
    on_cpu = backend == "cpu" or (backend == "mlx" and not answer["apple"])
    if on_cpu and threads < scheduler.machine_threads():
        tier = f"{tier}-{threads}t"
    return ledger.Kind(answer["time_budget"], answer["profile"], answer["dataset"], backend, tier, 1,
                       answer["standard"]), None


def resolved_defaults(threads=None):
    """The configuration the scripts' defaults resolve to on this machine (the suggested depth,
    widths and batches, the dtype) and the CPU threads a run gets, or None when the harness
    cannot say. Part of the kind: a machine whose defaults resolve differently (a calibration
    that now picks fp32, a tier that suggests another batch) trains another model, so its
    results are never compared with these. The agent's own constants are not in it: changing
    them is the research."""
    defaults = probe_harness().get("defaults")
    if defaults is None:
        return None
    return dict(defaults, threads=threads or allotted_threads())


def defaults_digest(defaults):
    """Six hex digits naming resolved_defaults() in the kind's tier (cpu:1a2b3c)."""
    return hashlib.sha256(json.dumps(defaults, sort_keys=True).encode()).hexdigest()[:6]


def result_kind(fields, expected):
    """The kind a finished run reports: the script's own fields where it gives them."""
    return ledger.Kind(float(fields.get("time_budget", expected.time_budget)), str(fields.get("profile", expected.profile)),
                       str(fields.get("dataset", expected.dataset)), str(fields.get("backend", expected.backend)),
                       expected.tier, int(fields.get("world_size", expected.world_size)),
                       bool(fields.get("standard", expected.standard)))


def training_script():
    """train.py, or train_mlx.py when the backend is mlx."""
    try:
        backend = planned_backend()
    except RuntimeError as error:
        refuse(str(error))
    return "train_mlx.py" if backend == "mlx" else "train.py"


def require_script(script):
    """Refuse unless the training script exists here."""
    if not Path(script).is_file():
        refuse(f"{script} not found in {Path.cwd()}; is this the autoresearch checkout?")


def default_timeout(kind):
    """Twice the time budget plus two minutes for start-up, compilation and evaluation."""
    return kind.time_budget * 2 + 120


def ready_ledger():
    """results.tsv's rows, or a refusal when it is missing, malformed or lost rows."""
    try:
        return ledger.check_ready()
    except ledger.LedgerError as error:
        refuse(str(error))
