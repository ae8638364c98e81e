"""The precision policy's quality guard on a full-size architecture (issue 6): the same request in fp32
and at the automatic precision (bf16 on CPUs with native bf16: the attention policy of
``sdstudio.models.attention``, channels-last, bf16 VAE), PSNR of the images and relative error of the final latents.

    python benchmarks/quality_guard.py --arch sd15 --size 256
    python benchmarks/quality_guard.py --arch sd15 --size 512 --precision bf16
    python benchmarks/quality_guard.py --arch sd15 --size 512 --tome 0.5

With ``--tome RATIO`` both sides use token merging (the guard: precision alone) and a third run, exact
fp32 without it, gives what the fast path (bf16 + ToMe) costs in all against the exact image.

Random weights (fan-in scaled, ``tests.reference.write_random_checkpoint``), Euler, CFG 7, 20 steps.
The toy model's guard is a test (``tests/test_engine.py``); this one is too slow for the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--tome", type=float, default=0.0, help="token merging ratio on both sides")
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
        token_merging_ratio=args.tome,
    )  # fmt: skip
    runs = [("fp32", torch.float32, request), (str(dtype).removeprefix("torch."), dtype, request)]
    if args.tome:
        runs = [(f"{name} tome {args.tome:g}", d, r) for name, d, r in runs]
        runs.append(("fp32 exact", torch.float32, dataclasses.replace(request, token_merging_ratio=0.0)))
    images, latents, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(args.arch, Path(tmp) / f"{args.arch}.safetensors")
        for name, d, req in runs:
            pipe = Pipeline.from_file(path, dtype=d)
            t0 = time.perf_counter()
            # the last step's x0 estimate: the final latents (Euler's last step goes to sigma 0)
            result = pipe(req, callback=lambda step, n=name: latents.__setitem__(n, step.denoised.float()))
            seconds[name] = round(time.perf_counter() - t0, 1)
            images[name] = np.asarray(result.images[0].image.convert("RGB"), dtype=np.float64)
            del pipe
    names = list(images)
    a, b = images[names[0]], images[names[1]]
    la, lb = latents[names[0]], latents[names[1]]
    out = {
        "arch": args.arch, "size": args.size, "steps": args.steps, "compared": names[:2],
        "image_psnr_db": round(psnr(a, b), 1),
        "image_std": round(float(a.std()), 1),
        "final_latents_relative_l2": round(float((la - lb).norm() / la.norm()), 4),
        "seconds": seconds,
    }  # fmt: skip
    if args.tome:  # the fast path (bf16 + ToMe) against the exact fp32 image
        exact, lexact = images["fp32 exact"], latents["fp32 exact"]
        out["fast_vs_exact"] = {
            "compared": [names[1], "fp32 exact"],
            "image_psnr_db": round(psnr(b, exact), 1),
            "final_latents_relative_l2": round(float((lb - lexact).norm() / lexact.norm()), 4),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
