"""The embedded model's ``sdstudio generate`` on an idle machine and next to a process that keeps every
core busy, with the thread policy (:mod:`sdstudio.threads`) and without it.

Each run is the real command in a fresh process (``python -m sdstudio.cli generate ...`` in this
checkout), timed from start to exit, so import, model load and sampling all count. Four ways of
running it:

- ``policy``: the command as it ships (threads chosen from the free CPUs, libgomp spinning less);
- ``before``: ``--threads`` set to every CPU this process may use (PyTorch's own default) and
  ``GOMP_SPINCOUNT=300000`` (libgomp's default), which the policy leaves alone: the command before the
  policy, on the same code;
- ``all CPUs``: ``--threads`` set to every usable CPU with the policy's spinning, what the policy
  chooses when the load starts after the command did;
- ``OMP_NUM_THREADS=1``: one thread, for reference.

The competing load is a second PyTorch process, started here, that multiplies 512x512 matrices on
``--load-threads`` threads (default: every usable CPU) in a loop. It ends by itself after
``--load-seconds`` or when this script goes away, and is killed at the end in any case.

Other processes on the machine spoil the timings: before each run the script waits (up to
``--wait-quiet`` seconds) until no other process is running, and the table says how many runs started
with foreign load anyway.

    python benchmarks/busy_machine.py                # 5 runs of each, idle then loaded
    python benchmarks/busy_machine.py --runs 3 --load-threads 1
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdstudio.threads import busy_cpus, usable_cpus

log = logging.getLogger("busy_machine")

PROMPT = "a large red circle in the top left, teal background"

# The competing load: its own deadline, and it stops when its parent (this script) is gone.
LOAD = """
import os, sys, time
import torch
parent, seconds, threads = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
a = torch.randn(512, 512)
end = time.monotonic() + seconds
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(20):
        a @ a
"""


# In a fresh process: the CPU time 2 threads spend per parallel region when the regions are 10 ms apart,
# less that of one thread (the product itself), so what is left is the worker's spinning before it sleeps.
SPIN_PROBE = """
import os, sys, time
import torch
def cpu_per_region(threads):
    torch.set_num_threads(threads)
    x = torch.randn(256, 256)
    x @ x
    before = os.times()
    for _ in range(100):
        x @ x
        time.sleep(0.01)
    after = os.times()
    return (after.user + after.system - before.user - before.system) / 100
