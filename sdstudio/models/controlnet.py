"""ControlNet: a trainable copy of the UNet's encoder that reads a control image (edges, depth, pose...) and
returns one residual per skip connection and one for the middle block, which the UNet adds to its own.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", 3.2 and 3.3;
module names are those of lllyasviel's ``cldm/cldm.py`` ``ControlNet`` (``time_embed``, ``input_blocks``,
``middle_block`` as in the UNet, plus ``input_hint_block``, ``zero_convs``, ``middle_block_out``), so the
original files (``control_v11p_sd15_canny.pth``: ``control_model.*``, or the same keys unprefixed) load with
``load_state_dict`` and no renaming. Diffusers-layout ControlNets (a folder with ``config.json``, or one
file with ``controlnet_cond_embedding.*`` keys) are converted to these names in one place,
:func:`controlnet_from_diffusers`; the UNet part of that conversion is ``diffusers_convert.unet_to_ldm``.

What the weights cannot tell (attention heads, norm groups) follows the base model's ``UNetConfig`` when
one is given (``load_controlnet(path, base=...)``), else a diffusers ``config.json``, else SD's conventions
(8 heads with conv ``proj_in`` (SD 1.x), 64-channel heads with linear ``proj_in`` (SD 2.x, SDXL)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import UNetConfig
from sdstudio.models.detect import UNET, detect_unet
from sdstudio.models.diffusers_convert import unet_to_ldm
from sdstudio.models.loading import read_state_dict
from sdstudio.models.prepacked import Conv2d
from sdstudio.models.sdxl import SIZE_EMBEDDING
from sdstudio.models.unet import (
    ResBlock,
    SpatialTransformer,
    UNetModel,
    build_encoder,
    timestep_embedding,
)

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "controlnet_from_diffusers",
    "controlnet_from_unet",
    "detect_controlnet",
    "fit_to_unet",
    "load_controlnet",
]

log = logging.getLogger(__name__)

PREFIX = "control_model."  # cldm's ControlLDM keeps the ControlNet under this name
# Keys every ControlNet in our layout has; a state dict without them is something else.
_REQUIRED = ("time_embed.0.weight", "input_blocks.0.0.weight", "input_hint_block.0.weight", "zero_convs.0.0.weight",
             "middle_block_out.0.weight")  # fmt: skip


@dataclass(frozen=True)
class ControlNetConfig:
    """The encoder half of ``unet`` (its ``out_channels`` unused) and the hint encoder.

    ``hint_block_channels``: widths of the hint encoder's levels (cldm's 16, 32, 96, 256; diffusers'
    ``conditioning_embedding_out_channels``): a 3x3 conv to the first, then per level a 3x3 conv and a
    stride-2 3x3 conv to the next, then a 3x3 conv to ``model_channels``; the hint is
    ``2 ** (len - 1)`` times the latents' size. ``global_average_pooling``: the residuals are averaged over
    space (the shuffle ControlNet's yaml; diffusers' ``global_pool_conditions``); the weights cannot tell.
    """

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_average_pooling: bool = False

    @property
    def hint_downsample(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)


def _hint_block(config: ControlNetConfig) -> nn.Sequential:
    """cldm's ``input_hint_block``: convs at even indices, SiLU between them, so the keys are ``.0, .2, ..., .14``."""
    widths = config.hint_block_channels
    layers: list[nn.Module] = [Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, following in itertools.pairwise(widths):
        layers += [Conv2d(width, width, 3, padding=1), nn.SiLU()]
        layers += [Conv2d(width, following, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(Conv2d(widths[-1], config.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """``forward(x, hint, timesteps, context, y=None)`` -> the residuals. Runs in the dtype of its weights."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        unet = config.unet
        # The UNet's encoder half (its keys are the UNet's), a zero conv per input block and the middle's.
        encoder = build_encoder(unet)
        self.time_embed = encoder.time_embed
        if encoder.label_emb is not None:  # SDXL's vector y
            self.label_emb = encoder.label_emb
        self.input_hint_block = _hint_block(config)
        self.input_blocks = encoder.input_blocks
        self.zero_convs = nn.ModuleList(nn.Sequential(Conv2d(w, w, 1)) for w in encoder.skip_channels)
        self.middle_block = encoder.middle_block
        ch = encoder.skip_channels[-1]
        self.middle_block_out = nn.Sequential(Conv2d(ch, ch, 1))
        self._init_zero_layers()

    def _init_zero_layers(self) -> None:
        """The paper's zero convolutions (3.2): the zero convs, the middle one and the hint encoder's last conv
        start at zero, so that an untrained ControlNet adds nothing; residual branches as LDM's."""
        zero: list[nn.Module] = [*self.zero_convs, self.middle_block_out, self.input_hint_block[-1]]
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero.append(module.out_layers[3])
            elif isinstance(module, SpatialTransformer):
                zero.append(module.proj_out)
        for layer in zero:
            for p in layer.parameters():
                nn.init.zeros_(p)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embed_hint(self, hint: Tensor) -> Tensor:
        """The hint encoder's output for a control image [batch or 1, hint_channels, H, W]: [.., mc, H/8, W/8].
        It depends on neither the latents nor the timestep, so a sampling pass computes it once and passes it
        to every step (``forward``'s ``hint_embedding``)."""
        if hint.dim() != 4 or hint.shape[1] != self.config.hint_channels:
            raise ValueError(f"the control image must be [1, {self.config.hint_channels}, H, W], got {list(hint.shape)}")
        return self.input_hint_block(hint.to(self.dtype))

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        *,
        hint_embedding: Tensor | None = None,
    ) -> list[Tensor]:
        """x: [batch, in_channels, h, w] latents; hint: [batch or 1, hint_channels, h * 8, w * 8] the control
        image in [0, 1]; timesteps: [batch]; context: [batch, tokens, context_dim]; y: [batch, adm_in_channels]
        SDXL's vector, required exactly when the config has ``adm_in_channels``.

        Returns what the UNet adds (cldm's ``ControlledUnetModel``; ``UNetModel.forward``'s ``control``): one
        residual per input block, shaped as its output and added to it where the output blocks read it as a
        skip connection (not on the encoder's own path), then the middle block's, added to its output;
        ``[batch, channels, 1, 1]`` each with global average pooling. ``hint_embedding``: :meth:`embed_hint` of
        ``hint``, computed beforehand (then ``hint`` is not read)."""
        unet = self.config.unet
        dtype = self.dtype
        factor = self.config.hint_downsample
        expected = (self.config.hint_channels, x.shape[-2] * factor, x.shape[-1] * factor)
        if hint_embedding is not None:
            embedded = (unet.model_channels, x.shape[-2], x.shape[-1])
            if tuple(hint_embedding.shape[1:]) != embedded or hint_embedding.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"hint_embedding must be [1, {embedded}], got {list(hint_embedding.shape)}")
        elif hint.dim() != 4 or tuple(hint.shape[1:]) != expected or hint.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"the control image must be [{x.shape[0]} or 1, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"({factor}x the latents' size), got {list(hint.shape)}"
            )
        emb = self.time_embed(timestep_embedding(timesteps, unet.model_channels).to(dtype))  # [batch, 4 * mc]
        if unet.adm_in_channels:
            if y is None or y.shape != (x.shape[0], unet.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"this ControlNet needs y [{x.shape[0]}, {unet.adm_in_channels}] (got {got})"
                )
            emb = emb + self.label_emb(y.to(dtype))
        elif y is not None:
            raise ValueError("this ControlNet takes no vector y (only SDXL ControlNets have label_emb)")
        context = context.to(dtype)
        guided_hint = hint_embedding if hint_embedding is not None else self.input_hint_block(hint.to(dtype))

        h = x.to(dtype)
        residuals: list[Tensor] = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint joins after conv_in (cldm: ``h += guided_hint``)
            residuals.append(zero_conv(h))  # [batch, channels of block i, h_i, w_i]
        h = self.middle_block(h, emb, context)
        middle = self.middle_block_out(h)  # [batch, channels of the last level, h_last, w_last]
        residuals.append(middle)
        if self.config.global_average_pooling:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
        return residuals


def controlnet_from_unet(unet: UNetModel, hint_channels: int = 3) -> ControlNet:
    """A new ControlNet for ``unet``, its encoder a copy of the UNet's (the paper's initialisation, 3.2), the
    zero convolutions and the hint encoder's last conv at zero: it adds nothing until trained."""
    param = next(unet.parameters())
    controlnet = ControlNet(ControlNetConfig(unet=unet.config, hint_channels=hint_channels))
    controlnet.to(device=param.device, dtype=param.dtype)
    shared = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    copied = {k: v for k, v in unet.state_dict().items() if k.startswith(shared)}
    result = controlnet.load_state_dict(copied, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return controlnet


# ------------------------------------------------------------------------------------------- detection

Shapes = Mapping[str, tuple[int, ...]]


def _hint_block_config(shapes: Shapes) -> tuple[int, tuple[int, ...], int]:
    """(hint channels, level widths, output channels) of a hint encoder in cldm's layout: 3x3 convs at indices
    0, 2, ..., 4n - 2."""
    convs = sorted(int(m[1]) for k in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if len(convs) < 2 or len(convs) % 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError(
            f"its hint encoder has convs at input_hint_block.{convs}: not a ControlNet's (3x3 convs at every "
            "other index from 0, an even number of them)"
        )
    weights = [shapes[f"input_hint_block.{i}.weight"] for i in convs]
    if any(len(w) != 4 or w[2:] != (3, 3) for w in weights):
        raise CheckpointError("its hint encoder's layers are not all 3x3 convolutions: not a ControlNet's")
    for i in range(1, len(weights)):
        if weights[i][1] != weights[i - 1][0]:
            raise CheckpointError(
                f"input_hint_block.{convs[i]} takes {weights[i][1]} channels but input_hint_block.{convs[i - 1]} "
                f"gives {weights[i - 1][0]}: a damaged or incomplete hint encoder"
            )
    levels = len(weights) // 2
    return weights[0][1], tuple(weights[2 * n][0] for n in range(levels)), weights[-1][0]


def detect_controlnet(shapes: Shapes) -> ControlNetConfig:
    """A ControlNet's architecture from its state dict's shapes, in our (cldm) layout without ``control_model.``.

    Heads and norm groups follow SD's conventions (see the module's docstring); ``fit_to_unet`` corrects
    them from the base model."""
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise CheckpointError(f"not a ControlNet (missing {', '.join(missing)})")
    hint_channels, hint_widths, hint_out = _hint_block_config(shapes)
    in_channels = shapes["input_blocks.0.0.weight"][1]
    # detect_unet reads a whole UNet; its decoder's last conv only gives out_channels, unused here.
    as_unet = {UNET + k: v for k, v in shapes.items()}
    as_unet[UNET + "out.2.weight"] = (in_channels, shapes["input_blocks.0.0.weight"][0], 3, 3)
    unet = detect_unet(as_unet)
    if hint_out != unet.model_channels:
        raise CheckpointError(
            f"its hint encoder ends with {hint_out} channels, its UNet copy starts with "
            f"{unet.model_channels}: not one ControlNet"
        )
    return ControlNetConfig(unet=unet, hint_channels=hint_channels, hint_block_channels=hint_widths)


def _describe(unet: UNetConfig) -> str:
    widths = [unet.model_channels * m for m in unet.channel_mult]
    family = "SDXL, " if unet.adm_in_channels else ""
    return (
        f"{family}levels {widths} with {unet.num_res_blocks} blocks each, text context {unet.context_dim}"
        + (f", vector y {unet.adm_in_channels}" if unet.adm_in_channels else "")
    )


def fit_to_unet(config: ControlNetConfig, base: UNetConfig) -> ControlNetConfig:
    """``config`` for use with a UNet of config ``base``: its residuals must have the shapes of the UNet's skip
    connections, its context and vector y the UNet's; heads and norm groups (which shapes cannot tell) are the
    base's. ``CheckpointError`` naming both when they do not fit (an SD 1.x ControlNet on SDXL...)."""
    ours = config.unet
    fits = (
        ours.model_channels == base.model_channels
        and ours.channel_mult == base.channel_mult
        and ours.num_res_blocks == base.num_res_blocks
        and ours.context_dim == base.context_dim
        and ours.adm_in_channels == base.adm_in_channels
    )
    if not fits:
        raise CheckpointError(
            f"this ControlNet does not fit the model: it is for a UNet with {_describe(ours)}; the model has "
            f"{_describe(base)}"
        )
    unet = dataclasses.replace(
        ours, num_heads=base.num_heads, num_head_channels=base.num_head_channels, norm_groups=base.norm_groups
    )
    return dataclasses.replace(config, unet=unet)


# ---------------------------------------------------------------------------------------- diffusers layout

_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
_DIFFUSERS_OWN = [
    (re.compile(r"controlnet_down_blocks\.(\d+)"), lambda m, n: f"zero_convs.{m[1]}.0"),
    (re.compile(r"controlnet_mid_block"), lambda m, n: "middle_block_out.0"),
    (re.compile(r"controlnet_cond_embedding\.conv_in"), lambda m, n: "input_hint_block.0"),
    (
        re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)"),
        lambda m, n: f"input_hint_block.{2 * int(m[1]) + 2}",
    ),
    (re.compile(r"controlnet_cond_embedding\.conv_out"), lambda m, n: f"input_hint_block.{2 * n + 2}"),
    # SDXL's vector (diffusers: add_embedding for "text_time", class_embedding for "projection"): LDM's label_emb
    (re.compile(r"(?:add|class)_embedding\.linear_([12])"), lambda m, n: f"label_emb.0.{2 * int(m[1]) - 2}"),
]


def controlnet_from_diffusers(
    state: Mapping[str, Tensor], layers_per_block: int | None = None
) -> dict[str, Tensor]:
    """diffusers ``ControlNetModel`` keys -> ours (cldm's, no ``control_model.``); tensors unchanged.

    ``layers_per_block``: its ``config.json``'s; counted from the keys when not given. Every key must map:
    one that does not is a ``CheckpointError`` (from ``unet_to_ldm`` for the UNet part)."""
    if layers_per_block is None:
        resnets = {int(m[1]) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
        layers_per_block = len(resnets)
    blocks = len({m[1] for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    out: dict[str, Tensor] = {}
    shared: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        for pattern, target in _DIFFUSERS_OWN:
            if m := pattern.fullmatch(module):
                out[f"{target(m, blocks)}.{param}"] = tensor
                break
        else:
            shared[key] = tensor  # time_embedding, conv_in, down_blocks, mid_block: the UNet's names
    out.update(unet_to_ldm(shared, {"layers_per_block": layers_per_block}))
    return out


# What our modules implement, of a diffusers ControlNetModel config.json (the defaults where a key is absent).
_DIFFUSERS_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "encoder_hid_dim": None,
    "num_class_embeds": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "controlnet_conditioning_channel_order": "rgb",
}


def _heads_from_diffusers(unet: UNetConfig, config: Mapping[str, Any], where: str) -> dict[str, int]:
    """``num_attention_heads`` (or its old misnomer ``attention_head_dim``, which also counts heads) as our
    (num_heads, num_head_channels): one head count everywhere (SD 1.x) or one head width (SD 2.x, SDXL)."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    levels = len(unet.channel_mult)
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    if len(per_level) != levels:
        raise CheckpointError(f"{where}: attention heads {heads} for {levels} levels")
    attention = [lvl for lvl in range(levels) if 2**lvl in unet.attention_resolutions] + [levels - 1]
    pairs = {(unet.model_channels * unet.channel_mult[lvl], int(per_level[lvl])) for lvl in attention}
    if any(h <= 0 or c % h for c, h in pairs):
        raise CheckpointError(f"{where}: attention heads {heads} do not divide the channels")
    one_count, one_width = len({h for _, h in pairs}) == 1, len({c // h for c, h in pairs}) == 1
    # Where both hold (attention at one width only) they are the same network; named as SD names them.
    if one_count and not (one_width and unet.use_linear_in_transformer):
        return {"num_heads": next(iter(pairs))[1], "num_head_channels": -1}
    if one_width:
        return {"num_heads": -1, "num_head_channels": next(c // h for c, h in pairs)}
    raise CheckpointError(f"{where}: attention heads {heads} give neither one head count nor one head width")


def _apply_diffusers_config(
    config: ControlNetConfig, dconfig: Mapping[str, Any], where: str
) -> ControlNetConfig:
    for name, expected in _DIFFUSERS_FIXED.items():
        value = dconfig.get(name, expected)
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:
            value = value[0]
        if value != expected:
            raise CheckpointError(f"{where}: {name}={value!r} is not supported ({expected!r} is)")
    if dconfig.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(
            f"{where}: addition_embed_type={dconfig['addition_embed_type']!r} is not supported"
        )
    if dconfig.get("class_embed_type") not in (None, "projection"):
        raise CheckpointError(f"{where}: class_embed_type={dconfig['class_embed_type']!r} is not supported")
    if (
        dconfig.get("addition_embed_type") == "text_time"
        and dconfig.get("addition_time_embed_dim") != SIZE_EMBEDDING
    ):
        # y's size embeddings are SDXL's 256-wide ones (sdstudio.models.sdxl.size_vector)
        raise CheckpointError(
            f"{where}: addition_time_embed_dim={dconfig.get('addition_time_embed_dim')!r} is not supported "
            f"({SIZE_EMBEDDING} is)"
        )
    heads = _heads_from_diffusers(config.unet, dconfig, where)
    unet = dataclasses.replace(config.unet, norm_groups=int(dconfig.get("norm_num_groups", 32)), **heads)
    pooling = bool(dconfig.get("global_pool_conditions", False))
    return dataclasses.replace(config, unet=unet, global_average_pooling=pooling)


# ------------------------------------------------------------------------------------------------ loading

# A diffusers ControlNet folder's weights, in the order they are looked for.
_FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def _read_folder(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a diffusers ControlNet folder")
    try:
        dconfig = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(dconfig, dict) or dconfig.get("_class_name", "ControlNetModel") != "ControlNetModel":
        name = dconfig.get("_class_name") if isinstance(dconfig, dict) else type(dconfig).__name__
        raise CheckpointError(f"{path}: a {name}, not a diffusers ControlNetModel")
    weights = next((path / n for n in _FOLDER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file (looked for {', '.join(_FOLDER_WEIGHTS)})")
    state, _ = read_state_dict(weights)
    return state, dconfig


def _our_layout(
    path: Path, state: Mapping[str, Tensor], dconfig: Mapping[str, Any] | None
) -> dict[str, Tensor]:
    """Any supported layout -> ours without prefix: cldm's ``control_model.*`` (a ControlNet alone, or inside a
    whole ControlLDM checkpoint), the same keys unprefixed, or diffusers' (a folder, or a single file)."""
    if "lora_controlnet" in state:
        raise CheckpointError(
            f"{path}: a Control-LoRA (low-rank deltas to a base UNet), not a full ControlNet"
        )
    if "difference" in state:
        raise CheckpointError(f"{path}: a 'difference' ControlNet (deltas to a base UNet); not supported")
    if dconfig is not None or _DIFFUSERS_KEY in state:
        layers = dconfig.get("layers_per_block") if dconfig is not None else None
        if isinstance(layers, (list, tuple)):
            layers = layers[0] if len(set(layers)) == 1 else -1
        if layers is not None and (not isinstance(layers, int) or layers <= 0):
            raise CheckpointError(f"{path}: layers_per_block={layers!r} is not supported")
        return controlnet_from_diffusers(state, layers)
    if any(k.startswith(PREFIX) for k in state):
        return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


def _load_into(
    path: Path, config: ControlNetConfig, state: Mapping[str, Tensor], dtype: torch.dtype
) -> ControlNet:
    try:
        with torch.device("meta"):
            model = ControlNet(config)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its ControlNet architecture cannot be built ({e})") from None
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        raise CheckpointError(
            f"{path}: not a ControlNet of the architecture its shapes suggest: {'; '.join(parts)}"
        )
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise CheckpointError(f"{path}: weights do not fit a ControlNet: {first}") from None
    return model.eval().requires_grad_(False)


def load_controlnet(
    path: str | os.PathLike, *, base: UNetConfig | None = None, dtype: torch.dtype = torch.float32
) -> tuple[ControlNet, ControlNetConfig]:
    """A ControlNet from a ``.safetensors`` / ``.pth`` / ``.ckpt`` file (cldm's layout with or without
    ``control_model.``, or diffusers' keys) or a diffusers folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), on the CPU in ``dtype``.

    ``base``: the UNet config of the model it will control; its heads and norm groups are used, and a
    ControlNet whose residuals do not fit it is refused. ``CheckpointError`` for anything that is not a
    ControlNet, is damaged, or does not fit."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    dconfig: dict[str, Any] | None = None
    if path.is_dir():
        state, dconfig = _read_folder(path)
    else:
        state, _ = read_state_dict(path)
    ours = _our_layout(path, state, dconfig)
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    try:
        config = detect_controlnet(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        log.debug("%s: ControlNet detection failed", path, exc_info=True)
        raise CheckpointError(
            f"{path}: cannot tell a ControlNet's architecture from its shapes ({e})"
        ) from None
    if dconfig is not None:
        config = _apply_diffusers_config(config, dconfig, str(path / "config.json"))
    if base is not None:
        try:
            config = fit_to_unet(config, base)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    model = _load_into(path, config, ours, dtype)
    log.info("%s: ControlNet, %s", path, _describe(config.unet))
    return model, config
