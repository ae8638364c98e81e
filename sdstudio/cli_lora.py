"""``sdstudio lora bake`` and ``sdstudio lora extract``: arguments to :mod:`sdstudio.adapters.bake` and its
report to stdout (warnings go to the log, on stderr)."""

from __future__ import annotations

import argparse

from sdstudio.errors import SdStudioError

__all__ = ["add_lora_commands", "cmd_lora_bake", "cmd_lora_extract"]

_DTYPES = ("fp16", "bf16", "fp32")


def cmd_lora_bake(args: argparse.Namespace) -> int:
    from sdstudio.adapters.bake import bake, parse_lora_spec
    from sdstudio.models.loading import parse_dtype

    specs = [parse_lora_spec(text) for text in args.loras]
    result = bake(
        args.checkpoint,
        specs,
        args.output,
        dtype=parse_dtype(args.dtype) if args.dtype else None,
        strict=args.strict_networks,
        overwrite=args.overwrite,
    )
    print("\n".join(result.summary()))
    return 0


def cmd_lora_extract(args: argparse.Namespace) -> int:
    from sdstudio.adapters.bake import extract
    from sdstudio.models.loading import parse_dtype

    device = args.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SdStudioError(f"--device {device}: no CUDA GPU here; leave --device out to use the CPU")
    elif device != "cpu":
        raise SdStudioError(f"--device {device}: choose cpu or cuda (cuda:N)")
    report = extract(
        args.tuned,
        args.base,
        args.output,
        rank=args.rank,
        conv_rank=args.conv_rank,
        min_diff=args.min_diff,
        clamp_quantile=args.clamp_quantile,
        dtype=parse_dtype(args.dtype),
        device=device,
        overwrite=args.overwrite,
    )
    print("\n".join(report.summary()))
    return 0


def add_lora_commands(top_sub: argparse._SubParsersAction) -> None:
    """Add the ``lora`` command group (``bake``, ``extract``) to the top-level subcommands."""
    lora = top_sub.add_parser(
        "lora", help="bake LoRAs into a checkpoint, or extract a LoRA from two checkpoints"
    )
    sub = lora.add_subparsers(dest="lora_command", required=True)

    bk = sub.add_parser(
        "bake", help="write a checkpoint with LoRAs merged into its weights",
        description="Merge LoRA / LyCORIS files into a checkpoint: the result generates as the checkpoint with "
        "<lora:NAME:TE:UNET> tags does. The recipe (files, hashes, multipliers) goes into the file's header.",
    )  # fmt: skip
    bk.add_argument("checkpoint", help="the base checkpoint (.safetensors, .ckpt or a diffusers folder)")
    bk.add_argument(
        "loras", nargs="+", metavar="LORA[:TE[:UNET]]",
        help="a LoRA file and its multipliers, as A1111's tag: FILE (1), FILE:M (text encoder and UNet M), "
        "FILE:TE:UNET; several add up",
    )  # fmt: skip
    bk.add_argument("-o", "--output", required=True, help="output .safetensors file")
    bk.add_argument(
        "--dtype", choices=_DTYPES, help="of the written weights (default: the checkpoint's, else fp16)"
    )
    bk.add_argument("--strict-networks", action="store_true",
                    help="a LoRA that does not fully fit the model is an error (default: a warning)")  # fmt: skip
    bk.add_argument("--overwrite", action="store_true")
    bk.set_defaults(func=cmd_lora_bake)

    ex = sub.add_parser(
        "extract", help="extract a kohya LoRA from a fine-tuned checkpoint and its base (SVD of the difference)",
        description="Approximate TUNED - BASE by a kohya LoRA of rank R (truncated SVD per module, as kohya's "
        "extract_lora_from_models.py) and report the captured share of the difference's energy.",
    )  # fmt: skip
    ex.add_argument("tuned", help="the fine-tuned checkpoint")
    ex.add_argument("base", help="the checkpoint it was fine-tuned from")
    ex.add_argument("--rank", type=int, required=True, metavar="R", help="rank of the linear modules")
    ex.add_argument("--conv-rank", type=int, metavar="R",
                    help="also extract the ResNet blocks and samplers (LoCon), 3x3 convolutions at this rank")  # fmt: skip
    ex.add_argument("--min-diff", type=float, default=1e-3, metavar="F",
                    help="skip modules whose difference's norm is at most F times their weight's (default 1e-3)")  # fmt: skip
    ex.add_argument("--clamp-quantile", type=float, metavar="Q",
                    help="clamp the factors at this quantile of their values, as kohya does (its default 0.99); "
                    "default: no clamping")  # fmt: skip
    ex.add_argument("--dtype", choices=_DTYPES, default="fp16", help="of the written LoRA (default fp16)")
    ex.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    ex.add_argument("-o", "--output", required=True, help="output .safetensors file")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=cmd_lora_extract)
