"""Serial judging: `run` and `baseline` train here, one run at a time, and the verdict lines.

judge_experiment commits the edit, runs it until tools/verdict.py decides, writes its rows, and
keeps (then confirms the new best until it rests on verdict.BEST_RUNS runs) or reverts with
`git reset --keep`. The runs of an experiment in progress live in the runner's state until the
verdict, so an interruption records them as unjudged and undoes the commit (recover_interrupted
finishes that for a runner that was killed).
"""

import dataclasses
import shutil
import sys
from dataclasses import dataclass

from tools import ledger, verdict
from tools.checkout import commit_experiment, git, head, require_clean_harness, write_best_copy
from tools.kind import default_timeout, expected_kind, ready_ledger, require_script, training_script
from tools.runner_state import (EXIT_INTERRUPTED, EXIT_REFUSED, STATE_DIR, Interrupted, Refused, all_details,
                                complete_speeds, details_of, load_state, machine_speeds,
                                record_details, refuse, remember, save_state, signals_held)
from tools.training_run import RunPlan, crash_note, execute, run_line, run_summary


@dataclass(frozen=True)
class Best:
    """The best commit of the branch and its values (val_bpb of its evidence runs) of one kind,
    with the machine's speed in each of those runs when every one was probed."""
    commit: str
    values: list
    speeds: list | None = None


def speeds_context(rows, kind, best, exclude=()):
    """(the best's speeds, the speeds of every other same-commit group in ledger.repeat_groups'
    order): None where a run lacks a probe, so the rule judges those groups raw."""
    speeds = machine_speeds(rows, str(kind))
    repeat = [complete_speeds(speeds[c]) for c in speeds if c not in {best[:7], *exclude}]
    return complete_speeds(speeds.get(best[:7])), repeat


def kind_noise(rows, kind, best):
    """The noise the rule uses for a kind, as `status` and `baseline` report it: every same-commit
    group with the best's, corrected for the machine's speed where every run of a group was probed."""
    best_speeds, repeat_speeds = speeds_context(rows, kind, best)
    return verdict.pooled_noise([*ledger.repeat_groups(rows, str(kind), exclude={best[:7]}),
                                 ledger.values_of(rows, best, str(kind))], [*repeat_speeds, best_speeds])


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
               f"its commit was undone and its edit is staged in {', '.join([progress['script'], *progress.get('files', [])])} together with any "
               f"newer change: check the file, then run again")


def experiment_setup(args, threads=None, baseline_command="baseline"):
    """The checks an experiment makes under the lock before it commits anything: (RunPlan, rows,
    Best) from the command line's --script, --timeout and --max-disturbance. Refuses when the best
    has no values of the expected kind."""
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
    plan = RunPlan(script, kind, args.timeout or default_timeout(kind), args.max_disturbance)
    return plan, rows, Best(best, values, speeds_context(rows, kind, best)[0])


def judged_before(rows, kind, fingerprint):
    """'1a2b3c4 (halve the batch): discard, mean 1.289012 of 2 runs' for an experiment of this kind
    whose files hashed to `fingerprint` (checkout.experiment_fingerprint) and that was judged
    already; None when it is new, or when none of its runs was evidence."""
    for entry in all_details():
        if entry.get("fingerprint") != fingerprint or entry.get("kind") != str(kind):
            continue
        commit = entry["commit"]
        own = [r for r in rows if r.commit == commit and r.kind == str(kind)]
        if not own:
            continue
        status = "keep" if any(r.status == "keep" for r in own) else (
            "crash" if all(r.status == "crash" for r in own) else "discard")
        values = [r.val_bpb for r in own if r.is_evidence]
        if status == "discard" and not values:
            continue  # every run was void (disturbed, over budget): the change was never judged
        mean = f", mean {verdict.mean(values):.6f} of {len(values)} runs" if values else ""
        return f"{commit} ({first_description(rows, commit, kind, 'no description')}): {status}{mean}"
    return None


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


