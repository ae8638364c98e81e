"""VAE decode and encode for large images on small memory: overlapping tiles, each run with enough context
for the network's convolutions, blended with linear ramps.

A tile's core is run with ``context`` extra latent pixels on every side (clamped at the image border) and
only the core is kept, so every convolution sees what it would see untiled. What tiling cannot
reproduce are the global operations (GroupNorm statistics and the mid-block attention), which see one
padded tile instead of the whole image; the linear blend over ``overlap`` hides the small jumps those
leave at tile borders.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import VAEConfig
from sdstudio.models.vae import AutoencoderKL

# Tile automatically when the latent has more positions than this (96 x 96: a 768 x 768 SD image).
AUTO_TILE_ABOVE = 96 * 96


@dataclass(frozen=True)
class Tiling:
    """Tile geometry in latent pixels; ``context`` None: the network's convolutional reach."""

    tile: int = 64
    overlap: int = 16
    context: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got {self.tile}, {self.overlap}")


def decoder_context(config: VAEConfig) -> int:
    """Latent pixels on each side that one decoder output pixel depends on through its 3x3 convolutions.

    conv_in and the mid block's two ResNet blocks (4 convs) at the latent scale, then per level
    ``2 (num_res_blocks + 1)`` convs and the upsample conv, each level at twice the previous scale.
    SD's VAE: 17.25, so 18.
    """
    reach = 1.0 + 4.0
    levels = len(config.ch_mult)
    for i in range(levels):  # from the latent scale up
        scale = 2**i
        reach += 2 * (config.num_res_blocks + 1) / scale
        if i < levels - 1:
            reach += 1 / (2 * scale)  # the upsample conv runs at the next scale
    reach += 1 / 2 ** (levels - 1)  # conv_out
    return math.ceil(reach)


def encoder_context(config: VAEConfig) -> int:
    """Latent pixels on each side one encoder output depends on: per level ``2 num_res_blocks`` convs and
    the stride-2 downsample at that level's scale, then the mid block and conv_out at the latent scale."""
    f = config.downsample
    reach = 1.0  # conv_in, image pixels
    for i in range(len(config.ch_mult)):
        scale = 2**i
        reach += 2 * config.num_res_blocks * scale
        if i < len(config.ch_mult) - 1:
            reach += 2 * scale  # 3x3 stride-2 conv with LDM's one-sided padding
    reach += (4 + 1) * f
    return math.ceil(reach / f)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def _ramp(size: int, ramp_in: int, ramp_out: int) -> Tensor:
    """Blend weights along one axis of a tile's core: rising over ``ramp_in``, falling over ``ramp_out``."""
    w = torch.ones(size)
    if ramp_in:
        w[:ramp_in] = (torch.arange(ramp_in) + 0.5) / ramp_in
    if ramp_out:
        w[size - ramp_out :] = torch.minimum(
            w[size - ramp_out :], ((torch.arange(ramp_out) + 0.5) / ramp_out).flip(0)
        )
    return w


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    unit_in: int,
    unit_out: int,
    out_channels: int,
    tiling: Tiling,
    context: int,
) -> Tensor:
    """Apply ``fn`` (a map scaling space by ``unit_out / unit_in``) tile by tile over ``x`` [B, C, H, W].

    Tiles are laid out in units (latent pixels): ``unit_in`` input and ``unit_out`` output pixels each.
    """
    batch = x.shape[0]
    rows, cols = x.shape[-2] // unit_in, x.shape[-1] // unit_in
    tile_h, tile_w = min(tiling.tile, rows), min(tiling.tile, cols)
    out = torch.zeros(batch, out_channels, rows * unit_out, cols * unit_out)
    weight = torch.zeros(1, 1, rows * unit_out, cols * unit_out)
    ov = tiling.overlap * unit_out
    device = x.device
    for y0 in _starts(rows, tile_h, tiling.overlap):
        for x0 in _starts(cols, tile_w, tiling.overlap):
            ya, yb = max(0, y0 - context), min(rows, y0 + tile_h + context)
            xa, xb = max(0, x0 - context), min(cols, x0 + tile_w + context)
            y = fn(x[..., ya * unit_in : yb * unit_in, xa * unit_in : xb * unit_in]).float()
            device = y.device  # the network's device: a CPU image encoded on a GPU stays there
            cy, cx = (y0 - ya) * unit_out, (x0 - xa) * unit_out
            core = y[..., cy : cy + tile_h * unit_out, cx : cx + tile_w * unit_out]
            wy = _ramp(tile_h * unit_out, ov if y0 > 0 else 0, ov if y0 + tile_h < rows else 0)
            wx = _ramp(tile_w * unit_out, ov if x0 > 0 else 0, ov if x0 + tile_w < cols else 0)
            w = wy[:, None] * wx[None, :]
            oy, ox = y0 * unit_out, x0 * unit_out
            out[..., oy : oy + tile_h * unit_out, ox : ox + tile_w * unit_out] += core.cpu() * w
            weight[..., oy : oy + tile_h * unit_out, ox : ox + tile_w * unit_out] += w
    return (out / weight).to(device)


def should_tile(latent_h: int, latent_w: int, tiled: bool | None) -> bool:
    return latent_h * latent_w > AUTO_TILE_ABOVE if tiled is None else tiled


def decode(vae: AutoencoderKL, z: Tensor, tiled: bool | None = None, tiling: Tiling = Tiling()) -> Tensor:
    """Unscaled latents [B, 4, h, w] -> images [B, 3, h f, w f] float32, tiled when asked or large."""
    if not should_tile(z.shape[-2], z.shape[-1], tiled):
        return vae.decode(z).float()
    context = decoder_context(vae.config) if tiling.context is None else tiling.context
    return run_tiled(vae.decode, z, 1, vae.config.downsample, vae.config.out_ch, tiling, context)


def encode_mean(
    vae: AutoencoderKL, x: Tensor, tiled: bool | None = None, tiling: Tiling = Tiling()
) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> the posterior mean [B, 4, H / f, W / f] (unscaled), float32.

    The mean, not a sample: img2img should not depend on an unseeded draw.
    """
    f = vae.config.downsample
    if not should_tile(x.shape[-2] // f, x.shape[-1] // f, tiled):
        return vae.encode(x).mean.float()
    context = encoder_context(vae.config) if tiling.context is None else tiling.context
    return run_tiled(lambda t: vae.encode(t).mean, x, f, 1, vae.config.embed_dim, tiling, context)


def decode_checked(
    vae: AutoencoderKL, z: Tensor, tiled: bool | None = None, tiling: Tiling = Tiling()
) -> tuple[Tensor, list[str]]:
    """:func:`decode`, then again in float32 if the result holds NaN/inf (fp16 VAEs overflow); the
    warnings say so. Raises ``SdStudioError`` if float32 fails too."""
    images = decode(vae, z, tiled, tiling)
    if torch.isfinite(images).all():
        return images, []
    if vae.dtype == torch.float32:
        raise SdStudioError(
            "the VAE produced NaN/inf values even in float32: the latents or the VAE weights are broken"
        )
    vae32 = copy.deepcopy(vae).float()
    images = decode(vae32, z.float(), tiled, tiling)
    if not torch.isfinite(images).all():
        raise SdStudioError(
            "the VAE produced NaN/inf values even in float32: the latents or the VAE weights are broken"
        )
    return images, [
        f"the VAE produced NaN/inf in {str(vae.dtype).removeprefix('torch.')}; decoded again in float32"
    ]
