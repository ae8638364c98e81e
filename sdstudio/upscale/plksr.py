"""RealPLKSR (the "Real" variant of Lee et al. 2024, "Partial Large Kernel CNNs for Efficient
Super-Resolution", arXiv:2404.11848, as neosr / traiNNer-redux train it): ``4xNomos2_realplksr_dysample``,
``4x-*-RealPLKSR`` and many other community files.

``feats``: a 3x3 conv into ``dim`` channels, ``n_blocks`` blocks, a (dropout and a) 3x3 conv to
``3 * scale²`` channels; plus the input repeated ``scale²`` times; then a pixel shuffle, or DySample (Liu et
al. 2023, "Learning to Upsample by Learning to Sample": each output pixel bilinearly samples the features at
an offset the net predicts). A block: an optional channel LayerNorm, two 3x3 convs with a Mish between
(``channel_mixer``), a large-kernel conv over the first ``split_ratio`` of the channels (``lk``), an
optional element-wise attention (``attn``: x * sigmoid(conv(x))), a 1x1 conv (``refine``), a GroupNorm of 4
groups (without the LayerNorm; the group count is in no tensor, 4 is what every release uses), plus the
input. Module names equal the files' keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.upscale.swinir import UpscaleFactor

__all__ = ["RealPLKSR", "RealPLKSRConfig", "is_realplksr", "realplksr_config"]

StateDict = Mapping[str, Tensor]
NORM_GROUPS = 4


@dataclass(frozen=True)
class RealPLKSRConfig(UpscaleFactor):
    in_chans: int = 3
    dim: int = 64
    n_blocks: int = 28
    upscale: int = 4
    kernel_size: int = 17
    lk_channels: int = 16  # dim * split_ratio
    use_ea: bool = True
    layer_norm: bool = False
    dysample: bool = False

    @property
    def align(self) -> int:
        return 1  # convolutions: tiles equal the whole image away from their cut edges (GroupNorm aside)

    def describe(self) -> str:
        up = "DySample" if self.dysample else "pixel shuffle"
        return f"RealPLKSR x{self.upscale} ({self.dim} dim, {self.n_blocks} blocks, kernel {self.kernel_size}, {up})"


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an image [B, C, H, W] (eps 1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-6).permute(
            0, 3, 1, 2
        )


class LargeKernel(nn.Module):
    """A large-kernel conv over the first ``channels`` channels; the others pass."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, 1, kernel // 2)
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        head, tail = x.split([self.channels, x.shape[1] - self.channels], dim=1)
        return torch.cat([self.conv(head), tail], dim=1)


class ElementAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.f(x)


class PLKBlock(nn.Module):
    def __init__(self, config: RealPLKSRConfig) -> None:
        super().__init__()
        dim = config.dim
        self.layer_norm = ChannelNorm(dim) if config.layer_norm else nn.Identity()
        self.channel_mixer = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, 1, 1), nn.Mish(), nn.Conv2d(2 * dim, dim, 3, 1, 1)
        )
        self.lk = LargeKernel(config.lk_channels, config.kernel_size)
        self.attn = ElementAttention(dim) if config.use_ea else nn.Identity()
        self.refine = nn.Conv2d(dim, dim, 1)
        self.norm = nn.Identity() if config.layer_norm else nn.GroupNorm(NORM_GROUPS, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.lk(self.channel_mixer(self.layer_norm(x))))
        return self.norm(self.refine(y)) + x


