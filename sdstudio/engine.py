"""A loaded model with what generating needs: the Python API's entry point."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from sdstudio.diffusion.samplers import SamplerStep
from sdstudio.models.loading import LoadedModel, load_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.txt2img import txt2img
from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embeddings
from sdstudio.types import GenerationRequest, GenerationResult


class Pipeline:
    """``Pipeline.from_file(path)(GenerationRequest(prompt=...))`` -> ``GenerationResult``."""

    def __init__(
        self,
        model: LoadedModel,
        embeddings: EmbeddingDatabase | None = None,
        tokenizer: ClipTokenizer | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer or ClipTokenizer()
        self.embeddings = embeddings

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        use_ema: bool = False,
        prediction: str | None = None,
        embeddings_dir: str | os.PathLike | None = None,
        skip_bad_embeddings: bool = False,
    ) -> Pipeline:
        """Load a checkpoint and, from ``embeddings_dir``, the textual inversion embeddings prompts may use.

        A bad embedding file raises ``SdStudioError`` unless ``skip_bad_embeddings``; then it is left out
        and every result warns about it.
        """
        model = load_model(path, dtype=dtype, use_ema=use_ema, prediction=prediction)
        tokenizer = ClipTokenizer()
        embeddings = None
        if embeddings_dir is not None:
            embeddings = load_embeddings(
                embeddings_dir, model.config.text.width, tokenizer, skip_bad=skip_bad_embeddings
            )
        return cls(model, embeddings, tokenizer)

    def __call__(
        self, request: GenerationRequest, callback: Callable[[SamplerStep], None] | None = None
    ) -> GenerationResult:
        return txt2img(self.model, self.tokenizer, request, callback, self.embeddings)
