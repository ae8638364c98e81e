"""How the process's C heap treats freed blocks: kept for reuse, or handed back to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc's default serves every block above a threshold (at
most 32 MB) with its own ``mmap`` and unmaps it on ``free``, and trims the heap's free top; so every
large activation of a UNet step lands on fresh pages, and the kernel zero-fills each 4 KiB page on its
first touch. One sd15 CFG step at 512x512 in bf16 takes 85,000-200,000 such page faults and a VAE decode
~710,000; with freed blocks kept in the heap neither takes any after the first run, and a whole 20-step
request is 1.09-1.11x faster, its VAE decode 1.4-1.5x (``python benchmarks/host_memory.py --request``).

This is a setting of the whole process, so the library never makes it on its own: the CLI makes it
for the process it owns when that process generates on the CPU (``sdstudio.cli.entry``), and a program
that embeds sdstudio may call :func:`keep_freed_memory` itself. Training is left alone: a shortened
toyworld recipe ran as fast either way and peaked 0.3-0.6 GB higher with it. The cost: the process keeps the largest
heap it has grown to until :func:`release_freed_memory` or exit. That heap cannot be compacted, so
fragmentation can take it past the peak of live tensors (PyTorch's 64-byte aligned blocks ask for a
little more than a freed block of the same size holds, so a new size pattern grows it for a few rounds
before it settles). On a sd15 512x512 request sdstudio's peak RSS was the same both ways (6.3 GB);
diffusers' pipeline under the same setting peaked 1.1 GB higher than with glibc's default
(``benchmarks/vs_diffusers.py --diffusers-keeps-freed-memory``).
"""

from __future__ import annotations

import ctypes
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
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Serve large blocks from glibc's main heap instead of one ``mmap`` each, and never trim that heap,
    so a freed tensor's pages are reused by the next allocation instead of being unmapped and faulted in
    again.

    True when glibc took both settings; False where the C library is not glibc (nothing is changed) or,
    unlikely, where it refused the second one (then only the first holds). Under an allocator put in
    with ``LD_PRELOAD`` (jemalloc, tcmalloc) the call reaches glibc but that allocator decides. Other
    threads allocate from arenas of their own, whose heaps hold at most 64 MB: a block larger than that
    still gets a ``mmap`` of its own there.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (``malloc_trim(0)``, which also releases whole free pages
    inside the heap, not only at its top), e.g. after a job of a long-lived process. True when some
    memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
