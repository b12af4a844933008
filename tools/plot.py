"""progress.png: how an autoresearch run went, one point per experiment.

    uv run tools/plot.py                                     # results.tsv -> progress.png
    uv run tools/plot.py m4.tsv cpu.tsv -o compare.png       # several machines side by side
    uv run tools/plot.py --branch autoresearch/mar5-m4max    # a branch's committed results.tsv

Every experiment in order on x, val_bpb on y (lower is better). Each results file or branch is one
series with its own colour: kept experiments are large dots, discarded ones small and faded, the
running best is a step line, crashes are red crosses along the bottom edge. Results far worse than
anything kept sit as triangles on the top edge, so one diverged run does not flatten the rest.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402


def parse_results(text, source="results.tsv"):
    """results.tsv rows as dicts (commit, val_bpb, memory_gb, status, description, kind)."""
    try:
        return [vars(row).copy() for row in ledger.parse(text, source)]
    except ledger.LedgerError as error:
        raise SystemExit(str(error))

DEFAULT_OUTPUT = "progress.png"
# tab10 without its red, which is kept for crashes.
SERIES_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                  "tab:gray", "tab:olive", "tab:cyan")
CRASH_COLOUR = "tab:red"
# Discards are shown up to the worst kept result plus half the kept range (at least 1% of it);
# worse ones are drawn as triangles on the top edge.
OFF_SCALE_MARGIN = 0.5
OFF_SCALE_MIN_FRACTION = 0.01
CRASH_ROW = 0.035  # height of one series' row of crash markers, as a fraction of the axes
MAX_ANNOTATIONS = 40  # label kept experiments with their description (single series only)
LABEL_CHARS = 38


def load_series(files, branches):
    """(name, rows) for each results file and each branch's committed results.tsv."""
    series = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass a results.tsv written by tools/experiment.py")
        series.append((path.stem if len(files) + len(branches) > 1 else str(path), parse_results(path.read_text(), path)))
    for branch in branches:
        shown = subprocess.run(["git", "show", f"{branch}:results.tsv"], capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"no results.tsv committed on {branch}: commit it there (git commit results.tsv) "
                             "or pass the file itself")
        series.append((branch, parse_results(shown.stdout, f"{branch}:results.tsv")))
    return series


def value_range(series):
    """(bottom, top, clip): the y limits, and the level above which results are drawn off-scale.

    Crashes have no val_bpb, so the bottom of the axes is a band of their own, one row per series.
    """
    ok = [r["val_bpb"] for _, rows in series for r in rows if r["status"] != "crash"]
    kept = [r["val_bpb"] for _, rows in series for r in rows if r["status"] == "keep"]
    low, clip = min(ok), max(ok)
    if kept:
        margin = max(OFF_SCALE_MARGIN * (max(kept) - low), OFF_SCALE_MIN_FRACTION * abs(max(kept)))
        clip = min(clip, max(kept) + margin)
    pad = (clip - low) * 0.08 or 0.01
    bottom, top = low - pad, clip + pad
    band = crash_row(len(series))
    return bottom - band / (1 - band) * (top - bottom), top, clip


def crash_row(index):
    """Height (axes fraction) of the row of crash markers for series number `index`."""
    return 0.015 + CRASH_ROW * index


def running_best(rows):
    """x and y of the best kept val_bpb so far, from the first kept experiment to the last one."""
    xs, ys, best = [], [], None
    for x, row in enumerate(rows, start=1):
        if row["status"] == "keep" and (best is None or row["val_bpb"] < best):
            best = row["val_bpb"]
        if best is not None:
            xs.append(x)
            ys.append(best)
    return xs, ys


