"""The issue's LoRA parity at sd15's full size: the same random kohya LoRA (LoCon on every convolution, per-module
alphas, text multiplier 0.7, UNet 1.3) applied by diffusers' ``load_lora_weights`` + ``fuse_lora`` and by sdstudio
to the same random sd15 checkpoint, DDIM 10 steps, CFG 7, fp32: PSNR of the two images (target >= 40 dB), of
ours with and without the LoRA (it must change the image), and of a deliberately broken LoRA (one module's alpha
x1.25) against diffusers' (must fall below the parity figure). The test suite runs the same code on the tiny
preset (``tests/adapters/test_diffusers_parity.py``); this is its full-width run, too slow and big for the suite
(two sd15 models in fp32, about 8 GB).

Run from the repository root: ``python benchmarks/lora_parity.py [--arch sd15] [--size 64]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.adapters.test_diffusers_parity import build, ddim_psnr, variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (the UNet runs at all widths)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        setup = build(args.arch, Path(folder))
        print(f"{args.arch}: built both models and fused the LoRA in {time.perf_counter() - started:.0f} s")
        to_theirs, to_plain = ddim_psnr(setup, args.size)
        print(f"ours vs diffusers, with the LoRA: {to_theirs:.1f} dB (target >= 40)")
        print(f"ours with vs without the LoRA: {to_plain:.1f} dB (the LoRA changes the image)")
        broken = dataclasses.replace(setup, kohya=variant(setup.kohya, "wrong-alpha"))
        print(f"one module's alpha x1.25, vs diffusers: {ddim_psnr(broken, args.size)[0]:.1f} dB")


if __name__ == "__main__":
    main()
