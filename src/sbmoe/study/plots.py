"""Plots for experiment reports (matplotlib, written as PNG); imported only when plotting."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (number of experts, mean, standard deviation over seeds)
Point = tuple[int, float, float]


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

    Args:
        panels: Panel title -> line label -> points ``(experts, mean, std)``.
        references: Panel title -> label -> value of a system without experts (drawn as a
            horizontal line; ``baseline`` in black, the others in grey).
        metric: The y-axis label.
        path: The PNG to write.
        baseline: Label of the reference line to draw in black.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels.items(), strict=True):
        for label, value in references.get(title, {}).items():
            colour = "black" if label == baseline else "grey"
            axis.axhline(value, linestyle="--", linewidth=1, label=label, color=colour)
        for label, points in lines.items():
            experts, means, stds = zip(*sorted(points), strict=True)
            axis.errorbar(experts, means, yerr=stds, marker="o", capsize=3, label=label)
        axis.set_title(title, fontsize=9)
        axis.set_xticks(sorted({p[0] for points in lines.values() for p in points}))
        axis.set_xlabel("experts")
        axis.set_ylabel(metric)
        axis.legend(fontsize=7)
    return _save(figure, Path(path))


def plot_expert_usage(systems: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Share of queries and documents whose top-1 expert each expert is, one panel per system.

    Args:
        systems: Panel title -> routing statistics (``queries`` and ``documents``, each with
            ``usage``: the top-1 shares, as :func:`sbmoe.inference.routing.routing_statistics` returns them).
        path: The PNG to write.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(len(systems), 1, figsize=(7, 1.5 * len(systems) + 0.6), squeeze=False)
    for axis, (title, routing) in zip(axes[:, 0], systems.items(), strict=True):
        shares = {}
        for row, kind in enumerate(("queries", "documents")):
            usage = np.asarray(routing[kind]["usage"])
            left = np.concatenate([[0.0], np.cumsum(usage)[:-1]])
            colours = plt.cm.tab10(np.arange(len(usage)) % 10)
            axis.barh([row] * len(usage), usage, left=left, color=colours, edgecolor="white", height=0.7)
            shares[kind] = float(usage.max())
        axis.set_yticks([0, 1], ["queries", "documents"], fontsize=7)
        axis.set_xlim(0, 1)
        # The bars are hard top-1 shares, so the title states those (not the soft gate's entropy).
        axis.set_title(
            f"{title}: top-1 share of the busiest expert {shares['queries']:.1%} of queries, "
            f"{shares['documents']:.1%} of documents",
            fontsize=8,
        )
    axes[-1, 0].set_xlabel("share of texts per expert (top-1)")
    from matplotlib.patches import Patch

    experts = max(len(routing["documents"]["usage"]) for routing in systems.values())
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
