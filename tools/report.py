"""report.md: the morning report of a night of experiments, for the human or for a PR.

    uv run tools/report.py                                      # results.tsv -> report.md, progress.png
    uv run tools/report.py --branch autoresearch/dec1-m4 --branch autoresearch/dec1-cpu   # side by side
    uv run tools/report.py night.tsv -o night.md --plot night.png --runs-dir runs

For each results file or branch: the kind of result and the machine, the baseline and the best
with their spread, the gain in bpb and %, every kept change with its delta and diff stat, the
experiments worth another try (near misses, disturbed runs), the crashes grouped by cause,
experiments per hour and where the time went. Several files or branches also get one table side
by side. progress.png is redrawn from the same rows (tools/plot.py).

Where each fact comes from, and nothing else is guessed:
- results.tsv rows (commit, val_bpb, memory_gb, status, description; tags such as
  "[run 2]", "[crash: ...]" and the kind, "[standard 300s/standard/pystdlib/cpu/cpu/x1]", at the
  end of the description; older files' "[non-standard, 15s budget]"). Unreadable lines
  are counted and skipped, not fatal: the report must work on whatever a night left behind.
- the run JSON files (runs/run_*.json, the summary of each finished run), joined to rows by val_bpb
  to 6 decimals: the machine, the steps, where each run's time went, and when it ended.
- git: each experiment commit's time (a run starts right after it) and its diff stat.
- .autoresearch/agent_runs.jsonl, written by tools/night.py: one line per run of the agent
  (start, end, exit code, how it ended, experiments added), for the report of this checkout.
"""

import argparse
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from tools import ledger, plot, replay
from tools.night_files import (STANDARD, assign_kinds, cause_group, commit_facts, crash_cause, join_runs, load_runs,
                               load_agent_runs, parse_rows)

ENVIRONMENT = """environment:
  AUTORESEARCH_RUNS_DIR  where the run JSON files are (default: ./runs); --runs-dir overrides it"""
DEFAULT_OUTPUT = "report.md"
NOT_EVIDENCE = ("disturbed", "over budget")  # runner tags of runs that say nothing about their code
CONFIRM_NOISE = 2.0      # a win by less than this many noise standard deviations, on one run: confirm it
NEAR_MISS_NOISE = 1.0    # a discard within this many noise standard deviations of the best: rerun it
NEAR_MISS_FRACTION = 0.001  # ... or, with no noise measured, within this fraction of the best
DISTURBED_STEPS = 0.8    # a run with fewer steps than this share of the baseline's median was slowed down
MAX_RERUNS = 8           # experiments listed under "worth another try"
WORTH_NOTE = ("The runner refuses the same change on the same best (a rerun only buys luck): try a near miss "
              "again on a later best or as a variation. A change that was never judged runs again as it is.")


def spread(values):
    return statistics.stdev(values) if len(values) >= 2 else None


def is_evidence(row):
    """A finished run whose val_bpb says something about its code: no crash, and not tagged by
    the runner as disturbed or over budget."""
    return row["status"] != "crash" and not any(tag.lower().startswith(NOT_EVIDENCE) for tag in row["tags"])


def experiments(rows):
    """{commit: its rows} for every commit that is not the baseline's, in order of first run: one
    experiment each, however many runs (reruns, confirmations) it took."""
    found = {}
    for row in rows:
        if row["role"] != "baseline" or row["commit"] in found:
            found.setdefault(row["commit"], []).append(row)
    return found


def experiment_counts(rows):
    """Counter of experiments by outcome (keep, discard, crash) and in all ('experiments'), plus
    'baseline' runs and 'runs'."""
    counts = Counter()
    found = experiments(rows)
    counts["experiments"] = len(found)
    for commit_rows in found.values():
        statuses = {r["status"] for r in commit_rows}
        counts["keep" if "keep" in statuses else "crash" if "crash" in statuses else "discard"] += 1
    counts["baseline"] = sum(r["role"] == "baseline" for r in rows)
    counts["runs"] = len(rows)
    return counts


