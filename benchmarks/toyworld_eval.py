"""Evaluate a toyworld model: prompt adherence per sampler, CFG and prompt set, FID on the toy image
encoder's features, and VAE reconstruction PSNR. Writes the results as JSON and prints the table.

    python benchmarks/toyworld_eval.py                       # the shipped model, default settings (~minutes)
    python benchmarks/toyworld_eval.py runs/toyworld/toyworld.safetensors --quick
    python benchmarks/toyworld_eval.py --sampler "Euler a" --cfg 7 --prompt "a red circle on the left"
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sdstudio.toyworld.evaluate import SHIPPED_MODEL, EvalSettings, evaluate, format_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", nargs="?", default=str(SHIPPED_MODEL), help="checkpoint (default: the shipped model)"
    )
    parser.add_argument("--image-encoder", default=None, help="default: the one beside the model")
    parser.add_argument("--quick", action="store_true", help="the quick preset: seconds, plumbing only")
    parser.add_argument("--sampler", action="append", dest="samplers", help="repeatable; default: 4 samplers")
    parser.add_argument(
        "--cfg", action="append", type=float, dest="cfgs", help="repeatable; default: 1, 3, 7"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--prompts-per-set", type=int)
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ngms", type=float, help="negative guidance minimum sigma (default: the model's; 0: off)")
    parser.add_argument(
        "--ngms-all-steps", action=argparse.BooleanOptionalAction, help="default: the model's"
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="extra prompt to generate and judge; repeatable"
    )
    parser.add_argument("--out", default="toyworld_eval.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    results = evaluate(
        args.model,
        EvalSettings.quick() if args.quick else EvalSettings(),
        cfgs=args.cfgs,
        samplers=args.samplers,
        steps=args.steps,
        prompts_per_set=args.prompts_per_set,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        ngms=args.ngms,
        ngms_all_steps=args.ngms_all_steps,
        image_encoder_path=args.image_encoder,
        extra_prompts=args.prompt,
    )
    Path(args.out).write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    print(format_table(results))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
