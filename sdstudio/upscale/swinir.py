"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer", arXiv:2108.10257): the
upscaler and restorer files of the official release (``001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth``,
``003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth``, the lightweight ``002_*`` and the denoising / JPEG
``004``-``006`` files) and community files trained with it (``4x-*-SwinIR``), which AUTOMATIC1111 lists under
``models/SwinIR`` and ComfyUI loads through spandrel.

The network: a 3x3 conv into ``embed_dim`` channels; residual Swin transformer blocks (``layers.N``: a
``residual_group`` of Swin blocks, window attention with a learned relative-position bias, every second block
on windows shifted by half a window, then a conv and a residual); a LayerNorm, a conv and a residual around
the whole body; then one of four reconstructions: ``pixelshuffle`` (classical SR), ``pixelshuffledirect``
(lightweight SR), ``nearest+conv`` (real-world SR) or none (denoising, JPEG: the input plus a conv). Images
are padded (reflected) to a multiple of the window, shifted by the DIV2K mean and cropped back afterwards.

Module names equal the files' keys; the buffers a file may carry (``relative_position_index``,
``attn_mask``) are computed here instead, for any image size. Hyperparameters are read from key names and
tensor shapes as spandrel reads them (:func:`swinir_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError

if TYPE_CHECKING:
    from sdstudio.upscale.hat import HATConfig

__all__ = [
    "RelativeBias",
    "SwinIR",
    "SwinIRConfig",
    "UpscaleFactor",
    "WindowAttention",
    "WindowRestorer",
    "count_modules",
    "is_swinir",
    "pixelshuffle_scale",
    "resi_conv",
    "shift_mask",
    "swinir_config",
    "swinir_layout",
]

StateDict = Mapping[str, Tensor]
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # the training set's RGB mean, subtracted from the input
_MASKED = -100.0  # what the reference adds to attention logits across a shifted window's seams


class UpscaleFactor:
    """The ``scale`` and ``image_channels`` a loaded upscaler's config answers (HAT's and DAT's: their network
    upscales by ``upscale`` without a pixel-unshuffle first)."""

    in_chans: int
    upscale: int

    @property
    def scale(self) -> int:
        return self.upscale

    @property
    def image_channels(self) -> int:
        return self.in_chans


@dataclass(frozen=True)
class SwinIRConfig:
    in_chans: int = 3  # image channels (before ``start_unshuffle``)
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)  # Swin blocks per residual group
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_hidden: int = 360
    qkv_bias: bool = True
    patch_norm: bool = True  # a LayerNorm after the first conv's tokens
    resi_connection: str = "1conv"  # "1conv" or "3conv" (a bottleneck of 3 convs)
    upsampler: str = "pixelshuffle"
    upscale: int = 4  # the reconstruction's factor (``start_unshuffle`` times the file's scale)
    num_feat: int = 64
    img_range: float = 1.0  # 255 for the JPEG models (window 7)
    img_size: int = 64  # training patch size: blocks of a smaller image do not shift (the reference's rule)
    start_unshuffle: int = 1  # a pixel-unshuffle before the first conv (``conv_first.1``: community x1/x2)

    def __post_init__(self) -> None:
        if self.upsampler not in UPSAMPLERS:
            raise SdStudioError(f"SwinIR upsampler {self.upsampler!r}: one of {UPSAMPLERS}")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise SdStudioError(f"SwinIR depths {self.depths} and heads {self.num_heads} do not pair up")

    @property
    def scale(self) -> int:
        return self.upscale // self.start_unshuffle

    @property
    def align(self) -> int:
        """Tiles start at multiples of this: windows (of the unshuffled grid) then fall as on the whole
        image, so a tile's output equals the whole image's away from its cut edges."""
        return self.window_size * self.start_unshuffle

    @property
    def image_channels(self) -> int:
        return self.in_chans

    def describe(self) -> str:
        kind = {"pixelshuffle": "classical", "pixelshuffledirect": "lightweight", "nearest+conv": "real-world",
                "": "restoration"}[self.upsampler]  # fmt: skip
        return (f"SwinIR x{self.scale} ({kind}, {self.embed_dim} dim, {len(self.depths)} groups of "
                f"{'/'.join(map(str, self.depths))} blocks, window {self.window_size})")  # fmt: skip


Size = int | tuple[int, int]  # a square window's side, or (height, width) of a rectangular one


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def windows(x: Tensor, size: Size) -> Tensor:
    """[B, H, W, C] -> [B, nW, wh * ww, C], windows in row-major order."""
    (wh, ww), (b, h, w, c) = _pair(size), x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, wh * ww, c)


def unwindows(x: Tensor, size: Size, h: int, w: int) -> Tensor:
    """The inverse of :func:`windows`."""
    (wh, ww), b, c = _pair(size), x.shape[0], x.shape[-1]
    x = x.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(h: int, w: int, size: Size, shift: Size) -> Tensor:
    """[nW, N, N] for an image rolled back by ``shift``: 0 between tokens of one region of the rolled image,
    -100 across regions (the reference's cyclic-shift mask)."""
    (wh, ww), (sh, sw) = _pair(size), _pair(shift)
    region = torch.zeros(1, h, w, 1)
    rows = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None))
    cols = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in rows for ws in cols):
        region[:, hs, ws, :] = i
    ids = windows(region, (wh, ww))[0, :, :, 0]  # [nW, N]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, _MASKED, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RelativeBias(nn.Module):
    """An attention with a learned bias per relative offset and head: ``relative_position_bias_table``
    indexed by the computed buffer ``index`` (:meth:`relative_index`)."""

    index: Tensor

    def relative_index(self) -> Tensor:
        raise NotImplementedError

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Compute the buffers again (after ``to_empty``)."""
        self.index = self.relative_index().to(device)


class WindowAttention(RelativeBias):
    """Multi-head self-attention inside each window with a learned bias per relative offset and head."""

    def __init__(self, dim: int, size: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.size, self.heads = size, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, heads))
        self.register_buffer("index", self.relative_index(), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_index(self) -> Tensor:
        """[N, N]: the bias table's row for each pair of tokens of a window (their offset, row-major)."""
        size = self.size
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (size - 1)  # [N, N, 2]
        return rel[..., 0] * (2 * size - 1) + rel[..., 1]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x`` [B, nW, N, C]; ``mask`` [nW, N, N] or None."""
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.index].permute(2, 0, 1).to(q.dtype)  # [heads, N, N]
        if mask is not None:
            bias = bias + mask.to(q.dtype)[:, None]  # [nW, heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, nW, heads, N, hd]
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinTransformerBlock(nn.Module):
    def __init__(self, config: SwinIRConfig, heads: int, shift: bool) -> None:
        super().__init__()
        c = config
        size = c.window_size
        if c.img_size <= size:  # the reference shrinks the window to a small training size, unshifted
            size, shift = c.img_size, False
        self.size, self.shift = size, size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(c.embed_dim)
        self.attn = WindowAttention(c.embed_dim, size, heads, c.qkv_bias)
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden)

    def forward(self, x: Tensor, masks: dict[int, Tensor]) -> Tensor:  # [B, H, W, C]
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        mask = masks.get(self.shift) if self.shift else None
        if self.shift and mask is None:
            mask = masks[self.shift] = shift_mask(h, w, self.size, self.shift).to(x.device)
        y = unwindows(self.attn(windows(y, self.size), mask), self.size, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


def resi_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )  # fmt: skip


class ResidualGroup(nn.Module):
    def __init__(self, config: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(config, heads, shift=i % 2 == 1) for i in range(depth)
        )

    def forward(self, x: Tensor, masks: dict[int, Tensor]) -> Tensor:
        for block in self.blocks:
            x = block(x, masks)
        return x


class RSTB(nn.Module):
    """A residual Swin transformer block: ``residual_group``, then ``conv`` over the image, plus the input."""

    def __init__(self, config: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.residual_group = ResidualGroup(config, depth, heads)
        self.conv = resi_conv(config.embed_dim, config.resi_connection)

    def forward(self, x: Tensor, masks: dict[int, Tensor]) -> Tensor:  # [B, H, W, C]
        y = self.residual_group(x, masks).permute(0, 3, 1, 2)
        return self.conv(y).permute(0, 2, 3, 1) + x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, H, W, C]
        x = x.permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class WindowRestorer(nn.Module):
    """What SwinIR and HAT share around their networks: the scale, the input mean and computed buffers."""

    config: SwinIRConfig | HATConfig
    conv_first: nn.Conv2d

    @property
    def scale(self) -> int:
        return self.config.scale

    def _mean(self) -> Tensor:
        mean = DIV2K_MEAN if self.config.in_chans == 3 else (0.0,) * self.config.in_chans
        return torch.tensor(mean).view(1, -1, 1, 1)

    def reset_buffers(self) -> None:
        """Compute the buffers again (after ``to_empty``: a model built on the meta device)."""
        device = self.conv_first.weight.device
        self.mean = self._mean().to(device)
        for module in self.modules():
            if isinstance(module, RelativeBias):
                module.reset_buffers(device)


class SwinIR(WindowRestorer):
    """``[B, C, H, W]`` in [0, 1] -> ``[B, C, H * scale, W * scale]``, any H and W."""

    def __init__(self, config: SwinIRConfig) -> None:
        super().__init__()
        self.config = c = config
        dim, feat = c.embed_dim, c.num_feat
        self.register_buffer("mean", self._mean(), persistent=False)
        self.conv_first = nn.Conv2d(c.in_chans * c.start_unshuffle**2, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, c.patch_norm)
        self.layers = nn.ModuleList(RSTB(c, d, h) for d, h in zip(c.depths, c.num_heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = resi_conv(dim, c.resi_connection)
        out = c.in_chans
        if c.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU(0.01))
        if c.upsampler == "pixelshuffle":
            self.upsample = pixelshuffle_upsample(c.upscale, feat)
            self.conv_last = nn.Conv2d(feat, out, 3, 1, 1)
        elif c.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(dim, c.upscale**2 * out, 3, 1, 1), nn.PixelShuffle(c.upscale)
            )
        elif c.upsampler == "nearest+conv":
            self.ups = int(math.log2(c.upscale))
            for i in range(1, self.ups + 1):
                self.add_module(f"conv_up{i}", nn.Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(feat, out, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(dim, out, 3, 1, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        masks: dict[int, Tensor] = {}  # the shifted windows' mask, once per image size
        y = self.patch_embed(x)
        for layer in self.layers:
            y = layer(y, masks)
        return self.norm(y).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        h, w = x.shape[2:]
        multiple = c.window_size * c.start_unshuffle
        x = F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="reflect")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * c.img_range
        if c.start_unshuffle > 1:
            x = F.pixel_unshuffle(x, c.start_unshuffle)
        first = self.conv_first(x)
        y = self.conv_after_body(self.forward_features(first)) + first
        if c.upsampler == "pixelshuffle":
            y = self.conv_last(self.upsample(self.conv_before_upsample(y)))
        elif c.upsampler == "pixelshuffledirect":
            y = self.upsample(y)
        elif c.upsampler == "nearest+conv":
            y = self.conv_before_upsample(y)
            for i in range(1, self.ups + 1):
                conv = getattr(self, f"conv_up{i}")
                y = F.leaky_relu(conv(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            y = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        else:
            y = x + self.conv_last(y)
        y = y / c.img_range + mean
        return y[:, :, : h * c.scale, : w * c.scale]


def pixelshuffle_upsample(scale: int, feat: int) -> nn.Sequential:
    """The reference's ``Upsample``: x2 stages (conv to 4x the channels, pixel shuffle), or one x3 stage."""
    if scale == 3:
        return nn.Sequential(nn.Conv2d(feat, 9 * feat, 3, 1, 1), nn.PixelShuffle(3))
    layers: list[nn.Module] = []
    for _ in range(int(math.log2(scale))):
        layers += [nn.Conv2d(feat, 4 * feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.residual_group.blocks.0."


def is_swinir(state: StateDict) -> bool:
    """SwinIR's keys (spandrel's test), and not Swin2SR's (its attention has a ``logit_scale``)."""
    return (
        f"{_BLOCK0}norm1.weight" in state
        and f"{_BLOCK0}mlp.fc1.bias" in state
        and f"{_BLOCK0}attn.relative_position_bias_table" in state
        and ("conv_first.weight" in state or "conv_first.1.weight" in state)
        and f"{_BLOCK0}attn.logit_scale" not in state
    )


def swinir_layout(state: StateDict) -> dict[str, Tensor]:
    """The keys this module's ``SwinIR`` loads: ``conv_first.1.*`` (a pixel-unshuffle before the conv)
    renamed to ``conv_first.*``, the buffers the reference saves (``relative_position_index``,
    ``attn_mask``) dropped: they are computed for each image size."""
    out = {}
    for key, value in state.items():
        if key.endswith((".relative_position_index", ".attn_mask")):
            continue
        out[key.replace("conv_first.1.", "conv_first.", 1) if key.startswith("conv_first.1.") else key] = (
            value
        )
    return out


def count_modules(state: StateDict, prefix: str) -> int:
    """How many consecutive ``prefix{i}.`` modules the state dict has, from 0."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def swinir_config(state: StateDict) -> SwinIRConfig:
    """Hyperparameters from the original (not yet :func:`swinir_layout`-ed) state dict's keys and shapes."""
    first = state.get("conv_first.weight", state.get("conv_first.1.weight"))
    if first is None or first.ndim != 4:
        raise SdStudioError("SwinIR without a 4-D conv_first weight")
    if "absolute_pos_embed" in state:
        raise SdStudioError("a SwinIR with an absolute position embedding (ape) runs only at its training size; "
                            "no released file uses one")  # fmt: skip
    embed_dim, in_ch = int(first.shape[0]), int(first.shape[1])
    unshuffle = math.isqrt(in_ch // 3) if "conv_first.1.weight" in state else 1
    in_chans = in_ch // unshuffle**2
    table = state[f"{_BLOCK0}attn.relative_position_bias_table"]
    window = (math.isqrt(int(table.shape[0])) + 1) // 2
    if (2 * window - 1) ** 2 != table.shape[0]:
        raise SdStudioError(f"a relative-position table of {table.shape[0]} rows is no square window's")
    img_size = 64
    mask = state.get("layers.0.residual_group.blocks.1.attn_mask")
    if mask is not None:
        img_size = math.isqrt(int(mask.shape[0])) * window
    groups = count_modules(state, "layers.")
    depths = tuple(count_modules(state, f"layers.{i}.residual_group.blocks.") for i in range(groups))
    heads = tuple(
        int(state[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1])
        for i in range(groups)
    )
    if "conv_before_upsample.0.weight" in state:
        upsampler = "nearest+conv" if "conv_up1.weight" in state else "pixelshuffle"
    elif "upsample.0.weight" in state:
        upsampler = "pixelshuffledirect"
    else:
        upsampler = ""
    num_feat, upscale = 64, 1
    if upsampler == "nearest+conv":
        upscale = 2 ** _count_convs_up(state)
        num_feat = int(state["conv_up1.weight"].shape[0])
    elif upsampler == "pixelshuffle":
        upscale = pixelshuffle_scale(state)
        num_feat = int(state["upsample.0.weight"].shape[1])
    elif upsampler == "pixelshuffledirect":
        upscale = math.isqrt(int(state["upsample.0.weight"].shape[0]) // in_chans)
    return SwinIRConfig(
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_hidden=int(state[f"{_BLOCK0}mlp.fc1.bias"].shape[0]),
        qkv_bias=f"{_BLOCK0}attn.qkv.bias" in state,
        patch_norm="patch_embed.norm.weight" in state,
        resi_connection="1conv" if "conv_after_body.weight" in state else "3conv",
        upsampler=upsampler,
        upscale=upscale,
        num_feat=num_feat,
        img_range=255.0 if window == 7 else 1.0,  # the JPEG models: the only ones with window 7 (spandrel)
        img_size=img_size,
        start_unshuffle=unshuffle,
    )


def pixelshuffle_scale(state: StateDict) -> int:
    """The factor of a ``pixelshuffle_upsample`` stack under ``upsample.``: each conv's output channels over
    its input channels are the square of its stage's factor."""
    scale = 1
    for i in range(0, 10, 2):
        w = state.get(f"upsample.{i}.weight")
        if w is None:
            break
        scale *= math.isqrt(int(w.shape[0]) // int(w.shape[1]))
    return scale


def _count_convs_up(state: StateDict) -> int:
    n = 0
    while f"conv_up{n + 1}.weight" in state:
        n += 1
    return n
