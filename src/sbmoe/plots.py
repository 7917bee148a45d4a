"""Plots for experiment reports (matplotlib, written as PNG); imported only when plotting."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sbmoe.report import ExperimentReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    from sbmoe.io import atomic_open

    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=130, bbox_inches="tight")
    return path


def plot_metric_vs_experts(report: ExperimentReport, path: str | Path) -> Path | None:
    """The primary metric against the number of experts, one panel per group, error bars over seeds.

    Systems without a head (the baseline, zero-shot) are drawn as horizontal lines.
    """
    groups = report.groups()
    if not any(s.experts for members in groups.values() for s in members):
        return None
    plt = _pyplot()
    metric = report.primary_metric
    figure, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for axis, (group, members) in zip(axes[0], groups.items(), strict=True):
        lines: dict[tuple[str, str], list] = defaultdict(list)
        for system in members:
            if system.experts:
                lines[(system.variant, system.rule)].append(system)
            else:
                axis.axhline(
                    system.mean(metric),
                    linestyle="--",
                    linewidth=1,
                    label=system.label,
                    color="grey" if system.variant != report.baseline else "black",
                )
        for (variant, rule), systems in sorted(lines.items()):
            systems.sort(key=lambda s: s.experts)
            axis.errorbar(
                [s.experts for s in systems],
                [s.mean(metric) for s in systems],
                yerr=[s.std(metric) for s in systems],
                marker="o",
                capsize=3,
                label=f"{variant} {rule}",
            )
        axis.set_title(f"{group[0]} / {group[2]}", fontsize=9)
        axis.set_xticks(sorted({s.experts for s in members if s.experts}))
        axis.set_xlabel("experts")
        axis.set_ylabel(metric)
        axis.legend(fontsize=7)
    return _save(figure, Path(path))


def plot_expert_usage(report: ExperimentReport, path: str | Path) -> Path | None:
    """Share of queries and documents routed to each expert (first seed), per collection and system."""
    with_routing = [s for s in report.systems if s.routing and s.train_collection == s.eval_collection]
    if not with_routing:
        return None
    plt = _pyplot()
    unique = {(s.backbone, s.eval_collection, s.variant, s.experts): s for s in with_routing}
    systems = sorted(unique.values(), key=lambda s: (s.eval_collection, s.variant, s.experts))
    figure, axes = plt.subplots(len(systems), 1, figsize=(7, 1.4 * len(systems) + 0.6), squeeze=False)
    for axis, system in zip(axes[:, 0], systems, strict=True):
        routing = system.routing[0]
        for row, kind in enumerate(("queries", "documents")):
            usage = np.asarray(routing[kind]["usage"])
            left = np.concatenate([[0.0], np.cumsum(usage)[:-1]])
            colours = plt.cm.tab10(np.arange(len(usage)) % 10)
            axis.barh([row] * len(usage), usage, left=left, color=colours, edgecolor="white", height=0.7)
        axis.set_yticks([0, 1], ["queries", "documents"], fontsize=7)
        axis.set_xlim(0, 1)
        entropy = routing["documents"]["entropy"] / max(routing["documents"]["max_entropy"], 1e-9)
        axis.set_title(
            f"{system.eval_collection}: {system.variant} N={system.experts} "
            f"(document routing entropy {entropy:.2f} of max)",
            fontsize=8,
        )
    axes[-1, 0].set_xlabel("share of texts per expert")
    return _save(figure, Path(path))


def plot_tsne(points: np.ndarray, experts: np.ndarray, title: str, path: str | Path, seed: int = 42) -> Path:
    """t-SNE of a query (row 0) and its top documents (other rows), documents coloured by expert."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    perplexity = max(2.0, min(30.0, (len(points) - 1) / 3))
    coords = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(points)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    scatter = axis.scatter(
        coords[1:, 0],
        coords[1:, 1],
        c=experts[1:],
        cmap="tab10",
        s=28,
        vmin=0,
        vmax=max(int(experts.max()), 1),
    )
    axis.scatter(
        coords[0, 0], coords[0, 1], marker="*", s=260, c="black", label=f"query (expert {experts[0]})"
    )
    axis.legend(*scatter.legend_elements(), title="expert", fontsize=7, loc="best")
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    return _save(figure, Path(path))
