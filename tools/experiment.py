"""The experiment runner: one command per experiment, so the research loop stays safe and honest.

    uv run tools/experiment.py baseline [--repeat N]   # the unmodified script, N times -> noise floor
    uv run tools/experiment.py run "what this tries"   # one experiment -> one results.tsv row, one verdict
    uv run tools/experiment.py status                  # best result, counts, noise floor, last verdict
    uv run tools/experiment.py best                    # the best kept row of results.tsv

`run` refuses (exit 2) when prepare.py or backends/ differ from the branch's base (its merge-base
with main or master), commits the training-script change (train.py, or train_mlx.py when the
backend is mlx) with the description as message, runs it with its output in run.log under a hard
timeout that kills the whole process group, reads runs/last_run.json (or the summary in run.log),
appends one row to results.tsv and keeps the commit or reverts it.

How the pieces stay consistent:
- Reverts use `git reset --keep <last kept commit>`: it moves the branch back and rewrites only the
  files the experiment commit changed (the training script). results.tsv is never part of an
  experiment commit, so its new rows survive, as do run.log, runs/ and the state file (ignored).
- The last kept commit is HEAD when a run starts: after every run the branch tip is the best code.
- Keep rule: val_bpb < best kept - threshold, strictly (an equal result is discarded). The best
  kept result counts only `keep` rows whose commit is on the current branch. The threshold is
  --threshold, else the noise floor's standard deviation measured by `baseline --repeat N`, else 0.
- A non-standard result (shortened AUTORESEARCH_TIME_BUDGET or the smoke profile) is never compared
  with standard ones. Its description gets a "[non-standard, <budget>s budget]" tag, and it is
  compared only with kept results that carry the same tag (the same time budget).
- Ctrl-C (or SIGTERM) during training kills the training process group, undoes the experiment
  commit with `git reset --soft` (the edit stays in the working tree, staged, ready to rerun) and
  records nothing: an interrupted run says nothing about the idea. Commits, rows and reverts run
  with Ctrl-C held back until they are done, and a row is appended with a single write.
- Exit status: 0 when a verdict was recorded (crash included), 2 when the runner refused, 130 when
  interrupted.

Tests point AUTORESEARCH_TRAIN_CMD at a fake training script (the default is `uv run <script>`).
"""

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.report import LOCKED_PATHS, parse_summary, read_run_json, runs_dir  # noqa: E402

RESULTS_FILE = Path("results.tsv")
RESULTS_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
LOG_FILE = Path("run.log")
STATE_DIR = Path(".autoresearch")  # runner memory (noise floor, last verdict); ignores itself in git
STATE_FILE = STATE_DIR / "state.json"
BASE_BRANCHES = ("main", "master")
STANDARD_TIME_BUDGET = 300  # used for the default timeout when prepare.py cannot be imported
KILL_GRACE_SECONDS = 5  # between SIGTERM and SIGKILL for the training process group
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130
STANDARD = "standard"
NONSTANDARD_TAG = re.compile(r" \[non-standard, ([0-9.]+)s budget\]$")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the runner."""


def _raise_interrupted(signum, frame):
    raise Interrupted


@contextlib.contextmanager
def signals_held():
    """Hold back Ctrl-C and SIGTERM until the block is done, then act on them.

    Wraps every step that changes git or results.tsv, so an interruption can never land between a
    commit and its bookkeeping.
    """
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
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
    result = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"],
                            capture_output=True, text=True)
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
               f"from {base[:7]} ({base_name}); "
               f"undo that with: git checkout {base[:7]} -- {' '.join(LOCKED_PATHS)}")


def reachable_commits():
    """Short hashes of every commit on the current branch."""
    return {sha[:7] for sha in git("rev-list", "HEAD").split()}


def commit_script(script, message):
    """Commit the training script alone; False when it has no change to commit."""
    if not git("status", "--porcelain", "--", script):
        return False
    git("add", "--", script)
    git("commit", "--quiet", "-m", message, "--", script)
    return True


# ---------------------------------------------------------------------------------------------
# results.tsv and the state file

def clean_description(text):
    """One line, no tabs: the description is the last column of a tab-separated file."""
    return " ".join(text.split())


def format_row(commit, val_bpb, memory_gb, status, description):
    return f"{commit[:7]}\t{val_bpb:.6f}\t{memory_gb:.1f}\t{status}\t{clean_description(description)}"


def append_row(row):
    """Append one row in a single write, so an interruption can never leave half a row."""
    if not RESULTS_FILE.exists() or RESULTS_FILE.stat().st_size == 0:
        RESULTS_FILE.write_text(RESULTS_HEADER + "\n")
    with open(RESULTS_FILE, "rb") as f:
        f.seek(-1, os.SEEK_END)
        missing_newline = f.read(1) != b"\n"
    data = ("\n" if missing_newline else "") + row + "\n"
    fd = os.open(RESULTS_FILE, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def result_kind(description):
    """'standard', or 'non-standard <budget>s': only results of the same kind are compared."""
    tagged = NONSTANDARD_TAG.search(description)
    return f"non-standard {float(tagged.group(1)):g}s" if tagged else STANDARD


def parse_results(text, source=RESULTS_FILE):
    """Rows of a results.tsv text as dicts (commit, val_bpb, memory_gb, status, description, kind)."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("commit\t"):
            continue
        parts = line.split("\t")
        try:
            commit, val_bpb, memory_gb, status = parts[0], float(parts[1]), float(parts[2]), parts[3]
        except (IndexError, ValueError):
            raise SystemExit(f"{source} line {number} is not commit, val_bpb, memory_gb, status, "
                             "description separated by tabs: fix or delete that line")
        description = " ".join(parts[4:])
        rows.append({"commit": commit, "val_bpb": val_bpb, "memory_gb": memory_gb, "status": status,
                     "description": description, "kind": result_kind(description)})
    return rows


