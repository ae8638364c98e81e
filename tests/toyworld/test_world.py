import hashlib
from dataclasses import replace

import numpy as np
import pytest

from sdstudio.toyworld import language
from sdstudio.toyworld.recipe import text_batch_scenes
from sdstudio.toyworld.world import (
    ALL_PALETTE,
    BACKGROUNDS,
    CELL,
    COLOURS,
    CONCEPT_PALETTE,
    CONCEPT_SHAPES,
    CONCEPT_VOCABULARY,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    SHAPES,
    VOCABULARY,
    Description,
    ObjectDescription,
    ObjectSpec,
    Scene,
    caption,
    coverage_mask,
    dataset,
    describe,
    is_heldout,
    object_alpha,
    parse_caption,
    relation_holds,
    render,
    sample_scene,
    swap_places,
    tokenize,
    unknown_words,
)

# sha256 over the images and captions of dataset(0, 8, "any"). A change here changes what the
# embedded model was trained on: retrain it, or keep the old world.
GOLDEN_DATASET_SHA256 = "60f0c0f7c50945fcb8a5450820e8965be64e122dfc55c7d72fd096509018605a"


def _digest(seed: int, n: int, split: str = "any") -> str:
    h = hashlib.sha256()
    for image, text, _ in dataset(seed, n, split):  # type: ignore[arg-type]
        h.update(image.tobytes())
        h.update(text.encode())
    return h.hexdigest()


def test_dataset_is_deterministic_in_seed() -> None:
    assert _digest(3, 40) == _digest(3, 40)
    assert _digest(3, 40) != _digest(4, 40)


def test_dataset_golden_digest() -> None:
    assert _digest(0, 8) == GOLDEN_DATASET_SHA256


def test_dataset_yields_images_captions_scenes() -> None:
    for image, text, scene in dataset(1, 20, "train"):
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert isinstance(text, str) and isinstance(scene, Scene)
        assert np.array_equal(render(scene), image)
    assert {len(s.objects) for _, _, s in dataset(1, 40)} == {1, 2}
    assert {len(s.objects) for _, _, s in dataset(1, 20, n_objects=2)} == {2}


def test_render_golden_pixels() -> None:
    scene = Scene((ObjectSpec("square", "red", "large", "centre"),), "gray")
    image = render(scene)
    # A 17 px square centred at (32, 32) covers pixels 24..39 fully, and half of 23 and 40.
    assert image[32, 32].tolist() == list(PALETTE["red"])
    assert image[24, 24].tolist() == list(PALETTE["red"])
    assert image[0, 0].tolist() == list(BACKGROUNDS["gray"])
    assert image[32, 21].tolist() == list(BACKGROUNDS["gray"])
    half = np.rint((np.array(PALETTE["red"]) + np.array(BACKGROUNDS["gray"])) / 2).tolist()
    assert image[32, 23].tolist() == half
    assert (image != np.array(BACKGROUNDS["gray"])).any(axis=-1).sum() == 18 * 18


def test_object_alpha_is_the_coverage_render_blends() -> None:
    square = ObjectSpec("square", "red", "large", "centre")
    alpha = object_alpha(square)
    assert alpha.shape == (IMAGE_SIZE, IMAGE_SIZE) and alpha.min() == 0 and alpha.max() == 1
    assert alpha.sum() == pytest.approx(
        17 * 17, abs=2
    )  # coverage sums to the area (antialiasing by distance: ~1 px)
    assert alpha[32, 23] == 0.5 and alpha[32, 21] == 0
    # An object at the canvas edge is clipped, not wrapped; render blends each object by its alpha.
    corner = ObjectSpec("star", "blue", "small", "top left", dx=-3.0, dy=-3.0)
    scene = Scene((corner, square), "sky")
    expected = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUNDS["sky"], dtype=np.float32)
    for obj in scene.objects:
        expected += object_alpha(obj)[..., None] * (
            np.array(PALETTE[obj.colour], dtype=np.float32) - expected
        )
    assert np.array_equal(render(scene), np.rint(expected).astype(np.uint8))
    assert object_alpha(corner)[:, 32:].sum() == 0


