"""Toyworld: a synthetic captioned world of coloured shapes on plain backgrounds.

Every image is 64x64 RGB: one or two objects, each with a shape, a colour, a size and one of nine
positions on a 3x3 grid, on a background whose colour is reserved (never an object colour), so a
judge can read an image back by pixel analysis alone (see ``judge.py``).

Captions are drawn from several templates with synonyms ("a small crimson disc in the upper left
corner on a teal background"), using only words of ``VOCABULARY``; ``parse_caption`` reads any
sentence of this language back into a ``Description`` (the attributes it states).

A few colour-shape pairs (``HELDOUT_PAIRS``) are never produced with ``split="train"``: a model that
draws them has composed colour and shape, not memorised pairs.

Everything is deterministic: a ``Scene`` records the jitter it was drawn with, so ``render(scene)`` is
a pure function, and ``dataset(seed, ...)`` gives the same bytes for the same seed.

Concepts the base world never shows, for fine-tuning (``concepts.py`` builds their datasets): the shape
``ring`` (an annulus), the colour ``pink`` and the style ``outlined`` (a thick dark border around the
object). They live outside ``SHAPES``, ``PALETTE`` and ``language.py``, so ``sample_scene``,
``dataset`` and ``caption`` draw, render and write exactly what they did before the concepts existed
(same random draws, same bytes: ``tests/toyworld/test_world.py`` holds the digest); only an object that
asks for one (``ObjectSpec(shape="ring")``, ``colour="pink"``, ``style="outlined"``) shows it, and only
``parse_caption(text, concepts=True)`` reads their words.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from sdstudio.toyworld import language
from sdstudio.toyworld.language import (
    AND_WORDS,
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    FILLER_WORDS,
    POSITION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    tokenize,
)

logger = logging.getLogger(__name__)

# Part of this module's API since before the language had a module of its own.
VOCABULARY = language.VOCABULARY
unknown_words = language.unknown_words

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

# Object colours, chosen far apart in RGB (closest pair: yellow-orange, 94) and far from every
# background colour (>= 97), so nearest-palette classification with a tolerance is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (25, 165, 45),
    "blue": (30, 70, 225),
    "yellow": (245, 225, 25),
    "purple": (145, 45, 190),
    "orange": (250, 135, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

# Reserved background colours: never object colours. Their antialiased mixes with any object colour
# stay nearer the background or the object itself than any other object colour (checked in tests).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (205, 185, 145),
    "teal": (40, 120, 130),
    "sky": (150, 200, 235),
}

SIZES: tuple[str, ...] = ("small", "large")
# Nominal bounding-box extent in pixels; the judge splits at the midpoint.
SIZE_PIXELS: dict[str, float] = {"small": 11.0, "large": 17.0}
SIZE_THRESHOLD = 0.5 * (SIZE_PIXELS["small"] + SIZE_PIXELS["large"])

POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL = IMAGE_SIZE / 3.0

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

# Colour-shape pairs never seen in training: each shape once, six of the eight colours.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("yellow", "circle"),
        ("purple", "square"),
        ("green", "triangle"),
        ("blue", "star"),
        ("orange", "diamond"),
        ("white", "cross"),
    }
)

# Concepts the base training never shows. Not in SHAPES / PALETTE (which sampling draws from) nor in
# ``language.py`` (the embedded model's words): only concept code asks for them.
CONCEPT_SHAPES: tuple[str, ...] = ("ring",)
# Hot pink: at least 101 from every object and background colour, and no antialiased mix of any two of
# them (object over background or over the outline) comes within the judge's tolerance of it.
CONCEPT_PALETTE: dict[str, tuple[int, int, int]] = {"pink": (255, 105, 180)}
STYLES: tuple[str, ...] = ("outlined",)
ALL_SHAPES: tuple[str, ...] = SHAPES + CONCEPT_SHAPES
ALL_PALETTE: dict[str, tuple[int, int, int]] = PALETTE | CONCEPT_PALETTE
ALL_COLOURS: tuple[str, ...] = tuple(ALL_PALETTE)
RING_INNER = 0.45  # a ring's hole, as a fraction of its outer diameter (5 px across for a small ring)
# An outlined object is its shape in its colour over a border this many pixels wide outside it (its
# size and shape are the fill's; the border only adds), in the outline colour.
OUTLINE_WIDTH = 2.0
OUTLINE_COLOUR = "black"

# The concepts' words: one each, none of them in ``language.VOCABULARY``.
CONCEPT_COLOUR_WORDS: dict[str, tuple[str, ...]] = {"pink": ("pink",)}
CONCEPT_SHAPE_WORDS: dict[str, tuple[str, ...]] = {"ring": ("ring",)}
STYLE_WORDS: dict[str, tuple[str, ...]] = {"outlined": ("outlined",)}
CONCEPT_VOCABULARY: frozenset[str] = frozenset(
    w
    for table in (CONCEPT_COLOUR_WORDS, CONCEPT_SHAPE_WORDS, STYLE_WORDS)
    for phrases in table.values()
    for phrase in phrases
    for w in phrase.split()
)

# Jitter bounds keep each object inside the canvas and its grid cell, and two objects in adjacent
# cells apart (large: 17 * 1.05 + 2 * 1 < 21.3 px between cell centres).
MAX_OFFSET: dict[str, float] = {"small": 3.0, "large": 1.0}
MAX_SCALE_JITTER = 0.05

Split = Literal["train", "heldout", "any"]


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene. ``dx``, ``dy`` (pixels) and ``scale`` are the jitter it is drawn with;
    ``style``: None (plain, the base world's only style) or one of ``STYLES``."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    style: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {ALL_SHAPES}")
        if self.colour not in ALL_PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {ALL_COLOURS}")
        if self.style is not None and self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; expected None or one of {STYLES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the object's bounding-box centre in pixels (pixel i spans [i, i+1])."""
        row, col = divmod(POSITIONS.index(self.position), 3)
        return ((col + 0.5) * CELL + self.dx, (row + 0.5) * CELL + self.dy)

    @property
    def extent(self) -> float:
        """Bounding-box side in pixels."""
        return SIZE_PIXELS[self.size] * self.scale


