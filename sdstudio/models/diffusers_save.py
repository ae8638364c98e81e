"""The original single-file layout -> a diffusers folder: the reverse of ``sdstudio.models.diffusers_convert``.

Where each weight goes is not written down a second time. The diffusers module paths a configuration implies
(the structure of ``UNet2DConditionModel``, ``AutoencoderKL`` and transformers' ``CLIPTextModel``) are listed,
and the forward converters of ``diffusers_convert`` (the one place that knows the names) are *traced* on them:
each listed tensor holds its own index, so the converted state says where every diffusers key landed and, for
OpenCLIP's fused ``in_proj_weight``, which rows it took. Inside a transformer block both layouts use the same
names, so only the block's container is traced (``down_blocks.0.attentions.0`` <-> ``input_blocks.1.1``).
Once placed, the whole layout is converted forward once more on the ``meta`` device and must give back exactly
the checkpoint's keys and shapes; a key without a place is an error, never a silently dropped weight.

What a diffusers folder cannot hold is dropped, with the reason: EMA weights and the noise schedule's buffers
(``model_ema.*``, ``betas``...: diffusers folders hold one UNet and keep the schedule in a config), the text
encoder's ``position_ids`` buffer, and for SD 2.x OpenCLIP's ``text_projection`` / ``logit_scale`` and its last
layer. diffusers' SD 2.x folders keep 23 of ViT-H's 24 layers and their pipelines take the last one, which is
what SD 2.x computes with its penultimate layer (see ``diffusers_convert``); likewise here a model whose
``default_clip_skip`` is n keeps ``layers - n + 1`` OpenCLIP layers. (diffusers' own
``convert_original_stable_diffusion_to_diffusers.py`` drops the same keys.)

SDXL folders (``StableDiffusionXLPipeline``; the refiner ``StableDiffusionXLImg2ImgPipeline``) hold CLIP-L as
``text_encoder/`` and bigG as ``text_encoder_2/`` (a ``CLIPTextModelWithProjection``: its ``text_projection``
is the transpose of OpenCLIP's bare matrix), every layer of both (diffusers' SDXL pipelines take the penultimate
one themselves); only OpenCLIP's ``logit_scale`` is dropped. Which folder holds which single-file prefix is
``diffusers_convert.text_components``.

The tensors are written by :class:`SafetensorsStream`, one at a time: a folder or file is written with about one
tensor in memory, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, final

import torch
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdstudio.models.diffusers_convert import (
    UNET_PREFIX,
    VAE_PREFIX,
    TextComponent,
    clip_to_ldm,
    open_clip_from_hf,
    text_components,
    trace_conversion,
    unet_to_ldm,
    vae_to_ldm,
)
from sdstudio.models.sdxl import SIZE_EMBEDDING

log = logging.getLogger(__name__)

Component = Literal["unet", "vae", "text_encoder", "text_encoder_2"]
# The weights file of each component, as diffusers / transformers name it.
WEIGHTS_FILE: Mapping[Component, str] = MappingProxyType(
    {
        "unet": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
        "text_encoder_2": "model.safetensors",
    }
)


def component_prefixes(config: ModelConfig) -> dict[Component, str]:
    """The single-file prefix each component folder of this model holds, in the order they are written."""
    prefixes: dict[Component, str] = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    for part in text_components(config):
        prefixes[_component(part)] = part.prefix
    return prefixes


def _component(part: TextComponent) -> Component:
    return "text_encoder_2" if part.folder == "text_encoder_2" else "text_encoder"


# The version whose config format the written configs follow (read by any diffusers >= 0.19).
_DIFFUSERS_VERSION = "0.30.0"


# --------------------------------------------------------------------------------------- safetensors writer

_SAFETENSORS_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, known before its data is: enough to write a safetensors header."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@final
class SafetensorsStream:
    """A ``.safetensors`` file written one tensor at a time, in any order.

    The format (huggingface/safetensors ``docs/source/metadata_parsing``): an 8-byte little-endian header length,
    a JSON header giving every tensor's dtype, shape and byte range, then the data. Since the header needs only
    the specs, it is written first and each tensor's bytes go straight to their offsets: nothing is collected in
    memory. Tensors are laid out widest dtype first, then by name (as the safetensors library does), so every
    tensor starts aligned to its element size; the header is padded with spaces to a multiple of 8.
    """

    def __init__(
        self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
    ):
        order = sorted(specs, key=lambda k: (-specs[k].dtype.itemsize, k))
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._offsets: dict[str, int] = {}
        position = 0
        for key in order:
            spec = specs[key]
            if spec.dtype not in _SAFETENSORS_NAMES:
                raise CheckpointError(f"{key}: dtype {spec.dtype} cannot be written to a .safetensors file")
            header[key] = {
                "dtype": _SAFETENSORS_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [position, position + spec.nbytes],
            }
            self._offsets[key] = position
            position += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path = path
        self._specs = dict(specs)
        self._base = 8 + len(text)
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._file.truncate(self._base + position)
        self._pending = set(order)

    def put(self, key: str, tensor: Tensor) -> None:
        spec = self._specs.get(key)
        if spec is None or key not in self._pending:
            raise KeyError(f"{key}: not announced in the header, or written twice")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{key}: {tensor.dtype} {list(tensor.shape)} does not match its header entry "
                f"{spec.dtype} {list(spec.shape)}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._base + self._offsets[key])
        self._file.write(memoryview(data))
        self._pending.discard(key)

    def close(self) -> None:
        """Close the file; every announced tensor must have been written (else the file would hold zeros)."""
        self._file.close()
        if self._pending:
            raise RuntimeError(
                f"{self.path}: {len(self._pending)} tensors never written ({min(self._pending)} ...)"
            )

    def abort(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class Placement:
    """Where (part of) one single-file tensor goes in a diffusers folder."""

    component: Component
    key: str  # the diffusers / transformers key inside the component's weights file
    shape: tuple[int, ...]  # of the written tensor
    rows: tuple[int, int] | None = (
        None  # [start, stop) rows of the source (OpenCLIP's fused q/k/v); None: all
    )
    transpose: bool = False  # OpenCLIP's text_projection [width, proj] -> Linear weight [proj, width]

    def take(self, tensor: Tensor) -> Tensor:
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        if self.transpose:
            tensor = tensor.T
        return tensor.reshape(self.shape)


@dataclass(frozen=True)
class DiffusersLayout:
    """Where every tensor of one single-file checkpoint goes in a diffusers folder."""

    placements: Mapping[str, tuple[Placement, ...]]  # single-file key -> its pieces (q/k/v: three)
    dropped: Mapping[str, str]  # single-file key -> why a diffusers folder has no place for it
    # text encoder layers written, per text component (SD 2.x: one fewer, see the module docstring)
    text_layers: Mapping[str, int]

    def specs(self, component: Component, dtypes: Mapping[str, torch.dtype]) -> dict[str, TensorSpec]:
        """The component file's header: every diffusers key with its shape and the dtype of its source."""
        return {
            p.key: TensorSpec(p.shape, dtypes[key])
            for key, pieces in self.placements.items()
            for p in pieces
            if p.component == component
        }


