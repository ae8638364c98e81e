"""BLIP captions (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training"): the base caption of a
CLIP interrogator, as AUTOMATIC1111's "Interrogate CLIP" writes it before ranking phrases with CLIP.

``load_blip`` reads a folder of BLIP captioning weights the user brings, in the layout of Hugging Face's
``Salesforce/blip-image-captioning-base`` / ``-large`` (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, ``preprocessor_config.json``, the tokenizer files), with transformers (an optional
dependency, imported when a folder is loaded). The ``BlipCaptioner`` it returns maps uint8 HxWx3 RGB images
to one caption each, by beam search or greedy decoding: the same images give the same captions. With a
``prompt`` ("a picture of") the caption continues it and starts with it, as BLIP's own output does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

CAPTION_ARCHITECTURE = "BlipForConditionalGeneration"


def _why(e: Exception) -> str:
    """The exception's type and first line: transformers' messages can run to several."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class BlipCaptioner:
    """A BLIP captioning model and its processor: ``captioner(images)`` -> one caption per image."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str | torch.device = "cpu",
        max_new_tokens: int = 30,
        num_beams: int = 3,
        prompt: str | None = None,
        batch_size: int = 8,
    ) -> None:
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise SdStudioError("BLIP's max_new_tokens, num_beams and batch_size must be at least 1")
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.prompt = prompt or None
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise SdStudioError(f"BLIP captions uint8 HxWx3 RGB images, not {image.dtype} {image.shape}")
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(a) for a in images[start : start + self.batch_size]]
            text = None if self.prompt is None else [self.prompt] * len(batch)
            inputs = self.processor(images=batch, text=text, return_tensors="pt").to(self.device)
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
            captions += [self.processor.decode(row, skip_special_tokens=True).strip() for row in ids]
        return captions


def load_blip(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 30,
    num_beams: int = 3,
    prompt: str | None = None,
    batch_size: int = 8,
) -> BlipCaptioner:
    """The BLIP captioner of the folder ``path`` (a Hugging Face BLIP captioning folder), on ``device``."""
    try:
        from transformers import BlipForConditionalGeneration, BlipProcessor
    except ImportError as e:
        raise SdStudioError("BLIP captions need transformers: pip install 'sdstudio[caption]'") from e
    folder = Path(path)
    if not folder.is_dir():
        raise SdStudioError(
            f"BLIP weights must be a folder (as Salesforce/blip-image-captioning-base), "
            f"not {'a file' if folder.exists() else 'a missing path'}: {folder}"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SdStudioError(f"{folder} has no config.json: not a Hugging Face BLIP folder") from e
    except (OSError, ValueError) as e:
        raise SdStudioError(f"cannot read {folder / 'config.json'}: {e}") from e
    kind = config.get("model_type") if isinstance(config, dict) else None
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    if kind != "blip":
        raise SdStudioError(
            f"{folder} holds a {kind or 'model of unknown type'} model"
            f"{' (' + ', '.join(architectures) + ')' if architectures else ''}, not BLIP: expected "
            f"model_type 'blip' ({CAPTION_ARCHITECTURE}, as Salesforce/blip-image-captioning-base)"
        )
    if architectures and CAPTION_ARCHITECTURE not in architectures:
        raise SdStudioError(
            f"{folder} holds a BLIP {', '.join(architectures)}, not a captioning model: "
            f"expected {CAPTION_ARCHITECTURE} (as Salesforce/blip-image-captioning-base)"
        )
    try:
        model, info = BlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    except Exception as e:  # any failure of transformers' loader is the folder's fault here
        raise SdStudioError(f"cannot load BLIP weights from {folder}: {_why(e)}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SdStudioError(
            f"BLIP weights in {folder} lack {len(missing)} tensors (as {missing[0]}): "
            f"not a complete {CAPTION_ARCHITECTURE} checkpoint"
        )
    try:
        processor = BlipProcessor.from_pretrained(folder)
    except Exception as e:  # a broken or missing processor or tokenizer file
        raise SdStudioError(
            f"cannot load BLIP's image processor and tokenizer from {folder}: {_why(e)}"
        ) from e
    log.info(
        "BLIP captioner from %s on %s (%d beams, %d new tokens)", folder, device, num_beams, max_new_tokens
    )
    return BlipCaptioner(
        model,
        processor,
        device=device,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        prompt=prompt,
        batch_size=batch_size,
    )
