"""``lora extract``'s SVDs on weights of a real architecture's shapes: time and captured energy per block kind.

    python benchmarks/lora_extract.py                          # sd15, kohya's default targets, rank 32
    python benchmarks/lora_extract.py --conv-rank 16 --limit 40 --noise 0.05 --device cuda

No checkpoint is read: the targets are those ``kohya_modules`` gives for the architecture (its model built
on the meta device), each difference a random matrix of rank ``--true-rank`` (default: ``--rank``) plus
``--noise`` times a random full-rank one of the same norm, factored by ``sdstudio.adapters.bake.low_rank``
as ``extract`` factors it (fp16 factors, energy measured on them). With no noise the captured fraction is
1 up to the fp16 rounding of the factors; with noise it is about ``1 / (1 + noise^2)`` times what the
rank keeps of the noise. ``--limit N``: N targets evenly spread over the list (the times of the rest
scale with their shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdstudio.adapters.bake import kohya_modules, low_rank
from sdstudio.adapters.keys import key_table
from sdstudio.models.configs import preset
from sdstudio.models.stablediffusion import StableDiffusion


def difference(shape: tuple[int, ...], rank: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    out, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
    low = torch.randn(out, rank, generator=gen) @ torch.randn(
        rank, fan_in, generator=gen
    )  # [out, in * k * k]
    low *= 1e-3 / low.norm() * (out * fan_in) ** 0.5  # elements about 1e-3, as a fine-tune's
    if noise:
        full = torch.randn(out, fan_in, generator=gen)
        low += full * (noise * low.norm() / full.norm())
    return low.reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--conv-rank", type=int)
    parser.add_argument("--true-rank", type=int)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.device("meta"):
        model = StableDiffusion(preset(args.arch))
    blocks = {"transformer", "text"} | ({"resnet", "sampler"} if args.conv_rank else set())
    modules = [m for m in kohya_modules(key_table(model)) if m.block in blocks]
    if args.limit and args.limit < len(modules):
        step = len(modules) / args.limit
        modules = [modules[int(i * step)] for i in range(args.limit)]
    gen = torch.Generator().manual_seed(0)
    totals: dict[str, list[float]] = {}  # block -> [seconds, difference, residual, count]
    for module in modules:
        rank = args.conv_rank if module.convolution and args.conv_rank else args.rank
        delta = difference(module.target.shape, args.true_rank or rank, args.noise, gen).to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        factors = low_rank(delta, rank)
        seconds = time.perf_counter() - started
        entry = totals.setdefault(module.block, [0.0, 0.0, 0.0, 0])
        entry[0] += seconds
        entry[1] += factors.difference
        entry[2] += factors.residual
        entry[3] += 1
    print(f"{args.arch}, rank {args.rank}, conv rank {args.conv_rank}, true rank {args.true_rank or 'rank'}, "
          f"noise {args.noise}, {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'block':<12}{'modules':>8}{'seconds':>10}{'captured %':>14}")
    for block, (seconds, diff, residual, count) in totals.items():
        print(f"{block:<12}{count:>8}{seconds:>10.2f}{100 * (1 - residual / diff):>14.5f}")
    seconds = sum(v[0] for v in totals.values())
    captured = 1 - sum(v[2] for v in totals.values()) / sum(v[1] for v in totals.values())
    print(f"{'all':<12}{len(modules):>8}{seconds:>10.2f}{100 * captured:>14.5f}")


if __name__ == "__main__":
    main()
