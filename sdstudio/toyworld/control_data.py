"""Toy-world ControlNet data: scenes with their control images, as a folder a user trains on, and the held-out
scenes the benchmark places objects with.

A control image is 64x64 RGB, what the ControlNet reads (white on black, as sd-webui-controlnet's maps):

- ``mask``: the objects' silhouettes (their antialiased coverage, ``world.object_alpha``), white on black;
- ``edges``: the silhouettes' one-pixel outlines (the coverage thresholded at 1/2, less its 4-neighbour
  erosion), white on black: what a Canny detector finds on a render, whose only edges are the objects'.

The folder (``write_control_dataset``) is kohya sd-scripts' ControlNet subset: ``images/NAME.png`` with its
caption in ``images/NAME.txt`` (``image_dir``, ``caption_extension = ".txt"``) and the control image of the
same base name in ``conditioning/NAME.png`` (``conditioning_data_dir``). ``sdstudio train controlnet --data
DIR`` reads it as it is. diffusers' ``train_controlnet.py`` reads a Hugging Face dataset with the columns
``image``, ``conditioning_image`` and ``text`` instead (lllyasviel's fill50k); ``metadata.jsonl`` beside the
two folders holds exactly those rows (paths relative to it), so ``datasets.load_dataset("json", ...)`` and a
cast of the two image columns give it.

Training scenes are the world's own (``world.sample_scene``, split "train": objects in the 3x3 grid's cells,
small or large), without the colours of ``HELDOUT_COLOURS``, a lone object anywhere within ``JITTER`` px of
its cell's centre; captions are the world's with the size and position left out by default (``p_size``,
``p_position``: the control image says them; a caption that says them too lets the frozen UNet draw them
without the ControlNet learning to: with the world's 70 % of size words, a ControlNet of 300 steps placed
objects but left their size to the prompt). ``heldout_scenes`` draws what the folder never shows: objects
between the cells (each centre at least ``OFF_GRID`` px from every cell centre along some axis), of sizes
between small and large, in the held-out colours.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, write_text_atomic
from sdstudio.toyworld.concepts import claim_dataset_folder
from sdstudio.toyworld.world import (
    BACKGROUNDS,
    CELL,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZE_PIXELS,
    ObjectSpec,
    Scene,
    caption,
    object_alpha,
    render,
    sample_scene,
)

log = logging.getLogger(__name__)

ControlKind = Literal["mask", "edges"]
CONTROL_KINDS: tuple[ControlKind, ...] = ("mask", "edges")
IMAGES = "images"
CONDITIONING = "conditioning"
METADATA = "metadata.jsonl"

# Colours the training folder never shows: the held-out scenes use them (the control image has no colour,
# so a ControlNet that learnt where, not what, places them as well as any other).
HELDOUT_COLOURS: tuple[str, ...] = ("purple", "orange")
TRAIN_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c not in HELDOUT_COLOURS)
# Held-out sizes: bounding-box extents strictly between the world's small (11 px) and large (17 px) objects,
# whose jitter reaches 11.55 and 16.15 px.
HELDOUT_EXTENTS: tuple[float, float] = (12.5, 15.5)
# A lone training object's centre is within JITTER px of its cell's centre along x and y (wider than the
# world's 3 px for small objects, 1 px for large ones: the ControlNet sees every placement against the 8 px
# latent grid); a held-out centre is at least OFF_GRID px from every cell centre along x or along y, so the
# two never meet (the cells are 21.3 px apart: the held-out centres lie in the bands between cells).
JITTER = 6.0
OFF_GRID = 7.0

# Random streams [seed, stream]: the training folder 0, held-out scenes 1.
_TRAIN_STREAM = 0
_HELDOUT_STREAM = 1
_ITEM = re.compile(r"^\d{4,}\.(png|txt)$")


def silhouette(scene: Scene) -> np.ndarray:
    """The union of the scene's objects' coverage, float32 [64, 64] in [0, 1]."""
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for obj in scene.objects:
        alpha = np.maximum(alpha, object_alpha(obj))
    return alpha


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask [H, W]: its pixels with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def control_image(scene: Scene, kind: ControlKind) -> np.ndarray:
    """The scene's control image, uint8 [64, 64, 3]: silhouettes (``mask``) or their outlines (``edges``),
    white on black."""
    alpha = silhouette(scene)
    if kind == "mask":
        grey = np.rint(alpha * 255.0).astype(np.uint8)
    elif kind == "edges":
        grey = np.where(outline(alpha >= 0.5), 255, 0).astype(np.uint8)
    else:
        raise SdStudioError(f"control kind {kind!r}: choose {', '.join(CONTROL_KINDS)}")
    return np.repeat(grey[..., None], 3, axis=2)


@dataclass(frozen=True)
class ControlSample:
    """One scene with its render, its control image and a caption."""

    scene: Scene
    image: np.ndarray  # uint8 [64, 64, 3]
    control: np.ndarray  # uint8 [64, 64, 3]
    caption: str


def _train_scene(rng: np.random.Generator, two_objects: float) -> Scene:
    """A world scene (split "train") whose objects avoid the held-out colours, drawn again until they do; a
    lone object moved within ``JITTER`` px of its cell's centre, inside the canvas."""
    while True:
        scene = sample_scene(rng, "train", 2 if rng.random() < two_objects else 1)
        if all(o.colour in TRAIN_COLOURS for o in scene.objects):
            break
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        x, y = obj.centre[0] - obj.dx + dx, obj.centre[1] - obj.dy + dy
        low, high = obj.extent / 2 + 1, IMAGE_SIZE - obj.extent / 2 - 1
        x, y = min(max(x, low), high), min(max(y, low), high)
        cx, cy = obj.centre[0] - obj.dx, obj.centre[1] - obj.dy
        scene = Scene((replace(obj, dx=float(x - cx), dy=float(y - cy)),), scene.background)
    return scene


