"""The Stable Diffusion KL autoencoder (LDM ``autoencoder.AutoencoderKL``).

Module attribute names equal the original single-file checkpoint keys with ``first_stage_model.``
stripped (``encoder.down.0.downsample.conv.weight``, ``decoder.up.3.block.2.conv2.weight``...), so a
real checkpoint loads with ``load_state_dict`` and no renaming. The latent scale factor
(``VAEConfig.scale_factor``) is applied by callers, not here.

Architecture: Esser et al. 2021 (VQGAN) encoder/decoder with a KL bottleneck, Rombach et al. 2022.
SD's configs have no attention outside the mid blocks (``attn_resolutions: []``) and dropout 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.models.attention import attention
from sdstudio.models.configs import VAEConfig

__all__ = ["AutoencoderKL", "LatentDistribution"]


@dataclass(frozen=True)
class LatentDistribution:
    """The diagonal Gaussian posterior q(z | x); ``logvar`` is clamped to [-30, 20] as in LDM."""

    mean: Tensor  # [batch, embed_dim, h, w]
    logvar: Tensor  # [batch, embed_dim, h, w]

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: Tensor) -> Tensor:
        """``mean + std * noise``; the caller draws ``noise`` (shaped as ``mean``) so seeds stay its own."""
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with 1x1 conv projections (checkpoint layout)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [batch, c, h, w] -> [batch, 1, h * w, c]
            return t.flatten(2).transpose(1, 2)[:, None]

        out = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right and bottom only, so [h, w] -> [h / 2, w / 2] exactly for even sides.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _DownLevel(nn.Module):
    """One encoder resolution: ``block.M`` then an optional ``downsample`` (LDM's empty ``attn`` omitted)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class _UpLevel(nn.Module):
    """One decoder resolution: ``block.M`` then an optional ``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = config.ch
        for i, mult in enumerate(config.ch_mult):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(ch, config.ch * mult, groups))
                ch = config.ch * mult
            last = i == len(config.ch_mult) - 1
            self.down.append(_DownLevel(blocks, None if last else Downsample(ch)))
        self.mid = _MidBlock(ch, groups)
        self.norm_out = _norm(ch, groups)
        # Mean and log-variance of the posterior.
        self.conv_out = nn.Conv2d(ch, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [batch, ch, H, W]
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # [batch, ch * ch_mult[-1], H / f, W / f]
        return self.conv_out(F.silu(self.norm_out(h)))  # [batch, 2 * z_channels, H / f, W / f]


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups = config.norm_groups
        ch = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, ch, 3, padding=1)
        self.mid = _MidBlock(ch, groups)
        levels: list[_UpLevel] = []
        # Built from the lowest resolution up; ``up.0`` is the full-resolution level, as in LDM.
        for i in reversed(range(len(config.ch_mult))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, config.ch * config.ch_mult[i], groups))
                ch = config.ch * config.ch_mult[i]
            levels.insert(0, _UpLevel(blocks, Upsample(ch) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # [batch, ch * ch_mult[-1], h, w]
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [batch, out_ch, h * f, w * f]


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] ``[batch, 3, H, W]`` <-> latents ``[batch, embed_dim, H / f, W / f]`` (unscaled).

    Runs in the dtype of its weights: inputs are cast to it and outputs have it.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: Tensor) -> LatentDistribution:
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight)))  # [batch, 2 * embed_dim, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean=mean, logvar=logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight)))  # [batch, out_ch, H, W], ~[-1, 1]
