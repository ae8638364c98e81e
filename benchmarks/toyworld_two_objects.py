"""Where two-object prompts go wrong (issue 3): the eval's "two" set, broken down.

    python benchmarks/toyworld_two_objects.py                       # the shipped model
    python benchmarks/toyworld_two_objects.py runs/x/toyworld.safetensors --prompts 64 --sampler Euler

Generates ``--images`` images for each of ``--prompts`` two-object prompts (drawn like the eval's "two"
set, with its own ``--seed``), judges them and prints:
- both right (every attribute of both objects and the relation), as the eval counts it;
- the relation per axis (left/right, above/below) and per caption kind (the relation alone, or with
  each object's position too), counted where the judge found both objects;
- per object: found, colour, shape, size, position; how often a wrong colour or shape is the other
  object's (attributes bound to the wrong object);
- the commonest shape confusions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

AXES = {"left of": "left/right", "right of": "left/right", "above": "above/below", "below": "above/below"}


def breakdown(
    model: Path, prompts: int, images: int, sampler: str, cfg: float, steps: int, seed: int,
    ngms: float | None = None,
) -> dict:
    from sdstudio.engine import Pipeline
    from sdstudio.toyworld import judge
    from sdstudio.toyworld.evaluate import _generate, prompt_sets

    pipe = Pipeline.from_file(model)
    relation_total: Counter[str] = Counter()
    relation_ok: Counter[str] = Counter()
    per_object: Counter[str] = Counter()
    confusions: Counter[str] = Counter()
    both_right = n = 0
    for p in prompt_sets(seed, prompts, ("two",))["two"]:
        want = p.description
        kind = f"{AXES[want.relation]}, {'with positions' if want.objects[0].position else 'relation only'}"
        for image in _generate(pipe, p.text, sampler, cfg, steps, p.seed, images, ngms):
            s = judge.score(image, want)
            n += 1
            both_right += all(o.all for o in s.per_object) and s.relation_ok
            if all(o.found for o in s.per_object):
                relation_total[kind] += 1
                relation_ok[kind] += s.relation_ok
            for i, (w, o) in enumerate(zip(want.objects, s.per_object)):
                other = want.objects[1 - i]
                per_object["objects"] += 1
                per_object["found"] += o.found
                if o.detected is None:
                    continue
                for attribute in ("colour", "shape", "size", "position"):
                    per_object[attribute] += getattr(o, attribute)
                per_object["wrong colour is the other's"] += (
                    not o.colour and o.detected.colour == other.colour
                )
                per_object["wrong shape is the other's"] += not o.shape and o.detected.shape == other.shape
                if not o.shape:
                    confusions[f"{w.size or ''} {w.shape} -> {o.detected.shape}".strip()] += 1
    sampling = pipe.model.config.sampling.overridden(ngms, None)
    return {
        "model": str(model),
        "settings": {
            "prompts": prompts, "images": images, "sampler": sampler, "cfg": cfg, "steps": steps,
            "ngms": sampling.ngms, "ngms_all_steps": sampling.ngms_all_steps,
        },
        "seed": seed,
        "images": n,
        "both_right": round(both_right / n, 3),
        "relation_where_both_found": {
            k: {
                "ok": relation_ok[k],
                "of": relation_total[k],
                "share": round(relation_ok[k] / relation_total[k], 3),
            }
            for k in sorted(relation_total)
        },
        "per_object": dict(per_object),
        "shape_confusions": dict(confusions.most_common(10)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="checkpoint (default: the shipped toy model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ngms", type=float, help="negative guidance minimum sigma (default: the model's; 0: off)")
    parser.add_argument("--seed", type=int, default=5, help="prompt set seed (the eval's tables use 0)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    from sdstudio.toyworld.evaluate import SHIPPED_MODEL

    start = time.perf_counter()
    result = breakdown(Path(args.model) if args.model else SHIPPED_MODEL, args.prompts, args.images,
                       args.sampler, args.cfg, args.steps, args.seed, args.ngms)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
