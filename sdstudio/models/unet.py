"""The Stable Diffusion 1.x / 2.x denoising UNet (LDM ``openaimodel.UNetModel``).

Module attribute names equal the keys of the original single-file checkpoints with the
``model.diffusion_model.`` prefix stripped, so a real checkpoint loads with ``load_state_dict`` and no
renaming (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``, ``out.2.bias``...).

Architecture: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
built on the ADM UNet of Dhariwal & Nichol 2021. Only what SD uses is implemented: 2-D, no class
labels, no scale-shift norm, transformer blocks with GEGLU feed-forward, dropout omitted (inference and
fine-tuning of SD use 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.models.attention import attention
from sdstudio.models.configs import UNetConfig
from sdstudio.models.prepacked import Conv2d, Linear
from sdstudio.models.tome import TokenMerging, merge, plan_merge, unmerge

if TYPE_CHECKING:  # adapters import models: the type only, no import at run time
    from sdstudio.adapters.hypernetwork import HypernetworkStack

__all__ = ["Encoder", "UNetModel", "build_encoder", "timestep_embedding"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos | sin]`` as in LDM.

    Computed in float32 whatever the input dtype: in half precision ``t * freq`` loses the integer part
    of large timesteps.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]  # [batch, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [batch, 2 * half]
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as LDM's ``GroupNorm32`` (fp16 variance overflows).

    bf16 has fp32's range and PyTorch's bf16 kernels accumulate in fp32, so bf16 runs natively: on CPU
    3x faster than the round trip through a float32 copy, with the same error as that round trip's
    final cast (within bf16 rounding).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16:
            return super().forward(x)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, and a residual connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        # Index 2 is LDM's Dropout: kept as Identity so that the conv is ``out_layers.3``.
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # [batch, out, h, w]
        h = h + self.emb_layers(emb)[:, :, None, None]  # emb: [batch, emb_channels]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention over ``context`` (or over ``x`` itself when no context is given).

    ``hypernetworks``: AUTOMATIC1111's, rewriting the keys' and the values' input (``context``, or ``x`` in
    self-attention) before ``to_k`` / ``to_v`` (``sdstudio.adapters.hypernetwork``)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        # Index 1 is LDM's Dropout.
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Identity())

    def forward(
        self, x: Tensor, context: Tensor | None = None, hypernetworks: HypernetworkStack | None = None
    ) -> Tensor:
        context = x if context is None else context
        batch, tokens, _ = x.shape

        def split(t: Tensor) -> Tensor:  # [batch, n, inner] -> [batch, heads, n, head_dim]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        # hypernetworks: the keys' and the values' inputs apart, each [batch, n, context width]
        context_k, context_v = (context, context) if hypernetworks is None else hypernetworks.kv(context)
        q, k, v = split(self.to_q(x)), split(self.to_k(context_k)), split(self.to_v(context_v))
        out = attention(q, k, v)  # [batch, heads, tokens, head_dim]
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # [batch, tokens, inner]
        return self.to_out(out)


class GEGLU(nn.Module):
    """``x * gelu(gate)`` with ``x`` and ``gate`` from one projection (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj.gelu_gated(x)  # x * gelu(gate); fused into the products where packed


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # Index 1 is LDM's Dropout.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text context, and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        merging: TokenMerging | None = None,
        hw: tuple[int, int] = (0, 0),
        hypernetworks: HypernetworkStack | None = None,
    ) -> Tensor:
        plan = plan_merge(x, *hw, merging) if merging is not None else None
        if plan is None:
            x = x + self.attn1(self.norm1(x), None, hypernetworks)  # [batch, tokens, dim]
        else:  # token merging: self-attention over fewer tokens
            x = x + unmerge(self.attn1(merge(self.norm1(x), plan), None, hypernetworks), plan)
        x = x + self.attn2(self.norm2(x), context, hypernetworks)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map; projections are 1x1 convs (SD 1.x) or Linear (2.x)."""

    def __init__(self, channels: int, heads: int, head_dim: int, config: UNetConfig, depth: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = config.use_linear_in_transformer
        self.norm = GroupNorm32(config.norm_groups, channels, eps=1e-6)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if self.use_linear:
            self.proj_in = Linear(channels, inner)
        else:
            self.proj_in = Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, config.context_dim)
            for _ in range(depth)
        )
        if self.use_linear:
            self.proj_out = Linear(inner, channels)
        else:
            self.proj_out = Conv2d(inner, channels, 1)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        merging: TokenMerging | None = None,
        hypernetworks: HypernetworkStack | None = None,
    ) -> Tensor:
        height, width = x.shape[-2:]
        if merging is not None and height * width != merging.tokens:
            merging = None  # only the full-resolution maps are merged
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # [batch, inner, h, w]
        x = x.flatten(2).transpose(1, 2)  # [batch, h * w, channels]
        if self.use_linear:
            x = self.proj_in(x)  # [batch, h * w, inner]
        for block in self.transformer_blocks:
            x = block(x, context, merging, (height, width), hypernetworks)
        if self.use_linear:
            x = self.proj_out(x)  # [batch, h * w, channels]
        # Back to the residual's memory format; on channels-last that is a view, no copy.
        channels_last = (
            residual.is_contiguous(memory_format=torch.channels_last) and not residual.is_contiguous()
        )
        x = x.transpose(1, 2).unflatten(2, (height, width))
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # [batch, c, ceil(h / 2), ceil(w / 2)]


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # ``size`` is the next skip connection's: it differs from 2 * (h, w) when a latent side is not a
        # multiple of 2 ** (levels - 1) (LDM would fail there; diffusers does the same as this).
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: each layer gets what it needs (emb for ResBlocks, context for transformers)."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor,
        up_size: tuple[int, int] | None = None,
        merging: TokenMerging | None = None,
        hypernetworks: HypernetworkStack | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, merging, hypernetworks)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


def transformer(config: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
    """The SpatialTransformer of ``depth`` blocks at a level of ``channels`` channels."""
    heads, head_dim = config.heads_at(channels)
    return SpatialTransformer(channels, heads, head_dim, config, depth)


@dataclass(frozen=True)
class Encoder:
    """The UNet's encoder half, as modules not yet attached: what the UNet and ControlNet (a copy of it) share.
    ``skip_channels``: the channels of each input block's output."""

    time_embed: nn.Sequential
    label_emb: nn.Sequential | None
    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    skip_channels: tuple[int, ...]


