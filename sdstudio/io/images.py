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
