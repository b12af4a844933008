"""progress.png: how an autoresearch run went, one point per experiment.

    uv run tools/plot.py                                     # results.tsv -> progress.png
    uv run tools/plot.py m4.tsv cpu.tsv -o compare.png       # several machines side by side
    uv run tools/plot.py --branch autoresearch/mar5-m4max    # a branch's committed results.tsv
    uv run tools/plot.py --branch autoresearch/dec6-slots --branch autoresearch/dec6-whole
                        # another machine's night beside this one (the checked-out branch: the
                        # working tree's results.tsv, where the runner writes)

Every experiment in order on x, val_bpb on y (lower is better). Each results file or branch is one
series with its own colour: kept experiments are large dots, discarded ones small and faded, the
running best is a step line, crashes are red crosses along the bottom edge. Baseline runs are
hollow diamonds and reruns hollow squares whatever their status: they measure the noise, they are
not wins. Results far worse than anything kept sit as triangles on the top edge, so one diverged
run does not flatten the rest. Labels are placed one by one where they overlap no other label
(measured with the renderer); one that finds no free place is left out.

Reads no environment variables.
"""

import argparse
import re
import subprocess
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

from tools import ledger
from tools.checkout import current_branch

matplotlib.use("Agg")  # files only, never a window; switching is allowed until a figure exists


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
LABEL_FONT_SIZE = 7
LABEL_GAP = 2  # display pixels kept free between two labels
MARKER_PIXELS = 16  # a kept marker's width at DPI (s=55 points squared: about 7.4 points)
# Vertical offsets (points) a label tries in turn: just above its point, just below, then further
# out on both sides, so a label lands as close to its point as the labels already placed allow.
LABEL_OFFSETS = [5 + sign * step for step in range(0, 400, 11) for sign in (1, -1)][1:]
VALUE_OFFSETS = [5, 14]  # an off-scale value sits above its triangle, or one row higher
DPI = 150
TAG = re.compile(r"\s*\[([^\[\]]*)\]\s*$")  # one trailing "[...]" tag of a description


def split_tags(description):
    """(text, tags): a description without its trailing "[...]" tags, and the tags in order."""
    tags = []
    while (found := TAG.search(description)):
        tags.insert(0, found.group(1).strip())
        description = description[:found.start()]
    return description.strip(), tags


def row_role(row):
    """'baseline', 'rerun' or 'experiment'. Baseline runs and the runner's reruns of one commit
    ("[run 2]", "[run 3]" ... after the first) measure noise: they are never drawn as wins. An
    idea tried again as a new experiment is an experiment."""
    text, tags = split_tags(row["description"])
    if text.lower().startswith("baseline") or any(tag.lower().startswith("baseline") for tag in tags):
        return "baseline"
    if any(tag.lower().startswith(("rerun", "run ")) for tag in tags):
        return "rerun"
    return "experiment"


def load_series(files, branches, parse=parse_results):
    """(name, rows) for each results file and each branch's committed results.tsv (the checked-out
    branch's: the working tree's, which the runner writes), read by parse(text, source)."""
    series = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass a results.tsv written by tools/experiment.py")
        series.append((path.stem if len(files) + len(branches) > 1 else str(path), parse(path.read_text(), path)))
    checked_out = current_branch() if branches else None
    for branch in branches:
        if branch == checked_out and Path("results.tsv").is_file():
            # The runner appends to the working tree's file; its last commit may hold none of it.
            series.append((branch, parse(Path("results.tsv").read_text(), f"{branch}:results.tsv")))
            continue
        shown = subprocess.run(["git", "show", f"{branch}:results.tsv"], capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"no results.tsv committed on {branch}: commit it there (git commit results.tsv) "
                             "or pass the file itself")
        series.append((branch, parse(shown.stdout, f"{branch}:results.tsv")))
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


def overlaps(a, b):
    """Whether two display-space boxes overlap, with LABEL_GAP pixels of room between them."""
    return (a.x0 < b.x1 + LABEL_GAP and b.x0 < a.x1 + LABEL_GAP
            and a.y0 < b.y1 + LABEL_GAP and b.y0 < a.y1 + LABEL_GAP)


