"""What a model was trained on, in its header (``ModelConfig.trained_on``), and the warnings for requests
outside it: the shipped toy model's words and size, A1111 syntax, the negative prompt, the hires fix."""

import dataclasses
import hashlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdstudio.errors import CheckpointError, SdStudioError
from sdstudio.models.configs import METADATA_KEY, PRESETS, ModelConfig, TrainedOn, same_architecture
from sdstudio.models.loading import load_model, save_model
from sdstudio.models.stablediffusion import random_model
from sdstudio.prompt.parser import parse
from sdstudio.prompt.vocabulary import prompt_words, trained_on_warnings, untrained_words
from sdstudio.toyworld import language
from sdstudio.toyworld.evaluate import SHIPPED_MODEL
from sdstudio.toyworld.recipe import TRAINED_ON, ToyRecipe, stamp_trained_on
from sdstudio.toyworld.world import caption, parse_caption, sample_scene

# sha256 over every tensor of the shipped model (sorted names; name|dtype|shape| then the raw bytes), as
# it was before its header gained ``trained_on`` (file sha256 cc4fd7cb23...). Only the header may change
# here; a retrained model changes this on purpose.
SHIPPED_TENSORS_SHA256 = "d6e2b2979cade9a8fcd9d0c244073ae13a67a76f074489a42ffde8406f6abada"
# The tensors other than the VAE decoder's: unchanged since the model first shipped (473b04ce... over all
# tensors then); the recipe's decoder stage (2026-12-06) retrained the decoder alone.
SHIPPED_NON_DECODER_SHA256 = "d4fe406bbe43397c0d49af98969611c60c0bfd281e9ce0efbac7ca2186fe81ee"
DECODER = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")

HELP = "(see `sdstudio generate --help` for its words)"


