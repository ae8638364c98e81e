"""How the process's C heap treats freed blocks: kept for reuse, or handed back to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc's default serves every block above a threshold (at
most 32 MB) with its own ``mmap`` and unmaps it on ``free``, and trims the heap's free top; so every
large activation of a UNet step lands on fresh pages, and the kernel zero-fills each 4 KiB page on its
first touch. One sd15 CFG step at 512x512 in bf16 takes about 155,000 such page faults (~600 MB) and
spends ~0.3 of its 2.8 s in them; with freed blocks kept in the heap it takes none after the first step
(``python benchmarks/host_memory.py`` times it both ways).

This is a setting of the whole process, so the library never makes it on its own: the CLI makes it
for the process it owns (``sdstudio.cli.entry``), and a program that embeds sdstudio may call
:func:`keep_freed_memory` itself. The cost is that the process keeps its peak heap until
:func:`release_freed_memory` or exit: it never grows past the peak a run reached, but it does not shrink
after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory", "release_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (an int): the heap is never trimmed on free.
NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap (no ``mmap`` per large block) and never trim it, so a freed
    tensor's pages are reused by the next allocation instead of being unmapped and faulted in again.

    True when the setting took effect; False where the C library is not glibc (nothing is changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (``malloc_trim(0)``), e.g. after a job of a long-lived
    process. True when some memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
