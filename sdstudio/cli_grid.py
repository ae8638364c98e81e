"""``sdstudio grid``: AUTOMATIC1111's X/Y/Z plot and prompt matrix, arguments to :mod:`sdstudio.eval.grid`;
every cell is a PNG with its own infotext in ``OUT-cells/``, the annotated grid goes to ``OUT.png``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sdstudio.errors import SdStudioError

if TYPE_CHECKING:
    from sdstudio.eval.grid import Cell, GridPlan
    from sdstudio.pipelines.validate import Limits
    from sdstudio.types import GenerationResult

__all__ = ["add_grid_commands", "cmd_grid", "grid_paths"]

log = logging.getLogger("sdstudio")

MAX_CELL_SCALE = 16


def grid_paths(output: str, cells: int) -> tuple[Path, list[Path]]:
    """The grid's file and each cell's (``OUT-cells/NNNN.png``, by grid position)."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise SdStudioError(f"{out}: the output file must end in .png")
    folder = out.with_name(f"{out.stem}-cells")
    return out, [folder / f"{i:04d}.png" for i in range(cells)]


def _check_args(args: argparse.Namespace) -> None:
    from sdstudio.pipelines.validate import check_int

    check_int("--margin", args.margin, 0, 500)
    if args.cell_scale is not None:
        check_int("--cell-scale", args.cell_scale, 1, MAX_CELL_SCALE)
    if args.model is not None and not Path(args.model).exists():
        raise SdStudioError(f"{args.model}: no such file or folder (--model)")
    if args.vae is not None and not Path(args.vae).exists():
        raise SdStudioError(f"{args.vae}: no such VAE file or folder (--vae)")
    for flag, folders in (
        ("--models-dir", args.models_dir),
        ("--vae-dir", args.vae_dir),
        ("--lora-dir", args.lora_dir),
    ):
        for folder in folders or ():
            if not Path(folder).is_dir():
                raise SdStudioError(f"{folder}: folder does not exist or is not a folder ({flag})")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise SdStudioError(f"{args.embeddings}: embeddings folder does not exist or is not a folder")
    if args.style and not args.styles:
        raise SdStudioError("--style needs --styles FILE (a styles.csv with name,prompt,negative_prompt)")
    if args.prompt_matrix and (args.x or args.y or args.z):
        raise SdStudioError("--prompt-matrix makes its own axes; leave out --x, --y and --z")
    if not args.prompt_matrix and not (args.x or args.y or args.z):
        raise SdStudioError("no axis given: pass --x TYPE=VALUES (and --y, --z), or --prompt-matrix")


def _plan(args: argparse.Namespace, model: Path) -> tuple[GridPlan, Limits]:
    """The checked plan of the command's grid, before anything loads."""
    from sdstudio.cli import build_request, limits_from_args
    from sdstudio.eval.grid import (
        NOTHING,
        FileLookup,
        GridSpec,
        check_plan,
        check_spec,
        fix_seeds,
        parse_axis,
        plan_grid,
        plan_prompt_matrix,
    )  # fmt: skip
    from sdstudio.prompt.styles import find_styles, load_styles

    request, _ = build_request(args)
    styles = ()
    if args.styles:
        styles = find_styles(load_styles(args.styles), args.style or (), source=args.styles)
    limits = limits_from_args(args)
    files = FileLookup(
        tuple(Path(d) for d in args.models_dir or ()), tuple(Path(d) for d in args.vae_dir or ())
    )
    vae = Path(args.vae) if args.vae else None
    axes = {
        name: parse_axis(spec, files) if spec else NOTHING
        for name, spec in (("x", args.x), ("y", args.y), ("z", args.z))
    }
    spec = fix_seeds(GridSpec(request, checkpoint=model, vae=vae, styles=styles, **axes))
    if args.prompt_matrix:
        plan = plan_prompt_matrix(spec.request, styles, model, vae)
    else:
        check_spec(spec, limits)
        plan = plan_grid(spec)
    check_plan(plan, limits)
    return plan, limits


