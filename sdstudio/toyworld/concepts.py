"""Concepts the embedded model never saw, for measuring fine-tuning: what each method learns and forgets.

Three concepts, each outside the base world's lists and words (``world.py``: ``CONCEPT_SHAPES``,
``CONCEPT_PALETTE``, ``STYLES``) and read by the judge:

- ``ring``, a shape: an annulus (``world.RING_INNER``), which the judge tells from a circle by its hole;
- ``pink``, a colour: (255, 105, 180), classified like the palette colours;
- ``outlined``, a style: the object over a 2 px dark border (``world.OUTLINE_WIDTH``); its own colour
  and shape are read as usual.

A concept's fine-tuning folder (``write_concept_dataset``) shows it with a subset of what it can combine
with (the "seen" split): some colours, some shapes, the corners and the centre. Its eval prompts
(``concept_prompts``) come in two splits: ``seen`` draws again from that subset (new jitter, sizes,
backgrounds), ``unseen`` from what the folder never shows: the held-out colours and shapes, at the
four edge positions. A method that learned the concept, not its examples, draws it there too.

============  ==============================  ==================================================
concept       seen (the dataset)              unseen (eval only)
============  ==============================  ==================================================
ring          red, blue, yellow, white        green, purple, orange, black
pink          circle, square, star            triangle, diamond, cross
outlined      red, blue, yellow, white;       green, purple, orange;
              circle, square, triangle        star, diamond, cross
all           corners and centre              top, left, right, bottom
============  ==============================  ==================================================

Black objects are never outlined: their border would be their own colour. Sizes and backgrounds are
drawn from all of them in both splits. Scenes have one object, captions are the world's own
(``world.caption``) with the concept's word where a base word would be ("a small outlined red square
in the upper left corner").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write
from sdstudio.toyworld.world import (
    BACKGROUNDS,
    CONCEPT_COLOUR_WORDS,
    CONCEPT_SHAPE_WORDS,
    MAX_OFFSET,
    MAX_SCALE_JITTER,
    SIZES,
    STYLE_WORDS,
    Description,
    ObjectDescription,
    ObjectSpec,
    Scene,
    caption,
    parse_caption,
    render,
)
from sdstudio.toyworld.world import dataset as world_dataset

log = logging.getLogger(__name__)

ConceptKind = Literal["shape", "colour", "style"]
ConceptSplit = Literal["seen", "unseen"]
SPLITS: tuple[ConceptSplit, ...] = ("seen", "unseen")

SEEN_POSITIONS: tuple[str, ...] = ("top left", "top right", "centre", "bottom left", "bottom right")
UNSEEN_POSITIONS: tuple[str, ...] = ("top", "left", "right", "bottom")

# Random streams [seed, concept index, stream]: datasets 10 + the split's index, prompts 1 + it.
_DATASET_STREAM = 10
_PROMPT_STREAM = 1

# Names the dataset writer makes, and replaces with ``overwrite``.
_ITEM = re.compile(r"^\d{4,}\.(png|txt)$")


@dataclass(frozen=True)
class Concept:
    """A concept and the attributes it is combined with: ``colours`` / ``shapes`` / ``positions`` in its
    dataset (the seen split), ``unseen_*`` only in the unseen eval prompts."""

    name: str
    kind: ConceptKind
    summary: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    unseen_colours: tuple[str, ...]
    unseen_shapes: tuple[str, ...]
    positions: tuple[str, ...] = SEEN_POSITIONS
    unseen_positions: tuple[str, ...] = UNSEEN_POSITIONS

    @property
    def word(self) -> str:
        """The word captions use for it."""
        table = {"shape": CONCEPT_SHAPE_WORDS, "colour": CONCEPT_COLOUR_WORDS, "style": STYLE_WORDS}[
            self.kind
        ]
        return table[self.name][0]

    @property
    def style(self) -> str | None:
        return self.name if self.kind == "style" else None

    def choices(self, split: ConceptSplit) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(colours, shapes, positions) a scene of ``split`` draws from."""
        if split == "seen":
            return self.colours, self.shapes, self.positions
        if split == "unseen":
            return self.unseen_colours, self.unseen_shapes, self.unseen_positions
        raise SdStudioError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    def shown_by(self, obj: ObjectSpec | ObjectDescription | object) -> bool:
        """Whether an object (a scene's, a description's or the judge's ``DetectedObject``) shows it."""
        return getattr(obj, self.kind) == self.name

    def describe(self) -> str:
        """One line for people: what it is, and what its dataset and its unseen prompts combine it with."""
        seen = [", ".join(v) for v in (self.colours, self.shapes) if len(v) > 1]
        unseen = [", ".join(v) for v in (self.unseen_colours, self.unseen_shapes) if len(v) > 1]
        return (
            f"{self.name} ({self.kind}: {self.summary}): dataset {'; '.join(seen)} in the corners and centre; "
            f"unseen prompts {'; '.join(unseen)} at the edges"
        )


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept(
            "ring", "shape", "an annulus, a disc with a hole",
            colours=("red", "blue", "yellow", "white"), shapes=("ring",),
            unseen_colours=("green", "purple", "orange", "black"), unseen_shapes=("ring",),
        ),
        Concept(
            "pink", "colour", "hot pink, (255, 105, 180)",
            colours=("pink",), shapes=("circle", "square", "star"),
            unseen_colours=("pink",), unseen_shapes=("triangle", "diamond", "cross"),
        ),
        Concept(
            "outlined", "style", "a thick dark border around the object",
            colours=("red", "blue", "yellow", "white"), shapes=("circle", "square", "triangle"),
            unseen_colours=("green", "purple", "orange"), unseen_shapes=("star", "diamond", "cross"),
        ),
    )
}  # fmt: skip


