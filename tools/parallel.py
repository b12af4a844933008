"""Parallel settling: `wait` judges the runs the scheduler finished, one writer under the lock.

`submit` queues a candidate (a commit under refs/autoresearch/candidates/); tools/cluster.py runs
its runs on slots and writes a record per finished run. settle() books each record: its rows,
the verdict when tools/scheduler.py's replay of the verdict rule reaches one, the next runs to
queue. A won candidate whose base is still the best moves the branch to it; one whose base moved
on meanwhile is rebased onto the new best and judged again.
"""

import argparse
import dataclasses
import time

from tools import cluster, ledger, scheduler, verdict
from tools.checkout import advance_to, candidate_commit, git, head, rebase_onto, restore_files
from tools.kind import ready_ledger
from tools.runner_state import exclusive_lock, record_details, remember, signals_held
from tools.serial import Best, recover_interrupted, speeds_context, verdict_line
from tools.training_run import Run, crash_note, run_summary

LOCK_PATIENCE_SECONDS = 30  # submit and wait hold the lock for moments; they wait for each other
REBASED = "rebased onto the new best"  # the note of a win whose base moved on: it runs again


def planned_slot_threads(args):
    """CPU threads of each slot `submit`/`baseline` will run on: the machine's cores over the
    embedded cluster's slots (--workers, or those of the scheduler already running); None on a
    cluster joined by --address, whose nodes check their own kind before training."""
    saved = (scheduler.read_json(cluster.CLUSTER_FILE) or {}) if cluster.scheduler_running() else {}
    workers, address = (saved.get("workers"), saved.get("address")) if saved else (args.workers, args.address)
    if address:
        return None
    return max(1, scheduler.machine_threads() // (workers or 1))


def running_slot_threads():
    """The threads of each slot while this checkout's scheduler runs CPU slots that split the
    machine's cores (--workers N); None when no scheduler runs, its slots have the whole machine,
    or it joined a cluster by --address."""
    if not cluster.scheduler_running():
        return None
    threads = planned_slot_threads(argparse.Namespace(workers=None, address=None))
    return threads if threads and threads < scheduler.machine_threads() else None


def slot_options(args):
    """The --workers/--address options a refusal should repeat."""
    return "".join(f" --{name} {value}" for name, value in (("workers", args.workers), ("address", args.address)) if value)


def queue_candidate(plan, best, description, paths, settings):
    """Commit the working tree's `paths` as a candidate on the best, queue its first run and put
    the files back at the best (a file the best lacks is removed): the candidate's dict."""
    with signals_held():
        commit = candidate_commit(paths, description, best)
        book = scheduler.load_candidates()
        candidate = scheduler.new_candidate(book, commit, best, description, plan.script,
                                            dataclasses.asdict(plan.kind), settings)
        git("update-ref", scheduler.CANDIDATE_REF + candidate["id"], commit)
        scheduler.request_run(candidate, "judge")
        scheduler.save_candidates(book)
        restore_files(paths, best)
    return candidate


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
                   slot=record.get("slot"), host=record.get("host"), node=record.get("node"),
                   fingerprint=candidate["settings"].get("fingerprint"))
    return row, details


def result_line(record, commit, number):
    """The RESULT or NOTE line of one finished run, with its slot and host."""
    run = run_of(record)
    where = f" slot {record.get('slot')} on {record.get('host')}"
    if run.outcome.value is not None:
        return f"{'RESULT':<8} {run.val_bpb:.6f}{run_summary(run)} {commit[:7]} [run {number}]{where}"
    if run.outcome.crash is not None:
        return f"{'NOTE':<8} crashed: {run.outcome.crash} {commit[:7]} [run {number}]{where}"
    return f"{'NOTE':<8} {run.val_bpb:.6f} {run.note} {commit[:7]} [run {number}]{where}"


def settle_win(candidate, book, result, lines):
    """A keep: fast-forward when its base is still the best, else rebase and rerun it."""
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
        return "discard", f"won against {candidate['base'][:7]}; {REBASED} {best_now[:7]} as {newer['id']} {rebased[:7]}, rerun"
    blocked = advance_to(candidate)
    candidate["best_values"] = list(result.values)
    candidate["target"] = verdict.best_runs_target(result.decision.noise if result.decision else None)
    candidate["phase"] = "advance" if blocked else "confirming"
    if blocked:
        lines.append(f"{'BLOCKED':<8} {blocked}")
    else:
        for _ in range(scheduler.confirm_runs_to_queue(result.values, [], 0, candidate["target"])):
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
    best_speeds, repeat_speeds = speeds_context(rows, kind, candidate["base"], exclude={commit[:7]})
    outcomes = [scheduler.outcome_of(r) for r in candidate["runs"]]
    settings = candidate["settings"]
    result = scheduler.judge_step(outcomes, best, groups, settings.get("threshold"), best_speeds, repeat_speeds,
                                  settings.get("simplify", False))
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
    # Not a verdict on the idea (void, or a win rebased and rerun): no fingerprint, so it may run again.
    unjudged = {"fingerprint": None} if result.status == "void" or note else {}
    record_details([dict(details, **unjudged) for _, details in made])
    runs = [run_of(r) for r in candidate["runs"]]
    if result.status == "void":
        line = f"{'VOID':<8} not judged: {result.reason} {label}"
    elif status == "keep":
        extra = f"best now {verdict.mean(result.values):.6f} mean of {len(result.values)}, confirming"
        line = verdict_line(result, commit, candidate["description"], kind, Best(candidate["base"], best), runs, extra)
    elif note:
        line = verdict_line(result, commit, candidate["description"], kind, Best(candidate["base"], best), runs, note)
        line = line.replace("KEEP    ", "REBASED " if "rebased" in note else "DISCARD ", 1)
    else:
        line = verdict_line(result, commit, candidate["description"], kind, Best(candidate["base"], best), runs)
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


def queue_status():
    """Lines for status: the scheduler, running runs per slot, queued runs."""
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