def header(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def tensors_sha256(path, skip: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    with safe_open(str(path), framework="np") as f:
        for name in sorted(f.keys()):
            if skip and name.startswith(skip):
                continue
            array = f.get_tensor(name)
            digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def shipped() -> ModelConfig:
    with safe_open(str(SHIPPED_MODEL), framework="pt") as f:
        return ModelConfig.from_json(f.metadata()[METADATA_KEY])


@pytest.fixture(scope="module")
def tiny_model():
    return random_model(PRESETS["tiny"], seed=3)


# --- the header ------------------------------------------------------------------------------------


def test_trained_on_round_trips_through_json_and_a_file(tmp_path, tiny_model):
    trained = TrainedOn(vocabulary=("a", "red", "circle"), sizes=((64, 64), (96, 64)))
    config = dataclasses.replace(PRESETS["tiny"], trained_on=trained)
    assert json.loads(config.to_json())["trained_on"] == {
        "vocabulary": ["a", "red", "circle"],
        "sizes": [[64, 64], [96, 64]],
    }
    assert ModelConfig.from_json(config.to_json()) == config
    tiny_model.config = config
    try:
        loaded = load_model(save_model(tiny_model, tmp_path / "m.safetensors", dtype=torch.float32))
    finally:
        tiny_model.config = PRESETS["tiny"]
    assert loaded.config.trained_on == trained and loaded.config.trained_on.sizes[1] == (96, 64)


def test_a_header_without_trained_on_loads_with_nothing_stated(tmp_path, tiny_model):
    stored = json.loads(tiny_model.config.to_json())
    del stored["trained_on"]
    path = save_model(tiny_model, tmp_path / "old.safetensors", metadata={METADATA_KEY: json.dumps(stored)})
    loaded = load_model(path)
    assert loaded.config.trained_on == TrainedOn() and loaded.config == PRESETS["tiny"]


def test_same_architecture_ignores_trained_on():
    stated = dataclasses.replace(PRESETS["toyworld"], trained_on=TRAINED_ON)
    assert stated != PRESETS["toyworld"] and same_architecture(stated, PRESETS["toyworld"])


@pytest.mark.parametrize(
    "trained_on, message",
    [
        ('{"sizes": [[64]]}', r"trained_on.sizes: \(64,\) is not \[width, height\]"),
        ('{"sizes": [[0, 64]]}', r"trained_on.sizes: \(0, 64\)"),
        ('{"sizes": [[64.0, 64]]}', r"trained_on.sizes: \(64.0, 64\)"),
        ('{"sizes": [64, 64]}', r"trained_on.sizes: 64 is not"),
        ('{"vocabulary": ["Red"]}', r"trained_on.vocabulary: 'Red' is not one lower-case word"),
        ('{"vocabulary": ["top left"]}', r"trained_on.vocabulary: 'top left' is not one lower-case word"),
        ('{"vocabulary": "red"}', r"trained_on.vocabulary must be a list of words"),
        ('{"words": ["red"]}', r"unknown TrainedOn fields: \['words'\]"),
        ("5", r"TrainedOn must be a JSON object"),
    ],
)
def test_bad_trained_on_in_a_header_is_named(tmp_path, tiny_model, trained_on, message):
    stored = json.loads(tiny_model.config.to_json())
    stored["trained_on"] = json.loads(trained_on)
    path = save_model(tiny_model, tmp_path / "m.safetensors", metadata={METADATA_KEY: json.dumps(stored)})
    with pytest.raises(CheckpointError, match=f"unreadable 'sdstudio.config'.*{message}"):
        load_model(path)


# --- the recipe and the shipped model --------------------------------------------------------------


def test_the_recipe_states_the_caption_words_and_the_world_size():
    assert TRAINED_ON.sizes == ((64, 64),)
    assert TRAINED_ON.vocabulary == tuple(sorted(language.CAPTION_VOCABULARY))
    assert len(TRAINED_ON.vocabulary) == 72 and "with" not in TRAINED_ON.vocabulary
    assert ToyRecipe().config.trained_on == TRAINED_ON == ToyRecipe.smoke().config.trained_on
    assert same_architecture(ToyRecipe().config, PRESETS["toyworld"])


def test_caption_vocabulary_is_exactly_the_words_captions_use():
    rng = np.random.default_rng(5)
    words: set[str] = set()
    for i in range(3000):
        scene = sample_scene(rng, "any", 1 + i % 2)
        words.update(language.tokenize(caption(scene, rng)))
    assert words == language.CAPTION_VOCABULARY


def test_the_shipped_model_states_what_it_was_trained_on_with_its_weights_unchanged(shipped):
    assert shipped.trained_on == TRAINED_ON
    assert tensors_sha256(SHIPPED_MODEL) == SHIPPED_TENSORS_SHA256
    assert tensors_sha256(SHIPPED_MODEL, skip=DECODER) == SHIPPED_NON_DECODER_SHA256
    assert shipped.sampling == PRESETS["toyworld"].sampling and shipped.default_size == 64


def test_stamping_a_file_changes_only_its_header(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors", metadata={"note": "kept"})
    before, data = header(path)
    tensors = tensors_sha256(path)
    stamp_trained_on(path)
    after, data_after = header(path)
    assert data_after == data and tensors_sha256(path) == tensors
    assert {k: v for k, v in after.items() if k != "__metadata__"} == {
        k: v for k, v in before.items() if k != "__metadata__"
    }
    assert after["__metadata__"]["note"] == "kept"
    stamped = ModelConfig.from_json(after["__metadata__"][METADATA_KEY])
    assert stamped == dataclasses.replace(PRESETS["tiny"], trained_on=TRAINED_ON)
    first = path.read_bytes()
    stamp_trained_on(path)
    assert path.read_bytes() == first
    loaded = load_model(path)
    assert loaded.config.trained_on == TRAINED_ON
    reference = tiny_model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], reference[k].half().float()) for k in reference)


def test_stamping_refuses_a_file_without_our_config(tmp_path):
    path = tmp_path / "bare.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SdStudioError, match="no readable 'sdstudio.config'"):
        stamp_trained_on(path)
    assert path.read_bytes() == b"\x02\x00\x00\x00\x00\x00\x00\x00{}"


