"""What produced an output: the exact command, package versions, Python, CPU class and time."""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Sequence
from typing import Any

PROVENANCE_PACKAGES = (
    "sbmoe",
    "torch",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "ranx",
    "numpy",
)


def provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What produced an output: the exact command, package versions, Python, CPU class and time.

    Saved beside every output (model, training run, evaluation, index, experiment). Reads versions
    from package metadata, so it imports nothing heavy.
    """
    from sbmoe.core.cpu import cpu_description

    versions = {}
    for package in PROVENANCE_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": list(command) if command is not None else list(sys.argv),
        "versions": versions,
        "python": sys.version.split()[0],
        "cpu": cpu_description(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
