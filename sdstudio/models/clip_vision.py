"""CLIP image encoders and whole CLIP models (image and text towers with their projections).

The vision tower is the ViT of Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision" (Sec. 2.4): patches embedded by a strided conv, a class token, learned positions,
a pre-LayerNorm transformer, then the class token's final LayerNorm state times a projection. Two layouts
of the same architecture, attribute names equal to the checkpoint keys so ``load_state_dict`` needs no
renaming:

* transformers (``CLIPModel`` / ``CLIPVisionModelWithProjection``): ``vision_model.*`` (note its
  ``pre_layrnorm`` spelling), ``visual_projection.weight``, ``text_model.*``, ``text_projection.weight``;
* OpenAI / open_clip: ``visual.*`` (packed q/k/v ``in_proj``, ``visual.proj`` a bare [width, embed]
  matrix), the text tower at top level (``token_embedding``, ``transformer.resblocks.*``, ...).

The text towers are those of ``sdstudio.models.clip`` (the SD text encoders), plus their projections.
Architectures are detected from tensor shapes. Two things a file cannot tell: attention heads (64-wide,
except OpenCLIP ViT-H/14 and ViT-bigG/14 vision towers: 16 heads of 80 / 104) and the activation
(OpenAI's models use quick_gelu, OpenCLIP's LAION models exact GELU): each preset has its default, and
``activation`` overrides it, e.g. for a LAION ViT-B/32, whose shapes equal OpenAI's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.models.clip import (
    _CLIPEncoderLayer,
    _CLIPTextTransformer,
    _embed,
    _OpenCLIPTextModel,
    _ResidualAttentionBlock,
)
from sdstudio.models.configs import TextEncoderConfig
from sdstudio.models.loading import read_state_dict
from sdstudio.models.tokenizer import BOS, EOS, ClipTokenizer

log = logging.getLogger(__name__)

Activation = Literal["quick_gelu", "gelu"]
Layout = Literal["transformers", "open_clip"]
Shapes = Mapping[str, Sequence[int]]

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation of [0, 1] RGB
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT image tower and its projection to the joint embedding."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    embed_dim: int = 512
    activation: Activation = "quick_gelu"

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ClipConfig:
    """A whole CLIP model in one checkpoint layout; ``text`` is None for a vision-only file."""

    layout: Layout
    vision: VisionConfig
    text: TextEncoderConfig | None = None


# Vision towers of the released models (open_clip's model_configs/*.json). bigG's mlp_ratio 4.9231
# gives int(1664 * 4.9231) = 8192.
VISION_PRESETS: dict[str, VisionConfig] = {
    "ViT-B-32": VisionConfig(224, 32, 768, 12, 12, 3072, 512, "quick_gelu"),
    "ViT-L-14": VisionConfig(224, 14, 1024, 24, 16, 4096, 768, "quick_gelu"),
    "ViT-H-14": VisionConfig(224, 14, 1280, 32, 16, 5120, 1024, "gelu"),
    "ViT-bigG-14": VisionConfig(224, 14, 1664, 48, 16, 8192, 1280, "gelu"),
}

# Text towers of the same models (projection_dim = the joint embedding).
TEXT_PRESETS: dict[str, TextEncoderConfig] = {
    "ViT-B-32": TextEncoderConfig(width=512, layers=12, heads=8, projection_dim=512),
    "ViT-L-14": TextEncoderConfig(width=768, layers=12, heads=12, projection_dim=768),
    "ViT-H-14": TextEncoderConfig(width=1024, layers=24, heads=16, activation="gelu", projection_dim=1024),
    "ViT-bigG-14": TextEncoderConfig(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280),
}

# What shapes cannot tell: heads of the vision towers whose heads are not 64 wide, by width.
_VISION_HEADS = {1280: 16, 1664: 16}


def clip_preset(name: str, layout: Layout = "open_clip", activation: Activation | None = None) -> ClipConfig:
    """The whole CLIP model ``name`` (a key of ``VISION_PRESETS``) in ``layout``."""
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; choose one of: {', '.join(VISION_PRESETS)}")
    vision, text = VISION_PRESETS[name], TEXT_PRESETS[name]
    act = activation or vision.activation
    kind = "clip" if layout == "transformers" else "open_clip"
    return ClipConfig(
        layout,
        dataclasses.replace(vision, activation=act),
        dataclasses.replace(text, kind=kind, activation=act),
    )


def preset_name(vision: VisionConfig) -> str | None:
    """The preset whose vision tower has ``vision``'s shapes (activation ignored), if any."""
    for name, preset in VISION_PRESETS.items():
        if dataclasses.replace(preset, activation=vision.activation) == vision:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# The vision tower


