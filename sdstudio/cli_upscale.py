"""``sdstudio upscale IMAGE...``: AUTOMATIC1111's Extras tab, "Scale by": each image enlarged by an upscaler
(a learned model file or Lanczos / Nearest) to ``int(side * scale)`` rounded down to a multiple of 8, written
as a PNG carrying A1111's postprocessing infotext (``Postprocess upscale by: 2, Postprocess upscaler: NAME``
in its ``extras`` and ``postprocessing`` text chunks, the source's ``parameters`` kept).

Every input, output path, the upscaler's name and its file are checked before any image is upscaled, and
nothing is written until the model has loaded: bad input is one line and leaves no file behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sdstudio.errors import SdStudioError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MAX_SCALE", "MAX_SIDE", "add_upscale_parser", "cmd_upscale", "extras_infotext"]

log = logging.getLogger("sdstudio")

MAX_SCALE = 16.0
MAX_SIDE = 16384  # largest output side: a 16384^2 RGB image is 0.8 GB, its float32 assembly 3.2 GB


def extras_infotext(scale: float, upscaler: str) -> str:
    """A1111's Extras infotext for one upscaler (``postprocessing_upscale.py``'s ``pp.info``)."""
    from sdstudio.io.infotext import format_number, quote

    return f"Postprocess upscale by: {format_number(scale)}, Postprocess upscaler: {quote(upscaler)}"


def _check_images(paths: list[str]) -> dict[Path, tuple[int, int]]:
    """Each image's size; every one decoded once (then dropped) so a damaged file fails before any work."""
    from sdstudio.io.images import load_image

    sizes = {}
    for text in paths:
        path = Path(text)
        if path.is_dir():
            raise SdStudioError(f"{path}: is a folder; give image files")
        sizes[path] = load_image(path, "input image").size
    return sizes


def _output_paths(args: argparse.Namespace, inputs: list[Path]) -> list[Path]:
    from sdstudio.io.files import check_writable

    if args.output:
        if len(inputs) > 1:
            raise SdStudioError(f"-o names one file but {len(inputs)} images were given; use --outdir DIR")
        outs = [Path(args.output)]
        if outs[0].suffix.lower() != ".png":
            raise SdStudioError(f"{outs[0]}: the output file must end in .png")
    else:
        outdir = Path(args.outdir)
        if outdir.exists() and not outdir.is_dir():
            raise SdStudioError(f"{outdir}: exists and is not a folder; pass another --outdir")
        outs = [outdir / f"{p.stem}.png" for p in inputs]
    seen: dict[Path, Path] = {}
    sources = {p.resolve() for p in inputs}
    for src, out in zip(inputs, outs):
        if out.resolve() in seen:
            raise SdStudioError(f"{seen[out.resolve()]} and {src} would both be written to {out}; upscale them apart")
        seen[out.resolve()] = src
        if out.resolve() in sources:
            raise SdStudioError(f"{out}: is an input image; write the upscaled images elsewhere")
        check_writable(out, "output image")
        if out.exists() and not args.overwrite:
            raise SdStudioError(f"{out}: already exists; pass --overwrite to replace it")
    return outs


