"""The supervisor of a night: keeps the research agent going until a deadline.

    uv run tools/night.py --agent "claude -p 'Read program.md and run the loop'" --until 07:00
    uv run tools/night.py --agent "my-agent --prompt-file {digest}" --until 06:30

Agents stop: they finish a thought, hit a limit or decide the work is done, however often
program.md asks them not to. The supervisor runs the agent command (a shell command line, in the
repository root, in a process group of its own, its output on this terminal) and, whenever it
exits before the deadline, starts it again with a digest of where the night stands:
- on the agent's standard input, and
- in .autoresearch/digest.md, whose path replaces `{digest}` in the command and is in the agent's
  environment as AUTORESEARCH_DIGEST.
The digest holds the runner's status (best, sigma, counts, last verdict), every idea already tried
with its outcome, the near misses and other changes worth another try (as tools/report.py finds
them) and how the agent's previous run ended.

How it stays safe:
- One supervisor per checkout (.autoresearch/night.lock). It refuses to start (exit 2, one line)
  on a branch that is not autoresearch/*, or with an empty or malformed deadline or command.
- At the deadline the agent's process group gets SIGTERM; Ctrl-C, SIGTERM or SIGHUP to the
  supervisor are passed on to the group. Either way every process of the group gets
  STOP_GRACE_SECONDS to exit (the runner undoes a half-made experiment and lets go of its lock on
  SIGINT and SIGTERM), then SIGKILL. Whatever the agent left running when it exited is stopped the
  same way before the agent starts again: one agent at a time.
- Each run of the agent is one line of .autoresearch/agent_runs.jsonl (start, end, exit code, how it
  ended, the experiments and runs it added), which the morning report counts.
- QUICK_FAILURES runs of the agent in a row that end within QUICK_EXIT_SECONDS without an experiment mean
  the agent cannot work (a wrong command, no credentials): the supervisor gives up with one line.
- Exit status: 0 at the deadline, 1 after giving up, 2 when refused, 130 when interrupted.

Environment: AUTORESEARCH_RUNS_DIR, where the run JSON files are (default ./runs), for the
digest's near misses; the agent gets AUTORESEARCH_DIGEST, the digest file's path.
"""

import argparse
import datetime
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tools import ledger, night_files, report

STATE_DIR = Path(".autoresearch")
LOCK_FILE = STATE_DIR / "night.lock"
DIGEST_FILE = STATE_DIR / "digest.md"
AGENT_LOG = night_files.AGENT_LOG
RUNNER = Path(__file__).resolve().parent / "experiment.py"
BRANCH_PREFIX = "autoresearch/"
QUICK_EXIT_SECONDS = 30.0   # an agent run this short that made no experiment is a failed start
QUICK_FAILURES = 3          # failed starts in a row before giving up
STOP_GRACE_SECONDS = 60.0   # for the agent's group to exit after a signal (a runner cleans up in seconds)
POLL_SECONDS = 0.5          # how often the deadline and signals are checked while the agent runs
GROUP_POLL_SECONDS = 0.1    # while waiting for a stopped group to exit
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_GAVE_UP, EXIT_REFUSED, EXIT_INTERRUPTED = 1, 2, 130
MAX_IDEAS = 60              # tried ideas listed in the digest (the newest)
DEADLINE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
ENVIRONMENT = """environment:
  AUTORESEARCH_RUNS_DIR  where the run JSON files are (default: ./runs), for the digest's near misses
  AUTORESEARCH_DIGEST    set for the agent: the path of the digest file"""


