"""The comparison plots: every point keeps its label, in its colour, and crowded labels move apart."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from tfemb import report  # noqa: E402


def _labelled(points):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = report.labelled_scatter(ax, fig, points)
    renderer = fig.canvas.get_renderer()
    boxes = {}
    for text in ax.texts:
        text.update_positions(renderer)
        boxes[text.get_text()] = (Text.get_window_extent(text, renderer), text)
    return fig, colors, boxes


def test_crowded_labels_are_all_drawn_apart_in_their_colours():
    # The demo's streaming plot: two points side by side near the top, whose labels collide.
    points = [("FSE (sum)", 2.2e6, 0.6757), ("DARTS", 6.9e5, 0.6739), ("SAM", 6.1e5, 0.6333),
              ("AutoEmb", 5.4e5, 0.6469), ("ESAPN", 6.5e5, 0.6747)]
    fig, colors, boxes = _labelled(points)
    try:
        assert sorted(boxes) == sorted(label for label, _, _ in points)  # no label lost
        for (label, _, _), color in zip(points, colors):
            assert tuple(boxes[label][1].get_color()) == tuple(color), label
        names = list(boxes)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not boxes[a][0].overlaps(boxes[b][0]), (a, b)
        # The label that had to move is tied to its point by a line; the others are not.
        assert boxes["ESAPN"][1].arrow_patch is not None
        assert boxes["DARTS"][1].arrow_patch is None
    finally:
        plt.close(fig)


def test_a_label_with_no_free_place_is_still_drawn():
    points = [(f"variant {i}", 1e5, 0.5) for i in range(20)]  # all at one spot: 12 tries cannot free them all
    fig, _, boxes = _labelled(points)
    try:
        assert sorted(boxes) == sorted(label for label, _, _ in points)
    finally:
        plt.close(fig)


def test_scatter_plot_writes_the_png(tmp_path):
    path = report.scatter_plot(str(tmp_path / "p.png"), [("a", 1e3, 0.7), ("b", 1e4, 0.71)], "bytes", "auc", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")


def test_scatter_plot_names_points_it_cannot_place(tmp_path):
    # A NaN metric (a stream with an empty test period) used to fail the main job with "Data cannot be
    # log-scaled because all values are <= 0"; a point without a finite value is named on the plot instead.
    from unittest import mock

    path = str(tmp_path / "p.png")
    with mock.patch.object(report, "labelled_scatter", wraps=report.labelled_scatter) as placed:
        report.scatter_plot(path, [("a", 1e3, 0.7), ("b", 1e4, float("nan")), ("c", 0, 0.5)], "bytes", "auc", "t")
    assert [p[0] for p in placed.call_args[0][2]] == ["a"]
    report.scatter_plot(path, [("a", 1e3, float("nan")), ("b", 1e4, float("nan"))], "bytes", "auc", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_label_at_the_right_edge_goes_left_of_its_point():
    # The main job's plot: the rightmost points (fixed-16 and a variant of the same bytes) are labelled inside the
    # axes, not cut off at the figure's edge.
    points = [("md α=0.3 4x", 2.3e5, 0.7457), ("fixed-16", 9.3e5, 0.7470),
              ("fixed-16 + AutoDis numeric", 9.3e5, 0.7516)]
    fig, _, boxes = _labelled(points)
    try:
        right = fig.axes[0].get_window_extent(fig.canvas.get_renderer()).x1
        assert all(box.x1 <= right for box, _ in boxes.values()), {k: b.x1 for k, (b, _) in boxes.items()}
        assert boxes["md α=0.3 4x"][1].get_ha() == "left"  # room on the right: labels stay right of their point
        assert boxes["fixed-16 + AutoDis numeric"][1].get_ha() == "right"
    finally:
        plt.close(fig)
