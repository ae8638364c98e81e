"""What a ControlNet adds to a sampling step (issue 26: under 35 % over the plain UNet).

    python benchmarks/controlnet_overhead.py                      # sd15, 512x512, CFG batch 2
    python benchmarks/controlnet_overhead.py --arch sdxl --size 1024 --steps 1
    python benchmarks/controlnet_overhead.py --units 2            # two ControlNets at once

One step = one UNet evaluation of a CFG pair (batch 2) at ``--size`` pixels, as a sampler step makes it;
with ``--units N`` the step also runs N ControlNets of the model's shape (random fan-in-scaled weights) on a
control image at the pixel size and adds their residuals, as the pipeline does (the hint encoder's output
made once, outside the steps). Both run in the precision
the pipeline would pick (bf16 where the CPU has it), channels-last where it prefers it, alternating plain and
controlled steps after one warm-up each; medians reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", help="sd15, sd2, sdxl, tiny, ...")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from sdstudio.engine import choose_dtype, prefer_channels_last
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.controlnet import ControlNet, ControlNetConfig
    from sdstudio.models.sdxl import SizeConditioning, size_vector
    from sdstudio.models.unet import UNetModel
    from tests.reference import randomise_

    config = PRESETS[args.arch]
    dtype = choose_dtype(args.precision)

    def build(module: type, *a: object) -> torch.nn.Module:
        with torch.device("meta"):
            net = module(*a)
        net.to_empty(device="cpu")
        randomise_(net, seed=0)
        net = net.to(dtype).eval()
        if prefer_channels_last(dtype):
            net.to(memory_format=torch.channels_last)
        return net

    unet = build(UNetModel, config.unet)
    nets = [build(ControlNet, ControlNetConfig(unet=config.unet)) for _ in range(args.units)]
    gen = torch.Generator().manual_seed(0)
    side = args.size // config.vae.downsample
    x = torch.randn(2, config.unet.in_channels, side, side, generator=gen).to(dtype)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, config.unet.context_dim, generator=gen).to(dtype)
    hint = torch.rand(1, 3, side * 8, side * 8, generator=gen).to(dtype)  # 8x the latents
    embeddings = [net.embed_hint(hint) for net in nets]  # once per pass, as the pipeline does
    y = None
    if config.unet.adm_in_channels:
        pooled = torch.randn(2, config.unet.adm_in_channels - 6 * 256, generator=gen)
        y = size_vector(pooled, SizeConditioning.of_image(args.size, args.size), False).to(dtype)

    def plain() -> None:
        unet(x, t, context, y=y)

    def controlled() -> None:
        residuals = None
        for net, embedding in zip(nets, embeddings):
            out = net(x, hint, t, context, y, hint_embedding=embedding)
            residuals = out if residuals is None else [a + b for a, b in zip(residuals, out)]
        unet(x, t, context, y=y, control=residuals)

    # when the UNet's middle block ends: its encoder and middle block are what a ControlNet repeats
    marks: dict[str, float] = {}
    unet.middle_block.register_forward_hook(lambda *_: marks.__setitem__("middle", time.perf_counter()))
    times: dict[str, list[float]] = {"plain": [], "controlled": [], "encoder": [], "controlnets": []}
    plain(), controlled()  # warm-ups
    for _ in range(args.steps):
        for name, call in (("plain", plain), ("controlled", controlled)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            if name == "plain":
                times["encoder"].append(marks["middle"] - start)
        start = time.perf_counter()
        for net, embedding in zip(nets, embeddings):
            net(x, hint, t, context, y, hint_embedding=embedding)
        times["controlnets"].append(time.perf_counter() - start)
    a, b = statistics.median(times["plain"]), statistics.median(times["controlled"])
    encoder, alone = statistics.median(times["encoder"]), statistics.median(times["controlnets"])
    print(
        f"{args.arch} {args.size}x{args.size} CFG batch 2, {str(dtype).removeprefix('torch.')}, "
        f"{platform.processor() or platform.machine()}: UNet {a:.3f} s/step, with {args.units} ControlNet(s) "
        f"{b:.3f} s/step: +{100 * (b / a - 1):.0f} %"
    )
    print(
        f"  the ControlNet(s) alone {alone:.3f} s ({100 * alone / a:.0f} % of the UNet); the UNet's own encoder and "
        f"middle block {encoder:.3f} s ({100 * encoder / a:.0f} %): what one ControlNet costs at the least"
    )
    print("  per step (plain / controlled / ControlNets alone): " + "; ".join(
        f"{p:.2f} / {c:.2f} / {n:.2f}" for p, c, n in zip(times["plain"], times["controlled"], times["controlnets"])))


if __name__ == "__main__":
    main()
