"""Contrastive language-image pre-training of a text encoder (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", Fig. 3): symmetric InfoNCE over a batch of pairs with
a learned temperature, against a small image encoder that exists only for this objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.models.tokenizer import ClipTokenizer


class ImageEncoder(nn.Module):
    """A small strided CNN for 64x64 images -> an embedding; the flatten keeps spatial layout, which
    the captions talk about (left, top, ...)."""

    def __init__(self, width: int = 128, channels: tuple[int, ...] = (32, 64, 128, 128), size: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = size // 2 ** len(channels)
        self.proj = nn.Linear(c_in * side * side, width)

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, 64, 64] in [-1, 1] -> [B, width]."""
        return self.proj(self.features(images).flatten(1))


def pooled_text(hidden: Tensor, tokens: Tensor) -> Tensor:
    """CLIP's text embedding: the hidden state at the (first) EOS token. [B, width]"""
    return eos_state(hidden, text_lengths(tokens))


def text_lengths(tokens: Tensor) -> Tensor:
    """Each row's length up to and including its (first) EOS token. [B]"""
    return (tokens == ClipTokenizer.EOS).int().argmax(dim=1) + 1


def eos_state(hidden: Tensor, lengths: Tensor) -> Tensor:
    """Each row's last state within its length (its EOS token's). hidden [B, L, width] -> [B, width]"""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]


class TextPool(nn.Module):
    """Attention pooling of a frozen text encoder's last hidden states, for a text embedding that keeps
    which attribute goes with which object. The EOS state alone of a causal encoder trained for the UNet
    tells "a red circle and a blue square" from "a red square and a blue circle" barely (cosine 0.997 on
    the toy world's encoder); each token's state still holds what came before it, and ``queries``
    learned queries attending over the tokens up to EOS gather those states apart. Output: the EOS state
    plus a projection of the queries' results (zero at initialisation, so training starts from CLIP's
    EOS pooling)."""

    def __init__(self, width: int, queries: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(queries * width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """hidden [B, L, width] (rows past their length are ignored), lengths [B] -> [B, width]."""
        b, length, _ = hidden.shape
        pad = torch.arange(length, device=hidden.device)[None, :] >= lengths[:, None].to(hidden.device)
        query = self.query.to(hidden.dtype).expand(b, -1, -1)
        gathered, _ = self.attn(query, hidden, hidden, key_padding_mask=pad, need_weights=False)
        return eos_state(hidden, lengths) + self.out(gathered.flatten(1))


class ContrastiveHead(nn.Module):
    """Projections into the joint space and the learned temperature (init 1/0.07, capped at 100); with
    ``text_pool`` the text side pools all token states (``TextPool``) instead of taking the EOS state."""

    def __init__(self, text_width: int, image_width: int, dim: int = 128, text_pool: bool = False) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_width, dim, bias=False)
        self.image_proj = nn.Linear(image_width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_pool = TextPool(text_width) if text_pool else None

    def pool_text(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """The text side's vector before ``text_proj``: the EOS state, or the ``TextPool`` over the tokens."""
        return eos_state(hidden, lengths) if self.text_pool is None else self.text_pool(hidden, lengths)

    def forward(self, text: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """Symmetric InfoNCE loss and the in-batch retrieval accuracy (text -> image)."""
        t = F.normalize(self.text_proj(text).float(), dim=-1)
        i = F.normalize(self.image_proj(image).float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * t @ i.T  # [B, B]
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, accuracy