@dataclass(frozen=True)
class Scene:
    """A complete, replayable world state. ``relation`` relates ``objects[0]`` to ``objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}")
        if self.relation is not None:
            if len(self.objects) != 2:
                raise ValueError("a relation needs exactly two objects")
            if not relation_holds(self.relation, self.objects[0].position, self.objects[1].position):
                raise ValueError(
                    f"{self.objects[0].position!r} is not {self.relation!r} {self.objects[1].position!r}"
                )


@dataclass(frozen=True)
class ObjectDescription:
    """What a caption says about one object; ``None`` where it says nothing (a caption that names no
    style says nothing of it: only concept captions name one)."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None
    style: str | None = None


@dataclass(frozen=True)
class Description:
    """What a caption asks for: its objects in the order named, and what it says of the rest."""

    objects: tuple[ObjectDescription, ...]
    background: str | None = None
    relation: str | None = None

    def matches(self, scene: Scene) -> bool:
        """Whether ``scene`` satisfies every stated attribute, under some one-to-one pairing of the
        described objects with the scene's (a caption may name them in either order)."""
        if len(self.objects) != len(scene.objects):
            return False
        if self.background is not None and self.background != scene.background:
            return False
        return any(self._matches_in_order(perm) for perm in itertools.permutations(scene.objects))

    def _matches_in_order(self, objects: tuple[ObjectSpec, ...]) -> bool:
        for want, obj in zip(self.objects, objects):
            if (want.shape, want.colour) != (obj.shape, obj.colour):
                return False
            if want.size is not None and want.size != obj.size:
                return False
            if want.position is not None and want.position != obj.position:
                return False
            if want.style is not None and want.style != obj.style:
                return False
        if self.relation is not None:
            return relation_holds(self.relation, objects[0].position, objects[1].position)
        return True


def describe(scene: Scene) -> Description:
    """The full description of a scene: every attribute stated."""
    return Description(
        objects=tuple(
            ObjectDescription(o.shape, o.colour, o.size, o.position, o.style) for o in scene.objects
        ),
        background=scene.background,
        relation=scene.relation,
    )


def grid_cell(position: str) -> tuple[int, int]:
    """(row, col) of a position on the 3x3 grid."""
    return divmod(POSITIONS.index(position), 3)