def first_description(rows, commit, kind, default):
    """The description of a commit's first row of a kind, without its tags; `default` if none."""
    for row in rows:
        if row.commit == commit[:7] and row.kind == str(kind):
            text = ledger.KIND_TAG.sub("", row.description)
            return ledger.RUN_TAG.sub("", text).split(" [")[0] or default
    return default


def best_context(kind, best):
    """'best 1.234567 mean of 6 runs, 210 steps, 12,000 tok/s' for the verdict line."""
    text = f"best {verdict.mean(best.values):.6f} mean of {len(best.values)}"
    details = details_of(best.commit, str(kind))
    steps = [d["num_steps"] for d in details if isinstance(d.get("num_steps"), (int, float))]
    speeds = [d["tokens_per_second"] for d in details if isinstance(d.get("tokens_per_second"), (int, float))]
    if steps:
        text += f", {verdict.mean(steps):.0f} steps"
    if speeds:
        text += f", {verdict.mean(speeds):,.0f} tok/s"
    return text


def candidate_context(runs):
    """', 210 steps, 12,000 tok/s' of a candidate's evidence runs, for the verdict line."""
    steps = [r.fields["num_steps"] for r in runs if r.outcome.value is not None and "num_steps" in r.fields]
    speeds = [float(r.fields["train_tokens_per_second"]) for r in runs
              if r.outcome.value is not None and "train_tokens_per_second" in r.fields]
    text = ""
    if steps:
        text += f", {verdict.mean(steps):.0f} steps"
    if speeds:
        text += f", {verdict.mean(speeds):,.0f} tok/s"
    return text


def verdict_line(result, commit, description, kind, best, runs, extra=None):
    """The one line a verdict prints: status, mean, the comparison with `best` (a Best), why."""
    label = f"{commit[:7]} {description}"
    if result.status == "crash":
        return f"CRASH    0.000000 ({result.reason}) {label}"
    if not result.values:
        return f"DISCARD  {runs[-1].val_bpb:.6f} ({result.reason}) {label}"
    decision = result.decision
    mean = verdict.mean(result.values)
    difference = f"{mean - verdict.mean(best.values):+.6f}"
    if decision is not None and decision.noise is not None and decision.noise.slope is not None:
        difference += f" ({-decision.difference:+.6f} corrected for the machine)"
    parts = [f"mean of {len(result.values)}{candidate_context(runs)}", best_context(kind, best), difference]
    if decision is not None and decision.noise is not None:
        parts.append(decision.noise.describe())
    parts.append(result.reason)
    if extra:
        parts.append(extra)
    return f"{result.status.upper():<8} {mean:.6f} ({'; '.join(parts)}) {label}"


def confirm_runs(plan, commit, description, values, what, target=verdict.BEST_RUNS):
    """Rerun the committed HEAD until it has `target` evidence runs; each row is written at once
    (status keep: HEAD is the best). Returns the best's values, old and new."""

    def run_once(attempt):
        kind = plan.kind
        number = ledger.next_run_number(ledger.read(), commit, str(kind))
        run_line(plan, f"{what} of {commit[:7]}: run {number}, {target} wanted")
        run = execute(plan, record_group=True)
        status = "crash" if run.outcome.crash else ("keep" if run.outcome.value is not None else "discard")
        note = run.note if status != "crash" else crash_note(run.outcome.crash)
        with signals_held():
            ledger.append([ledger.format_row(commit, run.val_bpb, run.memory_gb, status,
                                             ledger.describe(description, kind, number, note))])
            record_details([dict(run.details(commit, kind, number), status=status)])
        shown = f"{run.val_bpb:.6f}{run_summary(run)}" if run.outcome.value is not None else (
            run.note or run.outcome.crash)
        label = "BASELINE" if what == "baseline" else "CONFIRM"
        print(f"{label:<8} {shown} {commit[:7]} [run {number}]", flush=True)
        return run.outcome

    return verdict.confirm_best(run_once, values, target)


