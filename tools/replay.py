"""Replay: do another machine's wins hold here? Each kept change of another branch, judged again on
this branch's best by this machine's rule.

    uv run tools/experiment.py replay autoresearch/dec5-cpu                  # its committed results.tsv
    uv run tools/experiment.py replay autoresearch/dec5-cpu --results cpu-results.tsv

The other branch comes from the other machine (git fetch <remote> autoresearch/dec5-cpu). Its kept
changes are the commits its results.tsv marks keep whose parent was its best then (a baseline is
no change). In the order they were kept, each change's diff to the training script and its other
files is applied to this branch's best and judged as `run` judges an edit: same rule, same rows,
the description ending in [replay of <branch> <commit>]. A change that is already here is listed
as present; one to the other framework's script (train_mlx.py where this backend is torch, and
the reverse) as needs porting; one that does not apply as a conflict, naming the file. None of
these run.

With --workers N or --address (or while the parallel scheduler runs), each change that applies is
submitted to the slots instead, all of them at once, each on this branch's best as it is now, and
`uv run tools/experiment.py wait` gives the verdicts; a win whose base moved on meanwhile is rebased
and judged again, as `submit` does. A change that needs an earlier one and so does not apply yet is
a conflict now: replay again once that one is kept.

Replay resumes: a change with rows of this kind that say it was judged, or that waits on the slots,
is never judged again, so after Ctrl-C, a closed terminal or a killed runner the same command
carries on where it stopped (an interrupted experiment's rows say unjudged, and it runs again). What
each change became, with its gain on the source machine, is kept in the runner's state for the
report's transfer table (tools/report.py).
"""

import re
import subprocess

from tools import cluster, ledger, scheduler, verdict
from tools.checkout import experiment_fingerprint, git, git_quiet, not_experiment, restore_files
from tools.kind import ready_ledger, training_script
from tools.parallel import LOCK_PATIENCE_SECONDS, REBASED, planned_slot_threads, queue_candidate, slot_options
from tools.runner_state import exclusive_lock, load_state, refuse, save_state, signals_held
from tools.serial import experiment_setup, first_description, judge_experiment, judged_before, kind_noise

REPLAY_TAG = re.compile(r" \[replay of (\S+) ([0-9a-f]{7})\]")
SCRIPTS = ("train.py", "train_mlx.py")


def replay_tag(branch, commit):
    return f" [replay of {branch} {commit[:7]}]"


def source_rows(branch, results=None):
    """The other branch's results.tsv rows: the file given, else the one committed on the branch."""
    if results:
        try:
            text = open(results).read()
        except OSError as error:
            refuse(f"cannot read {results}: {error.strerror}")
        source = results
    else:
        shown = subprocess.run(["git", "show", f"{branch}:results.tsv"], capture_output=True, text=True)
        if shown.returncode != 0:
            refuse(f"no results.tsv committed on {branch}: commit it there, fetch the branch again, or pass "
                   f"the file with --results")
        text, source = shown.stdout, f"{branch}:results.tsv"
    try:
        return ledger.parse(text, source)
    except ledger.LedgerError as error:
        refuse(str(error))


def kept_changes(rows):
    """[(commit, parent, kind)] of the source's kept changes, in the order they were kept: commits
    with keep rows whose parent has keep rows of the same kind (the best it was judged against)."""
    first_keep = {}
    for row in rows:
        if row.status == "keep" and row.is_evidence:
            first_keep.setdefault(row.commit, row.kind)
    changes = []
    for commit, kind in first_keep.items():
        code, parent = git_quiet("rev-parse", "--verify", "--quiet", f"{commit}^")
        if code == 0 and parent[:7] in first_keep and first_keep[parent[:7]] == kind:
            changes.append((commit, parent[:7], kind))
    return changes


def source_gain(rows, commit, parent, kind):
    """(gain in bpb, the source's sigma, its runs): the parent's mean minus the change's mean there."""
    noise = verdict.pooled_noise(ledger.repeat_groups(rows, kind))
    gain = verdict.mean(ledger.values_of(rows, parent, kind)) - verdict.mean(ledger.values_of(rows, commit, kind))
    return gain, noise.sigma, len(ledger.values_of(rows, commit, kind))


def changed_files(commit, parent):
    """The change's files an experiment may commit (the harness and run outputs are never replayed)."""
    names = git("diff", "--name-only", "--no-renames", parent, commit).splitlines()
    return [name for name in names if name and not not_experiment(name)]


