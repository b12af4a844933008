"""The experiment runner: one command per experiment, so the research loop stays safe and honest.

    uv run tools/experiment.py baseline [--repeat N]   # run the current best until it has 6 runs
    uv run tools/experiment.py run "what this tries"   # one experiment -> rows in results.tsv, one verdict
    uv run tools/experiment.py status                  # kind, best (mean, runs), sigma, counts, last verdict
    uv run tools/experiment.py best                    # the best result of this branch as a results.tsv row
    uv run tools/experiment.py submit "what this tries" # parallel: queue the edit as a candidate, return at once
    uv run tools/experiment.py wait                    # parallel: judge finished runs, print the next verdict(s)
    uv run tools/experiment.py baseline --workers 2    # parallel: the best's runs on the slots (their own kind)

`run` refuses (exit 2, nothing changed) when another runner holds the lock, when prepare.py or
backends/ differ from the branch's base (its merge-base with main or master), when results.tsv
is missing or malformed or lost rows, or when the current best has no runs of this kind yet. Else
it commits the training-script change (train.py, or train_mlx.py when the backend is mlx) with
the description as message and runs it, output in run.log, under a hard timeout that kills the
whole process group. Each run becomes one results.tsv row; tools/verdict.py decides after each
run whether to keep, discard or rerun (grey zone), and a kept change is rerun until its mean rests
on verdict.BEST_RUNS runs. Then the branch advances (keep) or goes back to the best (discard, crash).

What a run counts as:
- a result: val_bpb, compared with the best's mean under the verdict rule;
- a crash (non-zero exit, FAIL, no summary, a non-numeric val_bpb, the timeout): the idea failed;
- over budget (tools/budget.py): its val_bpb is recorded but it is never kept;
- disturbed (tools/monitor.py: other work used more than --max-disturbance of the CPU, or the GPU
  had other processes): not evidence; rerun up to verdict.MAX_VOID_RUNS times, then the experiment
  is not judged and the edit goes back to the working tree (exit 2);
- a set-up error (the script exits 2 without a summary: no data, bad environment): refused, no row,
  the edit goes back to the working tree.

How the pieces stay consistent:
- One runner at a time per checkout (a lock under .autoresearch/); a second one refuses at once.
- Reverts use `git reset --keep <best>`: only the training script's commit is undone. results.tsv
  is never committed; every row the runner writes is also appended to .autoresearch/results.tsv.
- Ctrl-C, SIGTERM or SIGHUP (a closed terminal) kills the training process group, records the
  candidate's finished runs as unjudged, undoes the experiment commit with `git reset --soft` (the
  edit stays, staged) and exits 130. If the runner itself is killed, the next one finishes that
  clean-up before it does anything else. Git and results.tsv changes run with signals held back.
- Exit status: 0 when a verdict was recorded (crash included), 2 when refused or not judged, 130
  when interrupted.

Parallel experiments (Ray, `uv sync --group parallel`; docs/distributed.md): `submit` commits the
edit as a candidate on top of the best under refs/autoresearch/candidates/, restores the script
and queues it; the scheduler (tools/cluster.py) runs queued runs on slots; `wait`, under the same
lock, is the one writer that judges them (tools/scheduler.py replays them through tools/verdict.py),
moves or rebases, and writes their rows. `status` adds the slots and the queue.

Environment variables: AUTORESEARCH_TRAIN_CMD replaces `uv run <script>` (tests point it at a fake
script); AUTORESEARCH_BACKEND, AUTORESEARCH_PROFILE, AUTORESEARCH_DATASET, AUTORESEARCH_TIME_BUDGET
and AUTORESEARCH_CACHE_DIR pass through to the training script and decide the result's kind;
AUTORESEARCH_RUNS_DIR is where the scripts write their JSON (default runs/).
"""

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))
import budget  # noqa: E402
import ledger  # noqa: E402
import monitor  # noqa: E402
import scheduler  # noqa: E402
import verdict  # noqa: E402
from backends.report import LOCKED_PATHS, parse_summary, read_run_json, runner_score_problem, runs_dir  # noqa: E402

LOG_FILE = Path("run.log")
STATE_DIR = Path(".autoresearch")  # the runner's memory; ignores itself in git
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = STATE_DIR / "lock"
DETAILS_FILE = "experiments.jsonl"  # in runs_dir(): steps, tok/s, load and wall time of every run
BASE_BRANCHES = ("main", "master")
KILL_GRACE_SECONDS = 5  # between SIGTERM and SIGKILL for the training process group
SETUP_ERROR_EXIT = 2    # what the training scripts exit with on a one-line set-up error
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CONCRETE_BACKENDS = ("mlx", "mps", "cuda", "cpu")
CRASH_NOTE_CHARS = 100  # of a crash's cause kept in its results.tsv row


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP reached the runner."""


class Refused(Exception):
    """Not the idea's fault: the run could not start or could not be judged; nothing is lost."""


def _raise_interrupted(signum, frame):
    raise Interrupted


@contextlib.contextmanager
def signals_held():
    """Hold back the handled signals until the block is done, then act on them.

    Wraps every step that changes git or results.tsv, so an interruption can never land between a
    commit and its bookkeeping.
    """
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted


def refuse(message):
    print(f"refusing to run: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


# ---------------------------------------------------------------------------------------------
# git

def git(*args):
    """Output of a git command. Own session, so a Ctrl-C at the terminal never cuts git short."""
    result = subprocess.run(["git", *args], capture_output=True, text=True, start_new_session=True)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SystemExit(f"git {args[0]} failed: {detail[-1] if detail else 'no output'}")
    return result.stdout.strip()


def repo_root():
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit("not inside a git repository: run this from your autoresearch checkout")
    return Path(found.stdout.strip())


def head():
    return git("rev-parse", "HEAD")


def current_branch():
    result = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def branch_base():
    """(name, commit): where this branch left main (or master); the harness must match it."""
    for name in BASE_BRANCHES:
        exists = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                                capture_output=True, text=True)
        if exists.returncode == 0:
            return name, git("merge-base", "HEAD", name)
    raise SystemExit("no main or master branch to compare prepare.py and backends/ against")


