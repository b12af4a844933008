"""The experiment runner: one command per experiment, so the research loop stays safe and honest.

    uv run tools/experiment.py baseline [--repeat N]   # run the current best until it has 6 runs
    uv run tools/experiment.py run "what this tries"   # one experiment -> rows in results.tsv, one verdict
    uv run tools/experiment.py status                  # kind, best (mean, runs), sigma, counts, last verdict
    uv run tools/experiment.py best                    # the best result of this branch as a results.tsv row
    uv run tools/experiment.py submit "what this tries" # parallel: queue the edit as a candidate, return at once
    uv run tools/experiment.py wait                    # parallel: judge finished runs, print the next verdict(s)
    uv run tools/experiment.py baseline --workers 2    # parallel: the best's runs on the slots (their own kind)
    uv run tools/experiment.py replay autoresearch/x   # judge another branch's kept changes here (tools/replay.py)

`run` refuses (exit 2, nothing changed) when another runner holds the lock, when prepare.py or
backends/ differ from the branch's base (its merge-base with main or master), when results.tsv
is missing or malformed or lost rows, when the current best has no runs of this kind yet, or when
the same change (the same files on the same best: checkout.experiment_fingerprint) was judged
already (it prints that verdict). Else
it commits the training-script change (train.py, or train_mlx.py when the backend is mlx), with
every new Python file and changed tracked file outside the harness, results.tsv and run outputs
(a module the script imports; the verdict line names them), with the description as message, and
runs it, output in run.log, under a hard timeout that kills the whole process group. Each run
becomes one results.tsv row; tools/verdict.py decides after each run whether to keep, discard or
rerun (grey zone), on values corrected for the machine's speed that every run probes; a would-be
keep first reruns the best (a [recheck] row, from a copy of the best's files under .autoresearch/),
and a kept change is rerun until its mean rests on verdict.best_runs_target() runs. Then the branch
advances (keep) or goes back to the best (discard, crash). --simplify judges a change that removes
lines by non-inferiority; --threshold X replaces the rule (two runs, rows tagged [threshold X]).

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
- Reverts use `git reset --keep <best>`: only the experiment's commit is undone (its new files
  leave the working tree with it). results.tsv is never committed; every row the runner writes
  is also appended to .autoresearch/results.tsv.
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

Where the code is: this file holds the commands and the command line; tools/checkout.py the git
plumbing and the harness check, tools/runner_state.py the lock, state and signal handling,
tools/kind.py the kind of a result, tools/training_run.py one run and its classification,
tools/serial.py the serial verdicts (run, baseline), tools/parallel.py the settling of parallel
runs (wait), tools/cluster.py and tools/scheduler.py the slots and the queue, tools/replay.py
another branch's kept changes judged here (replay), tools/status.py the status command.

Environment variables: AUTORESEARCH_TRAIN_CMD replaces `uv run <script>`, with {script} standing for
the script (tests point it at a fake script); AUTORESEARCH_BACKEND, AUTORESEARCH_PROFILE, AUTORESEARCH_DATASET, AUTORESEARCH_TIME_BUDGET
and AUTORESEARCH_CACHE_DIR pass through to the training script and decide the result's kind;
AUTORESEARCH_RUNS_DIR is where the scripts write their JSON (default runs/).
"""

import argparse
import dataclasses
import math
import os
import signal
import sys
import time

from tools import cluster, ledger, monitor, replay, scheduler, status, verdict
from tools.checkout import (experiment_files, experiment_fingerprint, git, head, line_changes,
                            repo_root, require_clean_harness)
from tools.kind import default_timeout, expected_kind, ready_ledger, require_script, training_script
from tools.parallel import LOCK_PATIENCE_SECONDS, planned_slot_threads, queue_candidate, settle, slot_options
from tools.runner_state import (EXIT_INTERRUPTED, EXIT_REFUSED, HANDLED_SIGNALS, Interrupted, exclusive_lock,
                                raise_interrupted, refuse, signals_held)
