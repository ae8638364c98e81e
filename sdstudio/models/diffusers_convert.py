"""Diffusers folders -> the original single-file Stable Diffusion layout, and their configs -> ``ModelConfig``.

This is the one place where keys are renamed (the project style guide): everything else in sdstudio
speaks the LDM layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, and for
SDXL ``conditioner.embedders.N.*``).

Each converter is a table of rules ``(regex over the diffusers module path, LDM module path)``, applied to
the module part of a key (the part before ``.weight`` / ``.bias``). Every key must match exactly one rule:
a key nothing matches is an error rather than a silently dropped weight. The tables mirror the ones in
``diffusers.loaders.single_file_utils`` (LDM -> diffusers); the tests convert back with those functions and
require bit-identical tensors.

SD 2.x note: diffusers' SD 2 folders keep only 23 of OpenCLIP ViT-H's 24 text layers (the last one is unused
because SD 2 takes the penultimate layer) and their pipelines use the text encoder's *last* layer. The config
built here therefore says ``layers=23, default_clip_skip=1``, which computes exactly what the 24-layer model
does with clip skip 2.

SDXL note: a ``StableDiffusionXLPipeline`` folder holds CLIP ViT-L as ``text_encoder/`` (a ``CLIPTextModel``,
single-file ``conditioner.embedders.0.transformer.*``) and OpenCLIP ViT-bigG as ``text_encoder_2/`` (a
``CLIPTextModelWithProjection``, single-file ``conditioner.embedders.1.model.*``); a refiner folder
(``StableDiffusionXLImg2ImgPipeline``, ``text_encoder`` null) has bigG alone, as ``conditioner.embedders.0``.
Both encoders keep all their layers: diffusers' SDXL pipelines take ``hidden_states[-2]`` without the final
LayerNorm, as sgm's conditioner does, so the configs say ``default_clip_skip=2, final_layer_norm=False``.
The UNet's ``add_embedding`` (the vector of pooled text and sizes) is LDM's ``label_emb.0``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import (
    PRESETS,
    SDXL_VAE,
    Conditioner,
    ModelConfig,
    Prediction,
    ScheduleConfig,
    TextEncoderConfig,
    TextEncoderKind,
    UNetConfig,
    VAEConfig,
    same_architecture,
)
from sdstudio.models.sdxl import SIZE_EMBEDDING

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMBEDDERS_PREFIX = "conditioner.embedders."  # SDXL's text encoders: conditioner.embedders.N.*
# Where diffusers' SDXL pipelines read the UNet's context: hidden_states[-2], no final LayerNorm (sgm's
# ``layer: penultimate``); the single-file presets say the same.
_SDXL_TEXT = {"default_clip_skip": 2, "final_layer_norm": False}

# A rule maps a regex match over a diffusers module path to the LDM module path.
Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rule(pattern: str, target: Callable[[re.Match[str]], str] | str) -> Rule:
    if isinstance(target, str):
        template = target
        return re.compile(pattern), lambda m: m.expand(template)
    return re.compile(pattern), target


def _split(key: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``); a key without a dot (OpenCLIP's ``positional_embedding``) has no module."""
    module, _, param = key.rpartition(".")
    return module, param


def _apply_rules(rules: list[Rule], module: str, part: str) -> str:
    for pattern, target in rules:
        m = pattern.fullmatch(module)
        if m:
            return target(m)
    raise CheckpointError(f"{part}: unexpected weight {module!r}: not a Stable Diffusion 1.x/2.x/XL {part}")


# --------------------------------------------------------------------------------------------------- UNet

# diffusers ResnetBlock2D -> LDM ResBlock (``in_layers = [norm, SiLU, conv]``, ``out_layers = [norm, SiLU,
# dropout, conv]``, ``emb_layers = [SiLU, linear]``: the indices skip the parameter-free modules).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # SDXL's vector y (pooled text, sizes): LDM's ``label_emb = Sequential(Sequential(linear, SiLU, linear))``
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET_PART = "(?P<part>" + "|".join(_UNET_RESNET) + ")"