def relation_holds(relation: str, a: str, b: str) -> bool:
    """Whether position ``a`` is ``relation`` position ``b`` on the grid (diagonals satisfy both axes)."""
    (ra, ca), (rb, cb) = grid_cell(a), grid_cell(b)
    if relation == "left of":
        return ca < cb
    if relation == "right of":
        return ca > cb
    if relation == "above":
        return ra < rb
    if relation == "below":
        return ra > rb
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def is_heldout(obj: ObjectSpec | ObjectDescription) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_PAIRS


# --------------------------------------------------------------------------------------------------
# Rendering: per-shape coverage masks from exact signed distances, cached per quarter-pixel offset.

_SUBPIXEL = 4  # offsets are quantised to 1/4 pixel, so a few hundred cached masks cover every scene
_SCALE_STEPS = 8  # scale jitter quantised to (2 * MAX_SCALE_JITTER) / _SCALE_STEPS


def shape_polygon(shape: str) -> np.ndarray | None:
    """Vertices [n, 2] of ``shape`` in units of its bounding box (side 1, centred), y down; None: circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "diamond":
        return np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]])
    if shape == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "cross":
        a, b = 0.5, 1.0 / 6.0  # arms one third of the extent wide
        return np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
    if shape == "star":
        # Five points, top point up; inner radius 0.5 (fatter than the classic 0.38) so the star stays
        # a star at 11 px. Scaled so its width is 1 and centred on its bounding box.
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        return (pts - (lo + hi) / 2) / (hi - lo)[0]
    raise ValueError(f"unknown shape {shape!r}")


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points to a simple polygon (Quilez, "2D distance functions")."""
    vx, vy = verts[:, 0], verts[:, 1]
    wx, wy = np.roll(vx, 1), np.roll(vy, 1)
    ex, ey = (wx - vx)[:, None, None], (wy - vy)[:, None, None]  # [edges, 1, 1]
    dx, dy = px[None] - vx[:, None, None], py[None] - vy[:, None, None]  # [edges, h, w]
    t = np.clip((dx * ex + dy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.sqrt(((dx - ex * t) ** 2 + (dy - ey * t) ** 2).min(axis=0))
    # Even-odd crossing count for the sign.
    c1 = py[None] >= vy[:, None, None]
    c2 = py[None] < wy[:, None, None]
    c3 = ex * dy > ey * dx
    flips = ((c1 & c2 & c3) | (~c1 & ~c2 & ~c3)).sum(axis=0) % 2 == 1
    return np.where(flips, -dist, dist)


def _shape_sdf(shape: str, px: np.ndarray, py: np.ndarray, extent: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) from points to ``shape`` of side ``extent`` centred at 0."""
    if shape == "ring":
        # An annulus: distance to the circle halfway between its rims, less half its width.
        outer, inner = extent / 2, RING_INNER * extent / 2
        return np.abs(np.hypot(px, py) - (outer + inner) / 2) - (outer - inner) / 2
    verts = shape_polygon(shape)
    if verts is None:
        return np.hypot(px, py) - extent / 2
    return _polygon_sdf(px, py, verts * extent)


@functools.lru_cache(maxsize=4096)
def coverage_mask(shape: str, extent: float, fx: float, fy: float, grow: float = 0.0) -> np.ndarray:
    """Antialiased coverage [k, k] float32 of ``shape`` with side ``extent`` px, centred at (fx, fy)
    pixels from the mask's top-left corner; ``grow`` > 0: of the shape grown by that many pixels (its
    points within ``grow`` of it: an outline's outer edge)."""
    k = math.ceil(max(fx, fy) + extent / 2 + grow + 2)
    ys, xs = np.mgrid[0:k, 0:k].astype(np.float64) + 0.5  # pixel centres
    sdf = _shape_sdf(shape, xs - fx, ys - fy, extent)
    mask = np.clip(0.5 - (sdf - grow), 0.0, 1.0).astype(np.float32)
    mask.setflags(write=False)
    return mask


def object_alpha(obj: ObjectSpec, grow: float = 0.0) -> np.ndarray:
    """The object's antialiased coverage of the canvas, float32 [64, 64] in [0, 1]; ``grow``: of the
    object grown by that many pixels (``coverage_mask``)."""
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cx, cy = obj.centre
    half = obj.extent / 2 + grow + 2
    x0, y0 = math.floor(cx - half), math.floor(cy - half)
    fx = round((cx - x0) * _SUBPIXEL) / _SUBPIXEL
    fy = round((cy - y0) * _SUBPIXEL) / _SUBPIXEL
    step = 2 * MAX_SCALE_JITTER / _SCALE_STEPS
    scale = 1.0 + round((obj.scale - 1.0) / step) * step
    mask = coverage_mask(obj.shape, SIZE_PIXELS[obj.size] * scale, fx, fy, grow)
    k = mask.shape[0]
    # Clip the mask window to the canvas.
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + k, IMAGE_SIZE), min(y0 + k, IMAGE_SIZE)
    if ix1 > ix0 and iy1 > iy0:
        alpha[iy0:iy1, ix0:ix1] = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    return alpha


def _blend(img: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> None:
    img += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - img)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]: background fill, then each object alpha-blended in order (an
    outlined object: its grown shape in the outline colour first, then the object over it)."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        if obj.style == "outlined":
            _blend(img, object_alpha(obj, OUTLINE_WIDTH), ALL_PALETTE[OUTLINE_COLOUR])
        _blend(img, object_alpha(obj), ALL_PALETTE[obj.colour])
    return np.rint(img).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Sampling.


