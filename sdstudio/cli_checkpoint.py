"""``sdstudio checkpoint merge`` and ``sdstudio checkpoint convert``: argparse -> ``sdstudio.models.merge``.

The library does the work and the checks (``SdStudioError`` / ``CheckpointError``, one line each); this module
only declares the options and prints where the result went.
"""

from __future__ import annotations

import argparse
import json

from sdstudio.errors import SdStudioError

_DTYPES = ("fp16", "bf16", "fp32")


def cmd_checkpoint_merge(args: argparse.Namespace) -> int:
    from sdstudio.models.merge import merge_checkpoints

    models = [args.a, args.b, *([args.c] if args.c else [])]
    if args.method == "add-difference" and not args.c:
        raise SdStudioError("--method add-difference needs three models: A B C (A + alpha * (B - C))")
    if args.method == "weighted-sum" and args.c:
        raise SdStudioError("--method weighted-sum merges two models (A B); C is for --method add-difference")
    report = merge_checkpoints(
        models,
        args.output,
        alpha=args.alpha,
        method=args.method,
        dtype=args.dtype,
        no_ema=args.no_ema,
        bake_vae=args.bake_vae,
        overwrite=args.overwrite,
    )
    if args.json:
        print(report.recipe.to_json())
    print(report.path)
    return 0


def cmd_checkpoint_convert(args: argparse.Namespace) -> int:
    from sdstudio.models.merge import convert_checkpoint

    ema = "use" if args.ema else "drop" if args.no_ema else "keep"
    report = convert_checkpoint(
        args.input,
        args.output,
        dtype=args.dtype,
        ema=ema,
        prediction=args.prediction,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps({"written": report.written, "dropped": len(report.dropped), "kind": report.kind}))
    print(report.path)
    return 0


def add_checkpoint_commands(checkpoint_sub: argparse._SubParsersAction) -> None:
    """Add ``merge`` and ``convert`` to the ``sdstudio checkpoint`` group (``build_parser`` in ``cli.py``)."""
    merge = checkpoint_sub.add_parser(
        "merge",
        help="merge checkpoints as AUTOMATIC1111's checkpoint merger does",
        description=(
            "weighted-sum: (1 - alpha) * A + alpha * B; add-difference: A + alpha * (B - C). Streams tensor by "
            "tensor (safetensors inputs are read lazily). An inpainting model merges with normal ones as model A."
        ),
    )
    merge.add_argument("a", metavar="A", help="model A (.safetensors, .ckpt or a diffusers folder)")
    merge.add_argument("b", metavar="B", help="model B")
    merge.add_argument("c", metavar="C", nargs="?", help="model C (add-difference only)")
    merge.add_argument("--method", choices=("weighted-sum", "add-difference"), default="weighted-sum")
    merge.add_argument("--alpha", type=float, required=True, metavar="M", help="A1111's multiplier M")
    merge.add_argument("--bake-vae", metavar="FILE", help="take the VAE weights from this VAE file")
    merge.add_argument("--dtype", choices=_DTYPES, help="cast every float tensor (default: as the inputs)")
    merge.add_argument("--no-ema", action="store_true", help="leave out the EMA weights (model_ema.*)")
    merge.add_argument(
        "-o", "--output", required=True, help="output .safetensors (or .ckpt, or a folder: diffusers)"
    )
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--json", action="store_true", help="also print the recipe written into the file")
    merge.set_defaults(func=cmd_checkpoint_merge)

    convert = checkpoint_sub.add_parser(
        "convert",
        help="convert between .ckpt, .safetensors and a diffusers folder",
        description=(
            "The output's name picks the format: .safetensors, .ckpt (.pt), or anything else for a diffusers "
            "folder. EMA weights: kept where the format can hold them, unless --no-ema (drop them: the trained "
            "weights, for fine-tuning) or --ema (write them as the UNet's weights, like the -emaonly releases)."
        ),
    )
    convert.add_argument("input", help=".safetensors, .ckpt or a diffusers folder")
    convert.add_argument(
        "-o", "--output", required=True, help="output .safetensors, .ckpt or folder (diffusers)"
    )
    convert.add_argument("--dtype", choices=_DTYPES, help="cast every float tensor (default: as stored)")
    ema = convert.add_mutually_exclusive_group()
    ema.add_argument("--no-ema", action="store_true", help="leave out the EMA weights (model_ema.*)")
    ema.add_argument(
        "--ema", action="store_true", help="use the EMA weights as the UNet's, then leave them out"
    )
    convert.add_argument(
        "--prediction",
        choices=("epsilon", "v"),
        help="what the UNet predicts, if the input cannot tell (default: stored, else detected)",
    )
    convert.add_argument("--overwrite", action="store_true")
    convert.add_argument("--json", action="store_true", help="also print counts as JSON")
    convert.set_defaults(func=cmd_checkpoint_convert)
