"""One training run: the script in its own process group under a hard timeout, then what it was.

execute() runs the script once (output in run.log), watches the machine's load meanwhile
(tools/monitor.py) and classifies the run as a result, a crash, over budget (tools/budget.py),
disturbed, or run as another kind than expected; a set-up error (exit 2 before any summary)
raises Refused. The process group is always killed at the end, stragglers included.
"""

import math
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from backends.report import parse_summary, read_run_json, runner_score_problem, runs_dir
from tools import budget, ledger, monitor, verdict
from tools.kind import result_kind
from tools.runner_state import Refused, probed_speed, record_training_group, signals_held

LOG_FILE = Path("run.log")
KILL_GRACE_SECONDS = 5  # between SIGTERM and SIGKILL for the training process group
SETUP_ERROR_EXIT = 2    # what the training scripts exit with on a one-line set-up error
CRASH_NOTE_CHARS = 100  # of a crash's cause kept in its results.tsv row


@dataclass(frozen=True)
class RunPlan:
    """How every run of one runner command runs: the script, the kind it must produce, the hard
    timeout in seconds, and the share of the CPU other processes may use before it is void."""
    script: str
    kind: ledger.Kind
    timeout: float
    max_disturbance: float


def train_command(script):
    """`uv run <script>`, or AUTORESEARCH_TRAIN_CMD split like a shell would, its {script} replaced
    by the script the runner means (the best's copy when it rechecks the best)."""
    override = os.environ.get("AUTORESEARCH_TRAIN_CMD")
    if not override:
        return ["uv", "run", script]
    return [part.replace("{script}", script) for part in shlex.split(override)]


