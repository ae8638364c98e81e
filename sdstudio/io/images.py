"""Images in and out: tensors to PIL, and atomic PNG writes carrying the infotext."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str | None, overwrite: bool = False) -> Path:
    """Write atomically (temp file + rename); never replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_infotext(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Read an image file fully (so later errors cannot surface mid-generation); one-line error if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise SdStudioError(f"{path}: no such {what} file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SdStudioError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from None


def flatten(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB, with any transparency composited over ``background`` (AUTOMATIC1111's ``images.flatten``)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        return canvas.convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """AUTOMATIC1111's ``images.resize_image`` (Lanczos) for its three resize modes:

    - ``just resize``: stretch to ``width x height``;
    - ``crop and resize``: scale to cover, centre-crop the excess;
    - ``resize and fill``: scale to fit, centre, fill the bands by stretching the edge rows/columns.
    """
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop and resize":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    elif mode == "resize and fill":
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    else:
        raise SdStudioError(f"unknown resize mode {mode!r}; choose just resize, crop and resize or resize and fill")
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "resize and fill":
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(
                    resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                    box=(0, fill + src_h),
                )
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(
                    resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                    box=(fill + src_w, 0),
                )
    return out
