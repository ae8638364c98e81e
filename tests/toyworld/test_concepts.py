"""The toyworld's fine-tuning concepts (ring, pink, outlined): their datasets as users keep them, their
seen / unseen eval prompts, and ``evaluate_concept`` through the real pipeline with a LoRA."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.toyworld.concepts import (
    CONCEPTS,
    SPLITS,
    base_dataset,
    concept_dataset,
    concept_prompts,
    get_concept,
    known_concepts,
    write_concept_dataset,
)
from sdstudio.toyworld.evaluate import (
    CONCEPT_ATTRIBUTES,
    ConceptEvalSettings,
    concept_adherence,
    concept_leak,
    evaluate_concept,
    format_concept_table,
    prompt_sets,
)
from sdstudio.toyworld.judge import score
from sdstudio.toyworld.world import COLOURS, POSITIONS, SHAPES, parse_caption, render
from sdstudio.types import NetworkSpec

# ------------------------------------------------------------------------------------------------
# Definitions.


def test_concepts_hold_out_what_their_datasets_never_show() -> None:
    assert list(CONCEPTS) == ["ring", "pink", "outlined"]
    for c in CONCEPTS.values():
        assert c.word == c.name
        assert set(c.positions) | set(c.unseen_positions) == set(POSITIONS)
        assert not set(c.positions) & set(c.unseen_positions)
        # The concept's own attribute is the same in both splits; every other is held out.
        own = {"shape": (c.shapes, c.unseen_shapes), "colour": (c.colours, c.unseen_colours)}.get(c.kind)
        if own is not None:
            assert own[0] == own[1] == (c.name,)
        for seen, unseen in ((c.colours, c.unseen_colours), (c.shapes, c.unseen_shapes)):
            if seen != (c.name,):
                assert not set(seen) & set(unseen) and len(seen) >= 3 and len(unseen) >= 3
    assert "black" not in CONCEPTS["outlined"].colours + CONCEPTS["outlined"].unseen_colours
    assert set(CONCEPTS["ring"].colours + CONCEPTS["ring"].unseen_colours) == set(COLOURS)
    assert set(CONCEPTS["pink"].shapes + CONCEPTS["pink"].unseen_shapes) == set(SHAPES)
    assert len(known_concepts().splitlines()) == 3 and "unseen prompts" in known_concepts()


def test_unknown_concept_names_the_known_ones(tmp_path) -> None:
    with pytest.raises(SdStudioError, match=r"unknown concept 'heart'; known concepts: ring, pink, outlined"):
        get_concept("heart")
    with pytest.raises(SdStudioError, match="known concepts"):
        write_concept_dataset("heart", 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SdStudioError, match="unknown split 'train'"):
        concept_prompts("ring", "train", 2)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Datasets.


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_dataset_folder_as_users_keep_it(tmp_path) -> None:
    out = write_concept_dataset("outlined", 12, tmp_path / "outlined", seed=3)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:04d}.png" for i in range(12)] + [f"{i:04d}.txt" for i in range(12)])
    for i, (image, text, scene) in enumerate(concept_dataset("outlined", 12, seed=3)):
        png = Image.open(out / f"{i:04d}.png")
        assert png.mode == "RGB" and png.size == (64, 64)
        assert np.array_equal(np.asarray(png), image) and np.array_equal(image, render(scene))
        caption = (out / f"{i:04d}.txt").read_text()
        assert caption == text + "\n" and "outlined" in caption.split()
        # The caption is true of the image, read back by the judge.
        assert score(image, text).all, text
    # Deterministic in the seed.
    again = write_concept_dataset("outlined", 12, tmp_path / "again", seed=3)
    assert _files(again) == _files(out)
    assert _files(write_concept_dataset("outlined", 12, tmp_path / "other", seed=4)) != _files(out)


def test_dataset_uses_only_the_seen_combinations() -> None:
    for name, c in CONCEPTS.items():
        scenes = [scene for _, _, scene in concept_dataset(name, 300)]
        objects = [s.objects[0] for s in scenes]
        assert all(len(s.objects) == 1 and c.shown_by(o) for s, o in zip(scenes, objects))
        assert {o.colour for o in objects} == set(c.colours)
        assert {o.shape for o in objects} == set(c.shapes)
        assert {o.position for o in objects} == set(c.positions)
        assert {o.size for o in objects} == {"small", "large"} and len({s.background for s in scenes}) == 4


def test_base_dataset_is_the_base_world_for_regularisation(tmp_path) -> None:
    """``--concept base``: scenes of the world the embedded model learnt, captioned truly, none of them a
    held-out pair or a concept: regularisation images (kohya's --reg_data_dir) for prior preservation."""
    from sdstudio.toyworld.world import is_heldout

    out = write_concept_dataset("base", 40, tmp_path / "reg", seed=2)
    samples = list(base_dataset(40, seed=2))
    counts = {1: 0, 2: 0}
    for i, (image, text, scene) in enumerate(samples):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:04d}.png")), image)
        assert (out / f"{i:04d}.txt").read_text() == text + "\n" and score(image, text).all, text
        assert scene.objects[0].style is None and not is_heldout(scene.objects[0])
        assert all(o.shape != "ring" and o.colour != "pink" for o in scene.objects)
        counts[len(scene.objects)] += 1
    assert min(counts.values()) >= 10  # one and two objects
    assert [t for _, t, _ in base_dataset(5, seed=3)] != [t for _, t, _ in samples[:5]]