def get_concept(name: str) -> Concept:
    """The concept called ``name``; ``SdStudioError`` naming the known ones otherwise."""
    try:
        return CONCEPTS[name]
    except KeyError:
        raise SdStudioError(f"unknown concept {name!r}; known concepts: {', '.join(CONCEPTS)}") from None


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_concept_scene(concept: Concept, rng: np.random.Generator, split: ConceptSplit = "seen") -> Scene:
    """One object showing ``concept``, its other attributes drawn from ``split``, jittered like the base
    world's objects (``world.MAX_OFFSET``, ``world.MAX_SCALE_JITTER``), on any background."""
    colours, shapes, positions = concept.choices(split)
    colour, shape, position, size = (
        _pick(rng, colours),
        _pick(rng, shapes),
        _pick(rng, positions),
        _pick(rng, SIZES),
    )
    m = MAX_OFFSET[size]
    dx, dy = (float(v) for v in rng.uniform(-m, m, size=2))
    scale = float(rng.uniform(1 - MAX_SCALE_JITTER, 1 + MAX_SCALE_JITTER))
    obj = ObjectSpec(shape, colour, size, position, dx, dy, scale, concept.style)
    return Scene((obj,), _pick(rng, tuple(BACKGROUNDS)))


def concept_dataset(
    concept: str, n: int, seed: int = 0, split: ConceptSplit = "seen"
) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` (image uint8 [64, 64, 3], caption, scene) triples showing ``concept``, the same for the same
    arguments; the captions are the world's (size, position and background as often as in its data)."""
    c = get_concept(concept)
    c.choices(split)  # refuses an unknown split
    rng = np.random.default_rng([seed, list(CONCEPTS).index(c.name), _DATASET_STREAM + SPLITS.index(split)])
    for _ in range(n):
        scene = sample_concept_scene(c, rng, split)
        yield render(scene), caption(scene, rng), scene


BASE = "base"  # write_concept_dataset's name for the base world's own scenes


def base_dataset(n: int, seed: int = 0) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` scenes of the world the embedded model learnt (one or two objects, no held-out colour-shape
    pair, no concept) with the world's captions: regularisation images for prior preservation, as kohya
    users keep real photos of the class. Its own random stream, apart from the recipe's data."""
    return world_dataset([seed, len(CONCEPTS), _DATASET_STREAM], n, "train")