def _allowed_pairs(split: Split) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [p for p in pairs if p not in HELDOUT_PAIRS]
    if split == "heldout":
        return sorted(HELDOUT_PAIRS)
    if split == "any":
        return pairs
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'any'")


def _sample_object(
    rng: np.random.Generator, pairs: list[tuple[str, str]], position: str, jitter: bool
) -> ObjectSpec:
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    if jitter:
        m = MAX_OFFSET[size]
        dx, dy = (float(v) for v in rng.uniform(-m, m, size=2))
        scale = float(rng.uniform(1 - MAX_SCALE_JITTER, 1 + MAX_SCALE_JITTER))
    else:
        dx, dy, scale = 0.0, 0.0, 1.0
    return ObjectSpec(shape, colour, size, position, dx, dy, scale)


def sample_scene(
    rng: np.random.Generator, split: Split = "train", n_objects: int = 1, jitter: bool = True
) -> Scene:
    """A random scene of ``n_objects`` (1 or 2) objects in distinct cells.

    ``split="train"``: no object is a held-out colour-shape pair. ``"heldout"``: the first object (the
    one a caption names first) is a held-out pair, any other object is drawn from all pairs. ``"any"``:
    no restriction. Two objects always differ in colour, and get a relation that their cells satisfy.
    """
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    first_pairs = _allowed_pairs(split)
    other_pairs = _allowed_pairs("train" if split == "train" else "any")
    cells = rng.permutation(len(POSITIONS))[:n_objects]
    objects = [_sample_object(rng, first_pairs, POSITIONS[int(cells[0])], jitter)]
    if n_objects == 2:
        pairs = [p for p in other_pairs if p[0] != objects[0].colour]
        objects.append(_sample_object(rng, pairs, POSITIONS[int(cells[1])], jitter))
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    relation = None
    if n_objects == 2:
        true = [r for r in RELATIONS if relation_holds(r, objects[0].position, objects[1].position)]
        relation = true[int(rng.integers(len(true)))]
    return Scene(tuple(objects), background, relation)


def swap_places(scene: Scene) -> Scene:
    """The two-object ``scene`` with its objects' places exchanged (each keeps its in-cell offset) and
    the relation inverted: the same objects, the opposite layout. A contrastive hard negative."""
    if len(scene.objects) != 2 or scene.relation is None:
        raise ValueError("swap_places needs a two-object scene with a relation")
    a, b = scene.objects
    swapped = (replace(a, position=b.position), replace(b, position=a.position))
    return Scene(swapped, scene.background, INVERSE_RELATION[scene.relation])


def swap_shapes(scene: Scene) -> Scene:
    """The two-object ``scene`` with its objects' shapes exchanged, all else kept: the same colours,
    shapes and places, bound the other way. A contrastive hard negative for attribute binding."""
    if len(scene.objects) != 2:
        raise ValueError("swap_shapes needs a two-object scene")
    a, b = scene.objects
    return Scene((replace(a, shape=b.shape), replace(b, shape=a.shape)), scene.background, scene.relation)


