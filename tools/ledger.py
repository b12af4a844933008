"""results.tsv: the upstream-format ledger of every run, and what the runner reads back from it.

Each row is `commit  val_bpb  memory_gb  status  description`, tab-separated, status keep, discard
or crash (crashes as 0.000000 and 0.0). The runner adds facts to the description as tags at its
end, so the file stays upstream-compatible and still says everything a verdict needs:

    wider mlp [run 2] [standard 300s/standard/pystdlib/cpu/cpu/x1]
    lr 0.08 [disturbed: other processes used 41% of the CPU] [non-standard 10s/smoke/local/cpu/smoke/x1]

- `[run N]`: the Nth run of the same commit (reruns and confirmations); the first has no tag.
- `[disturbed: ...]`, `[over budget: ...]`: the run is not evidence about the idea (never kept,
  left out of every mean and of sigma).
- `[unjudged: ...]`: a finished run of a candidate whose experiment was cut short; it still
  measures the noise.
- The kind, always last: standard or non-standard, then budget/profile/dataset/backend/tier/ranks.
  Results are compared only within one kind. Rows written before kinds existed parse as the kind
  `legacy` (or `legacy <budget>s` for the old `[non-standard, <budget>s budget]` tag).

The runner also appends every row it writes to a mirror under .autoresearch/, so a deleted or
truncated results.tsv is noticed before the next training run and can be restored.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

RESULTS_FILE = Path("results.tsv")
MIRROR_FILE = Path(".autoresearch") / "results.tsv"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
STATUSES = ("keep", "discard", "crash")
NOT_EVIDENCE_TAGS = ("disturbed", "over budget")
KIND_TAG = re.compile(r" \[((?:non-)?standard) ([0-9.]+)s/([^/\]]+)/([^/\]]+)/([^/\]]+)/([^/\]]+)/x(\d+)\]$")
LEGACY_TAG = re.compile(r" \[non-standard, ([0-9.]+)s budget\]$")
RUN_TAG = re.compile(r" \[run (\d+)\]")


class LedgerError(Exception):
    """results.tsv cannot be trusted as it is; the message says how to repair it."""


@dataclass(frozen=True)
class Kind:
    """What makes two results comparable. Results of different kinds are never compared."""
    time_budget: float
    profile: str
    dataset: str
    backend: str
    tier: str
    world_size: int
    standard: bool

    def tag(self):
        return (f"[{'standard' if self.standard else 'non-standard'} {self.time_budget:g}s/{self.profile}/"
                f"{self.dataset}/{self.backend}/{self.tier}/x{self.world_size}]")

    def __str__(self):
        return self.tag()[1:-1]


@dataclass(frozen=True)
class Row:
    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str
    kind: str  # the kind's text (str(Kind)), or "legacy ..." for untagged rows

    @property
    def is_evidence(self):
        """A finished run whose val_bpb says something about its code."""
        return self.status != "crash" and not any(f"[{tag}" in self.description for tag in NOT_EVIDENCE_TAGS)


def clean_description(text):
    """One line, no tabs: the description is the last column of a tab-separated file."""
    return " ".join(str(text).split())


def describe(description, kind, run=1, note=None):
    """The description column: the idea, then [run N], an optional [note], and the kind tag."""
    text = clean_description(description)
    if run > 1:
        text += f" [run {run}]"
    if note:
        text += f" [{clean_description(note)}]"
    return f"{text} {kind.tag()}"


def format_row(commit, val_bpb, memory_gb, status, description):
    return f"{commit[:7]}\t{val_bpb:.6f}\t{memory_gb:.1f}\t{status}\t{clean_description(description)}"


def row_kind(description):
    tagged = KIND_TAG.search(description)
    if tagged:
        return tagged.group(0).strip()[1:-1]
    legacy = LEGACY_TAG.search(description)
    return f"legacy {float(legacy.group(1)):g}s" if legacy else "legacy"


def parse_line(line):
    """The Row of one results.tsv line; ValueError when it is not commit (hex), val_bpb, memory_gb,
    status (keep/discard/crash), description separated by tabs. The one check of a line that every
    reader (the runner, tools/plot.py, tools/report.py) applies."""
    parts = line.rstrip("\r").split("\t")
    if len(parts) < 5:
        raise ValueError("fewer than 5 columns")
    commit, val_bpb, memory_gb, status = parts[0], float(parts[1]), float(parts[2]), parts[3]
    if status not in STATUSES or not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        raise ValueError("bad status or commit")
    description = " ".join(parts[4:])
    return Row(commit, val_bpb, memory_gb, status, description, row_kind(description))


def parse(text, source=RESULTS_FILE):
    """Rows of a results.tsv text. A bad header or line raises LedgerError naming it."""
    lines = text.splitlines()
    if not lines or lines[0].rstrip("\r") != HEADER:
        raise LedgerError(f"{source} does not start with the header line `{HEADER.replace(chr(9), ' TAB ')}`")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rows.append(parse_line(line))
        except ValueError:
            raise LedgerError(f"{source} line {number} is not commit, val_bpb, memory_gb, status "
                              f"(keep/discard/crash), description separated by tabs")
    return rows


def read(path=RESULTS_FILE):
    return parse(Path(path).read_text(errors="replace"), path)


def check_ready(path=RESULTS_FILE, mirror=MIRROR_FILE):
    """Rows of results.tsv, or LedgerError with the fix when it is missing, malformed or has lost
    rows that the runner wrote (compared with its mirror)."""
    path, mirror = Path(path), Path(mirror)
    restore = f"restore it with: cp {mirror} {path}" if mirror.exists() else f"restore it with: git checkout -- {path}"
    if not path.exists():
        raise LedgerError(f"{path} is missing, so the best result is unknown; {restore}")
    try:
        rows = read(path)
    except LedgerError as error:
        raise LedgerError(f"{error}; fix or delete that line, or {restore}") from None
    if mirror.exists():
        current = Path(path).read_text(errors="replace").splitlines()
        present = set(current)
        missing = [line for line in mirror.read_text(errors="replace").splitlines()[1:] if line and line not in present]
        # A row the runner wrote that is absent was either edited (a line of the file is not one the
        # runner wrote, so it took that row's place) or deleted; the fix differs, so the words do too.
        written = set(mirror.read_text(errors="replace").splitlines())
        foreign = [line for line in current[1:] if line.strip() and line not in written]
        changed = list(zip(missing, foreign))
        lost = missing[len(changed):]
        if changed:
            was, now = changed[0]
            raise LedgerError(f"{path} has {len(changed)} row(s) the runner wrote that were changed (first: "
                              f"`{was.replace(chr(9), ' ')[:80]}` now reads `{now.replace(chr(9), ' ')[:80]}`)"
                              + (f" and lost {len(lost)} more" if lost else "") + f"; {restore}")
        if lost:
            raise LedgerError(f"{path} lost {len(lost)} row(s) the runner wrote (first: {lost[0].split(chr(9))[0]} "
                              f"{lost[0].split(chr(9))[-1][:60]}); {restore}")
    return rows


def append(lines, path=RESULTS_FILE, mirror=MIRROR_FILE):
    """Append rows to results.tsv and its mirror, each file in a single write (never half a row)."""
    if not lines:
        return
    for target in (Path(path), Path(mirror)):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.stat().st_size == 0:
            target.write_text(HEADER + "\n")
        with open(target, "rb") as f:
            f.seek(-1, os.SEEK_END)
            missing_newline = f.read(1) != b"\n"
        data = ("\n" if missing_newline else "") + "".join(line + "\n" for line in lines)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)


def values_of(rows, commit, kind):
    """val_bpb of every evidence run of one commit and kind, in file order."""
    return [r.val_bpb for r in rows if r.commit == commit[:7] and r.kind == kind and r.is_evidence]


def repeat_groups(rows, kind, exclude=()):
    """Evidence values of every commit of one kind, grouped by commit (for the pooled sigma)."""
    groups = {}
    for r in rows:
        if r.kind == kind and r.is_evidence and r.commit not in exclude:
            groups.setdefault(r.commit, []).append(r.val_bpb)
    return list(groups.values())


def next_run_number(rows, commit, kind):
    """The run number a new run of this commit and kind gets (finished runs of any status + 1)."""
    return 1 + sum(1 for r in rows if r.commit == commit[:7] and r.kind == kind)
