"""How far apart the toy text encoder keeps captions that differ in one thing (issue 3).

    python benchmarks/toyworld_text_probe.py                        # the shipped model
    python benchmarks/toyworld_text_probe.py runs/x/toyworld.safetensors --pairs 200

For ``--pairs`` random object pairs (or single objects), two captions are built that differ in one thing
only, and the distance between their pooled text embeddings (the EOS hidden state, what the contrastive
loss trains) is divided by the median distance between two random captions of the world. Printed per
probe, the mean of that ratio:

- ``above/below``, ``left/right``: "a A above a B" against "a A below a B" (and left of / right of);
- ``synonym``: "a A above a B" against "a A over a B", the floor: a distance the encoder should ignore;
- ``size seen`` / ``size held-out``: "a small C S" against "a large C S", for seen / held-out colour-shape
  pairs;
- ``shape seen`` / ``shape held-out``: "a C S" against "a C S'", S' another shape with (C, S') seen.

An encoder that gives a relation the same embedding as its opposite leaves the UNet nothing to follow:
the shipped model of commit c17e5af had ``above/below`` at 0.02, as close as synonyms.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def caption_pairs(pairs: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    import numpy as np

    from sdstudio.toyworld import world

    rng = np.random.default_rng(seed)
    seen, heldout = world._allowed_pairs("train"), world._allowed_pairs("heldout")

    def pick(options: list[tuple[str, str]]) -> tuple[str, str]:
        return options[int(rng.integers(len(options)))]

    def phrase(colour: str, shape: str, size: str = "") -> str:
        return world._article(f"{size} {colour} {shape}".strip())

    probes: dict[str, list[tuple[str, str]]] = {k: [] for k in (
        "above/below", "left/right", "synonym", "size seen", "size held-out", "shape seen", "shape held-out"
    )}  # fmt: skip
    for _ in range(pairs):
        a, b = phrase(*pick(seen)), phrase(*pick(seen))
        probes["above/below"].append((f"{a} above {b}", f"{a} below {b}"))
        probes["left/right"].append((f"{a} left of {b}", f"{a} right of {b}"))
        probes["synonym"].append((f"{a} above {b}", f"{a} over {b}"))
        for kind, options in (("seen", seen), ("held-out", heldout)):
            colour, shape = pick(options)
            probes[f"size {kind}"].append((phrase(colour, shape, "small"), phrase(colour, shape, "large")))
            others = [s for s in world.SHAPES if s != shape and (colour, s) not in world.HELDOUT_PAIRS]
            other = others[int(rng.integers(len(others)))]
            probes[f"shape {kind}"].append((phrase(colour, shape), phrase(colour, other)))
    return probes


def probe(model: Path, pairs: int, seed: int) -> dict[str, float]:
    import numpy as np
    import torch

    from sdstudio.models.loading import load_model
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.toyworld import world
    from sdstudio.toyworld.recipe import _tokens
    from sdstudio.training.contrastive import pooled_text

    loaded = load_model(model, dtype=torch.float32)
    tokenizer = ClipTokenizer()

    def embed(texts: list[str]) -> torch.Tensor:
        tokens = _tokens(texts, loaded.config, tokenizer)
        with torch.no_grad():
            return pooled_text(loaded.model.cond_stage_model(tokens, 1), tokens)

    rng = np.random.default_rng(seed + 1)
    scenes = [world.sample_scene(rng, "train", 1 + int(rng.random() < 0.5)) for _ in range(2 * pairs)]
    random = embed([world.caption(s, rng) for s in scenes])
    scale = float((random[:pairs] - random[pairs:]).norm(dim=1).median())
    result = {"random caption distance": round(scale, 3)}
    for name, texts in caption_pairs(pairs, seed).items():
        first, second = embed([t for t, _ in texts]), embed([t for _, t in texts])
        result[name] = round(float((first - second).norm(dim=1).mean()) / scale, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint (default: the shipped toy model)")
    parser.add_argument("--pairs", type=int, default=200, help="caption pairs per probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from sdstudio.toyworld.evaluate import SHIPPED_MODEL

    result = probe(Path(args.model) if args.model else SHIPPED_MODEL, args.pairs, args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