def kill_group(process):
    """SIGTERM the whole process group, give it a moment, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass


def run_training(command, timeout, load_monitor, record_group=False):
    """Run the command with all output in run.log, in its own process group. Returns (exit code,
    timed out). The group is always killed at the end, stragglers included. record_group: keep
    the group's id in the runner's state while it runs, so the next runner can end it if this one
    is killed (the serial runner; a parallel slot's scheduler ends its own)."""
    process = None
    try:
        with signals_held():
            with open(LOG_FILE, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           env={**os.environ, "AUTORESEARCH_RUNNER_PID": str(os.getpid())})
            if record_group:
                record_training_group(process.pid)
        load_monitor.watch(process.pid)
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        return None, True
    finally:
        if process is not None:
            with signals_held():
                kill_group(process)
                if record_group:
                    record_training_group(None)


class Run:
    """One finished training run: its Outcome for the verdict and what its row says."""

    def __init__(self, outcome, fields=None, note=None, load=None, wall=0.0):
        self.outcome, self.fields, self.note, self.load, self.wall = outcome, fields, note, load, wall

    @property
    def memory_gb(self):
        return float(self.fields.get("peak_vram_mb", 0.0)) / 1024 if self.fields and self.outcome.crash is None else 0.0

    @property
    def val_bpb(self):
        return self.outcome.value if self.outcome.value is not None else (
            float(self.fields["val_bpb"]) if self.fields and self.outcome.crash is None else 0.0)

    def details(self, commit, kind, run_number):
        fields = self.fields or {}
        return {"commit": commit[:7], "kind": str(kind), "run": run_number, "val_bpb": self.val_bpb,
                "evidence": self.outcome.value is not None, "note": self.note,
                "num_steps": fields.get("num_steps"), "tokens_per_second": fields.get("train_tokens_per_second"),
                "machine_speed": fields.get("machine_speed"),
                "machine_speed_change": fields.get("machine_speed_change"),
                "probe_matmul_gflops": fields.get("probe_matmul_gflops"),
                "probe_memory_gb_per_s": fields.get("probe_memory_gb_per_s"),
                "wall_seconds": round(self.wall, 1),
                "other_cpu_share": round(self.load.other_cpu_share, 4) if self.load else None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def log_lines():
    """run.log's non-empty lines, progress lines (carriage returns) split apart."""
    text = LOG_FILE.read_text(errors="replace").replace("\r", "\n") if LOG_FILE.exists() else ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def execute(plan, record_group=False):
    """Run plan.script once and classify what happened. Raises Refused on a set-up error.
    record_group: see run_training."""
    script, timeout, kind, max_disturbance = plan.script, plan.timeout, plan.kind, plan.max_disturbance
    (runs_dir() / "last_run.json").unlink(missing_ok=True)
    load_monitor = monitor.LoadMonitor(watch_gpu=None if kind.backend == "cuda" else False).start()
    started = time.monotonic()
    exit_code, timed_out = run_training(train_command(script), timeout, load_monitor, record_group)
    wall = time.monotonic() - started
    load = load_monitor.finish()
    lines = log_lines()
    last_line = lines[-1] if lines else "run.log is empty"
    fail = next((line for line in lines if line.startswith("FAIL")), None)
    if timed_out:
        return Run(verdict.Outcome(crash=f"timed out after {timeout:g} s, process group killed"), load=load, wall=wall)
    fields = read_run_json(runs_dir() / "last_run.json") or parse_summary("\n".join(lines))
    if exit_code == SETUP_ERROR_EXIT and fields is None and not fail:
        raise Refused(f"the training script stopped before training: {last_line}")
    if exit_code != 0:
        return Run(verdict.Outcome(crash=f"exit code {exit_code}: {fail or last_line}"), load=load, wall=wall)
    if fail:
        return Run(verdict.Outcome(crash=fail), load=load, wall=wall)
    if fields is None:
        return Run(verdict.Outcome(crash=f"no summary in run.log (last line: {last_line})"), load=load, wall=wall)
    try:
        value = float(fields["val_bpb"])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        return Run(verdict.Outcome(crash=f"val_bpb is {fields['val_bpb']!r}"), load=load, wall=wall)
    refused = runner_score_problem("\n".join(lines), kind.backend, "AUTORESEARCH_TRAIN_CMD" in os.environ)
    if refused:
        return Run(verdict.Outcome(crash=f"score refused: {refused}"), load=load, wall=wall)
    ran_as = result_kind(fields, kind)
    if ran_as != kind:
        note = f"unjudged: ran as {ran_as}, expected {kind}"
        return Run(verdict.Outcome(rejected=note), fields, note, load, wall)
    disturbed = load.disturbance(max_disturbance)
    if disturbed:
        return Run(verdict.Outcome(void=disturbed), fields, disturbed, load, wall)
    slow = budget.wall_time_problem(wall, kind.time_budget)
    if slow and load.other_cpu_share > monitor.DISTURBED_SHARE:
        # Accepted load (--max-disturbance) still slows start-up and evaluation: the overrun says
        # nothing about the idea, so the run is not evidence rather than over budget.
        note = (f"disturbed: {slow.removeprefix('over budget: ')} while other processes used "
                f"{100 * load.other_cpu_share:.0f}% of the CPU")
        return Run(verdict.Outcome(void=note), fields, note, load, wall)
    over = slow or budget.token_problem(fields)
    if over:
        return Run(verdict.Outcome(rejected=over), fields, over, load, wall)
    return Run(verdict.Outcome(value=value, speed=probed_speed(fields)), fields, None, load, wall)


def run_line(plan, what):
    """Announce a run: what it is, its command, its timeout."""
    print(f"{what}: {shlex.join(train_command(plan.script))} (timeout {plan.timeout:g} s, output in {LOG_FILE})",
          flush=True)


def run_summary(run):
    """' (num_steps steps, tok/s)' of a run, for the progress lines."""
    fields = run.fields or {}
    if "num_steps" not in fields:
        return ""
    speed = fields.get("train_tokens_per_second")
    return f", {fields['num_steps']} steps" + (f", {float(speed):,.0f} tok/s" if speed else "")


def crash_note(reason):
    """The [crash: ...] tag of a crash row, so the morning report can group crashes by cause."""
    reason = reason.replace("[", "(").replace("]", ")")
    return f"crash: {reason[:CRASH_NOTE_CHARS - 3] + '...' if len(reason) > CRASH_NOTE_CHARS else reason}"
