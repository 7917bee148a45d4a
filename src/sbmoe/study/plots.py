"""Plots for experiment reports (matplotlib, written as PNG); imported only when plotting."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (number of experts, mean, standard deviation over seeds)
Point = tuple[int, float, float]
# (mean, low, high): an estimate and its 95% confidence interval
Interval = tuple[float, float, float]
# Colours and markers of the series of an interval plot, in order.
SERIES_STYLES = (("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "D"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    """Write ``figure`` as PNG and close it; the PNG's ``Title`` text holds the panel titles."""
    from matplotlib import pyplot

    from sbmoe.core.io import atomic_open

    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    try:
        with atomic_open(path, "wb") as handle:
            figure.savefig(
                handle, format="png", dpi=130, bbox_inches="tight", metadata={"Title": " | ".join(titles)}
            )
    finally:
        pyplot.close(figure)
    return path


def plot_metric_vs_experts(
    panels: Mapping[str, Mapping[str, Sequence[Point]]],
    references: Mapping[str, Mapping[str, float]],
    metric: str,
    path: str | Path,
    baseline: str = "",
) -> Path:
    """A metric against the number of experts, one panel per group, error bars over seeds.

    Read at a glance: a line's colour is its variant and its dash the inference rule (``top1``
    solid, ``all`` dashed), so the legend below the panels has one entry per variant and one per
    rule, never one per line. Systems without experts are horizontal lines named at their right
    end with their value: ``baseline`` black and solid, the others grey and dashed. The y-axis fits
    the lines and the references near them; a reference far outside (e.g. zero-shot far below every
    trained system) is written at the axis edge with its value instead of stretching the axis.

    Args:
        panels: Panel title -> line label (``"<variant> <rule>"``) -> points ``(experts, mean, std)``.
        references: Panel title -> label -> value of a system without experts.
        metric: The y-axis label.
        path: The PNG to write.
        baseline: Label of the reference line to draw in black.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    dashes = {"top1": "-", "all": "--", "topk": ":"}
    split = {label: _variant_and_rule(label) for lines in panels.values() for label in lines}
    variants = list(dict.fromkeys(variant for variant, _ in split.values()))
    rules = list(dict.fromkeys(rule for _, rule in split.values()))
    colours = {variant: plt.cm.tab10(index % 10) for index, variant in enumerate(variants)}
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels.items(), strict=True):
        values = [m + sign * s for points in lines.values() for _, m, s in points for sign in (-1, 1)]
        low, high = min(values), max(values)
        span = max(high - low, 0.02)
        near = {k: v for k, v in references.get(title, {}).items() if low - span <= v <= high + span}
        far = {k: v for k, v in references.get(title, {}).items() if k not in near}
        low, high = min([low, *near.values()]), max([high, *near.values()])
        margin = 0.08 * max(high - low, 0.01)
        low, high = low - margin, high + margin
        for label, points in lines.items():
            variant, rule = split[label]
            experts, means, stds = zip(*sorted(points), strict=True)
            # A control at one count (e.g. a random gate at N = 6) sits beside the lines' point there.
            shift = 0.3 if len(points) == 1 and experts[0] > 1 else 0.0
            axis.errorbar(
                [x + shift for x in experts],
                means,
                yerr=stds,
                marker="o",
                markersize=4,
                capsize=3,
                color=colours[variant],
                linestyle=dashes.get(rule, "-."),
            )
        for label, value in near.items():
            is_baseline = label == baseline
            axis.axhline(
                value,
                color="black" if is_baseline else "0.45",
                linestyle="-" if is_baseline else (0, (4, 3)),
                linewidth=1.4 if is_baseline else 0.9,
                zorder=0,
            )
        for y, (label, value) in zip(
            _spread(sorted(near.values()), 0.05 * (high - low)),
            sorted(near.items(), key=lambda item: item[1]),
            strict=True,
        ):
            axis.annotate(
                f"{label} {value:.3f}",
                (1.0, y),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="black" if label == baseline else "0.3",
            )
        for index, (label, value) in enumerate(sorted(far.items(), key=lambda item: item[1])):
            below = value < low
            axis.annotate(
                f"{label} {value:.3f} ({'below' if below else 'above'} the axis)",
                (0.02, 0.03 + 0.06 * index if below else 0.97 - 0.06 * index),
                xycoords="axes fraction",
                va="bottom" if below else "top",
                fontsize=7,
                color="0.3",
            )
        axis.set_ylim(low, high)
        axis.set_title(title, fontsize=9)
        axis.set_xticks(sorted({p[0] for points in lines.values() for p in points}))
        axis.set_xlabel("experts")
        axis.set_ylabel(metric)
        axis.grid(axis="y", linewidth=0.3, alpha=0.6)
    handles = [Line2D([], [], color=colours[v], marker="o", linestyle="-", label=v) for v in variants]
    if len(rules) > 1:
        handles += [
            Line2D([], [], color="0.3", linestyle=dashes.get(r, "-."), label=f"rule: {r}") for r in rules
        ]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    return _save(figure, Path(path))


def _variant_and_rule(label: str) -> tuple[str, str]:
    """``"sb-moe top1"`` -> ``("sb-moe", "top1")``; a label without a rule keeps it empty."""
    variant, _, rule = label.rpartition(" ")
    return (variant, rule) if variant else (label, "")


def _spread(values: Sequence[float], gap: float) -> list[float]:
    """Label positions for sorted ``values``: each at least ``gap`` above the one below it."""
    placed: list[float] = []
    for value in values:
        placed.append(max(value, placed[-1] + gap) if placed else value)
    return placed


def plot_intervals(
    panels: Mapping[str, Mapping[str, Mapping[str, Interval]]],
    references: Mapping[str, tuple[str, float]],
    xlabel: str,
    title: str,
    path: str | Path,
) -> Path:
    """Each system's estimate with its 95% interval, one row per system, one panel per case.

    Answers one question per figure: the systems are the rows (labels on the axis, no legend over
    the data), a reference (e.g. zero-shot) is a vertical line named where it is drawn, and the
    x-axis fits the systems compared: a system far outside the others' range (e.g. a control that
    never reads the query) is drawn as an arrow at the edge with its value written.

    Args:
        panels: Panel title -> series (e.g. ``in-domain``, ``transfer``) -> system label ->
            ``(mean, low, high)``. Rows keep the first series' order; a legend of the series is
            drawn below the panels when there are several.
        references: Panel title -> (name, value) of the reference line.
        xlabel: The x-axis label.
        title: The figure's title: the question it answers.
        path: The PNG to write.
    """
    plt = _pyplot()
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    rows = max(len({label for series in p.values() for label in series}) for p in panels.values())
    figure, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 0.32 * rows + 1.4), squeeze=False, sharey=False
    )
    for axis, (panel, series) in zip(axes[0], panels.items(), strict=True):
        labels = list(dict.fromkeys(label for values in series.values() for label in values))
        low, high = _fitted_range(
            [v for values in series.values() for v in values.values()], references.get(panel)
        )
        offsets = np.linspace(-0.18, 0.18, len(series)) if len(series) > 1 else [0.0]
        for (name, values), offset in zip(series.items(), offsets, strict=True):
            colour, marker = SERIES_STYLES[names.index(name) % len(SERIES_STYLES)]
            for row, label in enumerate(labels):
                if label not in values:
                    continue
                mean, lower, upper = values[label]
                y = row + offset
                if low <= mean <= high:
                    axis.errorbar(
                        mean,
                        y,
                        xerr=[[mean - lower], [upper - mean]],
                        fmt=marker,
                        color=colour,
                        capsize=2,
                        markersize=4,
                    )
                else:  # off the fitted axis: an arrow at the edge, with the value
                    edge = low if mean < low else high
                    axis.plot(edge, y, marker="<" if mean < low else ">", color=colour, markersize=6)
                    axis.annotate(
                        f"{mean:.3f}",
                        (edge, y),
                        xytext=(6 if mean < low else -6, 0),
                        textcoords="offset points",
                        ha="left" if mean < low else "right",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
        if panel in references:
            name, value = references[panel]
            axis.axvline(value, color="black", linewidth=0.8, linestyle="--")
            axis.annotate(
                name, (value, -0.6), xytext=(3, -2), textcoords="offset points", fontsize=7, va="top"
            )
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set_ylim(len(labels) - 0.4, -0.6)
        axis.set_xlim(low, high)
        axis.set_xlabel(xlabel, fontsize=8)
        axis.set_title(panel, fontsize=9)
        axis.grid(axis="x", linewidth=0.3, alpha=0.6)
        axis.tick_params(axis="x", labelsize=7)
    figure.suptitle(title, fontsize=10)
    if len(names) > 1:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=colour, marker=marker, linestyle="", label=name)
            for name, (colour, marker) in zip(names, SERIES_STYLES, strict=False)
        ]
        figure.legend(
            handles=handles,
            loc="lower center",
            ncol=len(handles),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, -0.02),
        )
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    return _save(figure, Path(path))


def _fitted_range(intervals: Sequence[Interval], reference: tuple[str, float] | None) -> tuple[float, float]:
    """An x-range holding every interval but those of far outliers (beyond 3 IQRs of the means)."""
    means = np.array([mean for mean, _, _ in intervals])
    q1, q3 = np.percentile(means, [25, 75])
    spread = max(q3 - q1, 0.01)
    kept = [(lo, hi) for mean, lo, hi in intervals if q1 - 3 * spread <= mean <= q3 + 3 * spread]
    values = [v for pair in kept for v in pair] + ([reference[1]] if reference else [])
    low, high = min(values), max(values)
    margin = 0.06 * max(high - low, 1e-3)
    return low - margin, high + margin


def plot_expert_usage(systems: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Share of queries and documents whose top-1 expert each expert is, one panel per system.

    Args:
        systems: Panel title -> routing statistics (``queries`` and, unless the head is on the query
            side only, ``documents``; each with ``usage``: the top-1 shares, as
            :func:`sbmoe.inference.routing.routing_statistics` returns them).
        path: The PNG to write.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(len(systems), 1, figsize=(7, 1.5 * len(systems) + 0.6), squeeze=False)
    for axis, (title, routing) in zip(axes[:, 0], systems.items(), strict=True):
        kinds = [kind for kind in ("queries", "documents") if kind in routing]
        shares = []
        for row, kind in enumerate(kinds):
            usage = np.asarray(routing[kind]["usage"])
            left = np.concatenate([[0.0], np.cumsum(usage)[:-1]])
            colours = plt.cm.tab10(np.arange(len(usage)) % 10)
            axis.barh([row] * len(usage), usage, left=left, color=colours, edgecolor="white", height=0.7)
            shares.append(f"{usage.max():.1%} of {kind}")
        axis.set_yticks(range(len(kinds)), kinds, fontsize=7)
        axis.set_ylim(-0.5, 1.5)
        axis.set_xlim(0, 1)
        # The bars are hard top-1 shares, so the title states those (not the soft gate's entropy).
        unrouted = "" if "documents" in routing else " (documents skip a query-side head)"
        axis.set_title(
            f"{title}: top-1 share of the busiest expert {', '.join(shares)}{unrouted}", fontsize=8
        )
    axes[-1, 0].set_xlabel("share of texts per expert (top-1)")
    from matplotlib.patches import Patch

    experts = max(len(routing["queries"]["usage"]) for routing in systems.values())
    axes[0, 0].legend(
        handles=[Patch(color=plt.cm.tab10(i % 10), label=f"expert {i}") for i in range(experts)],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    figure.tight_layout()
    return _save(figure, Path(path))


def plot_tsne(points: np.ndarray, experts: np.ndarray, title: str, path: str | Path, seed: int = 42) -> Path:
    """t-SNE of a query (row 0) and its top documents (other rows), documents coloured by expert."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    perplexity = max(2.0, min(30.0, (len(points) - 1) / 3))
    # Exact gradients are quicker than Barnes-Hut's approximation for the few dozen points drawn here.
    method = "exact" if len(points) <= 500 else "barnes_hut"
    coords = TSNE(
        n_components=2, perplexity=perplexity, random_state=seed, init="pca", method=method
    ).fit_transform(points)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    colours = plt.cm.tab10(np.asarray(experts) % 10)  # the colours of the expert-usage figure
    axis.scatter(coords[1:, 0], coords[1:, 1], c=colours[1:], s=28)
    from matplotlib.lines import Line2D

    star = axis.scatter(coords[0, 0], coords[0, 1], marker="*", s=260, c="black")
    handles = [
        Line2D([], [], marker="o", linestyle="", color=plt.cm.tab10(e % 10), label=f"expert {e}")
        for e in sorted(set(experts[1:].tolist()))
    ]
    star.set_label(f"query (expert {experts[0]})")
    axis.legend(handles=[star, *handles], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_title(textwrap.fill(title, 70), fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    return _save(figure, Path(path))
