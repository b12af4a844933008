"""Reading what a night left behind, tolerantly, for the morning report and the live page:
results.tsv rows (tools/ledger.py checks each line; unreadable lines are counted, not fatal), the
run JSON files joined to them, git's facts about each experiment commit, and the agent's runs
that tools/night.py logged. Nothing here writes."""

import json
import re
import subprocess
import time
from pathlib import Path

from tools import ledger, plot

STANDARD = "standard"
NONSTANDARD = re.compile(r"^non-standard, ([0-9.]+)s budget$")
STAMP = re.compile(r"^run_(\d{8}_\d{6})")
RUNNER_TAGS = ("non-standard", "standard", "rerun", "run ", "baseline", "over budget", "disturbed",
               "unjudged")  # tags that are no crash cause
AGENT_LOG = Path(".autoresearch") / "agent_runs.jsonl"  # the agent's runs, one JSON line each (tools/night.py)


def parse_rows(text, source="results.tsv"):
    """Rows of a results.tsv text, tolerant: blank, header and unreadable lines are skipped and
    counted. Each row: index (its experiment number, as on the plot's x axis), commit, val_bpb,
    memory_gb, status, description, text, tags, kind, role ('baseline', 'rerun' or 'experiment'),
    and unreadable_lines (of the whole text)."""
    rows, skipped = [], 0
    for line in text.splitlines():
        if not line.strip() or line.startswith("commit\t"):
            continue
        try:
            parsed = ledger.parse_line(line)  # the runner's and tools/plot.py's check of a line
        except ValueError:
            skipped += 1
            continue
        description = parsed.description.strip()
        row = {"index": len(rows) + 1, "commit": parsed.commit[:7], "val_bpb": parsed.val_bpb,
               "memory_gb": parsed.memory_gb, "status": parsed.status, "description": description}
        row["text"], row["tags"] = plot.split_tags(description)
        kinds = [tag for tag in row["tags"] if NONSTANDARD.match(tag)]
        if ledger.KIND_TAG.search(description):
            kinds = [ledger.row_kind(description)]
        row["kind"] = kinds[0] if kinds else None  # None: not tagged; a crash row takes its neighbours' kind
        row["role"] = plot.row_role(row)
        rows.append(row)
    for row in rows:
        row["unreadable_lines"] = skipped  # on every row, so the count travels with the series
    return rows


def assign_kinds(rows):
    """Untagged crash rows take the kind of the run before them (a crash has no summary to say)."""
    previous = next((r["kind"] for r in rows if r["status"] != "crash"), None)
    for row in rows:
        if row["kind"] is None:
            row["kind"] = previous if row["status"] == "crash" and previous else STANDARD
        if row["status"] != "crash":
            previous = row["kind"]


def run_end(path):
    """When a run JSON was written: its timestamped name, else the file's modification time."""
    found = STAMP.match(path.name)
    if found:
        return time.mktime(time.strptime(found.group(1), "%Y%m%d_%H%M%S"))
    return path.stat().st_mtime


def load_runs(directory):
    """The run JSON files of a runs folder, oldest first, each with its end time as 'ended'."""
    runs = []
    for path in Path(directory).glob("run_*.json"):
        try:
            fields = json.loads(path.read_text())
            float(fields["val_bpb"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        fields["ended"] = run_end(path)
        runs.append(fields)
    return sorted(runs, key=lambda run: run["ended"])


def join_runs(rows, runs):
    """Give each finished row the run JSON with its val_bpb (6 decimals), each JSON used once."""
    waiting = {}
    for run in runs:
        waiting.setdefault(f"{float(run['val_bpb']):.6f}", []).append(run)
    for row in rows:
        matches = waiting.get(f"{row['val_bpb']:.6f}") if row["status"] != "crash" else None
        row["run"] = matches.pop(0) if matches else None


def git_lines(*args):
    """Output lines of a git command, or None outside a repository or when it fails."""
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else None


def commit_facts(commits):
    """{short commit: (commit time, diff stat)} for the commits this repository has."""
    if git_lines("rev-parse", "--verify", "--quiet", "HEAD") is None:
        return {}
    facts = {}
    for commit in dict.fromkeys(commits):
        shown = git_lines("show", "--numstat", "--format=%ct", f"{commit}^{{commit}}", "--")
        if not shown:
            continue
        files = [line.split("\t") for line in shown[1:] if line.count("\t") == 2]
        stat = ", ".join(f"{name} +{added} -{removed}" for added, removed, name in files) or "no change"
        facts[commit] = (float(shown[0]), stat)
    return facts


def load_agent_runs(path=AGENT_LOG):
    """The agent's runs that tools/night.py logged, oldest first; unreadable lines skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    agent_runs = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            float(entry["started_at"]), float(entry["ended_at"])
        except (ValueError, KeyError, TypeError):
            continue
        agent_runs.append(entry)
    return sorted(agent_runs, key=lambda entry: float(entry["started_at"]))


def crash_cause(row, log_text):
    """A crash row's cause: a tag that is not one of the runner's usual ones, else the run.log of
    that run (only the last run's log survives), else None."""
    causes = [tag for tag in row["tags"] if not tag.lower().startswith(RUNNER_TAGS)]
    if causes:
        return causes[-1]
    if log_text:
        lines = [line.strip() for line in log_text.replace("\r", "\n").splitlines() if line.strip()]
        failed = [line for line in lines
                  if line.startswith(("FAIL", "error:")) or re.match(r"^(\w+\.)*\w*(Error|Exception)\b", line)]
        return (failed or lines or ["run.log is empty"])[-1]
    return None


def cause_group(cause):
    """A short name to group crash causes by."""
    if cause is None:
        return "cause not recorded"
    lowered = cause.lower()
    if "out of memory" in lowered or re.search(r"\boom\b", lowered):
        return "out of memory"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if re.search(r"\bnan\b", lowered) or lowered.startswith("fail") or "diverg" in lowered:
        return "diverged (NaN or exploding loss)"
    error = re.search(r"\b(\w*(Error|Exception))\b", cause)
    return error.group(1) if error else cause