def test_objects_stay_in_canvas_cell_and_apart() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, "any", 2)
        for obj in scene.objects:
            cx, cy = obj.centre
            half = obj.extent / 2
            assert 0 <= cx - half and cx + half <= IMAGE_SIZE and 0 <= cy - half and cy + half <= IMAGE_SIZE
            assert POSITIONS[int(cy // CELL) * 3 + int(cx // CELL)] == obj.position
        a, b = scene.objects
        gap_x = abs(a.centre[0] - b.centre[0]) - (a.extent + b.extent) / 2
        gap_y = abs(a.centre[1] - b.centre[1]) - (a.extent + b.extent) / 2
        assert max(gap_x, gap_y) > 1.0
        assert a.colour != b.colour
        assert scene.relation is not None and relation_holds(scene.relation, a.position, b.position)


def test_jitter_gives_diversity() -> None:
    rng = np.random.default_rng(0)
    images = {render(sample_scene(rng, "any", 1)).tobytes() for _ in range(200)}
    assert len(images) == 200


def test_heldout_pairs_never_in_train() -> None:
    rng = np.random.default_rng(0)
    seen: set[tuple[str, str]] = set()
    for i in range(4000):
        scene = sample_scene(rng, "train", 1 + i % 2)
        for obj in scene.objects:
            seen.add((obj.colour, obj.shape))
    assert not seen & HELDOUT_PAIRS
    # Every other pair is reachable.
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS
    assert not any(is_heldout(o) for _, _, sc in dataset(5, 2000, "train") for o in sc.objects)


def test_heldout_split_names_a_heldout_pair_first() -> None:
    rng = np.random.default_rng(1)
    firsts = set()
    for i in range(600):
        scene = sample_scene(rng, "heldout", 1 + i % 2)
        assert is_heldout(scene.objects[0])
        firsts.add((scene.objects[0].colour, scene.objects[0].shape))
    assert firsts == set(HELDOUT_PAIRS)
    anys = {(o.colour, o.shape) for i in range(600) for o in sample_scene(rng, "any", 1).objects}
    assert anys & HELDOUT_PAIRS


def test_heldout_pairs_are_a_fixed_set() -> None:
    assert HELDOUT_PAIRS == {
        ("yellow", "circle"),
        ("purple", "square"),
        ("green", "triangle"),
        ("blue", "star"),
        ("orange", "diamond"),
        ("white", "cross"),
    }


def test_captions_parse_back_to_their_scene() -> None:
    rng = np.random.default_rng(2)
    for _, text, scene in dataset(7, 3000, "any"):
        parsed = parse_caption(text)
        assert parsed is not None, text
        assert parsed.matches(scene), (text, scene)
    # With every attribute stated, one-object captions parse to the full description exactly.
    for _ in range(300):
        scene = sample_scene(rng, "any", 1)
        text = caption(scene, rng, p_size=1.0, p_position=1.0, p_background=1.0)
        assert parse_caption(text) == describe(scene), text


def test_caption_vocabulary_is_closed() -> None:
    words: set[str] = set()
    for _, text, _ in dataset(8, 3000, "any"):
        assert unknown_words(text) == [], text
        words.update(tokenize(text))
    # Captions use (nearly) the whole vocabulary, so a text encoder sees every word in training.
    assert words <= VOCABULARY
    assert len(VOCABULARY - words) <= 2, VOCABULARY - words


def test_unknown_words() -> None:
    assert unknown_words("A red circle next to a dog, next to a DOG") == ["next", "dog"]
    assert unknown_words("a small crimson disc in the upper-left corner") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", Description((ObjectDescription("circle", "red"),))),
        (
            "a small crimson disc in the upper left corner on a teal background",
            Description((ObjectDescription("circle", "red", "small", "top left"),), background="teal"),
        ),
        (
            "there is a large blue square at the bottom",
            Description((ObjectDescription("square", "blue", "large", "bottom"),)),
        ),
        (
            "In the top-right, a tiny golden plus",
            Description((ObjectDescription("cross", "yellow", "small", "top right"),)),
        ),
        (
            "a red circle left of a blue square",
            Description(
                (ObjectDescription("circle", "red"), ObjectDescription("square", "blue")), relation="left of"
            ),
        ),
        (
            "a huge violet star at the bottom, right of an ebony rhombus in the lower left, grey background",
            Description(
                (
                    ObjectDescription("star", "purple", "large", "bottom"),
                    ObjectDescription("diamond", "black", None, "bottom left"),
                ),
                background="gray",
                relation="right of",
            ),
        ),
        (
            "a white box in the middle and a green triangle on the left side",
            Description(
                (
                    ObjectDescription("square", "white", None, "centre"),
                    ObjectDescription("triangle", "green", None, "left"),
                )
            ),
        ),
        (
            "an orange disk beneath a cobalt cross",
            Description(
                (ObjectDescription("circle", "orange"), ObjectDescription("cross", "blue")), relation="below"
            ),
        ),
    ],
)
def test_parse_caption_examples(text: str, expected: Description) -> None:
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a circle",  # no colour
        "a red",  # adjective without a noun
        "a red circle next to a blue square",  # unknown word
        "a red circle left of",  # relation without a second object
        "left of a red circle",
        "a red blue circle",
        "a red circle on a gray background on a sky background",
        "a red circle in the top left in the bottom",  # dangling position
    ],
)
def test_parse_caption_rejects(text: str) -> None:
    assert parse_caption(text) is None


