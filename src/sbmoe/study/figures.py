"""The figures of an experiment report: what each plot shows, drawn by :mod:`sbmoe.study.plots`.

* ``systems.png``: each system's primary metric on its own collection, with a 95% interval over
  queries, zero-shot named as the reference; ``unseen.png``: the same on the test queries whose
  relevant documents no training query had (where a document prior cannot help);
* ``gain_over_zero_shot.png``: per training collection, each trained system's change from the
  zero-shot backbone with a 95% interval over paired queries, in-domain and on every other
  collection it was evaluated on (transfer);
* ``metric_vs_experts.png`` (grids over several expert counts only): the primary metric against
  the number of experts, one panel per (backbone, training collection, evaluation collection).
* ``expert_usage.png``: per trained MoE model, the hard top-1 share of each expert, for queries and
  documents of the collection it was trained on.
* ``tsne_<collection>.png``: a query and its top documents under the MoE model with the most
  experts, coloured by top-1 expert; the query is the one whose top documents span the most experts,
  and the title says when routing collapsed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sbmoe.core.choices import EXPERT_POOLINGS
from sbmoe.core.errors import ModelLoadError
from sbmoe.core.layouts import EVALUATION_FILES, EXPERIMENT_FILES
from sbmoe.evaluation.tables import metric_label
from sbmoe.study.grid import slug
from sbmoe.study.results import SystemResult

# The t-SNE query is chosen among this many test queries (the first by id), by how many experts
# route their top SPREAD_DEPTH documents.
TSNE_CANDIDATES = 32
SPREAD_DEPTH = 10

Group = tuple[str, str, str]


def write_figures(
    groups: Mapping[Group, list[SystemResult]], metric: str, baseline: str, directory: Path
) -> list[Path]:
    """Draw every figure the systems allow into ``directory``; return the PNGs written.

    Args:
        groups: (backbone, training collection, evaluation collection) -> its systems, in row order.
        metric: The primary metric (y-axis of the metric plot).
        baseline: The baseline variant, drawn in black.
    """
    from sbmoe.study.plots import plot_expert_usage, plot_metric_vs_experts

    written = []
    systems = [s for members in groups.values() for s in members]
    written += comparison_figures(systems, metric, directory)
    counts: dict[str, set[int]] = {}
    for s in systems:
        counts.setdefault(s.variant, set()).add(s.experts)
    if any(len(experts - {0}) > 1 for experts in counts.values()):
        panels: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
        references: dict[str, dict[str, float]] = {}
        for (backbone, trained_on, evaluated_on), members in groups.items():
            where = evaluated_on if trained_on == evaluated_on else f"{trained_on} → {evaluated_on}"
            title = f"{backbone} / {where}"
            lines, flat = panels.setdefault(title, {}), references.setdefault(title, {})
            for s in members:
                if s.experts:
                    lines.setdefault(f"{s.variant} {s.rule}", []).append(
                        (s.experts, s.mean(metric), s.std(metric))
                    )
                else:
                    flat[s.label] = s.mean(metric)
        path = directory / "metric_vs_experts.png"
        written.append(plot_metric_vs_experts(panels, references, metric_label(metric), path, baseline))
    # One panel per trained MoE model (its first seed's routing), on the collection it was trained on.
    routed = [s for s in systems if s.routing and s.train_collection == s.eval_collection]
    usage = {
        f"{s.backbone}, {s.eval_collection}: {s.variant} N={s.experts}": s.routing[0]
        for s in sorted(routed, key=lambda s: (s.eval_collection, s.variant, s.experts))
    }
    if usage:
        written.append(plot_expert_usage(usage, directory / "expert_usage.png"))
    for system in tsne_systems(systems):
        try:
            written.append(write_tsne(system, directory / f"tsne_{slug(system.eval_collection)}.png"))
        except ModelLoadError as error:  # e.g. the cells' weights were deleted to save space
            warnings.warn(f"t-SNE of {system.eval_collection} skipped: {error}", stacklevel=2)
    return written


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """The mean of ``values`` and its normal-approximation 95% confidence interval."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, mean, mean
    half = 1.96 * float(array.std(ddof=1)) / np.sqrt(len(array))
    return mean, mean - half, mean + half