one = cpu_per_region(1)
print(cpu_per_region(2) - one)
"""


def spin_cpu_per_region(spin_count: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    env["GOMP_SPINCOUNT"] = spin_count
    done = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True, text=True, check=True, timeout=300)
    return float(done.stdout)


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)  # the command's own account of its choice, per run
    foreign: int = 0  # runs that started while some other process was running


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    wanted = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if flags and f in flags.group(1).split()]
    return f"{name.group(1) if name else 'unknown CPU'}, {os.cpu_count()} CPUs, flags: {' '.join(wanted) or 'no avx512_bf16/amx'}"


def running_others() -> list[str]:
    """Processes other than this one and its children with a thread in state R right now."""
    mine = {os.getpid()}
    names = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():  # our child (the load, a run)
                continue
            tasks = os.listdir(f"/proc/{entry}/task")
            states = [Path(f"/proc/{entry}/task/{t}/stat").read_text() for t in tasks]
        except (OSError, ValueError):
            continue
        if any(s[s.rindex(")") + 2] == "R" for s in states):
            names.append(f"{entry} {stat[stat.index('(') + 1 : stat.rindex(')')]}")
    return names


def wait_quiet(expected_busy: int, limit_s: float) -> bool:
    """Wait until no more than ``expected_busy`` threads of other processes run (our load's), three checks
    in a row a second apart; False when ``limit_s`` passed first."""
    deadline = time.monotonic() + limit_s
    calm = 0
    while True:
        busy = busy_cpus(samples=21, interval_s=0.01)
        calm = calm + 1 if busy <= expected_busy else 0
        if calm >= 3:
            return True
        if time.monotonic() > deadline:
            log.warning("machine not quiet within %.0f s (now %.1f threads of other processes running: %s)", limit_s, busy, running_others())
            return False
        time.sleep(1.0)


def generate(variant: Variant, out: Path, timeout_s: float) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    env.update(variant.env)
    cmd = [sys.executable, "-m", "sdstudio.cli", "-v", "generate", PROMPT, "-o", str(out), "--overwrite", "-q"]
    start = time.perf_counter()
    done = subprocess.run([*cmd, *variant.args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    choice = re.search(r"threads: (.*)", done.stderr)
    return seconds, choice.group(1) if choice else "?"


def measure(variants: list[Variant], runs: int, expected_busy: int, args: argparse.Namespace, out: Path) -> dict[str, Timings]:
    timings = {v.name: Timings() for v in variants}
    for i in range(runs):
        for v in variants:  # interleaved, so that drift in the machine's state spreads over all of them
            quiet = wait_quiet(expected_busy, args.wait_quiet)
            seconds, choice = generate(v, out, args.timeout)
            t = timings[v.name]
            t.seconds.append(seconds)
            t.threads.append(choice)
            t.foreign += not quiet
            log.info("run %d %-18s %6.2f s  threads: %s%s", i + 1, v.name, seconds, choice, "" if quiet else "  (foreign load)")
    return timings


def start_load(threads: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD, str(os.getpid()), str(seconds), str(threads)], cwd=REPO)


def stop_load(load: subprocess.Popen) -> None:
    if load.poll() is None:
        load.kill()
    try:
        load.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("load process %d did not end within 10 s of SIGKILL", load.pid)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant, idle and loaded (default 5)")
    parser.add_argument("--load-threads", type=int, default=None, help="threads of the competing load (default: the usable CPUs)")
    parser.add_argument("--load-seconds", type=float, default=1800, help="the load ends by itself after this (default 1800)")
    parser.add_argument("--wait-quiet", type=float, default=120, help="wait up to this for other processes to stop before each run")
    parser.add_argument("--timeout", type=float, default=300, help="give up on one run after this many seconds")
    parser.add_argument("--skip-idle", action="store_true", help="only the loaded runs")
    parser.add_argument("--skip-load", action="store_true", help="only the idle runs")
    parser.add_argument(
        "--wait-variants", action="store_true",
        help="also all CPUs with other libgomp waits (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000), and the CPU "
        "time libgomp's worker spends spinning per parallel region for each spin count",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` stops the load

    cpus = usable_cpus()
    load_threads = args.load_threads or cpus
    variants = [
        Variant("policy"),
        Variant("before", args=("--threads", str(cpus)), env={"GOMP_SPINCOUNT": "300000"}),
        Variant(f"all CPUs ({cpus})", args=("--threads", str(cpus))),
        Variant("OMP_NUM_THREADS=1", env={"OMP_NUM_THREADS": "1"}),
    ]
    if args.wait_variants:
        variants += [
            Variant("PASSIVE", args=("--threads", str(cpus)), env={"OMP_WAIT_POLICY": "PASSIVE"}),
            Variant("spin 1000", args=("--threads", str(cpus)), env={"GOMP_SPINCOUNT": "1000"}),
        ]
    results: dict[str, dict[str, Timings]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        generate(variants[0], out, args.timeout)  # warm the page cache: the model file, torch's libraries
        if not args.skip_idle:
            log.info("idle machine")
            results["idle"] = measure(variants, args.runs, 0, args, out)
        if not args.skip_load:
            log.info("next to a %d-thread PyTorch matmul loop", load_threads)
            load = start_load(load_threads, args.load_seconds)
            try:
                time.sleep(2.0)  # the load imports torch and starts its threads
                if load.poll() is not None:
                    raise RuntimeError(f"the load process ended early (status {load.returncode})")
                results["loaded"] = measure(variants, args.runs, load_threads, args, out)
            finally:
                stop_load(load)

    print(f"\nsdstudio generate, embedded model, {args.runs} runs each: median (min-max) s, loaded / idle; {cpu_name()}")
    print(f"load: a {load_threads}-thread PyTorch process multiplying 512x512 matrices\n")
    print(f"| machine | {' | '.join(v.name for v in variants)} |")
    print(f"|---|{'---|' * len(variants)}")
    for state, timings in results.items():
        cells = []
        for v in variants:
            t = timings[v.name]
            cell = f"{statistics.median(t.seconds):.2f} ({min(t.seconds):.2f}-{max(t.seconds):.2f})"
            if "idle" in results and state != "idle":  # against the same way of running it on the idle machine
                cell += f", {statistics.median(t.seconds) / statistics.median(results['idle'][v.name].seconds):.1f}x"
            if t.foreign:
                cell += f" [{t.foreign} with foreign load]"
            cells.append(cell)
        print(f"| {state} | {' | '.join(cells)} |")
    if args.wait_variants:
        print("\nCPU time of libgomp's spinning per parallel region (2 threads, a 256x256 product then a 10 ms pause):")
        for spin in ("300000", "30000", "1000", "0"):
            wait_quiet(0, args.wait_quiet)
            print(f"  GOMP_SPINCOUNT={spin}: {spin_cpu_per_region(spin) * 1e3:.2f} ms")
    print("\nthreads chosen by the policy:")
    for state, timings in results.items():
        print(f"  {state}: {', '.join(sorted(set(timings[variants[0].name].threads)))}")


if __name__ == "__main__":
    main()