def pooled_noise(rows):
    """Standard deviation of single runs of the same code, pooled over every commit run more than
    once (baseline repeats, reruns); (std, runs, commits), or None when no commit ran twice."""
    by_commit = {}
    for row in rows:
        if is_evidence(row):
            by_commit.setdefault(row["commit"], []).append(row["val_bpb"])
    repeated = [values for values in by_commit.values() if len(values) >= 2]
    if not repeated:
        return None
    runs = sum(len(values) for values in repeated)
    squares = sum((len(values) - 1) * statistics.variance(values) for values in repeated)
    return (squares / (runs - len(repeated))) ** 0.5, runs, len(repeated)


def analyse(name, rows, facts, log_text):
    """Every figure of one series' section (one kind of result), as a dict.

    A commit's value is the mean of its finished runs (a baseline's repeats, the runner's reruns),
    and the best is the kept commit with the lowest mean."""
    finished = [r for r in rows if r["status"] != "crash"]
    evidence_of = {}
    for row in finished:
        if is_evidence(row):
            evidence_of.setdefault(row["commit"], []).append(row)
    runs_of = {commit: [r["val_bpb"] for r in own] for commit, own in evidence_of.items()}
    baselines = ([r for r in finished if r["role"] == "baseline" and is_evidence(r)]
                 or [r for r in finished if r["status"] == "keep"][:1])
    base_values = [r["val_bpb"] for r in baselines]
    base_steps = [r["run"]["num_steps"] for r in baselines if r["run"]]
    median_steps = statistics.median(base_steps) if base_steps else None
    noise = pooled_noise(rows)

    kept, confirm, near, disturbed, listed, running, best_commit = [], [], [], [], set(), None, None
    for row in finished:
        if row["commit"] in listed:
            continue
        own = evidence_of.get(row["commit"], [])
        steps_seen = [r["run"]["num_steps"] for r in own if r["run"]]
        steps = round(statistics.mean(steps_seen)) if steps_seen else None
        if row["status"] == "keep":
            listed.add(row["commit"])
            mean = statistics.mean(runs_of[row["commit"]])
            if row["role"] != "baseline":
                delta = None if running is None else mean - running
                kept.append((row, mean, len(runs_of[row["commit"]]), delta, steps))
                # One lucky run can clear the threshold: a win inside twice the noise wants a second look.
                narrow = noise and noise[0] and delta is not None and -delta < CONFIRM_NOISE * noise[0]
                if narrow and len(runs_of[row["commit"]]) == 1:
                    confirm.append((row, mean, 1, delta, f"kept on one run by {-delta / noise[0]:.1f}x the noise: "
                                                         "confirm it"))
            if running is None or mean < running:
                running, best_commit = mean, row["commit"]
            continue
        if row["status"] != "discard" or row["role"] != "experiment" or running is None:
            continue
        # One entry per experiment, judged on the mean of all its evidence runs, as the runner judged it.
        listed.add(row["commit"])
        if not own:
            flags = [tag for tag in row["tags"] if tag.lower().startswith(NOT_EVIDENCE)]
            why = f"never judged: the runner tagged its runs [{flags[0]}]" if flags else "never judged"
            disturbed.append((row, row["val_bpb"], 1, row["val_bpb"] - running, why))
            continue
        mean = statistics.mean(runs_of[row["commit"]])
        delta = mean - running
        if steps is not None and median_steps and steps < DISTURBED_STEPS * median_steps:
            disturbed.append((row, mean, len(own), delta,
                              f"disturbed: {steps} steps against {median_steps:g} for the baseline"))
        elif delta < (NEAR_MISS_NOISE * noise[0] if noise else NEAR_MISS_FRACTION * running):
            side = "below" if delta < 0 else "above"
            scale = f"{abs(delta) / noise[0]:.1f}x the noise {side} it" if noise and noise[0] else f"{delta:+.6f}"
            near.append((row, mean, len(own), delta, f"within the noise of the best: {scale}"))

    crashes = {}
    for row in rows:
        if row["status"] == "crash":
            cause = crash_cause(row, log_text if row is rows[-1] else None)
            crashes.setdefault(cause_group(cause), []).append((row, cause))

    runs = [r["run"] for r in finished if r["run"]]
    machine = Counter(f"{run.get('chip', '?')} ({run.get('backend', '?')})" for run in runs).most_common(1)
    best_values = runs_of.get(best_commit, [])
    return {
        "name": name, "rows": rows, "kind": rows[0]["kind"] if rows else STANDARD, "runs": runs,
        "machine": machine[0][0] if machine else None, "noise": noise, "facts": facts,
        "baseline": (statistics.mean(base_values) if base_values else None, spread(base_values), len(base_values)),
        "best": (running, spread(best_values), len(best_values), best_commit),
        "is_baseline": best_commit is not None and best_commit in {r["commit"] for r in baselines},
        "kept": kept, "worth": (confirm + sorted(near, key=lambda item: item[3])
                  + sorted(disturbed, key=lambda item: item[3]))[:MAX_RERUNS],
        "mostly_noise": len(near) >= max(3, sum(r["role"] == "experiment" for r in finished) / 2),
        "crashes": crashes, "timing": time_spent(rows, facts),
        "counts": experiment_counts(rows),
    }


