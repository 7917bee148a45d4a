"""Model cards: the README.md of a saved model, in the Hugging Face model-card format.

A card is rendered from the model's config and what ``sbmoe.json`` records (after training the
training settings, data and dev scores) plus, optionally, test metrics of ``sbmoe evaluate`` runs
on the same model. It replaces the unfilled template sentence-transformers writes.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sbmoe.config.base import from_dict
from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import MissingInputError, UsageError
from sbmoe.core.io import read_json
from sbmoe.core.layouts import EVALUATION_FILES
from sbmoe.data.download import BEIR_MD5

# How the usage lines name a model that is not on the hub.
LOCAL_PLACEHOLDER = "path/to/model"
# How many dev evaluations the card lists (the last ones; the best is named above the table).
DEV_ROWS = 20


def describe_head(config: ModelConfig) -> str:
    """The MoE head in a few words, e.g. ``6 experts, learned gating, top1 expert pooling``."""
    side = (
        "; on queries only (documents keep the backbone's embeddings)" if config.head_side == "query" else ""
    )
    if config.head == "linear":
        return f"a linear residual adapter, y = x + W x + b (no experts, no gate){side}"
    if config.num_experts == 0:
        return "no head (the plain fine-tuned bi-encoder)"
    pooling = f"top-{config.experts_top_k}" if config.expert_pooling == "topk" else config.expert_pooling
    return f"{config.num_experts} experts, {config.gating} gating, {pooling} expert pooling{side}"


def _has_head(config: ModelConfig) -> bool:
    """Whether the model carries an sbmoe head module (MoE or linear adapter) after its pooling."""
    return bool(config.num_experts) or config.head == "linear"


def read_evaluation(directory: str | Path, fingerprint: str) -> list[dict[str, Any]]:
    """The test metrics of an ``sbmoe evaluate`` output folder, one entry per inference rule.

    Raises:
        MissingInputError: ``directory`` holds no evaluation.
        UsageError: the evaluation scored another model (or other token limits) than ``fingerprint``.
    """
    directory = Path(directory)
    candidates = (
        [directory] if (directory / EVALUATION_FILES.metrics).is_file() else sorted(directory.glob("*/"))
    )
    folders = [folder for folder in candidates if EVALUATION_FILES.is_one(folder)]
    if not folders:
        raise MissingInputError(f"{directory} holds no sbmoe evaluation (metrics.json beside config.json)")
    entries = []
    for folder in folders:
        config = read_json(folder / EVALUATION_FILES.config)
        if config.get("model_fingerprint") != fingerprint:
            raise UsageError(
                f"{folder / EVALUATION_FILES.config}: this evaluation scored another model (or other "
                "token limits) than the one the card describes"
            )
        metrics = read_json(folder / EVALUATION_FILES.metrics)
        entries.append(
            {
                "data": (config.get("data") or {}).get("name"),
                "split": metrics.pop("split", None),
                "expert_pooling": metrics.pop("expert_pooling", None),
                "num_queries": metrics.pop("num_queries", None),
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            }
        )
    return entries


def render_model_card(
    config: ModelConfig,
    saved: Mapping[str, Any],
    *,
    dimension: int | None = None,
    base_model: str | None = None,
    model_id: str | None = None,
    evaluations: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The README.md of a saved model.

    Args:
        config: Its model config.
        saved: The contents of its ``sbmoe.json`` (the training it records, versions...).
        dimension: The embedding dimension.
        base_model: The backbone's Hugging Face hub id (``None``: a local backbone, left out of the
            metadata).
        model_id: How the usage lines name the model (a hub repo id or a path).
        evaluations: Test metrics, as :func:`read_evaluation` returns them.
    """
    training = saved.get("training") or {}
    train_config = saved.get("train_config") or {}
    setup = saved.get("training_setup") or {}
    data = setup.get("data")
    sections = [
        _front_matter(config, base_model, data, evaluations),
        _title(config, saved, base_model, data),
        _model_section(config, saved, dimension, base_model),
        _training_section(config, train_config, setup, training),
        _evaluation_section(evaluations),
        _usage_section(config, model_id, saved.get("sbmoe_version"), data),
        _versions_section(saved),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _front_matter(
    config: ModelConfig, base_model: str | None, data: str | None, evaluations: Sequence[Mapping[str, Any]]
) -> str:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval", "sbmoe"]
    if config.num_experts:
        tags.append("mixture-of-experts")
    collections = {data, *(entry["data"] for entry in evaluations)} - {None}
    metrics = {"ndcg@10"} | {name for entry in evaluations for name in entry["metrics"]}
    metadata: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": tags,
    }
    if base_model:
        metadata["base_model"] = base_model
    datasets = sorted(f"BeIR/{name}" for name in collections if name in BEIR_MD5)
    if datasets:
        metadata["datasets"] = datasets
    metadata["metrics"] = sorted(metrics)
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---"