def best_rerun(plan, best, rows):
    """run_best for verdict.judge_candidate: one more run of the best's code while HEAD holds the
    candidate (checkout.write_best_copy), written at once as the best's row [recheck], so that a
    would-be keep is judged against the best as the machine runs it now, not hours ago: a host
    that drifted (faster or slower, seen by the probe or not) does not make a keep."""
    folder = STATE_DIR / "best"
    description = first_description(rows, best.commit, plan.kind, "baseline")

    def run_best(attempt):
        shutil.rmtree(folder, ignore_errors=True)
        best_plan = dataclasses.replace(plan, script=write_best_copy(best.commit, plan.script, folder))
        number = ledger.next_run_number(ledger.read(), best.commit, str(plan.kind))
        run_line(best_plan, f"rechecking the best {best.commit[:7]} before a keep (its run {number})")
        run = execute(best_plan, record_group=True)
        status = "crash" if run.outcome.crash else ("keep" if run.outcome.value is not None else "discard")
        note = "recheck" + (f"; {run.note}" if run.note and status != "crash" else "")
        note = note if status != "crash" else crash_note(run.outcome.crash)
        with signals_held():
            ledger.append([ledger.format_row(best.commit, run.val_bpb, run.memory_gb, status,
                                             ledger.describe(description, plan.kind, number, note))])
            record_details([dict(run.details(best.commit, plan.kind, number), status=status)])
        shown = f"{run.val_bpb:.6f}{run_summary(run)}" if run.outcome.value is not None else (
            run.note or run.outcome.crash)
        print(f"{'RECHECK':<8} {shown} {best.commit[:7]} [run {number}]", flush=True)
        return run.outcome

    return run_best


