"""``sdstudio train controlnet`` and ``sdstudio toyworld control-dataset``: arguments to
:mod:`sdstudio.training.controlnet` and :mod:`sdstudio.toyworld.control_data`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdstudio.errors import SdStudioError

__all__ = [
    "CONTROLNET_DEFAULTS",
    "add_control_dataset_parser",
    "add_train_controlnet_parser",
    "cmd_toyworld_control_dataset",
    "cmd_train_controlnet",
]

# (learning rate, steps, batch, schedule) for a given --model (diffusers' train_controlnet.py: 5e-6 at batch 4,
# constant; the paper trains SD 1.5 ControlNets for thousands of steps) and for the embedded toy model: 600
# steps at batch 32 and 2e-3 with a cosine decay placed 99 % of benchmarks/toy_controlnet.py's held-out
# objects (92 % in the prompt's colour and shape; none without the ControlNet), trained in 385 s on a shared
# 2-core CPU; 300 steps at a constant rate: 88 %
CONTROLNET_DEFAULTS: dict[str, tuple[float, int, int, str]] = {
    "model": (1e-5, 5000, 4, "constant"),
    "embedded": (2e-3, 600, 32, "cosine"),
}


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    import torch

    from sdstudio.cli import _print_paths, _progress_bar, embedded_model_path
    from sdstudio.engine import choose_dtype
    from sdstudio.models.loading import load_model
    from sdstudio.training.controlnet import ControlNetRunOptions, split_layout, train_controlnet
    from sdstudio.training.finetune import RunConfig

    split_layout(args.data, args.conditioning)  # refuses a folder without control images before loading
    lr, steps, batch, schedule = CONTROLNET_DEFAULTS["model" if args.model else "embedded"]
    args.steps = steps if args.steps is None else args.steps
    cosine = args.cosine or (args.lr_schedule is None and schedule == "cosine")
    run = RunConfig(
        steps=args.steps, batch_size=batch if args.batch is None else args.batch, lr=lr if args.lr is None else args.lr,
        warmup=args.warmup, cosine=cosine, seed=args.seed, snr_gamma=args.snr_gamma, save_every=args.save_every,
        bf16=choose_dtype(args.precision) == torch.bfloat16,
    )  # fmt: skip
    options = ControlNetRunOptions(
        name=args.name, noise_offset=args.noise_offset, lr_schedule=args.lr_schedule,
        gradient_accumulation=args.grad_accumulation, optimizer=args.optimizer, save_dtype=args.save_dtype,
    )  # fmt: skip
    dataset_options: dict = {"flip": args.flip, "caption_dropout_rate": args.caption_dropout}
    if args.resolution:
        dataset_options["resolution"] = args.resolution
    model_path = args.model or embedded_model_path()
    if model_path is None:
        raise SdStudioError("no --model given and the embedded model is not shipped")
    if not Path(model_path).exists():
        raise SdStudioError(f"{model_path}: no such file or folder (--model)")
    model = load_model(model_path)
    if model.config.is_sdxl:
        raise SdStudioError(f"{model_path}: an SDXL model; sdstudio trains ControlNets for SD 1.x / 2.x models so far")
    bar, update = _progress_bar(args, args.steps)
    with bar:
        paths = train_controlnet(model, args.data, args.out, run, options, dataset_options,
                                 conditioning=args.conditioning, overwrite=args.overwrite, progress=update)  # fmt: skip
    return _print_paths(paths)


def add_train_controlnet_parser(train_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sdstudio train controlnet`` under ``sdstudio train``'s subcommands."""
    from sdstudio.training.trainer import OPTIMIZERS, SCHEDULES

    (lr, steps, batch, _), (toy_lr, toy_steps, toy_batch, _) = CONTROLNET_DEFAULTS["model"], CONTROLNET_DEFAULTS["embedded"]
    parser = train_sub.add_parser(
        "controlnet", help="ControlNet: a copy of the UNet's encoder that follows control images (masks, edges...)",
        description="Train a ControlNet (Zhang et al. 2023) from the base model's UNet encoder on images, their "
        "captions and their control images; the base model stays frozen. Writes NAME.safetensors in the original "
        "single-file layout (control_model.* keys), which sdstudio, AUTOMATIC1111's ControlNet extension and "
        "ComfyUI load. Data: DIR/images/NAME.png + NAME.txt and DIR/conditioning/NAME.png (kohya's image_dir and "
        "conditioning_data_dir), or --data IMAGES --conditioning CONTROL_IMAGES.",
    )  # fmt: skip
    parser.add_argument("--model", help="base checkpoint (default: the embedded model)")
    parser.add_argument("--data", required=True, metavar="DIR", help="images/ + conditioning/ folders, or the "
                        "images (same-stem .txt captions) with --conditioning")  # fmt: skip
    parser.add_argument("--conditioning", metavar="DIR", help="the control images, named as their images "
                        "(kohya's conditioning_data_dir; default DATA/conditioning)")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: the ControlNet, state, log; "
                        "a run of the same settings resumes there")  # fmt: skip
    parser.add_argument("--name", default="controlnet", help="output file name without suffix (default controlnet)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {steps}; {toy_steps} on the embedded model)")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {lr:g}; {toy_lr:g} on the embedded model)")
    parser.add_argument("--batch", type=int, help=f"images per step (default {batch}; {toy_batch} on the embedded model)")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    parser.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 10 %% (default: "
                        "constant; cosine on the embedded model)")  # fmt: skip
    parser.add_argument("--lr-schedule", choices=SCHEDULES, help="learning-rate schedule after the warm-up "
                        "(overrides --cosine and the default)")  # fmt: skip
    parser.add_argument("--resolution", type=int, help="training size (default: the model's)")
    parser.add_argument("--flip", action="store_true", help="mirror images and their control images at random")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="share of samples with an empty caption "
                        "(the paper drops half, so that the control image alone carries the layout)")  # fmt: skip
    parser.add_argument("--snr-gamma", type=float, default=0.0, help="Min-SNR-gamma loss weighting (0: off)")
    parser.add_argument("--noise-offset", type=float, default=0.0, help="offset noise (0.05-0.1 usual; 0: off)")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw, or adamw8bit")
    parser.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="dtype of the written weights (default fp16)")  # fmt: skip
    parser.add_argument("--save-every", type=int, default=100, help="steps between saves of the state and of "
                        "saves/NAME-STEP.safetensors (default 100)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", help="auto (bf16 autocast where fast), fp32 or bf16")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_train_controlnet)
    return parser


