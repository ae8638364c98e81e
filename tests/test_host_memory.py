"""keep_freed_memory: large tensors come from glibc's heap, not one mmap each, and a freed tensor's pages
are reused by the next one, with no page faults. The allocator cases run in their own processes, since the
setting is the whole process's and cannot be undone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sdstudio import cli

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)

# A "step" of three 40 MiB temporaries (above glibc's largest dynamic mmap threshold, 32 MiB), run 14
# times. Prints whether the setting took, the bytes glibc holds in mmap'ed blocks while the first
# temporary is alive (mallinfo2's hblkhd, against before it), and the page faults of the last 4 steps (a
# fresh 4 KiB page faults once, when first written). With freed memory kept the heap still grows for the
# first 3-7 steps (PyTorch's 64-byte aligned blocks ask for a little more than a freed block of the same
# tensor size holds; when it settles varies from run to run) and then serves every step.
_ALLOCATIONS = """
import ctypes, resource, sys, torch
from sdstudio.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory() if sys.argv[1] == "keep" else None
mapped_before = libc.mallinfo2().hblkhd
x = torch.ones(10 * 2**20)
mapped_growth = libc.mallinfo2().hblkhd - mapped_before
del x

def step():
    x = torch.ones(10 * 2**20)
    y = x * 2
    return float((y + x).sum())

for _ in range(10):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(took, mapped_growth, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""

MIB_40 = 40 * 2**20
PAGES = 4 * 3 * MIB_40 // 4096  # written in 4 steps


def _python(code: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@glibc_only
def test_kept_memory_comes_from_the_heap_and_is_reused_without_page_faults() -> None:
    took, mapped_growth, faults = _python(_ALLOCATIONS, "keep")
    assert took == "True"
    assert int(mapped_growth) == 0
    assert int(faults) < PAGES // 10


@glibc_only
def test_glibc_default_maps_each_large_block() -> None:
    # The contrast that makes the test above meaningful: by default the 40 MiB block is a mmap of its own
    # (and with 4 KiB pages each step faults every page again).
    took, mapped_growth, _ = _python(_ALLOCATIONS, "default")
    assert took == "None"
    assert int(mapped_growth) >= MIB_40


@glibc_only
def test_release_gives_the_free_heap_back() -> None:
    code = """
import torch
from sdstudio.host_memory import keep_freed_memory, release_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

assert keep_freed_memory()
x = torch.ones(16 * 2**20)
del x
kept = rss()
released = release_freed_memory()
print(released, (kept - rss()) // 2**20)
"""
    released, mib = _python(code)
    assert released == "True"
    assert int(mib) >= 60  # the freed 64 MiB tensor stayed resident until the release


@pytest.mark.parametrize(
    ("argv", "on_cpu"),
    [
        (["generate", "a cat", "--device", "cpu"], True),
        (["generate", "a cat", "--device", "cuda"], False),
        (["train", "toyworld", "--out", "run"], False),
        (["prompt", "a cat"], False),
    ],
)
def test_the_command_keeps_freed_memory_only_when_it_generates_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], on_cpu: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr("sdstudio.host_memory.keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr("sdstudio.threads.apply_thread_policy", lambda n: calls.append("threads"))
    args = cli.build_parser().parse_args(argv)
    args.func = lambda a: calls.append(a.command) or 0
    assert cli.run(args, owns_process=True) == 0
    tuned = ["threads", *(["kept"] if on_cpu else [])] if argv[0] == "generate" else []
    assert calls == [*tuned, argv[0]]
    # only the command's own process is tuned, not a program calling main()
    calls.clear()
    assert cli.run(args) == 0
    assert calls == [argv[0]]
    monkeypatch.setattr(sys, "argv", ["sdstudio", *argv])
    monkeypatch.setattr(cli, "run", lambda args, owns_process=False: calls.append(owns_process) or 0)
    assert cli.entry() == 0
    assert calls[-1] is True
