"""How many CPU threads a process that generates images uses, and how they wait: the CPUs it may run
on, less those that other processes keep busy right now; libgomp spinning a tenth of its default.

PyTorch's CPU build runs its operators, MKL and oneDNN on one OpenMP (libgomp) thread team as large as
the CPUs the process may use. Each parallel region splits its work evenly over the team and ends at a
barrier; libgomp's threads wait there, and for the next region, by spinning (300,000 times by default,
~6.4 ms of CPU on the 2-core Xeon) before they sleep. When other processes keep the cores busy, a
thread of the team is often descheduled, every region waits for it, and its partners spin away the
time slices it needs. On the 2-core Xeon, next to a 2-thread PyTorch process, the embedded model's
``generate`` took 5.3 s (median; 3.9-42 s) with 2 threads against 2.2 s idle, and 3.1 s with one
(``python benchmarks/busy_machine.py``; BENCHMARKS.md, "Threads on a shared machine").

So the team gets only the CPUs that are free when the command starts: the process's CPU affinity,
capped by its cgroup's CPU quota, less the threads of other processes that the kernel counts as running
(``/proc/loadavg``'s 4th field, read 5 times over ~4 ms: a free, instantaneous count). On an idle
machine that is every CPU, PyTorch's own default. ``--threads N`` or ``OMP_NUM_THREADS`` decide
instead. And when torch is not loaded yet, libgomp starts with ``GOMP_SPINCOUNT=30000``: no slower on
an idle machine, and it bounds the loss when the load comes after the start, where the thread count
cannot help (2 threads next to the load: 3.6-7.9 s in 5 runs, against 3.9-42 s with libgomp's default;
with a third busy process, 19-21 s against 38-81 s).

These are settings of the whole process, so the library never makes them on its own: the ``sdstudio``
command calls :func:`apply_thread_policy` for the process it owns, before anything imports torch, and a
program that embeds sdstudio may call it itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdstudio.errors import SdStudioError

__all__ = [
    "ThreadChoice",
    "apply_thread_policy",
    "busy_cpus",
    "cgroup_cpu_limit",
    "choose_threads",
    "import_torch_spinning_less",
    "own_running_threads",
    "usable_cpus",
]

log = logging.getLogger(__name__)

# The load probe: this many reads of /proc/loadavg, this far apart; the median is kept, so that a task
# that runs for an instant (a kernel worker, a shell) does not count, and a busy process does.
SAMPLES = 5
SAMPLE_INTERVAL_S = 0.001

# How long libgomp's threads spin, waiting at a barrier or for the next parallel region, before they
# sleep. Its default, 300,000 spins, took ~6.4 ms of CPU per region on the 2-core Xeon (0.7 ms with
# 30,000): CPU that a busy machine's other processes, and this one's other thread, wait for. A tenth of
# it still bridges the Python between two operators: the embedded model ran as fast on an idle machine,
# where 1,000 spins or OMP_WAIT_POLICY=PASSIVE made it 1.25-1.35x slower (wakeups by futex per region).
SPIN_COUNT = 30_000


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The CPU threads chosen for PyTorch, and why (for the log)."""

    threads: int
    reason: str
    spin_count: int | None = None  # the GOMP_SPINCOUNT libgomp was loaded with, when the policy set it

    def __str__(self) -> str:
        spin = f"; GOMP_SPINCOUNT={self.spin_count}" if self.spin_count is not None else ""
        return f"{self.threads} ({self.reason}{spin})"