def cmd_toyworld_control_dataset(args: argparse.Namespace) -> int:
    from sdstudio.toyworld.control_data import write_control_dataset

    if not 0.0 <= args.position_captions <= 1.0 or not 0.0 <= args.two_objects <= 1.0:
        raise SdStudioError("--position-captions and --two-objects are shares between 0 and 1")
    out = write_control_dataset(args.kind, args.n, Path(args.out), seed=args.seed, p_position=args.position_captions,
                                two_objects=args.two_objects, overwrite=args.overwrite)  # fmt: skip
    print(out)
    return 0


def add_control_dataset_parser(toyworld_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sdstudio toyworld control-dataset`` under ``sdstudio toyworld``'s subcommands."""
    from sdstudio.toyworld.control_data import CONTROL_KINDS, HELDOUT_COLOURS

    parser = toyworld_sub.add_parser(
        "control-dataset", help="write a ControlNet training folder: images/ + captions, conditioning/ masks or edges",
        description="Toy-world scenes with their control images, as kohya's ControlNet training reads them: "
        "images/NNNN.png + NNNN.txt and conditioning/NNNN.png, and metadata.jsonl with diffusers' columns (image, "
        f"conditioning_image, text). Objects on the world's grid, never {' or '.join(HELDOUT_COLOURS)} (the "
        "benchmark's held-out colours).",
    )  # fmt: skip
    parser.add_argument("--kind", choices=CONTROL_KINDS, default="mask",
                        help="mask: white silhouettes on black (default); edges: their one-pixel outlines")  # fmt: skip
    parser.add_argument("--n", type=int, required=True, help="samples")
    parser.add_argument("--out", required=True, help="folder to write (empty or new)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--position-captions", type=float, default=0.0, help="share of captions that say where "
                        "the object is (default 0: the control image says it)")  # fmt: skip
    parser.add_argument("--two-objects", type=float, default=0.0, help="share of scenes with two objects")
    parser.add_argument("--overwrite", action="store_true", help="replace the numbered files of a folder that has some")
    parser.set_defaults(func=cmd_toyworld_control_dataset)
    return parser