class DySample(nn.Module):
    """Upsampling by learnt sampling: per output pixel and group, an offset (``offset`` gated by
    ``scope``) from its place in the input grid, sampled bilinearly with the border repeated."""

    def __init__(self, channels: int, out_chans: int, scale: int, groups: int, end_conv: bool) -> None:
        super().__init__()
        self.scale, self.groups = scale, groups
        self.offset = nn.Conv2d(channels, 2 * groups * scale**2, 1)
        self.scope = nn.Conv2d(channels, 2 * groups * scale**2, 1, bias=False)
        self.end_conv = nn.Conv2d(channels, out_chans, 1) if end_conv else None
        self.register_buffer("init_pos", self.initial_positions())  # in the files too (the same values)

    def initial_positions(self) -> Tensor:
        """[1, 2 * groups * scale², 1, 1]: the sub-pixel places of a scale x scale cell, (x, y) per group."""
        s = self.scale
        h = torch.arange((-s + 1) / 2, (s - 1) / 2 + 1) / s
        grid = torch.stack(torch.meshgrid([h, h], indexing="ij")).transpose(1, 2)  # [2, s, s]
        return grid.repeat(1, self.groups, 1).reshape(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        s = self.scale
        offset = self.offset(x) * self.scope(x).sigmoid() * 0.5 + self.init_pos.to(x.dtype)
        offset = offset.view(b, 2, -1, h, w)
        ys, xs = torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5
        coords = (
            torch.stack(torch.meshgrid([xs, ys], indexing="ij")).transpose(1, 2)[None, :, None].to(x.dtype)
        )
        size = torch.tensor([w, h], dtype=x.dtype, device=x.device).view(1, 2, 1, 1, 1)
        coords = 2 * (coords + offset) / size - 1  # [B, 2, groups * s², H, W] in grid_sample's [-1, 1]
        grid = F.pixel_shuffle(coords.reshape(b, -1, h, w), s).view(b, 2, -1, s * h, s * w)
        grid = grid.permute(0, 2, 3, 4, 1).flatten(0, 1)  # [B * groups, sH, sW, 2]
        out = F.grid_sample(x.reshape(b * self.groups, -1, h, w), grid, mode="bilinear", align_corners=False,
                            padding_mode="border").view(b, -1, s * h, s * w)  # fmt: skip
        return self.end_conv(out) if self.end_conv is not None else out


class RealPLKSR(nn.Module):
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, H * scale, W * scale]``."""

    def __init__(self, config: RealPLKSRConfig) -> None:
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_chans, c.dim, 3, 1, 1)]
        layers += [PLKBlock(c) for _ in range(c.n_blocks)]
        layers += [
            nn.Identity(),
            nn.Conv2d(c.dim, c.in_chans * c.upscale**2, 3, 1, 1),
        ]  # the reference's dropout
        self.feats = nn.Sequential(*layers)
        channels = c.in_chans * c.upscale**2
        if c.dysample:
            groups = c.in_chans if c.upscale % 2 else 4
            self.to_img: nn.Module = DySample(
                channels, c.in_chans, c.upscale, groups, end_conv=c.upscale != 1
            )
        else:
            self.to_img = nn.PixelShuffle(c.upscale)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.to_img(self.feats(x) + x.repeat_interleave(self.config.upscale**2, dim=1))


def is_realplksr(state: StateDict) -> bool:
    """RealPLKSR's keys (``channel_mixer``; the original PLKSR misspells it ``channe_mixer``)."""
    return all(
        k in state for k in ("feats.0.weight", "feats.1.lk.conv.weight", "feats.1.channel_mixer.0.weight")
    )


def realplksr_config(state: StateDict) -> RealPLKSRConfig:
    dim, in_chans = (int(n) for n in state["feats.0.weight"].shape[:2])
    # feats: conv, the blocks, a dropout (no tensors), the last conv
    last = max(int(k.split(".")[1]) for k in state if k.startswith("feats."))
    out = int(state[f"feats.{last}.weight"].shape[0])
    scale = math.isqrt(out // in_chans)
    if scale * scale * in_chans != out:
        raise SdStudioError(f"RealPLKSR's last conv has {out} channels, not {in_chans} x a square scale")
    lk = state["feats.1.lk.conv.weight"]
    return RealPLKSRConfig(
        in_chans=in_chans,
        dim=dim,
        n_blocks=last - 2,
        upscale=scale,
        kernel_size=int(lk.shape[2]),
        lk_channels=int(lk.shape[0]),
        use_ea="feats.1.attn.f.0.weight" in state,
        layer_norm="feats.1.layer_norm.weight" in state,
        dysample="to_img.offset.weight" in state,
    )