def time_spent(rows, facts):
    """Where the night's wall-clock time went, from the run JSON files and the commit times;
    None when no run JSON matched."""
    starts, ends = [], []
    for row in rows:
        run = row["run"]
        if run:
            row["started"], row["ended"] = run["ended"] - float(run["total_seconds"]), run["ended"]
        else:
            committed = facts.get(row["commit"], (None,))[0]
            previous_end = max(ends) if ends else None
            # A baseline crash reuses an old commit: its time says nothing about when the run began.
            fresh = committed is not None and (previous_end is None or committed >= previous_end - 1)
            row["started"], row["ended"] = (committed if fresh else None), None
        if row["started"] is not None:
            starts.append(row["started"])
        if row["ended"] is not None:
            ends.append(row["ended"])
    if not ends:
        return None
    span = max(ends + starts) - min(starts)
    training = sum(float(r["run"]["training_seconds"]) for r in rows if r["run"])
    outside = sum(float(r["run"]["total_seconds"]) - float(r["run"]["training_seconds"]) for r in rows if r["run"])
    crashed, unknown = 0.0, 0
    for row, following in zip(rows, rows[1:] + [None]):
        if row["status"] != "crash":
            continue
        if row["started"] is not None and following is not None and following["started"] is not None:
            crashed += following["started"] - row["started"]
        else:
            unknown += 1
    # From one run's end to the next one's start: the runner's and the agent's time between experiments.
    gaps = [following["started"] - row["ended"] for row, following in zip(rows, rows[1:])
            if row["ended"] is not None and following["started"] is not None and following["started"] >= row["ended"]]
    return {"span": span, "first": min(starts), "last": max(ends + starts), "training": training, "gaps": gaps,
            "outside": outside, "crashed": crashed, "crashes_unknown": unknown,
            "between": max(span - training - outside - crashed, 0.0),
            "per_hour": len(experiments(rows)) / (span / 3600) if span > 0 else None}