def _unet_rules(layers: int, up_with_attention: set[int]) -> list[Rule]:
    """LDM numbers blocks flatly: input block 0 is conv_in, then per level ``layers`` (ResBlock[, Transformer])
    entries and one Downsample; output blocks have ``layers + 1`` entries per level, the last also holding the
    Upsample (after the transformer if there is one, hence slot 2 instead of 1)."""
    per_level = layers + 1

    def down(m: re.Match[str]) -> int:
        return 1 + int(m["b"]) * per_level + int(m["j"])

    def up(m: re.Match[str]) -> int:
        return int(m["b"]) * per_level + int(m["j"])

    def upsample(m: re.Match[str]) -> str:
        b = int(m["b"])
        return f"output_blocks.{b * per_level + layers}.{2 if b in up_with_attention else 1}.conv"

    return [
        *(_rule(re.escape(d), ldm) for d, ldm in _UNET_TOP.items()),
        _rule(
            rf"down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET_PART}",
            lambda m: f"input_blocks.{down(m)}.0.{_UNET_RESNET[m['part']]}",
        ),
        # Transformer internals (norm, proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj ...) share names.
        _rule(
            r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.(?P<rest>.+)",
            lambda m: f"input_blocks.{down(m)}.1.{m['rest']}",
        ),
        _rule(
            r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv",
            lambda m: f"input_blocks.{1 + int(m['b']) * per_level + layers}.0.op",
        ),
        _rule(
            rf"mid_block\.resnets\.(?P<i>[01])\.{_RESNET_PART}",
            lambda m: f"middle_block.{2 * int(m['i'])}.{_UNET_RESNET[m['part']]}",
        ),
        _rule(r"mid_block\.attentions\.0\.(?P<rest>.+)", r"middle_block.1.\g<rest>"),
        _rule(
            rf"up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET_PART}",
            lambda m: f"output_blocks.{up(m)}.0.{_UNET_RESNET[m['part']]}",
        ),
        _rule(
            r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.(?P<rest>.+)",
            lambda m: f"output_blocks.{up(m)}.1.{m['rest']}",
        ),
        _rule(r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv", upsample),
    ]


def unet_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> LDM ``openaimodel.UNetModel`` keys (no ``model.diffusion_model.``).

    ``config`` is the UNet's ``config.json``; only ``layers_per_block`` is read. Tensors are passed through
    unchanged (the two layouts use the same shapes).
    """
    layers = _uniform(config.get("layers_per_block", 2), "unet/config.json: layers_per_block")
    up_with_attention = {
        int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    rules = _unet_rules(layers, up_with_attention)
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split(key)
        out[f"{_apply_rules(rules, module, 'UNet')}.{param}"] = tensor
    return out


# ---------------------------------------------------------------------------------------------------- VAE

# ResnetBlock2D names are LDM's except the 1x1 shortcut; no time embedding in the VAE.
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# Mid-block attention: current diffusers names, then the pre-0.14 ones (query/key/value/proj_attn).
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET_PART = "(?P<part>" + "|".join(_VAE_RESNET) + ")"
_VAE_ATTENTION_PART = "(?P<part>" + "|".join(re.escape(p) for p in _VAE_ATTENTION) + ")"


def _vae_rules(levels: int) -> list[Rule]:
    """LDM's decoder numbers its levels from the lowest resolution up (``up.{levels-1}`` runs first)."""

    def up(m: re.Match[str]) -> int:
        return levels - 1 - int(m["b"])

    return [
        *(_rule(re.escape(d), ldm) for d, ldm in _VAE_TOP.items()),
        _rule(
            rf"encoder\.down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.{_VAE_RESNET_PART}",
            lambda m: f"encoder.down.{m['b']}.block.{m['j']}.{_VAE_RESNET[m['part']]}",
        ),
        _rule(
            r"encoder\.down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv", r"encoder.down.\g<b>.downsample.conv"
        ),
        _rule(
            rf"decoder\.up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.{_VAE_RESNET_PART}",
            lambda m: f"decoder.up.{up(m)}.block.{m['j']}.{_VAE_RESNET[m['part']]}",
        ),
        _rule(
            r"decoder\.up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv",
            lambda m: f"decoder.up.{up(m)}.upsample.conv",
        ),
        _rule(
            rf"(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<i>[01])\.{_VAE_RESNET_PART}",
            lambda m: f"{m['side']}.mid.block_{int(m['i']) + 1}.{_VAE_RESNET[m['part']]}",
        ),
        _rule(
            rf"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.{_VAE_ATTENTION_PART}",
            lambda m: f"{m['side']}.mid.attn_1.{_VAE_ATTENTION[m['part']]}",
        ),
    ]


_VAE_ATTENTION_PROJECTION = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def vae_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM ``AutoencoderKL`` keys (no ``first_stage_model.``).

    ``config`` is the VAE's ``config.json``; ``block_out_channels`` gives the number of levels. The mid-block
    attention projections become 1x1 convolutions: ``[c, c]`` -> ``[c, c, 1, 1]``.
    """
    levels = len(config.get("block_out_channels", (128, 256, 512, 512)))
    rules = _vae_rules(levels)
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split(key)
        ldm_key = f"{_apply_rules(rules, module, 'VAE')}.{param}"
        if _VAE_ATTENTION_PROJECTION.fullmatch(ldm_key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [out, in] -> Conv2d 1x1 [out, in, 1, 1]
        out[ldm_key] = tensor
    return out


# ---------------------------------------------------------------------------------------------- text: CLIP

_TEXT_PROJECTION = "text_projection.weight"


def _hf_text_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a transformers CLIP text model in the classic ``text_model.*`` form, without ``position_ids``.

    transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix (``CLIPTextModelWithProjection``
    keeps it); folders on the Hub have it. ``position_ids`` is a constant buffer ``arange(77)``, not a weight.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("text_model.") and key != _TEXT_PROJECTION:
            key = "text_model." + key
        out[key] = tensor
    return out


def clip_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` -> SD 1.x ``transformer.text_model.*`` (no ``cond_stage_model.``).

    LDM's ``FrozenCLIPEmbedder`` wraps the same transformers module, so the names are kept as they are.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in _hf_text_keys(state_dict).items():
        if key == _TEXT_PROJECTION:
            # Only CLIPTextModelWithProjection has it; SD 1.x / SDXL never use CLIP-L's, and the layout has no slot.
            log.warning("text encoder: dropping text_projection.weight (CLIP ViT-L's is unused by SD)")
            continue
        out["transformer." + key] = tensor
    return out


# ------------------------------------------------------------------------------------------ text: OpenCLIP

_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_RULES: list[Rule] = [
    _rule(r"text_model\.embeddings\.token_embedding", "token_embedding"),
    _rule(r"text_model\.final_layer_norm", "ln_final"),
    _rule(
        r"text_model\.encoder\.layers\.(?P<i>\d+)\.(?P<part>"
        + "|".join(re.escape(p) for p in _OPEN_CLIP_LAYER)
        + ")",
        lambda m: f"transformer.resblocks.{m['i']}.{_OPEN_CLIP_LAYER[m['part']]}",
    ),
]
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` of an SD 2.x folder -> OpenCLIP ``model.*`` keys (no ``cond_stage_model.``).

    OpenCLIP's ``nn.MultiheadAttention`` keeps q, k, v as one ``in_proj_weight`` ``[3 * width, width]``
    (rows q, then k, then v); its ``text_projection`` is a bare ``[width, proj]`` matrix applied as ``x @ P``,
    the transpose of transformers' ``Linear`` weight.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in _hf_text_keys(state_dict).items():
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            out["model.positional_embedding"] = tensor
        elif key == _TEXT_PROJECTION:
            out["model.text_projection"] = tensor.T.contiguous()
        else:
            module, param = _split(key)
            out[f"model.{_apply_rules(_OPEN_CLIP_RULES, module, 'text encoder')}.{param}"] = tensor
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text encoder: layer {layer} lacks some of q_proj/k_proj/v_proj.{param}")
        name = "in_proj_weight" if param == "weight" else "in_proj_bias"
        out[f"model.transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


# ------------------------------------------------------------------------------------------------ configs


def _uniform(value: Any, what: str) -> int:
    """A per-block setting that our configs hold as one number."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what}={list(value)} differs between blocks; not supported")
        value = value[0]
    return int(value)


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    """Refuse architecture options our LDM modules do not have, rather than load weights into the wrong net."""
    for name, expected in fixed.items():
        value = config.get(name, expected)
        if (
            isinstance(value, (list, tuple))
            and not isinstance(expected, (list, tuple))
            and len(set(value)) == 1
        ):
            value = value[0]  # e.g. only_cross_attention given per block
        if value != expected:
            raise CheckpointError(
                f"{where}: {name}={value!r} is not supported (Stable Diffusion 1.x/2.x/XL use {expected!r})"
            )


