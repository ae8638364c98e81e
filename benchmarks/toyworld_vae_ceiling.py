"""How much adherence the toy model's VAE allows: the judge on VAE reconstructions of rendered scenes
(issue 3). Generated images cannot score above what the VAE can reproduce.

    python benchmarks/toyworld_vae_ceiling.py                         # the shipped model's VAE
    python benchmarks/toyworld_vae_ceiling.py --model runs/x/toyworld.safetensors
    python benchmarks/toyworld_vae_ceiling.py --finetune-steps 300    # the VAE trained 300 steps more first
    python benchmarks/toyworld_vae_ceiling.py --scenes 0 --per-pair 12  # the colour-shape table only

Renders ``--scenes`` training-split scenes with one object and as many with two (fixed seed), encodes
them to the posterior mean, decodes, and prints per attribute how often the judge still finds what the
scene holds, the PSNR, and which (shape, size) the lost shapes were; then, for every colour-shape pair
(held-out pairs included, marked ``*``), how often the judge sees a small object of that pair rightly
(``--per-pair`` scenes each, one object, random position and background). ``--finetune-steps`` first continues
the recipe's VAE loss at its final learning rate (2e-4), batch 16: a probe of whether the VAE is
undertrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def finetune(vae: torch.nn.Module, steps: int, seed: int = 999) -> float:
    from sdstudio.toyworld.recipe import ToyRecipe, _finite_diff_l1, _images, _object_weights, _scenes

    recipe = ToyRecipe()
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-4, betas=recipe.vae.betas, weight_decay=recipe.vae.weight_decay)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        scenes = _scenes(rng, recipe.vae_batch, recipe.p_two_objects)
        x = _images(scenes)
        dist = vae.encode(x)
        recon = vae.decode(dist.sample(torch.randn(dist.mean.shape, generator=gen)))
        kl = 0.5 * (dist.mean.pow(2) + dist.logvar.exp() - 1 - dist.logvar).flatten(1).sum(1).mean()
        loss = (
            ((recon - x).pow(2) * _object_weights(scenes, x, recipe.object_weight, recipe.small_object_weight)).mean()
            + recipe.grad_weight * _finite_diff_l1(recon, x)
            + recipe.kl_weight * kl
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.vae.grad_clip)
        opt.step()
    vae.requires_grad_(False).eval()
    return time.perf_counter() - start


@torch.no_grad()
def round_trip(vae: torch.nn.Module, scenes: list, batch: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The scenes' renders ``x`` in [-1, 1], their VAE reconstructions from the posterior mean (clamped),
    and those as uint8 [N, 64, 64, 3] images for the judge."""
    from sdstudio.toyworld.recipe import _images

    x = _images(scenes)
    recon = torch.cat([vae.decode(vae.encode(b).mean).float() for b in x.split(batch)]).clamp(-1, 1)
    return x, recon, ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def ceiling(vae: torch.nn.Module, n_objects: int, scenes_n: int, seed: int = 123) -> dict[str, object]:
    from sdstudio.toyworld import judge, world

    rng = np.random.default_rng([seed, n_objects])
    scenes = [world.sample_scene(rng, "train", n_objects) for _ in range(scenes_n)]
    x, recon, images = round_trip(vae, scenes, batch=50)
    mse = ((recon - x) * 127.5).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    scores = [judge.score(im, s) for im, s in zip(images, scenes)]
    lost: Counter[str] = Counter()
    for scene, score in zip(scenes, scores):
        for obj, per_object in zip(scene.objects, score.per_object):
            if not per_object.shape:
                lost[f"{obj.size} {obj.shape}"] += 1
    out: dict[str, object] = {
        k: round(float(np.mean([getattr(s, k) for s in scores])), 3)
        for k in ("colour", "shape", "size", "position", "count_ok", "all")
    }
    out["psnr_db"] = round(float((10 * torch.log10(255**2 / mse)).mean()), 2)
    out["shapes_lost"] = dict(lost.most_common())
    return out


@torch.no_grad()
def small_pairs(vae: torch.nn.Module, per_pair: int, seed: int = 321) -> dict[str, dict[str, float]]:
    """colour -> shape -> share of small objects of that pair the judge sees rightly after the VAE."""
    from sdstudio.toyworld import judge, world

    rng = np.random.default_rng(seed)
    scenes = []
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for _ in range(per_pair):
                placed = world.sample_scene(rng, "any", 1)
                o = placed.objects[0]
                obj = world.ObjectSpec(shape, colour, "small", o.position, o.dx, o.dy, o.scale)
                scenes.append(world.Scene((obj,), placed.background, None))
    _, _, images = round_trip(vae, scenes, batch=96)
    table: dict[str, dict[str, float]] = {c: {} for c in world.COLOURS}
    for i in range(0, len(scenes), per_pair):
        obj = scenes[i].objects[0]
        seen = [judge.score(im, s).all for im, s in zip(images[i : i + per_pair], scenes[i : i + per_pair])]
        table[obj.colour][obj.shape] = round(float(np.mean(seen)), 3)
    return table


def format_pairs(table: dict[str, dict[str, float]]) -> str:
    from sdstudio.toyworld import world

    lines = ["small objects seen rightly after the VAE (* held-out pair)", " " * 8 + "".join(f"{s:>10}" for s in world.SHAPES)]
    for colour, row in table.items():
        cells = "".join(f"{row[s]:>9.2f}{'*' if (colour, s) in world.HELDOUT_PAIRS else ' '}" for s in world.SHAPES)
        lines.append(f"{colour:>8}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the shipped toy model)")
    parser.add_argument("--scenes", type=int, default=300, help="scenes per object count")
    parser.add_argument("--per-pair", type=int, default=12, help="small one-object scenes per colour-shape pair (0: no table)")
    parser.add_argument("--finetune-steps", type=int, default=0)
    args = parser.parse_args(argv)

    from sdstudio.models.loading import load_model
    from sdstudio.toyworld.evaluate import SHIPPED_MODEL

    path = Path(args.model) if args.model else SHIPPED_MODEL
    vae = load_model(path, dtype=torch.float32).model.first_stage_model.eval()
    result: dict[str, object] = {"model": str(path), "scenes_per_count": args.scenes}
    if args.finetune_steps:
        result["finetune_steps"] = args.finetune_steps
        result["finetune_seconds"] = round(finetune(vae, args.finetune_steps), 1)
    for n in (1, 2) if args.scenes > 0 else ():
        result[f"{n}_object"] = ceiling(vae, n, args.scenes)
    if args.per_pair > 0:
        result["small_pairs"] = small_pairs(vae, args.per_pair)
    print(json.dumps(result, indent=2))
    if args.per_pair > 0:
        print(format_pairs(result["small_pairs"]))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