# Inside one transformer block (SpatialTransformer / Transformer2DModel) both layouts share every name.
_INSIDE = "INSIDE"
_UNET_RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_UNET_TOP = ("conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out")


def _unet_modules(config: UNetConfig) -> list[str]:
    """The module paths of a diffusers ``UNet2DConditionModel`` of this configuration (a superset: a
    ``conv_shortcut`` between equal widths does not exist), transformer blocks as one ``INSIDE`` module."""
    levels, layers = len(config.channel_mult), config.num_res_blocks
    attention = [2**b in config.attention_resolutions for b in range(levels)]  # per down level
    modules = list(_UNET_TOP)
    if config.adm_in_channels:  # SDXL's vector y
        modules += ["add_embedding.linear_1", "add_embedding.linear_2"]

    def block(prefix: str, count: int, with_attention: bool) -> None:
        for j in range(count):
            modules.extend(f"{prefix}.resnets.{j}.{part}" for part in _UNET_RESNET)
            if with_attention:
                modules.append(f"{prefix}.attentions.{j}.{_INSIDE}")

    for b in range(levels):
        block(f"down_blocks.{b}", layers, attention[b])
        if b < levels - 1:
            modules.append(f"down_blocks.{b}.downsamplers.0.conv")
    block("mid_block", 2, False)
    modules.append(f"mid_block.attentions.0.{_INSIDE}")
    for b in range(levels):  # up_blocks.0 is the lowest resolution
        block(f"up_blocks.{b}", layers + 1, attention[levels - 1 - b])
        if b < levels - 1:
            modules.append(f"up_blocks.{b}.upsamplers.0.conv")
    return modules