def comparison_figures(systems: Sequence[SystemResult], metric: str, directory: Path) -> list[Path]:
    """``systems.png``, ``unseen.png`` and ``gain_over_zero_shot.png`` (those the systems allow)."""
    from sbmoe.study.plots import plot_intervals

    label = metric_label(metric)
    zero_shot = {(s.backbone, s.eval_collection): s for s in systems if s.kind == "zero-shot"}
    in_domain = [s for s in systems if s.train_collection == s.eval_collection]
    written = []
    for name, subset, question in (
        ("systems.png", None, f"{label} of each system on its own collection (95% interval over queries)"),
        ("unseen.png", "unseen", f"{label} on unseen test queries: no training query shared their answers"),
    ):
        panels: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {}
        references: dict[str, tuple[str, float]] = {}
        for s in in_domain:
            ids = None if subset is None else (s.query_groups or {}).get(subset)
            if subset is not None and not ids:
                continue
            scores = s.mean_per_query(metric)
            values = [scores[q] for q in (ids if ids is not None else scores) if q in scores]
            panel = f"{s.backbone} / {s.eval_collection}" + (f" ({len(values)} queries)" if subset else "")
            panels.setdefault(panel, {}).setdefault("", {})[s.label] = interval(values)
            if s.kind == "zero-shot":
                references[panel] = ("zero-shot", interval(values)[0])
        if panels:
            written.append(plot_intervals(panels, references, label, question, directory / name))
    gains: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {}
    for s in systems:
        reference = zero_shot.get((s.backbone, s.eval_collection))
        if s.kind == "zero-shot" or reference is None:
            continue
        ours, theirs = s.mean_per_query(metric), reference.mean_per_query(metric)
        paired = [ours[q] - theirs[q] for q in ours if q in theirs]
        if not paired:
            continue
        in_domain_gain = s.train_collection == s.eval_collection
        series = "in-domain" if in_domain_gain else f"transfer to {s.eval_collection}"
        panel = f"{s.backbone}, trained on {s.train_collection}"
        gains.setdefault(panel, {}).setdefault(series, {})[s.label] = interval(paired)
    if gains:
        for panel in gains:  # in-domain first: rows follow its order
            gains[panel] = dict(sorted(gains[panel].items(), key=lambda item: item[0] != "in-domain"))
        question = f"Change in {label} from the zero-shot backbone (95% interval over paired queries)"
        references = {panel: ("zero-shot", 0.0) for panel in gains}
        path = directory / "gain_over_zero_shot.png"
        written.append(plot_intervals(gains, references, f"Δ {label}", question, path))
    return written


def tsne_systems(systems: Sequence[SystemResult]) -> list[SystemResult]:
    """Per evaluation collection, the trained MoE system to draw: SB-MoE before controls, in-domain
    before transfer, then the most experts, the top1 rule preferred."""
    chosen: dict[str, SystemResult] = {}

    def rank(system: SystemResult) -> tuple:
        in_domain = system.train_collection == system.eval_collection
        return system.kind == "sb-moe", in_domain, system.experts, system.rule == "top1"

    for system in systems:
        trained = system.cell_dirs and (Path(system.cell_dirs[0]) / EXPERIMENT_FILES.model).exists()
        if system.experts < 2 or not trained or not _routes_documents(Path(system.cell_dirs[0])):
            continue
        current = chosen.get(system.eval_collection)
        if current is None or rank(system) > rank(current):
            chosen[system.eval_collection] = system
    return list(chosen.values())


def _routes_documents(cell_dir: Path) -> bool:
    """Whether the cell's head routes documents too (a query-side head leaves them unrouted)."""
    from sbmoe.core.io import read_json

    saved = read_json(cell_dir / EXPERIMENT_FILES.cell) if (cell_dir / EXPERIMENT_FILES.cell).exists() else {}
    return saved.get("model_config", {}).get("head_side", "both") == "both"


