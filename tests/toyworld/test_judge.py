import hashlib
import logging
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdstudio.toyworld.concepts import CONCEPTS, SPLITS, concept_dataset
from sdstudio.toyworld.judge import (
    COLOUR_TOLERANCE,
    DetectedObject,
    Score,
    connected_components,
    detect,
    score,
)
from sdstudio.toyworld.world import (
    ALL_PALETTE,
    BACKGROUNDS,
    IMAGE_SIZE,
    PALETTE,
    ObjectSpec,
    Scene,
    render,
    sample_scene,
)

logger = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "size", "position", "relation_ok", "count_ok", "all")


def _degrade(image: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    if blur:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    if noise:
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0, 255).astype(np.uint8)
    return image


def _accuracy(n: int, seed: int, blur: float = 0.0, noise: float = 0.0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for i in range(n):
        scene = sample_scene(rng, "any", 1 + i % 2)
        result = score(_degrade(render(scene), rng, blur, noise), scene)
        for k in ATTRIBUTES:
            totals[k] += getattr(result, k)
    acc = {k: v / n for k, v in totals.items()}
    logger.info("judge accuracy (blur %s, noise %s, n %d): %s", blur, noise, n, acc)
    return acc


def test_judge_accuracy_on_rendered_images() -> None:
    # Measured: 1.0 on every attribute over 2000 scenes (1000 of one object, 1000 of two).
    acc = _accuracy(2000, seed=0)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_accuracy_with_blur_and_noise() -> None:
    # Gaussian blur sigma 1 px and noise sigma 8 (of 255). Measured: 1.0 on every attribute over
    # 2000 scenes; with blur 1.5 and noise 12, 'all' is 0.98 (small white stars fade into light
    # backgrounds).
    acc = _accuracy(600, seed=1, blur=1.0, noise=8.0)
    assert all(v >= 0.98 for v in acc.values()), acc


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_empty_background_shows_nothing(background: str) -> None:
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    assert detect(image) == ()
    noisy = _degrade(image, np.random.default_rng(0), 0.0, 12.0)
    assert detect(noisy) == ()


def test_detect_reads_a_known_scene() -> None:
    scene = Scene(
        (
            ObjectSpec("star", "orange", "large", "top left"),
            ObjectSpec("cross", "black", "small", "bottom right"),
        ),
        "beige",
        "above",
    )
    found = detect(render(scene))
    assert [(o.shape, o.colour, o.size, o.position) for o in found] == [
        ("star", "orange", "large", "top left"),
        ("cross", "black", "small", "bottom right"),
    ]
    star, cross = found
    assert isinstance(star, DetectedObject)
    # Star: 17 px wide, centred on (10.67, 10.67) (drawn to a quarter pixel); its thin tips fall
    # under half coverage, and its centroid sits a little below the box centre.
    assert star.bbox == (3, 3, 19, 19) and star.area == 119
    assert abs(star.centroid[0] - 64 / 6) < 0.15 and 0.5 < star.centroid[1] - 64 / 6 < 1.5
    assert cross.bbox == (48, 48, 59, 59)
    assert abs(cross.centroid[0] - 5 * 64 / 6) < 0.15 and abs(cross.centroid[1] - 5 * 64 / 6) < 0.15


def test_score_against_captions() -> None:
    image = render(
        Scene(
            (
                ObjectSpec("circle", "red", "small", "top left"),
                ObjectSpec("square", "blue", "large", "bottom right"),
            ),
            "teal",
            "left of",
        )
    )
    good = score(image, "a small red circle in the top left, above a big blue box in the lower right")
    assert isinstance(good, Score) and good.all
    assert [o.all for o in good.per_object] == [True, True]

    # Order of mention does not matter; the relation is checked on the objects named.
    assert score(image, "a blue square right of a red circle").all
    wrong_relation = score(image, "a blue square left of a red circle")
    assert not wrong_relation.relation_ok and wrong_relation.colour and not wrong_relation.all

    wrong_colour = score(image, "a green circle and a blue square")
    assert (wrong_colour.colour, wrong_colour.shape, wrong_colour.all) == (False, True, False)
    wrong_shape = score(image, "a red star and a blue square")
    assert (wrong_shape.colour, wrong_shape.shape) == (True, False)
    wrong_size = score(image, "a large red circle and a blue square")
    assert (wrong_size.size, wrong_size.position, wrong_size.all) == (False, True, False)
    wrong_position = score(image, "a red circle at the bottom and a blue square")
    assert (wrong_position.position, wrong_position.colour) == (False, True)

    # One object asked for, two drawn: the one is right, the count is not.
    partial = score(image, "a red circle")
    assert partial.colour and partial.shape and not partial.count_ok and not partial.all
    # Two asked for, one drawn.
    single = render(Scene((ObjectSpec("circle", "red", "small", "top left"),), "teal"))
    missing = score(single, "a red circle above a blue square")
    assert [o.found for o in missing.per_object] == [True, False]
    assert not missing.colour and not missing.relation_ok and not missing.all

    with pytest.raises(ValueError):
        score(image, "a red circle next to a dog")


def test_background_is_the_most_common_colour() -> None:
    # A white background (an object colour) hides white objects and shows the others.
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 250, dtype=np.uint8)
    obj = render(Scene((ObjectSpec("diamond", "green", "large", "centre"),), "gray"))
    region = (obj != BACKGROUNDS["gray"]).any(axis=-1)
    image[region] = obj[region]
    found = detect(image)
    assert [(o.shape, o.colour) for o in found] == [("diamond", "green")]


