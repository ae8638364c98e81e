"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper the samplers call like any other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdstudio.diffusion.denoiser import Denoiser


@dataclass(frozen=True)
class CFGDenoiser:
    """``D(x) = D_u(x) + scale (D_c(x) - D_u(x))``; cond and uncond go through the UNet as one batch.

    Guidance on x0 equals guidance on eps, since x0 = x - sigma eps is affine in eps.
    """

    denoiser: Denoiser
    cond: Tensor  # [B, tokens, width]
    uncond: Tensor  # [B, tokens, width], same token count as cond
    scale: float
    extra: Tensor | None = None  # [B, extra_channels, h, w] for inpainting models

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, self.cond, self.extra)
        extra = None if self.extra is None else torch.cat([self.extra, self.extra])
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.cond, self.uncond]), extra)
        cond, uncond = out.chunk(2)
        return uncond + (cond - uncond) * self.scale


DenoiserFn = Callable[[Tensor, Tensor], Tensor]
