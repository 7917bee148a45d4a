"""Build, save, load and fingerprint SB-MoE retrievers.

A retriever is a sentence-transformers pipeline ``Transformer -> Pooling -> MoEHead -> Normalize``
(the head is left out for the plain fine-tuned baseline, the normalisation for dot-product models;
the ``linear`` control puts a :class:`~sbmoe.model.adapters.LinearAdapter` where the MoE head goes),
plus the :class:`~sbmoe.config.model.ModelConfig` that describes it. ``Retriever.save(dir)`` writes the
sentence-transformers format; ``Retriever.load(dir).model`` reloads it as a ``SentenceTransformer``
(never with remote code trusted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from sbmoe import __version__
from sbmoe.config.base import from_dict
from sbmoe.config.model import HeadConfig, ModelConfig, MoEHeadConfig
from sbmoe.config.provenance import provenance
from sbmoe.core.errors import ModelLoadError, UsageError
from sbmoe.core.io import write_json
from sbmoe.core.layouts import MODEL_FILES
from sbmoe.core.runtime import resolve_device
from sbmoe.model.adapters import LinearAdapter
from sbmoe.model.backbones import (
    backbone_token_limit,
    hub_model_id,
    hub_sbmoe_snapshot,
    is_sentence_transformers_model,
    load_sentence_transformer,
    resolve_backbone,
)
from sbmoe.model.card import render_model_card
from sbmoe.model.fingerprints import fingerprint_settings, hash_weights, without_head
from sbmoe.model.moe_head import MoEHead

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 256


# Its size (~290 lines) is earned: building (from a config or a saved folder), its parts, token
# limits, identity (fingerprints) and saving are one object's duties, each in its own section below;
# the work itself (encoding, training, cards) lives in other modules.
class Retriever:
    """A bi-encoder with an optional SB-MoE head, shared by queries and documents.

    Attributes:
        model: The sentence-transformers pipeline.
        config: The resolved model configuration (no ``auto``/``None`` left in it).
    """

    def __init__(self, model: SentenceTransformer, config: ModelConfig) -> None:
        self.model = model
        self.config = config

    @property
    def config(self) -> ModelConfig:
        """The resolved model configuration; setting it checks its token limits against the backbone."""
        return self._config

    @config.setter
    def config(self, config: ModelConfig) -> None:
        # Here rather than in ModelConfig.validate: only the backbone knows its positions, and every
        # way a limit arrives (building, loading, evaluate's overrides) goes through this setter.
        limit = backbone_token_limit(self.encoder_stages()[0])
        for name in ("max_query_length", "max_doc_length"):
            value = getattr(config, name)
            if limit is not None and value is not None and value > limit:
                raise UsageError(
                    f"{name} (--{name.replace('_', '-')}) is {value} tokens, more than the {limit} "
                    f"positions of backbone {config.backbone!r}: give at most {limit}"
                )
        self._config = config

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device | None = "auto") -> Retriever:
        """Build a retriever on ``config.backbone``, adding a fresh MoE head when ``num_experts > 0``.

        ``head="linear"`` adds a :class:`~sbmoe.model.adapters.LinearAdapter` instead (whatever
        ``num_experts`` says: the resolved config records 0 experts).

        A backbone that already is a saved sbmoe model keeps its own head and settings.

        Args:
            config: What to build.
            device: ``auto`` (the GPU when there is one, else the CPU), or a device such as
                ``cpu``, ``cuda`` or ``cuda:1``.
        """
        config.validate()
        device = resolve_device(device)
        source = resolve_backbone(config.backbone)
        if (Path(source) / MODEL_FILES.sbmoe_config).exists():
            return cls.load(source, device=device)
        # Built on the CPU: the head's initialisation then draws from the CPU generator on every device.
        base = load_sentence_transformer(config.backbone, source, torch.device("cpu"))
        modules = list(base.children())
        transformer = next((m for m in modules if isinstance(m, Transformer)), None)
        if transformer is None:
            raise ModelLoadError(f"{config.backbone!r} has no transformer module to fine-tune")
        pooling = next((m for m in modules if isinstance(m, Pooling)), None)
        has_normalize = any(isinstance(m, Normalize) for m in modules)
        is_st_model = is_sentence_transformers_model(source)

        dimension = transformer.get_embedding_dimension()
        pooling_mode = config.pooling or (pooling.pooling_mode if pooling is not None else "mean")
        if pooling is None or pooling.pooling_mode != pooling_mode:
            pooling = Pooling(dimension, pooling_mode=pooling_mode)
        similarity = config.similarity
        if similarity == "auto":
            similarity = "cosine" if has_normalize or not is_st_model else "dot"
        # The backbone's own limit (sentence-transformers': its max_seq_length; a plain transformers
        # model's: its position embeddings and tokenizer) serves queries and documents alike.
        limit = base.max_seq_length or min(
            DEFAULT_MAX_LENGTH, backbone_token_limit(transformer) or DEFAULT_MAX_LENGTH
        )
        max_doc_length = config.max_doc_length or limit
        resolved = dataclasses.replace(
            config,
            pooling=pooling_mode,
            similarity=similarity,
            max_query_length=config.max_query_length or limit,
            max_doc_length=max_doc_length,
            num_experts=0 if config.head == "linear" else config.num_experts,
            # Recorded as what applies: without an MoE head there is no expert pooling.
            expert_pooling=config.expert_pooling if config.has_moe_head() else "top1",
        )
        stages: list[torch.nn.Module] = [transformer, pooling]
        head_input = (pooling.get_embedding_dimension(), similarity == "cosine")
        if config.head == "linear":
            stages.append(LinearAdapter(HeadConfig.from_model(config, *head_input)))
        elif config.num_experts > 0:
            stages.append(MoEHead(MoEHeadConfig.from_model(config, *head_input)))
        if similarity == "cosine":
            stages.append(Normalize())
        model = SentenceTransformer(modules=stages, device=str(device))
        model.max_seq_length = max_doc_length
        return cls(model, resolved)

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device | None = "auto") -> Retriever:
        """Load a saved sbmoe model, or wrap any encoder (hub name, directory) without a head.

        The model's config is ``sbmoe.json``'s, with the head's kind and settings taken from the head
        stage and its own record (folders of sbmoe 0.1 hold them in both: the head's, which built its
        weights, wins).

        Args:
            name_or_path: A saved model directory, a sentence-transformers or transformers model
                directory or hub name, or ``all-MiniLM-L6-v2``.
            device: ``auto`` (the GPU when there is one, else the CPU), or a device such as
                ``cpu``, ``cuda`` or ``cuda:1``.
        """
        device = resolve_device(device)
        source = hub_sbmoe_snapshot(name_or_path) or resolve_backbone(name_or_path)
        config_path = Path(source) / MODEL_FILES.sbmoe_config
        if not config_path.exists():
            return cls.from_config(ModelConfig(backbone=name_or_path, num_experts=0), device=device)
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))["model_config"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{config_path}: unusable sbmoe model config ({error})") from error
        model = load_sentence_transformer(name_or_path, source, device)
        head = _head_module(model)
        try:
            # The stages are the truth: a head's kind and settings are its own record's, and without a
            # head stage the model has no experts, whatever sbmoe.json says.
            stage = {"num_experts": 0, "head": "moe"}
            if head is not None:
                stage = {**head.config.model_settings(), "head": head.kind}
            settings = {**saved, **stage}
            config = from_dict(ModelConfig, settings, source=str(config_path))
            config.validate()  # the same rules as the command line
        except (TypeError, AttributeError, UsageError) as error:
            raise ModelLoadError(f"{config_path}: unusable sbmoe model config ({error})") from error
        return cls(model, config)

    # ----------------------------------------------------------------------------------- parts
    @property
    def head(self) -> MoEHead | None:
        """The MoE head, or ``None`` for a plain bi-encoder or a linear adapter (no experts, no routing)."""
        return next((m for m in self.model.children() if isinstance(m, MoEHead)), None)

    @property
    def head_module(self) -> MoEHead | LinearAdapter | None:
        """The trainable module after pooling (MoE head or linear adapter), or ``None``."""
        return _head_module(self.model)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the model computes (its inputs are moved there)."""
        return self.model.device

    def encoder_stages(self) -> list[torch.nn.Module]:
        """The stages up to and including pooling (what the head reads)."""
        stages = list(self.model.children())
        cut = next(i for i, m in enumerate(stages) if isinstance(m, Pooling)) + 1
        return stages[:cut]

    def head_stages(self) -> list[torch.nn.Module]:
        """The stages after pooling: the MoE head and/or normalisation (may be empty)."""
        stages = list(self.model.children())
        return stages[len(self.encoder_stages()) :]

    def parameter_groups(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(backbone parameters, head parameters), for separate learning rates."""
        head = self.head_module
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        return backbone, list(head.parameters()) if head is not None else []

    def max_length(self, kind: str) -> int:
        """Token limit for ``kind`` (``query`` or ``document``)."""
        limit = self.config.max_query_length if kind == "query" else self.config.max_doc_length
        return limit or DEFAULT_MAX_LENGTH

    def count_truncated(self, texts: Sequence[str], kind: str) -> int:
        """How many of ``texts`` run past the token limit of ``kind`` (and are cut when encoded)."""
        limit = self.max_length(kind)
        # A token covers at least one character, so only texts longer than the limit can exceed it.
        long = [text for text in self.prepare_texts(texts) if len(text) + 2 > limit]
        if not long:
            return 0
        lengths = self.tokenizer(long, truncation=False, return_length=True, verbose=False)["length"]
        return sum(length > limit for length in lengths)

    def warn_truncated(self, texts: Sequence[str], kind: str, where: str) -> int:
        """Warn with the count when ``texts`` (of ``kind``, from ``where``) run past the token limit."""
        count = self.count_truncated(texts, kind)
        if count:
            flag = "--max-query-length" if kind == "query" else "--max-doc-length"
            warnings.warn(
                f"{where}: {count} of {len(texts)} {kind} texts are longer than the model's limit of "
                f"{self.max_length(kind)} tokens and are cut there (raise it with {flag} when "
                f"training, up to the backbone's own limit)",
                UserWarning,
                stacklevel=2,
            )
        return count

    def prepare_texts(self, texts: Sequence[str]) -> list[str]:
        """Apply the configured text normalisation (lower-casing)."""
        return [t.lower() for t in texts] if self.config.lowercase else list(texts)

    # ----------------------------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """A SHA-256 over the weights and every setting that changes the embeddings."""
        head = self.head
        extra = {"inference_expert_pooling": head.expert_pooling} if head is not None else {}
        return hash_weights(self.model, fingerprint_settings(self.config, extra))

    @property
    def head_changes_documents(self) -> bool:
        """Whether documents pass through the head (a head on both sides): then its indexes are its
        own and documents are routed; without a head, or with a query-side one, they are the backbone's."""
        module = self.head_module
        return module is not None and module.head_side == "both"

    def document_fingerprint(self) -> str:
        """A SHA-256 identifying this model's document embeddings: what an index it builds holds.

        A model whose head changes documents has its :meth:`fingerprint`. Without a head, or with
        a query-side head, documents are the backbone's own: the hash covers the document encoder
        only (weights, pooling, document length, normalisation, lower-casing), so every query-side
        model trained on one backbone shares it with the backbone and its indexes.
        """
        if self.head_changes_documents:
            return self.fingerprint()
        settings = {
            "pooling": self.config.pooling,
            "max_length": self.max_length("document"),
            "lowercase": self.config.lowercase,
            "similarity": self.config.similarity,
        }
        return hash_weights(torch.nn.ModuleList(self.encoder_stages()), settings)

    def index_fingerprints(self) -> tuple[str, ...]:
        """The fingerprints an index must carry for this model's queries to be searched in it.

        An index records who built it (``fingerprint``) and, since document fingerprints exist,
        its documents (``document_fingerprint``). A model whose head changes documents accepts
        only indexes of its own; one whose documents are the backbone's also accepts an index the
        bare backbone built with the same settings before document fingerprints were recorded.
        """
        if self.head_changes_documents:
            return (self.fingerprint(),)
        headless = [stage for stage in self.model.children() if stage is not self.head_module]
        settings = fingerprint_settings(without_head(self.config), {})
        backbone = hash_weights(torch.nn.Sequential(*headless), settings)
        return tuple(dict.fromkeys((self.document_fingerprint(), self.fingerprint(), backbone)))

    def transformer_fingerprint(self) -> str:
        """A SHA-256 over the transformer's weights and architecture: the key of its ONNX export."""
        transformer = self.encoder_stages()[0]
        return hash_weights(transformer, {"architecture": type(transformer.auto_model).__name__})

    def encoder_fingerprint(self, kind: str) -> str:
        """A SHA-256 identifying the pooled embeddings of ``kind`` texts (what the head reads).

        Two models with the same backbone weights, pooling, token limit and text normalisation
        share it, whatever their heads: the key of the pooled-embedding cache.
        """
        settings = {
            "pooling": self.config.pooling,
            "max_length": self.max_length(kind),
            "lowercase": self.config.lowercase,
        }
        stages = torch.nn.ModuleList(self.encoder_stages())
        return hash_weights(stages, settings)

    # ----------------------------------------------------------------------------------- saving
    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Save in sentence-transformers format plus ``sbmoe.json``, without half-written files.

        Everything is written to a temporary folder first and then moved into ``directory`` entry by
        entry; entries of ``directory`` that the model does not own (e.g. ``training/``) are kept.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.", suffix=".tmp", dir=directory))
        try:
            # What sentence-transformers' model.similarity computes, for users of the plain pipeline.
            self.model.similarity_fn_name = "dot" if self.config.similarity == "dot" else "cosine"
            # sbmoe writes the card (below): sentence-transformers' own would encode sample texts for a
            # usage snippet, which a query-side head refuses without a task, only to be replaced.
            self.model.save(str(tmp), create_model_card=False)
            # The head's settings are in its own record (Retriever.load joins the two).
            head_settings = self.head_module.config.model_settings() if self.head_module is not None else {}
            model_config = {k: v for k, v in self.config.to_dict().items() if k not in head_settings}
            saved = {
                "sbmoe_version": __version__,
                "model_config": model_config,
                "fingerprint": self.fingerprint(),
                "versions": provenance()["versions"],
                **(extra or {}),
            }
            write_json(tmp / MODEL_FILES.sbmoe_config, saved)
            (tmp / MODEL_FILES.card).write_text(self.model_card(saved), encoding="utf-8")  # not ST's template
            # sbmoe.json goes last: a folder without it is not taken for a complete sbmoe model.
            (directory / MODEL_FILES.sbmoe_config).unlink(missing_ok=True)
            entries = sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_FILES.sbmoe_config)
            for entry in entries:
                target = directory / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def model_card(
        self,
        saved: dict[str, Any],
        model_id: str | None = None,
        evaluations: Sequence[dict[str, Any]] = (),
    ) -> str:
        """The README.md of this model with ``saved`` as its sbmoe.json (see :mod:`sbmoe.model.card`)."""
        return render_model_card(
            self.config,
            saved,
            dimension=self.model.get_embedding_dimension(),
            base_model=hub_model_id(self.config.backbone),
            model_id=model_id,
            evaluations=evaluations,
        )

    def describe(self) -> dict[str, Any]:
        """A short summary for logs and tables."""
        head = self.head
        module = self.head_module
        return {
            "backbone": self.config.backbone,
            "head": self.config.head if module is not None else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "head_parameters": sum(p.numel() for p in module.parameters()) if module is not None else 0,
            "similarity": self.config.similarity,
            "pooling": self.config.pooling,
            "experts": self.config.num_experts,
            "gating": self.config.gating if head is not None else None,
            "expert_pooling": head.expert_pooling if head is not None else None,
        }


def _head_module(model: SentenceTransformer) -> MoEHead | LinearAdapter | None:
    """The trainable stage after pooling of ``model`` (MoE head or linear adapter), or ``None``."""
    return next((m for m in model.children() if isinstance(m, (MoEHead, LinearAdapter))), None)
