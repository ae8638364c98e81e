"""Image folders -> feature arrays for the metrics: the FID Inception-v3, the toy world's image encoder, or
a CLIP image tower.

Each extractor resizes images that are not at its input size as its reference does: Inception by
TensorFlow 1.x bilinear to 299x299 inside the network (torch-fidelity, TTUR); CLIP by its own
preprocessing (``encode_images``); the toy image encoder (trained on 64x64 renders only) by PIL's
Lanczos to 64x64, as ``sdstudio.io.images.resize_image`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
FEATURE_KINDS = ("toyworld", "inception", "clip")
TOY_SIZE = 64


@dataclass(frozen=True)
class ImageFolder:
    """The readable images of a folder, sorted by file name, as uint8 [H, W, 3] RGB; ``skipped``: image
    files that could not be read."""

    folder: Path
    paths: tuple[Path, ...]
    images: tuple[np.ndarray, ...]
    skipped: tuple[Path, ...]

    @property
    def sizes(self) -> set[tuple[int, int]]:
        """Distinct (width, height) of the images."""
        return {(im.shape[1], im.shape[0]) for im in self.images}


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The png / jpg / jpeg / webp files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdStudioError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_image(path: Path) -> np.ndarray | None:
    """The image at ``path`` as uint8 RGB (``convert("RGB")``); None, with a warning, if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("%s: cannot read the image, skipped (%s: %s)", path, type(e).__name__, e)
        return None


def read_folder(folder: str | os.PathLike) -> ImageFolder:
    """Read every image of ``folder`` as RGB (``convert("RGB")``, as torch-fidelity reads them); files that
    cannot be read are skipped with a warning each; a folder with no readable image is an error."""
    folder = Path(folder)
    paths, images, skipped = [], [], []
    for path in image_files(folder):
        image = read_image(path)
        if image is None:
            skipped.append(path)
        else:
            images.append(image)
            paths.append(path)
    if not images:
        what = f"none of its {len(skipped)} image files could be read" if skipped else "no image files"
        raise SdStudioError(f"{folder}: {what} ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(folder, tuple(paths), tuple(images), tuple(skipped))


@dataclass(frozen=True)
class FeatureExtractor:
    """``encode``: uint8 [H, W, 3] images (any sizes) -> float64 [n, dim]. ``input_size``: the size the
    network sees (None: it decides); ``resize``: how other sizes get there, said once per run."""

    kind: str
    file: str
    input_size: tuple[int, int] | None
    resize: str
    encode: Callable[[Sequence[np.ndarray]], np.ndarray]


def _size_groups(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    return groups


def inception_extractor(path: str | os.PathLike, batch: int = 32) -> FeatureExtractor:
    """The FID Inception-v3's 2048-d pool features (``pt_inception-2015-12-05-6726825d.pth``)."""
    from sdstudio.eval.inception import FEATURE_DIM, INPUT_SIZE, load_inception

    model = load_inception(path)

    @torch.no_grad()
    def encode(images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), FEATURE_DIM))
        for idx in _size_groups(images).values():  # the network resizes; a batch needs one size
            for i in range(0, len(idx), batch):
                part = idx[i : i + batch]
                x = torch.from_numpy(np.stack([images[j] for j in part])).permute(0, 3, 1, 2)
                out[part] = model(x).double().numpy()
        return out

    resize = "TensorFlow 1.x bilinear, as torch-fidelity and the original TTUR FID"
    return FeatureExtractor("inception", str(path), (INPUT_SIZE, INPUT_SIZE), resize, encode)


