"""txt2img: prompt -> conditioning -> sampler over the guided denoiser -> latents -> VAE -> images.

The shared pipeline lives in :mod:`sdstudio.pipelines.generate` (txt2img is its request without an init
image); this module keeps the txt2img names.
"""

from __future__ import annotations

from collections.abc import Callable

from sdstudio.diffusion.samplers import SamplerStep
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import decode_latents, generate, infotext, parse_request
from sdstudio.pipelines.sampling import MAX_SEED, Plan, plan, sample_latents
from sdstudio.prompt.embeddings import EmbeddingDatabase
from sdstudio.types import GenerationRequest, GenerationResult

__all__ = ["MAX_SEED", "Plan", "decode_latents", "infotext", "parse_request", "plan", "sample_latents", "txt2img"]


def txt2img(
    model: LoadedModel,
    tokenizer: ClipTokenizer,
    request: GenerationRequest,
    callback: Callable[[SamplerStep], None] | None = None,
    embeddings: EmbeddingDatabase | None = None,
) -> GenerationResult:
    if request.init is not None:
        raise SdStudioError("txt2img got an init image; call sdstudio.pipelines.generate.generate")
    return generate(model, tokenizer, request, callback, embeddings)
