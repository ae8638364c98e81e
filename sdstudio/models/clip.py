"""The CLIP text encoders of Stable Diffusion, in the original single-file checkpoint layouts.

Two layouts of the same architecture (a pre-LayerNorm causal transformer, Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision"):

* ``FrozenCLIPEmbedder`` (SD 1.x): OpenAI CLIP ViT-L/14 in the Hugging Face ``CLIPTextModel`` layout,
  stored under ``cond_stage_model.transformer.text_model.*``.
* ``FrozenOpenCLIPEmbedder`` (SD 2.x): OpenCLIP ViT-H/14 in the OpenCLIP layout, stored under
  ``cond_stage_model.model.*`` (packed q/k/v ``in_proj``, ``text_projection`` as a bare matrix).

Attribute names equal the checkpoint keys with ``cond_stage_model.`` stripped, so weights load with
``load_state_dict`` and no renaming (the class names are those of ``ldm.modules.encoders.modules``).
Both return the hidden states that condition the UNet: the output of one transformer layer, chosen
as AUTOMATIC1111's "Clip skip" (1 = last, 2 = penultimate), followed by the final LayerNorm.
Despite the names nothing is frozen here: whoever trains or infers sets ``requires_grad`` and ``eval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.models.configs import TextEncoderConfig


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, which its weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as OpenCLIP's nn.GELU
    raise ValueError(f"unknown text encoder activation {name!r}")


def _self_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = True) -> Tensor:
    """Multi-head self-attention over projected ``q, k, v`` [batch, tokens, width]: causal for text,
    bidirectional for the image towers (``clip_vision``)."""
    batch, tokens, width = q.shape
    # [batch, tokens, width] -> [batch, heads, tokens, head_dim]
    q, k, v = (t.view(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [batch, heads, tokens, head_dim]
    return out.transpose(1, 2).reshape(batch, tokens, width)


def _check_clip_skip(clip_skip: int, layers: int) -> None:
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be in [1, {layers}], got {clip_skip}")


def _embed(embedding: nn.Embedding, positions: Tensor, tokens: Tensor, token_embeds: Tensor | None) -> Tensor:
    """Token plus position embeddings, [batch, tokens, width], in the weights' dtype.

    ``positions`` is the [max_positions, width] table; ``token_embeds`` [batch, tokens, width] replaces
    the lookup of ``tokens`` (textual inversion builds it with its own vectors spliced in).
    """
    if token_embeds is None:
        token_embeds = embedding(tokens)
    elif token_embeds.shape[:2] != tokens.shape or token_embeds.shape[2] != embedding.embedding_dim:
        raise ValueError(
            f"token_embeds {tuple(token_embeds.shape)} do not match tokens {tuple(tokens.shape)} "
            f"and width {embedding.embedding_dim}"
        )
    length = tokens.shape[1]
    if length > positions.shape[0]:
        raise ValueError(f"{length} tokens exceed the {positions.shape[0]} positions of the text encoder")
    return token_embeds.to(embedding.weight.dtype) + positions[:length]


# ---------------------------------------------------------------------------------------------
# SD 1.x: Hugging Face CLIPTextModel layout


class _CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # [batch, tokens, width]
        out = _self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.causal)
        return self.out_proj(out)


class _CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.act = _activation(activation)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer layer in transformers' names (text and image towers alike)."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, causal: bool = True) -> None:
        super().__init__()
        self.self_attn = _CLIPAttention(width, heads, causal)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = _CLIPMLP(width, mlp_width, activation)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # [batch, tokens, width]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding`` with its default N(0, 1) init, except when built on the meta device to be loaded
    into: initialising a meta tensor with ``normal_`` goes through torch's Python references and imports
    torch._dynamo, which costs most of a checkpoint's load time (0.8 s of 0.9 s for the toy model)."""
    if torch.empty(0).is_meta:
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class _CLIPEmbeddings(nn.Module):
    # No ``position_ids`` buffer: some checkpoints carry one, and the loader drops that key.
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.max_positions, config.width)
        if not self.token_embedding.weight.is_meta:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.position_embedding.weight, std=0.01)


class _CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _CLIPEncoderLayer(config.width, config.heads, config.width * config.mlp_ratio, config.activation)
            for _ in range(config.layers)
        )


class _CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = _CLIPEmbeddings(config)
        self.encoder = _CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)


