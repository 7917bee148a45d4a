"""sbmoe: dense retrieval with a single-block Mixture-of-Experts (SB-MoE) head.

The front door: the names a user needs, one import away::

    import sbmoe

    collection = sbmoe.load_collection(sbmoe.resolve_data("scifact"))
    model_config, train_config = sbmoe.build_configs("default", {"num_experts": 6}, {"epochs": 1})
    sbmoe.train(model_config, train_config, collection, "runs/moe")
    retriever = sbmoe.Retriever.load("runs/moe")

Each name is imported on first use, so ``import sbmoe`` (and ``sbmoe --help``) stays fast; the
modules named in :data:`_EXPORTS` hold the documentation of each.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute): one line per name, the single place the front door is defined.
_EXPORTS: dict[str, tuple[str, str]] = {
    # Models and their settings
    "Retriever": ("sbmoe.model.retriever", "Retriever"),
    "ModelConfig": ("sbmoe.config.model", "ModelConfig"),
    "TrainConfig": ("sbmoe.config.train", "TrainConfig"),
    "EncodeConfig": ("sbmoe.config.jobs", "EncodeConfig"),
    "EvaluateConfig": ("sbmoe.config.jobs", "EvaluateConfig"),
    "IndexConfig": ("sbmoe.config.jobs", "IndexConfig"),
    "SearchConfig": ("sbmoe.config.jobs", "SearchConfig"),
    "ServeConfig": ("sbmoe.config.jobs", "ServeConfig"),
    "JobOptions": ("sbmoe.config.jobs", "JobOptions"),
    "build_configs": ("sbmoe.config.presets", "build_configs"),
    # Data
    "load_collection": ("sbmoe.data.beir", "load_collection"),
    "resolve_data": ("sbmoe.data.beir", "resolve_data"),
    "EmbeddingCache": ("sbmoe.inference.cache", "EmbeddingCache"),
    # The verbs
    "train": ("sbmoe.training.trainer", "train"),
    "evaluate": ("sbmoe.evaluation.evaluate", "evaluate_model"),
    "index": ("sbmoe.retrieval.indexing", "index_corpus"),
    "search": ("sbmoe.retrieval.search", "search"),
    "open_index": ("sbmoe.retrieval.interface", "open_index"),
    "Index": ("sbmoe.retrieval.interface", "Index"),
    "serve": ("sbmoe.serving.http", "serve"),
    "SearchService": ("sbmoe.serving.service", "SearchService"),
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports on demand
    from sbmoe.config.jobs import EncodeConfig as EncodeConfig
    from sbmoe.config.jobs import EvaluateConfig as EvaluateConfig
    from sbmoe.config.jobs import IndexConfig as IndexConfig
    from sbmoe.config.jobs import JobOptions as JobOptions
    from sbmoe.config.jobs import SearchConfig as SearchConfig
    from sbmoe.config.jobs import ServeConfig as ServeConfig
    from sbmoe.config.model import ModelConfig as ModelConfig
    from sbmoe.config.presets import build_configs as build_configs
    from sbmoe.config.train import TrainConfig as TrainConfig
    from sbmoe.data.beir import load_collection as load_collection
    from sbmoe.data.beir import resolve_data as resolve_data
    from sbmoe.evaluation.evaluate import evaluate_model as evaluate  # noqa: F401 (in __all__ through _EXPORTS)
    from sbmoe.inference.cache import EmbeddingCache as EmbeddingCache
    from sbmoe.model.retriever import Retriever as Retriever
    from sbmoe.retrieval.indexing import index_corpus as index  # noqa: F401 (in __all__ through _EXPORTS)
    from sbmoe.retrieval.interface import Index as Index
    from sbmoe.retrieval.interface import open_index as open_index
    from sbmoe.retrieval.search import search as search
    from sbmoe.serving.http import serve as serve
    from sbmoe.serving.service import SearchService as SearchService
    from sbmoe.training.trainer import train as train


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'sbmoe' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
