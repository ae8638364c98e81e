"""The precision policy's quality guard on a full-size architecture (issue 6): the same request in fp32
and at the automatic precision (bf16 on CPUs with native bf16: sliced attention, channels-last, bf16
VAE), PSNR of the images and relative error of the final latents.

    python benchmarks/quality_guard.py --arch sd15 --size 256
    python benchmarks/quality_guard.py --arch sd15 --size 512 --precision bf16

Random weights (fan-in scaled, ``tests.reference.write_random_checkpoint``), Euler, CFG 7, 20 steps.
The toy model's guard is a test (``tests/test_engine.py``); this one is too slow for the suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16"))
    args = parser.parse_args(argv)

    from sdstudio.engine import Pipeline, choose_dtype
    from sdstudio.toyworld.evaluate import psnr
    from sdstudio.types import GenerationRequest
    from tests.reference import write_random_checkpoint

    dtype = choose_dtype(args.precision)
    if dtype == torch.float32:
        raise SystemExit(
            "--precision auto means fp32 on this CPU (no native bf16): nothing to compare; pass --precision bf16"
        )
    request = GenerationRequest(
        prompt="a photo of a red fox in the snow, detailed", negative_prompt="blurry", sampler="Euler",
        steps=args.steps, cfg_scale=7.0, seed=1, width=args.size, height=args.size,
    )  # fmt: skip
    images, latents, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(args.arch, Path(tmp) / f"{args.arch}.safetensors")
        for name, d in (("fp32", torch.float32), (str(dtype).removeprefix("torch."), dtype)):
            pipe = Pipeline.from_file(path, dtype=d)
            t0 = time.perf_counter()
            # the last step's x0 estimate: the final latents (Euler's last step goes to sigma 0)
            result = pipe(request, callback=lambda step, n=name: latents.__setitem__(n, step.denoised.float()))
            seconds[name] = round(time.perf_counter() - t0, 1)
            images[name] = np.asarray(result.images[0].image.convert("RGB"), dtype=np.float64)
            del pipe
    a, b = images.values()
    la, lb = latents.values()
    print(json.dumps({
        "arch": args.arch, "size": args.size, "steps": args.steps, "compared": list(images),
        "image_psnr_db": round(psnr(a, b), 1),
        "image_std": round(float(a.std()), 1),
        "final_latents_relative_l2": round(float((la - lb).norm() / la.norm()), 4),
        "seconds": seconds,
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
