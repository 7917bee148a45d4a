"""What every head on the pooled embedding shares: saving itself, its input, its residual and its side.

A head sits between pooling and normalisation and adds a learned change to the pooled embedding
(``y = x + delta(x)``). It applies to both kinds of text (``head_side="both"``, the paper's design) or
to queries only (``head_side="query"``): documents then keep the frozen backbone's embeddings, so an index
built with the zero-shot backbone stays valid for every query-side model trained on it.

A query-side head adds its change to the raw pooled embedding, and each kind starts as the
identity (a zero-initialised last layer), so an untrained query-side model embeds
every text bit for bit as the zero-shot backbone does. Which side a text is on comes from
sentence-transformers' ``task`` (``encode_query`` / ``encode_document``); sbmoe passes it on every
call (:func:`sbmoe.inference.encoding.run_stages`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from sentence_transformers.base.modules import Module
from torch import Tensor

from sbmoe.config.base import from_dict
from sbmoe.config.model import HeadConfig, ModelConfig
from sbmoe.core.choices import HEAD_SIDES
from sbmoe.core.errors import ModelLoadError

NORMALIZE_EPS = 1e-6


class SavedModule(Module):
    """A sentence-transformers module built from one config dataclass, which it saves with its weights.

    Its record (``config.json`` in its folder) holds the fields of :attr:`config_class`, read from the
    module's attributes of the same names; loading builds ``cls(config_class(**record))``, with the
    keys of records saved by sbmoe 0.1 renamed to today's. Saved models then reload
    with ``Retriever.load(dir)``, which resolves the head to this class.
    """

    config_class: ClassVar[type[HeadConfig]] = HeadConfig
    # sentence-transformers' load_config renames these keys of older records (top_k, side).
    config_key_renames: ClassVar[dict[str, str]] = ModelConfig.RENAMED

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # What sentence-transformers' get_config_dict saves: exactly the config's fields.
        cls.config_keys = [field.name for field in dataclasses.fields(cls.config_class)]

    @property
    def config(self) -> HeadConfig:
        """The module's settings as they are now (what :meth:`save` records)."""
        return self.config_class(**self.get_config_dict())

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> SavedModule:
        hub_kwargs = {
            key: kwargs[key]
            for key in ("token", "cache_folder", "revision", "local_files_only")
            if key in kwargs
        }
        record = cls.load_config(model_name_or_path, subfolder=subfolder, **hub_kwargs)
        config_file = Path(model_name_or_path) / subfolder / cls.config_file_name
        try:
            module = cls(from_dict(cls.config_class, record, source=str(config_file)))
        except ValueError as error:  # a UsageError too: a value of the wrong type
            raise ModelLoadError(f"{config_file}: unusable head settings ({error})") from error
        try:
            cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub_kwargs)
        except RuntimeError as error:
            mismatch = size_mismatch(error)
            if mismatch is None:
                raise
            raise ModelLoadError(
                f"{config_file} does not fit the weights beside it ({mismatch}); restore the config.json "
                "saved with these weights"
            ) from error
        return module


def size_mismatch(error: BaseException) -> str | None:
    """The line of a torch or transformers weight-loading ``error`` saying that a weight's size is not
    the one its config sets, or ``None`` when the error is another one."""
    lines = (line.strip().rstrip(".") for line in str(error).splitlines())
    return next(
        (line for line in lines if "size mismatch" in line or "ignore_mismatched_sizes" in line), None
    )


class Head(SavedModule):
    """A residual head on the pooled embedding: ``y = x + delta(x)``, on both sides or queries only.

    Subclasses implement :meth:`delta`. Reads ``features["sentence_embedding"]`` and replaces it.

    Args:
        config: Its settings. With ``normalize_input`` the pooled embedding is L2-normalised before
            ``delta`` reads it; a both-sided head also adds ``delta`` to the normalised embedding, a
            query-side head adds it to the raw one, so that at ``delta = 0`` a query embeds exactly
            as without the head.
    """

    forward_kwargs: ClassVar[set[str]] = {"task"}
    kind: ClassVar[str]  # the ModelConfig.head value that builds this head

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if config.head_side not in HEAD_SIDES:
            raise ValueError(f"head_side must be one of {HEAD_SIDES}, got {config.head_side!r}")
        self.embedding_dimension = config.embedding_dimension
        self.normalize_input = config.normalize_input
        self.head_side = config.head_side

    def applies_to(self, task: str | None) -> bool:
        """Whether the head changes texts of ``task`` (``query`` or ``document``)."""
        if self.head_side == "both":
            return True
        if task not in ("query", "document"):
            raise ValueError(
                "this model's head is on the query side only: encode queries with encode_query() and "
                "documents with encode_document() (or pass task='query' / task='document')"
            )
        return task == "query"

    def delta(self, x: Tensor, features: dict[str, Any]) -> Tensor:
        """The head's change to the (possibly normalised) pooled embedding ``x``; may add features."""
        raise NotImplementedError

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs) -> dict[str, Any]:
        if not self.applies_to(task):
            return features
        raw = features["sentence_embedding"]
        x = F.normalize(raw, p=2, dim=-1, eps=NORMALIZE_EPS) if self.normalize_input else raw
        features["sentence_embedding"] = (raw if self.head_side == "query" else x) + self.delta(x, features)
        return features
