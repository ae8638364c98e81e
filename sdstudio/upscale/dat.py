"""DAT (Chen et al. 2023, "Dual Aggregation Transformer for Image Super-Resolution", arXiv:2308.03364): the
official ``DAT_x2/x3/x4``, ``DAT-S``, ``DAT-light`` files and the community files trained with it
(``4xNomos8kDAT``, ``4x-*-DAT``, ...).

Residual groups (``layers.N``) of blocks that alternate two attentions, each followed by a spatial-gate
feed-forward network (``ffn``: its second half of channels passes a LayerNorm and a depthwise conv, then
gates the first half):

- even blocks, ``Adaptive_Spatial_Attention``: half the channels attend within ``split`` windows of
  (height, width) = (s0, s1), the other half within (s1, s0); the biases come from a small MLP over the
  relative offsets (``DynamicPosBias``); some blocks roll the image by half a window first (which ones:
  the reference's rule in :func:`shifted`);
- odd blocks, ``Adaptive_Channel_Attention``: channel-by-channel attention over all tokens (cosine
  similarity times a learned temperature per head).

Both mix in a depthwise conv of the values (``dwconv``), each branch gating the other (a pooled channel map
and a per-pixel spatial map: ``channel_interaction``, ``spatial_interaction``, with BatchNorms).

Module names equal the files' keys. The window size comes from the ``rpe_biases`` buffer the files carry
(the only tensor that holds it); the index buffers and masks are computed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.upscale.swinir import (
    RelativeBias,
    UpscaleFactor,
    WindowRestorer,
    count_modules,
    pixelshuffle_scale,
    pixelshuffle_upsample,
    resi_conv,
    shift_mask,
    unwindows,
    windows,
)

__all__ = ["DAT", "DATConfig", "dat_config", "dat_layout", "is_dat"]

StateDict = Mapping[str, Tensor]
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect")


@dataclass(frozen=True)
class DATConfig(UpscaleFactor):
    in_chans: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    split_size: tuple[int, int] = (8, 32)
    ffn_hidden: int = 360  # embed_dim * expansion_factor
    qkv_bias: bool = True
    resi_connection: str = "1conv"  # or "3conv"
    upsampler: str = "pixelshuffle"
    upscale: int = 4
    num_feat: int = 64

    def __post_init__(self) -> None:
        if self.upsampler not in UPSAMPLERS:
            raise SdStudioError(f"DAT upsampler {self.upsampler!r}: one of {UPSAMPLERS}")

    @property
    def align(self) -> int:
        """Tiles start on the windows' grid; the channel attention and the pooled channel maps see the whole
        tile, so tiles are close to, not equal to, the whole image."""
        return max(self.split_size)

    def describe(self) -> str:
        return (f"DAT x{self.upscale} ({self.embed_dim} dim, {len(self.depths)} groups of "
                f"{'/'.join(map(str, self.depths))} blocks, windows {self.split_size[0]}x{self.split_size[1]})")  # fmt: skip


def shifted(group: int, block: int) -> bool:
    """Whether a spatial block rolls its windows (the reference's rule): blocks 2, 6, 10, ... of even groups
    and 0, 4, 8, ... of odd ones."""
    return (group % 2 == 0 and block > 0 and (block - 2) % 4 == 0) or (group % 2 == 1 and block % 4 == 0)


def _mlp_stage(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, out))


class DynamicPosBias(nn.Module):
    """The bias of each relative offset and head from an MLP over the offset (not a table)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        pos = dim // 4
        self.pos_proj = nn.Linear(2, pos)
        self.pos1, self.pos2, self.pos3 = _mlp_stage(pos, pos), _mlp_stage(pos, pos), _mlp_stage(pos, heads)

    def forward(self, offsets: Tensor) -> Tensor:  # [n, 2] -> [n, heads]
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class SpatialAttention(RelativeBias):
    """Attention within windows of ``size`` (height, width) over a share of the channels."""

    def __init__(self, dim: int, heads: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size, self.heads = size, heads
        self.pos = DynamicPosBias(dim // 4, heads)
        self.register_buffer("offsets", self.relative_offsets(), persistent=False)
        self.register_buffer("index", self.relative_index(), persistent=False)

    def relative_offsets(self) -> Tensor:
        """[(2h-1)(2w-1), 2]: every offset (dy, dx) a pair of a window's tokens can have, row-major."""
        h, w = self.size
        grid = torch.meshgrid(torch.arange(1 - h, h), torch.arange(1 - w, w), indexing="ij")
        return torch.stack(grid).flatten(1).T.float()

    def relative_index(self) -> Tensor:
        h, w = self.size
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        return (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1

    def reset_buffers(self, device: torch.device | None = None) -> None:
        super().reset_buffers(device)
        self.offsets = self.relative_offsets().to(device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # each [B, H, W, c]
        h, w, c = q.shape[1:]

        def split(t: Tensor) -> Tensor:  # [B, H, W, c] -> [B, nW, heads, N, d]
            return windows(t, self.size).unflatten(-1, (self.heads, c // self.heads)).transpose(2, 3)

        bias = self.pos(self.offsets.to(q.dtype))[self.index].permute(2, 0, 1)  # [heads, N, N]
        if mask is not None:
            bias = bias + mask.to(q.dtype)[:, None]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        return unwindows(out.transpose(2, 3).flatten(-2), self.size, h, w)


def _dwconv(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())


class _Interactions(nn.Module):
    """The two gates the attention and the conv branch give each other."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = _dwconv(dim)
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8), nn.GELU(),
            nn.Conv2d(dim // 8, dim, 1),
        )  # fmt: skip
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(), nn.Conv2d(dim // 16, 1, 1)
        )


class AdaptiveSpatialAttention(_Interactions):
    def __init__(self, config: DATConfig, heads: int, shift: bool) -> None:
        super().__init__(config.embed_dim)
        dim, (s0, s1) = config.embed_dim, config.split_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sizes = ((s0, s1), (s1, s0))
        self.attns = nn.ModuleList(SpatialAttention(dim // 2, heads // 2, size) for size in self.sizes)
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C]
        h, w, c = x.shape[1:]
        qkv = self.qkv(x)
        v_image = qkv[..., 2 * c :].permute(0, 3, 1, 2)
        multiple = max(self.sizes[0])
        qkv = F.pad(qkv, (0, 0, 0, -w % multiple, 0, -h % multiple))  # zeros after the projection
        hp, wp = qkv.shape[1:3]
        outs = []
        for i, (attn, size) in enumerate(zip(self.attns, self.sizes, strict=True)):
            part = qkv.unflatten(-1, (3, c))[..., i * c // 2 : (i + 1) * c // 2]  # [B, H, W, 3, c/2]
            mask = None
            if self.shift:
                roll = (size[0] // 2, size[1] // 2)  # (s0/2, s1/2), and (s1/2, s0/2) for the second half
                part = torch.roll(part, (-roll[0], -roll[1]), dims=(1, 2))
                mask = shift_mask(hp, wp, size, roll).to(x.device)
            out = attn(part[..., 0, :], part[..., 1, :], part[..., 2, :], mask)
            if self.shift:
                out = torch.roll(out, roll, dims=(1, 2))
            outs.append(out[:, :h, :w])
        attended = torch.cat(outs, -1)
        conv = self.dwconv(v_image)
        channel = torch.sigmoid(self.channel_interaction(conv)).permute(0, 2, 3, 1)  # [B, 1, 1, C]
        spatial = torch.sigmoid(self.spatial_interaction(attended.permute(0, 3, 1, 2)))  # [B, 1, H, W]
        return self.proj(attended * channel + (spatial * conv).permute(0, 2, 3, 1))


class AdaptiveChannelAttention(_Interactions):
    def __init__(self, config: DATConfig, heads: int) -> None:
        super().__init__(config.embed_dim)
        dim = config.embed_dim
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C]
        b, h, w, c = x.shape
        # [3, B, heads, d, N]: each head's channels attend to each other over all tokens
        q, k, v = self.qkv(x).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        v_image = v.reshape(b, c, h, w)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        attended = (attn.softmax(-1) @ v).reshape(b, c, h, w)  # channels head-major, as v's
        conv = self.dwconv(v_image)
        channel = torch.sigmoid(self.channel_interaction(attended))  # [B, C, 1, 1]
        spatial = torch.sigmoid(self.spatial_interaction(conv))  # [B, 1, H, W]
        return self.proj((attended * spatial + conv * channel).permute(0, 2, 3, 1))


class SpatialGate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, 2c]
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * self.conv(self.norm(x2).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SGFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x))))


class DATB(nn.Module):
    def __init__(self, config: DATConfig, heads: int, group: int, block: int) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = (
            AdaptiveSpatialAttention(config, heads, shifted(group, block))
            if block % 2 == 0
            else AdaptiveChannelAttention(config, heads)
        )
        self.ffn = SGFN(dim, config.ffn_hidden)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, config: DATConfig, group: int) -> None:
        super().__init__()
        depth, heads = config.depths[group], config.num_heads[group]
        self.blocks = nn.ModuleList(DATB(config, heads, group, i) for i in range(depth))
        self.conv = resi_conv(config.embed_dim, config.resi_connection)

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C]
        y = x
        for block in self.blocks:
            y = block(y)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class DAT(WindowRestorer):
    """``[B, C, H, W]`` in [0, 1] -> ``[B, C, H * scale, W * scale]``, any H and W."""

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.config = c = config
        dim = c.embed_dim
        self.register_buffer("mean", self._mean(), persistent=False)
        self.conv_first = nn.Conv2d(c.in_chans, dim, 3, 1, 1)
        self.before_RG = nn.Sequential(nn.Identity(), nn.LayerNorm(dim))  # the reference's (Rearrange, norm)
        self.layers = nn.ModuleList(ResidualGroup(c, i) for i in range(len(c.depths)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = resi_conv(dim, c.resi_connection)
        if c.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, c.num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
            self.upsample = pixelshuffle_upsample(c.upscale, c.num_feat)
            self.conv_last = nn.Conv2d(c.num_feat, c.in_chans, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(
                nn.Conv2d(dim, c.upscale**2 * c.in_chans, 3, 1, 1), nn.PixelShuffle(c.upscale)
            )

    def forward(self, x: Tensor) -> Tensor:
        mean = self.mean.to(x.dtype)
        first = self.conv_first(x - mean)
        y = self.before_RG(first.permute(0, 2, 3, 1))
        for layer in self.layers:
            y = layer(y)
        y = self.conv_after_body(self.norm(y).permute(0, 3, 1, 2)) + first
        if self.config.upsampler == "pixelshuffle":
            y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        else:
            y = self.upsample(y)
        return y + mean


# ------------------------------------------------------------------------------------------- detection

_ATTN0 = "layers.0.blocks.0.attn."


def is_dat(state: StateDict) -> bool:
    return all(
        k in state
        for k in ("conv_first.weight", "before_RG.1.weight", f"{_ATTN0}qkv.weight", f"{_ATTN0}attns.0.pos.pos_proj.weight",
                  "layers.0.blocks.0.ffn.sg.conv.weight")
    )  # fmt: skip


def dat_layout(state: StateDict) -> dict[str, Tensor]:
    """The keys ``DAT`` loads: the reference's buffers (offsets, indices, masks) dropped, computed here."""
    drop = (".rpe_biases", ".relative_position_index", ".attn_mask_0", ".attn_mask_1")
    return {k: v for k, v in state.items() if not k.endswith(drop)}


def dat_config(state: StateDict) -> DATConfig:
    """Hyperparameters from keys and shapes; the window from ``rpe_biases`` (its last offset + 1)."""
    offsets = state.get(f"{_ATTN0}attns.0.rpe_biases")
    if offsets is None or offsets.ndim != 2:
        raise SdStudioError(
            f"a DAT file without {_ATTN0}attns.0.rpe_biases: its window size is in no other tensor"
        )
    first = state["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    groups = count_modules(state, "layers.")
    depths = tuple(count_modules(state, f"layers.{i}.blocks.") for i in range(groups))
    heads = tuple(
        int(state[f"layers.{i}.blocks.1.attn.temperature"].shape[0])
        if depths[i] >= 2
        else 2 * int(state[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0])
        for i in range(groups)
    )
    if "conv_last.weight" in state:
        upsampler, upscale = "pixelshuffle", pixelshuffle_scale(state)
        num_feat = int(state["upsample.0.weight"].shape[1])
    else:
        upsampler, num_feat = "pixelshuffledirect", 64
        upscale = math.isqrt(int(state["upsample.0.weight"].shape[0]) // in_chans)
    return DATConfig(
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        split_size=(int(offsets[-1, 0]) + 1, int(offsets[-1, 1]) + 1),
        ffn_hidden=int(state["layers.0.blocks.0.ffn.fc1.weight"].shape[0]),
        qkv_bias=f"{_ATTN0}qkv.bias" in state,
        resi_connection="1conv" if "conv_after_body.weight" in state else "3conv",
        upsampler=upsampler,
        upscale=upscale,
        num_feat=num_feat,
    )
