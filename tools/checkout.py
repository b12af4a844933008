"""Git plumbing of the runner: the branch, its base, the locked harness, experiment commits.

Every git call runs detached from the terminal (start_new_session), so a Ctrl-C at the terminal never cuts git short. The
harness (backends.report.LOCKED_PATHS) must match the branch's base, its merge-base with main or
master; a run refuses otherwise.
"""

import hashlib
import os
import subprocess
from pathlib import Path

from backends.report import LOCKED_PATHS, runs_dir
from tools import scheduler
from tools.ledger import MIRROR_FILE, RESULTS_FILE
from tools.runner_state import STATE_DIR, refuse
from tools.training_run import LOG_FILE

BASE_BRANCHES = ("main", "master")


def git(*args):
    """Output of a git command, detached from the terminal, so a Ctrl-C at the terminal never cuts git short."""
    result = subprocess.run(["git", *args], capture_output=True, text=True, start_new_session=True)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SystemExit(f"git {args[0]} failed: {detail[-1] if detail else 'no output'}")
    return result.stdout.strip()


def git_quiet(*args, env=None):
    """(exit code, output) of a git command that may fail as part of the plan (a conflict)."""
    result = subprocess.run(["git", *args], capture_output=True, text=True, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, (result.stdout + result.stderr).strip()


def repo_root():
    """The top of the git checkout the current directory is in."""
    found = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit("not inside a git repository: run this from your autoresearch checkout")
    return Path(found.stdout.strip())


def head():
    """The full commit id of HEAD."""
    return git("rev-parse", "HEAD")


def current_branch():
    """The checked-out branch, or None on a detached HEAD."""
    result = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def branch_base():
    """(name, commit): where this branch left main (or master); the harness must match it."""
    for name in BASE_BRANCHES:
        exists = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                                capture_output=True, text=True)
        if exists.returncode == 0:
            return name, git("merge-base", "HEAD", name)
    raise SystemExit("no main or master branch to compare the harness (prepare.py, dataset_builders.py, backends/) against")


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


def not_experiment(path):
    """True for what an experiment never commits: the locked harness, the ledger, run outputs and
    the runner's own files."""
    outside = (*LOCKED_PATHS, str(RESULTS_FILE), str(MIRROR_FILE), str(LOG_FILE), str(runs_dir()), str(STATE_DIR))
    return any(path == other or path.startswith(other.rstrip("/") + "/") for other in outside)


def experiment_files(script):
    """The files an experiment commits: the training script, every other tracked file changed
    since HEAD and every new Python file (not git-ignored), outside the harness, results.tsv and
    run outputs.

    An agent that moves a layer into a module of its own is doing research: the kept commit must
    hold that module, or a fresh clone of the branch cannot run its best. So such files go into
    the experiment's commit (and out of the working tree with it on a discard), rather than
    refusing. New files that are not Python (an agent's notes, a scratch file) are left alone, as
    untracked files always were: a discard would otherwise take them away."""
    changed = git("diff", "--name-only", "--no-renames", "HEAD").splitlines()
    added = [path for path in git("ls-files", "--others", "--exclude-standard").splitlines() if path.endswith(".py")]
    others = sorted({path for path in changed + added if path and path != script and not not_experiment(path)})
    return [script, *others]


def commit_experiment(script, message):
    """Commit the training script and the experiment's other files (experiment_files); returns
    the other files committed. Only those paths: anything else staged stays out of the commit."""
    paths = [path for path in experiment_files(script) if git("status", "--porcelain", "--", path)]
    if not paths:
        return []
    git("add", "--all", "--", *paths)
    git("commit", "--quiet", "-m", message, "--", *paths)
    return [path for path in paths if path != script]


def candidate_commit(paths, description, parent):
    """A commit of the files at `paths` as they are in the working tree on top of `parent`, made
    with a private index, so neither HEAD nor the index moves."""
    index = STATE_DIR / "candidate.index"
    env = {"GIT_INDEX_FILE": str(index.resolve())}
    try:
        for args in (("read-tree", parent), ("add", "--", *paths)):
            code, out = git_quiet(*args, env=env)
            if code:
                raise SystemExit(f"git {args[0]} failed: {out}")
        code, tree = git_quiet("write-tree", env=env)
        if code:
            raise SystemExit(f"git write-tree failed: {tree}")
    finally:
        index.unlink(missing_ok=True)
    return git("commit-tree", tree, "-p", parent, "-m", description)


def restore_files(paths, commit):
    """Put the files at `paths` back as they are at `commit`; one that commit lacks is removed."""
    for path in paths:
        if git_quiet("cat-file", "-e", f"{commit}:{path}")[0] == 0:
            git("checkout", commit, "--", path)
        else:
            git_quiet("clean", "--quiet", "--force", "--", path)


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


def experiment_fingerprint(script):
    """One hash of what an experiment would commit now (experiment_files: the script's text and
    every other file it brings, by path), so the runner can tell a repeat of an experiment it
    has already judged from a new one. The same edit made twice on the same best hashes the same."""
    digest = hashlib.sha256()
    for path in experiment_files(script):
        file = Path(path)
        digest.update(path.encode() + b"\0" + (file.read_bytes() if file.exists() else b"(deleted)") + b"\0")
    return digest.hexdigest()[:16]


def line_changes(script):
    """(lines added, lines removed) by the experiment's files against HEAD, new files included."""
    added = removed = 0
    for path in experiment_files(script):
        if git("ls-files", "--", path):
            for line in git("diff", "--numstat", "HEAD", "--", path).splitlines():
                plus, minus, _ = line.split("\t", 2)
                added += int(plus) if plus.isdigit() else 0
                removed += int(minus) if minus.isdigit() else 0
        elif Path(path).exists():
            added += len(Path(path).read_text(errors="replace").splitlines())
    return added, removed


def write_best_copy(best, script, folder):
    """The best commit's training script and every other Python file of it that HEAD changed or
    removed, written under `folder` at their paths, so that `uv run folder/<script>` trains the
    best's code while HEAD holds a candidate (the script's folder comes first on its import path,
    so the best's own modules shadow the candidate's). Returns the script's path there."""
    changed = git("diff", "--name-only", "--no-renames", best, "HEAD").splitlines()
    paths = {script, *(path for path in changed if path.endswith(".py") and not not_experiment(path))}
    folder = Path(folder)
    for path in sorted(paths):
        shown = subprocess.run(["git", "show", f"{best}:{path}"], capture_output=True, start_new_session=True)
        if shown.returncode != 0:
            continue  # new in the candidate: the best never imports it
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shown.stdout)
    return str(folder / script)
