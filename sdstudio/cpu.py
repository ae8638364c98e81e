"""What this machine's CPU offers, read from ``/proc/cpuinfo``: the precision and attention policies
depend on it."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed (empty where there is no ``/proc/cpuinfo``)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def _this_cpu() -> frozenset[str]:
    return cpu_flags()  # read once: the hardware does not change under a running process


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """AMX tiles with bf16 (Intel Xeon since Sapphire Rapids) in ``flags`` (this machine's by default):
    oneDNN and PyTorch's fused attention run their bf16 products on them."""
    return "amx_bf16" in (_this_cpu() if flags is None else flags)