_VAE_RESNET = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")
_VAE_ATTENTION = ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
_VAE_TOP = (
    *(f"{side}.{m}" for side in ("encoder", "decoder") for m in ("conv_in", "conv_out", "conv_norm_out")),
    "quant_conv",
    "post_quant_conv",
)


def _vae_modules(config: VAEConfig) -> list[str]:
    """The module paths of a diffusers ``AutoencoderKL`` of this configuration (a superset, as for the UNet)."""
    levels, layers = len(config.ch_mult), config.num_res_blocks
    modules = list(_VAE_TOP)
    for b in range(levels):
        modules += [f"encoder.down_blocks.{b}.resnets.{j}.{p}" for j in range(layers) for p in _VAE_RESNET]
        modules += [f"decoder.up_blocks.{b}.resnets.{j}.{p}" for j in range(layers + 1) for p in _VAE_RESNET]
        if b < levels - 1:
            modules += [
                f"encoder.down_blocks.{b}.downsamplers.0.conv",
                f"decoder.up_blocks.{b}.upsamplers.0.conv",
            ]
    for side in ("encoder", "decoder"):
        modules += [f"{side}.mid_block.resnets.{i}.{p}" for i in (0, 1) for p in _VAE_RESNET]
        modules += [f"{side}.mid_block.attentions.0.{p}" for p in _VAE_ATTENTION]
    return modules


_TEXT_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")  # fmt: skip


_TEXT_PROJECTION = "text_projection.weight"


def _text_keys(layers: int, projection: bool) -> list[str]:
    """The keys of a transformers ``CLIPTextModel`` (classic ``text_model.*`` names, as on the Hub), or with
    ``projection`` of a ``CLIPTextModelWithProjection``."""
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(layers):
        keys += [f"text_model.encoder.layers.{i}.{m}.{p}" for m in _TEXT_LAYER for p in ("weight", "bias")]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return keys + [_TEXT_PROJECTION] * projection


def text_layers_written(text: TextEncoderConfig) -> int:
    """OpenCLIP layers past the one SD 2.x uses by default are dropped, as diffusers' SD 2.x folders do: their
    pipelines take the last layer with the final LayerNorm, which is what SD 2.x takes. SDXL's encoders skip
    the final LayerNorm and diffusers' SDXL pipelines pick the layer themselves, so every layer is kept."""
    if text.kind == "open_clip" and text.final_layer_norm:
        return text.layers - max(text.default_clip_skip, 1) + 1
    return text.layers


def _with_projection(config: ModelConfig, text: TextEncoderConfig) -> bool:
    """Whether the encoder is written as a ``CLIPTextModelWithProjection``: SDXL's bigG, whose projected pooled
    text feeds the UNet (SD 2.x's projection is unused, and its folders have a plain ``CLIPTextModel``)."""
    return config.is_sdxl and text.kind == "open_clip"