_UNET_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "cross_attention_norm": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "center_input_sample": False,
    "attention_type": "default",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """``unet/config.json`` -> ``UNetConfig``.

    diffusers' ``attention_head_dim`` is, for these UNets, the number of *heads* (SD 1.x: ``8``; SD 2.x:
    ``[5, 10, 20, 20]``, i.e. 64 channels per head at every level), a historical misnomer kept for
    compatibility; ``num_attention_heads``, when set, means the same. SDXL's ``addition_embed_type:
    text_time`` is LDM's ``label_emb`` over a vector of ``projection_class_embeddings_input_dim`` values.
    """
    where = "unet/config.json"
    _check_fixed(config, _UNET_FIXED, where)
    channels = [int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280))]
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if len(down) != len(channels) or len(up) != len(channels):
        raise CheckpointError(
            f"{where}: down_block_types / up_block_types / block_out_channels differ in length"
        )
    known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    if not set(down) <= known_down or not set(up) <= known_up:
        raise CheckpointError(
            f"{where}: block types {sorted(set(down) - known_down | set(up) - known_up)} not supported"
        )
    attention_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    # LDM has one attention_resolutions list for both paths: the decoder must mirror the encoder.
    if [i for i, t in enumerate(reversed(up)) if t.startswith("CrossAttn")] != attention_levels:
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")

    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads_per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    # (channels, heads) of every attention layer; the middle block uses the last level's.
    attention = [(channels[i], int(heads_per_level[i])) for i in attention_levels]
    attention.append((channels[-1], int(heads_per_level[-1])))
    if any(c % h for c, h in attention):
        raise CheckpointError(f"{where}: attention heads {heads} do not divide block_out_channels {channels}")
    fixed_heads = len({h for _, h in attention}) == 1
    fixed_size = len({c // h for c, h in attention}) == 1
    linear = bool(config.get("use_linear_projection", False))
    # When both fit (every attention layer has one width) they compute the same; then follow detect.py's
    # convention so the config equals the preset's: linear projections (SD 2.x, SDXL) count head channels.
    if fixed_size and (linear or not fixed_heads):
        num_heads, num_head_channels = -1, attention[0][0] // attention[0][1]
    elif fixed_heads:
        num_heads, num_head_channels = attention[0][1], -1
    else:
        raise CheckpointError(
            f"{where}: attention_head_dim {heads} gives neither a fixed head count nor head size"
        )

    if config.get("upcast_attention"):
        # A numerical setting (softmax in fp32, needed by SD 2.1 768-v in fp16), not part of the weights.
        log.info("%s: upcast_attention=True; compute attention in fp32 when running in fp16", where)
    norm_eps = config.get("norm_eps", 1e-5)
    if norm_eps != 1e-5:
        raise CheckpointError(f"{where}: norm_eps={norm_eps} is not supported (SD uses 1e-5)")
    context_dim = config.get("cross_attention_dim", 1280)
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=_uniform(config.get("layers_per_block", 2), f"{where}: layers_per_block"),
        # Largest first, as the original yamls (and detect.py) write them: (4, 2, 1).
        attention_resolutions=tuple(2**i for i in reversed(attention_levels)),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=_transformer_depth(config, len(channels), attention_levels, where),
        context_dim=_uniform(context_dim, f"{where}: cross_attention_dim"),
        use_linear_in_transformer=linear,
        norm_groups=int(config.get("norm_num_groups", 32)),
        adm_in_channels=_adm_in_channels(config, where),
    )


def _transformer_depth(
    config: Mapping[str, Any], levels: int, attention_levels: list[int], where: str
) -> int | tuple[int, ...]:
    """diffusers' ``transformer_layers_per_block`` (one number, or one per level: SDXL ``[1, 2, 10]``) in
    detect.py's form: a level without attention has depth 0, the middle block takes the last level's (as
    diffusers' ``UNetMidBlock2DCrossAttn`` does), and one number stands for a depth used everywhere."""
    value = config.get("transformer_layers_per_block", 1)
    per_block = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(per_block) != levels or not all(isinstance(d, int) and d >= 0 for d in per_block):
        raise CheckpointError(
            f"{where}: transformer_layers_per_block={value!r} is not supported (one depth per level)"
        )
    middle = per_block[-1]
    per_level = [per_block[i] if i in attention_levels else 0 for i in range(levels)]
    if {d for d in per_level if d} <= {middle}:
        return middle
    per_level[-1] = per_level[-1] or middle
    return tuple(per_level)


def _adm_in_channels(config: Mapping[str, Any], where: str) -> int:
    """The width of SDXL's vector y (0: no ``add_embedding``, SD 1.x / 2.x)."""
    kind = config.get("addition_embed_type")
    if kind is None:
        return 0
    if kind != "text_time":
        raise CheckpointError(
            f"{where}: addition_embed_type={kind!r} is not supported (SDXL uses 'text_time')"
        )
    time_dim = config.get("addition_time_embed_dim")
    if time_dim != SIZE_EMBEDDING:
        raise CheckpointError(
            f"{where}: addition_time_embed_dim={time_dim!r} is not supported (SDXL embeds each size in "
            f"{SIZE_EMBEDDING} values)"
        )
    adm = config.get("projection_class_embeddings_input_dim")
    if not isinstance(adm, int) or adm <= 0:
        raise CheckpointError(
            f"{where}: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim"
        )
    return adm


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """``vae/config.json`` -> ``VAEConfig``; diffusers uses ``latent_channels`` for both z and the quant conv."""
    where = "vae/config.json"
    _check_fixed(config, _VAE_FIXED, where)
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    down = set(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = set(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != {"DownEncoderBlock2D"} or up != {"UpDecoderBlock2D"}:
        raise CheckpointError(f"{where}: block types {sorted(down | up)} not supported")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    latent = int(config.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(config.get("in_channels", 3)),
        out_ch=int(config.get("out_channels", 3)),
        ch=channels[0],
        ch_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(config.get("norm_num_groups", 32)),
        scale_factor=float(config.get("scaling_factor", 0.18215)),
    )


def text_config_from_diffusers(
    config: Mapping[str, Any],
    pad_token: str | None = None,
    *,
    where: str = "text_encoder/config.json",
    kind: TextEncoderKind | None = None,
) -> TextEncoderConfig:
    """``text_encoder/config.json`` (and the tokenizer's pad token, if known) -> ``TextEncoderConfig``.

    Unless ``kind`` says (SDXL: by the folder), the layout follows the activation: OpenAI's CLIP (SD 1.x)
    uses QuickGELU, OpenCLIP's ViT-H (SD 2.x) exact GELU. ``default_clip_skip`` is 1: diffusers' SD 1.x/2.x
    pipelines take the last layer of whatever the folder holds (see the module docstring for SD 2.x's 23
    layers).
    """
    archs = set(config.get("architectures") or ["CLIPTextModel"])
    if not archs <= {"CLIPTextModel", "CLIPTextModelWithProjection"}:
        raise CheckpointError(
            f"{where}: architectures {sorted(archs)} not supported (expected CLIPTextModel)"
        )
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: hidden_act={act!r} not supported (expected quick_gelu or gelu)")
    width = int(config.get("hidden_size", 512))
    intermediate = int(config.get("intermediate_size", 2048))
    if intermediate % width:
        raise CheckpointError(
            f"{where}: intermediate_size {intermediate} is not a multiple of hidden_size {width}"
        )
    kind = kind or ("open_clip" if act == "gelu" else "clip")
    # SD 1.x pads with EOS (<|endoftext|>), SD 2.x with "!" (id 0); the tokenizer folder says which.
    pad_with_eos = pad_token == "<|endoftext|>" if pad_token is not None else kind == "clip"
    has_projection = "CLIPTextModelWithProjection" in archs
    return TextEncoderConfig(
        kind=kind,
        vocab_size=int(config.get("vocab_size", 49408)),
        width=width,
        layers=int(config.get("num_hidden_layers", 12)),
        heads=int(config.get("num_attention_heads", 8)),
        max_positions=int(config.get("max_position_embeddings", 77)),
        mlp_ratio=intermediate // width,
        activation=act,
        default_clip_skip=1,
        pad_with_eos=pad_with_eos,
        projection_dim=int(config.get("projection_dim", width))
        if has_projection and kind == "open_clip"
        else 0,
    )


_PREDICTIONS: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v"}


def schedule_from_diffusers(config: Mapping[str, Any]) -> tuple[ScheduleConfig, Prediction]:
    """``scheduler/scheduler_config.json`` -> the training schedule and what the UNet predicts."""
    where = "scheduler/scheduler_config.json"
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise CheckpointError(
            f"{where}: prediction_type={prediction!r} not supported (epsilon or v_prediction)"
        )
    beta_schedule = config.get("beta_schedule", "scaled_linear")
    if beta_schedule != "scaled_linear" or config.get("trained_betas") is not None:
        raise CheckpointError(
            f"{where}: beta_schedule={beta_schedule!r} not supported (SD uses scaled_linear)"
        )
    if config.get("rescale_betas_zero_snr"):
        log.warning(
            "%s: rescale_betas_zero_snr=True is not modelled; sampling uses the plain schedule", where
        )
    schedule = ScheduleConfig(
        linear_start=float(config.get("beta_start", 0.00085)),
        linear_end=float(config.get("beta_end", 0.012)),
        timesteps=int(config.get("num_train_timesteps", 1000)),
    )
    return schedule, _PREDICTIONS[prediction]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a complete diffusers folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class TextComponent:
    """One text encoder of a diffusers folder and where it sits in the single-file layout."""

    folder: str  # "text_encoder" or "text_encoder_2" (its tokenizer: "tokenizer" / "tokenizer_2")
    prefix: str  # "cond_stage_model." (SD 1.x/2.x) or "conditioner.embedders.N." (SDXL)
    config: TextEncoderConfig

    @property
    def tokenizer(self) -> str:
        return self.folder.replace("text_encoder", "tokenizer")

    def to_ldm(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """transformers keys -> single-file keys below ``prefix`` (HF layout kept, or OpenCLIP's)."""
        return clip_to_ldm(state_dict) if self.config.kind == "clip" else open_clip_from_hf(state_dict)


def text_components(config: ModelConfig) -> tuple[TextComponent, ...]:
    """The text encoder folders of a diffusers folder of this model: SD 1.x/2.x ``text_encoder``; SDXL
    ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (bigG); the refiner ``text_encoder_2`` (bigG) alone."""
    if config.conditioner == "text":
        return (TextComponent("text_encoder", TEXT_PREFIX, config.text),)
    if config.conditioner == "sdxl_refiner":
        return (TextComponent("text_encoder_2", f"{EMBEDDERS_PREFIX}0.", config.text),)
    if config.text2 is None:
        raise CheckpointError(f"{config.name}: an SDXL model without its second text encoder (text2)")
    return (
        TextComponent("text_encoder", f"{EMBEDDERS_PREFIX}0.", config.text),
        TextComponent("text_encoder_2", f"{EMBEDDERS_PREFIX}1.", config.text2),
    )


def _listed(index: Mapping[str, Any], name: str) -> bool:
    """Whether model_index.json names a component (``[library, class]``; absent or ``[null, null]``: none)."""
    entry = index.get(name)
    return isinstance(entry, list) and any(e is not None for e in entry)


def _check_folder(path: Path) -> tuple[dict[str, Any], Conditioner]:
    """model_index.json and which model it is: SD 1.x/2.x (``text``), SDXL base or refiner, told by the text
    encoders it lists (a refiner's ``text_encoder`` is null); every component it needs must be a folder."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    index = _read_json(path / "model_index.json")
    pipeline = index.get("_class_name", "this pipeline")
    if "transformer" in index:
        raise CheckpointError(f"{path}: {pipeline} is not Stable Diffusion 1.x/2.x/XL")
    conditioner: Conditioner = "text"
    # tokenizer folders are optional: ours is built in
    needed = ["unet", "vae", "text_encoder"]
    kind = "Stable Diffusion"
    if "text_encoder_2" in index or str(pipeline).startswith("StableDiffusionXL"):
        kind = "SDXL"
        if not _listed(index, "text_encoder_2"):
            raise CheckpointError(
                f"{path}: {pipeline} lists no text_encoder_2 (OpenCLIP ViT-bigG), which every SDXL model has"
            )
        conditioner = "sdxl" if _listed(index, "text_encoder") else "sdxl_refiner"
        needed = ["unet", "vae", *(["text_encoder"] if conditioner == "sdxl" else []), "text_encoder_2"]
    for name in needed:
        if not (path / name).is_dir():
            raise CheckpointError(f"{path}: missing the {name}/ folder of a diffusers {kind} model")
    return index, conditioner


def _pad_token(path: Path, tokenizer: str = "tokenizer") -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path / tokenizer / name
        if file.is_file():
            token = _read_json(file).get("pad_token")
            if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
                token = token.get("content")
            if isinstance(token, str):
                return token
    return None


def _matching_preset(config: ModelConfig) -> str:
    """The preset this architecture equals (``same_architecture``), as ``detect_config`` names it."""
    for name, candidate in PRESETS.items():
        if same_architecture(candidate, config):
            return name
    return "custom"


def _sdxl_text(path: Path, conditioner: Conditioner) -> tuple[TextEncoderConfig, TextEncoderConfig | None]:
    """(first, second) text encoder configs of an SDXL folder: (CLIP-L, bigG), or the refiner's (bigG, None).
    The folder says which layout each is (``text_encoder_2`` is OpenCLIP's whatever its activation)."""
    where = "text_encoder_2/config.json"
    big_g = text_config_from_diffusers(
        _read_json(path / "text_encoder_2" / "config.json"), _pad_token(path, "tokenizer_2"),
        where=where, kind="open_clip",
    )  # fmt: skip
    if big_g.projection_dim <= 0:
        raise CheckpointError(
            f"{path / where}: SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (its projected "
            "pooled text feeds the UNet)"
        )
    big_g = dataclasses.replace(big_g, **_SDXL_TEXT)
    if conditioner == "sdxl_refiner":
        return big_g, None
    clip_l = text_config_from_diffusers(
        _read_json(path / "text_encoder" / "config.json"), _pad_token(path, "tokenizer"), kind="clip"
    )
    return dataclasses.replace(clip_l, **_SDXL_TEXT), big_g


def _check_sdxl_widths(
    path: Path, unet: UNetConfig, text: TextEncoderConfig, text2: TextEncoderConfig | None
) -> None:
    """The UNet's context is the encoders' hidden states side by side; its vector y is bigG's pooled text and
    256 values per micro-conditioning number (sizes and crop; the refiner an aesthetic score, not a target
    size)."""
    context = text.width + (text2.width if text2 is not None else 0)
    if unet.context_dim != context:
        raise CheckpointError(
            f"{path}: the UNet's cross_attention_dim {unet.context_dim} is not the text encoders' widths "
            f"together ({context})"
        )
    pooled = text2 or text
    values = 6 if text2 is not None else 5
    adm = pooled.projection_dim + values * SIZE_EMBEDDING
    if unet.adm_in_channels != adm:
        raise CheckpointError(
            f"{path}: unet/config.json projection_class_embeddings_input_dim is {unet.adm_in_channels or 'unset'}; "
            f"SDXL's pooled text ({pooled.projection_dim}) and {values} size values make {adm}"
        )


def configs_from_diffusers_folder(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a diffusers Stable Diffusion 1.x/2.x/XL folder, read from its ``config.json``
    files."""
    path = Path(path)
    _, conditioner = _check_folder(path)
    unet_json = _read_json(path / "unet" / "config.json")
    vae_json = _read_json(path / "vae" / "config.json")
    unet = unet_config_from_diffusers(unet_json)
    vae = vae_config_from_diffusers(vae_json)
    text2: TextEncoderConfig | None = None
    if conditioner == "text":
        text = text_config_from_diffusers(_read_json(path / "text_encoder" / "config.json"), _pad_token(path))
        if text.width != unet.context_dim:
            raise CheckpointError(
                f"{path}: text encoder width {text.width} does not match the UNet's cross_attention_dim "
                f"{unet.context_dim}"
            )
    else:
        text, text2 = _sdxl_text(path, conditioner)
        _check_sdxl_widths(path, unet, text, text2)
        if "scaling_factor" not in vae_json:
            vae = dataclasses.replace(vae, scale_factor=SDXL_VAE.scale_factor)  # sgm's 0.13025
    scheduler_dir = path / "scheduler"
    scheduler_file = next(
        (f for f in (scheduler_dir / "scheduler_config.json", scheduler_dir / "config.json") if f.is_file()),
        None,
    )
    if scheduler_file is None:
        # The weights cannot say whether the UNet predicts epsilon or v; SD's default is epsilon.
        log.warning("%s: no scheduler/scheduler_config.json; assuming epsilon prediction", path)
        schedule, prediction = ScheduleConfig(), "epsilon"
    else:
        schedule, prediction = schedule_from_diffusers(_read_json(scheduler_file))
    sample_size = unet_json.get("sample_size", 128 if text2 is not None else 64)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    config = ModelConfig(
        name="custom",
        unet=unet,
        vae=vae,
        text=text,
        text2=text2,
        conditioner=conditioner,
        schedule=schedule,
        prediction=prediction,
        default_size=int(sample_size) * vae.downsample,
    )
    name = _matching_preset(config)
    sampling = PRESETS[name].sampling if name in PRESETS else config.sampling
    return dataclasses.replace(config, name=name, sampling=sampling)


# ---------------------------------------------------------------------------------------------- weights

# Looked for in this order: full precision before the fp16 variant, safetensors before pickles.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _weight_candidates(folder: Path) -> list[Path]:
    names = []
    for ext in ("safetensors", "bin"):
        for variant in ("", ".fp16"):
            for stem in _WEIGHT_STEMS:
                names.append(f"{stem}{variant}.{ext}")
                # Sharded: diffusers/transformers write ``<stem>.<ext>.index[.fp16].json``.
                names.append(f"{stem}.{ext}.index{variant}.json")
    return [folder / n for n in names]


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from None
    from sdstudio.models.loading import load_pickle  # loading imports this module

    state = load_pickle(path)  # weights only: a pickle that needs code is refused by name, never run
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _load_component(folder: Path, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """One component's weights, cast to ``dtype`` file by file (so an fp32 folder loaded as fp16 never
    holds a whole fp32 copy)."""
    file = next((f for f in _weight_candidates(folder) if f.is_file()), None)
    if file is None:
        raise CheckpointError(
            f"{folder}: no weights file (looked for diffusion_pytorch_model.safetensors, model.safetensors, "
            "their .fp16 variants, sharded .index.json and .bin)"
        )
    log.info("loading %s", file)
    if file.name.endswith(".json"):
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{file}: no weight_map")
        shards = sorted(set(weight_map.values()))
    else:
        shards = [file.name]
    state: dict[str, Tensor] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{shard_path}: missing (listed in {file.name})")
        for key, tensor in _load_weights_file(shard_path).items():
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def load_diffusers_folder(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A diffusers Stable Diffusion 1.x/2.x/XL folder as (config, single-file-layout state dict).

    Keys carry the single-file prefixes (``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.`` or SDXL's ``conditioner.embedders.N.``). ``dtype=None`` keeps the stored dtypes.
    """
    path = Path(path)
    config = configs_from_diffusers_folder(path)
    unet_json = _read_json(path / "unet" / "config.json")
    vae_json = _read_json(path / "vae" / "config.json")
    state: dict[str, Tensor] = {}
    for key, tensor in unet_to_ldm(_load_component(path / "unet", dtype), unet_json).items():
        state[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(_load_component(path / "vae", dtype), vae_json).items():
        state[VAE_PREFIX + key] = tensor
    for part in text_components(config):
        text = part.to_ldm(_load_component(path / part.folder, dtype))
        if config.is_sdxl and part.config.kind == "open_clip" and "model.text_projection" not in text:
            raise CheckpointError(
                f"{path / part.folder}: no text_projection.weight; SDXL's pooled text is bigG's projection"
            )
        for key, tensor in text.items():
            state[part.prefix + key] = tensor
    log.info("%s: diffusers folder, architecture %s, %d tensors", path, config.name, len(state))
    return config, state


def trace_conversion(
    convert: Callable[[dict[str, Tensor]], Mapping[str, Tensor]], rows: Mapping[str, int]
) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Where ``convert`` puts each source key: ``{source: (converted key, row block or None)}``.

    Each source tensor ``[rows, 1]`` holds its own index, so renames, reshapes and row concatenations can be
    read back from the converted values."""
    names = list(rows)
    state = {k: torch.full((rows[k], 1), i, dtype=torch.int64) for i, k in enumerate(names)}
    placed: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for key, tensor in convert(state).items():
        ids = tensor.reshape(tensor.shape[0], -1)[:, 0].tolist()
        start = 0
        while start < len(ids):
            stop = start
            while stop < len(ids) and ids[stop] == ids[start]:
                stop += 1
            source = names[ids[start]]
            if source in placed or stop - start != rows[source]:
                raise RuntimeError(f"{source}: split or duplicated by the converter")
            placed[source] = (key, None if (start, stop) == (0, len(ids)) else (start, stop))
            start = stop
    return placed
