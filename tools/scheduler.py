"""The candidate queue of parallel experiments and the state machine of one candidate (no Ray here).

Three kinds of processes share .autoresearch/parallel/, each through whole-file writes
(os.replace), so no reader ever sees half a record:

    queue/<seq>-<run>.json     a run someone asked for: submit and wait write these
    running/<run>.json         the scheduler (tools/cluster.py) moved it here when a slot took it
    finished/<run>.json        the scheduler's record of the finished run (outcome, fields, slot, log)
    judged/<run>.json          wait moved it here after writing its row
    candidates.json            every candidate and its runs so far: written only by wait and submit,
                               under the runner's lock (the one writer of results.tsv and the branch)

A candidate is judged by replaying its finished runs through tools/verdict.py: the same
judge_candidate and confirm_best loops that `run` uses, fed recorded outcomes instead of live runs.
When the loop asks for a run that has not happened yet, the answer is "run it" (NeedRun). So the
parallel verdicts follow the serial rule exactly, one run at a time.
"""

import fcntl
import json
import os
import time
from pathlib import Path

from tools import verdict


def lock_is_held(path):
    """True when some process holds an exclusive flock on this file (the runner's or the
    scheduler's lock); False when the file is missing or free."""
    if not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def machine_threads():
    """CPU threads this process may run on (its affinity): what a run gets alone, and what the
    embedded cluster's CPU slots divide."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PARALLEL_DIR = Path(".autoresearch") / "parallel"
QUEUE_DIR = PARALLEL_DIR / "queue"
RUNNING_DIR = PARALLEL_DIR / "running"
FINISHED_DIR = PARALLEL_DIR / "finished"
JUDGED_DIR = PARALLEL_DIR / "judged"
CANDIDATES_FILE = PARALLEL_DIR / "candidates.json"
CANDIDATE_REF = "refs/autoresearch/candidates/"


class NeedRun(Exception):
    """The verdict loop asked for a run beyond the finished ones."""


def write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def outcome_of(record):
    return verdict.Outcome(**record["outcome"])


def replay(outcomes):
    """run_once for the verdict loops: the recorded outcomes in order, then NeedRun."""
    def run_once(attempt):
        if attempt > len(outcomes):
            raise NeedRun
        return outcomes[attempt - 1]
    return run_once


def judge_step(outcomes, best, repeat_groups, threshold=None, best_speeds=None, repeat_speeds=None, simplify=False):
    """The verdict of a candidate with these finished runs, or None while it needs another run.
    The speeds are the machine's in the best's and the other groups' runs (see verdict.compare)."""
    try:
        return verdict.judge_candidate(replay(outcomes), best, repeat_groups, threshold, best_speeds=best_speeds,
                                       repeat_speeds=repeat_speeds, simplify=simplify)
    except NeedRun:
        return None


def confirm_step(best, outcomes, target=verdict.BEST_RUNS):
    """(done, values) of a new best's confirmation after these finished confirmation runs."""
    try:
        return True, verdict.confirm_best(replay(outcomes), best, target)
    except NeedRun:
        return False, list(best) + [o.value for o in outcomes if o.value is not None]


def confirm_runs_to_queue(best, outcomes, in_flight, target=verdict.BEST_RUNS):
    """How many confirmation runs to add now: none while runs are in flight or when done, else
    as many as the mean still lacks (they run in parallel)."""
    done, values = confirm_step(best, outcomes, target)
    if done or in_flight:
        return 0
    return max(1, target - len(values))


# ---------------------------------------------------------------------------------------------
# the run queue on disk

def enqueue(request):
    """Ask for one run: request has run (its id), candidate, commit, script, kind, timeout..."""
    request = dict(request, queued_at=time.time())
    write_json(QUEUE_DIR / f"{time.time_ns():020d}-{request['run']}.json", request)


def queued():
    return [r for r in (read_json(p) for p in sorted(QUEUE_DIR.glob("*.json"))) if r]


def claim(request, slot):
    """The scheduler took a queued run onto a slot."""
    record = dict(request, slot=slot, claimed_at=time.time())
    write_json(RUNNING_DIR / f"{request['run']}.json", record)
    for path in QUEUE_DIR.glob(f"*-{request['run']}.json"):
        path.unlink(missing_ok=True)
    return record


def running():
    return [r for r in (read_json(p) for p in sorted(RUNNING_DIR.glob("*.json"))) if r]


def finish(record):
    """The scheduler's last word on a run: its record, for wait to judge."""
    write_json(FINISHED_DIR / f"{record['run']}.json", dict(record, finished_at=time.time()))
    (RUNNING_DIR / f"{record['run']}.json").unlink(missing_ok=True)


def finished():
    records = [r for r in (read_json(p) for p in FINISHED_DIR.glob("*.json")) if r]
    return sorted(records, key=lambda r: r.get("finished_at", 0))


def mark_judged(record):
    src = FINISHED_DIR / f"{record['run']}.json"
    JUDGED_DIR.mkdir(parents=True, exist_ok=True)
    if src.exists():
        os.replace(src, JUDGED_DIR / src.name)


def load_candidates():
    return read_json(CANDIDATES_FILE) or {"next": 1, "candidates": {}}


def save_candidates(book):
    write_json(CANDIDATES_FILE, book)


def new_candidate(book, commit, base, description, script, kind, settings):
    """Add a candidate to the book and return it (phase judging, no runs yet)."""
    number = book["next"]
    book["next"] = number + 1
    candidate = {"id": f"c{number}", "commit": commit, "base": base, "description": description,
                 "script": script, "kind": kind, "settings": settings, "phase": "judging",
                 "runs": [], "confirm": [], "requested": 0, "submitted_at": time.time()}
    book["candidates"][candidate["id"]] = candidate
    return candidate


def request_run(candidate, purpose):
    """Queue the candidate's next run; purpose judge or confirm."""
    candidate["requested"] += 1
    enqueue({"run": f"{candidate['id']}-{candidate['requested']}", "candidate": candidate["id"],
             "commit": candidate["commit"], "script": candidate["script"], "kind": candidate["kind"],
             "purpose": purpose, **candidate["settings"]})


def in_flight(candidate):
    """Runs of this candidate asked for but not yet judged."""
    return candidate["requested"] - len(candidate["runs"]) - len(candidate["confirm"])


def open_candidates(book):
    return [c for c in book["candidates"].values() if c["phase"] not in ("done",)]