def draw_series(ax, index, name, rows, colour, crash_colour, clip, annotate):
    ok = [(x, r) for x, r in enumerate(rows, start=1) if r["status"] != "crash"]
    kept = [(x, r) for x, r in ok if r["status"] == "keep"]
    tried = [(x, r) for x, r in ok if r["status"] != "keep"]
    on_scale = [(x, r) for x, r in tried if r["val_bpb"] <= clip]
    off_scale = [(x, r) for x, r in tried if r["val_bpb"] > clip]
    crashed = [x for x, r in enumerate(rows, start=1) if r["status"] == "crash"]

    ax.scatter([x for x, _ in on_scale], [r["val_bpb"] for _, r in on_scale], s=18, color=colour, alpha=0.3,
               linewidths=0, zorder=2)
    ax.scatter([x for x, _ in off_scale], [clip] * len(off_scale), s=30, marker="^", color=colour, alpha=0.3,
               linewidths=0, zorder=2, clip_on=False)
    for x, row in off_scale:
        ax.annotate(f"{row['val_bpb']:.3f}", (x, clip), xytext=(0, 5), textcoords="offset points", fontsize=6,
                    ha="center", color=colour, alpha=0.7)
    xs, ys = running_best(rows)
    best = f"best {ys[-1]:.4f}, " if ys else ""
    ax.step(xs, ys, where="post", color=colour, linewidth=1.8, alpha=0.9, zorder=3,
            label=f"{name}\n{best}{len(kept)} kept, {len(tried)} discarded, {len(crashed)} crashed")
    ax.scatter([x for x, _ in kept], [r["val_bpb"] for _, r in kept], s=55, color=colour, edgecolors="black",
               linewidths=0.6, zorder=4)
    ax.scatter(crashed, [crash_row(index + 0.5)] * len(crashed), marker="x", s=30, color=crash_colour,
               linewidths=1.5, zorder=4, transform=ax.get_xaxis_transform())
    if annotate and len(kept) <= MAX_ANNOTATIONS:
        for x, row in kept:
            text = ledger.LEGACY_TAG.sub("", ledger.KIND_TAG.sub("", row["description"]))
            text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
            ax.annotate(text, (x, row["val_bpb"]), xytext=(6, 5), textcoords="offset points", fontsize=7,
                        rotation=25, color="#333333", zorder=5)


def plot(series, output):
    fig, ax = plt.subplots(figsize=(12, 6.5))
    bottom, top, clip = value_range(series)
    single = len(series) == 1
    for index, (name, rows) in enumerate(series):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        # One series: red crosses. Several: each series' crosses in its colour, on its own row.
        draw_series(ax, index, name, rows, colour, CRASH_COLOUR if single else colour, clip, annotate=single)
    ax.set_ylim(bottom, top)
    band = crash_row(len(series))
    ax.plot([0, 1], [band, band], transform=ax.transAxes, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xlim(0.3, max(len(rows) for _, rows in series) + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if single:
        name, rows = series[0]
        xs, ys = running_best(rows)
        first = next((r["val_bpb"] for r in rows if r["status"] == "keep"), None)
        gain = f": best {ys[-1]:.6f}, {ys[-1] - first:+.6f} from the first kept result {first:.6f}" if ys else ""
        kinds = {r["kind"] for r in rows if r["status"] != "crash"}
        kind = f" ({kinds.pop()} results)" if len(kinds) == 1 and not kinds & {"legacy"} else ""
        ax.set_title(f"autoresearch progress: {name}{kind}\n{len(rows)} experiments{gain}", fontsize=11)
    else:
        ax.set_title(f"autoresearch progress: {len(series)} runs side by side")
    grey = "#555555"
    legend_keys = [
        Line2D([], [], marker="o", linestyle="", markersize=7, color=grey, markeredgecolor="black", label="kept"),
        Line2D([], [], marker="o", linestyle="", markersize=5, color=grey, alpha=0.3, label="discarded"),
        Line2D([], [], marker="^", linestyle="", markersize=6, color=grey, alpha=0.3, label="discarded, off scale"),
        Line2D([], [], marker="x", linestyle="", markersize=6, color=CRASH_COLOUR if single else grey,
               markeredgewidth=1.5, label="crash (no val_bpb)"),
        Line2D([], [], color=grey, linewidth=1.8, label="running best"),
    ]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + legend_keys, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False, labelspacing=0.9)
    fig.tight_layout()
    fig.savefig(output, dpi=150)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Plot val_bpb of every experiment in results.tsv files.")
    parser.add_argument("files", nargs="*", help="results.tsv files (default: results.tsv)")
    parser.add_argument("--branch", action="append", default=[],
                        help="also plot the results.tsv committed on this git branch (repeatable)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"image to write (default {DEFAULT_OUTPUT})")
    args = parser.parse_args()
    files = args.files or ([] if args.branch else ["results.tsv"])
    series = load_series(files, args.branch)
    empty = [name for name, rows in series if not rows]
    if empty:
        raise SystemExit(f"no experiments in {', '.join(empty)} yet: run uv run tools/experiment.py baseline first")
    if all(r["status"] == "crash" for _, rows in series for r in rows):
        raise SystemExit("every experiment crashed, so there is no val_bpb to plot: read run.log")
    plot(series, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