def harness_changes(base):
    """Locked paths that differ from the base commit: committed, staged, unstaged or new."""
    changed = git("diff", "--name-only", base, "--", *LOCKED_PATHS).split()
    added = git("ls-files", "--others", "--exclude-standard", "--", *LOCKED_PATHS).split()
    return sorted(set(changed + added))


def require_clean_harness():
    """Refuse unless we are on an experiment branch whose locked files match the base."""
    branch = current_branch()
    if branch is None:
        refuse("HEAD is detached; check out your experiment branch (autoresearch/<tag>)")
    if branch in BASE_BRANCHES:
        refuse(f"on {branch}; experiments run on their own branch: git checkout -b autoresearch/<tag>")
    base_name, base = branch_base()
    changed = harness_changes(base)
    if changed:
        refuse(f"the harness is locked but {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} "
               f"from {base[:7]} ({base_name}); undo that with: git checkout {base[:7]} -- {' '.join(LOCKED_PATHS)}")


def commit_script(script, message):
    """Commit the training script alone; False when it has no change to commit."""
    if not git("status", "--porcelain", "--", script):
        return False
    git("add", "--", script)
    git("commit", "--quiet", "-m", message, "--", script)
    return True


# ---------------------------------------------------------------------------------------------
# the runner's own files: lock, state, per-run details

