"""Infer a ``ModelConfig`` from a single-file state dict's keys and shapes (no tensor data is read).

What weights cannot tell (attention heads, v-prediction, norm groups) follows SD's conventions: 8 heads
when ``proj_in`` is a conv (SD 1.x), 64-channel heads when it is linear (SD 2.x); a config stored in
the file's metadata (``sdstudio.config``) overrides detection entirely.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import (
    PRESETS,
    SD2_TEXT,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    same_architecture,
)

Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."


def _require(shapes: Shapes, keys: list[str], part: str) -> None:
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint: no {part} (missing keys: {', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''})"
        )


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def detect_unet(shapes: Shapes) -> UNetConfig:
    _require(shapes, [UNET + "input_blocks.0.0.weight", UNET + "out.2.weight", UNET + "time_embed.0.weight"], "UNet")
    model_channels, in_channels = shapes[UNET + "input_blocks.0.0.weight"][:2]
    out_channels = shapes[UNET + "out.2.weight"][0]
    n_input = _count(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # per level, the input-block indices of its ResBlocks
    for i in range(1, n_input):
        if UNET + f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(i)
    channel_mult = tuple(shapes[UNET + f"input_blocks.{lvl[0]}.0.out_layers.3.weight"][0] // model_channels for lvl in levels)
    # Written largest first, as the original yamls do: (4, 2, 1).
    attention = tuple(
        2**n for n, lvl in reversed(list(enumerate(levels))) if UNET + f"input_blocks.{lvl[0]}.1.proj_in.weight" in shapes
    )
    first_attn = next(
        (k for k in shapes if k.startswith(UNET) and k.endswith("transformer_blocks.0.attn2.to_k.weight")),
        None,
    )
    context_dim = shapes[first_attn][1] if first_attn else 768
    linear = any(len(s) == 2 for k, s in shapes.items() if k.startswith(UNET) and k.endswith("proj_in.weight"))
    middle = _count(shapes, re.escape(UNET) + r"middle_block\.1\.transformer_blocks\.(\d+)\.") or 1
    per_level = [
        _count(shapes, re.escape(UNET) + rf"input_blocks\.{lvl[0]}\.1\.transformer_blocks\.(\d+)\.") for lvl in levels
    ]
    used = {d for d in per_level if d}
    depth: int | tuple[int, ...]
    if used <= {middle}:
        depth = middle  # one depth everywhere (SD 1.x / 2.x, the SDXL refiner)
    else:  # SDXL: per level; the middle block takes the last level's
        per_level[-1] = per_level[-1] or middle
        depth = tuple(per_level)
    adm = shapes.get(UNET + "label_emb.0.0.weight", (0, 0))[1]
    heads = {"num_heads": -1, "num_head_channels": 64} if linear else {"num_heads": 8, "num_head_channels": -1}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=len(levels[0]),
        attention_resolutions=attention,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        adm_in_channels=adm,
        **heads,
    )


def detect_vae(shapes: Shapes) -> VAEConfig:
    _require(shapes, [VAE + "encoder.conv_in.weight", VAE + "decoder.conv_out.weight", VAE + "quant_conv.weight"], "VAE")
    ch, in_channels = shapes[VAE + "encoder.conv_in.weight"][:2]
    n_levels = _count(shapes, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(shapes[VAE + f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels))
    return VAEConfig(
        in_channels=in_channels,
        out_ch=shapes[VAE + "decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(shapes, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=shapes[VAE + "encoder.conv_out.weight"][0] // 2,
        embed_dim=shapes[VAE + "quant_conv.weight"][0] // 2,
    )


def detect_text(shapes: Shapes, clip: str = CLIP, open_clip: str = OPEN_CLIP) -> TextEncoderConfig:
    """The text encoder under ``clip`` (HF layout) or ``open_clip`` (OpenCLIP layout), SD 1.x / 2.x's
    prefixes unless given."""
    if clip + "embeddings.token_embedding.weight" in shapes:
        vocab, width = shapes[clip + "embeddings.token_embedding.weight"]
        return TextEncoderConfig(
            kind="clip",
            vocab_size=vocab,
            width=width,
            layers=_count(shapes, re.escape(clip) + r"encoder\.layers\.(\d+)\."),
            heads=max(1, width // 64),
            max_positions=shapes[clip + "embeddings.position_embedding.weight"][0],
            mlp_ratio=shapes[clip + "encoder.layers.0.mlp.fc1.weight"][0] // width,
        )
    if open_clip + "token_embedding.weight" in shapes:
        vocab, width = shapes[open_clip + "token_embedding.weight"]
        projection = shapes.get(open_clip + "text_projection", (width, 0))
        return dataclasses.replace(
            SD2_TEXT,
            vocab_size=vocab,
            width=width,
            layers=_count(shapes, re.escape(open_clip) + r"transformer\.resblocks\.(\d+)\."),
            heads=max(1, width // 64),
            max_positions=shapes[open_clip + "positional_embedding"][0],
            mlp_ratio=shapes[open_clip + "transformer.resblocks.0.mlp.c_fc.weight"][0] // width,
            projection_dim=projection[1],
        )
    raise CheckpointError(
        "not a Stable Diffusion checkpoint: no text encoder (expected keys under "
        f"'{clip}' (SD 1.x) or '{open_clip}' (SD 2.x))"
    )


SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_BIG_G = "conditioner.embedders.1.model."
SDXL_REFINER_BIG_G = "conditioner.embedders.0.model."


def detect_sdxl_text(shapes: Shapes) -> tuple[TextEncoderConfig, TextEncoderConfig | None, str]:
    """SDXL's text encoders: (first, second or None, conditioner kind). Penultimate layers without the final
    LayerNorm, as sgm's conditioner takes them."""
    sdxl = {"default_clip_skip": 2, "final_layer_norm": False}
    if SDXL_BIG_G + "token_embedding.weight" in shapes:
        clip_l = dataclasses.replace(detect_text(shapes, clip=SDXL_CLIP, open_clip="-"), **sdxl)
        big_g = dataclasses.replace(detect_text(shapes, clip="-", open_clip=SDXL_BIG_G), **sdxl)
        return clip_l, big_g, "sdxl"
    big_g = dataclasses.replace(detect_text(shapes, clip="-", open_clip=SDXL_REFINER_BIG_G), **sdxl)
    return big_g, None, "sdxl_refiner"


def detect_config(shapes: Shapes, prediction: str | None = None) -> ModelConfig:
    """The architecture of a single-file state dict, named after the preset it equals ('custom' if none)."""
    unet, vae = detect_unet(shapes), detect_vae(shapes)
    pred = prediction or "epsilon"
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        text, text2, kind = detect_sdxl_text(shapes)
        if text2 is None and (text.projection_dim <= 0):
            raise CheckpointError("an SDXL refiner without bigG's text_projection: its pooled text cannot be made")
        config = ModelConfig(
            name="custom", unet=unet, vae=dataclasses.replace(vae, scale_factor=0.13025), text=text, text2=text2,
            conditioner=kind, prediction=pred, default_size=1024,  # type: ignore[arg-type]
        )  # fmt: skip
    else:
        config = ModelConfig(name="custom", unet=unet, vae=vae, text=detect_text(shapes), prediction=pred)
    text = config.text
    for name, candidate in PRESETS.items():
        if same_architecture(candidate, config):
            return dataclasses.replace(
                config, name=name, default_size=candidate.default_size, sampling=candidate.sampling
            )
    if text.kind == "open_clip" and pred == "v":
        return dataclasses.replace(config, default_size=768)
    return config
