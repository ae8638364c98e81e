"""Separate VAE files (``--vae FILE``): read one in any layout users have, check it against the loaded
model's VAE, and copy its weights into that VAE in place.

Layouts read, each as ``.safetensors``, ``.ckpt`` (a ``state_dict`` entry or a bare dict) or ``.pt``:

- the original LDM keys without prefix (``encoder.conv_in.weight``, ``decoder.up.0.block.0.norm1.weight``,
  ``quant_conv.weight``): stabilityai's ``vae-ft-mse-840000-ema-pruned``, whose ``.ckpt`` also holds the
  training loss's ``loss.*`` weights and ``model_ema.decay`` / ``model_ema.num_updates``, both ignored as
  AUTOMATIC1111's ``modules/sd_vae.py`` (``load_vae_dict``) ignores them;
- the same keys under a full checkpoint's ``first_stage_model.`` (a whole ``.safetensors`` checkpoint is a
  valid VAE source, as in A1111; its other weights are not read); diffusers' ``convert_ldm_vae_checkpoint``
  takes either form the same way;
- diffusers' ``AutoencoderKL`` layout (``encoder.down_blocks.0.resnets.0.conv1.weight``, current
  ``to_q`` or pre-0.14 ``query`` attention names), as a single file or a folder: a VAE folder with
  ``config.json``, or a pipeline folder whose ``vae/`` is one. ComfyUI's VAE loader tells this layout by
  its keys in the same way; the conversion is ``diffusers_convert.vae_to_ldm``, the one place keys are
  renamed.

Everything is checked before the model's first weight changes (keys, shapes, architecture options a
config gives, dtypes, finite values, values that fit the model's dtype), so a bad file leaves the model
untouched and says what is wrong in one line.

The latent scale factor stays the model's: its UNet was trained on latents at that scale. A VAE that says
it was made for another (an SDXL VAE, 0.13025, has the SD 1.x/2.x VAE's shapes) loads, as A1111 lets it,
with a warning, because its images will look wrong.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import VAEConfig
from sdstudio.models.diffusers_convert import vae_config_from_diffusers, vae_to_ldm
from sdstudio.models.loading import LoadedModel, file_sha256, read_state_dict, stored_config
from sdstudio.models.stablediffusion import VAE_PREFIX
from sdstudio.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

__all__ = ["VaeFile", "VaeLayout", "load_vae_into", "read_vae_file", "vae_short_hash"]

VaeLayout = Literal["ldm", "checkpoint", "diffusers"]

# The roots of the LDM AutoencoderKL's keys, which are also the diffusers AutoencoderKL's.
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# A1111's load_vae_dict drops ``loss*`` (the LPIPS + discriminator loss trained with the VAE) and the EMA
# bookkeeping; any other ``model_ema.*`` copy is not what the VAE's own keys hold either.
_IGNORED_PREFIXES = ("loss.", "model_ema.")
# diffusers module names that the LDM layout never has.
_DIFFUSERS_KEY = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_DIFFUSERS_LEVEL = re.compile(r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.")
# A diffusers VAE folder's weights, full precision before the fp16 variant, safetensors before pickles.
_FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
# SDXL's latent scale (its VAE has the SD 1.x/2.x VAE's shapes); SDXL checkpoints have these keys.
_SDXL_SCALE = 0.13025
_SDXL_MARKER = "conditioner.embedders."
_DAMAGED = "the file is damaged: download or convert it again"


@dataclass(frozen=True)
class VaeFile:
    """A VAE file as AUTOMATIC1111's infotext names it (``modules/sd_vae.py``): ``VAE`` is the file's base
    name with its extension (``vae-ft-mse-840000-ema-pruned.safetensors``; a folder's name for a diffusers
    folder), ``VAE hash`` the first 10 hex digits of its sha256 (of the weights file, for a folder)."""

    name: str
    path: Path
    short_hash: str
    layout: VaeLayout
    # The latent scale the file says its VAE was made for (diffusers' config.json, our header, an SDXL
    # checkpoint); None where it says nothing. The model's own factor is used either way.
    scale_factor: float | None = None


@dataclass(frozen=True)
class _Source:
    """What a VAE file holds, in LDM keys, before it is checked against a model."""

    weights: Path  # the file the tensors come from (a folder's weights file)
    state: dict[str, Tensor]  # our AutoencoderKL's keys, tensors as stored
    layout: VaeLayout
    scale_factor: float | None
    config: VAEConfig | None  # the architecture a config.json or our header states


def read_vae_file(path: str | os.PathLike, config: VAEConfig) -> dict[str, Tensor]:
    """The weights of a VAE file (any layout in the module docstring) under our ``AutoencoderKL``'s keys,
    float tensors as stored (a ``.safetensors`` file's stay memory-mapped), checked against ``config``:
    every key present with its shape, nothing else, finite values. Any problem is one ``CheckpointError``
    line naming the file."""
    return _read_checked(Path(path), config)[0].state


def load_vae_into(loaded: LoadedModel, path: str | os.PathLike) -> VaeFile:
    """Copy a VAE file's weights into ``loaded.model.vae`` in place (each parameter keeps its dtype,
    device and memory format: ``copy_`` writes into the existing storage). Everything, the file's hash
    included, is read and checked before the first write, so on any error the model is unchanged."""
    path = Path(path)
    vae = loaded.model.vae
    source, peaks = _read_checked(path, loaded.config.vae)
    params = vae.state_dict(keep_vars=True)
    _check_range(path, peaks, params)
    short_hash = _sha256(source.weights)[:10]
    with torch.inference_mode():  # also writes parameters made under inference mode
        for key, param in params.items():
            param.copy_(source.state[key].to(dtype=param.dtype))
    log.info("%s: VAE loaded (%s layout, hash %s)", path, source.layout, short_hash)
    return VaeFile(
        name=path.name,
        path=path,
        short_hash=short_hash,
        layout=source.layout,
        scale_factor=source.scale_factor,
    )


def vae_short_hash(path: str | os.PathLike) -> str:
    """A1111's ``VAE hash``: the first 10 hex digits of the file's sha256; for a diffusers folder, of the
    weights file that would be read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return _sha256(_folder_weights(_vae_folder(path)) if path.is_dir() else path)[:10]