def clock(seconds):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def duration(seconds):
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 120 else (f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h")


def value_text(mean, n):
    """'1.234567' for one run, '1.234567 (3 runs)' for the mean of several."""
    return f"{mean:.6f}" + (f" ({n} runs)" if n > 1 else "")


def mean_text(mean, std, n):
    if mean is None:
        return "none"
    return f"{mean:.6f} ± {std:.6f} ({n} runs)" if std is not None else f"{mean:.6f} (1 run)"


def gain_text(section):
    base, best = section["baseline"][0], section["best"][0]
    if base is None or best is None:
        return "n/a"
    return f"{best - base:+.6f} ({(best - base) / base * 100:+.2f}%)"


def describe_kind(section):
    runs = section["runs"]
    if not runs:
        return section["kind"]
    latest = runs[-1]
    ranks = latest.get("world_size", 1)
    return (f"{section['kind']}: profile {latest.get('profile', '?')}, dataset {latest.get('dataset', '?')}, "
            f"time budget {float(latest.get('time_budget', 0)):g} s, {ranks} rank{'s' if ranks != 1 else ''}, "
            f"harness {latest.get('harness', '?')}")


def section_lines(section, heading):
    rows, facts = section["rows"], section["facts"]
    counts = section["counts"]
    lines = [f"## {heading}", ""]
    machine = section["machine"] or "unknown (no run JSON in the runs folder matches these rows)"
    lines += [f"- **Machine:** {machine}", f"- **Kind:** {describe_kind(section)}",
              f"- **Experiments:** {counts['experiments']}: {counts['keep']} kept, "
              f"{counts['discard']} discarded, {counts['crash']} crashed, in {counts['runs']} runs "
              f"({counts['baseline']} of them baseline runs)"]
    base_mean, base_std, base_n = section["baseline"]
    best_mean, best_std, best_n, best_commit = section["best"]
    lines.append(f"- **Baseline:** {mean_text(base_mean, base_std, base_n)}")
    best_row = next((r for r in rows if r["commit"] == best_commit), None)
    if section["is_baseline"]:
        best_label = ": the baseline itself, no change beat it"
    else:
        best_label = f" at {best_commit}, {best_row['text']}" if best_row else ""
    lines.append(f"- **Best:** {mean_text(best_mean, best_std, best_n)}{best_label}")
    lines.append(f"- **Gain:** {gain_text(section)}")
    noise = section["noise"]
    lines.append(f"- **Noise:** std {noise[0]:.6f} of single runs, pooled over {noise[1]} runs of {noise[2]} "
                 f"commit{'s' if noise[2] != 1 else ''}" if noise else
                 "- **Noise:** not measured (run a baseline with --repeat 3)")
    if section["mostly_noise"]:
        lines.append("- **Note:** most changes landed within the noise of the best, so this night's verdicts "
                     "say little: measure the noise again on a quieter machine or with a longer budget")
    if rows and rows[0]["unreadable_lines"]:
        lines.append(f"- **Unreadable lines skipped:** {rows[0]['unreadable_lines']}")
    lines.append("")

    lines += ["### Kept changes", ""]
    if section["kept"]:
        lines += ["| # | commit | change | val_bpb | delta | steps | diff |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row, mean, n, delta, steps in section["kept"]:
            diff = facts[row["commit"]][1] if row["commit"] in facts else "commit not in this repository"
            value = value_text(mean, n)
            change = f"{delta:+.6f}" if delta is not None else "first"
            lines.append(f"| {row['index']} | {row['commit']} | {row['text']} | {value} | {change} | "
                         f"{steps if steps is not None else '?'} | {diff} |")
    else:
        lines.append("None: every change was discarded or crashed.")
    lines.append("")

    lines += ["### Worth another try", ""]
    if section["worth"]:
        lines += [WORTH_NOTE, "", "| # | commit | change | val_bpb | vs best mean then | why |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row, mean, n, delta, why in section["worth"]:
            lines.append(f"| {row['index']} | {row['commit']} | {row['text']} | {value_text(mean, n)} | "
                         f"{delta:+.6f} | {why} |")
    else:
        lines.append("No narrow wins, near misses or disturbed runs.")
    lines.append("")

    lines += ["### Crashes", ""]
    if section["crashes"]:
        for group, items in sorted(section["crashes"].items(), key=lambda item: -len(item[1])):
            tried = "; ".join(f"{row['commit']} {row['text']}" + (f" ({cause})" if cause and cause != group else "")
                              for row, cause in items)
            lines.append(f"- **{group}** ({len(items)}): {tried}")
    else:
        lines.append("None.")
    lines.append("")

    lines += ["### Time", ""]
    timing = section["timing"]
    if timing is None:
        lines.append("Not known: no run JSON in the runs folder matches these rows.")
    else:
        span = timing["span"] or 1.0
        per_hour = f"{timing['per_hour']:.1f}" if timing["per_hour"] else "n/a"
        lines.append(f"{counts['experiments']} experiments in {counts['runs']} runs from {clock(timing['first'])} "
                     f"to {clock(timing['last'])} ({duration(timing['span'])}): **{per_hour} experiments per hour**.")
        if timing["gaps"]:
            lines += ["", f"Between one run's end and the next one's start: median "
                          f"{duration(statistics.median(timing['gaps']))}, longest {duration(max(timing['gaps']))} "
                          f"({len(timing['gaps'])} gaps)."]
        lines += ["", "| where the time went | time | share |", "| --- | --- | --- |"]
        unknown = (f" ({timing['crashes_unknown']} crash{'es' if timing['crashes_unknown'] != 1 else ''} "
                   "not timed)") if timing["crashes_unknown"] else ""
        for label, seconds in (("training (the budget)", timing["training"]),
                               ("start-up, compiling, evaluation", timing["outside"]),
                               (f"crashed runs, to the next start{unknown}", timing["crashed"]),
                               ("between runs (runner, agent)", timing["between"])):
            lines.append(f"| {label} | {duration(seconds)} | {seconds / span * 100:.0f}% |")
    lines.append("")
    return lines


def side_by_side(sections):
    lines = ["| series | machine | kind | experiments | kept | crashed | baseline | best | gain | per hour |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in sections:
        per_hour = f"{s['timing']['per_hour']:.1f}" if s["timing"] and s["timing"]["per_hour"] else "n/a"
        base, best = s["baseline"][0], s["best"][0]
        lines.append(f"| {s['name']} | {s['machine'] or 'unknown'} | {s['kind']} | {s['counts']['experiments']} | "
                     f"{len(s['kept'])} | {s['counts']['crash']} | "
                     f"{f'{base:.6f}' if base is not None else 'none'} | "
                     f"{f'{best:.6f}' if best is not None else 'none'} | {gain_text(s)} | {per_hour} |")
    return lines + [""]


def build_sections(series, runs, log_text):
    """One analysed section per series and kind of result (results of different kinds are never
    compared), in order."""
    sections = []
    facts = commit_facts(r["commit"] for _, rows in series for r in rows)
    for name, rows in series:
        assign_kinds(rows)
        join_runs(rows, runs)
        kinds = list(dict.fromkeys(r["kind"] for r in rows))
        for kind in kinds:
            label = name if len(kinds) == 1 else f"{name}, {kind}"
            sections.append(analyse(label, [r for r in rows if r["kind"] == kind], facts,
                                    log_text if kind == rows[-1]["kind"] else None))
    return sections


def agent_run_lines(agent_runs):
    """The report's section on the agent's runs (tools/night.py starts the agent again whenever it exits)."""
    ended = Counter(entry.get("ended_by") for entry in agent_runs)
    failed = sum(1 for entry in agent_runs if entry.get("ended_by") == "exit" and entry.get("exit_code") != 0)
    how = [f"{ended['exit']} exited on their own" if ended["exit"] else None,
           f"{ended['deadline']} stopped at the deadline" if ended["deadline"] else None,
           f"{ended['interrupted']} interrupted" if ended["interrupted"] else None,
           f"{failed} exited with an error" if failed else None]
    lines = ["## Agent runs", "",
             f"**{len(agent_runs)} run{'s' if len(agent_runs) != 1 else ''} of the agent** (tools/night.py) from "
             f"{clock(float(agent_runs[0]['started_at']))} to {clock(float(agent_runs[-1]['ended_at']))}: "
             + ", ".join(part for part in how if part) + ".", "",
             "| # | started | ran | ended by | exit code | experiments | runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for number, entry in enumerate(agent_runs, start=1):
        ran = float(entry["ended_at"]) - float(entry["started_at"])
        lines.append(f"| {number} | {clock(float(entry['started_at']))} | {duration(ran)} | {entry.get('ended_by', '?')} | "
                     f"{entry.get('exit_code', '?')} | {entry.get('experiments', '?')} | {entry.get('runs', '?')} |")
    return lines + [""]


def ledger_rows(text):
    """results.tsv's rows as the runner reads them (tools/ledger.py), the unreadable lines left out
    as the rest of the report leaves them out."""
    rows = []
    for line in text.splitlines()[1:]:
        try:
            rows.append(ledger.parse_line(line))
        except ValueError:
            continue
    return rows


def render(sections, image, agent_runs=(), transfer=()):
    lines = ["# autoresearch report", ""]
    if image:
        lines += [f"![progress]({image})", ""]
    if len(sections) > 1:
        lines += side_by_side(sections)
    for section in sections:
        lines += section_lines(section, section["name"])
    lines += transfer
    if agent_runs:
        lines += agent_run_lines(agent_runs)
    return "\n".join(lines).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=ENVIRONMENT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="results.tsv files (default: results.tsv)")
    parser.add_argument("--branch", action="append", default=[],
                        help="also report the results.tsv committed on this git branch (repeatable)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"report to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--plot", default=plot.DEFAULT_OUTPUT,
                        help=f"image to redraw and link from the report (default {plot.DEFAULT_OUTPUT})")
    parser.add_argument("--runs-dir", default=os.environ.get("AUTORESEARCH_RUNS_DIR", "runs"),
                        help="folder of the run JSON files (default: $AUTORESEARCH_RUNS_DIR, else runs)")
    parser.add_argument("--serve", action="store_true",
                        help="instead, serve the live page of this checkout's night (tools/live.py) until Ctrl-C")
    parser.add_argument("--port", type=int, default=8765, help="port of the live page (default 8765; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the live page listens on (default 127.0.0.1, this machine only; "
                             "0.0.0.0 opens it to the network)")
    args = parser.parse_args()
    if args.serve:
        from tools import live  # only the page needs the server (and live reads no report code)
        live.serve(args.host, args.port)
        return
    files = args.files or ([] if args.branch else ["results.tsv"])
    series = plot.load_series(files, args.branch, parse=parse_rows)
    empty = [name for name, rows in series if not rows]
    if empty:
        raise SystemExit(f"no experiments in {', '.join(empty)} yet: run uv run tools/experiment.py baseline first")
    log = Path("run.log")
    # run.log is the last run's; it can only explain the last row of the results.tsv next to it.
    log_text = log.read_text(errors="replace") if files == ["results.tsv"] and log.is_file() else None
    sections = build_sections(series, load_runs(args.runs_dir), log_text)
    image = None
    if any(r["status"] != "crash" for _, rows in series for r in rows):
        plot.plot(series, args.plot)
        image = os.path.relpath(args.plot, Path(args.output).resolve().parent)
    # The agent's runs and the replays are this checkout's, like run.log: only in the report of its results.tsv.
    here = files == ["results.tsv"]
    agent_runs = load_agent_runs() if here else []
    transfer = replay.transfer_lines(ledger_rows(Path("results.tsv").read_text())) if here else []
    Path(args.output).write_text(render(sections, image, agent_runs, transfer))
    print(f"wrote {args.output}" + (f" and {args.plot}" if image else ""))


if __name__ == "__main__":
    main()
