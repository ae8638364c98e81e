"""sdstudio against diffusers' StableDiffusionPipeline on the same weights, in one run, alternating
(issue 6).

    python benchmarks/vs_diffusers.py --arch sd15 --size 512 --batch 1 --runs 3
    python benchmarks/vs_diffusers.py --arch sd15 --size 256 --batch 4
    python benchmarks/vs_diffusers.py --model sdstudio/assets/toyworld.safetensors --size 64
    python benchmarks/vs_diffusers.py --arch sd15 --size 512 --only ours      # peak RSS of one side
    python benchmarks/vs_diffusers.py --arch sd15 --size 512 --tome 0.5       # and sdstudio with ToMe

A random-weight checkpoint of ``--arch`` (or the ``--model`` file) is loaded by sdstudio from a
safetensors file and handed to diffusers through diffusers' own LDM converters (the same path as the
parity tests), so both run the same weights in fp32 (``--precision`` changes sdstudio's side only).
Each run times one request end to end (text encode + sampling + VAE decode) and the sampling steps
alone (from the step callbacks); Euler, CFG 7, 20 steps. Warm-ups are excluded; medians reported.
``--only`` runs one side alone and reports its peak RSS (``ru_maxrss``) and cold start.
Needs the test dependencies (``pip install -e '.[test]'``).

Each tool runs in its own process, as its users run it, and the two take turns: sdstudio's process
keeps freed memory in its heap as the ``sdstudio`` command does (``sdstudio.host_memory``), diffusers'
keeps glibc's default (``--diffusers-keeps-freed-memory`` gives it the same setting, to show what that
setting alone is worth to it). A process-wide malloc setting cannot be undone, so sharing one process
would hand one side's setting to the other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: the diffusers bridge

PROMPT = "a photo of a red fox in the snow, detailed"
NEGATIVE = "blurry"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StepClock:
    """Times one request from its creation and each sampling step from the step callbacks; keeps the
    last latents (no check inside the timed loop) to refuse timings taken on inf/NaN."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self.latents: torch.Tensor | None = None

    def step(self, latents: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())
        self.latents = latents

    def result(self, side: str) -> tuple[float, float]:
        """(seconds for the request, seconds per step)."""
        total = time.perf_counter() - self.start
        if self.latents is None or not bool(self.latents.isfinite().all()):
            raise SystemExit(f"{side}: latents became inf/NaN; timings would not be comparable")
        return total, (self.stamps[-1] - self.stamps[0]) / max(1, len(self.stamps) - 1)


class Ours:
    def __init__(self, path: Path, args: argparse.Namespace, tome: float = 0.0, pipe: object = None) -> None:
        from sdstudio.engine import Pipeline, choose_dtype

        self.pipe = pipe or Pipeline.from_file(path, dtype=choose_dtype(args.precision))
        self.args = args
        self.tome = tome

    def __call__(self, seed: int) -> tuple[float, float]:
        from sdstudio.types import GenerationRequest

        a = self.args
        request = GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=a.steps, cfg_scale=7.0, seed=seed,
            width=a.size, height=a.size, batch_size=a.batch, token_merging_ratio=self.tome,
            ngms=0.0,  # CFG at every step, as diffusers runs it (the toy model's default skips the last ones)
        )  # fmt: skip
        clock = _StepClock()
        self.pipe(request, callback=lambda step: clock.step(step.x))
        return clock.result("sdstudio")


class Diffusers:
    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        from tests.reference import DiffusersTxt2Img

        self.run = DiffusersTxt2Img(path, PROMPT, NEGATIVE)
        self.args = args

    def __call__(self, seed: int) -> tuple[float, float]:
        a = self.args
        clock = _StepClock()
        self.run(a.size, a.batch, a.steps, seed, on_step=clock.step)
        return clock.result("diffusers")


def _checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    from tests.reference import write_random_checkpoint

    return write_random_checkpoint(args.arch, tmp / f"{args.arch}.safetensors")


def _summary(times: list[tuple[float, float]], batch: int) -> dict[str, object]:
    request = statistics.median(t for t, _ in times)
    return {
        "seconds_per_request": round(request, 3),
        "seconds_per_image": round(request / batch, 3),
        "seconds_per_step": round(statistics.median(s for _, s in times), 4),
        "all_seconds": [round(t, 3) for t, _ in times],
    }


def _answer(setup: Callable, args: tuple, conn: Connection) -> None:
    """A worker process: ``setup(*args)`` gives a greeting and a handler; the greeting is sent, then each
    message's answer until the handler has answered ``None``. A failure is sent back as its traceback."""
    try:
        greeting, handle = setup(*args)
        conn.send(("ok", greeting))
        while True:
            message = conn.recv()
            conn.send(("ok", handle(message)))
            if message is None:
                return
    except EOFError:  # the parent is gone
        return
    except BaseException:  # noqa: BLE001 -- anything, SystemExit on inf/NaN included, goes back to the parent
        conn.send(("error", traceback.format_exc()))