def test_dataset_refuses_a_non_empty_folder_unless_overwrite(tmp_path) -> None:
    out = tmp_path / "pink"
    write_concept_dataset("pink", 5, out)
    with pytest.raises(SdStudioError, match=r"pink: not empty \(10 entries\); pass --overwrite"):
        write_concept_dataset("pink", 3, out)
    (out / "notes.md").write_text("mine")
    # Overwrite replaces the numbered pairs (no stale 0003 / 0004 left) and leaves other files.
    write_concept_dataset("pink", 3, out, seed=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt", "notes.md",
    ]  # fmt: skip
    assert (out / "0000.txt").read_text() == next(concept_dataset("pink", 1, seed=1))[1] + "\n"
    with pytest.raises(SdStudioError, match="at least 1"):
        write_concept_dataset("pink", 0, tmp_path / "none")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SdStudioError, match="is a file"):
        write_concept_dataset("pink", 1, tmp_path / "file")


# ------------------------------------------------------------------------------------------------
# Eval prompts.


def test_concept_prompts_are_deterministic_and_prefix_stable() -> None:
    a = concept_prompts("ring", "unseen", 10, seed=2)
    assert [(p.text, p.seed) for p in a] == [
        (p.text, p.seed) for p in concept_prompts("ring", "unseen", 10, 2)
    ]
    assert [p.text for p in concept_prompts("ring", "unseen", 4, 2)] == [p.text for p in a[:4]]
    assert [p.text for p in concept_prompts("ring", "unseen", 10, 3)] != [p.text for p in a]
    assert [p.text for p in concept_prompts("ring", "seen", 10, 2)] != [p.text for p in a]
    # Prompts are not the dataset's scenes.
    dataset_texts = {text for _, text, _ in concept_dataset("ring", 200, seed=2)}
    assert not {p.text for p in concept_prompts("ring", "seen", 50, 2)} <= dataset_texts


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_concept_prompts_hold_what_they_claim(name: str) -> None:
    c = get_concept(name)
    for split in SPLITS:
        prompts = concept_prompts(name, split, 60, seed=0)
        colours, shapes, positions = c.choices(split)
        for p in prompts:
            (want,) = p.description.objects
            assert c.shown_by(want) and c.shown_by(p.scene.objects[0]), p.text
            assert want.colour in colours and want.shape in shapes and want.position in positions, p.text
            assert want.size is not None and parse_caption(p.text, concepts=True) == p.description
            words = re.split(r"[\s,]+", p.text_with("<sks>"))
            assert words.count("<sks>") == 1 and name not in words, p.text
        # A perfect generator (the renderer) gets every attribute; the same scenes without the concept
        # get no concept and keep the rest: the measure can fail, and fails on the concept alone.
        scores = [score(render(p.scene), p.description) for p in prompts]
        assert concept_adherence(scores, c) == dict.fromkeys(CONCEPT_ATTRIBUTES, 1.0)
        plain = {"shape": {"shape": "circle"}, "colour": {"colour": "red"}, "style": {"style": None}}[c.kind]
        without = [replace(p.scene, objects=(replace(p.scene.objects[0], **plain),)) for p in prompts]
        row = concept_adherence([score(render(s), p.description) for s, p in zip(without, prompts)], c)
        assert row["concept"] == row["all"] == 0.0 and row["rest"] == 1.0, row
        assert concept_leak(scores, c) == 1.0
    base = [score(render(p.scene), p.description) for ps in prompt_sets(0, 20).values() for p in ps]
    assert concept_leak(base, c) == 0.0


# ------------------------------------------------------------------------------------------------
# evaluate_concept through the real pipeline (a tiny random model: values are meaningless, requests and
# structure are not).


class RecordingPipeline(Pipeline):
    """The pipeline, keeping each request and its first image."""

    def __call__(self, request, callback=None, **kwargs):  # type: ignore[override]
        result = super().__call__(request, callback, **kwargs)
        self.calls.append((request, np.asarray(result.images[0].image)))
        return result


