"""Masks for inpainting and outpainting, in pixel space, as AUTOMATIC1111's ``processing.py`` and
``masking.py`` build them: blur, the "only masked" crop, masked-content fill, the overlay that puts the
original pixels back, and 9-channel inpainting models' extra input."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from sdstudio.types import Outpaint

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), exclusive ends


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur of an L mask (PIL's radius is the standard deviation, as A1111's sigma)."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def outpaint_canvas(
    image: Image.Image, mask: Image.Image | None, pad: Outpaint, blur: int
) -> tuple[Image.Image, Image.Image]:
    """Pad the canvas by ``pad`` (new pixels repeat the edge, so "original" content starts from the edge
    colours), and the mask with white there. As AUTOMATIC1111's "Poor man's outpainting", the white
    reaches ``2 * blur`` pixels into the image on padded sides, so the blurred seam falls inside it."""
    arr = np.asarray(image.convert("RGB"))
    padded = np.pad(arr, ((pad.up, pad.down), (pad.left, pad.right), (0, 0)), mode="edge")
    old = np.asarray(mask.convert("L")) if mask is not None else np.zeros(arr.shape[:2], np.uint8)
    m = np.pad(old, ((pad.up, pad.down), (pad.left, pad.right)), constant_values=255)
    h, w = arr.shape[:2]
    reach = 2 * blur
    y1 = pad.up + (reach if pad.up else 0)
    y2 = pad.up + h - (reach if pad.down else 0)
    x1 = pad.left + (reach if pad.left else 0)
    x2 = pad.left + w - (reach if pad.right else 0)
    inner = np.full_like(m, 255)
    inner[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = 0
    m = np.maximum(m, inner)
    return Image.fromarray(padded), Image.fromarray(m)


def crop_region(mask: Image.Image, padding: int) -> Box | None:
    """The mask's bounding box grown by ``padding``, clamped (A1111 ``get_crop_region``); None if blank."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, mask.width),
        min(y2 + padding, mask.height),
    )


def expand_to_ratio(box: Box, width: int, height: int, image_w: int, image_h: int) -> Box:
    """Grow ``box`` to the aspect ratio ``width / height`` inside the image (A1111 ``expand_crop_region``)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= image_h:
            y1, y2 = y1 - (y2 - image_h), image_h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= image_w:
            x1, x2 = x1 - (x2 - image_w), image_w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_w)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """ "fill" masked content (A1111 ``masking.fill``): the masked area takes the colours around it, from
    ever smaller blurs of the unmasked pixels composited over each other."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The original pixels as RGBA with alpha 255 where they are kept (mask 0), for :func:`paste_back`."""
    out = image.convert("RGBA")
    out.putalpha(ImageOps.invert(mask.convert("L")))
    return out


def paste_back(
    result: Image.Image, over: Image.Image, base: Image.Image | None, box: Box | None
) -> Image.Image:
    """Put the original pixels back over a generated image (A1111 ``apply_overlay``); for "only masked",
    first scale the result into its ``box`` on ``base``, the full-size original."""
    if box is not None and base is not None:
        x1, y1, x2, y2 = box
        canvas = base.convert("RGB").copy()
        canvas.paste(result.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        result = canvas
    out = result.convert("RGBA")
    out.alpha_composite(over)
    return out.convert("RGB")


def latent_keep(mask: Image.Image, latent_h: int, latent_w: int) -> Tensor:
    """1 where the original latents are kept: ``1 - round(mask)`` at latent size (A1111's ``p.mask``). [1, 1, h, w]"""
    small = np.asarray(mask.convert("L").resize((latent_w, latent_h)), dtype=np.float32) / 255
    return torch.from_numpy(1.0 - np.around(small))[None, None]


def conditioning_mask(mask: Image.Image | None, height: int, width: int) -> Tensor:
    """The inpainting model's mask channel source: rounded, 1 = repaint (all ones without a mask). [1, 1, H, W]"""
    if mask is None:
        return torch.ones(1, 1, height, width)
    return torch.from_numpy(np.around(np.asarray(mask.convert("L"), dtype=np.float32) / 255))[None, None]


def inpaint_extra(mask: Tensor, masked_latents: Tensor) -> Tensor:
    """9-channel inpainting models' extra input (diffusers / A1111 ``inpainting_image_conditioning``):
    the mask at latent size, then the latents of the image with the masked area set to 0 (grey).
    mask [1, 1, H, W], masked_latents [B, 4, h, w] -> [B, 5, h, w]"""
    small = F.interpolate(mask.to(masked_latents.device), size=masked_latents.shape[-2:])
    return torch.cat([small.expand(masked_latents.shape[0], -1, -1, -1), masked_latents], dim=1)