class Worker:
    """``setup(*args)`` run in a spawned process of its own (its own allocator settings); ``ask`` sends it a
    message and returns the answer, or raises SystemExit with the worker's traceback, or when it died."""

    def __init__(self, name: str, setup: Callable, *args: object) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_answer, args=(setup, args, child), name=name, daemon=True)
        self.proc.start()
        child.close()  # so a dead worker reads as end of file here, not as a wait forever

    def receive(self) -> Any:
        ready = wait([self.conn, self.proc.sentinel])
        if self.conn in ready:
            try:
                status, value = self.conn.recv()
            except EOFError:
                status, value = "error", "it closed its pipe"
        else:
            status, value = "error", f"it ended with exit code {self.proc.exitcode}"
        if status != "ok":
            raise SystemExit(f"{self.name} worker: {value}")
        return value

    def ask(self, message: object) -> Any:
        self.conn.send(message)
        return self.receive()

    def close(self) -> None:
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def _set_heap(tool: str, args: argparse.Namespace) -> bool:
    """The tool's process keeps freed memory as ``sdstudio generate`` does: ours always, diffusers' when
    asked. True when the setting took effect."""
    from sdstudio.host_memory import keep_freed_memory

    return keep_freed_memory() if tool == "ours" or args.diffusers_keeps_freed_memory else False


def _tool(sides: tuple[str, ...], path: Path, args: argparse.Namespace) -> tuple[bool, Callable]:
    """One tool's worker: its runners; answers ``(side, seed)`` with ``(seconds, seconds per step)`` and
    ``None`` with its peak RSS in MiB."""
    kept = _set_heap(sides[0], args)
    runners: dict[str, Ours | Diffusers] = {}
    if sides[0] == "ours":
        runners["ours"] = Ours(path, args)
        if "ours_tome" in sides:
            runners["ours_tome"] = Ours(path, args, args.tome, runners["ours"].pipe)
    else:
        runners["diffusers"] = Diffusers(path, args)

    def handle(message: tuple[str, int] | None) -> object:
        if message is None:
            return round(_rss_mib())
        side, seed = message
        return runners[side](seed)

    return kept, handle


def _alternate(path: Path, args: argparse.Namespace, result: dict[str, object]) -> None:
    ours = ("ours", "ours_tome") if args.tome else ("ours",)
    tools = {"ours": Worker("sdstudio", _tool, ours, path, args)}
    try:
        tools["diffusers"] = Worker("diffusers", _tool, ("diffusers",), path, args)
        kept = {name: tool.receive() for name, tool in tools.items()}  # both loaded
        workers = {side: tools["ours"] for side in ours} | {"diffusers": tools["diffusers"]}
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in workers}
        for _ in range(args.warmups):
            for side, worker in workers.items():
                worker.ask((side, 0))
        for i in range(args.runs):
            for side, worker in workers.items():  # alternating, so drifts hit both sides
                times[side].append(tuple(worker.ask((side, i + 1))))  # type: ignore[arg-type]
        for side in workers:
            result[side] = _summary(times[side], args.batch)
        for name, tool in tools.items():
            result[name]["peak_rss_mib"] = tool.ask(None)  # type: ignore[index]
            result[name]["heap_keeps_freed_memory"] = kept[name]  # type: ignore[index]
    finally:
        for tool in tools.values():
            tool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15", help="random-weight preset (default sd15)")
    parser.add_argument("--model", help="a checkpoint file instead of random weights")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side")
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs per side first")
    parser.add_argument("--precision", default="auto", help="sdstudio's precision (diffusers stays fp32)")
    parser.add_argument("--only", choices=("ours", "diffusers"), help="one side alone: peak RSS, cold start")
    parser.add_argument(
        "--tome",
        type=float,
        default=0.0,
        help="also time sdstudio with token merging at this ratio (a third side)",
    )
    parser.add_argument(
        "--diffusers-keeps-freed-memory",
        action="store_true",
        help="give diffusers' process sdstudio's heap setting too (sdstudio.host_memory)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    result: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "arch": args.model or args.arch,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "sampler": "Euler, CFG 7",
        "runs": args.runs,
        "warmups": args.warmups,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(args, Path(tmp))
        made = time.perf_counter()
        if args.only:
            _set_heap(args.only, args)
            runner = {"ours": Ours, "diffusers": Diffusers}[args.only](path, args)
            first = runner(0)
            result[args.only] = {
                "cold_start_seconds": round(time.perf_counter() - made, 3),  # load + first image
                "first_image_seconds": round(first[0], 3),
                "peak_rss_mib": round(_rss_mib()),
            }
        else:
            _alternate(path, args, result)
            ours, theirs = result["ours"], result["diffusers"]
            result["speedup_per_image"] = round(theirs["seconds_per_image"] / ours["seconds_per_image"], 3)  # type: ignore[index]
            result["speedup_per_step"] = round(theirs["seconds_per_step"] / ours["seconds_per_step"], 3)  # type: ignore[index]
            if args.tome:
                result["tome_ratio"] = args.tome
                result["speedup_per_image_with_tome"] = round(
                    theirs["seconds_per_image"] / result["ours_tome"]["seconds_per_image"],
                    3,  # type: ignore[index]
                )
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
