"""SDXL's conditioner (sgm's ``GeneralConditioner``): its text encoders under the single-file keys
``conditioner.embedders.N.*``, and the vector ``y`` of pooled text and image sizes ("micro-conditioning").

Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2.2: the
UNet's context is the penultimate layers of CLIP ViT-L and OpenCLIP ViT-bigG side by side ([tokens, 768 +
1280]); its vector is bigG's pooled, projected text followed by a 256-wide sinusoidal embedding of each of
the original size (h, w), the crop's top-left corner (top, left) and the target size (h, w), as sgm's
``ConcatTimestepEmbedderND`` makes them. The refiner has bigG alone and embeds an aesthetic score in place
of the target size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdstudio.models.clip import TextEncoder, build_text_encoder
from sdstudio.models.configs import ModelConfig, TextEncoderConfig
from sdstudio.models.unet import timestep_embedding

SIZE_EMBEDDING = 256  # sgm's ConcatTimestepEmbedderND outdim for every micro-conditioning value
# AUTOMATIC1111's defaults (sdxl_refiner_high_aesthetic_score / _low_), as diffusers' refiner pipeline.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one image: sizes as (height, width) in pixels, the crop's top-left
    corner as (top, left); ``aesthetic`` only for the refiner. A1111 and diffusers give the image's own
    size as both sizes and (0, 0) as the crop."""

    original: tuple[int, int]
    target: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    aesthetic: float = AESTHETIC_SCORE

    @classmethod
    def of_image(cls, width: int, height: int, aesthetic: float = AESTHETIC_SCORE) -> SizeConditioning:
        return cls((height, width), (height, width), (0, 0), aesthetic)

    def values(self, refiner: bool) -> tuple[float, ...]:
        tail = (self.aesthetic,) if refiner else tuple(map(float, self.target))
        return (*map(float, self.original), *map(float, self.crop), *tail)


def size_vector(pooled: Tensor, size: SizeConditioning, refiner: bool) -> Tensor:
    """``y`` for each row of ``pooled`` [n, projection]: [n, projection + 256 * (5 or 6)], float32."""
    values = torch.tensor(size.values(refiner), dtype=torch.float32, device=pooled.device)
    embedded = timestep_embedding(values, SIZE_EMBEDDING).flatten()  # [values * 256], [cos | sin] each
    return torch.cat([pooled.float(), embedded.expand(pooled.shape[0], -1)], dim=1)


class GeneralConditioner(nn.Module):
    """The text encoders of an SDXL checkpoint as ``embedders.0`` (CLIP-L, HF layout) and ``embedders.1``
    (OpenCLIP bigG), or the refiner's bigG alone as ``embedders.0``; the size embedders have no weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.is_sdxl:
            raise ValueError(f"GeneralConditioner is SDXL's; {config.name!r} has one text encoder")
        configs = [config.text] if config.text2 is None else [config.text, config.text2]
        if configs[-1].kind != "open_clip" or configs[-1].projection_dim <= 0:
            raise ValueError(
                "SDXL's last text encoder must be OpenCLIP with a text_projection (its pooled text)"
            )
        self.configs: tuple[TextEncoderConfig, ...] = tuple(configs)
        self.embedders = nn.ModuleList(build_text_encoder(c) for c in configs)
        self.refiner = config.conditioner == "sdxl_refiner"

    @property
    def encoders(self) -> list[TextEncoder]:
        return list(self.embedders)  # type: ignore[arg-type]

    @property
    def token_embedding(self) -> nn.Embedding:
        """The first encoder's table (callers that splice vectors per encoder use ``encoders``)."""
        return self.encoders[0].token_embedding

    def encode(
        self, tokens: list[Tensor], clip_skip: int, token_embeds: list[Tensor | None] | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Each encoder's hidden states [n, 77, width_i] for its own token ids [n, 77] (the encoders pad
        differently), and the last encoder's pooled text [n, projection]. ``clip_skip`` counts as for one
        encoder; SDXL takes the penultimate layer (2) whatever A1111's "Clip skip" says."""
        embeds = token_embeds or [None] * len(tokens)
        hidden = []
        pooled = None
        for i, (encoder, ids, embed) in enumerate(zip(self.encoders, tokens, embeds)):
            if i == len(tokens) - 1:
                states, pooled = encoder.encode(ids, clip_skip, embed, pooled=True)  # type: ignore[union-attr]
            else:
                states = encoder(ids, clip_skip, token_embeds=embed)
            hidden.append(states)
        assert pooled is not None
        return hidden, pooled