# ------------------------------------------------------------------------------------------------ reading


def _read_checked(path: Path, config: VAEConfig) -> tuple[_Source, dict[str, float]]:
    """The file's weights checked against ``config``, and each weight's largest magnitude."""
    source = _read(path)
    if source.config is not None:
        _check_config(path, source.config, config)
    peaks = _check_state(path, source.state, config)
    if source.scale_factor is not None and not math.isclose(source.scale_factor, config.scale_factor):
        log.warning(
            "%s: made for latents scaled by %g, this model's are scaled by %g (an SDXL VAE on an SD 1.x/2.x "
            "model?): images will look wrong; keeping the model's factor",
            path,
            source.scale_factor,
            config.scale_factor,
        )
    return source, peaks


def _read(path: Path) -> _Source:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    state, metadata = read_state_dict(path)
    return _read_single_file(path, state, metadata)


def _read_single_file(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> _Source:
    kept = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    prefixed = {k[len(VAE_PREFIX) :]: v for k, v in kept.items() if k.startswith(VAE_PREFIX)}
    if prefixed:
        part, layout = prefixed, "checkpoint"
        if len(prefixed) < len(kept):
            log.info("%s: reading its %d VAE weights (%s*) only", path, len(prefixed), VAE_PREFIX)
    else:
        part = {k: v for k, v in kept.items() if k.startswith(_VAE_ROOTS)}
        layout = "ldm"
        if not part:
            raise CheckpointError(_not_a_vae(path, list(state)))
        if len(part) < len(kept):
            other = next(k for k in kept if k not in part)
            log.warning(
                "%s: ignoring %d keys that are not VAE weights (%s ...)", path, len(kept) - len(part), other
            )
    if any(_DIFFUSERS_KEY.match(k) for k in part):
        part, layout = _from_diffusers(path, part, _diffusers_levels(part)), "diffusers"
    stored = stored_config(path, metadata)
    scale = stored.vae.scale_factor if stored is not None else _implied_scale(state, metadata)
    return _Source(path, part, layout, scale, stored.vae if stored is not None else None)


def _read_folder(path: Path) -> _Source:
    folder = _vae_folder(path)
    config_json = _read_json(folder / "config.json")
    name = config_json.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise CheckpointError(
            f"{folder}: a diffusers {name}, not an AutoencoderKL (the Stable Diffusion VAE)"
        )
    try:
        config = vae_config_from_diffusers(config_json)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable VAE config ({e})") from None
    weights = _folder_weights(folder)
    state, _ = read_state_dict(weights)
    levels = len(config_json.get("block_out_channels", config.ch_mult))
    kept = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    scale = config.scale_factor if "scaling_factor" in config_json else None
    return _Source(weights, _from_diffusers(weights, kept, levels), "diffusers", scale, config)


def _vae_folder(path: Path) -> Path:
    """A diffusers VAE folder, or a pipeline folder's ``vae/``."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(
        f"{path}: a folder without config.json or vae/config.json: not a diffusers VAE or pipeline folder"
    )


def _folder_weights(folder: Path) -> Path:
    found = next((folder / n for n in _FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder}: no VAE weights file (looked for {', '.join(_FOLDER_WEIGHTS)})")
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def _diffusers_levels(state: Mapping[str, Tensor]) -> int:
    """The number of resolution levels, from the block indices a diffusers state dict uses."""
    indices = [int(m[1]) for k in state if (m := _DIFFUSERS_LEVEL.match(k))]
    return max(indices, default=0) + 1


def _from_diffusers(path: Path, state: Mapping[str, Tensor], levels: int) -> dict[str, Tensor]:
    try:
        return vae_to_ldm(state, {"block_out_channels": [0] * levels})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _implied_scale(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> float | None:
    """SDXL's scale for an SDXL checkpoint (its keys) or a file whose Stability ``modelspec`` names an SDXL
    architecture (``stable-diffusion-xl-v1-base/...``); None otherwise: a VAE-only file rarely says."""
    architecture = metadata.get("modelspec.architecture", "").lower()
    if "stable-diffusion-xl" in architecture or any(k.startswith(_SDXL_MARKER) for k in state):
        return _SDXL_SCALE
    return None


def _not_a_vae(path: Path, keys: list[str]) -> str:
    """What a file without VAE weights is instead, as far as its keys tell."""
    lowered = [k.lower() for k in keys]
    if any("lora" in k or k.startswith("lycoris_") or ".hada_" in k or ".lokr_" in k for k in lowered):
        what = "a LoRA / LyCORIS network (use it in the prompt, <lora:NAME:1>)"
    elif any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        what = "a textual inversion embedding"
    elif any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for k in keys):
        what = "a Stable Diffusion checkpoint without VAE weights"
    else:
        first = keys[0][:80] if keys else "none"
        what = f"no weight under encoder., decoder., quant_conv. or {VAE_PREFIX} (first key: {first})"
    return f"{path}: not a VAE: {what}; pass a VAE file (.safetensors, .ckpt, .pt) or a diffusers VAE folder"


# ----------------------------------------------------------------------------------------------- checking


def _check_config(path: Path, stated: VAEConfig, config: VAEConfig) -> None:
    """Architecture options the shapes do not show (``norm_groups``) are compared where a config states them."""
    for f in dataclasses.fields(VAEConfig):
        if f.name == "scale_factor":
            continue
        theirs, ours = getattr(stated, f.name), getattr(config, f.name)
        if theirs != ours:
            raise CheckpointError(
                f"{path}: a VAE of another architecture: its config has {f.name}={theirs}, this model's VAE "
                f"{ours}; use a VAE made for this model"
            )


def _expected_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def _check_state(path: Path, state: Mapping[str, Tensor], config: VAEConfig) -> dict[str, float]:
    """Keys, shapes, dtypes and finite values; returns each weight's largest magnitude."""
    expected = _expected_shapes(config)
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{path}: a VAE of another architecture: {key} is {list(state[key].shape)} in the file, "
                f"{list(shape)} in this model's VAE; use a VAE made for this model"
            )
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a complete VAE: missing {len(missing)} of its {len(expected)} weights "
            f"({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})"
        )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"{path}: a VAE of another architecture: {len(extra)} weights this model's VAE does not have "
            f"({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''}); use a VAE made for this model"
        )
    peaks = {}
    for key in expected:
        tensor = state[key]
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: weight {key} is {tensor.dtype}, not floating point; {_DAMAGED}")
        # min and max carry any NaN; one pass, no temporary (isfinite(...).all() was 20x slower on sd15's)
        low, high = (float(v) for v in _checkable(tensor).aminmax())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CheckpointError(f"{path}: weight {key} holds NaN or infinite values; {_DAMAGED}")
        peaks[key] = max(-low, high)
    return peaks


def _checkable(tensor: Tensor) -> Tensor:
    """float8 has no CPU reductions: compare its values in fp32."""
    return (
        tensor
        if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        else tensor.float()
    )


def _check_range(path: Path, peaks: Mapping[str, float], params: Mapping[str, Tensor]) -> None:
    """Values the model's dtype cannot hold (an fp32 file into an fp16 model) would become infinities."""
    for key, param in params.items():
        limit = torch.finfo(param.dtype).max
        if peaks[key] > limit:
            raise CheckpointError(
                f"{path}: weight {key} holds values beyond {str(param.dtype).removeprefix('torch.')}'s range "
                f"({limit:g}); load the model in a wider dtype (fp32 or bf16)"
            )


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
