"""The live page's progress chart as inline SVG, drawn by the server: the marks of progress.png
(kept dots, discards, baseline and rerun markers, off-scale triangles, crashes in their own row)
and the running best as a step line, so the page needs no script library and works offline."""

import html
import math

from tools import plot

# The chart, in SVG user units (the page scales it to its width).
WIDTH, HEIGHT = 960, 380
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 44
MAX_X_TICKS = 12
BLUE, RED, GREY = "#1f77b4", "#d62728", "#555555"
# Presentation inline, so the SVG looks the same on the page and saved on its own.
STYLES = {
    "kept": f'fill="{BLUE}" stroke="#000" stroke-width="0.8"',
    "discarded": f'fill="{BLUE}" fill-opacity="0.35"',
    "off-scale": f'fill="{BLUE}" fill-opacity="0.35"',
    "baseline": f'fill="#fff" stroke="{BLUE}" stroke-width="1.4"',
    "rerun": f'fill="#fff" stroke="{BLUE}" stroke-width="1.4"',
    "crash": f'fill="none" stroke="{RED}" stroke-width="2"',
    "best-line": f'fill="none" stroke="{BLUE}" stroke-width="2" stroke-opacity="0.9"',
    "frame": 'fill="none" stroke="#ccc"',
    "grid": 'stroke="#eee"',
    "crash-band": 'stroke="#bbb" stroke-dasharray="2 3"',
    "text": f'font-size="11" font-family="sans-serif" fill="{GREY}"',
}


def nice_step(span, count=5):
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= raw)


def marker(shape, x, y, cls, title, size=5.0):
    """One SVG mark with its tooltip; shape circle, diamond, square, triangle or cross."""
    attributes = f'class="{cls}" {STYLES[cls]}'
    tip = f"<title>{html.escape(title)}</title>"
    if shape == "circle":
        return f'<circle {attributes} cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}">{tip}</circle>'
    if shape == "square":
        half = size * 0.8
        return (f'<rect {attributes} x="{x - half:.1f}" y="{y - half:.1f}" width="{2 * half:.1f}" '
                f'height="{2 * half:.1f}">{tip}</rect>')
    if shape == "cross":
        return (f'<path {attributes} d="M{x - size:.1f},{y - size:.1f}L{x + size:.1f},{y + size:.1f}'
                f'M{x - size:.1f},{y + size:.1f}L{x + size:.1f},{y - size:.1f}">{tip}</path>')
    corners = {"diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)], "triangle": [(0, -1), (1, 0.7), (-1, 0.7)]}[shape]
    points = " ".join(f"{x + dx * size:.1f},{y + dy * size:.1f}" for dx, dy in corners)
    return f'<polygon {attributes} points="{points}">{tip}</polygon>'


def chart_svg(rows):
    """The progress chart of these rows (plot.py's dicts) as an SVG element."""
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="val_bpb of every run">',
             f'<text {STYLES["text"]} x="{LEFT + inner_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">run #</text>',
             f'<text {STYLES["text"]} transform="translate(14,{TOP + inner_h / 2}) rotate(-90)" '
             f'text-anchor="middle">val_bpb (lower is better)</text>']
    finished = [r for r in rows if r["status"] != "crash"]
    if not finished:
        message = "every run crashed so far" if rows else "no runs yet"
        parts.append(f'<text class="empty" {STYLES["text"]} x="{LEFT + inner_w / 2}" y="{TOP + inner_h / 2}" '
                     f'text-anchor="middle">{message}</text></svg>')
        return "".join(parts)
    bottom, top, clip = plot.value_range([("", rows)])
    count = len(rows)
    sx = lambda x: LEFT + (x - 0.5) / count * inner_w  # noqa: E731
    sy = lambda v: TOP + (top - v) / (top - bottom) * inner_h  # noqa: E731
    band = TOP + (1 - plot.crash_row(1)) * inner_h
    crash_y = TOP + (1 - plot.crash_row(0.5)) * inner_h
    parts.append(f'<rect {STYLES["frame"]} x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}"/>')
    low = min(r["val_bpb"] for r in finished)
    step = nice_step(max(clip - low, 1e-6))
    decimals = max(0, -math.floor(math.log10(step)))
    above_crashes = bottom + (top - bottom) * plot.crash_row(1)
    first = math.ceil(above_crashes / step)
    for number in range(first, math.floor(top / step) + 1):
        y = sy(number * step)
        parts.append(f'<line {STYLES["grid"]} x1="{LEFT}" x2="{LEFT + inner_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text {STYLES["text"]} x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{number * step:.{decimals}f}</text>')
    parts.append(f'<line {STYLES["crash-band"]} x1="{LEFT}" x2="{LEFT + inner_w}" y1="{band:.1f}" y2="{band:.1f}"/>')
    for x in range(1, count + 1, max(1, math.ceil(count / MAX_X_TICKS))):
        parts.append(f'<text {STYLES["text"]} x="{sx(x):.1f}" y="{TOP + inner_h + 16}" text-anchor="middle">{x}</text>')
    xs, ys = plot.running_best(rows)
    if xs:
        points = [f"M{sx(xs[0]):.1f},{sy(ys[0]):.1f}"]
        for x, y in zip(xs[1:], ys[1:]):
            points.append(f"H{sx(x):.1f}V{sy(y):.1f}")
        points.append(f"H{sx(count + 0.5):.1f}")
        parts.append(f'<path class="best-line" {STYLES["best-line"]} d="{"".join(points)}">'
                     f'<title>running best {ys[-1]:.6f}</title></path>')
    for x, row in enumerate(rows, start=1):
        text, _ = plot.split_tags(row["description"])
        title = f"#{x} {row['commit']} {row['val_bpb']:.6f} {row['status']}: {text}"
        role = plot.row_role(row)
        if row["status"] == "crash":
            parts.append(marker("cross", sx(x), crash_y, "crash", f"#{x} {row['commit']} crash: {text}", 4.5))
        elif row["val_bpb"] > clip:
            parts.append(marker("triangle", sx(x), sy(clip), "off-scale", title, 5))
        elif role in ("baseline", "rerun"):
            parts.append(marker("diamond" if role == "baseline" else "square", sx(x), sy(row["val_bpb"]), role, title))
        elif row["status"] == "keep":
            parts.append(marker("circle", sx(x), sy(row["val_bpb"]), "kept", title, 6))
        else:
            parts.append(marker("circle", sx(x), sy(row["val_bpb"]), "discarded", title, 3.5))
    parts.append("</svg>")
    return "".join(parts)

