"""The toyworld judge: reads the objects of a 64x64 image by pixel analysis and scores it against a
caption.

Pipeline (all numpy, no learned parts):
1. background = the most common colour (coarse 8x8x8 histogram, refined by the mean of its bin);
2. each pixel gets the nearest colour among the object palette, the reserved backgrounds and the
   estimated background; it is an object pixel when that is a palette colour within
   ``COLOUR_TOLERANCE`` (antialiased or blurred fringes fall nearer the background and drop out);
3. 8-connected components per colour (label propagation with pointer jumping); components smaller
   than ``MIN_AREA`` or with fewer than ``MIN_CORE`` pixels left after a one-pixel erosion (noise
   specks, thin fringe rings) are ignored;
4. per component, its coverage (alpha of its colour over the background, projected in RGB) in a
   window around it; mass and centroid of that coverage are unchanged by blur. Shape = nearest
   template of a bank (each shape at both sizes, several blurs) sampled in a frame centred on the
   centroid and scaled by sqrt(mass); size = the extent sqrt(mass / shape's fill fraction)
   against the geometric mean of the two sizes; position = the 3x3 grid cell of the centroid.

Measured on 2000 random scenes (half one object, half two; render seed 0): 100 % on every
attribute on clean renders and with Gaussian blur sigma 1 plus noise sigma 8; 98 % 'all' with blur
1.5 plus noise 12.

The concepts of ``concepts.py`` are read too, and base scenes read exactly as before they existed
(``tests/toyworld/test_judge.py`` holds the digest): pink is one more palette colour (label 9); ring
one more shape of the template bank (its hole tells it from a circle); an object is outlined when at
least ``OUTLINE_MIN_FRACTION`` of a 2 px band around it is dark (``outline_fraction``), and is then
read over the outline colour instead of the background, the border being no object of its own. On
renders of each concept's prompts: 100 %; with blur 1 and noise 8: ring 92.5 %, pink 100 %,
outlined 94.5 %; no ring, pink or outline read in 900 base detections.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np

from sdstudio.toyworld.world import (
    ALL_COLOURS,
    ALL_PALETTE,
    ALL_SHAPES,
    BACKGROUNDS,
    CELL,
    IMAGE_SIZE,
    OUTLINE_COLOUR,
    POSITIONS,
    RING_INNER,
    SIZE_PIXELS,
    Description,
    ObjectDescription,
    Scene,
    coverage_mask,
    describe,
    parse_caption,
    shape_polygon,
)

logger = logging.getLogger(__name__)

COLOUR_TOLERANCE = 80.0  # RGB distance; the closest two palette colours are 94 apart
MIN_AREA = 16  # pixels; a small star covers about 45
MIN_CORE = 4  # pixels left after a one-pixel erosion
SIZE_THRESHOLD = float(np.sqrt(SIZE_PIXELS["small"] * SIZE_PIXELS["large"]))  # on the estimated extent
RELATION_MARGIN = 4.0  # pixels between centroids for "left of" / "above" to hold
MAX_CANDIDATES = 8  # largest detections considered when matching a description
OUTLINE_BAND = 2  # pixels around an object where its outline is looked for (the outline is 2 px wide)
OUTLINE_MIN_FRACTION = 0.3  # share of that band that is dark for the object to be outlined
OUTLINE_DARKNESS = 0.75  # a pixel is dark below this point between the outline's luma and its neighbours'
_OUTLINE_LABEL = 1 + ALL_COLOURS.index(OUTLINE_COLOUR)


@dataclass(frozen=True)
class DetectedObject:
    """One object the judge sees. ``bbox`` is (x0, y0, x1, y1), exclusive ends; ``centroid`` (x, y)."""

    shape: str
    colour: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    shape_distance: float  # mean squared difference to the nearest template, 0 (exact) .. 1
    style: str | None = None  # "outlined", or None: plain


@dataclass(frozen=True)
class ObjectScore:
    """How one described object fares; attributes the description leaves open count as correct."""

    found: bool
    colour: bool
    shape: bool
    size: bool
    position: bool
    detected: DetectedObject | None
    style: bool = True

    @property
    def all(self) -> bool:
        return self.found and self.colour and self.shape and self.size and self.position and self.style


@dataclass(frozen=True)
class Score:
    """An image against a description: each attribute holds for every described object."""

    colour: bool
    shape: bool
    size: bool
    position: bool
    relation_ok: bool
    count_ok: bool  # as many objects seen as described
    all: bool
    per_object: tuple[ObjectScore, ...]
    detected: tuple[DetectedObject, ...]
    style: bool = True  # only concept captions ask for a style


# --------------------------------------------------------------------------------------------------
# Detection.


def _reference_colours() -> np.ndarray:
    """[13, 3] float32: object colours first (the base palette, then the concepts'), then reserved
    backgrounds."""
    return np.array(list(ALL_PALETTE.values()) + list(BACKGROUNDS.values()), dtype=np.float32)


def estimate_background(image: np.ndarray) -> np.ndarray:
    """The most common colour [3] float32: mode of an 8x8x8 histogram, refined by its bin's mean."""
    pixels = image.reshape(-1, 3)
    bins = (pixels // 32).astype(np.int64)
    key = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    mode = int(np.bincount(key, minlength=512).argmax())
    return pixels[key == mode].astype(np.float32).mean(axis=0)


def classify_pixels(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-pixel colour label [H, W] int: 1 + index into ``ALL_COLOURS``, or 0 for background/unknown.

    A palette colour within the tolerance of the estimated background cannot be told from it and
    is never a label (a white object on a white background is invisible).
    """
    h, w, _ = image.shape
    x = image.reshape(-1, 3).astype(np.float32)  # [pixels, 3]
    refs = np.concatenate([_reference_colours(), background[None]], axis=0)  # [14, 3]
    n = len(ALL_COLOURS)
    palette = refs[:n]
    d2 = (x * x).sum(axis=1, keepdims=True) - 2.0 * x @ refs.T + (refs * refs).sum(axis=1)  # [pixels, 14]
    hidden = ((palette - background) ** 2).sum(axis=1) < COLOUR_TOLERANCE**2  # [9]
    d2[:, :n][:, hidden] = np.inf
    nearest = d2.argmin(axis=1)
    near_enough = d2[np.arange(len(x)), nearest] < COLOUR_TOLERANCE**2
    is_object = (nearest < n) & near_enough
    return np.where(is_object, nearest + 1, 0).reshape(h, w)


_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-zero labels: [H, W] int, the smallest flat pixel index of
    each component, or -1 where ``labels`` is 0. Min-label propagation with pointer jumping."""
    h, w = labels.shape
    out = np.full((h, w), -1, dtype=np.int64)
    fg_full = labels > 0
    if not fg_full.any():
        return out
    # Work on the bounding box of the foreground: objects are sparse.
    rows, cols = np.nonzero(fg_full.any(axis=1))[0], np.nonzero(fg_full.any(axis=0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    lab = labels[r0:r1, c0:c1]
    bh, bw = lab.shape
    big = h * w
    padded = np.pad(lab, 1)
    same = [padded[1 + dy : 1 + dy + bh, 1 + dx : 1 + dx + bw] == lab for dy, dx in _NEIGHBOURS_8]
    fg = (lab > 0).ravel()
    flat_index = ((np.arange(bh)[:, None] + r0) * w + np.arange(bw)[None] + c0).ravel()
    # Component ids are indices into the cropped box while propagating, mapped back at the end.
    comp = np.where(fg, np.arange(bh * bw), big)
    buf = np.full((bh + 2, bw + 2), big, dtype=np.int64)
    shifted = np.empty((bh, bw), dtype=np.int64)
    while True:
        buf[1:-1, 1:-1] = comp.reshape(bh, bw)
        new = comp.reshape(bh, bw).copy()
        for (dy, dx), s in zip(_NEIGHBOURS_8, same):
            np.copyto(shifted, buf[1 + dy : 1 + dy + bh, 1 + dx : 1 + dx + bw])
            shifted[~s] = big
            np.minimum(new, shifted, out=new)
        new = new.ravel()
        new[~fg] = big
        for _ in range(2):
            new[fg] = new[new[fg]]
        if np.array_equal(new, comp):
            break
        comp = new
    out[r0:r1, c0:c1] = np.where(fg, flat_index[np.minimum(comp, bh * bw - 1)], -1).reshape(bh, bw)
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Erosion by the 4-neighbourhood (pixels outside count as unset)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2 radius + 1) square, separably."""
    rows = mask.copy()
    for d in range(1, radius + 1):
        rows[d:] |= mask[:-d]
        rows[:-d] |= mask[d:]
    out = rows.copy()
    for d in range(1, radius + 1):
        out[:, d:] |= rows[:, :-d]
        out[:, :-d] |= rows[:, d:]
    return out


# Shape analysis happens in a frame centred on the object's coverage centroid and scaled by the
# square root of its coverage mass: both are unchanged by blur, so blurred objects land on the
# same frame as sharp ones and only the template bank needs blurred entries.
_FRAME = 20  # samples per side
_FRAME_HALF_WIDTH = 1.3  # in units of sqrt(mass)
_TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # Gaussian sigmas, pixels
_SUPPORT_DILATIONS = 3  # pixels around a component that may hold its blurred coverage


def _frame_samples(alpha: np.ndarray, centroid: tuple[float, float], scale: float) -> np.ndarray:
    """Bilinear samples [_FRAME, _FRAME] of ``alpha`` on the normalised frame; zero outside."""
    u = np.linspace(-_FRAME_HALF_WIDTH, _FRAME_HALF_WIDTH, _FRAME) * scale
    # Pixel i has its centre at i + 0.5.
    px = centroid[0] + u - 0.5
    py = centroid[1] + u - 0.5
    h, w = alpha.shape
    padded = np.pad(alpha, 1)  # index j in ``alpha`` is j + 1 here; outside reads zero
    x0 = np.floor(px).astype(np.int64)
    y0 = np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    xi0, xi1 = np.clip(x0 + 1, 0, w + 1), np.clip(x0 + 2, 0, w + 1)
    yi0, yi1 = np.clip(y0 + 1, 0, h + 1), np.clip(y0 + 2, 0, h + 1)
    top = padded[yi0][:, xi0] * (1 - fx) + padded[yi0][:, xi1] * fx
    bottom = padded[yi1][:, xi0] * (1 - fx) + padded[yi1][:, xi1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def _mass_and_centroid(alpha: np.ndarray, x0: int, y0: int) -> tuple[float, tuple[float, float]]:
    mass = float(alpha.sum())
    h, w = alpha.shape
    cx = float((alpha.sum(axis=0) * (np.arange(w) + 0.5)).sum()) / mass + x0
    cy = float((alpha.sum(axis=1) * (np.arange(h) + 0.5)).sum()) / mass + y0
    return mass, (cx, cy)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return a
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, np.pad(a, r))
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, a)


@functools.lru_cache(maxsize=1)
def shape_templates() -> tuple[np.ndarray, np.ndarray]:
    """The template bank: frames [templates, 20, 20] float32 and their shape indices [templates].
    Each shape at both sizes, two sub-pixel offsets and several blurs, analysed like a detection."""
    frames, labels = [], []
    for k, shape in enumerate(ALL_SHAPES):
        for extent in (11.0, 17.0):
            for f in (0.0, 0.5):
                cov = coverage_mask(shape, extent, extent / 2 + 2 + f, extent / 2 + 2 + f).astype(np.float64)
                for sigma in _TEMPLATE_BLURS:
                    alpha = _gaussian_blur(cov, sigma)
                    mass, centroid = _mass_and_centroid(alpha, 0, 0)
                    frames.append(_frame_samples(alpha, centroid, float(np.sqrt(mass))))
                    labels.append(k)
    return np.stack(frames), np.array(labels)


@functools.lru_cache(maxsize=1)
def shape_fill() -> dict[str, float]:
    """Area of each shape as a fraction of its bounding box."""
    out = {}
    for shape in ALL_SHAPES:
        if shape == "ring":
            out[shape] = float(np.pi / 4 * (1 - RING_INNER**2))
            continue
        verts = shape_polygon(shape)
        if verts is None:
            out[shape] = float(np.pi / 4)
        else:
            x, y = verts[:, 0], verts[:, 1]
            out[shape] = float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
    return out


def _grid_position(cx: float, cy: float) -> str:
    col = min(max(int(cx // CELL), 0), 2)
    row = min(max(int(cy // CELL), 0), 2)
    return POSITIONS[row * 3 + col]


@dataclass(frozen=True)
class _Blob:
    """A connected component of one colour label that is large and thick enough to be an object."""

    mask: np.ndarray  # [64, 64] bool
    label: int
    area: int


def _blobs(labels: np.ndarray) -> list[_Blob]:
    comp = connected_components(labels)
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    blobs = []
    for cid, area in zip(ids.tolist(), counts.tolist()):
        if area < MIN_AREA:
            continue
        mask = comp == cid
        if int(_erode(mask).sum()) >= MIN_CORE:
            blobs.append(_Blob(mask, int(labels.flat[cid]), area))
    return blobs


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R BT.601 weights) of RGB values [..., 3]."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def outline_fraction(pixels: np.ndarray, mask: np.ndarray, colour: str, background: np.ndarray) -> float:
    """Share of the pixels in a band ``OUTLINE_BAND`` px wide around ``mask`` (an object of ``colour``)
    that are dark: below ``OUTLINE_DARKNESS`` of the way from the outline colour's luma up to the darker
    of the object's and the background's. Mixes of object and background never are (up to noise), so a
    plain object scores 0 unless a dark object stands next to it."""
    band = _dilate(mask, OUTLINE_BAND) & ~mask
    if not band.any():
        return 0.0
    dark = float(_luma(np.asarray(ALL_PALETTE[OUTLINE_COLOUR], dtype=np.float32)))
    light = min(float(_luma(np.asarray(ALL_PALETTE[colour], dtype=np.float32))), float(_luma(background)))
    return float((_luma(pixels[band]) < dark + OUTLINE_DARKNESS * (light - dark)).mean())


def _outlines(
    pixels: np.ndarray, blobs: list[_Blob], labels: np.ndarray, background: np.ndarray
) -> tuple[list[bool], list[bool]]:
    """Which blobs are outlined, and which blobs in the outline colour are those outlines (most of
    their pixels next to an outlined blob)."""
    outlined = [
        b.label != _OUTLINE_LABEL
        and outline_fraction(pixels, b.mask, ALL_COLOURS[b.label - 1], background) >= OUTLINE_MIN_FRACTION
        for b in blobs
    ]
    zone = np.zeros(labels.shape, dtype=bool)
    for b, o in zip(blobs, outlined):
        if o:
            zone |= _dilate(b.mask, OUTLINE_BAND + 2)
    is_outline = [b.label == _OUTLINE_LABEL and 2 * int((b.mask & zone).sum()) >= b.area for b in blobs]
    return outlined, is_outline


def _coverage(
    pixels: np.ndarray, labels: np.ndarray, blob: _Blob, under: np.ndarray, dilations: int
) -> tuple[np.ndarray, int, int]:
    """The blob colour's coverage [h, w] over the colour ``under`` it (the background, or an outline),
    in a window around the blob, and the window's (x0, y0). Pixels of other colours are another
    object's and count as zero."""
    ys, xs = np.nonzero(blob.mask)
    m = dilations
    wx0, wy0 = max(int(xs.min()) - m, 0), max(int(ys.min()) - m, 0)
    wx1, wy1 = min(int(xs.max()) + 1 + m, IMAGE_SIZE), min(int(ys.max()) + 1 + m, IMAGE_SIZE)
    support = _dilate(blob.mask[wy0:wy1, wx0:wx1], m)
    win_labels = labels[wy0:wy1, wx0:wx1]
    support &= (win_labels == 0) | (win_labels == blob.label)
    direction = np.asarray(ALL_PALETTE[ALL_COLOURS[blob.label - 1]], dtype=np.float32) - under  # [3]
    alpha = (pixels[wy0:wy1, wx0:wx1] - under) @ direction / float(direction @ direction)
    return np.where(support, np.clip(alpha, 0.0, 1.0), 0.0), wx0, wy0


def _read_blob(
    pixels: np.ndarray, labels: np.ndarray, background: np.ndarray, blob: _Blob, outlined: bool
) -> DetectedObject:
    if outlined:
        # Over its outline, not the background: one pixel around the blob stays inside the border.
        under = np.asarray(ALL_PALETTE[OUTLINE_COLOUR], dtype=np.float32)
        alpha, wx0, wy0 = _coverage(pixels, labels, blob, under, 1)
    else:
        alpha, wx0, wy0 = _coverage(pixels, labels, blob, background, _SUPPORT_DILATIONS)
    templates, template_shapes = shape_templates()
    mass, centroid = _mass_and_centroid(alpha, wx0, wy0)
    frame = _frame_samples(alpha, (centroid[0] - wx0, centroid[1] - wy0), float(np.sqrt(mass)))
    dist = ((templates - frame[None]) ** 2).mean(axis=(1, 2))  # [templates]
    best = int(dist.argmin())
    shape = ALL_SHAPES[int(template_shapes[best])]
    extent = float(np.sqrt(mass / shape_fill()[shape]))
    ys, xs = np.nonzero(blob.mask)
    return DetectedObject(
        shape=shape,
        colour=ALL_COLOURS[blob.label - 1],
        size="large" if extent >= SIZE_THRESHOLD else "small",
        position=_grid_position(*centroid),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        centroid=centroid,
        area=blob.area,
        shape_distance=float(dist[best]),
        style="outlined" if outlined else None,
    )


def detect(image: np.ndarray) -> tuple[DetectedObject, ...]:
    """The objects in ``image`` (uint8 [64, 64, 3]), in reading order of their grid cells.

    An object ringed by the outline colour (``outline_fraction``) is read as outlined, over its outline
    rather than the background, and the ring itself is no object of its own.
    """
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected an image of shape (64, 64, 3), got {image.shape}")
    background = estimate_background(image)
    labels = classify_pixels(image, background)
    blobs = _blobs(labels)
    pixels = image.astype(np.float32)
    outlined, is_outline = _outlines(pixels, blobs, labels, background)
    found = [
        _read_blob(pixels, labels, background, b, o)
        for b, o, ring in zip(blobs, outlined, is_outline)
        if not ring
    ]
    found.sort(key=lambda o: (POSITIONS.index(o.position), o.centroid[1], o.centroid[0]))
    return tuple(found)


# --------------------------------------------------------------------------------------------------
# Scoring.


def _object_score(want: ObjectDescription, got: DetectedObject | None) -> ObjectScore:
    if got is None:
        return ObjectScore(False, False, False, False, False, None, style=False)
    return ObjectScore(
        found=True,
        colour=got.colour == want.colour,
        shape=got.shape == want.shape,
        size=want.size is None or got.size == want.size,
        position=want.position is None or got.position == want.position,
        detected=got,
        style=want.style is None or got.style == want.style,
    )


def relation_seen(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether detection ``a`` is ``relation`` detection ``b``, by centroids with a small margin."""
    (ax, ay), (bx, by) = a.centroid, b.centroid
    if relation == "left of":
        return ax + RELATION_MARGIN < bx
    if relation == "right of":
        return ax > bx + RELATION_MARGIN
    if relation == "above":
        return ay + RELATION_MARGIN < by
    if relation == "below":
        return ay > by + RELATION_MARGIN
    raise ValueError(f"unknown relation {relation!r}")


def _as_description(description: Description | Scene | str) -> Description:
    if isinstance(description, Description):
        return description
    if isinstance(description, Scene):
        return describe(description)
    parsed = parse_caption(description, concepts=True)
    if parsed is None:
        raise ValueError(f"not a caption in the toyworld language: {description!r}")
    return parsed


def score(image: np.ndarray, description: Description | Scene | str) -> Score:
    """Score ``image`` against what ``description`` asks for.

    Described objects are paired one-to-one with detections, choosing the pairing that matches the
    most (colour before shape before position before size, then the relation, then the style). An
    attribute is correct when it holds for every described object; ``all`` also needs the relation,
    the style where one is asked for, and exactly as many objects seen as described.
    """
    want = _as_description(description)
    detected = detect(image)
    candidates = sorted(detected, key=lambda o: -o.area)[:MAX_CANDIDATES]
    slots: list[DetectedObject | None] = list(candidates) + [None] * len(want.objects)
    best: tuple[tuple[int, int], tuple[ObjectScore, ...], bool] | None = None
    for combo in itertools.permutations(range(len(slots)), len(want.objects)):
        picked = [slots[i] for i in combo]
        per = tuple(_object_score(w, g) for w, g in zip(want.objects, picked))
        rel_ok = True
        if want.relation is not None:
            a, b = picked[0], picked[1]
            rel_ok = a is not None and b is not None and relation_seen(want.relation, a, b)
        # A style only breaks ties, so descriptions without one pair exactly as before styles existed.
        value = (sum(8 * o.colour + 4 * o.shape + 2 * o.position + o.size + 16 * o.found for o in per) + rel_ok,
                 sum(o.style for o in per))  # fmt: skip
        if best is None or value > best[0]:
            best = (value, per, rel_ok)
    assert best is not None
    _, per_object, relation_ok = best
    count_ok = len(detected) == len(want.objects)
    colour = all(o.found and o.colour for o in per_object)
    shape = all(o.found and o.shape for o in per_object)
    size = all(o.found and o.size for o in per_object)
    position = all(o.found and o.position for o in per_object)
    style = all(o.found and o.style for o in per_object)
    return Score(
        colour=colour,
        shape=shape,
        size=size,
        position=position,
        relation_ok=relation_ok,
        count_ok=count_ok,
        all=colour and shape and size and position and style and relation_ok and count_ok,
        per_object=per_object,
        detected=detected,
        style=style,
    )