def cmd_grid(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import Pipeline, choose_device, choose_dtype
    from sdstudio.eval.grid import default_cell_scale, draw_grid, generate_cells, grid_infotext
    from sdstudio.io.files import check_writable
    from sdstudio.io.images import save_png

    _check_args(args)
    model = Path(args.model) if args.model else embedded_model_path()
    if model is None:
        raise SdStudioError(
            "no --model given and the embedded default model is not shipped: pass --model PATH"
        )
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    plan, limits = _plan(args, model)
    out, cell_paths = grid_paths(args.output, len(plan.cells))
    check_writable(out, "grid image")
    check_writable(cell_paths[0], "grid cell image")  # every cell goes to the same folder
    for path in (out, *cell_paths):
        if path.exists() and not args.overwrite:
            raise SdStudioError(
                f"{path}: already exists; pass --overwrite to replace it or choose another -o"
            )

    def load(checkpoint: Path | None, vae: Path | None) -> Pipeline:
        log.info("loading %s%s", checkpoint or model, f" with VAE {vae}" if vae else "")
        return Pipeline.from_file(
            checkpoint or model, dtype=dtype, device=device, vae=vae, embeddings_dir=args.embeddings,
            lora_dirs=args.lora_dir or (),
        )  # fmt: skip

    bar = tqdm(total=len(plan.cells), disable=args.quiet, file=sys.stderr, desc="grid", unit="image")
    warnings: dict[str, None] = {}

    def save_cell(cell: Cell, result: GenerationResult) -> None:
        generated = result.images[0]
        save_png(
            generated.image, cell_paths[plan.position(cell)], generated.infotext, overwrite=args.overwrite
        )
        warnings.update(dict.fromkeys(result.warnings))
        bar.update(1)

    with bar:
        results = generate_cells(plan, load, limits, on_cell=save_cell)
    images = {position: result.images[0].image for position, result in results.items()}
    first = images[0]
    scale = args.cell_scale or default_cell_scale(first.width, first.height)
    grid = draw_grid(plan, images, labels=not args.no_labels, margin=args.margin, scale=scale)
    infotext = grid_infotext(results[0].images[0].infotext, plan)
    if scale > 1:  # as `generate --upscale`: the metadata says the pixels were enlarged
        infotext += f", Grid cell scale: {scale}"
    save_png(grid, out, infotext, overwrite=args.overwrite)
    for warning in warnings:
        log.warning(warning)
    print(out)
    return 0


def add_grid_commands(top_sub: argparse._SubParsersAction) -> None:
    """Add the ``grid`` command to the top-level subcommands."""
    from sdstudio.eval.grid import AXIS_TYPES

    gr = top_sub.add_parser(
        "grid", help="AUTOMATIC1111's X/Y/Z plot and prompt matrix: one annotated grid of images",
        description="Generate one image per combination of axis values and draw them in an annotated grid "
        "(OUT.png, its infotext listing the axes as A1111's X Type / X Values ...), each image also in "
        "OUT-cells/NNNN.png with its own infotext. Axis types: " + ", ".join(AXIS_TYPES) + ". Values: "
        'comma-separated ("a, b", c), ranges 1-5, 1-10 (+2), 10-1 (-3), 1-10 [5] (5 values), the same with '
        "decimals on float axes; Seed -1 is one random seed per value. Prompt S/R replaces its first value "
        "in the prompt by each value. Example: sdstudio grid \"a red circle\" --x \"Steps=4,8,16\" "
        '--y "Prompt S/R=red,blue,green" -o grid.png',
    )  # fmt: skip
    gr.add_argument("prompt", help="the prompt (with --prompt-matrix: 'base|part|part...')")
    gr.add_argument("--x", metavar="TYPE=VALUES", help="the columns, such as 'Steps=10,20,30'")
    gr.add_argument("--y", metavar="TYPE=VALUES", help="the rows, such as 'CFG Scale=5-9 (+2)'")
    gr.add_argument("--z", metavar="TYPE=VALUES", help="one sub-grid per value, side by side")
    gr.add_argument("--prompt-matrix", action="store_true", help="A1111's prompt matrix: each combination of "
                    "the prompt's '|'-separated optional parts, all with the same seed")  # fmt: skip
    gr.add_argument("--styles", metavar="FILE", help="styles.csv (name,prompt,negative_prompt) for --style")
    gr.add_argument(
        "--style", action="append", metavar="NAME", help="apply this style to every prompt (repeatable)"
    )
    gr.add_argument("--negative", help="negative prompt")
    gr.add_argument("--sampler", help="sampler (default: Euler a)")
    gr.add_argument("--scheduler", help="schedule type (default: Automatic)")
    gr.add_argument("--steps", type=int, help="sampling steps (default 20)")
    gr.add_argument("--cfg", type=float, help="CFG scale (default 7)")
    gr.add_argument("--seed", type=int, help="seed (-1, the default: one random seed for every cell)")
    gr.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    gr.add_argument("--height", type=int, help="height in pixels")
    gr.add_argument("--clip-skip", type=int, help="text encoder layer from the end (1 = last)")
    gr.add_argument("--eta", type=float, help="noise multiplier of ancestral and DDIM samplers")
    gr.add_argument("--subseed", type=int, help="variation seed (-1: random)")
    gr.add_argument("--subseed-strength", type=float, help="variation strength 0..1 (default 0)")
    gr.add_argument(
        "--init-image", metavar="PATH", help="img2img: start from this image (for a Denoising axis)"
    )
    gr.add_argument("--strength", type=float, help="img2img denoising strength (default 0.75)")
    gr.add_argument("--hires-scale", type=float, help="hires fix: upscale factor (for a Hires steps axis)")
    gr.add_argument("--hires-steps", type=int, help="hires fix second-pass steps (0: as --steps)")
    gr.add_argument("--hires-strength", type=float, help="hires fix denoising strength (default 0.7)")
    gr.add_argument("--hires-upscaler", help="hires fix upscaler (default: Latent)")
    gr.add_argument("--model", help="checkpoint (default: the embedded toy model)")
    gr.add_argument("--models-dir", action="append", metavar="DIR", help="where Checkpoint name values are "
                    "looked up by file name (repeatable); a path works without it")  # fmt: skip
    gr.add_argument(
        "--vae", metavar="FILE", help="VAE file instead of the checkpoint's (VAE value 'Automatic')"
    )
    gr.add_argument("--vae-dir", action="append", metavar="DIR",
                    help="where VAE values are found (repeatable); 'None': the checkpoint's own")  # fmt: skip
    gr.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings")
    gr.add_argument("--lora-dir", action="append", metavar="DIR", help="folder of LoRAs (repeatable)")
    gr.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    gr.add_argument("--precision", default="auto", help="auto (default), fp32, bf16 or fp16")
    gr.add_argument("-o", "--output", required=True, help="the grid PNG; cells go to OUT-cells/NNNN.png")
    gr.add_argument("--overwrite", action="store_true", help="replace existing files")
    gr.add_argument("--no-labels", action="store_true", help="no axis labels (A1111's 'Draw legend' off)")
    gr.add_argument("--margin", type=int, default=0, metavar="PX", help="pixels between cells (default 0)")
    gr.add_argument("--cell-scale", type=int, metavar="N", help="enlarge cells N times, nearest neighbour "
                    "(default: enough for 256 pixels, so small images' labels are legible)")  # fmt: skip
    gr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # what `generate`'s request builder reads and the grid leaves at their defaults
    gr.set_defaults(func=cmd_grid, from_png=None, mask=None, batch=1, vae_tiling="auto", max_pixels=None,
                    max_steps=None, max_batch=None)  # fmt: skip
