"""SPAN (Wan et al. 2024, "Swift Parameter-free Attention Network for Efficient Super-Resolution",
arXiv:2311.12770): the small, fast upscaler of many community files (``4xNomos8k_span_otf``,
``2x-AnimeSharpV2_SPAN``, ``4x-ClearRealityV1``, ...).

A 3x3 conv into ``feature_channels``, six blocks (``block_N``) of three convs whose output gates itself
(``(out + x) * (sigmoid(out) - 0.5)``: the "parameter-free attention"), a 1x1 conv over four of the features
concatenated, and a pixel shuffle. Every 3x3 conv (``Conv3XC``) is trained as 1x1 -> 3x3 -> 1x1 plus a 1x1
shortcut and runs as the single 3x3 conv they make together (``eval_conv``); as the reference does in eval
mode, that conv is computed here from the trained branches, not read from the file. The input is scaled by
255 around the DIV2K mean (unless the file has ``no_norm``) and the output is taken as it comes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.upscale.swinir import DIV2K_MEAN, UpscaleFactor

__all__ = ["SPAN", "SPANConfig", "is_span", "span_config", "span_layout"]

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class SPANConfig(UpscaleFactor):
    in_chans: int = 3
    out_chans: int = 3
    feature_channels: int = 48
    upscale: int = 4
    norm: bool = True  # subtract the mean and scale by 255 first (files without ``no_norm``)

    @property
    def align(self) -> int:
        return 1  # convolutions only: tiles equal the whole image away from their cut edges

    def describe(self) -> str:
        return f"SPAN x{self.upscale} ({self.feature_channels} features)"


class Conv3XC(nn.Module):
    """``sk`` (1x1) + ``conv`` (1x1, 3x3, 1x1) run as their sum, one 3x3 conv (the reference's eval path)."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2) -> None:
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_in * gain, 1),
            nn.Conv2d(c_in * gain, c_out * gain, 3),
            nn.Conv2d(c_out * gain, c_out, 1),
        )
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)  # in the files; recomputed from the branches

    def fused(self) -> tuple[Tensor, Tensor]:
        """The 3x3 kernel and bias equal to the branches: W3 (W2 * W1) with the biases carried through, plus the
        1x1 shortcut at the kernel's centre."""
        (w1, b1), (w2, b2), (w3, b3) = ((c.weight, c.bias) for c in self.conv)
        w = torch.einsum("om,mkhw->okhw", w3[:, :, 0, 0], torch.einsum("mnhw,nk->mkhw", w2, w1[:, :, 0, 0]))
        b = w3[:, :, 0, 0] @ (w2.sum((2, 3)) @ b1 + b2) + b3
        w = w + F.pad(self.sk.weight, (1, 1, 1, 1))
        return w, b + self.sk.bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.fused()
        return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1)


class SPAB(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = (Conv3XC(channels, channels) for _ in range(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block's output, and its first conv's activation (the reference's SiLU works in place, so what
        it hands on as the first conv's output is already activated)."""
        first = F.silu(self.c1_r(x))
        out3 = self.c3_r(F.silu(self.c2_r(first)))
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), first


class SPAN(nn.Module):
    """``[B, C, H, W]`` in [0, 1] -> ``[B, C_out, H * scale, W * scale]``."""

    def __init__(self, config: SPANConfig) -> None:
        super().__init__()
        self.config = c = config
        f = c.feature_channels
        self.conv_1 = Conv3XC(c.in_chans, f)
        for i in range(1, 7):
            self.add_module(f"block_{i}", SPAB(f))
        self.conv_cat = nn.Conv2d(4 * f, f, 1)
        self.conv_2 = Conv3XC(f, f)
        self.upsampler = nn.Sequential(
            nn.Conv2d(f, c.out_chans * c.upscale**2, 3, padding=1), nn.PixelShuffle(c.upscale)
        )

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: Tensor) -> Tensor:
        if self.config.norm:
            mean = torch.tensor(DIV2K_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) * 255.0
        first = self.conv_1(x)
        outs, inner = [first], first
        for i in range(1, 7):
            out, inner = getattr(self, f"block_{i}")(outs[-1])
            outs.append(out)
        # the first conv's features, the last block's through conv_2, the first block's, and the last
        # block's first activation
        cat = torch.cat([first, self.conv_2(outs[6]), outs[1], inner], 1)
        return self.upsampler(self.conv_cat(cat))


def is_span(state: StateDict) -> bool:
    return all(
        k in state for k in ("conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight", "conv_2.sk.weight",
                             "upsampler.0.weight")
    )  # fmt: skip


def span_layout(state: StateDict) -> dict[str, Tensor]:
    """The keys ``SPAN`` loads: ``no_norm`` (a flag the config holds) dropped."""
    return {k: v for k, v in state.items() if k != "no_norm"}


def span_config(state: StateDict) -> SPANConfig:
    features, in_chans = (int(n) for n in state["conv_1.sk.weight"].shape[:2])
    channels = int(state["upsampler.0.weight"].shape[0])
    # out_chans * scale^2 channels: the output has as many channels as the input when that fits (spandrel's rule)
    for out in (in_chans, 3, 1, 4):
        scale = math.isqrt(channels // out) if channels % out == 0 else 0
        if scale >= 1 and scale * scale * out == channels:
            break
    else:
        raise SdStudioError(f"SPAN's upsampler has {channels} channels: no output channels x a square scale")
    return SPANConfig(in_chans, out, features, scale, norm="no_norm" not in state)
