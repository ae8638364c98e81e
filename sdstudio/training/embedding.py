"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn a few token vectors that stand
for a concept, everything else frozen, as AUTOMATIC1111's Train tab does.

The vectors enter the text encoder exactly as a loaded embedding does at inference (``EmbeddingDatabase``
finds the name's tokens in a caption, ``encode_chunks`` puts the vectors in their place), so what is
trained is what generation uses. The loss is the denoiser's own (``Denoiser.loss``: eps or v as the model
predicts, Min-SNR optional).

Initialisation (A1111 ``create_embedding`` / ``encode_embedding_init_text``): the token embeddings of the
first ``n`` tokens of an initialisation text; vector ``i`` takes token ``i * tokens // n`` (so one word spread
over more vectors repeats); an empty text gives zeros.

Files (A1111 ``Embedding.save`` and the formats ``sdstudio.prompt.embeddings`` reads): ``.pt`` holds
``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, width]}, "name", "step", "sd_checkpoint",
"sd_checkpoint_name"}``; ``.safetensors`` holds one tensor ``emb_params`` [n, width] (what diffusers'
``load_textual_inversion`` and A1111 read from such files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write
from sdstudio.models.configs import TextEncoderConfig
from sdstudio.models.tokenizer import CHUNK, ClipTokenizer
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.prompt.embeddings import Embedding, EmbeddingDatabase
from sdstudio.training.distributed import Rows

__all__ = [
    "EmbeddingTrainConfig",
    "TrainableEmbedding",
    "embedding_loss",
    "initial_vectors",
    "save_embedding",
]

_A1111_TOKEN = 265  # the "*" token id A1111 writes in string_to_token


@dataclass(frozen=True)
class EmbeddingTrainConfig:
    """What A1111's "Create embedding" asks: the name prompts use, how many vectors, the text they start from."""

    name: str
    vectors: int = 1
    init_text: str = "*"

    def __post_init__(self) -> None:
        if not self.name.strip() or any(c in self.name for c in "<>:()[]"):
            raise SdStudioError(
                f"embedding name {self.name!r}: use a word without <>:()[] (prompts write it as is)"
            )
        if not 1 <= self.vectors <= CHUNK:
            raise SdStudioError(f"embedding vectors must be between 1 and {CHUNK} (got {self.vectors})")


def initial_vectors(
    token_embedding: nn.Embedding, tokenizer: ClipTokenizer, init_text: str, n: int
) -> Tensor:
    """A1111's starting vectors: the first ``n`` token embeddings of ``init_text``, spread over ``n`` vectors
    (zeros for an empty text). [n, width], float32"""
    width = token_embedding.embedding_dim
    vectors = torch.zeros(n, width)
    ids = tokenizer.encode(init_text)[:n] if init_text else []
    if ids:
        with torch.no_grad():
            embedded = token_embedding(torch.tensor(ids, device=token_embedding.weight.device)).float().cpu()
        for i in range(n):
            vectors[i] = embedded[i * len(ids) // n]
    return vectors


class TrainableEmbedding(nn.Module):
    """The vectors being learnt, and the embedding database that lets captions use them by name."""

    def __init__(self, config: EmbeddingTrainConfig, vectors: Tensor, tokenizer: ClipTokenizer) -> None:
        super().__init__()
        self.config = config
        self.vectors = nn.Parameter(vectors.detach().float().clone())  # [n, width]
        # the database holds the parameter itself: every optimizer step is what the next caption sees
        self.database = EmbeddingDatabase.build([Embedding(config.name, self.vectors)], tokenizer)

    @classmethod
    def create(
        cls, config: EmbeddingTrainConfig, token_embedding: nn.Embedding, tokenizer: ClipTokenizer
    ) -> TrainableEmbedding:
        return cls(
            config, initial_vectors(token_embedding, tokenizer, config.init_text, config.vectors), tokenizer
        )


def embedding_loss(
    embedding: TrainableEmbedding,
    denoiser: Denoiser,
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    text_config: TextEncoderConfig,
    clip_skip: int,
    latents: Tensor,
    captions: Sequence[str],
    generator: torch.Generator,
    *,
    snr_gamma: float = 0.0,
    rows: Rows | None = None,
) -> Tensor:
    """One textual-inversion loss: captions (naming the embedding) through the frozen text encoder with the
    trained vectors in place of the name, the frozen UNet denoising ``latents`` at random training
    timesteps. ``latents``: scaled, as the UNet sees them. ``rows``: this rank's rows of the global batch
    (data-parallel training; ``Denoiser.training_loss``). Scalar."""
    if len(captions) != latents.shape[0]:
        raise ValueError(f"{len(captions)} captions for {latents.shape[0]} latents")
    context = encode_captions(text_encoder, tokenizer, text_config, captions, clip_skip, embedding.database)
    loss = denoiser.training_loss(latents, context, generator, snr_gamma=snr_gamma, rows=rows).mean()
    if not loss.requires_grad:  # no caption of this batch names it (caption dropout): a zero gradient
        loss = loss + 0.0 * embedding.vectors.sum()
    return loss


def save_embedding(
    embedding: TrainableEmbedding | Tensor,
    path: str | Path,
    *,
    name: str | None = None,
    step: int = 0,
    checkpoint_hash: str | None = None,
    checkpoint_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write A1111's ``.pt`` or a ``.safetensors`` (``emb_params``), by the path's suffix; atomically."""
    path = Path(path)
    vectors = embedding.vectors if isinstance(embedding, TrainableEmbedding) else embedding
    vectors = vectors.detach().float().cpu().contiguous()
    name = name or (embedding.config.name if isinstance(embedding, TrainableEmbedding) else path.stem)
    if path.exists() and not overwrite:
        raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"name": name, "step": str(step)}
        return atomic_write(path, lambda tmp: save_file({"emb_params": vectors}, tmp, metadata=metadata))
    if suffix not in (".pt", ".bin"):
        raise SdStudioError(f"{path}: an embedding file ends in .pt or .safetensors")
    data = {
        "string_to_token": {"*": _A1111_TOKEN},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }
    return atomic_write(path, lambda tmp: torch.save(data, tmp))
