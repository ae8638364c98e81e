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
* SDXL: kohya sd-scripts trains SDXL on its own copy of sgm's UNet, so its files name the *LDM* path
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_label_emb_0_0``; some tools
  write the diffusers path as for SD 1.x). The first text encoder, CLIP ViT-L (``conditioner.embedders.0``),
  is ``lora_te1_`` / ``text_encoder.``; the second, OpenCLIP bigG (``conditioner.embedders.1``), is
  ``lora_te2_`` / ``text_encoder_2.`` with the HF path (q/k/v on row blocks of its ``in_proj_weight``, as
  for SD 2.x). The refiner's only encoder is bigG (``conditioner.embedders.0``): ``lora_te2_`` /
  ``text_encoder_2.`` as in base files (the same encoder), and ``lora_te_`` / ``text_encoder.`` as ComfyUI
  maps a single bigG. Both encoders take the text multiplier (A1111's ``<lora:name:te:unet>``).

The table is built from the model itself: the diffusers paths its configuration implies are converted by
``sdstudio.models.diffusers_convert`` (the one place that knows diffusers -> LDM), traced through its
public converters, and kept where they name a ``Linear`` / ``Conv2d`` our model has; LDM names are our own
modules' paths. Every name form is then an exact dictionary entry; no underscore is ever parsed back into
dots. (ComfyUI's ``comfy/lora.py`` builds its key map the same way; A1111's ``networks.py`` rewrites names
with regular expressions.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from torch import Tensor, nn

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import TextEncoderConfig
from sdstudio.models.diffusers_convert import clip_to_ldm, open_clip_from_hf, trace_conversion, unet_to_ldm
from sdstudio.models.stablediffusion import UNET_PREFIX, StableDiffusion

log = logging.getLogger(__name__)

__all__ = ["KeyTable", "Part", "Target", "key_table"]

Part = Literal["unet", "te"]

# kohya's targets inside a diffusers ResnetBlock2D (its norms are never LoRA targets) and at the top level
# (LyCORIS' extra target names).
_RESNET_TARGETS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_TOP_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# SDXL's vector MLP: diffusers' add_embedding is sgm's label_emb (LyCORIS targets it, under either name). Used
# where ``unet_to_ldm`` does not convert these names (yet).
_ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
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
    rows: tuple[int, int] | None = None  # [start, stop) of OpenCLIP's fused q/k/v in_proj_weight; None: all


@dataclass(frozen=True)
class KeyTable:
    """Module names as LoRA files write them -> the weight each patches, for one architecture."""

    targets: Mapping[str, Target]
    architecture: str  # for messages: "sd15 (UNet 320 ch, context 768; CLIP text 768 wide, 12 layers)"

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


def _add_embedding_places() -> dict[str, str]:
    """diffusers' ``add_embedding`` paths -> LDM's, by ``unet_to_ldm`` where it knows them, else by our table."""
    try:
        placed = trace_conversion(lambda s: unet_to_ldm(s, {}), {f"{p}.weight": 1 for p in _ADD_EMBEDDING})
    except CheckpointError:
        return dict(_ADD_EMBEDDING)
    return {p: placed[f"{p}.weight"][0].removesuffix(".weight") for p in _ADD_EMBEDDING}


def _unet_entries(model: StableDiffusion, builder: _Builder) -> None:
    unet = model.unet
    modules = _weights(unet)
    # every block path any SpatialTransformer has: SDXL's levels hold different numbers of blocks
    parts = list(
        dict.fromkeys(p for m in unet.modules() if hasattr(m, "transformer_blocks") for p in _weights(m))
    )
    candidates = _unet_diffusers_paths(model, parts)
    layers = {"layers_per_block": model.config.unet.num_res_blocks}
    placed = trace_conversion(lambda s: unet_to_ldm(s, layers), {f"{p}.weight": 1 for p in candidates})
    places = {path: placed[f"{path}.weight"][0].removesuffix(".weight") for path in candidates}
    if model.config.unet.adm_in_channels:
        places.update(_add_embedding_places())
    for path, ldm in places.items():
        if ldm not in modules:
            continue
        target = builder.target(f"{UNET_PREFIX}{ldm}.weight", "unet")
        names = [
            "lora_unet_" + _underscored(path),  # kohya, LyCORIS
            "lycoris_" + _underscored(path),  # SimpleTuner's LyCORIS
            "unet." + path,  # diffusers / PEFT
            path,  # PEFT without the component prefix
        ]
        for short, processor in _UNET_PROCESSOR.items():
            if path.endswith("." + short):  # diffusers <= 0.24 attention processors
                names.append("unet." + path.removesuffix(short) + processor)
        builder.add(names, target)
    # LDM-named files (kohya's SDXL, some SD 1.x tools) name our own modules: every one of them
    for ldm in modules:
        builder.add(["lora_unet_" + _underscored(ldm)], builder.target(f"{UNET_PREFIX}{ldm}.weight", "unet"))


@dataclass(frozen=True)
class _Encoder:
    """One text encoder of a model and the prefixes LoRA files give its modules."""

    prefix: str  # its parameters' key prefix: "cond_stage_model.", "conditioner.embedders.1."
    config: TextEncoderConfig
    kohya: tuple[str, ...]  # "lora_te_", "lora_te1_", "lora_te2_"
    diffusers: tuple[str, ...]  # the pipeline's component: "text_encoder", "text_encoder_2"
    bare: bool  # PEFT paths without a component prefix: only where the model has one encoder


def _encoders(model: StableDiffusion) -> list[_Encoder]:
    config = model.config
    if not config.is_sdxl:
        # "lora_te1_": kohya's SDXL-style first encoder, used by some SD 1.x files
        return [_Encoder(model.text_prefix, config.text, ("lora_te_", "lora_te1_"), ("text_encoder",), True)]
    embedders = model.text_prefix + "embedders."
    if config.text2 is None:  # the refiner: bigG alone
        kohya, diffusers = ("lora_te2_", "lora_te_"), ("text_encoder_2", "text_encoder")
        return [_Encoder(embedders + "0.", config.text, kohya, diffusers, True)]
    return [
        _Encoder(embedders + "0.", config.text, ("lora_te1_",), ("text_encoder",), False),
        _Encoder(embedders + "1.", config.text2, ("lora_te2_",), ("text_encoder_2",), False),
    ]


def _text_entries(encoder: _Encoder, builder: _Builder) -> None:
    text = encoder.config
    hf = [f"text_model.encoder.layers.{i}.{p}" for i in range(text.layers) for p in _TEXT_TARGETS]
    if text.kind == "clip":
        placed = trace_conversion(clip_to_ldm, {f"{p}.weight": 1 for p in hf})
    else:  # OpenCLIP: q, k, v become row blocks of one in_proj_weight
        placed = trace_conversion(open_clip_from_hf, {f"{p}.weight": text.width for p in hf})
    for path in hf:
        ldm, rows = placed[f"{path}.weight"]
        key = encoder.prefix + ldm
        if key not in builder.params:
            continue
        layer_path = path.removeprefix("text_model.")
        names = [kohya + _underscored(path) for kohya in encoder.kohya]  # kohya, LyCORIS
        for component in encoder.diffusers:
            names.append(f"{component}.{path}")  # diffusers / PEFT
            names.append(f"{component}.{layer_path}")  # PEFT on transformers >= 5 (no text_model.)
            for short, processor in _TEXT_PROCESSOR.items():
                if path.endswith("." + short):
                    names.append(f"{component}.{path.removesuffix(short)}{processor}")
        if encoder.bare:
            names.append(path)
        builder.add(names, builder.target(key, "te", rows))


def _describe(text: TextEncoderConfig) -> str:
    kind = "OpenCLIP" if text.kind == "open_clip" else "CLIP"
    return f"{kind} text {text.width} wide, {text.layers} layers"


def key_table(model: StableDiffusion) -> KeyTable:
    """The LoRA name table of ``model`` (a ``StableDiffusion``; its parameter keys are the targets)."""
    params = dict(model.named_parameters())
    builder = _Builder(params)
    _unet_entries(model, builder)
    for encoder in _encoders(model):
        _text_entries(encoder, builder)
    config = model.config
    texts = "; ".join(_describe(t) for t in (config.text, config.text2) if t is not None)
    unet = f"UNet {config.unet.model_channels} ch, context {config.unet.context_dim}"
    architecture = f"{config.name} ({unet}; {texts})"
    log.debug("%s: %d LoRA module names", architecture, len(builder.targets))
    return KeyTable(targets=MappingProxyType(builder.targets), architecture=architecture)