def choose_tsne_query(ranked: Mapping[str, Sequence[str]], expert_of: Mapping[str, int]) -> tuple[str, str]:
    """The query whose top :data:`SPREAD_DEPTH` documents span the most experts, and what that says.

    Args:
        ranked: Query id -> its documents, best first (at least the top :data:`SPREAD_DEPTH`).
        expert_of: Doc id -> top-1 expert, for those documents.

    Returns:
        ``(query id, note)``: the note states how many experts its documents span, or that every
        query's top documents share one expert, or that routing collapsed (every document examined
        goes to one expert). Ties go to the first query in ``ranked``.
    """
    if not ranked:
        raise ValueError("no query to choose from")
    spread = {q: len({expert_of[d] for d in docs[:SPREAD_DEPTH]}) for q, docs in ranked.items()}
    query_id = max(spread, key=lambda q: spread[q])
    if spread[query_id] > 1:
        return query_id, f"its top {SPREAD_DEPTH} documents span {spread[query_id]} experts"
    examined = {d for docs in ranked.values() for d in docs[:SPREAD_DEPTH]}
    experts = {expert_of[d] for d in examined}
    if len(experts) == 1:
        return query_id, (
            f"routing collapsed: all {len(examined)} documents examined go to expert {experts.pop()}"
        )
    return query_id, f"the top {SPREAD_DEPTH} documents of each of {len(ranked)} queries share one expert"


def write_tsne(system: SystemResult, path: Path, top: int = 50) -> Path:
    """t-SNE of a test query and its top documents (first seed's model), coloured by expert.

    The query is chosen among the first :data:`TSNE_CANDIDATES` by :func:`choose_tsne_query`; the
    title says how far its documents' routing spreads, or that routing collapsed.
    """
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.evaluation.metrics import read_trec_run
    from sbmoe.model.retriever import Retriever
    from sbmoe.study.plots import plot_tsne

    retriever = Retriever.load(str(Path(system.cell_dirs[0]) / EXPERIMENT_FILES.model))
    rule = system.rule if system.rule in EXPERT_POOLINGS else None
    collection = load_collection(resolve_data(system.eval_collection), splits=[])
    run = read_trec_run(Path(system.eval_dirs[0]) / EVALUATION_FILES.run)
    ranked = {q: sorted(run[q], key=lambda d: (-run[q][d], d)) for q in sorted(run)[:TSNE_CANDIDATES]}
    shortlist = sorted({d for docs in ranked.values() for d in docs[:SPREAD_DEPTH]})
    _, routed = _head_outputs(
        retriever, [collection.corpus[d].full_text for d in shortlist], "document", rule
    )
    query_id, note = choose_tsne_query(ranked, dict(zip(shortlist, routed.tolist(), strict=True)))

    doc_ids = ranked[query_id][:top]
    query_points, query_expert = _head_outputs(retriever, [collection.queries[query_id]], "query", rule)
    doc_points, doc_experts = _head_outputs(
        retriever, [collection.corpus[d].full_text for d in doc_ids], "document", rule
    )
    title = (
        f"{system.eval_collection}, query {query_id}: top {len(doc_ids)} documents "
        f"({system.variant}, N={system.experts}, {system.rule}); {note}"
    )
    points = np.concatenate([query_points, doc_points])
    return plot_tsne(points, np.concatenate([query_expert, doc_experts]), title, path)


def _head_outputs(retriever, texts: list[str], kind: str, rule: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised head outputs under ``rule`` and top-1 experts of ``texts`` (``query`` or ``document``).

    Through the inference path (:func:`~sbmoe.inference.encoding.apply_head_stages`), which leaves the
    model's mode and its head's expert pooling as they were.
    """
    from sbmoe.inference.encoding import apply_head_stages, encode_pooled
    from sbmoe.inference.routing import route

    pooled = encode_pooled(retriever, texts, kind)
    points = apply_head_stages(retriever, pooled, kind, rule=rule)
    points = points / np.maximum(np.linalg.norm(points, axis=-1, keepdims=True), 1e-12)
    experts, _ = route(retriever, pooled)
    return points, experts.numpy()
