"""A loaded model with what generating needs: the Python API's entry point."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from sdstudio.diffusion.samplers import SamplerStep
from sdstudio.models.loading import LoadedModel, load_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.txt2img import txt2img
from sdstudio.types import GenerationRequest, GenerationResult


class Pipeline:
    """``Pipeline.from_file(path)(GenerationRequest(prompt=...))`` -> ``GenerationResult``."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.tokenizer = ClipTokenizer()

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        use_ema: bool = False,
        prediction: str | None = None,
    ) -> Pipeline:
        return cls(load_model(path, dtype=dtype, use_ema=use_ema, prediction=prediction))

    def __call__(
        self, request: GenerationRequest, callback: Callable[[SamplerStep], None] | None = None
    ) -> GenerationResult:
        return txt2img(self.model, self.tokenizer, request, callback)