def dataset(
    seed: int | Sequence[int], n: int, split: Split = "train", n_objects: int | None = None
) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` (image uint8 [64, 64, 3], caption, scene) triples, the same for the same arguments (``seed``:
    anything ``np.random.default_rng`` takes, such as ``[seed, stream]``).

    ``n_objects=None`` draws one or two objects with equal probability.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = n_objects if n_objects is not None else int(rng.integers(1, 3))
        scene = sample_scene(rng, split, k)
        yield render(scene), caption(scene, rng), scene


# --------------------------------------------------------------------------------------------------
# Language: templates and the parser over the words of ``language.py``.


def _clauses(text: str) -> list[list[str]]:
    """Words of each clause: punctuation other than hyphens ends a phrase ("at the bottom, right of"
    is not "bottom right")."""
    return [tokenize(part) for part in re.split(r"[,;:.!?]", text)]


Token = tuple[str, str]  # (kind, canonical value)


@functools.lru_cache(maxsize=2)
def _phrase_table(concepts: bool = False) -> dict[tuple[str, ...], Token]:
    table: dict[tuple[str, ...], Token] = {}
    groups: list[tuple[str, dict[str, tuple[str, ...]]]] = [
        ("colour", COLOUR_WORDS),
        ("background", BACKGROUND_WORDS),
        ("shape", SHAPE_WORDS),
        ("size", SIZE_WORDS),
        ("position", POSITION_WORDS),
        ("relation", RELATION_WORDS),
    ]
    if concepts:
        groups += [("colour", CONCEPT_COLOUR_WORDS), ("shape", CONCEPT_SHAPE_WORDS), ("style", STYLE_WORDS)]
    for kind, words in groups:
        for value, phrases in words.items():
            for phrase in phrases:
                key = tuple(phrase.split())
                if key in table and table[key] != (kind, value):
                    raise AssertionError(f"phrase {phrase!r} has two meanings")
                table[key] = (kind, value)
    for word in FILLER_WORDS:
        table.setdefault((word,), ("filler", word))
    for word in AND_WORDS:
        table[(word,)] = ("and", word)
    return table


def _lex(text: str, concepts: bool = False) -> list[Token] | None:
    """Longest-match phrases within each clause; None if a word is not in the vocabulary."""
    table = _phrase_table(concepts)
    longest = max(len(k) for k in table)
    out: list[Token] = []
    for words in _clauses(text):
        if not _lex_clause(words, table, longest, out):
            return None
    return out


def _lex_clause(
    words: list[str], table: dict[tuple[str, ...], Token], longest: int, out: list[Token]
) -> bool:
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            tok = table.get(tuple(words[i : i + n]))
            if tok is not None:
                out.append(tok)
                i += n
                break
        else:
            return False
    return True


def parse_caption(text: str, *, concepts: bool = False) -> Description | None:
    """What a sentence in the world's language asks for, or None if it is not one.

    Grammar: objects are ``[size] [style] [colour] shape`` (colour required; a style word only with
    ``concepts``, which also reads the concepts' colour and shape words); a position phrase attaches to
    the object it follows, or to the next object when it comes first ("in the top left, a red
    circle"); a relation joins the first and second object; a background colour word may come
    anywhere. Words outside ``VOCABULARY``, an adjective without a noun, a missing colour, a second
    background, or a relation without exactly two objects make the text unparseable.
    """
    tokens = _lex(text, concepts)
    if tokens is None:
        return None
    objects: list[ObjectDescription] = []
    adjectives: dict[str, str] = {}
    pending_position: str | None = None
    open_object = False  # the last object may still take a position that follows it
    background: str | None = None
    relation: str | None = None
    for kind, value in tokens:
        if kind == "filler":
            continue
        if kind == "background":
            if background is not None and background != value:
                return None
            background = value
        elif kind in ("size", "colour", "style"):
            if kind in adjectives:
                return None
            adjectives[kind] = value
            open_object = False
        elif kind == "shape":
            if "colour" not in adjectives:
                return None
            objects.append(
                ObjectDescription(
                    value,
                    adjectives["colour"],
                    adjectives.get("size"),
                    pending_position,
                    adjectives.get("style"),
                )
            )
            adjectives, pending_position = {}, None
            open_object = objects[-1].position is None
        elif kind == "position":
            if open_object and not adjectives:
                objects[-1] = replace(objects[-1], position=value)
                open_object = False
            elif pending_position is None:
                pending_position = value
            else:
                return None
        elif kind == "relation":
            if relation is not None or len(objects) != 1 or adjectives or pending_position is not None:
                return None
            relation = value
            open_object = False
        elif kind == "and":
            if adjectives or pending_position is not None:
                return None
            open_object = False
    if not objects or adjectives or pending_position is not None:
        return None
    if relation is not None and len(objects) != 2:
        return None
    return Description(tuple(objects), background, relation)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_phrase(obj: ObjectSpec, rng: np.random.Generator, with_size: bool) -> str:
    """``[size] [style] colour shape``; a plain base object draws exactly what it always did."""
    words = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    if obj.style is not None:
        words.append(_pick(rng, STYLE_WORDS[obj.style]))
    colours = COLOUR_WORDS.get(obj.colour) or CONCEPT_COLOUR_WORDS[obj.colour]
    shapes = SHAPE_WORDS.get(obj.shape) or CONCEPT_SHAPE_WORDS[obj.shape]
    words += [_pick(rng, colours), _pick(rng, shapes)]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


_PREPOSITIONS: dict[str, tuple[str, ...]] = {
    "corner": ("in the", "at the"),
    "edge": ("on the", "at the"),
    "centre": ("in the", "at the"),
}


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    kind = "centre" if position == "centre" else ("corner" if " " in position else "edge")
    return f"{_pick(rng, _PREPOSITIONS[kind])} {_pick(rng, POSITION_WORDS[position])}"


def caption(
    scene: Scene,
    rng: np.random.Generator,
    *,
    p_size: float = 0.7,
    p_position: float = 0.8,
    p_background: float = 0.3,
) -> str:
    """A random caption that is true of ``scene``: colour and shape always, size and background with
    the given probabilities. One object: its position with ``p_position``. Two objects: the relation,
    the positions, both, the relation from the second object's side, or neither (which gains the
    positions with ``p_position``)."""
    with_size = [bool(rng.random() < p_size) for _ in scene.objects]
    objs = [_article(_object_phrase(o, rng, s)) for o, s in zip(scene.objects, with_size)]
    if len(scene.objects) == 1:
        o = objs[0]
        if rng.random() < p_position:
            pos = _position_phrase(scene.objects[0].position, rng)
            template = _pick(
                rng, ("{o} {p}", "{p}, {o}", "there is {o} {p}", "an image of {o} {p}", "{p} there is {o}")
            )
            text = template.format(o=o, p=pos)
        else:
            text = _pick(rng, ("{o}", "there is {o}", "an image of {o}", "a picture of {o}")).format(o=o)
    else:
        assert scene.relation is not None
        (a, b), (pa, pb) = objs, (scene.objects[0].position, scene.objects[1].position)
        rel = scene.relation
        style = _pick(rng, ("relation", "relation", "positions", "both", "swapped", "plain"))
        if style == "plain" and rng.random() < p_position:
            style = "positions"
        if style == "relation":
            text = _pick(rng, ("{a} {r} {b}", "there is {a} {r} {b}")).format(
                a=a, b=b, r=_pick(rng, RELATION_WORDS[rel])
            )
        elif style == "swapped":
            text = f"{b} {_pick(rng, RELATION_WORDS[INVERSE_RELATION[rel]])} {a}"
        elif style == "positions":
            text = f"{a} {_position_phrase(pa, rng)} and {b} {_position_phrase(pb, rng)}"
        elif style == "both":
            text = f"{a} {_position_phrase(pa, rng)}, {_pick(rng, RELATION_WORDS[rel])} {b} {_position_phrase(pb, rng)}"
        else:
            text = f"{a} and {b}"
    if rng.random() < p_background:
        bg = _pick(rng, BACKGROUND_WORDS[scene.background])
        text += _pick(rng, (" on a {g} background", " against a {g} background", ", {g} background")).format(
            g=bg
        )
    return text
