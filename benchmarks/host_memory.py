"""The host-memory lever alone (issue 6): one UNet CFG step and one VAE decode of a random-weight preset
(loaded as ``sdstudio generate`` loads it), timed in two fresh processes, alternating, with glibc's default heap and with freed blocks kept
(``sdstudio.host_memory.keep_freed_memory``, what the CLI sets); page faults counted per call.

    python benchmarks/host_memory.py --arch sd15 --latent 64 --runs 3     # 512x512, auto dtype (bf16 here)
    python benchmarks/host_memory.py --arch sd15 --latent 64 --request    # and a whole 20-step request

A setting of the whole process cannot be undone inside it (glibc's dynamic mmap threshold stays off
once set), so each side is its own process. Medians in seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference, benchmarks.vs_diffusers


JOBS = ("unet_cfg_step", "vae_decode", "request")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _side(keep: bool, args: argparse.Namespace) -> tuple[bool, Callable]:
    """A worker: the checkpoint loaded as ``sdstudio generate`` loads it, its jobs warm; answers a job's name
    with (seconds, page faults) and ``None`` with its peak RSS in MiB."""
    import torch

    from sdstudio.engine import Pipeline, choose_dtype, prefer_channels_last
    from sdstudio.host_memory import keep_freed_memory
    from sdstudio.types import GenerationRequest
    from tests.reference import cfg_inputs

    kept = keep_freed_memory() if keep else False
    dtype = choose_dtype(args.precision)
    pipe = Pipeline.from_file(args.checkpoint, dtype=dtype)
    unet, vae = pipe.model.model.unet, pipe.model.model.vae
    fmt = torch.channels_last if prefer_channels_last(dtype) else torch.contiguous_format  # as from_file
    x, t, context = cfg_inputs(pipe.model.config.unet, args.latent, dtype)
    x = x.contiguous(memory_format=fmt)
    z = x[:1].contiguous(memory_format=fmt)
    jobs = {"unet_cfg_step": lambda: unet(x, t, context), "vae_decode": lambda: vae.decode(z)}
    if args.request:
        side = args.latent * 8
        request = GenerationRequest(
            prompt="a photo of a red fox in the snow, detailed", negative_prompt="blurry", sampler="Euler",
            steps=args.steps, cfg_scale=7.0, seed=1, width=side, height=side, ngms=0.0,
        )  # fmt: skip
        jobs["request"] = lambda: pipe(request)
    with torch.inference_mode():
        for job in jobs.values():
            job()  # warm-up

    def handle(name: str | None) -> object:
        if name is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        with torch.inference_mode():
            f0, t0 = _faults(), time.perf_counter()
            jobs[name]()
            return time.perf_counter() - t0, _faults() - f0

    return kept, handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument(
        "--request",
        action="store_true",
        help="also a whole txt2img request (Euler, CFG 7, --steps) of the preset",
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    from tests.reference import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint = str(write_random_checkpoint(args.arch, Path(tmp) / f"{args.arch}.safetensors"))
        result = _compare(args)
    print(json.dumps(result, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> dict[str, object]:
    from benchmarks.vs_diffusers import Worker

    sides = {"glibc default": False, "freed memory kept": True}
    workers: dict[str, Worker] = {}
    took: dict[str, bool] = {}
    result: dict[str, object] = {
        "arch": args.arch,
        "image_side": args.latent * 8,
        "precision": args.precision,
    }
    try:
        for name, keep in sides.items():  # one at a time: building and warming up is not what is compared
            workers[name] = Worker(name, _side, keep, args)
            took[name] = workers[name].receive()
        times: dict[str, dict[str, list[tuple[float, int]]]] = {side: {} for side in sides}
        for _ in range(args.runs):
            for job in JOBS[: 3 if args.request else 2]:
                for side, worker in workers.items():  # alternating, so drifts hit both sides
                    times[side].setdefault(job, []).append(worker.ask(job))
        for side, worker in workers.items():
            result[side] = {
                "setting_took_effect": took[side],
                **{
                    job: {
                        "seconds": round(statistics.median(s for s, _ in runs), 3),
                        "page_faults": statistics.median(f for _, f in runs),
                    }
                    for job, runs in times[side].items()
                },
                "peak_rss_mib": worker.ask(None),
            }
    finally:
        for worker in workers.values():
            worker.close()
    default, kept = result["glibc default"], result["freed memory kept"]
    result["speedup"] = {
        job: round(default[job]["seconds"] / kept[job]["seconds"], 3)  # type: ignore[index]
        for job in times["glibc default"]
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
