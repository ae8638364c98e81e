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
def has_amx() -> bool:
    """AMX tiles with bf16 (Intel Xeon since Sapphire Rapids): oneDNN and PyTorch's fused attention run
    their bf16 products on them. Read once: the hardware does not change under a running process."""
    return "amx_bf16" in cpu_flags()
