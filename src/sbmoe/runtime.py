"""Where and how computation runs: device, precision, autocast, seeding, and what this CPU can do."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random

import numpy as np
import torch

from sbmoe.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags that decide which numerics are fast here (bf16 and int8 matrix units, vector width).
CPU_FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_bf16", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """One line naming the CPU, its core count and the flags that matter for speed here."""
    flags = cpu_flags()
    present = [flag for flag in CPU_FLAGS_THAT_MATTER if flag in flags]
    return f"{cpu_model_name()} ({os.cpu_count()} cores; {' '.join(present) or 'no avx2/avx512/amx'})"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


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
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


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