from tools.serial import (baseline_runs, experiment_setup, first_description, judge_experiment, judged_before,
                          recover_interrupted)
from tools.training_run import RunPlan

WAIT_POLL_SECONDS = 0.5


def cmd_run(args):
    description = ledger.clean_description(args.description)
    if not description:
        refuse("give the experiment a description: what does this change try?")
    with exclusive_lock():
        plan, rows, best = experiment_setup(args)
        if not any(git("status", "--porcelain", "--", path) for path in experiment_files(plan.script)):
            print(f"note: {plan.script} has no changes since {best.commit[:7]}; rerunning the best to refine its mean")
            baseline_runs(plan, best.commit, rows, repeat=1)
            return
        fingerprint, description = vet_experiment(args, plan, rows, description)
        judge_experiment(plan, best, rows, description, threshold=args.threshold, simplify=args.simplify,
                         fingerprint=fingerprint, max_load_change=args.max_load_change)


def vet_experiment(args, plan, rows, description):
    """The checks of a change before it is committed: (its fingerprint, its description with the
    [simplify] or [threshold] tag its rows carry). Refuses a change judged already (the same
    files on the same best) and a --simplify that does not remove lines."""
    fingerprint = experiment_fingerprint(plan.script)
    earlier = judged_before(rows, plan.kind, fingerprint)
    if earlier:
        refuse(f"this exact change was judged already: {earlier}; nothing was run or recorded. Rerunning "
               f"a judged idea only buys it another chance to win by luck: change something else")
    if args.simplify:
        added, removed = line_changes(plan.script)
        if added >= removed:
            refuse(f"--simplify judges a change that removes lines, and this one adds {added} and removes "
                   f"{removed}: run it without --simplify")
        description += f" [simplify: -{removed} +{added} lines]"
    if args.threshold is not None:
        description += f" [threshold {args.threshold:g}]"
    return fingerprint, description


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
        plan = RunPlan(script, kind, args.timeout or default_timeout(kind), args.max_disturbance)
        baseline_runs(plan, head(), rows, args.repeat)


def queue_baseline(args, script, rows):
    """baseline --workers N / --address: the best's runs go to the scheduler's slots, all at once,
    so that the best is measured as the kind its candidates will be; wait records them."""
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


def cmd_submit(args):
    cluster.import_ray()
    description = ledger.clean_description(args.description)
    if not description:
        refuse("give the experiment a description: what does this change try?")
    with exclusive_lock(LOCK_PATIENCE_SECONDS):
        plan, rows, best = experiment_setup(args, planned_slot_threads(args), f"baseline{slot_options(args)}")
        script, kind, best = plan.script, plan.kind, best.commit
        if not git("status", "--porcelain", "--", script):
            refuse(f"{script} has no changes since {best[:7]}: edit it, then submit")
        fingerprint, description = vet_experiment(args, plan, rows, description)
        settings = {"timeout": plan.timeout, "max_disturbance": plan.max_disturbance, "threshold": args.threshold,
                    "simplify": args.simplify, "fingerprint": fingerprint}
        candidate = queue_candidate(plan, best, description, [script], settings)
        commit = candidate["commit"]
    cluster.start_scheduler(args.workers, args.address)
    print(f"{'SUBMIT':<8} {candidate['id']} {commit[:7]} {description} (on {best[:7]}; {script} is back at the best; "
          f"verdicts: uv run tools/experiment.py wait)", flush=True)


def cmd_wait(args):
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


def slot_arguments(command, then=""):
    """--workers and --address: the command runs on slots of a Ray cluster (the parallel group)."""
    command.add_argument("--workers", type=at_least_one, default=None,
                         help=f"CPU slots of the embedded local Ray cluster (default: one per GPU, else one){then}")
    command.add_argument("--address", default=None,
                         help="join a Ray cluster instead: auto (ray start --head on this machine) or HOST:PORT")


