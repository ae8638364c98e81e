"""Which weight of our model each module name in a LoRA file patches: one exact-lookup table per model.

LoRA files name modules in the layouts their trainers saw, not ours:

* kohya sd-scripts / AUTOMATIC1111 / LyCORIS: ``lora_unet_`` + the *diffusers* UNet module path with dots
  as underscores (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), ``lora_te_`` +
  the transformers ``CLIPTextModel`` path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). For
  SD 2.x kohya converts OpenCLIP to that HF layout too, so its text keys are the same HF names (layers
  0..22), and q/k/v land on row blocks of OpenCLIP's fused ``attn.in_proj_weight``. Some tools write the
  LDM path instead (``lora_unet_input_blocks_1_1_proj_in``); SimpleTuner's LyCORIS uses ``lycoris_``.
* diffusers / PEFT: ``unet.`` / ``text_encoder.`` + the dotted diffusers / transformers path (also without
  the prefix, and transformers >= 5's ``CLIPTextModel`` path without ``text_model.``), and the attention
  processor names of diffusers <= 0.24 (``attn1.processor.to_q_lora``, ``self_attn.to_q_lora``).

The table is built from the model itself: the diffusers paths its configuration implies are converted by
``sdstudio.models.diffusers_convert`` (the one place that knows diffusers -> LDM), traced through its
public converters, and kept where they name a ``Linear`` / ``Conv2d`` our model has. Every name form is
then an exact dictionary entry; no underscore is ever parsed back into dots. (ComfyUI's ``comfy/lora.py``
builds its key map the same way; A1111's ``networks.py`` rewrites names with regular expressions.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from torch import Tensor, nn

from sdstudio.models.diffusers_convert import clip_to_ldm, open_clip_from_hf, trace_conversion, unet_to_ldm
from sdstudio.models.stablediffusion import TEXT_PREFIX, UNET_PREFIX, StableDiffusion

log = logging.getLogger(__name__)

__all__ = ["KeyTable", "Part", "Target", "key_table"]

Part = Literal["unet", "te"]

# kohya's targets inside a diffusers ResnetBlock2D (its norms are never LoRA targets) and at the top level
# (LyCORIS' extra target names).
_RESNET_TARGETS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_TOP_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# kohya's targets in a transformers CLIPEncoderLayer (CLIPAttention and CLIPMLP's linears).
_TEXT_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
# diffusers <= 0.24 attention-processor LoRA names -> the module they patch.
_UNET_PROCESSOR = {"to_q": "processor.to_q_lora", "to_k": "processor.to_k_lora", "to_v": "processor.to_v_lora",
                   "to_out.0": "processor.to_out_lora"}  # fmt: skip
_TEXT_PROCESSOR = {"self_attn.q_proj": "self_attn.to_q_lora", "self_attn.k_proj": "self_attn.to_k_lora",
                   "self_attn.v_proj": "self_attn.to_v_lora", "self_attn.out_proj": "self_attn.to_out_lora",
                   "mlp.fc1": "mlp.fc1.lora_linear_layer", "mlp.fc2": "mlp.fc2.lora_linear_layer"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One weight (or row block of one) of the model: what a LoRA module patches."""

    key: str  # the parameter's state-dict key, "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    part: Part  # which multiplier applies: the UNet's or the text encoder's
    shape: tuple[int, ...]  # of the patched region: [out, in] or [out, in, kh, kw]
    rows: tuple[int, int] | None = None  # [start, stop) of SD 2's fused q/k/v in_proj_weight; None: all of it


@dataclass(frozen=True)
class KeyTable:
    """Module names as LoRA files write them -> the weight each patches, for one architecture."""

    targets: Mapping[str, Target]
    architecture: str  # for messages: "sd15 (UNet 320 ch, CLIP text 768 wide, 12 layers)"

    def get(self, module: str) -> Target | None:
        return self.targets.get(module)

    def __len__(self) -> int:
        return len(self.targets)


def _unet_diffusers_paths(model: StableDiffusion, transformer_parts: Iterable[str]) -> list[str]:
    """Every Linear / Conv2d module path a diffusers UNet2DConditionModel of this configuration can have
    (a superset: paths our model lacks, such as a ``conv_shortcut`` between equal widths, are dropped later)."""
    config = model.config.unet
    levels, layers = len(config.channel_mult), config.num_res_blocks
    parts = tuple(transformer_parts)
    attention = [2**b in config.attention_resolutions for b in range(levels)]  # per down level b
    paths = list(_TOP_TARGETS)

    def block(prefix: str, count: int, with_attention: bool) -> None:
        for j in range(count):
            paths.extend(f"{prefix}.resnets.{j}.{p}" for p in _RESNET_TARGETS)
            if with_attention:
                paths.extend(f"{prefix}.attentions.{j}.{p}" for p in parts)

    for b in range(levels):
        block(f"down_blocks.{b}", layers, attention[b])
        if b < levels - 1:
            paths.append(f"down_blocks.{b}.downsamplers.0.conv")
    paths.extend(f"mid_block.resnets.{i}.{p}" for i in (0, 1) for p in _RESNET_TARGETS)
    paths.extend(f"mid_block.attentions.0.{p}" for p in parts)
    for b in range(levels):  # diffusers' up_blocks.0 is the lowest resolution
        block(f"up_blocks.{b}", layers + 1, attention[levels - 1 - b])
        if b < levels - 1:
            paths.append(f"up_blocks.{b}.upsamplers.0.conv")
    return paths


