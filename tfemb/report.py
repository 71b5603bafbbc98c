"""Tables (Markdown / console) and plots for results people compare."""

import json
import math
import os


def fmt(value):
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows, columns=None):
    """A Markdown table from a list of dicts."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def console_table(rows, columns=None):
    """A fixed-width text table for the terminal."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(out)


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=float)


def _annotate_apart(ax, fig, points, colors=None, step=10, tries=12):
    """Labels every point, in its marker's colour, right of it (left of it where the label would run past the
    axes' right edge); a label that would overlap one already placed (in display space) moves down by ``step``
    points until it does not (at most ``tries`` times; the last place is kept, so
    no label is lost), and then gets a thin line to its point, so near-identical variants stay readable and each
    label still says which point it names."""
    from matplotlib.text import Text

    placed = []
    fig.canvas.draw()  # axis limits and scales are final: display coordinates are meaningful
    renderer = fig.canvas.get_renderer()
    right_edge = ax.get_window_extent(renderer).x1
    for i, (label, x, y) in enumerate(points):
        color = None if colors is None else colors[i]
        dy = 4
        # Right of the point, unless the label would run past the axes (and out of the saved figure): then left.
        side = 1
        probe = ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
        probe.update_positions(renderer)
        if Text.get_window_extent(probe, renderer).x1 > right_edge:
            side = -1
        probe.remove()
        for attempt in range(tries):
            moved = attempt > 0
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(side * (5 + 8 * moved), dy),
                               fontsize=8, color=color, ha="left" if side > 0 else "right",
                               arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6,
                                           "shrinkA": 0, "shrinkB": 3} if moved else None)
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the text alone: an annotation's own extent adds its line
            if attempt == tries - 1 or not any(box.overlaps(other) for other in placed):
                break
            text.remove()
            dy -= step
        placed.append(box)


def labelled_scatter(ax, fig, points, log_x=True):
    """One marker per ``(label, x, y)`` point on ``ax``, each labelled in its colour (``_annotate_apart``);
    returns the markers' colours."""
    colors = [ax.scatter([x], [y], s=40).get_facecolor()[0] for _, x, y in points]
    if log_x:
        ax.set_xscale("log")
    _annotate_apart(ax, fig, points, colors)
    return colors


def _plottable(x, y, log_x):
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)


def scatter_plot(path, points, x_label, y_label, title, log_x=True, note=None):
    """``points``: list of (label, x, y); one marker per point, labelled. Points without a finite value (a NaN
    metric; x <= 0 on the log axis) cannot be placed: they are named in a note on the plot instead, and a plot
    with none to place still gets written. ``note``: a line of small text in the plot's lower left corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [p for p in points if _plottable(p[1], p[2], log_x)]
    missing = [p[0] for p in points if not _plottable(p[1], p[2], log_x)]
    if shown:
        labelled_scatter(ax, fig, shown, log_x)
    notes = ([note] if note else []) + (["not plotted (no finite value): " + ", ".join(missing)] if missing else [])
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=7, color="0.35", va="bottom",
                wrap=True)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