def main():
    parser = argparse.ArgumentParser(description="Run, record and keep or revert training experiments.",
                                     epilog="Environment: AUTORESEARCH_TRAIN_CMD, AUTORESEARCH_BACKEND, "
                                            "AUTORESEARCH_PROFILE, AUTORESEARCH_DATASET, AUTORESEARCH_TIME_BUDGET, "
                                            "AUTORESEARCH_CACHE_DIR, AUTORESEARCH_RUNS_DIR (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="commit the training-script change, run it until judged, keep or revert")
    run.add_argument("description", help="what this experiment tries (the commit message and results.tsv text)")
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
                          f"(default {monitor.DISTURBED_SHARE:g}: 10%%; 1 turns the check off)")
    submit = commands.add_parser("submit", help="queue the training-script change as a candidate for the "
                                                "parallel scheduler and return at once")
    submit.add_argument("description", help="what this experiment tries (the commit message and results.tsv text)")
    for sub in (run, submit):
        sub.add_argument("--threshold", type=finite_number, default=None,
                         help=f"keep when the mean of {verdict.THRESHOLD_RUNS} runs beats the best's mean by more "
                              f"than this (replaces the verdict rule, whose error rates then no longer hold; the "
                              f"rows say [threshold X]; default: the rule in tools/verdict.py)")
        sub.add_argument("--simplify", action="store_true",
                         help=f"the change removes more lines than it adds: keep it unless it is worse than the "
                              f"best by {verdict.SIMPLIFY_MARGIN:g} sigma (a non-inferiority test; a change that "
                              f"adds lines is refused)")
    submit.add_argument("--timeout", type=positive_seconds, default=None,
                        help="seconds before a run is killed (default: time budget x 2 + 120)")
    submit.add_argument("--script", default=None, help="training script to submit (default: by the detected backend)")
    submit.add_argument("--max-disturbance", type=share, default=monitor.DISTURBED_SHARE,
                        help=f"share of the CPU other work may use, besides the other slots (default {monitor.DISTURBED_SHARE:g})")
    wait = commands.add_parser("wait", help="judge finished parallel runs; block until the next verdict(s)")
    for sub in (submit, wait, baseline):
        slot_arguments(sub)
    replay_command = commands.add_parser("replay", help="judge another branch's kept changes here, in order "
                                                        "(resumable; tools/replay.py)")
    replay_command.add_argument("branch", help="the other machine's autoresearch branch (fetched into this repository)")
    replay_command.add_argument("--results", default=None,
                                help="its results.tsv, when it is not committed on the branch")
    replay_command.add_argument("--timeout", type=positive_seconds, default=None,
                                help="seconds before a run is killed (default: time budget x 2 + 120)")
    replay_command.add_argument("--script", default=None,
                                help="training script here (default: chosen by the detected backend)")
    replay_command.add_argument("--max-disturbance", type=share, default=monitor.DISTURBED_SHARE,
                                help=f"as for run (default {monitor.DISTURBED_SHARE:g})")
    replay_command.add_argument("--max-load-change", type=share, default=monitor.DISTURBED_SHARE,
                                help=f"as for run (default {monitor.DISTURBED_SHARE:g})")
    slot_arguments(replay_command, "; replay then submits every change that applies, at once")
    commands.add_parser("status", help="kind, best (mean of its runs), sigma, counts, last verdict, queue")
    commands.add_parser("best", help="print the best result as a results.tsv row (its mean)")
    args = parser.parse_args()

    root = repo_root()
    os.chdir(root)
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, raise_interrupted)
    try:
        {"run": cmd_run, "baseline": cmd_baseline, "status": status.cmd_status, "best": cmd_best,
         "submit": cmd_submit, "wait": cmd_wait, "replay": replay.cmd_replay}[args.command](args)
    except Interrupted:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