def choose_threads(
    requested: int | None, usable: int, busy: float, online: int | None = None, omp_num_threads: str | None = None
) -> ThreadChoice:
    """The decision, from its inputs: ``requested`` (``--threads``; None = choose), ``usable`` (CPUs this
    process may run on), ``busy`` (threads of other processes running on the machine), ``online`` (the
    machine's CPUs, over which ``busy`` is counted; ``usable`` when None) and ``omp_num_threads`` (the
    environment's ``OMP_NUM_THREADS``, honoured when no ``--threads`` is given).

    Other processes' load is taken as spread evenly over the machine, so a process allowed 2 of 16 CPUs
    counts 2/16 of it as its own."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise SdStudioError(f"--threads must be a whole number of at least 1 (got {requested!r})")
        more = f", more than the {usable} CPUs this process may use" if requested > usable else ""
        return ThreadChoice(requested, f"--threads {requested}{more}")
    if omp_num_threads is not None:
        try:
            from_env = int(omp_num_threads)
        except ValueError:
            from_env = 0
        if from_env >= 1:
            return ThreadChoice(from_env, f"OMP_NUM_THREADS={from_env} in the environment")
    usable = max(1, usable)
    online = max(usable, online or usable)
    taken = min(usable, math.floor(max(0.0, busy) * usable / online + 0.5))
    cpus = f"{usable} CPU{'s' if usable > 1 else ''}"
    if taken == 0:
        return ThreadChoice(usable, f"{cpus}, none busy with other processes")
    if taken >= usable:
        return ThreadChoice(1, f"{cpus}, all busy with other processes")
    return ThreadChoice(usable - taken, f"{cpus}, {taken} busy with other processes")


def apply_thread_policy(requested: int | None) -> ThreadChoice:
    """Choose the threads (:func:`choose_threads` on this machine, now), shorten libgomp's spinning when
    torch is not loaded yet (:func:`import_torch_spinning_less`), and set PyTorch's thread count.

    Call once, early, in a process you own: it imports torch and sets process-wide counts. The probe
    costs ~5 ms, and none when ``requested`` or ``OMP_NUM_THREADS`` decide. Raises
    :class:`~sdstudio.errors.SdStudioError` for a ``requested`` below 1, before anything is set."""
    omp = os.environ.get("OMP_NUM_THREADS")
    decided = requested is not None or (omp is not None and omp.strip().isdigit() and int(omp) >= 1)
    choice = choose_threads(requested, usable_cpus(), 0.0 if decided else busy_cpus(), os.cpu_count(), omp)
    spin_count = import_torch_spinning_less()
    import torch

    torch.set_num_threads(choice.threads)
    choice = dataclasses.replace(choice, spin_count=spin_count)
    log.debug("torch threads: %s", choice)
    return choice


def import_torch_spinning_less(spin_count: int = SPIN_COUNT) -> int | None:
    """Import torch with ``GOMP_SPINCOUNT=spin_count`` in the environment, then take it out again (child
    processes get libgomp's default back). libgomp reads its environment once, when it loads with torch,
    so this only works before torch's first import, and is skipped when the environment already sets
    ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. Returns the spin count set, or None when it was not."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return None
    os.environ["GOMP_SPINCOUNT"] = str(spin_count)
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    return spin_count


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota (rounded up:
    a quota of 1.5 CPUs still spreads over 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup and its parents, in CPUs (quota / period; the smallest on the
    path), or None when there is none. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            files = [("cpu.max", None)]
            mounts = [cgroup_root, cgroup_root / "unified"]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            files = [("cpu.cfs_quota_us", "cpu.cfs_period_us")]
            mounts = [cgroup_root / controllers, cgroup_root / "cpu"]
        else:
            continue
        for mount in mounts:
            # The cgroup's folder, then its parents up to the mount (inside a container whose cgroup
            # namespace hides the path, the mount itself is the container's cgroup).
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                folder = mount.joinpath(*parts[:depth])
                for quota_file, period_file in files:
                    limit = _read_quota(folder, quota_file, period_file)
                    if limit is not None:
                        limits.append(limit)
    return min(limits, default=None)


def _read_quota(folder: Path, quota_file: str, period_file: str | None) -> float | None:
    try:
        if period_file is None:  # "max 100000" or "200000 100000"
            quota, period = (folder / quota_file).read_text().split()[:2]
        else:  # "-1" or "200000", and "100000"
            quota, period = (folder / quota_file).read_text().strip(), (folder / period_file).read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def busy_cpus(
    samples: int = SAMPLES,
    interval_s: float = SAMPLE_INTERVAL_S,
    loadavg: Path = Path("/proc/loadavg"),
    own_running: Callable[[], int] | None = None,
) -> float:
    """Threads of other processes that the kernel counts as running (on a CPU or waiting for one): the
    median over ``samples`` reads of ``/proc/loadavg`` ``interval_s`` apart, less this process's own
    running threads at each read. 0 where there is no ``/proc/loadavg``."""
    counts = []
    for i in range(max(1, samples)):
        if i:
            time.sleep(interval_s)
        try:
            running = int(loadavg.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        counts.append(max(0, running - (own_running or own_running_threads)()))
    counts.sort()  # the median (statistics.median would add 2 ms of imports)
    mid = len(counts) // 2
    return float(counts[mid]) if len(counts) % 2 else (counts[mid - 1] + counts[mid]) / 2


def own_running_threads() -> int:
    """This process's threads in state R (the reading one among them)."""
    running = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        if stat[stat.rindex(")") + 2] == "R":  # "pid (comm) S ...": comm may hold spaces and parentheses
            running += 1
    return max(1, running)