def toyworld_extractor(path: str | os.PathLike | None = None, batch: int = 256) -> FeatureExtractor:
    """The toy world's image encoder (default: the shipped ``toyworld_image_encoder.safetensors``)."""
    from sdstudio.toyworld.evaluate import SHIPPED_IMAGE_ENCODER, _load_encoder, image_features

    path = Path(path) if path is not None else SHIPPED_IMAGE_ENCODER
    if not path.is_file():
        raise SdStudioError(f"{path}: no such toy image encoder file")
    try:
        encoder = _load_encoder(path)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        raise SdStudioError(f"{path}: not a toy image encoder ({type(e).__name__}: {e})") from None

    def encode(images: Sequence[np.ndarray]) -> np.ndarray:
        sized = [
            im if im.shape[:2] == (TOY_SIZE, TOY_SIZE)
            else np.asarray(Image.fromarray(im).resize((TOY_SIZE, TOY_SIZE), Image.LANCZOS))
            for im in images
        ]  # fmt: skip
        return image_features(encoder, sized, batch=batch)

    resize = "PIL Lanczos (the encoder saw 64x64 renders only)"
    return FeatureExtractor("toyworld", str(path), (TOY_SIZE, TOY_SIZE), resize, encode)


def load_clip_model(path: str | os.PathLike) -> object:
    """A CLIP model (``sdstudio.models.clip_vision.load_clip``): ``encode_images``, ``encode_texts``."""
    try:
        from sdstudio.models.clip_vision import load_clip
    except ImportError as e:
        raise SdStudioError(
            f"CLIP features need sdstudio.models.clip_vision, which cannot be imported ({e})"
        ) from None
    if not Path(path).is_file():
        raise SdStudioError(f"{path}: no such CLIP model file")
    return load_clip(path)


def clip_extractor(path: str | os.PathLike, model: object | None = None, batch: int = 64) -> FeatureExtractor:
    """CLIP image embeddings (normalised); ``model``: one already loaded from ``path``."""
    clip = model if model is not None else load_clip_model(path)

    @torch.no_grad()
    def encode(images: Sequence[np.ndarray]) -> np.ndarray:
        parts = [clip.encode_images(list(images[i : i + batch])) for i in range(0, len(images), batch)]  # type: ignore[attr-defined]
        return torch.cat(parts).double().cpu().numpy()

    return FeatureExtractor("clip", str(path), None, "CLIP's own preprocessing", encode)


def load_extractor(kind: str, file: str | os.PathLike | None = None) -> FeatureExtractor:
    """``toyworld [FILE]``, ``inception FILE`` or ``clip FILE``."""
    if kind == "toyworld":
        return toyworld_extractor(file)
    if kind not in FEATURE_KINDS:
        raise SdStudioError(f"unknown features {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")
    if file is None:
        what = "pt_inception-2015-12-05-6726825d.pth" if kind == "inception" else "a CLIP model file"
        raise SdStudioError(f"--features {kind} needs its weights file: --features {kind} FILE ({what})")
    return inception_extractor(file) if kind == "inception" else clip_extractor(file)


def resize_note(extractor: FeatureExtractor, folders: Sequence[ImageFolder]) -> str | None:
    """One line saying how the images will be resized, or None when they are all at the input size (or
    the extractor takes any size as is)."""
    sizes = set().union(*(f.sizes for f in folders))
    if extractor.input_size is None:
        if len(sizes) == 1:
            return None
    elif sizes == {extractor.input_size}:
        return None
    listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4]) + (", ..." if len(sizes) > 4 else "")
    target = (
        f"{extractor.input_size[0]}x{extractor.input_size[1]}" if extractor.input_size else "its input size"
    )
    return f"images of {len(sizes)} size(s) ({listed}) are resized to {target} by {extractor.resize}"


def extract(extractor: FeatureExtractor, folder: ImageFolder) -> np.ndarray:
    """Features [n, dim] float64 of a folder's images, in its sorted order."""
    feats = np.asarray(extractor.encode(folder.images), dtype=np.float64)
    if feats.ndim != 2 or len(feats) != len(folder.images):
        raise AssertionError(
            f"{extractor.kind} features: shape {feats.shape} for {len(folder.images)} images"
        )
    return feats