class _CLIPTextModel(nn.Module):
    """Holds ``text_model`` only so that parameter names gain the ``transformer.text_model.`` prefix."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.text_model = _CLIPTextTransformer(config)


class FrozenCLIPEmbedder(nn.Module):
    """SD 1.x text encoder (OpenAI CLIP text transformer, Hugging Face layout)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if config.kind != "clip":
            raise ValueError(f"FrozenCLIPEmbedder needs a 'clip' config, got {config.kind!r}")
        self.config = config
        self.transformer = _CLIPTextModel(config)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, tokens: Tensor, clip_skip: int, token_embeds: Tensor | None = None) -> Tensor:
        """Hidden states [batch, tokens, width] of ``tokens`` [batch, tokens] (ids, BOS and EOS included).

        The output of layer ``layers - clip_skip + 1``, then the final LayerNorm.
        """
        text = self.transformer.text_model
        _check_clip_skip(clip_skip, len(text.encoder.layers))
        x = _embed(
            text.embeddings.token_embedding, text.embeddings.position_embedding.weight, tokens, token_embeds
        )
        for layer in text.encoder.layers[: len(text.encoder.layers) - clip_skip + 1]:
            x = layer(x)  # [batch, tokens, width]
        return text.final_layer_norm(x) if self.config.final_layer_norm else x


# ---------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP layout


class _PackedAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter names (packed q/k/v), batch first; causal for text."""

    def __init__(self, width: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        if not self.in_proj_weight.is_meta:
            nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:  # [batch, tokens, width]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_self_attention(q, k, v, self.heads, self.causal))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = _activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    """A pre-LayerNorm transformer layer in open_clip's names (text and image towers alike)."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _PackedAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _OpenCLIPMLP(width, mlp_width, activation)

    def forward(self, x: Tensor) -> Tensor:  # [batch, tokens, width]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            _ResidualAttentionBlock(
                config.width, config.heads, config.width * config.mlp_ratio, config.activation
            )
            for _ in range(config.layers)
        )


class _OpenCLIPTextModel(nn.Module):
    """The text half of ``open_clip.CLIP`` (SD 2.x deletes the visual tower)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        width = config.width
        self.token_embedding = _embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, width))
        self.transformer = _OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(width)
        # Unused by SD; kept so that a checkpoint round-trips and keeps its keys.
        if config.projection_dim > 0:
            self.text_projection = nn.Parameter(torch.empty(width, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if not self.token_embedding.weight.is_meta:  # see _embedding
            if config.projection_dim > 0:
                nn.init.normal_(self.text_projection, std=width**-0.5)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD 2.x text encoder (OpenCLIP text transformer, OpenCLIP layout)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if config.kind != "open_clip":
            raise ValueError(f"FrozenOpenCLIPEmbedder needs an 'open_clip' config, got {config.kind!r}")
        self.config = config
        self.model = _OpenCLIPTextModel(config)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def forward(self, tokens: Tensor, clip_skip: int, token_embeds: Tensor | None = None) -> Tensor:
        """Hidden states [batch, tokens, width] of ``tokens`` [batch, tokens] (ids, BOS and EOS included).

        The output of layer ``layers - clip_skip + 1``, then the final LayerNorm (SD 2.x: clip_skip 2;
        SDXL: no LayerNorm, ``final_layer_norm=False``).
        """
        return self.encode(tokens, clip_skip, token_embeds, pooled=False)[0]

    def encode(
        self, tokens: Tensor, clip_skip: int, token_embeds: Tensor | None = None, pooled: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """(hidden states as :meth:`forward` gives them, pooled text [batch, projection_dim] or None).

        The pooled text is OpenCLIP's ``encode_text``: the last layer's output, final LayerNorm, the
        state at the end-of-text token (the largest id: ``argmax``), times ``text_projection``; SDXL adds
        it to the UNet's vector."""
        model = self.model
        blocks = model.transformer.resblocks
        _check_clip_skip(clip_skip, len(blocks))
        x = _embed(model.token_embedding, model.positional_embedding, tokens, token_embeds)
        taken = len(blocks) - clip_skip + 1
        hidden = None
        for i, block in enumerate(blocks[: len(blocks) if pooled else taken]):
            x = block(x)  # [batch, tokens, width]
            if i + 1 == taken:
                hidden = model.ln_final(x) if self.config.final_layer_norm else x
        assert hidden is not None
        if not pooled:
            return hidden, None
        if self.config.projection_dim <= 0:
            raise ValueError("this text encoder has no text_projection: it gives no pooled text")
        ends = tokens.argmax(dim=-1)  # [batch]
        last = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), ends]  # [batch, width]
        return hidden, last @ model.text_projection


TextEncoder = FrozenCLIPEmbedder | FrozenOpenCLIPEmbedder


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The text encoder of ``config.kind``, randomly initialised (load weights with ``load_state_dict``)."""
    if config.kind == "clip":
        return FrozenCLIPEmbedder(config)
    if config.kind == "open_clip":
        return FrozenOpenCLIPEmbedder(config)
    raise ValueError(f"unknown text encoder kind {config.kind!r}")