def control_samples(
    n: int,
    kind: ControlKind,
    seed: int = 0,
    *,
    p_position: float = 0.0,
    p_size: float = 0.0,
    two_objects: float = 0.0,
) -> list[ControlSample]:
    """``n`` training samples, the same for the same arguments: world scenes in the training colours, each
    with a caption (``world.caption``: an object's size with probability ``p_size``; a one-object caption
    says where with probability ``p_position``, a two-object caption is the world's, a relation or the
    positions or both) and its control image; ``two_objects``: the share of scenes with two objects."""
    if kind not in CONTROL_KINDS:
        raise SdStudioError(f"control kind {kind!r}: choose {', '.join(CONTROL_KINDS)}")
    rng = np.random.default_rng([seed, _TRAIN_STREAM])
    out = []
    for _ in range(n):
        scene = _train_scene(rng, two_objects)
        text = caption(scene, rng, p_size=p_size, p_position=p_position)
        out.append(ControlSample(scene, render(scene), control_image(scene, kind), text))
    return out


def write_control_dataset(
    kind: ControlKind,
    n: int,
    out: str | Path,
    seed: int = 0,
    *,
    p_position: float = 0.0,
    p_size: float = 0.0,
    two_objects: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` samples (``control_samples``) as kohya's ControlNet subset: ``out/images/0000.png`` +
    ``0000.txt``, ``out/conditioning/0000.png``, and diffusers' columns in ``out/metadata.jsonl``. Refuses a
    folder that holds anything unless ``overwrite``, which replaces the numbered files found in the two
    folders and the metadata (other files are left, and named in a warning). Returns ``out``."""
    out = Path(out)
    existing = claim_dataset_folder(out, n, overwrite)
    samples = control_samples(n, kind, seed, p_position=p_position, p_size=p_size, two_objects=two_objects)
    others = []
    for entry in existing:
        if entry.name in (IMAGES, CONDITIONING) and entry.is_dir():
            for path in entry.iterdir():
                if path.is_file() and _ITEM.match(path.name):
                    path.unlink()
                else:
                    others.append(f"{entry.name}/{path.name}")
        elif entry.name != METADATA:
            others.append(entry.name)
    if others:
        log.warning("%s: left in place, not part of the dataset written: %s", out, ", ".join(others[:10]))
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / CONDITIONING).mkdir(exist_ok=True)
    width = max(4, len(str(n - 1)))
    rows = []
    for i, sample in enumerate(samples):
        stem = f"{i:0{width}d}"
        for folder, pixels in ((IMAGES, sample.image), (CONDITIONING, sample.control)):
            atomic_write(out / folder / f"{stem}.png",
                         lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))  # fmt: skip
        write_text_atomic(out / IMAGES / f"{stem}.txt", sample.caption + "\n")
        rows.append({"image": f"{IMAGES}/{stem}.png", "conditioning_image": f"{CONDITIONING}/{stem}.png",
                     "text": sample.caption})  # fmt: skip
    write_text_atomic(out / METADATA, "".join(json.dumps(row) + "\n" for row in rows))
    log.info("%s: %d %s control samples (seed %d)", out, n, kind, seed)
    return out


# --------------------------------------------------------------------------------------------------
# Held-out scenes: where, how large and what colour the folder never shows.


def _off_grid(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A centre (x, y) keeping ``margin`` px inside the canvas, at least ``OFF_GRID`` px from every cell
    centre along x or along y."""
    centres = (np.arange(3) + 0.5) * CELL
    while True:
        x, y = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
        if min(abs(centres - x)) >= OFF_GRID or min(abs(centres - y)) >= OFF_GRID:
            return float(x), float(y)


def heldout_object(rng: np.random.Generator, shape: str | None = None) -> ObjectSpec:
    """One object off the grid, of a size between the world's two, in a held-out colour."""
    extent = float(rng.uniform(*HELDOUT_EXTENTS))
    x, y = _off_grid(rng, extent / 2 + 2)
    col, row = min(int(x // CELL), 2), min(int(y // CELL), 2)
    position = POSITIONS[3 * row + col]
    dx, dy = x - (col + 0.5) * CELL, y - (row + 0.5) * CELL
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = HELDOUT_COLOURS[int(rng.integers(len(HELDOUT_COLOURS)))]
    # the extent as a "small" object's scale: ObjectSpec's size names only the nominal extents
    return ObjectSpec(shape, colour, "small", position, dx, dy, extent / SIZE_PIXELS["small"])


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` one-object scenes of ``heldout_object`` on random backgrounds, the same for the same seed."""
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    scenes = []
    for _ in range(n):
        obj = heldout_object(rng)
        scenes.append(Scene((obj,), tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]))
    return scenes


@dataclass(frozen=True)
class Placement:
    """Whether an image draws a scene's (one) object where its control image puts it, as the judge reads it.

    ``placed``: some detected object (``judge.detect``) has its centroid inside the object's silhouette
    (coverage >= 1/2) grown by ``GROW`` pixels, and its bounding box overlaps the silhouette's with IoU >=
    ``MIN_IOU`` (the place and the size); ``as_asked``: that object also has the scene object's colour and
    shape (what the prompt asks for)."""

    placed: bool
    as_asked: bool
    iou: float  # the best IoU of a detection whose centroid is inside (0: none)
    detections: int


GROW = 2  # pixels the silhouette is grown by for the centroid test
MIN_IOU = 0.5


def placement(image: np.ndarray, scene: Scene) -> Placement:
    """``Placement`` of ``image`` (uint8 [64, 64, 3]) against the one-object ``scene`` it was made for."""
    from sdstudio.toyworld import judge  # the judge reads images; the world's data does not need it

    if len(scene.objects) != 1:
        raise ValueError(f"placement needs a one-object scene, got {len(scene.objects)} objects")
    (obj,) = scene.objects
    mask = silhouette(scene) >= 0.5
    box, grown = bbox(mask), dilate(mask, GROW)
    assert box is not None, "an object with no pixel on the canvas"
    detected = judge.detect(image)
    best, asked = 0.0, False
    for d in detected:
        cx, cy = d.centroid
        if not grown[min(int(cy), IMAGE_SIZE - 1), min(int(cx), IMAGE_SIZE - 1)]:
            continue
        iou = box_iou(d.bbox, box)
        best = max(best, iou)
        asked = asked or (iou >= MIN_IOU and (d.colour, d.shape) == (obj.colour, obj.shape))
    return Placement(best >= MIN_IOU, asked, best, len(detected))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a boolean mask, exclusive ends; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a (2 radius + 1) square."""
    out = mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