def text_box(label, renderer):
    """The display-space box of a label's text alone (an annotation's own extent adds its leader)."""
    label.update_positions(renderer)  # an annotation resolves its offset only when drawn or asked to
    return Text.get_window_extent(label, renderer)


def marker_boxes(ax, points):
    """Display-space boxes around the labelled markers, so that no label covers one."""
    half = MARKER_PIXELS / 2
    centres = [ax.transData.transform(point) for point in points]
    return [Bbox([[cx - half, cy - half], [cx + half, cy + half]]) for cx, cy in centres]


def place_labels(ax, labels, offsets, region, taken, **style):
    """Annotate each (x, y, text) at the first vertical offset (points) where its text lies inside
    `region` (a display-space box) and overlaps none of the boxes in `taken`, which grows. A label
    placed away from its point gets a thin leader line; one with no free place is left out."""
    renderer = ax.figure.canvas.get_renderer()
    for x, y, text in labels:
        right_half = ax.transData.transform((x, y))[0] > region.x0 + 0.6 * region.width
        for dy in offsets:
            leader = dict(arrowstyle="-", color="#aaaaaa", linewidth=0.5) if abs(dy) > 12 else None
            label = ax.annotate(text, (x, y), xytext=(-4 if right_half else 4, dy), textcoords="offset points",
                                ha="right" if right_half else "left", va="bottom" if dy > 0 else "top",
                                annotation_clip=False, arrowprops=leader, **style)
            box = text_box(label, renderer)
            inside = region.x0 <= box.x0 and box.x1 <= region.x1 and region.y0 <= box.y0 and box.y1 <= region.y1
            if inside and not any(overlaps(box, other) for other in taken):
                taken.append(box)
                break
            label.remove()


