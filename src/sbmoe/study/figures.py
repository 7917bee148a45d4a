"""The figures of an experiment report: what each plot shows, drawn by :mod:`sbmoe.study.plots`.

* ``metric_vs_experts.png``: the primary metric against the number of experts, one panel per
  (backbone, training collection, evaluation collection), systems without experts as lines.
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
    if any(s.experts for s in systems):
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


def tsne_systems(systems: Sequence[SystemResult]) -> list[SystemResult]:
    """Per evaluation collection, the trained MoE system to draw: SB-MoE before controls, in-domain
    before transfer, then the most experts, the top1 rule preferred."""
    chosen: dict[str, SystemResult] = {}

    def rank(system: SystemResult) -> tuple:
        in_domain = system.train_collection == system.eval_collection
        return system.kind == "sb-moe", in_domain, system.experts, system.rule == "top1"

    for system in systems:
        trained = system.cell_dirs and (Path(system.cell_dirs[0]) / "model").exists()
        if system.experts < 2 or not trained:
            continue
        current = chosen.get(system.eval_collection)
        if current is None or rank(system) > rank(current):
            chosen[system.eval_collection] = system
    return list(chosen.values())


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

    retriever = Retriever.load(str(Path(system.cell_dirs[0]) / "model"))
    rule = system.rule if system.rule in EXPERT_POOLINGS else None
    collection = load_collection(resolve_data(system.eval_collection), splits=[])
    run = read_trec_run(Path(system.eval_dirs[0]) / "run.trec")
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
    from sbmoe.inference.encoding import apply_head_stages, encode_texts
    from sbmoe.inference.routing import route

    pooled = encode_texts(retriever, texts, kind, pooled_only=True)
    points = apply_head_stages(retriever, pooled, rule)
    points = points / np.maximum(np.linalg.norm(points, axis=-1, keepdims=True), 1e-12)
    experts, _ = route(retriever, pooled)
    return points, experts.numpy()
