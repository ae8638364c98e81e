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
    depth = _count(shapes, re.escape(UNET) + r"middle_block\.1\.transformer_blocks\.(\d+)\.") or 1
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


def detect_text(shapes: Shapes) -> TextEncoderConfig:
    if CLIP + "embeddings.token_embedding.weight" in shapes:
        vocab, width = shapes[CLIP + "embeddings.token_embedding.weight"]
        return TextEncoderConfig(
            kind="clip",
            vocab_size=vocab,
            width=width,
            layers=_count(shapes, re.escape(CLIP) + r"encoder\.layers\.(\d+)\."),
            heads=max(1, width // 64),
            max_positions=shapes[CLIP + "embeddings.position_embedding.weight"][0],
            mlp_ratio=shapes[CLIP + "encoder.layers.0.mlp.fc1.weight"][0] // width,
        )
    if OPEN_CLIP + "token_embedding.weight" in shapes:
        vocab, width = shapes[OPEN_CLIP + "token_embedding.weight"]
        projection = shapes.get(OPEN_CLIP + "text_projection", (width, 0))
        return dataclasses.replace(
            SD2_TEXT,
            vocab_size=vocab,
            width=width,
            layers=_count(shapes, re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\."),
            heads=max(1, width // 64),
            max_positions=shapes[OPEN_CLIP + "positional_embedding"][0],
            mlp_ratio=shapes[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"][0] // width,
            projection_dim=projection[1],
        )
    raise CheckpointError(
        "not a Stable Diffusion checkpoint: no text encoder (expected keys under "
        f"'{CLIP}' (SD 1.x) or '{OPEN_CLIP}' (SD 2.x))"
    )


def detect_config(shapes: Shapes, prediction: str | None = None) -> ModelConfig:
    """The architecture of a single-file state dict, named after the preset it equals ('custom' if none)."""
    unet, vae, text = detect_unet(shapes), detect_vae(shapes), detect_text(shapes)
    pred = prediction or "epsilon"
    config = ModelConfig(name="custom", unet=unet, vae=vae, text=text, prediction=pred)
    for name, candidate in PRESETS.items():
        if same_architecture(candidate, config):
            return dataclasses.replace(
                config, name=name, default_size=candidate.default_size, sampling=candidate.sampling
            )
    if text.kind == "open_clip" and pred == "v":
        return dataclasses.replace(config, default_size=768)
    return config
