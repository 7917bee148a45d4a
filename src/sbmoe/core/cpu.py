"""What this CPU is and can do: model name, feature flags, usable cores (standard library only).

Kept apart from :mod:`sbmoe.core.runtime` (which imports torch) so that whatever must decide on the
cores before torch loads (a test worker's thread count) reads the same facts.
"""

from __future__ import annotations

import functools
import os
import platform

# CPU flags that decide which numerics are fast here (bf16 and int8 matrix units, vector width).
CPU_FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in ``/proc/cpuinfo`` (``None`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> str:
    """One line naming the CPU, the cores usable here and the flags that matter for speed."""
    flags = cpu_flags()
    present = [flag for flag in CPU_FLAGS_THAT_MATTER if flag in flags]
    return f"{cpu_model_name()} ({usable_cores()} cores; {' '.join(present) or 'no avx2/avx512/amx'})"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