@pytest.fixture(scope="module")
def tiny_with_lora(tmp_path_factory):
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model
    from tests.adapters.loras import lora_targets, random_kohya
    from tests.reference import randomise_

    pytest.importorskip("diffusers")  # lora_targets names the modules with diffusers' converters
    model = random_model(PRESETS["tiny"])
    randomise_(model, seed=5)
    root = tmp_path_factory.mktemp("concept_eval")
    ckpt = save_model(model, root / "tiny.safetensors", dtype=torch.float32)
    loras = root / "loras"
    loras.mkdir()
    targets = lora_targets(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    save_file(random_kohya(targets, seed=1, alpha=8.0), str(loras / "pink_lora.safetensors"))
    return ckpt, loras


def test_evaluate_concept_sends_the_methods_networks_and_words(tiny_with_lora) -> None:
    ckpt, loras = tiny_with_lora
    settings = replace(ConceptEvalSettings.quick(), ceiling=True)
    pipe = RecordingPipeline.from_file(ckpt, lora_dirs=[loras])
    pipe.calls = []
    done: list[int] = []
    plain = evaluate_concept(pipe, "pink", settings, method="none", progress=lambda d, t: done.append(d))
    n_plain = len(pipe.calls)
    lora = NetworkSpec("pink_lora", 1.0)
    results = evaluate_concept(pipe, "pink", settings, networks=(lora,), concept_word="sks", method="lora")
    json.dumps(results, allow_nan=False)

    per_split = settings.prompts_per_split * settings.images_per_prompt
    assert results["images"] == plain["images"] == settings.images == n_plain == 2 * 2 + 3 == done[-1]
    assert [(r["split"], r["n"]) for r in results["concept_rows"]] == [
        ("seen", per_split),
        ("unseen", per_split),
    ]
    assert [(r["split"], r["n"]) for r in results["ceiling"]] == [("seen", 2), ("unseen", 2)]
    assert [(r["set"], r["n"]) for r in results["base_rows"]] == [("seen", 1), ("heldout", 1), ("two", 1)]
    for r in results["concept_rows"] + results["ceiling"]:
        assert all(0.0 <= r[a] <= 1.0 for a in CONCEPT_ATTRIBUTES)
        assert r["all"] <= min(r["concept"], r["rest"])
    assert 0.0 <= results["leak"] <= 1.0
    assert results["networks"] == ["<lora:pink_lora:1>"] and results["concept_word"] == "sks"

    # Every request of the method carries its network; concept prompts name the concept by its token.
    requests = [r for r, _ in pipe.calls[n_plain:]]
    assert all(r.networks == (lora,) for r in requests) and all(
        not r.networks for r, _ in pipe.calls[:n_plain]
    )
    concept_texts = [p["prompt"] for split in SPLITS for p in results["prompts"][split]]
    assert [r.prompt for r in requests[:4]] == concept_texts
    assert all({"sks"} <= set(re.split(r"[\s,]+", t)) and "pink" not in t for t in concept_texts)
    assert [r.prompt for r in requests[4:]] == [p.text for ps in prompt_sets(0, 1).values() for p in ps]
    assert {(r.sampler, r.cfg_scale, r.steps, r.width, r.height) for r in requests} == {
        ("Euler a", 7.0, 4, 64, 64)
    }
    # The LoRA changes what is drawn for the same prompt and seed (base prompts are the same text).
    assert not np.array_equal(pipe.calls[4][1], pipe.calls[n_plain + 4][1])
    assert pipe.calls[4][0].prompt == pipe.calls[n_plain + 4][0].prompt

    table = format_concept_table(results)
    assert "concept 'pink' [lora]" in table and "<lora:pink_lora:1>" in table and "what it forgot" in table


def test_evaluate_concept_loads_a_path_with_network_folders_and_prompt_tags(tiny_with_lora) -> None:
    ckpt, loras = tiny_with_lora
    settings = ConceptEvalSettings(steps=2, prompts_per_split=1, images_per_prompt=1, base_prompts_per_set=0,
                                   ceiling=False)  # fmt: skip
    results = evaluate_concept(
        ckpt, "ring", settings, lora_dirs=[loras], prompt_suffix=" <lora:pink_lora:0.5>"
    )
    assert results["model"] == str(ckpt) and results["ceiling"] is None
    assert results["base_rows"] == [] and results["leak"] is None and results["images"] == 2
    assert all(p["prompt"].endswith(" <lora:pink_lora:0.5>") for s in SPLITS for p in results["prompts"][s])
    with pytest.raises(SdStudioError, match="for a model path"):
        evaluate_concept(Pipeline.from_file(ckpt), "ring", settings, lora_dirs=[loras])
