"""The live page of a night: what `uv run tools/report.py --serve` shows while experiments run.

    uv run tools/report.py --serve                          # http://127.0.0.1:8765/ on this machine
    uv run tools/report.py --serve --host 0.0.0.0 --port 9000   # also from the LAN (a phone, a laptop)

One page (GET /): inline CSS and script, nothing fetched from elsewhere, so it works offline. It
asks GET /state.json every POLL_SECONDS and redraws itself without a reload: the progress chart
(an SVG drawn here, the same marks as progress.png), the best and its runs, sigma, the last runs
and verdicts with their reasons, the run in progress (elapsed of its budget, step, loss), the
slots and the queue of parallel experiments, and the machine's load.

Where each fact comes from, read fresh on every request from the checkout the server runs in:
- results.tsv: every row of the latest row's kind (results of other kinds are never compared).
  Lines that are not rows, as while the file is being rewritten, are counted and skipped. The
  best is the commit of the last kept row (the runner keeps only a change that beats the best),
  its value the mean of its evidence runs, sigma pooled as `experiment.py status` pools it.
- .autoresearch/state.json: the runner's last verdict line and the experiment it is judging.
- .autoresearch/lock: which runner command runs (its text), if its pid still runs.
- run.log: the last progress line (`step N (P%) | loss L | ... | remaining Rs`).
- .autoresearch/parallel/: the running, queued and finished runs of the scheduler.
- psutil: the machine's CPU and memory.

It never blocks the runner: it takes no lock (not even for a moment: a runner that found the lock
busy would refuse to start) and writes nothing. It is read-only: GET and HEAD only, every other
method is answered 405.

Reads no environment variables.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from tools import cluster, ledger, plot, scheduler, verdict
from tools.live_chart import chart_svg

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
POLL_SECONDS = 2.0        # how often the page asks for the state
LAST_RUNS = 10            # runs listed under "last runs"
VERDICT_MEMORY = 20       # distinct verdict lines the server remembers while it runs
LOG_TAIL_BYTES = 16384    # of run.log read for its last progress line
STATE_FILE = Path(".autoresearch") / "state.json"
LOCK_FILE = Path(".autoresearch") / "lock"
RUN_LOG = Path("run.log")
PROGRESS = re.compile(r"step (\d+) \(([0-9.]+)%\) \| loss (\S+)(?:.*?remaining ([0-9.]+)s)?")
BUDGET = re.compile(r"^(?:non-)?standard ([0-9.]+)s/")
LOCK_PID = re.compile(r"^pid (\d+)")



# ---------------------------------------------------------------------------------------------
# reading the night's files, defensively: any of them can be missing, half written or garbage

def read_rows(path=ledger.RESULTS_FILE):
    """(rows, unreadable lines, found): the results.tsv rows (ledger.Row) that parse, one line at
    a time, so a half-written or damaged line costs only itself."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return [], 0, False
    rows, unreadable = [], 0
    for line in text.splitlines():
        if not line.strip() or line.rstrip("\r") == ledger.HEADER:
            continue
        try:
            rows += ledger.parse(f"{ledger.HEADER}\n{line}")
        except ledger.LedgerError:
            unreadable += 1
    return rows, unreadable, True


