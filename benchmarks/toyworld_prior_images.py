"""The embedded model's own images as captioned class images for prior preservation (issue 22).

    python benchmarks/toyworld_prior_images.py OUT --n 128 --split any [--objects 1|2] [--seed 3]

Draws ``n`` scenes of the toy world (``world.sample_scene``: ``--split train`` never shows a held-out
colour-shape pair, ``heldout`` always does for the first object, ``any`` draws from every pair), captions
each with the world's captions, generates an image of each caption with the embedded model (Euler a, 20
steps, CFG 7: what `sdstudio generate` makes of it) and writes ``OUT/genNNNN.png`` with the caption in
``OUT/genNNNN.txt``: a folder `sdstudio train lora --class-data` takes, as DreamBooth's class images are the
model's own images of its class prompts, here over many prompts instead of one. The prompts are drawn from
their own stream (``--seed``), apart from the evaluation's prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--split", default="any", choices=("train", "heldout", "any"))
    ap.add_argument("--objects", type=int, default=1, choices=(1, 2))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--prefix", default="gen", help="file name prefix (several folders merged into one)")
    args = ap.parse_args()

    import numpy as np

    from sdstudio.models.loading import load_model
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.pipelines.generate import generate
    from sdstudio.toyworld import world
    from sdstudio.toyworld.evaluate import SHIPPED_MODEL
    from sdstudio.types import GenerationRequest

    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(SHIPPED_MODEL)
    tokenizer = ClipTokenizer()
    rng = np.random.default_rng([args.seed, 777])
    for i in range(args.n):
        scene = world.sample_scene(rng, args.split, args.objects)
        text = world.caption(scene, rng)
        request = GenerationRequest(
            prompt=text, sampler="Euler a", steps=20, cfg_scale=7.0, seed=int(rng.integers(0, 2**31))
        )
        image = generate(model, tokenizer, request).images[0].image
        image.save(args.out / f"{args.prefix}{i:04d}.png")
        (args.out / f"{args.prefix}{i:04d}.txt").write_text(text + "\n")
    print(f"{args.out}: {args.n} images of {args.split} prompts ({args.objects} object(s)), seed {args.seed}")


if __name__ == "__main__":
    main()
