"""HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer", arXiv:2205.04437): the
Hybrid Attention Transformer of the official release (``HAT_SRx4.pth``, ``HAT-L_SRx4_ImageNet-pretrain.pth``,
``Real_HAT_GAN_SRx4.pth``, ...) and the many community files trained with it (``4xNomos8kSCHAT-L``, ...).

It is SwinIR (:mod:`sdstudio.upscale.swinir`, whose window attention, MLP and reconstruction it reuses) with
two additions in each residual group (``layers.N``, a "RHAG"):

- each Swin block (a "HAB") adds a convolutional branch on its normalised input, ``conv_block``: conv, GELU,
  conv, channel attention (RCAN's squeeze and excitation), scaled by 0.01;
- after the blocks, an overlapping cross-attention block (``overlap_attn``, "OCAB"): queries from each window,
  keys and values from a larger window around it (``window * (1 + overlap_ratio)``, zero beyond the image),
  with its own relative-position bias table, then an MLP.

Module names equal the files' keys. The two index buffers the files carry (``relative_position_index_SA``,
``relative_position_index_OCA``) are computed here; window and overlap sizes are read from the bias tables'
shapes, widths from the tensors' shapes.
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
    Mlp,
    PatchEmbed,
    RelativeBias,
    UpscaleFactor,
    WindowAttention,
    WindowRestorer,
    count_modules,
    pixelshuffle_scale,
    pixelshuffle_upsample,
    shift_mask,
    unwindows,
    windows,
)

__all__ = ["HAT", "HATConfig", "hat_config", "hat_layout", "is_hat"]

StateDict = Mapping[str, Tensor]
CONV_SCALE = 0.01  # the convolutional branch's weight in every HAB (not in the file; the release's value)


@dataclass(frozen=True)
class HATConfig(UpscaleFactor):
    in_chans: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 16
    overlap_window: int = (
        24  # the cross-attention's key window: window_size + int(overlap_ratio * window_size)
    )
    mlp_hidden: int = 360
    cab_hidden: int = 60  # embed_dim // compress_ratio
    squeeze_hidden: int = 6  # embed_dim // squeeze_factor
    qkv_bias: bool = True
    patch_norm: bool = True
    resi_connection: str = "1conv"  # or "identity"
    upscale: int = 4
    num_feat: int = 64

    @property
    def align(self) -> int:
        """Tiles start on the window grid (see ``SwinIRConfig.align``). Unlike SwinIR's, a tile's output is
        not exactly the whole image's anywhere: the channel attention averages over the whole tile (its branch
        is scaled by 0.01, so the difference is small)."""
        return self.window_size

    def describe(self) -> str:
        return (f"HAT x{self.upscale} ({self.embed_dim} dim, {len(self.depths)} groups of "
                f"{'/'.join(map(str, self.depths))} blocks, window {self.window_size})")  # fmt: skip


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # the reference's Sequential: pool, conv, ReLU, conv, sigmoid (keys attention.1 and attention.3)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """The channel attention block: ``cab`` = conv, GELU, conv, channel attention."""

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        dim, hidden = config.embed_dim, config.cab_hidden
        self.cab = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 3, 1, 1),
            ChannelAttention(dim, config.squeeze_hidden),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.cab(x)


class HAB(nn.Module):
    """A Swin block with the convolutional branch beside its window attention."""

    def __init__(self, config: HATConfig, heads: int, shift: bool) -> None:
        super().__init__()
        c = config
        self.size, self.shift = c.window_size, c.window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(c.embed_dim)
        self.attn = WindowAttention(c.embed_dim, c.window_size, heads, c.qkv_bias)
        self.conv_block = CAB(c)
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # [B, H, W, C]
        h, w = x.shape[1:3]
        y = self.norm1(x)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = unwindows(self.attn(windows(y, self.size), mask if self.shift else None), self.size, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y + conv * CONV_SCALE
        return x + self.mlp(self.norm2(x))


class OCAB(RelativeBias):
    """Overlapping cross-attention: each window's queries attend to the larger window around it."""

    def __init__(self, config: HATConfig, heads: int) -> None:
        super().__init__()
        c = config
        self.size, self.outer, self.heads = c.window_size, c.overlap_window, heads
        self.norm1 = nn.LayerNorm(c.embed_dim)
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim, bias=c.qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((self.size + self.outer - 1) ** 2, heads)
        )
        self.register_buffer("index", self.relative_index(), persistent=False)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim)
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden)  # the reference's int(dim * mlp_ratio), as the blocks'

    def relative_index(self) -> Tensor:
        """[ws², ow²]: the bias row of each (query, key) pair, as the reference numbers them (key coordinates
        counted from the outer window's corner, query coordinates from the inner window's)."""
        ws, ow = self.size, self.outer

        def grid(n: int) -> Tensor:
            return torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")).flatten(1)

        rel = (grid(ow)[:, None, :] - grid(ws)[:, :, None]).permute(1, 2, 0) + (ws - ow + 1)  # [ws², ow², 2]
        return rel[..., 0] * (ws + ow - 1) + rel[..., 1]

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C]
        b, h, w, c = x.shape
        ws, ow, heads = self.size, self.outer, self.heads
        shortcut = x
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = windows(q, ws)  # [B, nW, ws², C]
        nw = q.shape[1]
        # keys and values: the ow x ow patch around each window, zero beyond the image
        kv = F.unfold(torch.cat((k, v), -1).permute(0, 3, 1, 2), ow, stride=ws, padding=(ow - ws) // 2)
        kv = kv.view(b, 2, c, ow * ow, nw).permute(1, 0, 4, 3, 2)  # [2, B, nW, ow², C]

        def split(t: Tensor) -> Tensor:  # [B, nW, n, C] -> [B, nW, heads, n, d]
            return t.unflatten(-1, (heads, c // heads)).transpose(2, 3)

        bias = self.relative_position_bias_table[self.index].permute(2, 0, 1).to(q.dtype)  # [heads, ws², ow²]
        out = F.scaled_dot_product_attention(split(q), split(kv[0]), split(kv[1]), attn_mask=bias)
        y = unwindows(out.transpose(2, 3).reshape(b, nw, ws * ws, c), ws, h, w)
        x = self.proj(y) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    def __init__(self, config: HATConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(HAB(config, heads, shift=i % 2 == 1) for i in range(depth))
        self.overlap_attn = OCAB(config, heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.overlap_attn(x)


class RHAG(nn.Module):
    """A residual hybrid attention group: ``residual_group``, ``conv`` over the image (or none), plus input."""

    def __init__(self, config: HATConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(config, depth, heads)
        dim = config.embed_dim
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if config.resi_connection == "1conv" else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.residual_group(x, mask).permute(0, 3, 1, 2)
        return self.conv(y).permute(0, 2, 3, 1) + x


class HAT(WindowRestorer):
    """``[B, C, H, W]`` in [0, 1] -> ``[B, C, H * scale, W * scale]``, any H and W."""

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        self.config = c = config
        dim = c.embed_dim
        self.register_buffer("mean", self._mean(), persistent=False)
        self.conv_first = nn.Conv2d(c.in_chans, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, c.patch_norm)
        self.layers = nn.ModuleList(RHAG(c, d, h) for d, h in zip(c.depths, c.num_heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1) if c.resi_connection == "1conv" else nn.Identity()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, c.num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
        self.upsample = pixelshuffle_upsample(c.upscale, c.num_feat)
        self.conv_last = nn.Conv2d(c.num_feat, c.in_chans, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        h, w = x.shape[2:]
        mean = self.mean.to(x.dtype)
        x = F.pad(x - mean, (0, -w % c.window_size, 0, -h % c.window_size), mode="reflect")
        first = self.conv_first(x)
        mask = shift_mask(*x.shape[2:], c.window_size, c.window_size // 2).to(x.device, x.dtype)
        y = self.patch_embed(first)
        for layer in self.layers:
            y = layer(y, mask)
        y = self.conv_after_body(self.norm(y).permute(0, 3, 1, 2)) + first
        y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        return (y + mean)[:, :, : h * c.scale, : w * c.scale]


# ------------------------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.residual_group.blocks.0."
_OCAB0 = "layers.0.residual_group.overlap_attn."


def is_hat(state: StateDict) -> bool:
    """SwinIR's block keys plus HAT's convolutional branch and overlapping cross-attention."""
    return all(
        k in state
        for k in (
            "conv_first.weight", "conv_last.weight", f"{_BLOCK0}norm1.weight", f"{_BLOCK0}conv_block.cab.0.weight",
            f"{_BLOCK0}conv_block.cab.3.attention.1.weight", f"{_OCAB0}relative_position_bias_table",
            f"{_OCAB0}qkv.weight",
        )
    )  # fmt: skip


def hat_layout(state: StateDict) -> dict[str, Tensor]:
    """The keys ``HAT`` loads: the index buffers the reference saves are dropped (computed here)."""
    return {
        k: v
        for k, v in state.items()
        if k not in ("relative_position_index_SA", "relative_position_index_OCA")
    }


def hat_config(state: StateDict) -> HATConfig:
    """Hyperparameters from key names and tensor shapes."""
    if "absolute_pos_embed" in state:
        raise SdStudioError("a HAT with an absolute position embedding (ape) runs only at its training size")
    first = state["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    rows = int(state[f"{_BLOCK0}attn.relative_position_bias_table"].shape[0])
    window = (math.isqrt(rows) + 1) // 2
    outer = math.isqrt(int(state[f"{_OCAB0}relative_position_bias_table"].shape[0])) - window + 1
    if (2 * window - 1) ** 2 != rows or outer < window:
        raise SdStudioError(f"bias tables of {rows} and "
                            f"{state[f'{_OCAB0}relative_position_bias_table'].shape[0]} rows are no HAT windows")  # fmt: skip
    groups = count_modules(state, "layers.")
    num_feat = int(state["conv_last.weight"].shape[1])
    return HATConfig(
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=tuple(count_modules(state, f"layers.{i}.residual_group.blocks.") for i in range(groups)),
        num_heads=tuple(
            int(state[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"].shape[1])
            for i in range(groups)
        ),
        window_size=window,
        overlap_window=outer,
        mlp_hidden=int(state[f"{_BLOCK0}mlp.fc1.weight"].shape[0]),
        cab_hidden=int(state[f"{_BLOCK0}conv_block.cab.0.weight"].shape[0]),
        squeeze_hidden=int(state[f"{_BLOCK0}conv_block.cab.3.attention.1.weight"].shape[0]),
        qkv_bias=f"{_BLOCK0}attn.qkv.bias" in state,
        patch_norm="patch_embed.norm.weight" in state,
        resi_connection="1conv" if "conv_after_body.weight" in state else "identity",
        upscale=pixelshuffle_scale(state),
        num_feat=num_feat,
    )