def _save(image: Image.Image, path: Path, infotext: str, source: Path, overwrite: bool) -> Path:
    """As A1111's ``save_image(..., pnginfo_section_name="extras", existing_info=...)``: the source's
    ``parameters``, then ``postprocessing`` and ``extras`` holding the infotext."""
    from PIL import Image, PngImagePlugin

    from sdstudio.io.files import atomic_write

    if path.exists() and not overwrite:  # appeared while upscaling
        raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
    info = PngImagePlugin.PngInfo()
    with Image.open(source) as im:
        parameters = im.info.get("parameters")
    if isinstance(parameters, str):
        info.add_text("parameters", parameters)
    info.add_text("postprocessing", infotext)
    info.add_text("extras", infotext)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.engine import choose_device, choose_dtype
    from sdstudio.io.images import load_image
    from sdstudio.pipelines.validate import check_int, check_number
    from sdstudio.upscale import Tiling, extras_size, find_upscaler, load_found, upscaler_library

    scale = check_number("--scale", args.scale, 0, MAX_SCALE, above_lo=True)
    check_int("--tile", args.tile, 0)
    check_int("--tile-overlap", args.tile_overlap, 0)
    tiling = Tiling(args.tile, args.tile_overlap)
    sizes = _check_images(args.images)
    inputs = list(sizes)
    for path, size in sizes.items():
        target = extras_size(size, scale)
        if min(target) < 8:
            raise SdStudioError(f"{path}: {size[0]}x{size[1]} scaled by {scale:g} is under 8 pixels a side")
        if max(target) > MAX_SIDE:
            raise SdStudioError(
                f"{path}: {size[0]}x{size[1]} scaled by {scale:g} is {target[0]}x{target[1]}; at most {MAX_SIDE} a side"
            )
    outputs = _output_paths(args, inputs)
    library = upscaler_library(args.upscaler_dir) if args.upscaler_dir else None
    found = find_upscaler(args.upscaler, library)
    device = choose_device(args.device)
    upscaler = load_found(found, device, choose_dtype(args.precision, device), tiling=tiling)
    log.info("%r", upscaler)
    infotext = extras_infotext(scale, upscaler.name)
    for src, out in tqdm(list(zip(inputs, outputs)), disable=args.quiet or len(inputs) < 2, file=sys.stderr,
                         desc="upscale", unit="image"):  # fmt: skip
        image = load_image(src, "input image").convert("RGB")  # A1111's Extras drops transparency the same way
        result = upscaler.upscale_by(image, scale)
        print(_save(result, out, infotext, src, args.overwrite), flush=True)
    return 0


def add_upscale_parser(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "upscale",
        help="enlarge images with an upscaler model (ESRGAN, Real-ESRGAN, SPAN, RealPLKSR, SwinIR, HAT, DAT) or Lanczos, as A1111's Extras tab",
        description="Enlarge each IMAGE by --scale as AUTOMATIC1111's Extras tab does: the upscaler runs (a "
        "model up to 3 passes) until the image is at least int(side * scale) rounded down to a multiple of 8, "
        "then Lanczos resamples to exactly that size. Models: ESRGAN files in the old layout "
        "(4x-UltraSharp, 4x_foolhardy_Remacri), Real-ESRGAN's (RealESRGAN_x4plus, x2plus) and Real-ESRGAN "
        "Compact (realesr-general-x4v3, realesr-animevideov3), SPAN, RealPLKSR, SwinIR (the official classical, lightweight, "
        "real-world and denoising / JPEG files, community 4x-*-SwinIR), HAT and DAT, as .pth or .safetensors.",
    )
    up.add_argument("images", nargs="+", metavar="IMAGE", help="images to upscale")
    up.add_argument("--upscaler", required=True, metavar="NAME|FILE", help="Lanczos, Nearest, the stem of a "
                    "file in --upscaler-dir (4x-UltraSharp; A1111's names such as 'R-ESRGAN 4x+' find "
                    "RealESRGAN_x4plus), or a .pth / .safetensors path")  # fmt: skip
    up.add_argument("--upscaler-dir", action="append", metavar="DIR",
                    help="folder of upscaler models, searched with its subfolders (repeatable)")  # fmt: skip
    up.add_argument("--scale", type=float, default=4.0, metavar="X",
                    help="scale by this factor (default 4, as A1111's Extras; at most 16)")  # fmt: skip
    up.add_argument("--tile", type=int, default=192, metavar="N",
                    help="tile side in input pixels for models (default 192, as A1111's ESRGAN tile); 0: whole "
                    "images at once")  # fmt: skip
    up.add_argument("--tile-overlap", type=int, default=8, metavar="N",
                    help="input pixels neighbouring tiles share, blended (default 8)")  # fmt: skip
    out = up.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="OUT", help="output .png (one IMAGE only)")
    out.add_argument("--outdir", metavar="DIR", help="write DIR/<image stem>.png for each IMAGE")
    up.add_argument("--overwrite", action="store_true", help="replace existing output files")
    up.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    up.add_argument("--precision", default="auto", help="auto (fp16 on a GPU, else fp32 or fast bf16), fp32, "
                    "bf16 or fp16")  # fmt: skip
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_upscale)