def test_scene_validation() -> None:
    a = ObjectSpec("circle", "red", "small", "left")
    b = ObjectSpec("square", "blue", "small", "right")
    assert Scene((a, b), "gray", "left of").relation == "left of"
    with pytest.raises(ValueError):
        Scene((a, b), "gray", "right of")
    with pytest.raises(ValueError):
        Scene((a,), "red")  # object colours are not backgrounds
    with pytest.raises(ValueError):
        ObjectSpec("hexagon", "red", "small", "left")


def test_description_matches_either_order() -> None:
    a = ObjectSpec("circle", "red", "small", "top left")
    b = ObjectSpec("square", "blue", "large", "bottom right")
    scene = Scene((a, b), "sky", "above")
    swapped = parse_caption("a blue square to the right of a red circle")
    assert swapped is not None and swapped.matches(scene)
    assert not Description(
        (ObjectDescription("square", "blue"), ObjectDescription("circle", "red")), relation="above"
    ).matches(scene)
    assert [relation_holds(r, "top left", "centre") for r in ("left of", "right of", "above", "below")] == [
        True,
        False,
        True,
        False,
    ]
    assert [
        relation_holds(r, "bottom", "bottom right") for r in ("left of", "right of", "above", "below")
    ] == [
        True,
        False,
        False,
        False,
    ]


def test_swap_places_exchanges_the_objects_places_and_inverts_the_relation() -> None:
    from sdstudio.toyworld import judge

    rng = np.random.default_rng(4)
    for _ in range(20):
        scene = sample_scene(rng, "train", 2)
        twin = swap_places(scene)
        (a, b), (ta, tb) = scene.objects, twin.objects
        assert (ta.position, tb.position) == (b.position, a.position)
        assert (ta.shape, ta.colour, ta.size, ta.dx, ta.dy) == (a.shape, a.colour, a.size, a.dx, a.dy)
        assert relation_holds(twin.relation, ta.position, tb.position)
        assert not relation_holds(
            scene.relation, ta.position, tb.position
        )  # the caption's relation is now false
        assert judge.score(render(twin), twin).all and swap_places(twin) == scene
    with pytest.raises(ValueError, match="two-object"):
        swap_places(sample_scene(rng, "train", 1))