def apply_problem(patch, *options):
    """None when `git apply` (with options) takes the patch, else its first line naming a file."""
    done = subprocess.run(["git", "apply", *options, "-"], input=patch, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line.removeprefix("error: ") for line in done.stderr.splitlines() if line.startswith("error:")]
    return lines[0] if lines else done.stderr.strip() or "git apply failed"


def judged_here(rows, branch, commit, kind=None):
    """Rows (of this kind, if given) that judged the change, oldest first: not an interrupted
    experiment's (unjudged), nor those of a win on the slots that was rebased and runs again."""
    tag = replay_tag(branch, commit)
    return [r for r in rows if tag in r.description and kind in (None, r.kind)
            and "[unjudged" not in r.description and REBASED not in r.description]


def queued_here(branch, commit):
    """The id of an open candidate on the slots that replays the change, else None."""
    tag = replay_tag(branch, commit)
    book = scheduler.load_candidates()
    return next((c["id"] for c in scheduler.open_candidates(book) if tag in c["description"]), None)


def remember_replay(branch, commit, **facts):
    with signals_held():
        state = load_state()
        state.setdefault("replays", {}).setdefault(branch, {}).setdefault(commit[:7], {}).update(facts)
        save_state(state)


def cmd_replay(args):
    on_slots = bool(args.workers or args.address) or cluster.scheduler_running()
    if on_slots:
        cluster.import_ray()
    with exclusive_lock(LOCK_PATIENCE_SECONDS if on_slots else 0.0):
        rows = source_rows(args.branch, args.results)
        changes = kept_changes(rows)
        if not changes:
            print(f"{'REPLAY':<8} nothing to replay: {args.branch} has no kept change in its results.tsv")
            return
        script = args.script or training_script()
        other = next(s for s in SCRIPTS if s != script)
        print(f"{'REPLAY':<8} {len(changes)} kept change(s) of {args.branch}, in the order they were kept"
              + (", each submitted to the slots" if on_slots else ""), flush=True)
        submitted = 0
        for commit, parent, kind in changes:
            description = first_description(rows, commit, kind, "no description")
            gain, sigma, runs = source_gain(rows, commit, parent, kind)
            facts = {"description": description, "source_gain": gain, "source_sigma": sigma, "source_runs": runs,
                     "source_kind": kind, "order": changes.index((commit, parent, kind))}
            submitted += replay_change(args, script, other, commit, parent, description, facts, on_slots)
    if submitted:
        cluster.start_scheduler(args.workers, args.address)
        print(f"{'REPLAY':<8} {submitted} change(s) queued on the slots (verdicts: uv run tools/experiment.py wait)",
              flush=True)


def replay_change(args, script, other, commit, parent, description, facts, on_slots=False):
    """Judge one kept change here (on_slots: queue it for the slots; True when queued), or say
    why not (present, needs porting, conflict, judged or queued before)."""
    label = f"{commit[:7]} {description}"
    if on_slots:
        plan, rows, best = experiment_setup(args, planned_slot_threads(args), f"baseline{slot_options(args)}")
        waiting = queued_here(args.branch, commit)
        if waiting:
            print(f"{'QUEUED':<8} {label}: waits on the slots as {waiting} already (uv run tools/experiment.py wait)")
            return False
    else:
        plan, rows, best = experiment_setup(args)
    done_rows = judged_here(rows, args.branch, commit, str(plan.kind))
    if done_rows:
        remember_replay(args.branch, commit, **facts, outcome="judged", candidate=done_rows[-1].commit)
        print(f"{'JUDGED':<8} {label}: judged here already ({done_rows[-1].commit}), not run again")
        return False
    files = changed_files(commit, parent)
    if other in files and script not in files:
        remember_replay(args.branch, commit, **facts, outcome="not tested", why=f"needs porting to {script}")
        print(f"{'PORTING':<8} {label}: changes {other}, not {script}: needs porting, not run")
        return False
    files = [name for name in files if name != other]
    if not files:
        remember_replay(args.branch, commit, **facts, outcome="not tested", why="changes no file an experiment edits")
        print(f"{'SKIPPED':<8} {label}: changes no file an experiment edits")
        return False
    if any(git("status", "--porcelain", "--", name) for name in files):
        refuse(f"{', '.join(files)} has uncommitted changes: commit or drop them before a replay")
    patch = subprocess.run(["git", "diff", "--no-renames", "--binary", parent, commit, "--", *files],
                           capture_output=True, text=True, check=True).stdout
    if apply_problem(patch, "--check", "--reverse") is None:
        remember_replay(args.branch, commit, **facts, outcome="not tested", why="already present here")
        print(f"{'PRESENT':<8} {label}: already in this branch's best, not run")
        return False
    problem = apply_problem(patch)
    if problem:
        remember_replay(args.branch, commit, **facts, outcome="not tested", why=f"does not apply: {problem}")
        later = "; if it needs an earlier change, replay again once that one is kept" if on_slots else ""
        print(f"{'CONFLICT':<8} {label}: does not apply ({problem}), skipped{later}")
        return False
    fingerprint = experiment_fingerprint(plan.script)
    earlier = judged_before(rows, plan.kind, fingerprint)
    if earlier:
        restore_files(files, best.commit)
        remember_replay(args.branch, commit, **facts, outcome="not tested", why=f"judged here already as {earlier}")
        print(f"{'JUDGED':<8} {label}: this exact change was judged here already ({earlier}), not run again")
        return False
    tagged = description + replay_tag(args.branch, commit)
    if on_slots:
        settings = {"timeout": plan.timeout, "max_disturbance": plan.max_disturbance, "threshold": None,
                    "simplify": False, "fingerprint": fingerprint}
        candidate = queue_candidate(plan, best.commit, tagged, files, settings)
        remember_replay(args.branch, commit, **facts, outcome="queued", base=best.commit[:7])
        print(f"{'SUBMIT':<8} {candidate['id']} {candidate['commit'][:7]} {tagged} (on {best.commit[:7]})", flush=True)
        return True
    remember_replay(args.branch, commit, **facts, outcome="running", base=best.commit[:7])
    judge_experiment(plan, best, rows, tagged, fingerprint=fingerprint, max_load_change=args.max_load_change)
    judged = judged_here(ready_ledger(), args.branch, commit, str(plan.kind))
    remember_replay(args.branch, commit, outcome="judged", candidate=judged[-1].commit if judged else None)
    return False