def _weights(module: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d submodules by path: what LoRA can patch."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


class _Builder:
    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.params = params
        self.targets: dict[str, Target] = {}

    def add(self, names: Iterable[str], target: Target) -> None:
        for name in names:
            previous = self.targets.setdefault(name, target)
            # the name forms of two different weights must never coincide (checked on every build)
            assert previous == target, f"LoRA name {name!r} would patch both {previous.key} and {target.key}"

    def target(self, key: str, part: Part, rows: tuple[int, int] | None = None) -> Target:
        shape = tuple(self.params[key].shape)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        return Target(key=key, part=part, shape=shape, rows=rows)


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _unet_entries(model: StableDiffusion, builder: _Builder) -> None:
    unet = model.unet
    modules = _weights(unet)
    transformer = next((m for m in unet.modules() if hasattr(m, "transformer_blocks")), None)
    parts = list(_weights(transformer)) if transformer is not None else []
    candidates = _unet_diffusers_paths(model, parts)
    layers = {"layers_per_block": model.config.unet.num_res_blocks}
    placed = trace_conversion(lambda s: unet_to_ldm(s, layers), {f"{p}.weight": 1 for p in candidates})
    for path in candidates:
        ldm = placed[f"{path}.weight"][0].removesuffix(".weight")
        if ldm not in modules:
            continue
        target = builder.target(f"{UNET_PREFIX}{ldm}.weight", "unet")
        names = [
            "lora_unet_" + _underscored(path),  # kohya, LyCORIS
            "lycoris_" + _underscored(path),  # SimpleTuner's LyCORIS
            "lora_unet_" + _underscored(ldm),  # LDM-named files
            "unet." + path,  # diffusers / PEFT
            path,  # PEFT without the component prefix
        ]
        for short, processor in _UNET_PROCESSOR.items():
            if path.endswith("." + short):  # diffusers <= 0.24 attention processors
                names.append("unet." + path.removesuffix(short) + processor)
        builder.add(names, target)


def _text_entries(model: StableDiffusion, builder: _Builder) -> None:
    text = model.config.text
    hf = [f"text_model.encoder.layers.{i}.{p}" for i in range(text.layers) for p in _TEXT_TARGETS]
    if text.kind == "clip":
        placed = trace_conversion(clip_to_ldm, {f"{p}.weight": 1 for p in hf})
    else:  # OpenCLIP: q, k, v become row blocks of one in_proj_weight
        placed = trace_conversion(open_clip_from_hf, {f"{p}.weight": text.width for p in hf})
    for path in hf:
        ldm, rows = placed[f"{path}.weight"]
        key = TEXT_PREFIX + ldm
        if key not in builder.params:
            continue
        layer_path = path.removeprefix("text_model.")
        names = [
            "lora_te_" + _underscored(path),  # kohya, LyCORIS
            "lora_te1_" + _underscored(path),  # kohya's SDXL-style first encoder, used by some SD 1.x files
            "text_encoder." + path,  # diffusers / PEFT
            "text_encoder." + layer_path,  # PEFT on transformers >= 5's CLIPTextModel (no text_model.)
            path,
        ]
        for short, processor in _TEXT_PROCESSOR.items():
            if path.endswith("." + short):
                names.append("text_encoder." + path.removesuffix(short) + processor)
        builder.add(names, builder.target(key, "te", rows))


def key_table(model: StableDiffusion) -> KeyTable:
    """The LoRA name table of ``model`` (a ``StableDiffusion``; its parameter keys are the targets)."""
    params = dict(model.named_parameters())
    builder = _Builder(params)
    _unet_entries(model, builder)
    _text_entries(model, builder)
    config = model.config
    architecture = (
        f"{config.name} (UNet {config.unet.model_channels} ch, context {config.unet.context_dim}; "
        f"{'OpenCLIP' if config.text.kind == 'open_clip' else 'CLIP'} text {config.text.width} wide, "
        f"{config.text.layers} layers)"
    )
    log.debug("%s: %d LoRA module names", architecture, len(builder.targets))
    return KeyTable(targets=MappingProxyType(builder.targets), architecture=architecture)
