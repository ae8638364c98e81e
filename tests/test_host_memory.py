"""keep_freed_memory: a freed large tensor's pages are reused by the next one, with no page faults. Each
case runs in its own process, since the setting is the whole process's and cannot be undone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)

# A "step" of a few 40 MiB temporaries (above glibc's largest dynamic mmap threshold, 32 MiB), run six
# times; prints the page faults of the sixth (a fresh 4 KiB page faults once, when first written). With
# freed memory kept, the heap still grows for the first few steps (PyTorch's 64-byte aligned allocations
# ask for a little more than a freed block of the same tensor size holds) and then serves every step.
_SIXTH_STEP_FAULTS = """
import resource, sys, torch
from sdstudio.host_memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    x = torch.ones(10 * 2**20)
    y = x * 2
    return float((y + x).sum())
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""

PAGES = 3 * 40 * 2**20 // 4096  # written in one step


def _sixth_step_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SIXTH_STEP_FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_is_reused_without_page_faults() -> None:
    took, faults = _sixth_step_faults("keep")
    assert took == "True"
    assert faults < PAGES // 10


def test_glibc_default_faults_every_page_again() -> None:
    # The contrast that makes the test above meaningful: by default each 40 MiB block is mmap'ed per
    # allocation and every page faults again.
    took, faults = _sixth_step_faults("default")
    assert took == "None"
    assert faults >= PAGES * 9 // 10


def test_release_gives_the_free_heap_back() -> None:
    code = """
import torch
from sdstudio.host_memory import keep_freed_memory, release_freed_memory
assert keep_freed_memory()
torch.ones(16 * 2**20)
print(release_freed_memory())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
