"""The runner's own files and signals: the lock, the state, the per-run details, refusals.

One runner command at a time per checkout holds .autoresearch/lock. .autoresearch/state.json
remembers an experiment in progress (so the next runner can finish the clean-up of a killed one)
the process group of the training it started (so the next runner ends it if the runner was
killed) and the last verdict. runs/experiments.jsonl keeps the details of every run (steps, tok/s, load).
Every step that changes git or results.tsv runs inside signals_held(), so an interruption never
lands between a commit and its bookkeeping.
"""

import contextlib
import fcntl
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from backends.report import runs_dir
from tools import ledger, scheduler, verdict

STATE_DIR = Path(".autoresearch")  # the runner's memory; ignores itself in git
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = STATE_DIR / "lock"
DETAILS_FILE = "experiments.jsonl"  # in runs_dir(): steps, tok/s, load and wall time of every run
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP reached the runner."""


class Refused(Exception):
    """Not the idea's fault: the run could not start or could not be judged; nothing is lost."""


def raise_interrupted(signum, frame):
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
    """Print one line saying why nothing ran, and exit EXIT_REFUSED."""
    print(f"refusing to run: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


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
        end_orphaned_training()
        yield
    finally:
        os.close(fd)


def lock_holder():
    """What holds the lock now, or None."""
    return (LOCK_FILE.read_text().strip() or "another process") if scheduler.lock_is_held(LOCK_FILE) else None


def load_state():
    """state.json as a dict; {} when it is missing or unreadable."""
    try:
        state = json.loads(STATE_FILE.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(state):
    """Write state.json whole (through a temporary file), so no reader sees half of it."""
    STATE_DIR.mkdir(exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, STATE_FILE)


def process_start_time(pid):
    """When the process started (clock ticks since boot, /proc), or None where it is unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def record_training_group(pgid):
    """Remember the process group of the training now starting (None: it has ended)."""
    with signals_held():
        state = load_state()
        if pgid is None:
            state.pop("training_group", None)
        else:
            state["training_group"] = {"pgid": pgid, "started": process_start_time(pgid)}
        save_state(state)


def end_orphaned_training():
    """Kill the recorded training process group of a runner that was killed (kill -9) before it
    could: that training would otherwise go on overlapping the next runs. Called by every runner
    command as soon as it holds the lock, so no runner of this checkout still owns that group.
    SIGKILL at once: no runner is left to record what it finishes. A live leader with another
    start time is a reused pid, left alone; a group whose leader is gone can only be the old one,
    since Linux never hands out a pid still in use as a process group id."""
    state = load_state()
    group = state.get("training_group")
    if not isinstance(group, dict) or not isinstance(group.get("pgid"), int):
        return None
    pgid, ended = group["pgid"], None
    started = process_start_time(pgid)
    if started is None or group.get("started") in (None, started):
        try:
            os.killpg(pgid, signal.SIGKILL)
            ended = pgid
        except (ProcessLookupError, PermissionError):
            pass
    state.pop("training_group")
    save_state(state)
    if ended:
        print(f"note: ended the training (process group {pgid}) that a killed runner left running", file=sys.stderr)
    return ended


def end_orphaned_training_unless_locked():
    """end_orphaned_training for a command that does not take the lock (status): only while no
    runner holds it, checked by holding it for that moment, so a runner that starts meanwhile
    never has its own training ended."""
    if not LOCK_FILE.exists():
        return
    fd = os.open(LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        end_orphaned_training()
    finally:
        os.close(fd)


def remember(line):
    """Keep a verdict line as the last verdict that `status` shows."""
    with signals_held():
        state = load_state()
        state["last_verdict"] = line
        save_state(state)


def record_details(entries):
    """Append run details (one JSON object a line) to runs/experiments.jsonl."""
    if not entries:
        return
    path = runs_dir() / DETAILS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in entries))


def details_of(commit, kind):
    """The recorded details (num_steps, tok/s, ...) of every evidence run of a commit and kind."""
    return [entry for entry in all_details()
            if entry.get("commit") == commit[:7] and entry.get("kind") == kind and entry.get("evidence")]


def all_details():
    """Every entry of runs/experiments.jsonl, oldest first (unreadable lines skipped)."""
    path = runs_dir() / DETAILS_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def machine_speeds(rows, kind):
    """{commit: the machine speed of each of its evidence runs of this kind}, in the order of
    ledger.values_of (file order), None for a run without a probe. The commits come in the order
    of ledger.repeat_groups, so both can be zipped. A speed is the probe's two rates (see
    probed_speed)."""
    probed = {(e.get("commit"), e.get("run")): probed_speed(e) for e in all_details()
              if e.get("kind") == kind and e.get("evidence")}
    speeds = {}
    for row in rows:
        if row.kind == kind and row.is_evidence:
            tag = ledger.RUN_TAG.search(row.description)
            speeds.setdefault(row.commit, []).append(probed.get((row.commit, int(tag.group(1)) if tag else 1)))
    return speeds


def probed_speed(fields):
    """A run's machine speed as the keep rule takes it from its record (a results detail entry or
    runs/last_run.json): the probe's (matmul GFLOP/s, memory GB/s), each corrected for apart
    (tools/verdict.py); the speed index alone for a record without the rates; None unprobed."""
    rates = (fields.get("probe_matmul_gflops"), fields.get("probe_memory_gb_per_s"))
    if verdict.speeds_complete([rates], 1):
        return tuple(float(r) for r in rates)
    index = fields.get("machine_speed")
    return float(index) if verdict.speeds_complete([index], 1) else None


def complete_speeds(speeds):
    """The list when every run has a speed of the same rates, else None (the rule then judges the
    raw values)."""
    return list(speeds) if speeds and verdict.speeds_complete(speeds, len(speeds)) else None


def latest_probe():
    """The newest run's probe fields (machine_speed, probe rates, change during the run), or None."""
    for entry in reversed(all_details()):
        if isinstance(entry.get("machine_speed"), (int, float)):
            return entry
    return None