@contextlib.contextmanager
def exclusive_lock(patience=0.0):
    """Hold .autoresearch/lock for the whole command; a second runner refuses at once (or after
    `patience` seconds: submit and wait hold it only briefly, so they queue up behind each other)."""
    STATE_DIR.mkdir(exist_ok=True)
    (STATE_DIR / ".gitignore").write_text("*\n")
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    give_up = time.monotonic() + patience
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < give_up:
                    time.sleep(0.1)
                    continue
                holder = Path(LOCK_FILE).read_text().strip() or "another process"
                refuse(f"another experiment is running in this checkout ({holder}); wait for it to finish "
                       f"(uv run tools/experiment.py status shows it)")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {shlex.join(sys.argv[1:])}, since {time.strftime('%H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)


def lock_holder():
    """What holds the lock now, or None."""
    return (LOCK_FILE.read_text().strip() or "another process") if scheduler.lock_is_held(LOCK_FILE) else None


def load_state():
    try:
        state = json.loads(STATE_FILE.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(state):
    STATE_DIR.mkdir(exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, STATE_FILE)


def record_details(entries):
    if not entries:
        return
    path = runs_dir() / DETAILS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in entries))


def details_of(commit, kind):
    """The recorded details (num_steps, tok/s, ...) of every evidence run of a commit and kind."""
    path = runs_dir() / DETAILS_FILE
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("commit") == commit[:7] and entry.get("kind") == kind and entry.get("evidence"):
            found.append(entry)
    return found


# ---------------------------------------------------------------------------------------------
# the kind of result this invocation produces

def planned_backend():
    """The backend the training script will use: AUTORESEARCH_BACKEND when it names one, else detected."""
    requested = os.environ.get("AUTORESEARCH_BACKEND", "").strip().lower()
    if requested in CONCRETE_BACKENDS:
        return requested
    from backends import detect_backend
    return detect_backend()


def allotted_threads():
    """CPU threads a run started now gets: OMP_NUM_THREADS when set (a parallel slot sets it), else all."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else scheduler.machine_threads()


def expected_kind(threads=None):
    """The Kind a run started now (on `threads` CPU threads; default allotted_threads()) will have,
    from the harness and the machine, not the script. A run that trains on the CPU with fewer
    threads than the machine has (a slot of `submit --workers N`) is a kind of its own, tier
    suffix -Nt: its runs train fewer tokens in the budget, so they are never compared with runs
    that had the whole machine."""
    try:
        import prepare
        from backends import get_hardware_info, suggest_hyperparameters
        from backends.tiers import current_profile
        backend = planned_backend()
        info = get_hardware_info()
        tier = suggest_hyperparameters(info, backend)["tier"]
        threads = threads or allotted_threads()
        on_cpu = backend == "cpu" or (backend == "mlx" and info.get("kind") != "apple")
        if on_cpu and threads < scheduler.machine_threads():
            tier = f"{tier}-{threads}t"
        return ledger.Kind(float(prepare.TIME_BUDGET), current_profile(), prepare.active_dataset(), backend,
                           tier, 1, bool(prepare.is_standard_run()))
    except SystemExit:
        raise
    except Exception as error:  # a set-up problem (no data, bad environment), reported in one line
        refuse(f"set-up error, nothing ran: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}")


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
    if not Path(script).is_file():
        refuse(f"{script} not found in {Path.cwd()}; is this the autoresearch checkout?")


def default_timeout(kind):
    """Twice the time budget plus two minutes for start-up, compilation and evaluation."""
    return kind.time_budget * 2 + 120


def ready_ledger():
    try:
        return ledger.check_ready()
    except ledger.LedgerError as error:
        refuse(str(error))


# ---------------------------------------------------------------------------------------------
# one training run

def train_command(script):
    override = os.environ.get("AUTORESEARCH_TRAIN_CMD")
    return shlex.split(override) if override else ["uv", "run", script]


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


def run_training(command, timeout, load_monitor):
    """Run the command with all output in run.log, in its own process group. Returns (exit code,
    timed out). The group is always killed at the end, stragglers included."""
    process = None
    try:
        with open(LOG_FILE, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "AUTORESEARCH_RUNNER_PID": str(os.getpid())})
        load_monitor.watch(process.pid)
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        return None, True
    finally:
        if process is not None:
            with signals_held():
                kill_group(process)


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
                "wall_seconds": round(self.wall, 1),
                "other_cpu_share": round(self.load.other_cpu_share, 4) if self.load else None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def log_lines():
    text = LOG_FILE.read_text(errors="replace").replace("\r", "\n") if LOG_FILE.exists() else ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def execute(script, timeout, kind, max_disturbance):
    """Run the training script once and classify what happened. Raises Refused on a set-up error."""
    (runs_dir() / "last_run.json").unlink(missing_ok=True)
    load_monitor = monitor.LoadMonitor(watch_gpu=None if kind.backend == "cuda" else False).start()
    started = time.monotonic()
    exit_code, timed_out = run_training(train_command(script), timeout, load_monitor)
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
    return Run(verdict.Outcome(value=value), fields, None, load, wall)


def run_line(script, timeout, what):
    print(f"{what}: {shlex.join(train_command(script))} (timeout {timeout:g} s, output in {LOG_FILE})", flush=True)


def run_summary(run):
    """' (num_steps steps, tok/s)' of a run, for the progress lines."""
    fields = run.fields or {}
    if "num_steps" not in fields:
        return ""
    speed = fields.get("train_tokens_per_second")
    return f", {fields['num_steps']} steps" + (f", {float(speed):,.0f} tok/s" if speed else "")


# ---------------------------------------------------------------------------------------------
# commands

def crash_note(reason):
    """The [crash: ...] tag of a crash row, so the morning report can group crashes by cause."""
    reason = reason.replace("[", "(").replace("]", ")")
    return f"crash: {reason[:CRASH_NOTE_CHARS - 3] + '...' if len(reason) > CRASH_NOTE_CHARS else reason}"


def pending_rows(pending, status):
    """results.tsv rows for a candidate's runs once its status is known."""
    rows = []
    for run in pending:
        row_status = "crash" if run["crash"] else (status if run["evidence"] else "discard")
        rows.append(ledger.format_row(run["commit"], run["val_bpb"], run["memory_gb"], row_status, run["description"]))
    return rows


def flush_unjudged(state, why):
    """Write the finished runs of a cut-short experiment as unjudged discards; True if any."""
    progress = state.get("in_progress") or {}
    pending = progress.get("pending", [])
    for run in pending:
        if not run["crash"]:
            run["description"] = run["description"].replace(f" {run['kind_tag']}", f" [unjudged: {why}] {run['kind_tag']}")
    ledger.append(pending_rows(pending, "discard"))
    return bool(pending)


def recover_interrupted():
    """Finish the clean-up of a runner that was killed mid-experiment (its state says so)."""
    state = load_state()
    progress = state.get("in_progress")
    if not progress:
        return
    with signals_held():
        flush_unjudged(state, "the runner was stopped")
        undone = progress.get("committed") and head() == progress["commit"]
        if undone:
            git("reset", "--quiet", "--soft", progress["kept"])
        state.pop("in_progress")
        save_state(state)
    if undone:
        refuse(f"the last runner stopped before judging {progress['commit'][:7]} ({progress['description']}); "
               f"its commit was undone and its edit is staged in {progress['script']} together with any "
               f"newer change: check the file, then run again")


def best_context(kind, commit, values):
    """'best 1.234567 mean of 6 runs, 210 steps, 12,000 tok/s' for the verdict line."""
    text = f"best {verdict.mean(values):.6f} mean of {len(values)}"
    details = details_of(commit, str(kind))
    steps = [d["num_steps"] for d in details if isinstance(d.get("num_steps"), (int, float))]
    speeds = [d["tokens_per_second"] for d in details if isinstance(d.get("tokens_per_second"), (int, float))]
    if steps:
        text += f", {verdict.mean(steps):.0f} steps"
    if speeds:
        text += f", {verdict.mean(speeds):,.0f} tok/s"
    return text


def candidate_context(runs):
    steps = [r.fields["num_steps"] for r in runs if r.outcome.value is not None and "num_steps" in r.fields]
    speeds = [float(r.fields["train_tokens_per_second"]) for r in runs
              if r.outcome.value is not None and "train_tokens_per_second" in r.fields]
    text = ""
    if steps:
        text += f", {verdict.mean(steps):.0f} steps"
    if speeds:
        text += f", {verdict.mean(speeds):,.0f} tok/s"
    return text


def verdict_line(result, commit, description, kind, best_commit, best_values, runs, extra=None):
    label = f"{commit[:7]} {description}"
    if result.status == "crash":
        return f"CRASH    0.000000 ({result.reason}) {label}"
    if not result.values:
        return f"DISCARD  {runs[-1].val_bpb:.6f} ({result.reason}) {label}"
    decision = result.decision
    mean = verdict.mean(result.values)
    parts = [f"mean of {len(result.values)}{candidate_context(runs)}", best_context(kind, best_commit, best_values),
             f"{-verdict.mean(best_values) + mean:+.6f}"]
    if decision is not None and decision.noise is not None:
        parts.append(decision.noise.describe())
    parts.append(result.reason)
    if extra:
        parts.append(extra)
    return f"{result.status.upper():<8} {mean:.6f} ({'; '.join(parts)}) {label}"


def confirm_runs(script, timeout, kind, commit, description, max_disturbance, values, what, target=verdict.BEST_RUNS):
    """Rerun the committed HEAD until it has `target` evidence runs; each row is written at once
    (status keep: HEAD is the best). Returns the best's values, old and new."""

    def run_once(attempt):
        number = ledger.next_run_number(ledger.read(), commit, str(kind))
        run_line(script, timeout, f"{what} (run {number} of {commit[:7]}, until {target} count)")
        run = execute(script, timeout, kind, max_disturbance)
        status = "crash" if run.outcome.crash else ("keep" if run.outcome.value is not None else "discard")
        note = run.note if status != "crash" else crash_note(run.outcome.crash)
        with signals_held():
            ledger.append([ledger.format_row(commit, run.val_bpb, run.memory_gb, status,
                                             ledger.describe(description, kind, number, note))])
            record_details([dict(run.details(commit, kind, number), status=status)])
        shown = f"{run.val_bpb:.6f}{run_summary(run)}" if run.outcome.value is not None else (
            run.note or run.outcome.crash)
        print(f"{'CONFIRM':<8} {shown} {commit[:7]} [run {number}]", flush=True)
        return run.outcome

    return verdict.confirm_best(run_once, values, target)


def first_description(rows, commit, kind, default):
    for row in rows:
        if row.commit == commit[:7] and row.kind == str(kind):
            text = ledger.KIND_TAG.sub("", row.description)
            return ledger.RUN_TAG.sub("", text).split(" [")[0] or default
    return default


def experiment_setup(args, threads=None, baseline_command="baseline"):
    """The checks an experiment makes under the lock before it commits anything: (script, rows,
    kind, best commit, the best's values of that kind). Refuses when the best has no such values."""
    recover_interrupted()
    require_clean_harness()
    script = args.script or training_script()
    require_script(script)
    rows = ready_ledger()
    kind = expected_kind(threads)
    best = head()
    values = ledger.values_of(rows, best, str(kind))
    if not values:
        refuse(f"the best commit {best[:7]} has no results of kind {kind} yet: measure it first with "
               f"uv run tools/experiment.py {baseline_command} (it runs the current code {verdict.BEST_RUNS} times)")
    return script, rows, kind, best, values


def planned_slot_threads(args):
    """CPU threads of each slot `submit`/`baseline` will run on: the machine's cores over the
    embedded cluster's slots (--workers, or those of the scheduler already running); None on a
    cluster joined by --address, whose nodes check their own kind before training."""
    import cluster
    saved = (scheduler.read_json(cluster.CLUSTER_FILE) or {}) if cluster.scheduler_running() else {}
    workers, address = (saved.get("workers"), saved.get("address")) if saved else (args.workers, args.address)
    if address:
        return None
    return max(1, scheduler.machine_threads() // (workers or 1))


def slot_options(args):
    """The --workers/--address options a refusal should repeat."""
    return "".join(f" --{name} {value}" for name, value in (("workers", args.workers), ("address", args.address)) if value)


def cmd_run(args):
    description = ledger.clean_description(args.description)
    if not description:
        refuse("give the experiment a description: what does this change try?")
    with exclusive_lock():
        script, rows, kind, kept, best = experiment_setup(args)
        timeout = args.timeout or default_timeout(kind)
        if not git("status", "--porcelain", "--", script):
            print(f"note: {script} has no changes since {kept[:7]}; rerunning the best to refine its mean")
            baseline_runs(args, script, kind, timeout, kept, rows, repeat=1)
            return
        judge_experiment(args, script, kind, timeout, kept, best, rows, description)


def judge_experiment(args, script, kind, timeout, kept, best, rows, description):
    """Commit the edit, run it until the rule decides, write its rows, keep or revert."""
    with signals_held():
        commit_script(script, description)
        commit = head()
        state = load_state()
        state["in_progress"] = {"commit": commit, "kept": kept, "committed": True, "script": script,
                                "description": description, "pending": []}
        save_state(state)
    repeats = ledger.repeat_groups(rows, str(kind), exclude={kept[:7], commit[:7]})
    runs = []

    def run_once(attempt):
        number = attempt
        run_line(script, timeout, "running" if attempt == 1 else f"rerun {attempt}")
        run = execute(script, timeout, kind, args.max_disturbance)
        runs.append(run)
        note = run.note if run.outcome.crash is None else crash_note(run.outcome.crash)
        with signals_held():
            state = load_state()
            state["in_progress"]["pending"].append({
                "commit": commit, "val_bpb": run.val_bpb, "memory_gb": run.memory_gb, "crash": run.outcome.crash is not None,
                "evidence": run.outcome.value is not None, "kind_tag": kind.tag(),
                "description": ledger.describe(description, kind, number, note),
                "details": run.details(commit, kind, number)})
            save_state(state)
        if run.outcome.value is not None:
            print(f"{'RESULT':<8} {run.val_bpb:.6f}{run_summary(run)} {commit[:7]} [run {number}]", flush=True)
        elif run.outcome.void or run.outcome.rejected:
            print(f"{'NOTE':<8} {run.val_bpb:.6f} {run.note} {commit[:7]} [run {number}]", flush=True)
        return run.outcome

    try:
        result = verdict.judge_candidate(run_once, best, repeats, args.threshold)
    except (Interrupted, Refused) as stop:
        with signals_held():
            state = load_state()
            recorded = flush_unjudged(state, "interrupted" if isinstance(stop, Interrupted) else "refused")
            git("reset", "--quiet", "--soft", kept)
            state.pop("in_progress", None)
            save_state(state)
        where = f"the change to {script} is back in the working tree (staged)"
        if isinstance(stop, Refused):
            print(f"refusing to judge: {stop}; {where}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED)
        what = "its finished runs are recorded as unjudged" if recorded else "nothing recorded"
        print(f"interrupted: {what}; the experiment commit was undone and {where}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)

    load_changed = result.status == "keep" and load_difference(runs, kept, kind, args.max_load_change)
    if load_changed:
        result = verdict.Verdict("void", result.values, result.decision, load_changed)
    status = result.status if result.status != "void" else "discard"
    with signals_held():
        state = load_state()
        pending = state["in_progress"]["pending"]
        ledger.append(pending_rows(pending, status))
        record_details([dict(run["details"], status=status) for run in pending])
        state.pop("in_progress")
        save_state(state)
    if result.status == "void":
        with signals_held():
            git("reset", "--quiet", "--soft", kept)
        line = f"{'VOID':<8} not judged: {result.reason} {commit[:7]} {description}"
        print(line, file=sys.stderr)
        print(f"the change to {script} is back in the working tree (staged): rerun it when the machine is "
              f"quiet, or pass --max-disturbance (see program.md)", file=sys.stderr)
        remember(line)
        raise SystemExit(EXIT_REFUSED)
    if result.status == "keep":
        values = confirm_runs(script, timeout, kind, commit, description, args.max_disturbance,
                              list(result.values), "confirming the new best")
        line = verdict_line(result, commit, description, kind, kept, best, runs,
                            f"best now {verdict.mean(values):.6f} mean of {len(values)}")
    else:
        line = verdict_line(result, commit, description, kind, kept, best, runs)
        with signals_held():
            if git("status", "--porcelain", "--", script):
                remember(line)
                print(line, flush=True)
                raise SystemExit(f"{script} was edited while it ran, so {commit[:7]} is not reverted yet; "
                                 f"save your edit elsewhere, then run: git reset --keep {kept[:7]}")
            git("reset", "--quiet", "--keep", kept)
    remember(line)
    print(line, flush=True)


def load_difference(runs, best_commit, kind, tolerance):
    """Why a win cannot be trusted because the machine's load changed since the best was measured
    (only possible when --max-disturbance accepted loaded runs), or None. A lighter load gives
    more steps in the same budget, so such a 'win' may be the machine's, not the idea's."""
    candidate = [r.load.other_cpu_share for r in runs if r.outcome.value is not None and r.load]
    best = [d["other_cpu_share"] for d in details_of(best_commit, str(kind))
            if isinstance(d.get("other_cpu_share"), (int, float))]
    if not candidate or not best:
        return None
    now, then = verdict.mean(candidate), verdict.mean(best)
    # What matters is the CPU left to the run: 21% against 29% of the machine is 38% more compute,
    # although the others' share moved only 8 points.
    left_now, left_then = max(1 - now, 1e-3), max(1 - then, 1e-3)
    if max(left_now / left_then, left_then / left_now) - 1 <= tolerance:
        return None
    return (f"the machine's load changed: other processes used {100 * now:.0f}% of the CPU during these "
            f"runs and {100 * then:.0f}% during the best's, so these runs had {left_now / left_then:.2f}x "
            f"the CPU; rerun the best under the load of now (uv run tools/experiment.py baseline "
            f"--repeat 2), then this experiment")


def remember(line):
    with signals_held():
        state = load_state()
        state["last_verdict"] = line
        save_state(state)


def baseline_runs(args, script, kind, timeout, commit, rows, repeat=None):
    """Rerun the committed HEAD (the best) `repeat` more times, or until it has BEST_RUNS runs."""
    values = ledger.values_of(rows, commit, str(kind))
    target = len(values) + repeat if repeat else verdict.BEST_RUNS
    if len(values) >= target:
        print(f"note: {commit[:7]} already has {len(values)} runs of kind {kind}; "
              f"add more with --repeat N")
    description = first_description(rows, commit, kind, "baseline")
    try:
        values = confirm_runs(script, timeout, kind, commit, description, args.max_disturbance, values,
                              "baseline", target)
    except Interrupted:
        print("interrupted: the finished baseline runs are in results.tsv", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    except Refused as error:
        refuse(str(error))
    rows = ledger.read()
    noise = verdict.pooled_noise([*ledger.repeat_groups(rows, str(kind), exclude={commit[:7]}), values])
    if not values:
        line = f"{'BASELINE':<8} no usable run of {commit[:7]}: read run.log"
    else:
        line = f"{'BASELINE':<8} {verdict.mean(values):.6f} mean of {len(values)} runs of {commit[:7]}; {noise.describe()}"
    remember(line)
    print(line, flush=True)
    if not values:
        raise SystemExit(1)


def cmd_baseline(args):
    with exclusive_lock():
        recover_interrupted()
        require_clean_harness()
        script = args.script or training_script()
        require_script(script)
        if git("status", "--porcelain", "--", script):
            refuse(f"{script} has uncommitted changes and the baseline runs the committed script; "
                   f"commit them or drop them (git checkout -- {script})")
        rows = ready_ledger()
        if args.workers or args.address:
            queue_baseline(args, script, rows)
            return
        kind = expected_kind()
        baseline_runs(args, script, kind, args.timeout or default_timeout(kind), head(), rows, args.repeat)


def queue_baseline(args, script, rows):
    """baseline --workers N / --address: the best's runs go to the scheduler's slots, all at once,
    so that the best is measured as the kind its candidates will be; wait records them."""
    import cluster
    cluster.import_ray()
    kind = expected_kind(planned_slot_threads(args))
    best = head()
    values = ledger.values_of(rows, best, str(kind))
    target = len(values) + args.repeat if args.repeat else verdict.BEST_RUNS
    if len(values) >= target:
        print(f"note: {best[:7]} already has {len(values)} runs of kind {kind}; add more with --repeat N")
        return
    settings = {"timeout": args.timeout or default_timeout(kind), "max_disturbance": args.max_disturbance,
                "threshold": None}
    with signals_held():
        book = scheduler.load_candidates()
        candidate = scheduler.new_candidate(book, best, best, first_description(rows, best, kind, "baseline"),
                                            script, dataclasses.asdict(kind), settings)
        candidate.update(phase="confirming", best_values=list(values), target=target)
        for _ in range(target - len(values)):
            scheduler.request_run(candidate, "confirm")
        scheduler.save_candidates(book)
    cluster.start_scheduler(args.workers, args.address)
    print(f"{'BASELINE':<8} {candidate['id']} queued {target - len(values)} runs of {best[:7]} as kind {kind} "
          f"(results: uv run tools/experiment.py wait)", flush=True)


def cmd_status(args):
    rows = ready_ledger()
    state = load_state()
    branch = current_branch() or "(detached HEAD)"
    base_name, base = branch_base()
    changed = harness_changes(base)
    harness = f"CHANGED: {', '.join(changed)}" if changed else "unchanged"
    print(f"branch       {branch} (base {base[:7]} on {base_name}; harness {harness})")
    best = head()[:7]
    kinds = list(dict.fromkeys(r.kind for r in rows if r.commit == best))
    for kind in kinds or ["-"]:
        values = ledger.values_of(rows, best, kind)
        if values:
            print(f"best         {verdict.mean(values):.6f} mean of {len(values)} runs, {best} "
                  f"{first_description(rows, best, kind, '')} [{kind}]")
            noise = verdict.pooled_noise([*ledger.repeat_groups(rows, kind, exclude={best}), values])
            print(f"noise        {noise.describe()}" + (f", {noise.dof} degrees of freedom" if noise.sigma else ""))
    if not kinds:
        print(f"best         {best} has no results yet (start with: uv run tools/experiment.py baseline)")
    counts = {status: sum(r.status == status for r in rows) for status in ledger.STATUSES}
    print(f"experiments  {len(rows)} runs ({', '.join(f'{n} {status}' for status, n in counts.items())})")
    holder = lock_holder()
    if holder:
        print(f"running      {holder}")
    print(f"last verdict {state.get('last_verdict', 'none yet')}")
    for line in queue_status():
        print(line)


def cmd_best(args):
    rows = ready_ledger()
    best = head()[:7]
    kinds = list(dict.fromkeys(r.kind for r in rows if r.commit == best and r.is_evidence))
    if not kinds:
        raise SystemExit("no result for the branch's best commit yet: start with uv run tools/experiment.py baseline")
    for kind in kinds:
        values = ledger.values_of(rows, best, kind)
        memory = max(r.memory_gb for r in rows if r.commit == best and r.kind == kind and r.is_evidence)
        print(ledger.format_row(best, verdict.mean(values), memory, "keep",
                                f"{first_description(rows, best, kind, '')} [mean of {len(values)} runs] [{kind}]"))


# ---------------------------------------------------------------------------------------------
# parallel experiments: submit, wait (the one writer), and the queue in status

LOCK_PATIENCE_SECONDS = 30  # submit and wait hold the lock for moments; they wait for each other
WAIT_POLL_SECONDS = 0.5


def git_quiet(*args, env=None):
    """(exit code, output) of a git command that may fail as part of the plan (a conflict)."""
    result = subprocess.run(["git", *args], capture_output=True, text=True, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, (result.stdout + result.stderr).strip()


def candidate_commit(script, description, parent):
    """A commit of the script as it is in the working tree on top of `parent`, made with a private
    index, so neither HEAD nor the index moves."""
    index = STATE_DIR / "candidate.index"
    env = {"GIT_INDEX_FILE": str(index.resolve())}
    try:
        for args in (("read-tree", parent), ("add", "--", script)):
            code, out = git_quiet(*args, env=env)
            if code:
                raise SystemExit(f"git {args[0]} failed: {out}")
        code, tree = git_quiet("write-tree", env=env)
        if code:
            raise SystemExit(f"git write-tree failed: {tree}")
    finally:
        index.unlink(missing_ok=True)
    return git("commit-tree", tree, "-p", parent, "-m", description)


def cmd_submit(args):
    import cluster
    cluster.import_ray()
    description = ledger.clean_description(args.description)
    if not description:
        refuse("give the experiment a description: what does this change try?")
    with exclusive_lock(LOCK_PATIENCE_SECONDS):
        script, rows, kind, best, _ = experiment_setup(args, planned_slot_threads(args), f"baseline{slot_options(args)}")
        if not git("status", "--porcelain", "--", script):
            refuse(f"{script} has no changes since {best[:7]}: edit it, then submit")
        settings = {"timeout": args.timeout or default_timeout(kind), "max_disturbance": args.max_disturbance,
                    "threshold": args.threshold}
        with signals_held():
            commit = candidate_commit(script, description, best)
            book = scheduler.load_candidates()
            candidate = scheduler.new_candidate(book, commit, best, description, script, dataclasses.asdict(kind), settings)
            git("update-ref", scheduler.CANDIDATE_REF + candidate["id"], commit)
            scheduler.request_run(candidate, "judge")
            scheduler.save_candidates(book)
            git("checkout", best, "--", script)
    cluster.start_scheduler(args.workers, args.address)
    print(f"{'SUBMIT':<8} {candidate['id']} {commit[:7]} {description} (on {best[:7]}; {script} is back at the best; "
          f"verdicts: uv run tools/experiment.py wait)", flush=True)


def run_of(record):
    """A finished run's record as the Run the verdict lines are made of."""
    outcome = verdict.Outcome(**record["outcome"])
    return Run(outcome, record.get("fields"), record.get("note"), None, record.get("wall", 0.0))


def run_row(candidate, record, status, number, note=None):
    """One results.tsv row and its details entry (slot and host included) for a finished run."""
    kind = ledger.Kind(**candidate["kind"])
    run = run_of(record)
    if run.outcome.crash is not None:
        status, note = "crash", crash_note(run.outcome.crash)
    elif run.outcome.value is None:
        status, note = "discard", run.note
    row = ledger.format_row(candidate["commit"], run.val_bpb, run.memory_gb, status,
                            ledger.describe(candidate["description"], kind, number, note))
    details = dict(run.details(candidate["commit"], kind, number), status=status, run_id=record["run"],
                   slot=record.get("slot"), host=record.get("host"), node=record.get("node"))
    return row, details


def result_line(record, commit, number):
    run = run_of(record)
    where = f" slot {record.get('slot')} on {record.get('host')}"
    if run.outcome.value is not None:
        return f"{'RESULT':<8} {run.val_bpb:.6f}{run_summary(run)} {commit[:7]} [run {number}]{where}"
    if run.outcome.crash is not None:
        return f"{'NOTE':<8} crashed: {run.outcome.crash} {commit[:7]} [run {number}]{where}"
    return f"{'NOTE':<8} {run.val_bpb:.6f} {run.note} {commit[:7]} [run {number}]{where}"


def rebase_onto(candidate, onto):
    """(new commit, None) with the candidate's change on top of `onto`, or (None, why not)."""
    tree = scheduler.PARALLEL_DIR / "rebase" / candidate["id"]
    git("worktree", "add", "--quiet", "--force", "--detach", str(tree), onto)
    try:
        code, out = git_quiet("-C", str(tree), "cherry-pick", "--allow-empty", candidate["commit"])
        if code:
            conflicted = git_quiet("-C", str(tree), "diff", "--name-only", "--diff-filter=U")[1].split()
            git_quiet("-C", str(tree), "cherry-pick", "--abort")
            return None, f"conflict in {', '.join(conflicted) or out.splitlines()[-1]}"
        return git_quiet("-C", str(tree), "rev-parse", "HEAD")[1], None
    finally:
        git_quiet("worktree", "remove", "--force", str(tree))


def advance_to(candidate):
    """Move the branch to a won candidate; None when done, else the fix (an uncommitted edit)."""
    script = candidate["script"]
    if git("status", "--porcelain", "--", script):
        return (f"the branch cannot move to {candidate['commit'][:7]} while {script} has uncommitted changes: "
                f"submit them or stash them (git stash), then run wait again")
    code, out = git_quiet("reset", "--quiet", "--keep", candidate["commit"])
    return f"git reset --keep {candidate['commit'][:7]} failed: {out}" if code else None


def settle_win(candidate, book, result, lines):
    """A keep: fast-forward when its base is still the best, else rebase and rerun it."""
    kind = ledger.Kind(**candidate["kind"])
    best_now = head()
    if best_now != candidate["base"]:
        rebased, conflict = rebase_onto(candidate, best_now)
        candidate["phase"] = "done"
        if conflict:
            return "discard", f"won against {candidate['base'][:7]} but does not rebase onto the new best {best_now[:7]}: {conflict}"
        newer = scheduler.new_candidate(book, rebased, best_now, candidate["description"], candidate["script"],
                                        candidate["kind"], candidate["settings"])
        git("update-ref", scheduler.CANDIDATE_REF + newer["id"], rebased)
        scheduler.request_run(newer, "judge")
        return "discard", f"won against {candidate['base'][:7]}; rebased onto the new best {best_now[:7]} as {newer['id']} {rebased[:7]}, rerun"
    blocked = advance_to(candidate)
    candidate["best_values"] = list(result.values)
    candidate["phase"] = "advance" if blocked else "confirming"
    if blocked:
        lines.append(f"{'BLOCKED':<8} {blocked}")
    else:
        for _ in range(scheduler.confirm_runs_to_queue(result.values, [], 0)):
            scheduler.request_run(candidate, "confirm")
    return "keep", None


def judge_record(candidate, record, book):
    """Book one finished run of a candidate: its rows, its verdict when due, the next runs.
    Returns the lines to print; the rows are written here."""
    kind = ledger.Kind(**candidate["kind"])
    commit, label = candidate["commit"], f"{candidate['commit'][:7]} {candidate['description']}"
    if record.get("refused"):
        candidate["phase"] = "done"
        return [f"{'REFUSED':<8} {candidate['id']} {label}: {record['refused']}; nothing recorded, the edit is kept "
                f"at {scheduler.CANDIDATE_REF}{candidate['id']} (git cherry-pick --no-commit {commit[:7]} brings it back)"]
    if record["purpose"] == "confirm":
        number = ledger.next_run_number(ledger.read(), commit, str(kind))
        row, details = run_row(candidate, record, "keep", number)
        ledger.append([row])
        record_details([details])
        candidate["confirm"].append(dict(record, judged_at=time.time()))
        lines = [result_line(record, commit, number).replace("RESULT  ", "CONFIRM ", 1)]
        outcomes = [scheduler.outcome_of(r) for r in candidate["confirm"]]
        target = candidate.get("target", verdict.BEST_RUNS)
        done, values = scheduler.confirm_step(candidate["best_values"], outcomes, target)
        if done:
            candidate["phase"] = "done"
            what = "BASELINE" if candidate["base"] == commit else "BEST"
            lines.append(f"{what:<8} {verdict.mean(values):.6f} mean of {len(values)} runs {label} [{kind}]")
        else:
            for _ in range(scheduler.confirm_runs_to_queue(candidate["best_values"], outcomes,
                                                           scheduler.in_flight(candidate), target)):
                scheduler.request_run(candidate, "confirm")
        return lines
    candidate["runs"].append(dict(record, judged_at=time.time()))
    lines = [result_line(record, commit, len(candidate["runs"]))]
    rows = ledger.read()
    best = ledger.values_of(rows, candidate["base"], str(kind))
    groups = ledger.repeat_groups(rows, str(kind), exclude={candidate["base"][:7], commit[:7]})
    outcomes = [scheduler.outcome_of(r) for r in candidate["runs"]]
    result = scheduler.judge_step(outcomes, best, groups, candidate["settings"].get("threshold"))
    if result is None:
        scheduler.request_run(candidate, "judge")
        return lines
    status, note = (result.status if result.status != "void" else "discard"), None
    if result.status == "keep":
        status, note = settle_win(candidate, book, result, lines)
    else:
        candidate["phase"] = "done"
    made = [run_row(candidate, r, status, number, note) for number, r in enumerate(candidate["runs"], start=1)]
    ledger.append([row for row, _ in made])
    record_details([details for _, details in made])
    runs = [run_of(r) for r in candidate["runs"]]
    if result.status == "void":
        line = f"{'VOID':<8} not judged: {result.reason} {label}"
    elif status == "keep":
        extra = f"best now {verdict.mean(result.values):.6f} mean of {len(result.values)}, confirming"
        line = verdict_line(result, commit, candidate["description"], kind, candidate["base"], best, runs, extra)
    elif note:
        line = verdict_line(result, commit, candidate["description"], kind, candidate["base"], best, runs, note)
        line = line.replace("KEEP    ", "REBASED " if "rebased" in note else "DISCARD ", 1)
    else:
        line = verdict_line(result, commit, candidate["description"], kind, candidate["base"], best, runs)
    remember(line)
    lines.insert(len(lines) - (1 if lines[-1].startswith("BLOCKED") else 0), line)
    return lines


def settle(patience=LOCK_PATIENCE_SECONDS):
    """Judge every finished run under the lock; returns (lines printed, candidates still open)."""
    printed = []
    with exclusive_lock(patience):
        recover_interrupted()
        ready_ledger()
        book = scheduler.load_candidates()
        for candidate in [c for c in book["candidates"].values() if c["phase"] == "advance"]:
            with signals_held():
                if head() != candidate["base"]:
                    candidate["phase"] = "done"
                    printed.append(f"{'NOTE':<8} {candidate['id']} {candidate['commit'][:7]} was kept against "
                                   f"{candidate['base'][:7]}, but the branch moved on meanwhile: resubmit its change "
                                   f"(git cherry-pick --no-commit {candidate['commit'][:7]}) to test it on the new best")
                else:
                    blocked = advance_to(candidate)
                    if blocked:
                        printed.append(f"{'BLOCKED':<8} {blocked}")
                    else:
                        candidate["phase"] = "confirming"
                        printed.append(f"{'ADVANCE':<8} the branch is at {candidate['commit'][:7]} {candidate['description']}")
                        for _ in range(scheduler.confirm_runs_to_queue(candidate["best_values"], [], 0)):
                            scheduler.request_run(candidate, "confirm")
                scheduler.save_candidates(book)
        for record in scheduler.finished():
            candidate = book["candidates"].get(record.get("candidate"))
            with signals_held():
                if candidate is not None and candidate["phase"] != "done":
                    printed += judge_record(candidate, record, book)
                    scheduler.save_candidates(book)
                scheduler.mark_judged(record)
        still_open = scheduler.open_candidates(book)
    for line in printed:
        print(line, flush=True)
    return printed, still_open


def cmd_wait(args):
    import cluster
    announced = False
    try:
        while True:
            printed, still_open = settle()
            if still_open and not announced:
                announced = True
                print(f"{'WAITING':<8} for {', '.join(c['id'] for c in still_open)} ({len(scheduler.running())} running, "
                      f"{len(scheduler.queued())} queued; Ctrl-C stops only this wait)", flush=True)
            if any(not line.startswith(("RESULT", "CONFIRM", "NOTE")) for line in printed):
                if any(line.startswith("BLOCKED") for line in printed):
                    raise SystemExit(EXIT_REFUSED)
                return
            if not still_open:
                if not printed:
                    print("nothing to wait for: no submitted candidate is open (submit one first)")
                return
            if not cluster.scheduler_running() and (scheduler.queued() or scheduler.running()):
                cluster.start_scheduler(args.workers, args.address)
            time.sleep(WAIT_POLL_SECONDS)
    except Interrupted:
        print("interrupted: nothing is lost; the scheduler keeps running the queued candidates, "
              "run wait again to collect their verdicts", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)


def queue_status():
    """Lines for status: the scheduler, running runs per slot, queued runs."""
    import cluster
    if not scheduler.PARALLEL_DIR.exists():
        return []
    book = scheduler.load_candidates()["candidates"]
    label = lambda r: f"{r['candidate']} {r['commit'][:7]} {book.get(r['candidate'], {}).get('description', '')} ({r['purpose']})"  # noqa: E731
    lines = [f"scheduler    {'running' if cluster.scheduler_running() else 'not running'}"]
    for record in sorted(scheduler.running(), key=lambda r: r["slot"]):
        since = time.strftime("%H:%M:%S", time.localtime(record["claimed_at"]))
        lines.append(f"slot {record['slot']:<7} {label(record)} since {since}")
    for record in scheduler.queued():
        lines.append(f"queued       {label(record)}")
    unjudged = [r["run"] for r in scheduler.finished()]
    if unjudged:
        lines.append(f"finished     {', '.join(unjudged)} not judged yet: uv run tools/experiment.py wait")
    return lines


def positive_seconds(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def finite_number(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def share(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a count of at least 1")
    return value


def main():
    parser = argparse.ArgumentParser(description="Run, record and keep or revert training experiments.",
                                     epilog="Environment: AUTORESEARCH_TRAIN_CMD, AUTORESEARCH_BACKEND, "
                                            "AUTORESEARCH_PROFILE, AUTORESEARCH_DATASET, AUTORESEARCH_TIME_BUDGET, "
                                            "AUTORESEARCH_CACHE_DIR, AUTORESEARCH_RUNS_DIR (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="commit the training-script change, run it until judged, keep or revert")
    run.add_argument("description", help="what this experiment tries (the commit message and results.tsv text)")
    run.add_argument("--threshold", type=finite_number, default=None,
                     help="keep when the mean beats the best's mean by more than this, after one run "
                          "(replaces the verdict rule; default: the rule in tools/verdict.py)")
    baseline = commands.add_parser("baseline", help=f"rerun the current best until it has {verdict.BEST_RUNS} runs")
    baseline.add_argument("--repeat", type=at_least_one, default=None,
                          help=f"run it this many more times instead (default: up to {verdict.BEST_RUNS} runs)")
    for sub in (run, baseline):
        sub.add_argument("--timeout", type=positive_seconds, default=None,
                         help="seconds before a run is killed (default: time budget x 2 + 120)")
        sub.add_argument("--script", default=None,
                         help="training script to commit and run (default: chosen by the detected backend)")
        sub.add_argument("--max-disturbance", type=share, default=monitor.DISTURBED_SHARE,
                         help=f"share of the CPU other processes may use during a run before it is not "
                              f"evidence (default {monitor.DISTURBED_SHARE:g}; 1 turns the check off)")
    run.add_argument("--max-load-change", type=share, default=monitor.DISTURBED_SHARE,
                     help=f"how much more or less of the CPU a winner's runs may have had than the best's "
                          f"(other processes' load) before the win is not judged, as a fraction "
                          f"(default {monitor.DISTURBED_SHARE:g}: 10%%)")
    submit = commands.add_parser("submit", help="queue the training-script change as a candidate for the "
                                                "parallel scheduler and return at once")
    submit.add_argument("description", help="what this experiment tries (the commit message and results.tsv text)")
    submit.add_argument("--threshold", type=finite_number, default=None,
                        help="keep when the mean beats the best's mean by more than this (replaces the rule)")
    submit.add_argument("--timeout", type=positive_seconds, default=None,
                        help="seconds before a run is killed (default: time budget x 2 + 120)")
    submit.add_argument("--script", default=None, help="training script to submit (default: by the detected backend)")
    submit.add_argument("--max-disturbance", type=share, default=monitor.DISTURBED_SHARE,
                        help=f"share of the CPU other work may use, besides the other slots (default {monitor.DISTURBED_SHARE:g})")
    wait = commands.add_parser("wait", help="judge finished parallel runs; block until the next verdict(s)")
    for sub in (submit, wait, baseline):
        sub.add_argument("--workers", type=at_least_one, default=None,
                         help="CPU slots of the embedded local Ray cluster (default: one per GPU, else one)")
        sub.add_argument("--address", default=None,
                         help="join a Ray cluster instead: auto (ray start --head on this machine) or HOST:PORT")
    commands.add_parser("status", help="kind, best (mean of its runs), sigma, counts, last verdict, queue")
    commands.add_parser("best", help="print the best result as a results.tsv row (its mean)")
    args = parser.parse_args()

    root = repo_root()
    os.chdir(root)
    sys.path.insert(0, str(root))  # prepare.py and backends/ of the checkout being run
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _raise_interrupted)
    try:
        {"run": cmd_run, "baseline": cmd_baseline, "status": cmd_status, "best": cmd_best,
         "submit": cmd_submit, "wait": cmd_wait}[args.command](args)
    except Interrupted:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
