"""Where and how computation runs: device, precision, autocast, seeding, the numerics fast on this CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import random

import numpy as np
import torch

from sbmoe.core import cpu
from sbmoe.core.choices import (
    AUTO_INFERENCE,
    BACKENDS,
    INFERENCE_PRECISIONS,
    ONE_TEXT_AUTO_INFERENCE,
    PRECISIONS,
)
from sbmoe.core.errors import UsageError


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX tools for exporting are installed (found, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to run on: ``auto`` (or ``None``) is this process's GPU when there is one, else the CPU.

    Under ``torchrun`` the GPU is ``cuda:$LOCAL_RANK``, so each process gets its own.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r} was asked for, but torch sees no CUDA device")
        if resolved.index is None:  # name the GPU, so devices compare equal to the model's
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu" and not (resolved.type == "mps" and torch.backends.mps.is_available()):
        raise UsageError(f"device {str(device)!r} is not available here: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn ``auto`` into ``bf16`` where the device computes bf16 fast, else ``fp32``."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu.cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """An autocast context for a resolved precision (a no-op for fp32)."""
    device = torch.device(device)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass(frozen=True)
class InferencePlan:
    """What runs the transformer at inference, at which numerics, and why."""

    backend: str
    precision: str
    reason: str

    @property
    def key(self) -> str:
        """A short name of the numerics (part of embedding-cache keys and index metadata)."""
        return self.precision if self.backend == "torch" else f"{self.backend}-{self.precision}"


_announced: set[InferencePlan] = set()


def resolve_inference(backend: str, precision: str, device: torch.device | str) -> InferencePlan:
    """Turn ``auto`` backend and precision into what is fastest here while keeping quality.

    ``auto`` picks bf16 torch on GPUs with bf16 and on CPUs with AMX or AVX512-BF16 (2.97x
    sentence-transformers' float32 encode on a 2-core Xeon with AMX), else float32 torch (1.23x on a
    2-core AVX2 EPYC). int8 ONNX Runtime (1.44x there) is never picked by ``auto``: it quantises
    activations with one scale per batch, so a text's embedding depends on the texts encoded with it
    (cosine down to 0.986 between a query encoded alone and in a batch). The choice is logged once
    per process with its reason.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if precision not in INFERENCE_PRECISIONS:
        raise UsageError(f"precision must be one of {list(INFERENCE_PRECISIONS)}, got {precision!r}")
    return _announce(_plan(backend, precision, device))


def resolve_one_text_inference(backend: str, precision: str, device: torch.device | str) -> InferencePlan:
    """As :func:`resolve_inference`, for one short text per forward pass (a served query).

    ``auto`` on a CPU is ONNX Runtime in float32 (where it is installed). A short query (about 10
    tokens) costs torch more in dispatching its hundreds of operations than in arithmetic, and one
    pass per text keeps a text's embedding independent of the others whatever the numerics. On a
    2-core EPYC with AVX512-BF16 (``bench/bench_serve.py``, 2026-12-06) it served 8 concurrent
    clients 146 queries/s against torch bf16's 115 (2.12x one client's, against 1.58x), the
    workers' encodes scaling 1.96x on two cores against 1.84x; float32 also spares bf16's AMX tiles,
    which one short text fills poorly (on a Xeon with AMX torch's bf16 pass took twice its float32
    pass). Elsewhere, and when a backend or precision is asked for: as :func:`resolve_inference`.
    """
    device = torch.device(device)
    if (backend, precision, device.type) == ("auto", "auto", "cpu") and onnxruntime_available():
        reason = f"one text per pass on cpu ({cpu.cpu_description()}): ONNX Runtime dispatches it fastest"
        return _announce(InferencePlan(*ONE_TEXT_AUTO_INFERENCE, reason))
    return resolve_inference(backend, precision, device)


def _announce(plan: InferencePlan) -> InferencePlan:
    """Log the numerics chosen, with the reason, once per process."""
    if plan not in _announced:
        _announced.add(plan)
        logging.getLogger("sbmoe").info("encoding with %s %s: %s", plan.backend, plan.precision, plan.reason)
    return plan


def _plan(backend: str, precision: str, device: torch.device) -> InferencePlan:
    where = f"{device.type} ({cpu.cpu_description()})" if device.type == "cpu" else str(device)
    if backend == "onnx" or (backend == "auto" and precision == "int8"):
        if device.type != "cpu":
            raise UsageError(f"the onnx backend runs on the CPU, not {device}")
        if precision == "bf16":
            raise UsageError("the onnx backend runs fp32 or int8; bf16 runs on --backend torch")
        chosen = "int8" if precision == "auto" else precision
        return InferencePlan("onnx", chosen, f"asked for, on {where}")
    if precision == "int8":
        raise UsageError("int8 runs on --backend onnx (or auto)")
    if backend == "torch" or precision != "auto":
        return InferencePlan("torch", resolve_precision(precision, device), f"asked for, on {where}")
    fast_bf16 = resolve_precision("auto", device) == "bf16"
    chosen_backend, chosen_precision, _ = AUTO_INFERENCE[fast_bf16]
    reason = (
        f"fast bf16 on {where}"
        if fast_bf16
        else f"no fast bf16 on {where} (--precision int8 is faster on x86, but batch-dependent)"
    )
    return InferencePlan(chosen_backend, chosen_precision, reason)