def _unet_sources(config: UNetConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(LDM module -> diffusers module, LDM transformer container -> diffusers container), traced."""
    modules = _unet_modules(config)
    layers = {"layers_per_block": config.num_res_blocks}
    placed = trace_conversion(lambda s: unet_to_ldm(s, layers), {f"{m}.weight": 1 for m in modules})
    exact, inside = {}, {}
    for module in modules:
        ldm = placed[f"{module}.weight"][0].removesuffix(".weight")
        if module.endswith(_INSIDE):
            inside[ldm.removesuffix(_INSIDE)] = module.removesuffix(_INSIDE)
        else:
            exact[ldm] = module
    return exact, inside


def _unet_placements(config: UNetConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Placement]:
    exact, inside = _unet_sources(config)
    out = {}
    for key, shape in shapes.items():
        module, _, param = key.rpartition(".")
        if module in exact:
            target = f"{exact[module]}.{param}"
        else:
            container = next((c for c in inside if key.startswith(c)), None)
            if container is None:
                raise CheckpointError(
                    f"{UNET_PREFIX}{key}: no place for it in a diffusers UNet; this is not a Stable Diffusion 1.x/2.x/XL UNet"
                )
            target = inside[container] + key[len(container) :]
        out[key] = Placement("unet", target, shape)
    return out


# diffusers' VAE mid-block attention projections are Linear layers; LDM's are 1x1 convolutions.
_VAE_LINEAR = tuple(f".mid_block.attentions.0.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0"))


def _vae_placements(config: VAEConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Placement]:
    modules = _vae_modules(config)
    levels = {"block_out_channels": [config.ch * m for m in config.ch_mult]}
    rows = {f"{m}.{p}": 1 for m in modules for p in ("weight", "bias")}
    placed = trace_conversion(lambda s: vae_to_ldm(s, levels), rows)
    by_ldm = {ldm: source for source, (ldm, _) in placed.items()}
    out = {}
    for key, shape in shapes.items():
        if key not in by_ldm:
            raise CheckpointError(f"{VAE_PREFIX}{key}: no place for it in a diffusers AutoencoderKL")
        target = by_ldm[key]
        if target.endswith(_VAE_LINEAR) and len(shape) == 4:
            shape = shape[:2]  # [out, in, 1, 1] -> [out, in]
        out[key] = Placement("vae", target, shape)
    return out


def _text_placements(
    config: ModelConfig, part: TextComponent, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[Placement, ...]], dict[str, str]]:
    text, component, prefix = part.config, _component(part), part.prefix
    layers = text_layers_written(text)
    projection = _with_projection(config, text)
    keys = _text_keys(layers, projection)
    if text.kind == "clip":
        placed = trace_conversion(clip_to_ldm, dict.fromkeys(keys, 1))
    else:  # OpenCLIP fuses q, k, v into one in_proj: trace with real row counts to find the blocks
        rows = {k: text.width if "_proj." in k and "out_proj" not in k else 1 for k in keys}
        placed = trace_conversion(open_clip_from_hf, rows)
    pieces: dict[str, list[Placement]] = {}
    for source, (ldm, block) in placed.items():
        if ldm not in shapes:
            raise CheckpointError(f"{prefix}{ldm}: missing; the text encoder does not match its config")
        shape = shapes[ldm]
        if block is not None:
            shape = (block[1] - block[0], *shape[1:])
        # open_clip_from_hf transposes the Linear weight into OpenCLIP's bare matrix (applied as x @ P)
        transpose = source == _TEXT_PROJECTION
        if transpose:
            shape = shape[::-1]
        pieces.setdefault(ldm, []).append(Placement(component, source, shape, block, transpose))
    model = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    dropped = {}
    for key in shapes:
        if key in pieces:
            continue
        if key.endswith("position_ids"):
            dropped[key] = "a constant buffer, not a weight"
        elif key == "model.logit_scale":
            dropped[key] = (
                f"OpenCLIP's contrastive temperature, unused by Stable Diffusion; a {model} has no place for it"
            )
        elif key == "model.text_projection":
            dropped[key] = (
                "unused by Stable Diffusion; diffusers' SD 2.x text encoder is a CLIPTextModel without it"
            )
        elif text.kind == "open_clip" and key.startswith("model.transformer.resblocks."):
            dropped[key] = (
                f"past the layer SD 2.x uses (clip skip {text.default_clip_skip}); diffusers keeps {layers} layers"
            )
        else:
            raise CheckpointError(f"{prefix}{key}: no place for it in a transformers {model}")
    return {k: tuple(v) for k, v in pieces.items()}, dropped


def _check_forward(
    component: Component,
    prefix: str,
    pieces: Mapping[str, tuple[Placement, ...]],
    shapes: Mapping[str, tuple[int, ...]],
    convert: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
) -> None:
    """The placed layout, converted forward on the meta device, must give back exactly these keys and shapes."""
    meta = {p.key: torch.empty(p.shape, device="meta") for ps in pieces.values() for p in ps}
    back = {k: tuple(v.shape) for k, v in convert(meta).items()}
    want = {k: shapes[k] for k in pieces}
    if back != want:
        key = next(k for k in sorted(set(back) | set(want)) if back.get(k) != want.get(k))
        raise CheckpointError(
            f"{prefix}{key}: the diffusers {component} layout does not convert back "
            f"({want.get(key)} -> {back.get(key)}); this architecture cannot be written as a diffusers folder"
        )


def _strip(prefix: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}


def diffusers_layout(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> DiffusersLayout:
    """Where each tensor of a single-file checkpoint (full keys -> shapes) goes in a diffusers folder."""
    placements: dict[str, tuple[Placement, ...]] = {}
    dropped: dict[str, str] = {}
    unet = _strip(UNET_PREFIX, shapes)
    unet_pieces = {k: (p,) for k, p in _unet_placements(config.unet, unet).items()}
    layers = {"layers_per_block": config.unet.num_res_blocks}
    _check_forward("unet", UNET_PREFIX, unet_pieces, unet, lambda s: unet_to_ldm(s, layers))
    vae = _strip(VAE_PREFIX, shapes)
    vae_pieces = {k: (p,) for k, p in _vae_placements(config.vae, vae).items()}
    levels = {"block_out_channels": list(config.vae.ch_mult)}
    _check_forward("vae", VAE_PREFIX, vae_pieces, vae, lambda s: vae_to_ldm(s, levels))
    parts: list[tuple[str, Mapping[str, tuple[Placement, ...]]]] = [
        (UNET_PREFIX, unet_pieces),
        (VAE_PREFIX, vae_pieces),
    ]
    text_layers = {}
    for part in text_components(config):
        text = _strip(part.prefix, shapes)
        text_pieces, text_dropped = _text_placements(config, part, text)
        _check_forward(_component(part), part.prefix, text_pieces, text, part.to_ldm)
        parts.append((part.prefix, text_pieces))
        dropped.update({part.prefix + k: why for k, why in text_dropped.items()})
        text_layers[part.folder] = text_layers_written(part.config)
    for prefix, pieces in parts:
        placements.update({prefix + k: v for k, v in pieces.items()})
    networks = tuple(prefix for prefix, _ in parts)
    for key in shapes:
        if not key.startswith(networks):
            dropped[key] = (
                "EMA weights: a diffusers folder holds one UNet (convert with --ema to write them as its weights)"
                if key.startswith("model_ema.")
                else "not a weight of the UNet, VAE or text encoders"
            )
    return DiffusersLayout(
        MappingProxyType(placements), MappingProxyType(dropped), MappingProxyType(text_layers)
    )


# ---------------------------------------------------------------------------------------------- configs

_PIPELINES = {9: "StableDiffusionInpaintPipeline", 8: "StableDiffusionInstructPix2PixPipeline"}
_SDXL_PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}


def unet_config_json(config: ModelConfig) -> dict[str, Any]:
    """``unet/config.json``; ``attention_head_dim`` is diffusers' historical name for the *head count*."""
    unet = config.unet
    channels = [unet.model_channels * m for m in unet.channel_mult]
    levels = len(channels)
    attention = [2**b in unet.attention_resolutions for b in range(levels)]
    heads = [unet.heads_at(c)[0] for c in channels]
    # diffusers' mid block takes the last entry, as ours takes the last level's depth; a level without attention
    # ignores its entry (diffusers' own SDXL config says 1 there: [1, 2, 10]).
    depth = (
        unet.transformer_depth
        if isinstance(unet.transformer_depth, int)
        else [unet.depth_at(b) or 1 for b in range(levels)]
    )
    sdxl = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SIZE_EMBEDDING,
            "projection_class_embeddings_input_dim": unet.adm_in_channels,
        }
        if unet.adm_in_channels
        else {}
    )
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": unet.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": unet.in_channels,
        "layers_per_block": unet.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": unet.norm_groups,
        "out_channels": unet.out_channels,
        "sample_size": config.default_size // config.vae.downsample,
        "transformer_layers_per_block": depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        # fp32 softmax: what SD 2.1 768-v needs in fp16 (diffusers sets it for v models); numerics only
        "upcast_attention": config.prediction == "v",
        "use_linear_projection": unet.use_linear_in_transformer,
        **sdxl,
    }


