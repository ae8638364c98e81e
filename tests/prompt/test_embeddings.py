"""Textual inversion embeddings: the three file formats, splicing by name, and clear errors."""

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import PRESETS
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import (
    encode_chunks,
    encode_conditioning,
    prompt_warnings,
    tokenize_attention,
)
from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embedding, load_embeddings
from sdstudio.prompt.parser import parse, parse_prompt_attention
from tests.reference import randomise_

CONFIG = PRESETS["tiny"]
WIDTH = CONFIG.text.width


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def model():
    m = random_model(CONFIG)
    randomise_(m, seed=12)
    return m


def save_a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500}, path)


def save_a1111_safetensors(path, vectors):
    save_file({"emb_params": vectors}, path)


def save_diffusers(path, vectors):
    save_file({f"<{path.stem}>": vectors[0]}, path)  # one vector, stored as [width]


FORMATS = {
    "a1111.pt": (save_a1111_pt, ".pt", 2),
    "a1111.safetensors": (save_a1111_safetensors, ".safetensors", 3),
    "diffusers": (save_diffusers, ".safetensors", 1),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_replaces_its_name_and_changes_only_positions_from_it_on(tmp_path, model, tokenizer, fmt):
    save, suffix, n = FORMATS[fmt]
    vectors = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(1))
    save(tmp_path / f"zqxstyle{suffix}", vectors)
    db = load_embeddings(tmp_path, WIDTH, tokenizer)
    assert list(db.embeddings) == ["zqxstyle"]
    torch.testing.assert_close(db.embeddings["zqxstyle"].vectors, vectors[:1] if fmt == "diffusers" else vectors)

    prompt = "a photo of zqxstyle on a table"
    runs = parse_prompt_attention(prompt)
    chunk = tokenize_attention(runs, tokenizer, CONFIG.text, db)[0]
    before = tokenizer.encode("a photo of")
    assert chunk.tokens[1:4] == tuple(before) and chunk.fixes == ((4, db.embeddings["zqxstyle"]),)
    assert chunk.tokens[4 : 4 + n] == (0,) * n and chunk.tokens[4 + n : 7 + n] == tuple(tokenizer.encode("on a table"))
    assert chunk.length == 3 + n + 3

    with torch.inference_mode():
        cond = encode_conditioning(
            model.text_encoder, tokenizer, CONFIG.text, parse(prompt, 10), parse("", 10, composable=False), 1, db
        ).tensors[0]
        # the same ids with the placeholders' own (token 0) embeddings, and the splice done by hand
        unfixed = encode_chunks(model.text_encoder, [dataclasses.replace(chunk, fixes=())], 1)[0]
        ids = torch.tensor([chunk.tokens])
        embeds = model.text_encoder.token_embedding(ids).clone()
        embeds[0, 4 : 4 + n] = db.embeddings["zqxstyle"].vectors
        by_hand = model.text_encoder(ids, 1, token_embeds=embeds)[0]
    torch.testing.assert_close(cond, by_hand, rtol=0, atol=0)
    # causal attention: positions before the embedding are untouched, its own positions change
    assert torch.equal(cond[:4], unfixed[:4])
    assert (cond[4 : 4 + n] - unfixed[4 : 4 + n]).abs().amax(dim=-1).min() > 1e-3


def test_multi_token_names_match_longest_first_inside_weighted_fragments(tmp_path, tokenizer):
    save_a1111_safetensors(tmp_path / "neg-style.safetensors", torch.ones(2, WIDTH))
    save_a1111_safetensors(tmp_path / "neg.safetensors", torch.ones(1, WIDTH))
    db = load_embeddings(tmp_path, WIDTH, tokenizer)
    chunk = tokenize_attention(parse_prompt_attention("x (neg-style:1.2) neg"), tokenizer, CONFIG.text, db)[0]
    assert [(offset, e.name) for offset, e in chunk.fixes] == [(2, "neg-style"), (4, "neg")]
    assert chunk.multipliers[1:6] == (1.0, 1.2, 1.2, 1.0, 1.0) and chunk.length == 4


def test_wrong_width_and_corrupt_files_name_the_file(tmp_path, tokenizer):
    wide = tmp_path / "wide.safetensors"
    save_a1111_safetensors(wide, torch.zeros(1, 768))
    with pytest.raises(SdStudioError, match=r"wide\.safetensors: embedding vectors are 768 wide, .*expects 32"):
        load_embedding(wide, WIDTH)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(SdStudioError, match=r"garbage\.pt: "):
        load_embedding(garbage, WIDTH)
    broken = tmp_path / "broken.safetensors"
    broken.write_text("nope")
    with pytest.raises(SdStudioError, match=r"broken\.safetensors: not a valid \.safetensors"):
        load_embedding(broken, WIDTH)
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": pickle.PickleError("x")}}, evil)
    with pytest.raises(SdStudioError, match=r"evil\.pt: refusing to load.*needs code.*\(pickle\.PickleError\)"):
        load_embedding(evil, WIDTH)
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, two)
    with pytest.raises(SdStudioError, match=r"two\.safetensors: not an embedding"):
        load_embedding(two, WIDTH)


def test_a_bad_file_fails_the_folder_unless_skipped(tmp_path, tokenizer):
    save_a1111_pt(tmp_path / "good.pt", torch.ones(1, WIDTH))
    save_a1111_safetensors(tmp_path / "wide.safetensors", torch.zeros(1, 768))
    with pytest.raises(SdStudioError, match=r"wide\.safetensors.*expects 32"):
        load_embeddings(tmp_path, WIDTH, tokenizer)
    db = load_embeddings(tmp_path, WIDTH, tokenizer, skip_bad=True)
    assert list(db.embeddings) == ["good"] and list(db.skipped) == ["wide"]
    assert len(db.warnings) == 1 and "wide.safetensors" in db.warnings[0]
    warnings = prompt_warnings(parse("good, wide, <lora:detail:0.7> <foo:x>", 10), db)
    assert warnings == [
        "<lora:detail:0.7> ignored: LoRA tags are applied by sdstudio.engine.Pipeline (or pass the networks to generate())",
        "unknown extra network kind 'foo': <foo:x> ignored",
        "embedding 'wide' was skipped (bad file), so the prompt uses it as plain text",
    ]
    applied = prompt_warnings(parse("good, wide, <lora:detail:0.7> <foo:x>", 10), db, networks_applied=True)
    assert applied == warnings[1:]
    with pytest.raises(SdStudioError, match="does not exist"):
        load_embeddings(tmp_path / "nope", WIDTH, tokenizer)


def test_database_build_ignores_duplicate_names(tokenizer):
    from sdstudio.prompt.embeddings import Embedding

    a, b = Embedding("same", torch.zeros(1, WIDTH)), Embedding("same", torch.ones(1, WIDTH))
    db = EmbeddingDatabase.build([a, b], tokenizer)
    assert db.embeddings["same"] is a and "same name" in db.warnings[0]
