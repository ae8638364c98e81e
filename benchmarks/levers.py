"""Speed levers, each on its own (issue 6): one UNet forward of a random-weight preset, timed with and
without each lever, everything else equal.

    python benchmarks/levers.py --arch sd15 --latent 32 --runs 3     # 256x256 images
    python benchmarks/levers.py --arch sd15 --latent 64 --runs 2     # 512x512 images

Levers: batched CFG (one batch-2 call against two batch-1 calls), channels-last memory format,
scaled-dot-product attention's fused kernel against its plain math backend (what a hand-written
softmax(QK^T)V costs). Median seconds per variant; the ratio is against the default path
(SDPA fused kernel, contiguous NCHW, batched CFG), which is what sdstudio runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    from sdstudio.models.configs import PRESETS
    from sdstudio.models.stablediffusion import random_model

    config = PRESETS[args.arch]
    unet = random_model(config, seed=0).model.diffusion_model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.unet.in_channels, args.latent, args.latent, generator=gen)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, config.unet.context_dim, generator=gen)

    def batched() -> None:
        unet(x, t, context)

    def separate() -> None:
        unet(x[:1], t[:1], context[:1])
        unet(x[1:], t[1:], context[1:])

    def timed(fn, setup=contextlib.nullcontext) -> float:
        times = []
        with torch.inference_mode(), setup():
            fn()  # warm-up
            for _ in range(args.runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    results = {"default (SDPA fused, NCHW, batched CFG)": timed(batched)}
    results["two calls instead of batched CFG"] = timed(separate)
    results["SDPA math backend"] = timed(batched, lambda: sdpa_kernel(SDPBackend.MATH))
    unet.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    results["channels-last"] = timed(batched)
    base = results["default (SDPA fused, NCHW, batched CFG)"]
    print(json.dumps({
        "arch": args.arch, "image_side": args.latent * 8, "torch_threads": torch.get_num_threads(),
        "seconds_per_cfg_step": {k: round(v, 3) for k, v in results.items()},
        "relative_to_default": {k: round(v / base, 3) for k, v in results.items()},
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