def _title(config: ModelConfig, saved: Mapping[str, Any], base_model: str | None, data: str | None) -> str:
    name = Path(config.backbone).name
    if config.head == "linear":
        title, kind = f"{name} + linear adapter", "a linear residual adapter (a control for SB-MoE)"
    elif config.num_experts:
        title, kind = f"{name} + SB-MoE", "an SB-MoE head"
    else:
        title, kind = f"{name} (fine-tuned)", "no MoE head (the fine-tuned baseline)"
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{config.backbone}`"
    trained = f"fine-tuned on {data}" if data else "built"
    return (
        f"# {title}\n\n"
        f"A dense retriever {trained} from {source} with {kind}, by "
        f"[sbmoe](https://pypi.org/project/sbmoe/) {saved.get('sbmoe_version', '')}. Queries and documents "
        "share the encoder; the model maps a text to one embedding, and documents are ranked by "
        f"{_similarity(config)}."
    )


def _similarity(config: ModelConfig) -> str:
    if config.similarity == "dot":
        return "the dot product of the (unnormalised) embeddings"
    return "cosine similarity (the embeddings are L2-normalised)"


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _model_section(
    config: ModelConfig, saved: Mapping[str, Any], dimension: int | None, base_model: str | None
) -> str:
    rows = [("Base model", base_model or f"`{config.backbone}` (local)"), ("Head", describe_head(config))]
    if config.num_experts:
        noise = "noisy gate logits while training" if config.noisy_gating else "no gate noise"
        dropout = f", expert dropout {config.expert_dropout}" if config.expert_dropout else ""
        rows.append(("Routing", f"one gate over the experts; {noise}{dropout}"))
    rows += [
        ("Pooling", config.pooling),
        ("Similarity", config.similarity),
        ("Token limits", f"queries {config.max_query_length}, documents {config.max_doc_length}"),
        ("Lower-cased texts", "yes" if config.lowercase else "no"),
    ]
    if dimension:
        rows.append(("Embedding dimension", dimension))
    rows.append(("Weights fingerprint (SHA-256)", f"`{saved.get('fingerprint', 'unknown')}`"))
    return "## Model\n\n" + _table(rows)


def _training_section(
    config: ModelConfig, recorded: Mapping[str, Any], setup: Mapping[str, Any], training: Mapping[str, Any]
) -> str:
    if not recorded:
        if training:
            return (
                "## Training\n\nTrained by an sbmoe version that did not record its settings in "
                "sbmoe.json (they are in training/config.json beside the trained model)."
                + _dev_scores(training)
            )
        untrained = ""
        if config.head_side == "query":
            untrained = " Its query-side head starts as the identity: the backbone's own embeddings."
        elif config.num_experts:
            untrained = " Its MoE head is at its random initialisation."
        elif config.head == "linear":
            untrained = " Its linear adapter starts at zero: the backbone's own embeddings."
        return f"## Training\n\nNot trained by sbmoe (no training recorded).{untrained}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = from_dict(TrainConfig, dict(recorded), source="train_config")
    s = collections.defaultdict(lambda: "unknown", setup)
    sample = f", over {t.dev_max_docs} documents (a sample)" if t.dev_max_docs else ""
    negatives = (
        f" + {t.hard_negatives} hard negatives per query ({t.negatives_source})" if t.hard_negatives else ""
    )
    if not _has_head(config):
        rates = f"{t.lr_backbone}"
    elif t.head_only or t.freeze_backbone:
        rates = f"head {t.lr_head}"
    else:
        rates = f"backbone {t.lr_backbone}, head {t.lr_head}"
    router = (
        f"; load balancing {t.load_balancing_coef}, router z-loss {t.router_z_loss_coef}"
        if config.num_experts
        else ""
    )
    rows = [
        ("Data", f"{s['data']}: split `{t.train_split}`, {s['training_pairs']} query-document pairs"),
        ("Dev set", f"{s['dev_set']}: {s['dev_queries']} queries{sample}"),
        ("Steps", f"{training.get('steps', s['total_steps'])} ({s['steps_per_epoch']} per epoch)"),
        ("Batch", f"{s['batch_size']} pairs, in-batch negatives{negatives}"),
        ("Trained", s["trains"]),
        (
            "Optimiser",
            f"AdamW, learning rate {rates}, weight decay {t.weight_decay}, {t.scheduler} schedule, "
            f"{t.warmup_ratio:.0%} warm-up",
        ),
        ("Loss", f"in-batch contrastive, temperature {t.temperature}{router}"),
        ("Precision", f"{s['precision']} on {s['device']}"),
        ("Seed", t.seed),
        ("Model selection", f"{t.checkpoint_selection} checkpoint on dev nDCG@10"),
    ]
    return "## Training\n\n" + _table(rows) + _dev_scores(training)


def _dev_scores(training: Mapping[str, Any]) -> str:
    history = training.get("dev_history") or []
    if not history:
        return ""
    best = training.get("best_dev_ndcg10")
    text = (
        f"\n\n### Dev scores\n\nKept: step {training.get('best_step')}, dev nDCG@10 {best:.4f} "
        f"(of {len(history)} evaluations; step 0 is the starting model). Dev scores select the "
        "checkpoint; they are not test scores.\n\n| step | dev nDCG@10 |\n| --- | --- |\n"
    )
    text += "\n".join(f"| {row['step']} | {row['dev_ndcg@10']:.4f} |" for row in history[-DEV_ROWS:])
    if training.get("warning"):
        text += f"\n\n**Warning:** {training['warning']}"
    return text


def _evaluation_section(evaluations: Sequence[Mapping[str, Any]]) -> str:
    if not evaluations:
        return ""
    names = list(dict.fromkeys(name for entry in evaluations for name in entry["metrics"]))
    header = "| data | split | expert pooling | queries | " + " | ".join(names) + " |"
    lines = [header, "|" + " --- |" * (4 + len(names))]
    for entry in evaluations:
        scores = " | ".join(
            f"{entry['metrics'][name]:.4f}" if name in entry["metrics"] else "" for name in names
        )
        rule = entry["expert_pooling"] or ""
        lines.append(f"| {entry['data']} | {entry['split']} | {rule} | {entry['num_queries']} | {scores} |")
    return "## Evaluation\n\nTest metrics of `sbmoe evaluate` (whole corpus, exact search):\n\n" + "\n".join(
        lines
    )


def _usage_section(config: ModelConfig, model_id: str | None, version: str | None, data: str | None) -> str:
    name = model_id or LOCAL_PLACEHOLDER
    if _has_head(config):
        install = f"pip install sbmoe  # saved with sbmoe {version}"
        load = f'model = Retriever.load("{name}").model  # a SentenceTransformer'
        module = (
            "sbmoe.model.adapters.LinearAdapter"
            if config.head == "linear"
            else "sbmoe.model.moe_head.MoEHead"
        )
        why = (
            f"The head is the class `{module}` of the sbmoe package: sbmoe loads it as that "
            "installed class, after checking that the folder names no other code to import. Do not "
            "load it with `trust_remote_code=True`, which lets a folder's own Python files run."
        )
    else:
        install = "pip install sentence-transformers"
        load = f'model = SentenceTransformer("{name}")'
        why = "Without an MoE head the model is plain sentence-transformers; sbmoe is not needed."
    notes = []
    if config.max_query_length != config.max_doc_length:
        notes.append(
            f"sbmoe cuts queries at {config.max_query_length} tokens and documents at "
            f"{config.max_doc_length}; sentence-transformers applies `model.max_seq_length` "
            f"({config.max_doc_length}) to both unless you set it before encoding queries."
        )
    if config.lowercase:
        notes.append("The model was trained on lower-cased texts: lower-case queries and documents too.")
    encode_query, encode_document = "encode", "encode"
    if config.head_side == "query":
        encode_query, encode_document = "encode_query", "encode_document"
        notes.append(
            "The head is on the query side only: `encode_query` runs it, `encode_document` gives the "
            "backbone's own embeddings (`encode` without a side is refused). An index that the "
            "backbone built (`sbmoe index`) serves this model as it is: nothing is re-encoded."
        )
    imports = (
        "from sbmoe.model.retriever import Retriever"
        if _has_head(config)
        else "from sentence_transformers import SentenceTransformer"
    )
    python = (
        f"{imports}\n\n"
        f"{load}\n"
        f'queries = model.{encode_query}(["What lowers the risk of stroke?"])\n'
        f'documents = model.{encode_document}(["Aspirin lowers the risk of stroke in adults."])\n'
        "print(model.similarity(queries, documents))"
    )
    sbmoe = (
        "With sbmoe (evaluate, index, search):\n\n```bash\n"
        f"sbmoe evaluate --model {model_id or name} --data {data or 'scifact'} --output eval\n```"
    )
    text = f"## Usage\n\n```bash\n{install}\n```\n\n```python\n{python}\n```\n\n{why}"
    if notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    return text + "\n\n" + sbmoe


def _versions_section(saved: Mapping[str, Any]) -> str:
    versions = saved.get("versions") or {"sbmoe": saved.get("sbmoe_version")}
    listed = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    return f"## Framework versions\n\nSaved with {listed}."
