"""Preview images during a run (``--preview-prompt``): at each save the run writes what it has learnt so far
(``saves/NAME-STEP.*``, as kohya's ``--save_every_n_steps`` and AUTOMATIC1111's "Save a copy of the
embedding every N steps" do) and generates an image from the prompt with it, through the same pipeline a user
generates with (``engine.Pipeline``: the file is applied as a user applies it, so the preview shows what the
file does, not what the training forward does), into ``previews/NAME-STEP.png`` with its infotext.

How the saved file enters the preview, per method: a LoRA by ``<lora:NAME-STEP:1>`` appended to the prompt and
the ``saves/`` folder as a LoRA folder; a hypernetwork by ``<hypernet:NAME-STEP:1>`` likewise; an embedding
loaded under its own name (the prompt uses the name, as after the run); DreamBooth and full fine-tuning
generate with the model's weights as they are at that step (no file: the training state holds them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sdstudio.adapters.library import NetworkLibrary
from sdstudio.errors import SdStudioError
from sdstudio.io.images import save_png
from sdstudio.models.loading import LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.embeddings import EmbeddingDatabase

log = logging.getLogger(__name__)

__all__ = ["PREVIEW_FOLDER", "SAVES_FOLDER", "PreviewSettings", "render_preview", "saved_name"]

PREVIEW_FOLDER = "previews"
SAVES_FOLDER = "saves"
Applied = Literal["lora", "hypernetwork", "embedding", "model"]


@dataclass(frozen=True)
class PreviewSettings:
    """The preview request: AUTOMATIC1111's Train tab "Preview prompt" and its sampler, steps, CFG and seed,
    at the model's default size."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise SdStudioError("the preview prompt is empty; give one (--preview-prompt 'a photo of ...')")
        if self.steps < 1:
            raise SdStudioError(f"preview steps {self.steps}: must be at least 1")


def saved_name(name: str, step: int) -> str:
    """The stem of a run's intermediate file at ``step`` (``NAME-000500``): sorts by step, and names the LoRA
    or hypernetwork a prompt tag asks for."""
    return f"{name}-{step:06d}"


@contextlib.contextmanager
def _inference(model: LoadedModel) -> Iterator[None]:
    """No gradients and eval mode for the preview; the training modes as they were afterwards."""
    modes = {m: m.training for m in model.model.modules()}
    try:
        model.model.eval()
        with torch.no_grad(), torch.autocast(model.device.type, enabled=False):
            yield
    finally:
        for module, training in modes.items():
            module.train(training)


def render_preview(
    model: LoadedModel,
    settings: PreviewSettings,
    out: Path,
    step: int,
    name: str,
    applied: Applied,
    saved: Path | None = None,
    embeddings: EmbeddingDatabase | None = None,
) -> Path:
    """Generate the preview of step ``step`` with ``saved`` (the intermediate file, applied as ``applied``
    says) into ``out/previews/NAME-STEP.png``; returns its path. ``embeddings``: words the prompt may name
    (a LoRA run's; an embedding run previews its own file). The model's weights are the same afterwards (a
    LoRA is merged for the request and taken out again, by the pipeline)."""
    from sdstudio.engine import Pipeline
    from sdstudio.prompt.embeddings import load_embedding
    from sdstudio.types import GenerationRequest

    tokenizer = ClipTokenizer()
    prompt = settings.prompt
    loras, hypernetworks = None, None
    if applied in ("lora", "hypernetwork", "embedding") and saved is None:
        raise ValueError(f"a {applied} preview needs the saved file")
    if applied == "lora":
        loras = NetworkLibrary([saved.parent], kind="LoRA", flag="--lora-dir")  # type: ignore[union-attr]
        prompt += f" <lora:{saved.stem}:1>"  # type: ignore[union-attr]
    elif applied == "hypernetwork":
        hypernetworks = NetworkLibrary(
            [saved.parent],
            kind="hypernetwork",
            flag="--hypernetwork-dir",
            suffixes=(".pt",),  # type: ignore[union-attr]
        )
        prompt += f" <hypernet:{saved.stem}:1>"  # type: ignore[union-attr]
    elif applied == "embedding":
        embedding = load_embedding(saved, model.config.text.width, name=name)  # type: ignore[arg-type]
        embeddings = EmbeddingDatabase.build([embedding], tokenizer)
    pipeline = Pipeline(
        model, embeddings, tokenizer, loras=loras, hypernetworks=hypernetworks, strict_networks=True
    )
    request = GenerationRequest(
        prompt=prompt, negative_prompt=settings.negative_prompt, sampler=settings.sampler, steps=settings.steps,
        cfg_scale=settings.cfg_scale, seed=settings.seed,
    )  # fmt: skip
    with _inference(model):
        try:
            result = pipeline(request)
        finally:
            pipeline.networks.restore()  # the LoRA merged for the preview leaves the weights (bit for bit)
    image = result.images[0]
    path = out / PREVIEW_FOLDER / f"{saved_name(name, step)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image.image, path, image.infotext, overwrite=True)
    log.info("preview of step %d: %s", step, path)
    return path