def draw_series(ax, index, name, rows, colour, crash_colour, clip):
    """Draw one series' markers and running best. Returns (off-scale values, descriptions), each a
    list of (x, y, text) labels, and the (x, y) of the markers that labels must not cover."""
    roles = [row_role(r) for r in rows]
    ok = [(x, r, role) for x, (r, role) in enumerate(zip(rows, roles), start=1) if r["status"] != "crash"]
    wins = [(x, r) for x, r, role in ok if r["status"] == "keep" and role == "experiment"]
    tried = [(x, r) for x, r, role in ok if r["status"] != "keep" and role == "experiment"]
    noise_runs = {role: [(x, r) for x, r, row_kind in ok if row_kind == role and r["val_bpb"] <= clip]
                  for role in ("baseline", "rerun")}
    on_scale = [(x, r) for x, r in tried if r["val_bpb"] <= clip]
    off_scale = [(x, r) for x, r, _ in ok if r["val_bpb"] > clip and (x, r) not in wins]
    crashed = [x for x, r in enumerate(rows, start=1) if r["status"] == "crash"]

    ax.scatter([x for x, _ in on_scale], [r["val_bpb"] for _, r in on_scale], s=18, color=colour, alpha=0.3,
               linewidths=0, zorder=2, gid="discarded")
    ax.scatter([x for x, _ in off_scale], [clip] * len(off_scale), s=30, marker="^", color=colour, alpha=0.3,
               linewidths=0, zorder=2, clip_on=False, gid="off scale")
    for role, marker in (("baseline", "D"), ("rerun", "s")):
        group = noise_runs[role]
        ax.scatter([x for x, _ in group], [r["val_bpb"] for _, r in group], s=34, marker=marker,
                   facecolors="white", edgecolors=colour, linewidths=1.2, zorder=4, gid=role)
    baselines = [(x, r) for x, r, role in ok if role == "baseline"]
    xs, ys = running_best(rows)
    best = f"best {ys[-1]:.4f}, " if ys else ""
    ax.step(xs, ys, where="post", color=colour, linewidth=1.8, alpha=0.9, zorder=3,
            label=f"{name}\n{best}{len(wins)} kept, {len(tried)} discarded, {len(crashed)} crashed"
                  + (f", {len(baselines)} baseline runs" if baselines else ""))
    ax.scatter([x for x, _ in wins], [r["val_bpb"] for _, r in wins], s=55, color=colour, edgecolors="black",
               linewidths=0.6, zorder=4, gid="kept")
    ax.scatter(crashed, [crash_row(index + 0.5)] * len(crashed), marker="x", s=30, color=crash_colour,
               linewidths=1.5, zorder=4, transform=ax.get_xaxis_transform(), gid="crash")

    values = [(x, clip, f"{r['val_bpb']:.3f}") for x, r in off_scale]
    descriptions = []
    if noise_runs["baseline"]:
        x, row = noise_runs["baseline"][0]
        label = "baseline" if len(baselines) == 1 else f"baseline ({len(baselines)} runs)"
        descriptions.append((x, row["val_bpb"], label))
    for x, row in wins:
        text = split_tags(row["description"])[0]
        descriptions.append((x, row["val_bpb"], text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"))
    markers = [(x, r["val_bpb"]) for x, r in wins + noise_runs["baseline"] + noise_runs["rerun"]]
    return values, descriptions, markers


def draw(series):
    """The figure for these series, labels placed; the caller saves and closes it."""
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=DPI)
    bottom, top, clip = value_range(series)
    single = len(series) == 1
    values, descriptions, markers = [], [], []
    for index, (name, rows) in enumerate(series):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        # One series: red crosses. Several: each series' crosses in its colour, on its own row.
        series_values, series_descriptions, series_markers = draw_series(
            ax, index, name, rows, colour, CRASH_COLOUR if single else colour, clip)
        values += [(label, colour) for label in series_values]
        markers += series_markers
        # Descriptions only on a single series (several would bury the points), at most MAX_ANNOTATIONS.
        if single and len(series_descriptions) <= MAX_ANNOTATIONS + 1:
            descriptions = series_descriptions
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
        kind = f" ({kinds.pop()})" if len(kinds) == 1 and not kinds & {"legacy"} else ""
        ax.set_title(f"autoresearch progress: {name}{kind}\n{len(rows)} experiments{gain}", fontsize=11)
    else:
        ax.set_title(f"autoresearch progress: {len(series)} runs side by side")
    grey = "#555555"
    legend_keys = [
        Line2D([], [], marker="o", linestyle="", markersize=7, color=grey, markeredgecolor="black", label="kept"),
        Line2D([], [], marker="o", linestyle="", markersize=5, color=grey, alpha=0.3, label="discarded"),
        Line2D([], [], marker="^", linestyle="", markersize=6, color=grey, alpha=0.3, label="discarded, off scale"),
        Line2D([], [], marker="D", linestyle="", markersize=5, markerfacecolor="white", markeredgecolor=grey,
               label="baseline run"),
        Line2D([], [], marker="s", linestyle="", markersize=5, markerfacecolor="white", markeredgecolor=grey,
               label="rerun"),
        Line2D([], [], marker="x", linestyle="", markersize=6, color=CRASH_COLOUR if single else grey,
               markeredgewidth=1.5, label="crash (no val_bpb)"),
        Line2D([], [], color=grey, linewidth=1.8, label="running best"),
    ]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + legend_keys, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False, labelspacing=0.9)
    fig.tight_layout()
    # Labels go last, once the layout is final: their places are measured in display space.
    renderer = fig.canvas.get_renderer()
    taken = [ax.title.get_window_extent(renderer)] + marker_boxes(ax, markers)
    for label, colour in values:
        place_labels(ax, [label], VALUE_OFFSETS, fig.bbox, taken, fontsize=6, color=colour, alpha=0.7)
    inside = ax.get_window_extent(renderer)
    above_crashes = Bbox([[inside.x0, ax.transAxes.transform((0, band))[1]], [inside.x1, inside.y1]])
    place_labels(ax, descriptions, LABEL_OFFSETS, above_crashes, taken,
                 fontsize=LABEL_FONT_SIZE, color="#333333", zorder=5)
    return fig


def plot(series, output):
    """Draw the series and write the image to `output`."""
    fig = draw(series)
    fig.savefig(output, dpi=DPI)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Plot val_bpb of every experiment in results.tsv files.",
                                     epilog="environment: reads no environment variables")
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
