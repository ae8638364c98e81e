"""sdstudio against diffusers' StableDiffusionPipeline on the same weights, in one process, alternating
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
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
        "--tome", type=float, default=0.0, help="also time sdstudio with token merging at this ratio (a third side)"
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
        sides = {"ours": Ours, "diffusers": Diffusers}
        if args.only:
            runner = sides[args.only](path, args)
            first = runner(0)
            result[args.only] = {
                "cold_start_seconds": round(time.perf_counter() - made, 3),  # load + first image
                "first_image_seconds": round(first[0], 3),
                "peak_rss_mib": round(_rss_mib()),
            }
        else:
            runners = {name: cls(path, args) for name, cls in sides.items()}
            if args.tome:
                runners["ours_tome"] = Ours(path, args, args.tome, runners["ours"].pipe)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
            for _ in range(args.warmups):
                for run in runners.values():
                    run(0)
            for i in range(args.runs):
                for name, run in runners.items():  # alternating, so drifts hit both sides
                    times[name].append(run(i + 1))
            for name in runners:
                result[name] = _summary(times[name], args.batch)
            ratio = result["diffusers"]["seconds_per_image"] / result["ours"]["seconds_per_image"]  # type: ignore[index]
            result["speedup_per_image"] = round(ratio, 3)
            result["speedup_per_step"] = round(
                result["diffusers"]["seconds_per_step"] / result["ours"]["seconds_per_step"],
                3,  # type: ignore[index]
            )
            if args.tome:
                result["tome_ratio"] = args.tome
                result["speedup_per_image_with_tome"] = round(
                    result["diffusers"]["seconds_per_image"] / result["ours_tome"]["seconds_per_image"], 3  # type: ignore[index]
                )
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
