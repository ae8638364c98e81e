"""The hires fix's upscaling step: latents resized as AUTOMATIC1111's "Latent" upscalers, or images resized
in pixel space (decode -> resample -> encode, done by the caller)."""

from __future__ import annotations

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# AUTOMATIC1111's ``shared.latent_upscale_modes``: name -> (interpolate mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


def hires_size(width: int, height: int, scale: float) -> tuple[tuple[int, int], str | None]:
    """(width, height) of the second pass, each ``int(side * scale)`` rounded down to a multiple of 8
    (AUTOMATIC1111 leaves it unrounded and crops in latent space); a warning when rounded."""
    exact = int(width * scale), int(height * scale)
    size = max(8, exact[0] // 8 * 8), max(8, exact[1] // 8 * 8)
    warning = None
    if size != exact:
        warning = f"hires size {exact[0]}x{exact[1]} is not a multiple of 8: using {size[0]}x{size[1]}"
    return size, warning


def upscale_latents(latents: Tensor, size: tuple[int, int], upscaler: str) -> Tensor:
    """[B, C, h, w] -> [B, C, *size] (size as (h, w)) with a "Latent" upscaler's interpolation."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_images(images: list[Image.Image], width: int, height: int, upscaler: str) -> list[Image.Image]:
    return [im.resize((width, height), PIXEL_UPSCALERS[upscaler]) for im in images]