def vae_config_json(config: ModelConfig) -> dict[str, Any]:
    vae = config.vae
    if vae.embed_dim != vae.z_channels:
        raise CheckpointError(
            f"VAE embed_dim {vae.embed_dim} differs from z_channels {vae.z_channels}: diffusers' AutoencoderKL "
            "has one latent_channels for both"
        )
    levels = len(vae.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [vae.ch * m for m in vae.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "in_channels": vae.in_channels,
        "latent_channels": vae.z_channels,
        "layers_per_block": vae.num_res_blocks,
        "norm_num_groups": vae.norm_groups,
        "out_channels": vae.out_ch,
        "sample_size": config.default_size,
        "scaling_factor": vae.scale_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_config_json(
    text: TextEncoderConfig, layers: int, dtype: torch.dtype, *, projection: bool = False
) -> dict[str, Any]:
    """transformers' ``CLIPTextConfig`` as the Hub's SD folders have it (``eos_token_id`` 2 selects transformers'
    original pooling, at the highest token id, EOS: as OpenCLIP pools SDXL's bigG; SD 1.x/2.x use the hidden
    states, not the pooled output). ``projection``: a ``CLIPTextModelWithProjection`` (SDXL's bigG)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": text.activation,
        "hidden_size": text.width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": text.width * text.mlp_ratio,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": text.max_positions,
        "num_attention_heads": text.heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": text.projection_dim or text.width,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": text.vocab_size,
    }


def scheduler_config_json(config: ModelConfig) -> dict[str, Any]:
    """DDIM with SD's training schedule (SDXL: Euler, as its Hub folders); ``prediction_type`` is what tells an
    epsilon model from a v model."""
    if config.is_sdxl:
        return {
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": _DIFFUSERS_VERSION,
            "beta_end": config.schedule.linear_end,
            "beta_schedule": "scaled_linear",
            "beta_start": config.schedule.linear_start,
            "interpolation_type": "linear",
            "num_train_timesteps": config.schedule.timesteps,
            "prediction_type": "v_prediction" if config.prediction == "v" else "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        }
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "beta_end": config.schedule.linear_end,
        "beta_schedule": "scaled_linear",
        "beta_start": config.schedule.linear_start,
        "clip_sample": False,
        "num_train_timesteps": config.schedule.timesteps,
        "prediction_type": "v_prediction" if config.prediction == "v" else "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }


def model_index_json(config: ModelConfig) -> dict[str, Any]:
    """No tokenizer files are written (sdstudio's tokenizer is built in, without vocabulary files): diffusers'
    ``StableDiffusionPipeline.from_pretrained(folder, tokenizer=...)`` needs one passed, e.g.
    ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` (SD 1.x), or ``tokenizer=None`` and
    ``prompt_embeds``. The components themselves load on their own (``UNet2DConditionModel.from_pretrained(
    folder, subfolder="unet")``, ``AutoencoderKL``, transformers' ``CLIPTextModel``). SDXL folders likewise
    list ``tokenizer`` / ``tokenizer_2`` as null."""
    if config.is_sdxl:
        return _sdxl_model_index(config)
    return {
        "_class_name": _PIPELINES.get(config.unet.in_channels, "StableDiffusionPipeline"),
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _sdxl_model_index(config: ModelConfig) -> dict[str, Any]:
    """As diffusers' own SDXL folders: the base gives an empty negative prompt as zeros (as sdstudio does);
    the refiner has no CLIP-L and conditions on an aesthetic score."""
    refiner = config.conditioner == "sdxl_refiner"
    pipeline = _SDXL_PIPELINES[config.conditioner]
    if config.unet.in_channels == 9:
        pipeline = "StableDiffusionXLInpaintPipeline"
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if pipeline != "StableDiffusionXLPipeline":  # the img2img / inpaint pipelines take the option
        index["requires_aesthetics_score"] = refiner
    return index


def folder_configs(
    config: ModelConfig,
    text_layers: int | Mapping[str, int],
    text_dtype: torch.dtype | Mapping[str, torch.dtype],
) -> dict[str, dict[str, Any]]:
    """Every JSON file of the folder, by relative path. ``text_layers`` / ``text_dtype``: per text encoder
    folder (``text_encoder``, ``text_encoder_2``), or one value for every one (SD 1.x/2.x have one); a folder
    missing from the mapping gets ``text_layers_written`` / float32."""
    files = {
        "model_index.json": model_index_json(config),
        "unet/config.json": unet_config_json(config),
        "vae/config.json": vae_config_json(config),
    }
    for part in text_components(config):
        layers = (
            text_layers
            if isinstance(text_layers, int)
            else text_layers.get(part.folder, text_layers_written(part.config))
        )
        dtype = (
            text_dtype if isinstance(text_dtype, torch.dtype) else text_dtype.get(part.folder, torch.float32)
        )
        files[f"{part.folder}/config.json"] = text_config_json(
            part.config, layers, dtype, projection=_with_projection(config, part.config)
        )
    files["scheduler/scheduler_config.json"] = scheduler_config_json(config)
    return files


# ---------------------------------------------------------------------------------------------- writer


class DiffusersFolderWriter:
    """A diffusers folder written tensor by tensor: ``put`` takes single-file keys and tensors, in any order.

    ``specs`` (single-file key -> shape and dtype, as they will be put) fixes the layout and the headers up front.
    Keys the layout drops are accepted by ``wants`` as False, so callers need not compute them."""

    def __init__(self, folder: Path, config: ModelConfig, specs: Mapping[str, TensorSpec]) -> None:
        self.layout = diffusers_layout(config, {k: s.shape for k, s in specs.items()})
        dtypes = {k: s.dtype for k, s in specs.items()}
        prefixes = component_prefixes(config)
        text_dtypes = {
            component: next(
                (dtypes[k] for k in self.layout.placements if k.startswith(prefix)), torch.float32
            )
            for component, prefix in prefixes.items()
            if component.startswith("text_encoder")
        }
        for name, data in folder_configs(config, self.layout.text_layers, text_dtypes).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._streams: dict[Component, SafetensorsStream] = {}
        try:
            for component in prefixes:
                self._streams[component] = SafetensorsStream(
                    folder / component / WEIGHTS_FILE[component],
                    self.layout.specs(component, dtypes),
                    {"format": "pt"},  # transformers refuses a safetensors file without it
                )
        except BaseException:
            self.abort()
            raise

    def wants(self, key: str) -> bool:
        return key in self.layout.placements

    def put(self, key: str, tensor: Tensor) -> None:
        for piece in self.layout.placements.get(key, ()):
            self._streams[piece.component].put(piece.key, piece.take(tensor))

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()

    def abort(self) -> None:
        for stream in self._streams.values():
            stream.abort()


def save_diffusers_folder(
    folder: str | Path, config: ModelConfig, state: Mapping[str, Tensor], *, log_dropped: bool = True
) -> DiffusersLayout:
    """Write a whole in-memory single-file state dict as a diffusers folder (which must not exist yet or be
    empty). Streaming and atomic replacement are in ``sdstudio.models.merge.convert_checkpoint``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = DiffusersFolderWriter(
        folder, config, {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
    )
    try:
        for key, tensor in state.items():
            writer.put(key, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if log_dropped:
        log_dropped_keys(writer.layout.dropped)
    return writer.layout


def log_dropped_keys(dropped: Mapping[str, str]) -> None:
    """One log line per reason: how many keys, and the first of them."""
    by_reason: dict[str, list[str]] = {}
    for key, why in dropped.items():
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
        log.info(
            "not in the diffusers folder: %d keys (%s%s): %s",
            len(keys),
            keys[0],
            ", ..." * (len(keys) > 1),
            why,
        )
