"""Test fixtures for LoRA files: tiny random models, and random LoRAs named as kohya names them, with the
module names and layouts taken from diffusers' / transformers' own converters (not from our key table), so
the tests check our table against an independent source."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import torch

from sdstudio.models.configs import PRESETS, ModelConfig
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import StableDiffusion, random_model
from tests.reference import ldm_yaml, randomise_

UNET = "model.diffusion_model."


def tiny_model(arch: str = "tiny", seed: int = 3, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    model = random_model(PRESETS[arch], seed=seed)
    randomise_(model, seed=seed)
    return model.to(dtype)


def loaded(model: StableDiffusion, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return LoadedModel(model=model, config=model.config, path=Path(model.config.name), dtype=dtype, ema=False)


def diffusers_layout(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our single-file state dict in diffusers / transformers names, by diffusers' single-file converters:
    ``unet.<diffusers path>`` and ``text_encoder.text_model.<...>`` keys (q/k/v split out of OpenCLIP's
    in_proj_weight by diffusers)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dconfig = create_unet_diffusers_config_from_ldm(ldm_yaml(config.unet, config.vae), {}, image_size=512)
    out = {f"unet.{k}": v for k, v in convert_ldm_unet_checkpoint(dict(state), dconfig).items()}
    if config.text.kind == "clip":
        text = convert_ldm_clip_checkpoint(dict(state))
    else:
        stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=config.text.width))
        text = convert_open_clip_checkpoint(stub, dict(state))
    for key, value in text.items():
        if not key.startswith("text_model."):
            key = "text_model." + key
        out[f"text_encoder.{key}"] = value
    return out


def lora_targets(
    config: ModelConfig, state: dict[str, torch.Tensor]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """kohya module name -> the diffusers-layout key and shape of the weight it patches, for every weight a
    kohya / LyCORIS LoRA can patch: each UNet linear and convolution, and the text encoder's attention and
    MLP linears."""
    targets = {}
    for key, value in diffusers_layout(config, state).items():
        if not key.endswith(".weight") or value.ndim not in (2, 4):
            continue
        module = key.removesuffix(".weight")
        if module.startswith("unet."):
            name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        elif ".encoder.layers." in module:
            name = "lora_te_" + module.removeprefix("text_encoder.").replace(".", "_")
        else:
            continue  # embeddings: no LoRA targets them
        targets[name] = (key, tuple(value.shape))
    return targets


def random_kohya(
    targets: dict[str, tuple[str, tuple[int, ...]]],
    *,
    rank: int = 4,
    alpha: float = 3.0,
    seed: int = 0,
    proj_4d: bool = False,
) -> dict[str, torch.Tensor]:
    """A kohya LoRA / LoCon over ``targets``: linears 2-D, convolutions as kohya's LoCon (down with the
    kernel, up 1x1). ``proj_4d``: transformer proj_in / proj_out as 4-D 1x1 convolutions whatever the model
    has (kohya's SD 2 files). Up weights non-zero (kohya initialises them to zero)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (_, shape) in targets.items():
        out, fan_in, kernel = shape[0], shape[1], tuple(shape[2:])
        if proj_4d and name.endswith(("_proj_in", "_proj_out")):
            kernel = (1, 1)
        down = torch.randn(rank, fan_in, *kernel, generator=gen) / fan_in**0.5
        up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=gen) * 0.1
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def kohya_delta(
    state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], multiplier: float
) -> torch.Tensor:
    """The change a kohya module makes to its weight, by the formula: ``m * alpha / r * up @ down``."""
    down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    scale = float(state[f"{name}.alpha"]) / rank if f"{name}.alpha" in state else 1.0
    product = torch.einsum(
        "or,ri->oi", up.reshape(up.shape[0], rank).double(), down.reshape(rank, -1).double()
    )
    return (multiplier * scale * product).reshape(shape)