# ------------------------------------------------------------------------------------------------
# Concepts (ring, pink, outlined) leave the base world as it was.

# sha256 of ``_base_world_digest()`` computed with the world as it was before the concepts existed
# (commit of the shipped model): scenes (every field, floats exactly), images, captions (the dataset's
# and the eval's fully stated ones) over 360 scenes of every split and object count, and the recipe's
# contrastive text batches with their hard negatives, captions and object coverage masks.
GOLDEN_BASE_WORLD_SHA256 = "1067432accaec2f714f8f180134aa6a8d9f1af08970ae9d44d6f9b0b55709098"


def _scene_key(scene: Scene) -> bytes:
    """Every field of a base scene, floats exactly (``float.hex``); a scene's repr would change with
    every new field."""
    parts = [scene.background, str(scene.relation)]
    for o in scene.objects:
        parts += [o.shape, o.colour, o.size, o.position, *(float(v).hex() for v in (o.dx, o.dy, o.scale))]
    return "|".join(parts).encode()


def _base_world_digest(render_fn=render, caption_fn=caption) -> str:
    h = hashlib.sha256()
    for i, split in enumerate(("train", "heldout", "any")):
        for n_objects in (None, 1, 2):
            rng = np.random.default_rng([11, i, n_objects or 0])
            for _ in range(40):
                scene = sample_scene(rng, split, n_objects or int(rng.integers(1, 3)))
                h.update(_scene_key(scene))
                h.update(render_fn(scene).tobytes())
                h.update(caption_fn(scene, rng).encode())
                h.update(caption_fn(scene, rng, p_size=1.0, p_position=1.0, p_background=1.0).encode())
    rng = np.random.default_rng([5, 1])
    for scene in text_batch_scenes(rng, 64, 0.5, 0.25):
        h.update(_scene_key(scene))
        h.update(caption_fn(scene, rng).encode())
        for obj in scene.objects:
            h.update(object_alpha(obj).tobytes())
    return h.hexdigest()


def test_base_world_is_bit_identical_to_before_the_concepts() -> None:
    assert _base_world_digest() == GOLDEN_BASE_WORLD_SHA256


def test_base_world_digest_catches_a_changed_draw_or_pixel() -> None:
    # A concept implementation that took one more random draw per caption (say, for a style word on every
    # object), or drew a base colour differently, would change what the recipe trains on.
    def extra_draw(scene: Scene, rng: np.random.Generator, **kwargs: float) -> str:
        rng.random()
        return caption(scene, rng, **kwargs)

    def pinker(scene: Scene) -> np.ndarray:
        objects = tuple(replace(o, colour="pink") if o.colour == "red" else o for o in scene.objects)
        return render(replace(scene, objects=objects))

    assert _base_world_digest(caption_fn=extra_draw) != GOLDEN_BASE_WORLD_SHA256
    assert _base_world_digest(render_fn=pinker) != GOLDEN_BASE_WORLD_SHA256


def test_concepts_stay_out_of_the_base_lists_and_the_trained_vocabulary() -> None:
    assert CONCEPT_VOCABULARY == {"ring", "pink", "outlined"}
    assert not CONCEPT_VOCABULARY & (language.VOCABULARY | language.CAPTION_VOCABULARY)
    assert not set(CONCEPT_SHAPES) & set(SHAPES) and not set(CONCEPT_PALETTE) & set(PALETTE)
    assert ALL_PALETTE == PALETTE | CONCEPT_PALETTE and list(ALL_PALETTE)[: len(COLOURS)] == list(COLOURS)
    assert unknown_words("an outlined pink ring") == ["outlined", "pink", "ring"]
    # Base sampling never draws them, whatever the split.
    rng = np.random.default_rng(9)
    objects = [
        o for i in range(2000) for o in sample_scene(rng, ("train", "heldout", "any")[i % 3], 2).objects
    ]
    assert {o.shape for o in objects} == set(SHAPES) and {o.colour for o in objects} == set(COLOURS)
    assert {o.style for o in objects} == {None}


