import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdstudio.errors import SdStudioError
from sdstudio.threads import (
    ThreadChoice,
    apply_thread_policy,
    busy_cpus,
    cgroup_cpu_limit,
    choose_threads,
    own_running_threads,
    usable_cpus,
)


@pytest.mark.parametrize(
    ("usable", "busy", "online", "expected"),
    [
        (2, 0, None, ThreadChoice(2, "2 CPUs, none busy with other processes")),
        (2, 1, None, ThreadChoice(1, "2 CPUs, 1 busy with other processes")),
        (2, 2, None, ThreadChoice(1, "2 CPUs, all busy with other processes")),
        (2, 5, None, ThreadChoice(1, "2 CPUs, all busy with other processes")),
        (1, 0, None, ThreadChoice(1, "1 CPU, none busy with other processes")),
        (16, 3, None, ThreadChoice(13, "16 CPUs, 3 busy with other processes")),
        (16, 2.5, None, ThreadChoice(13, "16 CPUs, 3 busy with other processes")),  # a median of an even count
        (2, 8, 16, ThreadChoice(1, "2 CPUs, 1 busy with other processes")),  # 2 of 16 CPUs: 2/16 of the load
        (2, 3, 16, ThreadChoice(2, "2 CPUs, none busy with other processes")),
        (4, 16, 16, ThreadChoice(1, "4 CPUs, all busy with other processes")),
        (2, 0.4, None, ThreadChoice(2, "2 CPUs, none busy with other processes")),
        (2, -1, None, ThreadChoice(2, "2 CPUs, none busy with other processes")),
    ],
)
def test_choose_threads_leaves_the_busy_cpus(usable, busy, online, expected):
    assert choose_threads(None, usable, busy, online) == expected


def test_choose_threads_requested_and_environment():
    assert choose_threads(3, 2, 2) == ThreadChoice(3, "--threads 3, more than the 2 CPUs this process may use")
    assert choose_threads(2, 2, 2) == ThreadChoice(2, "--threads 2")
    assert choose_threads(2, 2, 0, omp_num_threads="1") == ThreadChoice(2, "--threads 2")  # the flag wins
    assert choose_threads(None, 2, 2, omp_num_threads="2") == ThreadChoice(2, "OMP_NUM_THREADS=2 in the environment")
    # An OMP_NUM_THREADS that is not one count (a nested list, garbage) leaves the choice to the policy.
    assert choose_threads(None, 2, 2, omp_num_threads="4,2") == ThreadChoice(1, "2 CPUs, all busy with other processes")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_threads_below_one_refused(bad):
    with pytest.raises(SdStudioError, match=r"--threads must be a whole number of at least 1 \(got "):
        choose_threads(bad, 2, 0)
    with pytest.raises(SdStudioError, match="--threads must be"):
        apply_thread_policy(bad)


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_sets_torch_threads(torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert apply_thread_policy(1) == ThreadChoice(1, "--threads 1")
    assert torch.get_num_threads() == 1
    choice = apply_thread_policy(3)
    assert choice.threads == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert apply_thread_policy(None) == ThreadChoice(2, "OMP_NUM_THREADS=2 in the environment")
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    choice = apply_thread_policy(None)  # on this machine, now: between 1 and the usable CPUs
    assert 1 <= choice.threads <= usable_cpus() and torch.get_num_threads() == choice.threads


def test_busy_cpus_takes_the_median_less_this_process(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 3/120 4567\n")  # 3 running, this process's reading thread among them
    assert busy_cpus(samples=3, interval_s=0, loadavg=loadavg, own_running=lambda: 1) == 2
    own = iter([1, 3, 2])  # this process's own threads running at each read: 2, 0, 1 others
    assert busy_cpus(samples=3, interval_s=0, loadavg=loadavg, own_running=lambda: next(own)) == 1
    loadavg.write_text("0.50 0.40 0.30 1/120 4567\n")
    assert busy_cpus(samples=3, interval_s=0, loadavg=loadavg) == 0
    assert busy_cpus(loadavg=tmp_path / "missing") == 0


def test_own_running_threads_counts_the_reader():
    assert own_running_threads() >= 1


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return root, tmp_path / "cgroup"


def test_cgroup_cpu_limit(tmp_path):
    # v2: the process's cgroup and its parents, the smallest quota wins
    root, proc = _cgroup(tmp_path / "a", "0::/user/job\n", {"user/cpu.max": "150000 100000\n", "user/job/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))
    # v2 inside a container: the path is hidden, the mount is the container's cgroup
    root, proc = _cgroup(tmp_path / "b", "0::/\n", {"cpu.max": "100000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.0 and usable_cpus(root, proc) == 1
    # v1
    root, proc = _cgroup(
        tmp_path / "c",
        "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root, proc) == 0.5 and usable_cpus(root, proc) == 1
    # no quota, or no cgroup file at all
    root, proc = _cgroup(tmp_path / "d", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(root, tmp_path / "missing") is None


# A fresh process: the policy sets libgomp's spin count before torch (and so libgomp) loads. What the
# shorter spin saves in CPU time is measured by benchmarks/busy_machine.py (a timing, not a test).
SPIN_PROBE = """
import os
from sdstudio.threads import apply_thread_policy
choice = apply_thread_policy(2)
import torch
print(choice.spin_count, "GOMP_SPINCOUNT" in os.environ, os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="libgomp spins only with more than one CPU")
def test_policy_shortens_libgomp_spinning():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}

    def probe(extra: dict[str, str]) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", SPIN_PROBE], env={**env, **extra}, capture_output=True, text=True, check=True, timeout=120
        )
        return out.stdout.split()

    # set for libgomp's start, not passed on to child processes
    assert probe({}) == ["30000", "False", "None"]
    # libgomp's default, left as the user set it
    assert probe({"GOMP_SPINCOUNT": "300000"}) == ["None", "True", "300000"]