def write_concept_dataset(concept: str, n: int, out: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a fine-tuning folder as a user keeps one (kohya / AUTOMATIC1111): ``out/0000.png`` with its
    caption in ``out/0000.txt``, ... ``n`` pairs of the seen split (``concept`` ``"base"``: of the base
    world, ``base_dataset``). Refuses a folder that holds anything unless ``overwrite``, which replaces the
    numbered pairs found there (other files are left, and named in a warning). Returns ``out``."""
    samples = base_dataset(n, seed) if concept == BASE else concept_dataset(concept, n, seed)
    what = "base-world scenes" if concept == BASE else get_concept(concept).describe()
    out = Path(out)
    existing = claim_dataset_folder(out, n, overwrite)
    for path in existing:
        if path.is_file() and _ITEM.match(path.name):
            path.unlink()
    others = [p.name for p in existing if not _ITEM.match(p.name)]
    if others:
        log.warning("%s: left in place, not part of the dataset written: %s", out, ", ".join(others[:10]))
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(n - 1)))
    for i, (image, text, _) in enumerate(samples):
        stem = f"{i:0{width}d}"
        atomic_write(
            out / f"{stem}.png", lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG")
        )
        atomic_write(out / f"{stem}.txt", lambda tmp, text=text: tmp.write_text(text + "\n"))
    log.info("%s: %d images of %s (seed %d)", out, n, what, seed)
    return out


def claim_dataset_folder(out: Path, n: int, overwrite: bool) -> list[Path]:
    """Checks before writing ``n`` samples to the folder ``out``: ``n`` >= 1, ``out`` not a file, empty unless
    ``overwrite``. Returns what ``out`` holds now (sorted), for the caller to replace its own files."""
    if n < 1:
        raise SdStudioError(f"--n must be at least 1, got {n}")
    if out.exists() and not out.is_dir():
        raise SdStudioError(f"{out}: is a file; give a folder for the dataset")
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise SdStudioError(
            f"{out}: not empty ({len(existing)} entries); pass --overwrite or give an empty folder"
        )
    return existing


@dataclass(frozen=True)
class ConceptPrompt:
    """One eval prompt: its text, what the judge checks (the text parsed back), the scene it was captioned
    from, and the first seed of its batch."""

    concept: str
    split: ConceptSplit
    text: str
    description: Description
    scene: Scene
    seed: int

    def text_with(self, word: str) -> str:
        """The prompt with the concept's word replaced by ``word``: a textual inversion embedding's or a
        DreamBooth token's name."""
        return re.sub(rf"\b{re.escape(get_concept(self.concept).word)}\b", word, self.text)


def concept_prompts(concept: str, split: ConceptSplit, n: int, seed: int = 0) -> tuple[ConceptPrompt, ...]:
    """``n`` prompts combining ``concept`` with ``split``'s colours, shapes and positions, each stating
    size and position; a pure function of its arguments (each split has its own random stream, so the
    first ``k`` prompts of ``n`` are those of ``k``)."""
    c = get_concept(concept)
    c.choices(split)  # refuses an unknown split
    rng = np.random.default_rng([seed, list(CONCEPTS).index(c.name), _PROMPT_STREAM + SPLITS.index(split)])
    prompts = []
    for _ in range(n):
        scene = sample_concept_scene(c, rng, split)
        text = caption(scene, rng, p_size=1.0, p_position=1.0)
        description = parse_caption(text, concepts=True)
        if description is None or not description.matches(scene):
            raise AssertionError(f"a concept caption does not parse back to its scene: {text!r}")
        prompts.append(ConceptPrompt(c.name, split, text, description, scene, int(rng.integers(0, 2**31))))
    return tuple(prompts)


def known_concepts() -> str:
    """The concepts, one line each (for ``--help``)."""
    return "\n".join(c.describe() for c in CONCEPTS.values())