def read_json(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def process_alive_since(pid, written):
    """Whether pid runs and started before `written` (a file's mtime), so a reused pid of a
    process started later does not pass for the runner that wrote the file."""
    try:
        return psutil.Process(pid).create_time() <= written + 1.0
    except (psutil.Error, ValueError):
        return False


def lock_holder(path=LOCK_FILE):
    """The text a running runner wrote into its lock file ("pid N: run ..., since HH:MM:SS"), or
    None when no such process runs. Reads the file only: never tries the lock itself."""
    try:
        text, written = Path(path).read_text(errors="replace").strip(), Path(path).stat().st_mtime
    except OSError:
        return None
    found = LOCK_PID.match(text)
    return text if found and process_alive_since(int(found.group(1)), written) else None


def last_progress(path=RUN_LOG):
    """(progress fields or None, last line, seconds since the log was written) of run.log."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace")
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return None, None, None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    progress = None
    for line in reversed(lines):
        found = PROGRESS.search(line)
        if found:
            step, percent, loss, remaining = found.groups()
            progress = {"step": int(step), "percent": float(percent), "loss": loss,
                        "remaining": float(remaining) if remaining else None}
            break
    return progress, (lines[-1] if lines else None), age


def time_budget(kind):
    found = BUDGET.match(kind or "")
    return float(found.group(1)) if found else None


# ---------------------------------------------------------------------------------------------
# the parts of the state

def chart_rows(rows):
    """The rows as the dicts tools/plot.py reads (val_bpb, status, description)."""
    return [{"val_bpb": r.val_bpb, "status": r.status, "description": r.description, "commit": r.commit}
            for r in rows]


def results_part(rows, unreadable, found):
    """Counts, the best and its runs, sigma and the last runs of the latest kind."""
    if not rows:
        note = "no experiments yet" if found else f"{ledger.RESULTS_FILE} not found in {Path.cwd()}"
        return {"kind": None, "rows": 0, "unreadable": unreadable, "note": note, "best": None,
                "sigma": None, "counts": {}, "last": [], "other_kinds": 0}
    kind = rows[-1].kind
    mine = [r for r in rows if r.kind == kind]
    kept = [r for r in mine if r.status == "keep"]
    best = None
    if kept:
        commit = kept[-1].commit
        values = ledger.values_of(mine, commit, kind)
        if values:
            text = next(plot.split_tags(r.description)[0] for r in mine if r.commit == commit)
            best = {"commit": commit, "mean": verdict.mean(values), "runs": len(values), "values": values,
                    "description": text}
    exclude = {best["commit"]} if best else set()
    noise = verdict.pooled_noise([*ledger.repeat_groups(mine, kind, exclude=exclude), best["values"] if best else []])
    last = []
    for index, row in list(enumerate(mine, start=1))[-LAST_RUNS:]:
        text, tags = plot.split_tags(row.description)
        delta = row.val_bpb - best["mean"] if best and row.status != "crash" else None
        last.append({"index": index, "commit": row.commit, "status": row.status, "val_bpb": row.val_bpb,
                     "description": text, "role": plot.row_role({"description": row.description}),
                     "notes": [tag for tag in tags if tag != kind], "vs_best": delta})
    return {"kind": kind, "rows": len(mine), "unreadable": unreadable, "note": None, "best": best,
            "sigma": {"value": noise.sigma, "runs": noise.runs, "text": noise.describe()},
            "counts": {status: sum(r.status == status for r in mine) for status in ledger.STATUSES},
            "last": last[::-1], "other_kinds": len(rows) - len(mine)}


def running_part(state, kind):
    """The runner command in progress and its training run, or None when no runner runs."""
    holder = lock_holder()
    if holder is None:
        return None
    judging = state.get("in_progress") if isinstance(state.get("in_progress"), dict) else {}
    progress, last_line, age = last_progress()
    budget = time_budget(kind)
    elapsed = None
    if progress and budget and progress["remaining"] is not None:
        elapsed = max(0.0, budget - progress["remaining"])
    elif progress and budget:
        elapsed = budget * progress["percent"] / 100
    return {"holder": holder, "commit": str(judging.get("commit", ""))[:7] or None,
            "description": judging.get("description"), "runs_done": len(judging.get("pending") or []),
            "progress": progress, "budget": budget, "elapsed": elapsed, "last_line": last_line,
            "log_age": age}


def parallel_part(now):
    """Slots, queue and unjudged runs of parallel experiments, or None when there are none."""
    if not scheduler.PARALLEL_DIR.exists():
        return None
    book = scheduler.load_candidates().get("candidates", {})

    def described(record):
        candidate = book.get(record.get("candidate"), {})
        return {"run": record.get("run"), "candidate": record.get("candidate"),
                "commit": str(record.get("commit", ""))[:7], "purpose": record.get("purpose"),
                "description": candidate.get("description", "")}

    slots = [dict(described(r), slot=r.get("slot"), elapsed=now - float(r.get("claimed_at", now)))
             for r in sorted(scheduler.running(), key=lambda r: str(r.get("slot")))]
    queued = [dict(described(r), waiting=now - float(r.get("queued_at", now))) for r in scheduler.queued()]
    pid_text = ""
    try:
        pid_text = cluster.SCHEDULER_LOCK.read_text().strip()
        alive = pid_text.isdigit() and process_alive_since(int(pid_text), cluster.SCHEDULER_LOCK.stat().st_mtime)
    except OSError:
        alive = False
    return {"scheduler": alive, "slots": slots, "queued": queued, "unjudged": len(scheduler.finished())}


def load_part():
    memory = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "threads": psutil.cpu_count() or 1,
            "load_average": [round(value, 2) for value in os.getloadavg()],
            "memory_percent": memory.percent, "memory_gib": memory.total / 2 ** 30}


def branch():
    done = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# the state the page polls

def guarded(errors, name, read, default=None):
    """read(), or default with one line in errors: one unreadable file must not take the page down."""
    try:
        return read()
    except Exception as error:  # noqa: BLE001 (a night's files can hold anything; the page must stay up)
        errors.append(f"{name}: {type(error).__name__}: {error}")
        return default


class VerdictMemory:
    """The runner keeps only its last verdict line; the server remembers the ones it saw change."""

    def __init__(self, size=VERDICT_MEMORY):
        self.lines, self.lock = deque(maxlen=size), threading.Lock()

    def see(self, line):
        """Remember line if it is new; the remembered lines, newest first."""
        with self.lock:
            if line and (not self.lines or self.lines[0] != line):
                self.lines.appendleft(line)
            return list(self.lines)


def snapshot(verdicts=None):
    """Everything the page shows, as a JSON-ready dict, read now from the current directory.
    verdicts: the server's VerdictMemory (None: only the runner's last verdict)."""
    now, errors = time.time(), []
    rows, unreadable, found = guarded(errors, "results.tsv", read_rows, ([], 0, False))
    results = guarded(errors, "results", lambda: results_part(rows, unreadable, found),
                      results_part([], unreadable, found))
    kind = results["kind"]
    state = guarded(errors, "state.json", lambda: read_json(STATE_FILE), {})
    last_verdict = state.get("last_verdict") if isinstance(state.get("last_verdict"), str) else None
    return {
        "time": now, "clock": time.strftime("%H:%M:%S", time.localtime(now)),
        "branch": guarded(errors, "git", branch), "results": results,
        "chart": guarded(errors, "chart", lambda: chart_svg(chart_rows([r for r in rows if r.kind == kind])), ""),
        "last_verdict": last_verdict,
        "verdicts": verdicts.see(last_verdict) if verdicts is not None else [last_verdict] if last_verdict else [],
        "running": guarded(errors, "run in progress", lambda: running_part(state, kind)),
        "parallel": guarded(errors, "parallel", lambda: parallel_part(now)),
        "load": guarded(errors, "load", load_part),
        "errors": errors, "poll_seconds": POLL_SECONDS,
    }


# ---------------------------------------------------------------------------------------------
# the server

PAGE = (Path(__file__).resolve().parent / "live_page.html").read_text()  # the page, self-contained

SECURITY_HEADERS = {
    # Everything is inline or drawn here: the page may fetch nothing from anywhere else.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class Handler(BaseHTTPRequestHandler):
    server_version = "autoresearch-live"

    def send(self, status, content_type, body, head_only=False, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def answer(self, head_only):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = PAGE.replace("__POLL_MS__", str(int(POLL_SECONDS * 1000)))
            self.send(200, "text/html; charset=utf-8", page.encode(), head_only)
        elif path == "/state.json":
            state = snapshot(self.server.verdicts)
            self.send(200, "application/json", json.dumps(state).encode(), head_only)
        else:
            self.send(404, "text/plain; charset=utf-8", b"not found: the page is / and its data /state.json\n",
                      head_only)

    def do_GET(self):
        self.answer(head_only=False)

    def do_HEAD(self):
        self.answer(head_only=True)

    def refuse_change(self):
        self.send(405, "text/plain; charset=utf-8", b"the live page is read-only: GET / and /state.json\n",
                  extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse_change

    def log_message(self, format, *args):
        """Quiet: a request every few seconds per open page would bury the terminal."""


class LiveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, Handler)
        self.verdicts = VerdictMemory()
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's measurement


def start(host=DEFAULT_HOST, port=DEFAULT_PORT):
    """A LiveServer bound to host:port (0: any free port); the caller runs serve_forever()."""
    return LiveServer((host, port))


def serve(host=DEFAULT_HOST, port=DEFAULT_PORT):
    """Serve the live page until Ctrl-C."""
    try:
        server = start(host, port)
    except OSError as error:
        raise SystemExit(f"cannot serve on {host}:{port} ({error.strerror}): pick another with --port N")
    shown = host if host not in ("0.0.0.0", "::") else "this machine's address"
    where = "from the network too" if host not in (DEFAULT_HOST, "localhost", "::1") else "on this machine only"
    print(f"live page: http://{shown}:{server.server_address[1]}/ ({where}; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("live page stopped", file=sys.stderr)
    finally:
        server.server_close()