def transfer_rows(rows, state=None):
    """For the report: one dict per replayed change of every source branch, in the order kept there:
    branch, commit, description, source gain and sigma, gain and sigma here (None when not run), and
    the word: held (kept here), did not hold (discarded or crashed here), not tested (why)."""
    replays = (state if state is not None else load_state()).get("replays", {})
    table = []
    for branch, changes in replays.items():
        for commit, facts in sorted(changes.items(), key=lambda item: item[1].get("order", 0)):
            entry = {"branch": branch, "commit": commit, "description": facts.get("description", ""),
                     "source_gain": facts.get("source_gain"), "source_sigma": facts.get("source_sigma"),
                     "gain": None, "sigma": None, "word": f"not tested: {facts.get('why', 'not run yet')}"}
            judged = judged_here(rows, branch, commit) if facts.get("outcome") in ("judged", "queued") else []
            if judged:
                # The last commit judged: a win rebased onto a newer best is judged again as another.
                candidate = judged[-1].commit
                own = [r for r in judged if r.commit == candidate]
                kind = own[0].kind
                code, parent = git_quiet("rev-parse", "--verify", "--quiet", f"{candidate}^")
                base = parent[:7] if code == 0 else facts.get("base", "")
                values, base_values = ledger.values_of(rows, candidate, kind), ledger.values_of(rows, base, kind)
                held = any(r.status == "keep" for r in own)
                entry["word"] = "held" if held else ("did not hold (crashed)" if not values else "did not hold")
                if values and base_values:
                    entry["gain"] = verdict.mean(base_values) - verdict.mean(values)
                    entry["sigma"] = kind_noise(rows, kind, base).sigma
            elif facts.get("outcome") == "queued":
                entry["word"] = "not tested yet: waits on the slots (uv run tools/experiment.py wait)"
            table.append(entry)
    return table


def transfer_lines(rows, state=None):
    """The report's transfer table (markdown lines), or [] when nothing was replayed here."""
    table = transfer_rows(rows, state)
    if not table:
        return []

    def gain(value, sigma):
        if value is None:
            return "-"
        return f"{value:+.6f}" + (f" ({value / sigma:+.1f} sigma)" if sigma else "")

    lines = ["## Transfer: other machines' wins replayed here", "",
             "Gains are the best's mean minus the change's, each in its own machine's noise (sigma); "
             "positive is better.", "",
             "| source | commit | change | gain there | gain here | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for e in table:
        lines.append(f"| {e['branch']} | {e['commit']} | {e['description']} | {gain(e['source_gain'], e['source_sigma'])} "
                     f"| {gain(e['gain'], e['sigma'])} | {e['word']} |")
    return lines + [""]