def test_concept_objects_validate_render_and_caption() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        ObjectSpec("circle", "red", "small", "left", style="dotted")
    ring = ObjectSpec("ring", "red", "large", "centre")
    image = render(Scene((ring,), "gray"))
    # Its hole shows the background; its body the colour (17 px: rims at radius 8.5 and 3.8).
    assert image[32, 32].tolist() == list(BACKGROUNDS["gray"]) and image[32, 26].tolist() == list(
        PALETTE["red"]
    )
    circle = render(Scene((replace(ring, shape="circle"),), "gray"))
    assert circle[32, 32].tolist() == list(PALETTE["red"])
    # Outlined: the object as plain, over a 2 px border in black; the border only adds pixels.
    plain = render(Scene((ObjectSpec("square", "blue", "large", "centre"),), "sky"))
    outlined = render(Scene((ObjectSpec("square", "blue", "large", "centre", style="outlined"),), "sky"))
    inside = (plain == PALETTE["blue"]).all(axis=-1)
    assert np.array_equal(outlined[inside], plain[inside])
    assert outlined[32, 22].tolist() == list(PALETTE["black"]) and plain[32, 22].tolist() == list(
        BACKGROUNDS["sky"]
    )
    assert (outlined != BACKGROUNDS["sky"]).any(axis=-1).sum() > (plain != BACKGROUNDS["sky"]).any(
        axis=-1
    ).sum()
    pink = render(Scene((ObjectSpec("star", "pink", "large", "top"),), "teal"))
    assert (pink == CONCEPT_PALETTE["pink"]).all(axis=-1).sum() > 50
    # A grown mask covers the shape's points within ``grow`` of it: a circle's radius grows by it.
    assert coverage_mask("circle", 10.0, 8.0, 8.0, 2.0).sum() == pytest.approx(np.pi * 7**2, rel=0.02)
    # Captions name the concept where the base word would be, and parse back only with concepts=True.
    rng = np.random.default_rng(0)
    for obj in (
        ring,
        ObjectSpec("star", "pink", "small", "top"),
        replace(ring, shape="diamond", style="outlined"),
    ):
        scene = Scene((obj,), "beige")
        text = caption(scene, rng, p_size=1.0, p_position=1.0, p_background=1.0)
        assert parse_caption(text, concepts=True) == describe(scene), text
        assert parse_caption(text) is None, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a small pink ring", Description((ObjectDescription("ring", "pink", "small"),))),
        (
            "a big outlined emerald rhombus at the top, left of a crimson ring",
            Description(
                (
                    ObjectDescription("diamond", "green", "large", "top", "outlined"),
                    ObjectDescription("ring", "red"),
                ),
                relation="left of",
            ),
        ),
    ],
)
def test_parse_concept_captions(text: str, expected: Description) -> None:
    assert parse_caption(text, concepts=True) == expected
    assert parse_caption(text) is None
    assert parse_caption("an outlined ring", concepts=True) is None  # a colour is still required


def test_description_checks_a_stated_style_only() -> None:
    plain = Scene((ObjectSpec("square", "red", "small", "left"),), "gray")
    outlined = Scene((ObjectSpec("square", "red", "small", "left", style="outlined"),), "gray")
    asks = Description((ObjectDescription("square", "red", style="outlined"),))
    says_nothing = Description((ObjectDescription("square", "red"),))
    assert asks.matches(outlined) and not asks.matches(plain)
    assert says_nothing.matches(plain) and says_nothing.matches(outlined)
    assert describe(outlined).objects[0].style == "outlined" and describe(plain).objects[0].style is None