# --- the words for --help ---------------------------------------------------------------------------


def test_word_groups_list_every_caption_word_and_no_other():
    groups = language.word_groups()
    assert list(groups) == ["colours", "shapes", "sizes", "positions", "relations", "backgrounds", "other"]
    assert groups["sizes"] == ("small", "little", "tiny", "large", "big", "huge")
    assert groups["positions"][:9] == (
        "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
    )  # fmt: skip
    assert sorted(groups["positions"][9:]) == ["center", "corner", "lower", "middle", "side", "upper"]
    assert groups["relations"][:2] == ("left of", "to the left of")
    assert groups["other"] == (
        "a", "against", "an", "and", "at", "background", "image", "in", "is", "of", "on", "picture", "the", "there",
    )  # fmt: skip
    words = {w for phrases in groups.values() for phrase in phrases for w in phrase.split()}
    assert words == language.CAPTION_VOCABULARY
    lines = language.describe_words().splitlines()
    assert len(lines) == 7 and lines[2] == "sizes: small, little, tiny, large, big, huge"


def test_example_prompts_are_sentences_of_the_language(shipped):
    for text in language.EXAMPLE_PROMPTS:
        assert parse_caption(text) is not None, text
        assert warnings(shipped, text) == [], text


def test_listing_the_words_imports_neither_numpy_nor_torch():
    code = (
        "import sys; from sdstudio.toyworld.language import describe_words; describe_words(); "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the warnings -----------------------------------------------------------------------------------


def warnings(
    config: ModelConfig,
    prompt: str,
    negative: str = "",
    size: tuple[int, int] = (64, 64),
    hires_size: tuple[int, int] | None = None,
    steps: int = 20,
    hires_steps: int | None = None,
    embedding_names: tuple[str, ...] = (),
) -> list[str]:
    return trained_on_warnings(
        config,
        parse(prompt, steps, hires_steps),
        parse(negative, steps, hires_steps, composable=False),
        size,
        hires_size,
        embedding_names,
    )


def test_unknown_words_are_listed_once_in_order(shipped):
    assert warnings(shipped, "a pink hexagon") == [
        f"the model was trained on a fixed vocabulary; unknown words: pink, hexagon {HELP}"
    ]
    assert warnings(shipped, "a photo of a cat") == [
        f"the model was trained on a fixed vocabulary; unknown words: photo, cat {HELP}"
    ]
    assert warnings(shipped, "a Cat, a CAT and a dog next to a cat") == [
        f"the model was trained on a fixed vocabulary; unknown words: cat, dog, next {HELP}"
    ]


def test_a_prompt_of_the_toy_world_gets_no_warning(shipped):
    assert warnings(shipped, "a small crimson disc in the upper left corner on a teal background") == []
    # Case, punctuation and hyphens are not words.
    assert warnings(shipped, "A Red CIRCLE, in the top-left corner!!! (teal background.)") == []


def test_prompt_syntax_is_not_words(shipped):
    prompt = "(red:1.2) ((circle)) [blue] AND [green:yellow:5] star BREAK [white|black] cross <lora:toy:0.8> :1.1"
    assert warnings(shipped, prompt) == []
    assert warnings(shipped, r"\(red\) circle [top:bottom:0.5] \[left\]") == []
    weighted = "(a pink:1.3) [circle:hexagon:5] AND [orange|magenta] star BREAK (cat)"
    assert warnings(shipped, weighted) == [
        f"the model was trained on a fixed vocabulary; unknown words: pink, hexagon, magenta, cat {HELP}"
    ]


def test_scheduled_words_count_only_when_some_step_uses_them(shipped):
    # [from:to:when]: "pink" takes over after step 25, which a 20-step request never reaches...
    assert warnings(shipped, "a [red:pink:25] circle") == []
    assert warnings(shipped, "a [pink:red:0] circle") == []
    # ... but its hires-fix pass does (integer steps count on from the first pass).
    assert warnings(shipped, "a [red:pink:25] circle", hires_steps=10) == [
        f"the model was trained on a fixed vocabulary; unknown words: pink {HELP}"
    ]


def test_the_negative_prompt_gets_its_own_warning(shipped):
    assert warnings(shipped, "a red circle", "lowres, bad anatomy, (blurry:1.2), red") == [
        "the model was trained on a fixed vocabulary; unknown words in the negative prompt: "
        + f"lowres, bad, anatomy, blurry {HELP}"
    ]
    # A negative prompt is not composable (A1111): its "AND" is the word "and", which the model knows.
    assert warnings(shipped, "a red circle", "blue AND green") == []
    assert warnings(shipped, "a cat", "a dog") == [
        f"the model was trained on a fixed vocabulary; unknown words: cat {HELP}",
        f"the model was trained on a fixed vocabulary; unknown words in the negative prompt: dog {HELP}",
    ]


def test_words_are_letters_and_digits_of_any_script(shipped):
    assert warnings(shipped, "a red circle, 4k, café, 8_bit") == [
        f"the model was trained on a fixed vocabulary; unknown words: 4k, café, 8, bit {HELP}"
    ]


def test_loaded_embedding_names_are_not_unknown_words(shipped):
    assert warnings(shipped, "a red circle, ToyStyle, toy-style-2", embedding_names=("toystyle", "toy-style-2")) == []
    assert warnings(shipped, "a red circle, toystyles", embedding_names=("", "toystyle")) == [
        f"the model was trained on a fixed vocabulary; unknown words: toystyles {HELP}"
    ]


def test_sizes_outside_training_are_warned_per_pass(shipped):
    assert warnings(shipped, "a red circle", size=(128, 128)) == [
        "the model was trained at 64x64 only; at 128x128 it may repeat or break objects"
    ]
    assert warnings(shipped, "a red circle", size=(64, 96)) == [
        "the model was trained at 64x64 only; at 64x96 it may repeat or break objects"
    ]
    # The hires fix at 2x (its default upscale) from 64x64.
    assert warnings(shipped, "a red circle", hires_size=(128, 128), hires_steps=10) == [
        "the model was trained at 64x64 only; the hires fix pass at 128x128 may repeat or break objects"
    ]
    assert warnings(shipped, "a pink circle", size=(96, 96), hires_size=(192, 192)) == [
        f"the model was trained on a fixed vocabulary; unknown words: pink {HELP}",
        "the model was trained at 64x64 only; at 96x96 it may repeat or break objects",
        "the model was trained at 64x64 only; the hires fix pass at 192x192 may repeat or break objects",
    ]
    assert warnings(shipped, "a red circle", hires_size=(64, 64)) == []


def test_a_model_that_states_nothing_gets_no_warnings():
    assert warnings(PRESETS["sd15"], "a photo of a cat", "lowres", size=(1024, 1024), hires_size=(2048, 2048)) == []
    words_only = dataclasses.replace(PRESETS["toyworld"], trained_on=TrainedOn(vocabulary=("a", "cat")))
    assert warnings(words_only, "a cat", size=(512, 512)) == []
    two_sizes = dataclasses.replace(PRESETS["toyworld"], trained_on=TrainedOn(sizes=((64, 64), (96, 64))))
    assert warnings(two_sizes, "a dog", size=(96, 64), hires_size=(192, 128)) == [
        "the model was trained at 64x64, 96x64 only; the hires fix pass at 192x128 may repeat or break objects"
    ]


def test_prompt_words_and_untrained_words(shipped):
    parsed = parse("(Red:1.2) circle BREAK [pink|red] hexagon AND red <lora:x:1>", 20)
    assert prompt_words(parsed) == ["red", "circle", "pink", "hexagon"]
    assert untrained_words(shipped.trained_on, parsed) == ["pink", "hexagon"]
    assert untrained_words(TrainedOn(), parsed) == []
    # Words that only exist once an alternation is resolved come after the written ones.
    glued = parse("a red x[pink|blue]y, circle, a cat", 20)
    assert untrained_words(shipped.trained_on, glued) == ["cat", "xpinky", "xbluey"]
