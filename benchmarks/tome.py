"""Token merging (``--tome RATIO``): what it saves and what it costs (issue 6).

    python benchmarks/tome.py                        # sd15 UNet step at 512x512 + toy model quality
    python benchmarks/tome.py --latent 32 --runs 3   # at 256x256

Speed: one CFG step (batch 2) of a random-weight sd15 UNet at the automatic precision, median seconds
per ratio, and how far its output moves from the exact step (relative L2). Quality, where it can be
judged: the embedded toy model (its full-resolution maps are 8x8 tokens) generates the seen one-object
and two-object prompt sets of ``sdstudio eval toyworld`` (Euler a, CFG 7, 20 steps) with and without
merging; the judge scores every image, and PSNR compares each image with its exact twin (same seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: random_unet, cfg_inputs

RATIOS = (0.0, 0.3, 0.5)


def unet_speed(latent: int, runs: int) -> dict[str, dict[str, float]]:
    from sdstudio.engine import choose_dtype, prefer_channels_last
    from sdstudio.models.configs import PRESETS
    from tests.reference import cfg_inputs, random_unet

    dtype = choose_dtype("auto")
    config = PRESETS["sd15"].unet
    # randomised weights: with LDM's zero-init every output is 0 and the error meaningless
    unet = random_unet(config).to(dtype)
    if prefer_channels_last(dtype):
        unet.to(memory_format=torch.channels_last)
    x, t, context = cfg_inputs(config, latent, dtype)
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        exact = unet(x, t, context).float()
        for ratio in RATIOS:
            y = unet(x, t, context, token_merging=ratio).float()  # also the warm-up
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                unet(x, t, context, token_merging=ratio)
                times.append(time.perf_counter() - t0)
            out[f"{ratio:g}"] = {
                "seconds_per_cfg_step": round(statistics.median(times), 3),
                "relative_l2_to_exact": round(float((y - exact).norm() / exact.norm()), 4),
            }
    return out


def toy_quality(prompts_per_set: int, images_per_prompt: int) -> dict[str, dict[str, float]]:
    from sdstudio.engine import Pipeline
    from sdstudio.toyworld.evaluate import SHIPPED_MODEL, adherence, prompt_sets, psnr
    from sdstudio.toyworld.judge import score
    from sdstudio.types import GenerationRequest

    pipe = Pipeline.from_file(SHIPPED_MODEL)
    sets = prompt_sets(0, prompts_per_set, ("seen", "two"))
    images: dict[float, dict[str, list[np.ndarray]]] = {}
    out: dict[str, dict[str, float]] = {}
    for ratio in (0.0, 0.5):
        images[ratio] = {}
        for name, prompts in sets.items():
            batch = []
            scores = []
            for p in prompts:
                request = GenerationRequest(
                    prompt=p.text, sampler="Euler a", steps=20, cfg_scale=7.0, seed=p.seed, width=64, height=64,
                    batch_size=images_per_prompt, token_merging_ratio=ratio,
                )  # fmt: skip
                generated = [np.asarray(g.image.convert("RGB")) for g in pipe(request).images]
                batch += generated
                scores += [score(img, p.description) for img in generated]
            images[ratio][name] = batch
            row = adherence(scores, name == "two")
            key = "both_right" if name == "two" else "all"
            out.setdefault(f"{ratio:g}", {})[f"{name}_{key}"] = round(float(row[key]), 3)
    for name in sets:
        pairs = zip(images[0.0][name], images[0.5][name])
        out["0.5"][f"{name}_psnr_db_to_exact"] = round(statistics.median(psnr(a, b) for a, b in pairs), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent side of the sd15 step (image side / 8)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="toy prompts per set")
    parser.add_argument("--images", type=int, default=2, help="toy images per prompt")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = {
        "torch_threads": torch.get_num_threads(),
        "sd15_step": {"image_side": args.latent * 8, "by_ratio": unet_speed(args.latent, args.runs)},
        "toy_model": {"prompts_per_set": args.prompts, "images_per_prompt": args.images,
                      "by_ratio": toy_quality(args.prompts, args.images)},
    }  # fmt: skip
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
