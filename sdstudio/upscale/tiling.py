"""Upscaling a large image in overlapping tiles, so memory stays bounded by the tile size.

Tiles are placed as AUTOMATIC1111's ``images.split_grid`` places them (its ESRGAN upscalers: option
``ESRGAN_tile``, default 192 input pixels, 0 for no tiling; ``ESRGAN_tile_overlap``, default 8): along each
side, ``ceil((length - overlap) / (tile - overlap))`` tiles of ``tile`` pixels spread evenly from the first
pixel to the last, so neighbours share at least ``overlap`` pixels. Two things differ, each for exactness:

- Seams are blended in float, before rounding to 8 bits, with weights that form a partition of unity:
  across the band two neighbours share, one tile's weight falls linearly from 1 to 0 while the other's rises
  (A1111 pastes 8-bit tiles through a ramp mask over the first ``overlap`` pixels and then overwrites the
  rest of the band with the later tile).
- Starts are rounded down to a multiple of ``align`` (a pixel-unshuffle model's factor: its output depends
  on how the input is cut into 2x2 or 4x4 cells, so tiles must cut it as the whole image does).

A convolutional net is translation-equivariant away from zero padding, so a tile's output equals the
untiled output at output pixels farther from the tile's cut edges than the net's receptive radius; the
tiled result equals the untiled one there (``tests/upscale/test_upscalers.py`` checks both).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

__all__ = ["Tiling", "blend_weights", "tile_spans", "upscale_tiled"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap, in input pixels (AUTOMATIC1111's ESRGAN defaults); ``size`` 0: no tiling."""

    size: int = 192
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.size < 0 or self.overlap < 0:
            raise SdStudioError(f"tile size {self.size} and overlap {self.overlap} must be >= 0")
        if self.size and self.overlap >= self.size:
            raise SdStudioError(f"the tile overlap ({self.overlap}) must be smaller than the tile size ({self.size})")


def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` of each tile along a side of ``length`` pixels, in order; every start a multiple of
    ``align``, neighbours sharing at least ``overlap`` pixels, the last ending at ``length``."""
    if tile <= 0 or tile >= length:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))
    while True:
        starts = sorted({i * (length - tile) // (count - 1) // align * align for i in range(count)})
        spans = [(s, s + tile) for s in starts[:-1]] + [(starts[-1], length)]
        if all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in itertools.pairwise(spans)):
            return spans
        count += 1  # alignment widened a step: one more tile


def blend_weights(spans: list[tuple[int, int]], scale: int) -> list[Tensor]:
    """Each tile's weight along one side, per output pixel: 1 inside, a linear ramp across each band it
    shares with a neighbour (``(p + 0.5) / band``), so two neighbours' weights sum to 1 in their band."""
    weights = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale)
        if i > 0:
            band = (spans[i - 1][1] - start) * scale
            w[:band] = torch.minimum(w[:band], (torch.arange(band) + 0.5) / band)
        if i + 1 < len(spans):
            band = (end - spans[i + 1][0]) * scale
            w[len(w) - band :] = torch.minimum(w[len(w) - band :], (torch.arange(band).flip(0) + 0.5) / band)
        weights.append(w)
    return weights


def upscale_tiled(
    fn: Callable[[Tensor], Tensor], image: Tensor, scale: int, tiling: Tiling, *, align: int = 1,
    progress: Progress | None = None,
) -> Tensor:  # fmt: skip
    """``fn`` (``[1, C, h, w]`` -> ``[1, C', h * scale, w * scale]``) over ``image`` ``[1, C, H, W]`` in
    tiles; the result ``[1, C', H * scale, W * scale]`` in float32 on the CPU (where it is assembled, so a
    GPU holds one tile at a time)."""
    height, width = image.shape[-2:]
    rows = tile_spans(height, tiling.size, tiling.overlap, align)
    cols = tile_spans(width, tiling.size, tiling.overlap, align)
    total = len(rows) * len(cols)
    if total == 1:
        out = fn(image).float().cpu()
        if progress:
            progress(1, 1)
        return out
    log.debug("upscaling %dx%d in %d tiles (%d x %d)", width, height, total, len(cols), len(rows))
    row_w, col_w = blend_weights(rows, scale), blend_weights(cols, scale)
    out: Tensor | None = None
    weight = torch.zeros(height * scale, width * scale)
    done = 0
    for (y0, y1), wy in zip(rows, row_w):
        for (x0, x1), wx in zip(cols, col_w):
            tile = fn(image[..., y0:y1, x0:x1]).float().cpu()  # [1, C', (y1 - y0) * scale, (x1 - x0) * scale]
            expected = ((y1 - y0) * scale, (x1 - x0) * scale)
            if tuple(tile.shape[-2:]) != expected:
                raise RuntimeError(f"a {x1 - x0}x{y1 - y0} tile came out {tuple(tile.shape[-2:])}, not {expected}")
            if out is None:
                out = torch.zeros(1, tile.shape[1], height * scale, width * scale)
            w = wy[:, None] * wx[None, :]  # [h * scale, w * scale]
            ys, xs = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
            out[..., ys, xs] += tile * w
            weight[ys, xs] += w
            done += 1
            if progress:
                progress(done, total)
    assert out is not None
    return out / weight