def read_results():
    return parse_results(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else []


def best_kept(rows, kind, on_branch):
    kept = [r for r in rows if r["status"] == "keep" and r["kind"] == kind and r["commit"] in on_branch]
    return min(kept, key=lambda r: r["val_bpb"]) if kept else None


def load_state():
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def save_state(state):
    STATE_DIR.mkdir(exist_ok=True)
    (STATE_DIR / ".gitignore").write_text("*\n")
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, STATE_FILE)


def default_threshold(state, kind):
    """The noise floor's standard deviation when it was measured on results of the same kind."""
    noise = state.get("noise_floor")
    return noise["std"] if noise and noise["kind"] == kind else 0.0


# ---------------------------------------------------------------------------------------------
# running the training script

def training_script():
    """train.py, or train_mlx.py when the detected backend is mlx."""
    from backends import detect_backend
    try:
        backend = detect_backend()
    except RuntimeError as e:
        raise SystemExit(str(e))
    return "train_mlx.py" if backend == "mlx" else "train.py"


def require_script(script):
    if not Path(script).is_file():
        refuse(f"{script} not found in {Path.cwd()}; is this the autoresearch checkout?")


def default_timeout():
    """Twice the time budget plus two minutes for start-up, compilation and evaluation."""
    try:
        import prepare
        budget = float(prepare.TIME_BUDGET)
    except ImportError:
        budget = STANDARD_TIME_BUDGET
    return budget * 2 + 120


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