def _patch_tokens(conv: nn.Conv2d, class_embedding: Tensor, positions: Tensor, pixels: Tensor) -> Tensor:
    """Patch embeddings after the class token, plus positions: [batch, tokens, width]."""
    x = conv(pixels.to(conv.weight.dtype))  # [batch, width, grid, grid]
    x = x.flatten(2).transpose(1, 2)  # [batch, grid * grid, width]
    cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + positions.to(x.dtype)


def _check_pixels(pixels: Tensor, size: int) -> None:
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
        raise ValueError(f"pixels must be [batch, 3, {size}, {size}], got {tuple(pixels.shape)}")


def _parameter(*shape: int, std: float) -> nn.Parameter:
    """A parameter drawn from N(0, std^2), left uninitialised on the meta device (see clip._embedding)."""
    param = nn.Parameter(torch.empty(*shape))
    if not param.is_meta:
        nn.init.normal_(param, std=std)
    return param


# transformers layout


def _encoder_layer(config: VisionConfig) -> _CLIPEncoderLayer:
    return _CLIPEncoderLayer(config.width, config.heads, config.mlp_width, config.activation, causal=False)


class _VisionEmbeddings(nn.Module):
    # No ``position_ids`` buffer: older checkpoints carry one, and the loader drops that key.
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = _parameter(config.width, std=config.width**-0.5)
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, config.patch_size, bias=False)
        table = _parameter(config.tokens, config.width, std=0.02)
        self.position_embedding = nn.Embedding(config.tokens, config.width, _weight=table.data)


class _VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_encoder_layer(config) for _ in range(config.layers))


class _VisionTransformer(nn.Module):
    """transformers' ``CLIPVisionTransformer``: the ``vision_model`` of a checkpoint."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embeddings = _VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width)  # sic, as the checkpoints spell it
        self.encoder = _VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.width)

    def forward(self, pixels: Tensor) -> Tensor:
        """Pooled output [batch, width]: the class token after the final LayerNorm."""
        emb = self.embeddings
        x = _patch_tokens(emb.patch_embedding, emb.class_embedding, emb.position_embedding.weight, pixels)
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x)  # [batch, tokens, width]
        return self.post_layernorm(x[:, 0])


# OpenAI / open_clip layout


class _Transformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            _ResidualAttentionBlock(
                config.width, config.heads, config.mlp_width, config.activation, causal=False
            )
            for _ in range(config.layers)
        )


class _OpenCLIPVisionTransformer(nn.Module):
    """open_clip's ``VisionTransformer`` (class-token pooling, ``proj`` a bare matrix): ``visual``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        scale = config.width**-0.5
        self.conv1 = nn.Conv2d(3, config.width, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = _parameter(config.width, std=scale)
        self.positional_embedding = _parameter(config.tokens, config.width, std=scale)
        self.ln_pre = nn.LayerNorm(config.width)
        self.transformer = _Transformer(config)
        self.ln_post = nn.LayerNorm(config.width)
        self.proj = _parameter(config.width, config.embed_dim, std=scale)  # [width, embed_dim]

    def forward(self, pixels: Tensor) -> Tensor:
        """Image embeddings [batch, embed_dim], not normalised."""
        x = _patch_tokens(self.conv1, self.class_embedding, self.positional_embedding, pixels)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)  # [batch, tokens, width]
        return self.ln_post(x[:, 0]) @ self.proj


# ---------------------------------------------------------------------------------------------
# Whole models


def _text_hidden(
    token_embedding: nn.Embedding,
    positions: Tensor,
    blocks: nn.ModuleList,
    final_norm: nn.LayerNorm,
    tokens: Tensor,
) -> Tensor:
    """Final-LayerNorm hidden states [batch, tokens, width] of a ``sdstudio.models.clip`` text tower."""
    x = _embed(token_embedding, positions, tokens, None)
    for block in blocks:
        x = block(x)  # [batch, tokens, width]
    return final_norm(x)


