"""Text -> conditioning tensors: 75-token chunks with BOS/EOS, each encoded on its own, concatenated.

AUTOMATIC1111 and ComfyUI encode prompts longer than 75 tokens as several 77-token chunks whose hidden
states are concatenated along the token axis; the UNet's cross-attention takes any token count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdstudio.models.configs import TextEncoderConfig
from sdstudio.models.tokenizer import ClipTokenizer


def chunk_tokens(ids: list[int], config: TextEncoderConfig) -> list[list[int]]:
    """Split token ids into chunks of 75 and frame each as [BOS, ..., EOS, pad...] of 77 ids."""
    per = ClipTokenizer.CHUNK
    pad = ClipTokenizer.EOS if config.pad_with_eos else 0
    pieces = [ids[i : i + per] for i in range(0, len(ids), per)] or [[]]
    return [[ClipTokenizer.BOS, *p, ClipTokenizer.EOS] + [pad] * (per - len(p)) for p in pieces]


def encode_chunks(text_encoder: nn.Module, chunks: list[list[int]], clip_skip: int) -> Tensor:
    """[1, 77 * n_chunks, width] hidden states, in float32."""
    device = next(text_encoder.parameters()).device
    tokens = torch.tensor(chunks, dtype=torch.long, device=device)  # [n_chunks, 77]
    hidden = text_encoder(tokens, clip_skip).float()  # [n_chunks, 77, width]
    return hidden.reshape(1, -1, hidden.shape[-1])


def encode_pair(
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    prompt: str,
    negative: str,
    clip_skip: int,
) -> tuple[Tensor, Tensor]:
    """Conditioning for a prompt and its negative, padded with empty chunks to the same token count."""
    cond_chunks = chunk_tokens(tokenizer.encode(prompt), config)
    uncond_chunks = chunk_tokens(tokenizer.encode(negative), config)
    empty = chunk_tokens([], config)[0]
    n = max(len(cond_chunks), len(uncond_chunks))
    cond_chunks += [empty] * (n - len(cond_chunks))
    uncond_chunks += [empty] * (n - len(uncond_chunks))
    both = encode_chunks(text_encoder, cond_chunks + uncond_chunks, clip_skip)  # [1, 2 * 77n, width]
    return both[:, : 77 * n], both[:, 77 * n :]