def refuse(message):
    print(f"night: refusing to start: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def deadline_after(text, now):
    """The epoch time of the next HH:MM (local time) after `now`, or None when text is not HH:MM."""
    found = DEADLINE.match(text.strip())
    if not found:
        return None
    start = datetime.datetime.fromtimestamp(now)
    end = start.replace(hour=int(found.group(1)), minute=int(found.group(2)), second=0, microsecond=0)
    if end <= start:
        end += datetime.timedelta(days=1)
    return end.timestamp()


def clock_text(seconds):
    return time.strftime("%H:%M", time.localtime(seconds))


# ---------------------------------------------------------------------------------------------
# where the night stands

def night_rows():
    """The rows of results.tsv as the morning report reads them (damaged lines skipped)."""
    try:
        return night_files.parse_rows(ledger.RESULTS_FILE.read_text(errors="replace"))
    except OSError:
        return []


def progress_counts():
    """(experiments, runs) in results.tsv so far."""
    rows = night_rows()
    return len(report.experiments(rows)), len(rows)


def runner_status():
    """What `uv run tools/experiment.py status` prints, or why it could not."""
    done = subprocess.run([sys.executable, str(RUNNER), "status"], capture_output=True, text=True)
    return (done.stdout + done.stderr).strip() or f"status printed nothing (exit code {done.returncode})"


def tried_ideas(rows):
    """One line per experiment, oldest first: its outcome, value and description."""
    lines = []
    for commit, commit_rows in report.experiments(rows).items():
        statuses = {r["status"] for r in commit_rows}
        outcome = "keep" if "keep" in statuses else "crash" if "crash" in statuses else "discard"
        finished = [r["val_bpb"] for r in commit_rows if r["status"] != "crash"]
        value = f" {min(finished):.6f}" if finished else ""
        runs = f" ({len(commit_rows)} runs)" if len(commit_rows) > 1 else ""
        lines.append(f"- {outcome}{value}{runs} {commit} {commit_rows[0]['text']}")
    return lines


def worth_another_try(rows):
    """The morning report's 'worth another try' lines of the latest kind: near misses, narrow wins,
    changes never judged."""
    if not rows:
        return []
    runs = night_files.load_runs(os.environ.get("AUTORESEARCH_RUNS_DIR", "runs"))
    section = report.build_sections([("results.tsv", rows)], runs, None)[-1]
    return [f"- #{row['index']} {row['commit']} {row['text']}: {report.value_text(mean, n)} "
            f"({delta:+.6f} against the best then): {why}" for row, mean, n, delta, why in section["worth"]]


def digest(number, previous, deadline, now):
    """The text the agent gets each time the supervisor starts it (its `number`th start of the night)."""
    rows = night_rows()
    if previous is None:
        earlier = "This is your first start of the night."
    else:
        earlier = (f"Your previous run ended at {clock_text(previous['ended_at'])} "
                   f"({previous['ended_by']}, exit code {previous['exit_code']}) after "
                   f"{previous['experiments']} experiment(s).")
    ideas = tried_ideas(rows)
    shown = ideas[-MAX_IDEAS:]
    lines = [f"# Where the night stands ({clock_text(now)}; the night ends at {clock_text(deadline)})", "",
             f"You are the research agent of this checkout, started by tools/night.py (start {number} of the "
             f"night). {earlier} Carry on with the loop in program.md from where it stands: the set-up "
             "and the baseline are done; do not repeat an idea listed below: the runner refuses the same change on "
             "the same best. A near miss may be worth another try on a later best or as a variation.", "",
             "## Status (uv run tools/experiment.py status)", "", runner_status(), "",
             f"## Ideas already tried ({len(ideas)} experiments, oldest first"
             + (f"; the last {len(shown)} shown" if len(shown) < len(ideas) else "") + ")", ""]
    lines += shown or ["none yet"]
    lines += ["", "## Near misses and changes worth another try", ""]
    lines += worth_another_try(rows) or ["none"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the agent's process group

def group_members(pgid):
    """Processes of this process group that still run (zombies are done)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_group(process, sig, grace=STOP_GRACE_SECONDS):
    """Send sig to the agent's whole process group, give it `grace` seconds to exit, then SIGKILL
    what is left. The agent itself is reaped."""
    pgid = process.pid
    if group_members(pgid):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
    give_up = time.monotonic() + grace
    while True:
        process.poll()
        if not group_members(pgid):
            break
        if time.monotonic() >= give_up:
            print(f"night: the agent's processes did not exit within {grace:g} s; killing them", file=sys.stderr)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(GROUP_POLL_SECONDS)
    process.wait()


class Supervisor:
    """Runs the agent command again and again until the deadline, a signal or repeated quick failures.

    clock (epoch seconds), quick_seconds and poll_seconds are injectable so that tests can let
    hours pass without waiting for them."""

    def __init__(self, command, deadline, clock=time.time, quick_seconds=QUICK_EXIT_SECONDS,
                 poll_seconds=POLL_SECONDS, grace=STOP_GRACE_SECONDS):
        self.command, self.deadline, self.clock = command, deadline, clock
        self.quick_seconds, self.poll_seconds, self.grace = quick_seconds, poll_seconds, grace
        self.signal_received = None

    def on_signal(self, signum, frame):
        """Handler of the handled signals: the supervising loop notices within poll_seconds."""
        self.signal_received = self.signal_received or signum

    def start_agent(self, number, previous):
        STATE_DIR.mkdir(exist_ok=True)
        DIGEST_FILE.write_text(digest(number, previous, self.deadline, self.clock()))
        path = str(DIGEST_FILE.resolve())
        with open(DIGEST_FILE, "rb") as stdin:
            return subprocess.Popen(self.command.replace("{digest}", shlex.quote(path)), shell=True,
                                    stdin=stdin, start_new_session=True,
                                    env=dict(os.environ, AUTORESEARCH_DIGEST=path))

    def watch(self, process):
        """Wait for the agent to exit, the deadline or a signal; how this run of the agent ended."""
        while True:
            try:
                process.wait(timeout=self.poll_seconds)
                return "exit"
            except subprocess.TimeoutExpired:
                pass
            if self.signal_received:
                return "interrupted"
            if self.clock() >= self.deadline:
                return "deadline"

    def record(self, entry):
        with open(AGENT_LOG, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def run(self):
        """The night; returns the exit status."""
        starts, previous, quick, total = 0, None, 0, 0
        while self.clock() < self.deadline and not self.signal_received:
            starts += 1
            experiments_before, runs_before = progress_counts()
            started = self.clock()
            process = self.start_agent(starts, previous)
            print(f"night: agent run {starts} started at {clock_text(started)}, until {clock_text(self.deadline)}",
                  flush=True)
            ended_by = self.watch(process)
            if ended_by == "interrupted":
                print("night: interrupted: stopping the agent (a running experiment gets up to "
                      f"{self.grace:g} s to clean up)", file=sys.stderr, flush=True)
            elif ended_by == "deadline":
                print(f"night: the deadline {clock_text(self.deadline)} has come: stopping the agent", flush=True)
            # A signal reaches the group as the supervisor received it; the deadline is a SIGTERM;
            # processes an agent left behind when it exited get a SIGTERM too.
            stop_group(process, self.signal_received if ended_by == "interrupted" else signal.SIGTERM, self.grace)
            ended = self.clock()
            experiments_after, runs_after = progress_counts()
            previous = {"agent_run": starts, "started_at": started, "ended_at": ended,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                        "ended": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ended)),
                        "seconds": round(ended - started, 1), "exit_code": process.returncode,
                        "ended_by": ended_by, "experiments": experiments_after - experiments_before,
                        "runs": runs_after - runs_before, "command": self.command}
            self.record(previous)
            total += previous["experiments"]
            if ended_by == "interrupted":
                print(f"night: stopped after {starts} agent run(s), {total} experiment(s)", file=sys.stderr)
                return EXIT_INTERRUPTED
            quick = quick + 1 if ended - started < self.quick_seconds and not previous["experiments"] else 0
            if quick >= QUICK_FAILURES:
                print(f"night: giving up: the agent exited within {self.quick_seconds:g} s without an experiment "
                      f"{quick} times in a row (last exit code {process.returncode}); run its command by hand "
                      f"to see why: {self.command}", file=sys.stderr)
                return EXIT_GAVE_UP
            if ended_by == "exit" and self.clock() < self.deadline:
                print(f"night: agent run {starts} ended (exit code {process.returncode}, "
                      f"{previous['experiments']} experiment(s)); starting it again with the digest", flush=True)
        if self.signal_received:
            print(f"night: stopped after {starts} agent run(s), {total} experiment(s)", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"night: done at {clock_text(self.clock())}: {starts} agent run(s), {total} experiment(s)", flush=True)
        return 0


def hold_lock(deadline_text):
    """Take .autoresearch/night.lock for the whole night (one supervisor per checkout); the open
    file descriptor, which must stay open."""
    STATE_DIR.mkdir(exist_ok=True)
    (STATE_DIR / ".gitignore").write_text("*\n")
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = LOCK_FILE.read_text().strip() or "another process"
        os.close(fd)
        refuse(f"another night.py supervises this checkout ({holder}); one agent at a time")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, until {deadline_text}, since {time.strftime('%H:%M:%S')}".encode())
    return fd


def current_branch():
    done = subprocess.run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=ENVIRONMENT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", required=True,
                        help="the agent's shell command; {digest} in it becomes the digest file's path")
    parser.add_argument("--until", required=True, help="when the night ends, HH:MM local time (the next one)")
    args = parser.parse_args()
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if root.returncode != 0:
        refuse("not inside a git repository: run this from your autoresearch checkout")
    os.chdir(root.stdout.strip())
    if not args.agent.strip():
        refuse('--agent is empty: give the command that starts your agent, e.g. --agent "claude -p \'...\'"')
    deadline = deadline_after(args.until, time.time())
    if deadline is None:
        refuse(f"--until {args.until!r} is not a time of day HH:MM, e.g. --until 07:00")
    branch = current_branch()
    if branch is None or not branch.startswith(BRANCH_PREFIX):
        refuse(f"on {branch or 'a detached HEAD'}; the night runs on an experiment branch: "
               f"git checkout -b {BRANCH_PREFIX}<tag> (program.md, set-up)")
    lock = hold_lock(args.until)
    supervisor = Supervisor(args.agent, deadline)
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, supervisor.on_signal)
    try:
        status = supervisor.run()
    finally:
        os.close(lock)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