def build_encoder(config: UNetConfig) -> Encoder:
    """``time_embed`` (and SDXL's ``label_emb``), ``input_blocks`` and ``middle_block`` of ``config``, in LDM's
    layout (so that their keys are the checkpoints')."""
    mc = config.model_channels
    emb_dim = mc * 4
    groups = config.norm_groups
    time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
    label_emb = None
    if config.adm_in_channels:  # sgm's "sequential" class embedding
        label_emb = nn.Sequential(
            nn.Sequential(Linear(config.adm_in_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        )
    input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(config.in_channels, mc, 3, padding=1))])
    skip_channels = [mc]
    ch = mc
    ds = 1  # downsampling factor of the current level
    levels = len(config.channel_mult)
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
            ch = mult * mc
            if ds in config.attention_resolutions:
                layers.append(transformer(config, ch, config.depth_at(level)))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != levels - 1:
            input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(
        ResBlock(ch, emb_dim, ch, groups),
        transformer(config, ch, config.middle_depth),
        ResBlock(ch, emb_dim, ch, groups),
    )
    return Encoder(time_embed, label_emb, input_blocks, middle_block, tuple(skip_channels))


class UNetModel(nn.Module):
    """The noise (or v) predictor: ``forward(x, timesteps, context)`` returns a tensor shaped as ``x``.

    Runs in the dtype of its weights: ``x`` and ``context`` are cast to it and the output has it.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        groups = config.norm_groups
        encoder = build_encoder(config)
        self.time_embed = encoder.time_embed
        if encoder.label_emb is not None:  # SDXL: the vector y joins the timestep embedding
            self.label_emb = encoder.label_emb
        self.input_blocks = encoder.input_blocks
        self.middle_block = encoder.middle_block
        skip_channels = list(encoder.skip_channels)  # consumed by the output blocks
        ch = skip_channels[-1]
        ds = 2 ** (len(config.channel_mult) - 1)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(transformer(config, ch, config.depth_at(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), Conv2d(ch, config.out_channels, 3, padding=1)
        )
        self._init_zero_outputs()

    def _init_zero_outputs(self) -> None:
        """Zero the last layer of every residual branch and of the network, as LDM's ``zero_module``."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero = [module.out_layers[3]]
            elif isinstance(module, SpatialTransformer):
                zero = [module.proj_out]
            else:
                continue
            for layer in zero:
                for p in layer.parameters():
                    nn.init.zeros_(p)
        for p in self.out[2].parameters():
            nn.init.zeros_(p)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        token_merging: float = 0.0,
        hypernetworks: HypernetworkStack | None = None,
        y: Tensor | None = None,
        control: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """x: [batch, in_channels, h, w] latents; timesteps: [batch] (fractional allowed);
        context: [batch, tokens, context_dim] text features; y: [batch, adm_in_channels] SDXL's vector
        (pooled text and size embeddings), required exactly when the config has ``adm_in_channels``.
        ``control``: ControlNet residuals (summed over the networks applied), one per input block and the
        middle block's last; each is added to that block's skip connection, the last to the middle block's
        output (lllyasviel's ``ControlledUnetModel``, diffusers' ``down_block_additional_residuals``).
        Returns [batch, out_channels, h, w].

        ``token_merging``: ToMe ratio for the full-resolution self-attention (0: exact; see ``tome``).
        ``hypernetworks``: AUTOMATIC1111 hypernetworks for every attention layer, prepared for the UNet's
        device and dtype (``sdstudio.adapters.hypernetwork.prepare_hypernetworks``); None: none."""
        dtype = self.dtype
        merging = TokenMerging(token_merging, x.shape[-2] * x.shape[-1]) if token_merging > 0 else None
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(dtype)  # [batch, mc]
        emb = self.time_embed(t_emb)  # [batch, 4 * mc]
        if self.config.adm_in_channels:
            if y is None or y.shape != (x.shape[0], self.config.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(f"this UNet needs y [{x.shape[0]}, {self.config.adm_in_channels}] (got {got})")
            emb = emb + self.label_emb(y.to(dtype))
        elif y is not None:
            raise ValueError("this UNet takes no vector y (only SDXL UNets have label_emb)")
        context = context.to(dtype)
        h = x.to(dtype)

        skips: list[Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb, context, merging=merging, hypernetworks=hypernetworks)
            skips.append(h)
        h = self.middle_block(h, emb, context, merging=merging, hypernetworks=hypernetworks)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"{len(control)} ControlNet residuals for a UNet of {len(skips)} input blocks + 1")
            skips = [s + c.to(s.dtype) for s, c in zip(skips, control)]
            h = h + control[-1].to(h.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [batch, ch + skip_ch, h, w]
            # An upsampling block resizes to the next skip connection's size.
            up_size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None
            h = block(h, emb, context, up_size, merging, hypernetworks)
        return self.out(h)