def judge_experiment(plan, best, rows, description, *, threshold=None, simplify=False, fingerprint=None,
                     max_load_change):
    """Commit the edit to plan.script, run it until the rule decides (or --threshold, or the
    non-inferiority rule of a simplification), write its rows, then keep (and confirm it as the
    new best) or revert to `best` (a Best). fingerprint goes into every run's details, so a
    repeat of this experiment is recognised (judged_before)."""
    script, kind, kept = plan.script, plan.kind, best.commit
    with signals_held():
        files = commit_experiment(script, description)
        commit = head()
        state = load_state()
        state["in_progress"] = {"commit": commit, "kept": kept, "committed": True, "script": script,
                                "files": files, "description": description, "pending": []}
        save_state(state)
    label = f"{description} [with {', '.join(files)}]" if files else description
    repeats = ledger.repeat_groups(rows, str(kind), exclude={kept[:7], commit[:7]})
    repeat_speeds = speeds_context(rows, kind, kept, exclude={commit[:7]})[1]
    runs = []

    def run_once(attempt):
        number = attempt
        run_line(plan, "running" if attempt == 1 else f"rerun {attempt}")
        run = execute(plan, record_group=True)
        runs.append(run)
        note = run.note if run.outcome.crash is None else crash_note(run.outcome.crash)
        with signals_held():
            state = load_state()
            state["in_progress"]["pending"].append({
                "commit": commit, "val_bpb": run.val_bpb, "memory_gb": run.memory_gb, "crash": run.outcome.crash is not None,
                "evidence": run.outcome.value is not None, "kind_tag": kind.tag(),
                "description": ledger.describe(description, kind, number, note),
                "details": dict(run.details(commit, kind, number), fingerprint=fingerprint)})
            save_state(state)
        if run.outcome.value is not None:
            print(f"{'RESULT':<8} {run.val_bpb:.6f}{run_summary(run)} {commit[:7]} [run {number}]", flush=True)
        elif run.outcome.void or run.outcome.rejected:
            print(f"{'NOTE':<8} {run.val_bpb:.6f} {run.note} {commit[:7]} [run {number}]", flush=True)
        return run.outcome

    try:
        result = verdict.judge_candidate(run_once, best.values, repeats, threshold, best_speeds=best.speeds,
                                         repeat_speeds=repeat_speeds, simplify=simplify,
                                         run_best=best_rerun(plan, best, rows))
    except (Interrupted, Refused) as stop:
        with signals_held():
            state = load_state()
            recorded = flush_unjudged(state, "interrupted" if isinstance(stop, Interrupted) else "refused")
            git("reset", "--quiet", "--soft", kept)
            state.pop("in_progress", None)
            save_state(state)
        where = f"the change to {', '.join([script, *files])} is back in the working tree (staged)"
        if isinstance(stop, Refused):
            print(f"refusing to judge: {stop}; {where}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED)
        what = "its finished runs are recorded as unjudged" if recorded else "nothing recorded"
        print(f"interrupted: {what}; the experiment commit was undone and {where}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)

    if result.best_values is not None:  # the best was rechecked: the line shows the best the verdict used
        best = Best(best.commit, list(result.best_values), result.best_speeds)
    load_changed = result.status == "keep" and load_difference(runs, kept, kind, max_load_change)
    if load_changed:
        result = verdict.Verdict("void", result.values, result.decision, load_changed)
    status = result.status if result.status != "void" else "discard"
    with signals_held():
        state = load_state()
        pending = state["in_progress"]["pending"]
        ledger.append(pending_rows(pending, status))
        # A void experiment was not judged: its fingerprint is dropped, so it can run again.
        unjudged = {"fingerprint": None} if result.status == "void" else {}
        record_details([dict(run["details"], status=status, **unjudged) for run in pending])
        state.pop("in_progress")
        save_state(state)
    if result.status == "void":
        with signals_held():
            git("reset", "--quiet", "--soft", kept)
        line = f"{'VOID':<8} not judged: {result.reason} {commit[:7]} {label}"
        print(line, file=sys.stderr)
        print(f"the change to {', '.join([script, *files])} is back in the working tree (staged): rerun it when the machine is "
              f"quiet, or pass --max-disturbance (see program.md)", file=sys.stderr)
        remember(line)
        raise SystemExit(EXIT_REFUSED)
    if result.status == "keep":
        target = verdict.best_runs_target(result.decision.noise if result.decision else None)
        values = confirm_runs(plan, commit, description, list(result.values), "confirming the new best", target)
        line = verdict_line(result, commit, label, kind, best, runs,
                            f"best now {verdict.mean(values):.6f} mean of {len(values)}")
    else:
        line = verdict_line(result, commit, label, kind, best, runs)
        with signals_held():
            # reset --keep takes the experiment's new files out of the working tree with its commit
            edited = [path for path in [script, *files] if git("status", "--porcelain", "--", path)]
            if edited:
                remember(line)
                print(line, flush=True)
                raise SystemExit(f"{', '.join(edited)} changed while it ran, so {commit[:7]} is not reverted yet; "
                                 f"save your edit elsewhere, then run: git reset --keep {kept[:7]}")
            git("reset", "--quiet", "--keep", kept)
    remember(line)
    print(line, flush=True)


def load_difference(runs, best_commit, kind, tolerance):
    """Why a win cannot be trusted because the machine's load changed since the best was measured
    (only possible when --max-disturbance accepted loaded runs), or None. A lighter load gives
    more steps in the same budget, so such a 'win' may be the machine's, not the idea's. A
    tolerance of 1 (the largest share) turns the check off, as --max-disturbance 1 does its own."""
    if tolerance >= 1:
        return None
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


def baseline_runs(plan, commit, rows, repeat=None):
    """Rerun the committed HEAD (the best) `repeat` more times, or until it has BEST_RUNS runs."""
    kind = plan.kind
    values = ledger.values_of(rows, commit, str(kind))
    target = len(values) + repeat if repeat else verdict.BEST_RUNS
    if len(values) >= target:
        print(f"note: {commit[:7]} already has {len(values)} runs of kind {kind}; "
              f"add more with --repeat N")
    description = first_description(rows, commit, kind, "baseline")
    try:
        values = confirm_runs(plan, commit, description, values, "baseline", target)
    except Interrupted:
        print("interrupted: the finished baseline runs are in results.tsv", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    except Refused as error:
        refuse(str(error))
    noise = kind_noise(ledger.read(), kind, commit)
    if not values:
        line = f"{'BASELINE':<8} no usable run of {commit[:7]}: read run.log"
    else:
        line = f"{'BASELINE':<8} {verdict.mean(values):.6f} mean of {len(values)} runs of {commit[:7]}; {noise.describe()}"
    remember(line)
    print(line, flush=True)
    if not values:
        raise SystemExit(1)