def test_antialiased_fringes_never_read_as_another_colour() -> None:
    # Every mix of an object colour with a background is nearer the background, the object
    # colour, or farther than the tolerance from any other palette colour.
    palette = {k: np.array(v, dtype=float) for k, v in PALETTE.items()}
    for bg in BACKGROUNDS.values():
        b = np.array(bg, dtype=float)
        for name, c in palette.items():
            for alpha in np.linspace(0.0, 1.0, 41):
                mix = alpha * c + (1 - alpha) * b
                dists = {k: np.linalg.norm(mix - v) for k, v in palette.items()}
                nearest = min(dists, key=dists.__getitem__)
                bg_dist = min(np.linalg.norm(mix - np.array(v, dtype=float)) for v in BACKGROUNDS.values())
                assert nearest == name or dists[nearest] >= COLOUR_TOLERANCE or bg_dist < dists[nearest]


def test_connected_components() -> None:
    labels = np.array(
        [
            [1, 1, 0, 2, 2],
            [0, 1, 0, 0, 2],
            [0, 0, 1, 0, 0],
            [3, 0, 0, 0, 1],
            [3, 3, 1, 1, 1],
        ]
    )
    comp = connected_components(labels)
    # The diagonal joins (1, 1)-(2, 2) (8-connectivity); the bottom-right 1s are a separate piece.
    expected = np.array(
        [
            [0, 0, -1, 3, 3],
            [-1, 0, -1, -1, 3],
            [-1, -1, 0, -1, -1],
            [15, -1, -1, -1, 19],
            [15, 15, 19, 19, 19],
        ]
    )
    np.testing.assert_array_equal(comp, expected)
    assert (connected_components(np.zeros((4, 4), dtype=np.int64)) == -1).all()


# ------------------------------------------------------------------------------------------------
# Concepts: the judge reads ring, pink and outlined, and never sees them in base scenes.

# sha256 of ``_base_detections_digest()`` (shape, colour, size, position, bbox and area of every
# detection in 300 base scenes) computed with the judge as it was before it knew the concepts.
GOLDEN_BASE_DETECTIONS_SHA256 = "f37a93f14948bbf71619eed57bf480217f58f30b7a4b4ebbd6046ed8404d3929"


def _base_detections_digest(render_fn=render) -> str:
    h = hashlib.sha256()
    rng = np.random.default_rng(3)
    for i in range(300):
        for d in detect(render_fn(sample_scene(rng, "any", 1 + i % 2))):
            h.update(f"{d.shape}|{d.colour}|{d.size}|{d.position}|{d.bbox}|{d.area}".encode())
    return h.hexdigest()


def test_judge_reads_base_scenes_as_before_the_concepts() -> None:
    assert _base_detections_digest() == GOLDEN_BASE_DETECTIONS_SHA256

    def one_ring(scene: Scene) -> np.ndarray:  # a circle drawn as a ring: the judge must see it
        objects = tuple(replace(o, shape="ring") if o.shape == "circle" else o for o in scene.objects)
        return render(replace(scene, objects=objects))

    assert _base_detections_digest(one_ring) != GOLDEN_BASE_DETECTIONS_SHA256


def _read(image: np.ndarray) -> list[tuple[str, str, str, str, str | None]]:
    return [(d.shape, d.colour, d.size, d.position, d.style) for d in detect(image)]


