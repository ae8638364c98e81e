"""How well the captioner reads toy-world renders back (issue 25): per-attribute accuracy.

    python benchmarks/toy_caption.py                       # 500 one-object scenes, the shipped pair
    python benchmarks/toy_caption.py --objects 2 --n 200   # two-object scenes
    python benchmarks/toy_caption.py --pair runs/x/clip_pair.safetensors --mode fast

Scenes are drawn with ``world.sample_scene(rng, "any", objects)`` (held-out colour-shape pairs
included) and rendered; ``sdstudio caption``'s captioner (the toy CLIP pair, the world's grammar, no
weights given) captions them; ``clip_pair.caption_accuracy`` compares what it read with the scene.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--objects", type=int, default=1, choices=(1, 2))
    ap.add_argument("--mode", default="best", choices=("fast", "classic", "best"))
    ap.add_argument("--pair", help="the toy CLIP pair's image side (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import numpy as np

    from sdstudio.eval.captions import CaptionerSpec, load_captioner
    from sdstudio.toyworld import world
    from sdstudio.toyworld.clip_pair import caption_accuracy

    captioner = load_captioner(CaptionerSpec(toy_pair=args.pair))
    rng = np.random.default_rng(args.seed)
    scenes = [world.sample_scene(rng, "any", args.objects) for _ in range(args.n)]
    images = [world.render(s) for s in scenes]
    t0 = time.perf_counter()
    captioner.caption(images[:1], args.mode)  # the grammar's one-object sentences encoded once
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    captions = [
        c for i in range(0, len(images), 50) for c in captioner.caption(images[i : i + 50], args.mode)
    ]
    per_image = (time.perf_counter() - t0) / len(images)
    acc = caption_accuracy(scenes, [c.values for c in captions])
    result = {"n": args.n, "objects": args.objects, "mode": args.mode, "accuracy": acc,
              "seconds_per_image": per_image, "first_call_seconds": warm,
              "examples": [c.text for c in captions[:5]]}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