def _eos_states(hidden: Tensor, tokens: Tensor) -> Tensor:
    """The hidden state [batch, width] at each row's first EOS (OpenAI CLIP: the argmax of the ids)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), tokens.argmax(dim=-1)]


def _no_text() -> SdStudioError:
    return SdStudioError("this CLIP model has no text encoder (a vision-only file): it cannot encode texts")


class ClipModel(nn.Module):
    """A CLIP vision tower, optionally a text tower, their projections and ``logit_scale``.

    Subclasses hold the parameters under their layout's checkpoint names; this base holds the interface.
    """

    config: ClipConfig

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        if config.text is not None and config.text.projection_dim != config.vision.embed_dim:
            raise ValueError(
                f"text projection_dim {config.text.projection_dim} != vision embed_dim {config.vision.embed_dim}"
            )
        self.config = config
        self._tokenizer: ClipTokenizer | None = None

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def has_text(self) -> bool:
        return self.config.text is not None

    def image_features(self, pixels: Tensor) -> Tensor:
        """Projected image embeddings [batch, embed_dim] of preprocessed ``pixels``, not normalised."""
        raise NotImplementedError

    def _text_features(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def text_features(self, tokens: Tensor) -> Tensor:
        """Projected text embeddings [batch, embed_dim] of ``tokens`` [batch, 77] (BOS ... EOS pad), not
        normalised."""
        if self.config.text is None:
            raise _no_text()
        return self._text_features(tokens)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [len(texts), context]: BOS, the text (truncated), EOS, then zeros, as ``clip.tokenize``."""
        if self.config.text is None:
            raise _no_text()
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer()
        context = self.config.text.max_positions
        tokens = torch.zeros(len(texts), context, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *self._tokenizer.encode(text)[: context - 2], EOS]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray] | Tensor, batch_size: int = 32) -> Tensor:
        """L2-normalised image embeddings [N, embed_dim], float32, on the model's device.

        ``images``: uint8 HxWx3 arrays (or PIL images), preprocessed here; or a float tensor
        [N, 3, S, S] already preprocessed.
        """
        device = self._device()
        out = []
        for i in range(0, len(images), batch_size):  # preprocessed per batch: N images never all in memory
            batch = images[i : i + batch_size]
            pixels = batch if isinstance(batch, Tensor) else preprocess(batch, self.image_size)
            out.append(self.image_features(pixels.to(device)).float())
        return F.normalize(torch.cat(out), dim=-1) if out else self._no_embeddings()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """L2-normalised text embeddings [N, embed_dim], float32, on the model's device (77 tokens,
        longer texts truncated)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        tokens = self.tokenize(texts).to(self._device())
        out = [
            self.text_features(tokens[i : i + batch_size]).float()
            for i in range(0, tokens.shape[0], batch_size)
        ]
        return F.normalize(torch.cat(out), dim=-1) if out else self._no_embeddings()

    def _no_embeddings(self) -> Tensor:
        return torch.empty(0, self.config.vision.embed_dim, device=self._device())


class TransformersClipModel(ClipModel):
    """transformers' ``CLIPModel`` (or ``CLIPVisionModelWithProjection`` when ``text`` is None)."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__(config)
        vision = config.vision
        self.vision_model = _VisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.width, vision.embed_dim, bias=False)
        if config.text is not None:
            self.text_model = _CLIPTextTransformer(config.text)
            self.text_projection = nn.Linear(config.text.width, vision.embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_features(self, pixels: Tensor) -> Tensor:
        _check_pixels(pixels, self.image_size)
        return self.visual_projection(self.vision_model(pixels))

    def _text_features(self, tokens: Tensor) -> Tensor:
        text = self.text_model
        emb = text.embeddings
        hidden = _text_hidden(
            emb.token_embedding,
            emb.position_embedding.weight,
            text.encoder.layers,
            text.final_layer_norm,
            tokens,
        )
        return self.text_projection(_eos_states(hidden, tokens))


class OpenClipModel(ClipModel):
    """OpenAI CLIP / open_clip ``CLIP``: ``visual.*`` and the text tower at top level."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__(config)
        self.visual = _OpenCLIPVisionTransformer(config.vision)
        if config.text is not None:
            # The SD 2.x text tower of clip.py, its parameters moved up to the names of a whole CLIP file.
            text = _OpenCLIPTextModel(config.text)
            self.token_embedding = text.token_embedding
            self.positional_embedding = text.positional_embedding
            self.transformer = text.transformer
            self.ln_final = text.ln_final
            self.text_projection = text.text_projection  # [width, embed_dim]
            self.logit_scale = text.logit_scale

    def image_features(self, pixels: Tensor) -> Tensor:
        _check_pixels(pixels, self.image_size)
        return self.visual(pixels)

    def _text_features(self, tokens: Tensor) -> Tensor:
        hidden = _text_hidden(
            self.token_embedding, self.positional_embedding, self.transformer.resblocks, self.ln_final, tokens
        )
        return _eos_states(hidden, tokens) @ self.text_projection


def build_clip(config: ClipConfig) -> ClipModel:
    """The model of ``config``, randomly initialised (load weights with ``load_state_dict``)."""
    if config.layout == "transformers":
        return TransformersClipModel(config)
    if config.layout == "open_clip":
        return OpenClipModel(config)
    raise ValueError(f"unknown CLIP layout {config.layout!r}")


# ---------------------------------------------------------------------------------------------
# Detection

_HF_PATCH = "vision_model.embeddings.patch_embedding.weight"
_OC_PATCH = "visual.conv1.weight"
# Keys some files carry that hold no weights: transformers' position ids, old open_clip's causal mask,
# the scalars of OpenAI's JIT archives.
_IGNORED = re.compile(r"(^|\.)(position_ids|attn_mask)$|^(input_resolution|context_length|vocab_size)$")


@dataclass(frozen=True)
class DetectedClip:
    """Where a CLIP model sits in a state dict (``prefix`` before its keys) and its architecture."""

    prefix: str
    config: ClipConfig


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _describe(keys: Sequence[str]) -> str:
    """What a state dict without a CLIP vision transformer holds, in a few words."""
    if not keys:
        return "no tensors"
    if any("diffusion_model." in k or k.startswith(("input_blocks.", "down_blocks.")) for k in keys):
        return "a UNet (diffusion model keys)"
    visual = [k for k in keys if k.startswith("visual.") or ".visual." in k]
    if any(".attn_pool." in k for k in visual):
        return "an open_clip ViT with attentional pooling (CoCa), which is not supported"
    if any(".trunk." in k for k in visual):
        return "a CLIP image tower of another architecture (a timm trunk, not a ViT)"
    if visual:
        return "a CLIP image tower of another architecture (ResNet, not a ViT)"
    text_ends = ("token_embedding.weight", "ln_final.weight", "final_layer_norm.weight")
    if any(k.endswith(text_ends) for k in keys):
        return "a CLIP text encoder without a vision tower"
    if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in keys):
        return "a VAE"
    tops = sorted({k.split(".")[0] for k in keys})
    return f"{len(keys)} tensors under {', '.join(tops[:5])}{', ...' if len(tops) > 5 else ''}"


def _not_clip(keys: Sequence[str], reason: str | None = None) -> SdStudioError:
    found = reason or _describe(keys)
    return SdStudioError(
        f"not a CLIP ViT image encoder: found {found}; expected '{_HF_PATCH}' (transformers) "
        f"or '{_OC_PATCH}' with 'visual.transformer.resblocks.*' (OpenAI / open_clip), at top level or under a prefix"
    )


def _default_activation(vision: VisionConfig) -> Activation:
    """The activation of the preset with ``vision``'s width, patch and MLP (any depth), else quick_gelu."""
    for preset in VISION_PRESETS.values():
        if (preset.width, preset.patch_size, preset.mlp_width) == (
            vision.width,
            vision.patch_size,
            vision.mlp_width,
        ):
            return preset.activation
    log.info("CLIP vision tower of width %d matches no preset: assuming quick_gelu", vision.width)
    return "quick_gelu"


def _vision_config(
    shapes: Shapes, patch: str, positions: str, layers: str, fc: str, proj: str
) -> VisionConfig:
    """Vision config from the keys of the patch conv [width, 3, p, p], the position table [tokens, width],
    the first layer's MLP input [mlp, width], the layers (``layers`` + index) and the projection."""
    width, channels, ph, pw = shapes[patch]
    tokens = shapes[positions][0]
    grid = math.isqrt(tokens - 1)
    if channels != 3 or ph != pw or grid * grid != tokens - 1:
        found = f"a patch embedding {list(shapes[patch])} with {tokens} positions (not a square ViT)"
        raise _not_clip(list(shapes), found)
    if fc not in shapes:
        raise _not_clip(list(shapes), "a CLIP vision tower without transformer layers")
    if proj not in shapes:
        raise _not_clip(list(shapes), "a CLIP vision tower without its projection to the joint embedding")
    # transformers' Linear weight is [embed_dim, width], open_clip's proj [width, embed_dim]
    embed_dim = shapes[proj][0 if proj.endswith(".weight") else 1]
    return VisionConfig(
        image_size=grid * ph,
        patch_size=ph,
        width=width,
        layers=_count(shapes, re.escape(layers) + r"(\d+)\."),
        heads=_VISION_HEADS.get(width, max(1, width // 64)),
        mlp_width=shapes[fc][0],
        embed_dim=embed_dim,
    )


def detect_clip(shapes: Shapes, activation: Activation | None = None) -> DetectedClip:
    """The CLIP model in a state dict of ``shapes`` (key -> shape; no tensor data is read).

    ``activation`` None takes that of the preset of equal width, patch and MLP (quick_gelu if none
    matches): a file cannot tell. Raises ``SdStudioError`` naming what the file holds when it is not a
    CLIP ViT (the shortest prefix wins where a file holds several).
    """
    keys = list(shapes)
    found = [(k[: -len(_HF_PATCH)], "transformers") for k in keys if k.endswith(_HF_PATCH)]
    found += [(k[: -len(_OC_PATCH)], "open_clip") for k in keys if k.endswith(_OC_PATCH)]
    found = [(p, layout) for p, layout in found if p == "" or p.endswith(".")]
    if not found:
        raise _not_clip(keys)
    p, layout = min(found, key=lambda f: len(f[0]))
    if layout == "transformers":
        v = p + "vision_model."
        vision = _vision_config(
            shapes,
            patch=p + _HF_PATCH,
            positions=v + "embeddings.position_embedding.weight",
            layers=v + "encoder.layers.",
            fc=v + "encoder.layers.0.mlp.fc1.weight",
            proj=p + "visual_projection.weight",
        )
    else:
        v = p + "visual."
        if v + "transformer.resblocks.0.mlp.c_fc.weight" not in shapes or v + "attn_pool.query" in shapes:
            raise _not_clip(keys, _describe([k[len(p) :] for k in keys if k.startswith(v)]))
        vision = _vision_config(
            shapes,
            patch=p + _OC_PATCH,
            positions=v + "positional_embedding",
            layers=v + "transformer.resblocks.",
            fc=v + "transformer.resblocks.0.mlp.c_fc.weight",
            proj=v + "proj",
        )
    act = activation or _default_activation(vision)
    vision = dataclasses.replace(vision, activation=act)
    text = _text_config(shapes, p, layout, act)
    if text is not None and text.projection_dim != vision.embed_dim:
        raise SdStudioError(
            f"a CLIP model whose text projection gives {text.projection_dim or 'no'} dimensions and its image "
            f"projection {vision.embed_dim}: the towers do not belong together"
        )
    return DetectedClip(p, ClipConfig(layout, vision, text))


def _text_config(shapes: Shapes, p: str, layout: Layout, activation: Activation) -> TextEncoderConfig | None:
    """The text tower beside the vision tower, if the file has one (heads: 64 wide, as every CLIP's)."""
    if layout == "transformers":
        t = p + "text_model."
        if t + "embeddings.token_embedding.weight" not in shapes:
            return None
        vocab, width = shapes[t + "embeddings.token_embedding.weight"]
        projection = shapes.get(p + "text_projection.weight", (0, width))[0]
        return TextEncoderConfig(
            kind="clip",
            vocab_size=vocab,
            width=width,
            layers=_count(shapes, re.escape(t) + r"encoder\.layers\.(\d+)\."),
            heads=max(1, width // 64),
            max_positions=shapes[t + "embeddings.position_embedding.weight"][0],
            mlp_ratio=shapes[t + "encoder.layers.0.mlp.fc1.weight"][0] // width,
            activation=activation,
            projection_dim=projection,
        )
    if p + "token_embedding.weight" not in shapes:
        return None
    vocab, width = shapes[p + "token_embedding.weight"]
    return TextEncoderConfig(
        kind="open_clip",
        vocab_size=vocab,
        width=width,
        layers=_count(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\."),
        heads=max(1, width // 64),
        max_positions=shapes[p + "positional_embedding"][0],
        mlp_ratio=shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0] // width,
        activation=activation,
        pad_with_eos=False,
        projection_dim=shapes.get(p + "text_projection", (width, 0))[1],
    )


# ---------------------------------------------------------------------------------------------
# Loading


# The top-level names of a whole CLIP model in each layout: what a prefix may share with other parts
# of a file (``model.`` before both a CLIP and ``model.diffusion_model.*``).
_ROOTS: dict[str, tuple[str, ...]] = {
    "transformers": ("vision_model.", "visual_projection.", "text_model.", "text_projection.", "logit_scale"),
    "open_clip": (
        "visual.",
        "token_embedding.",
        "positional_embedding",
        "transformer.",
        "ln_final.",
        "text_projection",
        "logit_scale",
    ),
}


def clip_state(state: Mapping[str, Tensor], detected: DetectedClip) -> dict[str, Tensor]:
    """The tensors of ``detected``'s model, its prefix stripped, keys that hold no weights dropped."""
    n, roots = len(detected.prefix), _ROOTS[detected.config.layout]
    out = {k[n:]: v for k, v in state.items() if k.startswith(detected.prefix)}
    return {k: v for k, v in out.items() if k.startswith(roots) and not _IGNORED.search(k)}


def load_clip(
    path: str | Path, activation: Activation | None = None, *, dtype: torch.dtype = torch.float32
) -> ClipModel:
    """A CLIP model from a ``.safetensors`` / ``.bin`` / ``.pt`` file (pickles loaded weights-only), in
    either layout, whole or vision-only, at top level or under a prefix; eval mode, on the CPU.

    ``activation``: see ``detect_clip``. A vision-only file's model raises ``SdStudioError`` on texts.
    """
    path = Path(path)
    state, _ = read_state_dict(path)
    try:
        detected = detect_clip({k: tuple(v.shape) for k, v in state.items()}, activation)
    except SdStudioError as e:
        raise SdStudioError(f"{path}: {e}") from None
    weights = clip_state(state, detected)
    config = detected.config
    with torch.device("meta"):
        model = build_clip(config)
    expected = dict(model.state_dict())
    if config.text is not None and "logit_scale" not in weights:  # absent from some exports
        weights["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        problems = [
            f"{what} {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''}"
            for what, ks in (("missing", missing), ("unexpected", unexpected))
            if ks
        ]
        raise SdStudioError(
            f"{path}: a CLIP model ({config.layout} layout) whose keys do not match its detected "
            f"architecture: {'; '.join(problems)}"
        )
    wrong = [k for k, t in expected.items() if tuple(weights[k].shape) != tuple(t.shape)]
    if wrong:
        k = wrong[0]
        raise SdStudioError(
            f"{path}: tensor {detected.prefix}{k} has shape {list(weights[k].shape)}, "
            f"expected {list(expected[k].shape)} for the detected CLIP architecture"
        )
    model.load_state_dict({k: weights[k].to(dtype) for k in expected}, strict=True, assign=True)
    name = preset_name(config.vision) or "custom"
    log.info("loaded CLIP %s (%s layout, %s) from %s", name, config.layout, config.vision.activation, path)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be uint8 HxWx3 arrays, got {array.dtype} {array.shape}")
    return array


def preprocess(images: Sequence[np.ndarray | Image.Image], size: int) -> Tensor:
    """CLIP's preprocessing: [N, 3, size, size] float32.

    The shorter side is resized to ``size`` with PIL's bicubic filter (the longer to
    ``int(size * long / short)``), a centred ``size`` square is cropped (offset ``(extra) // 2``, as
    transformers' ``CLIPImageProcessor``; torchvision's ``CenterCrop`` in OpenAI's code rounds instead,
    one pixel apart when the extra is odd), scaled to [0, 1] and normalised with ``MEAN`` / ``STD``.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError("preprocess takes a sequence of images; wrap a single HxWx3 array in a list")
    out = torch.empty(len(images), 3, size, size)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    for i, image in enumerate(images):
        array = _rgb_array(image)
        height, width = array.shape[:2]
        short, long = min(height, width), max(height, width)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if width <= height else (size, new_long)
        resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = torch.from_numpy(resized[top : top + size, left : left + size].copy())  # [size, size, 3]
        out[i] = (crop.permute(2, 0, 1).float() / 255.0 - mean) / std
    return out


__all__ = [
    "MEAN",
    "STD",
    "TEXT_PRESETS",
    "VISION_PRESETS",
    "ClipConfig",
    "ClipModel",
    "DetectedClip",
    "OpenClipModel",
    "TransformersClipModel",
    "VisionConfig",
    "build_clip",
    "clip_preset",
    "clip_state",
    "detect_clip",
    "load_clip",
    "preprocess",
    "preset_name",
]