def run_training(command, timeout):
    """Run the command with all output in run.log, in its own process group. Returns
    (exit code, timed out). The group is always killed at the end, stragglers included."""
    process = None
    try:
        with open(LOG_FILE, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        return None, True
    finally:
        if process is not None:
            with signals_held():
                kill_group(process)


def read_outcome(exit_code, timed_out, timeout):
    """(fields, None) for a usable result, or (None, why it crashed)."""
    log_lines = [line.strip() for line in LOG_FILE.read_text(errors="replace").replace("\r", "\n").splitlines()]
    log_lines = [line for line in log_lines if line]
    last_line = log_lines[-1] if log_lines else "run.log is empty"
    fail = next((line for line in log_lines if line.startswith("FAIL")), None)
    if timed_out:
        return None, f"timed out after {timeout:g} s, process group killed"
    if exit_code != 0:
        return None, f"exit code {exit_code}: {fail or last_line}"
    if fail:
        return None, fail
    fields = read_run_json(runs_dir() / "last_run.json") or parse_summary("\n".join(log_lines))
    if fields is None:
        return None, f"no summary in run.log (last line: {last_line})"
    if not math.isfinite(float(fields["val_bpb"])):
        return None, f"val_bpb is {fields['val_bpb']}"
    return fields, None


def run_once(script, timeout):
    """One training run: (fields, None) or (None, crash reason)."""
    (runs_dir() / "last_run.json").unlink(missing_ok=True)
    exit_code, timed_out = run_training(train_command(script), timeout)
    return read_outcome(exit_code, timed_out, timeout)


def tagged_description(description, fields):
    """The description, tagged when the result is non-standard so it is only compared with its kind."""
    if fields is None or fields.get("standard", True):
        return description
    return f"{description} [non-standard, {float(fields['time_budget']):g}s budget]"


# ---------------------------------------------------------------------------------------------
# commands

def judge(commit, description, fields, crash, threshold):
    """(status, results.tsv row, verdict line) for one finished run."""
    label = f"{commit[:7]} {description}"
    if crash:
        return "crash", format_row(commit, 0.0, 0.0, "crash", description), f"CRASH    0.000000 ({crash}) {label}"
    val_bpb, kind = float(fields["val_bpb"]), result_kind(description)
    if threshold is None:
        threshold = default_threshold(load_state(), kind)
    best = best_kept(read_results(), kind, reachable_commits())
    if best is None:
        status, context = "keep", f"first {kind} result"
    else:
        status = "keep" if val_bpb < best["val_bpb"] - threshold else "discard"
        context = (f"best {'was' if status == 'keep' else 'is'} {best['val_bpb']:.6f}, "
                   f"{val_bpb - best['val_bpb']:+.6f}")
        if threshold:
            context += f", threshold {threshold:.6f}"
    row = format_row(commit, val_bpb, fields["peak_vram_mb"] / 1024, status, description)
    return status, row, f"{status.upper():<8} {val_bpb:.6f} ({context}) {label}"


def cmd_run(args):
    description = clean_description(args.description)
    if not description:
        refuse("give the experiment a description: what does this change try?")
    require_clean_harness()
    script = args.script or training_script()
    require_script(script)
    timeout = args.timeout or default_timeout()
    kept, committed = head(), False
    try:
        with signals_held():
            committed = commit_script(script, description)
        commit = head()
        if not committed:
            print(f"note: {script} has no changes since {kept[:7]}; running it as it is")
        print(f"running {shlex.join(train_command(script))} (timeout {timeout:g} s, output in {LOG_FILE})",
              flush=True)
        fields, crash = run_once(script, timeout)
        description = tagged_description(description, fields)
        status, row, verdict = judge(commit, description, fields, crash, args.threshold)
    except Interrupted:
        undo_commit(committed, kept)
        print(f"interrupted: nothing recorded; the experiment commit was undone and the change to "
              f"{script} is still in the working tree (staged)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    except BaseException:
        undo_commit(committed, kept)
        raise

    with signals_held():
        append_row(row)
        print(verdict, flush=True)
        state = load_state()
        state["last_verdict"] = verdict
        save_state(state)
        if status != "keep" and committed:
            if git("status", "--porcelain", "--", script):
                raise SystemExit(f"{script} was edited while it ran, so {commit[:7]} is not reverted yet; "
                                 f"save your edit elsewhere, then run: git reset --keep {kept[:7]}")
            git("reset", "--quiet", "--keep", kept)


def undo_commit(committed, kept):
    """Take the experiment commit back, leaving its change staged in the working tree."""
    with signals_held():
        if committed:
            git("reset", "--quiet", "--soft", kept)


def cmd_baseline(args):
    require_clean_harness()
    script = args.script or training_script()
    require_script(script)
    if git("status", "--porcelain", "--", script):
        refuse(f"{script} has uncommitted changes and the baseline runs the committed script; "
               f"commit them or drop them (git checkout -- {script})")
    timeout = args.timeout or default_timeout()
    commit = head()
    values, kind, verdict = [], STANDARD, None
    for run in range(1, args.repeat + 1):
        description = "baseline" if args.repeat == 1 else f"baseline (run {run}/{args.repeat})"
        print(f"running {shlex.join(train_command(script))} (timeout {timeout:g} s, output in {LOG_FILE})",
              flush=True)
        try:
            fields, crash = run_once(script, timeout)
        except Interrupted:
            print(f"interrupted: baseline run {run} not recorded, {len(values)} earlier runs are in "
                  f"{RESULTS_FILE}; no noise floor saved", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED)
        with signals_held():
            description = tagged_description(description, fields)
            if crash:
                append_row(format_row(commit, 0.0, 0.0, "crash", description))
                verdict = f"CRASH    0.000000 ({crash}) {commit[:7]} {description}"
            else:
                kind = result_kind(description)
                status = "discard" if values else "keep"
                values.append(float(fields["val_bpb"]))
                append_row(format_row(commit, values[-1], fields["peak_vram_mb"] / 1024, status, description))
                verdict = f"{'BASELINE':<8} {values[-1]:.6f} ({status}) {commit[:7]} {description}"
            print(verdict, flush=True)
    with signals_held():
        state = load_state()
        if len(values) >= 2:
            noise = {"mean": statistics.mean(values), "std": statistics.stdev(values), "n": len(values),
                     "kind": kind, "commit": commit[:7]}
            state["noise_floor"] = noise
            verdict = (f"{'NOISE':<8} mean {noise['mean']:.6f} std {noise['std']:.6f} over {noise['n']} runs: "
                       f"`run` keeps a result only if it beats the best by more than {noise['std']:.6f}")
            print(verdict)
        elif args.repeat > 1:
            print(f"no noise floor: it needs at least 2 successful runs, got {len(values)}")
        state["last_verdict"] = verdict
        save_state(state)
    if not values:
        raise SystemExit("every baseline run crashed: read run.log")


def best_rows():
    """The best kept row of each kind of result on this branch."""
    rows, on_branch = read_results(), reachable_commits()
    kinds = sorted(dict.fromkeys(r["kind"] for r in rows), key=lambda kind: kind != STANDARD)
    return [best for best in (best_kept(rows, kind, on_branch) for kind in kinds) if best]


def cmd_status(args):
    rows, state = read_results(), load_state()
    branch = current_branch() or "(detached HEAD)"
    base_name, base = branch_base()
    changed = harness_changes(base)
    harness = f"CHANGED: {', '.join(changed)}" if changed else "unchanged"
    print(f"branch       {branch} (base {base[:7]} on {base_name}; harness {harness})")
    bests = best_rows()
    for best in bests:
        print(f"best         {best['val_bpb']:.6f} {best['commit']} {best['description']}")
    if not bests:
        print("best         none yet (start with: uv run tools/experiment.py baseline)")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("keep", "discard", "crash")}
    print(f"experiments  {len(rows)} ({', '.join(f'{n} {status}' for status, n in counts.items())})")
    noise = state.get("noise_floor")
    if noise:
        print(f"noise floor  std {noise['std']:.6f}, mean {noise['mean']:.6f}, n={noise['n']} "
              f"({noise['kind']} results, commit {noise['commit']}): the default threshold")
    else:
        print("noise floor  not measured (uv run tools/experiment.py baseline --repeat 3)")
    print(f"last verdict {state.get('last_verdict', 'none yet')}")


def cmd_best(args):
    best = best_rows()
    if not best:
        raise SystemExit("no kept result on this branch yet: start with uv run tools/experiment.py baseline")
    print(format_row(best[0]["commit"], best[0]["val_bpb"], best[0]["memory_gb"], best[0]["status"],
                     best[0]["description"]))


def main():
    parser = argparse.ArgumentParser(description="Run, record and keep or revert training experiments.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="commit the training-script change, run it, keep or revert")
    run.add_argument("description", help="what this experiment tries (the commit message and results.tsv text)")
    run.add_argument("--threshold", type=float, default=None,
                     help="required improvement over the best kept val_bpb (default: noise floor std, else 0)")
    baseline = commands.add_parser("baseline", help="run the unmodified script N times; record the noise floor")
    baseline.add_argument("--repeat", type=int, default=1, help="how many runs (default 1; 3+ measures the noise)")
    for sub in (run, baseline):
        sub.add_argument("--timeout", type=float, default=None,
                         help="seconds before the run is killed (default: time budget x 2 + 120)")
        sub.add_argument("--script", default=None,
                         help="training script to commit and run (default: chosen by the detected backend)")
    commands.add_parser("status", help="best result, experiment counts, noise floor, last verdict")
    commands.add_parser("best", help="print the best kept row of results.tsv")
    args = parser.parse_args()
    if args.command == "baseline" and args.repeat < 1:
        parser.error("--repeat must be at least 1")

    root = repo_root()
    os.chdir(root)
    sys.path.insert(0, str(root))  # prepare.py (for the time budget) from the checkout being run
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        {"run": cmd_run, "baseline": cmd_baseline, "status": cmd_status, "best": cmd_best}[args.command](args)
    except Interrupted:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