def _concept_scenes(n: int, seed: int, blur: float = 0.0, noise: float = 0.0):
    """(concept, scene, image): n scenes of each concept, half of each split (every colour, shape and
    position the concept combines with)."""
    rng = np.random.default_rng(seed)
    for name in CONCEPTS:
        for split in SPLITS:
            for _, _, scene in concept_dataset(name, n // 2, seed, split):
                yield name, scene, _degrade(render(scene), rng, blur, noise)


def _concept_accuracy(n: int, seed: int, blur: float = 0.0, noise: float = 0.0) -> dict[str, float]:
    right: dict[str, int] = dict.fromkeys(CONCEPTS, 0)
    for name, scene, image in _concept_scenes(n, seed, blur, noise):
        o = scene.objects[0]
        right[name] += _read(image) == [(o.shape, o.colour, o.size, o.position, o.style)]
    acc = {name: v / n for name, v in right.items()}
    logger.info("judge on concept renders (blur %s, noise %s, n %d each): %s", blur, noise, n, acc)
    return acc


def test_judge_reads_concepts_on_rendered_scenes() -> None:
    # Every attribute and the style, exactly one object: measured 1.0 for each concept over 300 scenes
    # of each (and over 200 random ones of any colour, shape, size and position).
    acc = _concept_accuracy(300, seed=0)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_reads_concepts_with_blur_and_noise() -> None:
    # Blur sigma 1 and noise sigma 8, where the base judge still reads 100 %. Measured on 200 of each
    # (seed 1): ring 0.925, pink 1.0, outlined 0.945. Small rings lose their thin body first (too few pixels
    # near the colour), small outlined stars their shape.
    acc = _concept_accuracy(200, seed=1, blur=1.0, noise=8.0)
    assert acc["pink"] >= 0.98 and acc["ring"] >= 0.85 and acc["outlined"] >= 0.85, acc


def test_no_concept_false_positives_on_base_scenes() -> None:
    """Base scenes (600, one or two objects, clean and with blur 1 / noise 8): how often the judge reads
    a ring, pink or an outline that is not there. Measured: none in 900 detections (102 circles, 115
    red objects, every object plain)."""
    rng = np.random.default_rng(5)
    seen = {"ring": 0, "pink": 0, "outlined": 0}
    circles = reds = detections = 0
    for i in range(600):
        scene = sample_scene(rng, "any", 1 + i % 2)
        image = _degrade(render(scene), rng, 1.0, 8.0) if i % 2 else render(scene)
        found = detect(image)
        detections += len(found)
        circles += sum(o.shape == "circle" for o in scene.objects)
        reds += sum(o.colour == "red" for o in scene.objects)
        seen["ring"] += sum(d.shape == "ring" for d in found)
        seen["pink"] += sum(d.colour == "pink" for d in found)
        seen["outlined"] += sum(d.style == "outlined" for d in found)
    rates = {k: v / detections for k, v in seen.items()}
    logger.info(
        "concept false positives on %d base detections (%d circles, %d red): %s",
        detections,
        circles,
        reds,
        rates,
    )
    assert circles > 80 and reds > 80
    assert all(r <= 0.005 for r in rates.values()), rates


def test_ring_is_not_a_circle_and_pink_not_red() -> None:
    for size in ("small", "large"):
        for background in BACKGROUNDS:
            for colour in ("red", "white", "black", "pink"):
                for shape in ("circle", "ring"):
                    scene = Scene((ObjectSpec(shape, colour, size, "centre"),), background)
                    assert _read(render(scene)) == [(shape, colour, size, "centre", None)], scene


def test_outline_is_read_as_a_style_not_an_object() -> None:
    outlined = Scene(
        (
            ObjectSpec("triangle", "yellow", "large", "top left", style="outlined"),
            ObjectSpec("cross", "black", "small", "bottom right"),
        ),
        "sky",
        "above",
    )
    image = render(outlined)
    # The border is black and as big as the fill; it is no object of its own, and the fill keeps its
    # colour, shape and size. A black object elsewhere stays an object.
    assert _read(image) == [
        ("triangle", "yellow", "large", "top left", "outlined"),
        ("cross", "black", "small", "bottom right", None),
    ]
    result = score(image, "a big outlined yellow triangle above a small black cross")
    assert result.all and result.style and result.count_ok
    plain_asked = score(image, "a big yellow triangle above a small black cross")
    assert plain_asked.all  # a caption that names no style does not check it
    wrong = score(render(replace(outlined, objects=(replace(outlined.objects[0], style=None), outlined.objects[1]))),
                  "an outlined yellow triangle above a black cross")  # fmt: skip
    assert not wrong.style and not wrong.all and wrong.colour and wrong.shape
    # Next to a black object without a border, a plain object is not outlined.
    beside = Scene(
        (
            ObjectSpec("square", "red", "large", "left", dx=1.0),
            ObjectSpec("square", "black", "large", "centre", dx=-1.0),
        ),
        "gray",
        "left of",
    )
    assert [d.style for d in detect(render(beside))] == [None, None]


def test_pink_mixes_never_read_as_another_colour() -> None:
    # Pink's antialiased mixes with every background, and every palette colour's mixes, stay nearer
    # their own colours, a background, or beyond the tolerance: pink is read only where it is drawn.
    palette = {k: np.array(v, dtype=float) for k, v in ALL_PALETTE.items()}
    backgrounds = [np.array(v, dtype=float) for v in BACKGROUNDS.values()]
    for b in backgrounds:
        for name, c in palette.items():
            for alpha in np.linspace(0.0, 1.0, 41):
                mix = alpha * c + (1 - alpha) * b
                dists = {k: np.linalg.norm(mix - v) for k, v in palette.items()}
                nearest = min(dists, key=dists.__getitem__)
                bg_dist = min(np.linalg.norm(mix - v) for v in backgrounds)
                if "pink" in (name, nearest):
                    assert nearest == name or dists[nearest] >= COLOUR_TOLERANCE or bg_dist < dists[nearest]
    assert min(np.linalg.norm(palette["pink"] - v) for k, v in palette.items() if k != "pink") > 100
