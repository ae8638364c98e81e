"""The CLI's prompt language: `sdstudio prompt` JSON, `generate --embeddings`, and warnings."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.cli import main
from sdstudio.io.infotext import parse_infotext
from sdstudio.prompt.parser import parse, to_json_dict

PROMPT = "a (red:1.2) [cat:dog:0.5] AND a hat :0.5 <lora:detail:0.7>"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["checkpoint", "random", "--arch", "tiny", "--seed", "3", "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def sensitive_ckpt(tmp_path_factory):
    """A tiny checkpoint whose UNet depends on the text (the random preset zero-inits cross-attention)."""
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model
    from tests.reference import randomise_

    model = random_model(PRESETS["tiny"])
    randomise_(model, seed=5)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "sensitive.safetensors", dtype=torch.float32)


@pytest.fixture()
def embeddings_dir(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3}, folder / "zqxstyle.safetensors")
    return folder


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sdstudio: error: "), err
    return err[0]


def test_prompt_prints_exactly_to_json_dict(capsys):
    assert run_json(capsys, ["prompt", PROMPT, "--steps", "10"]) == to_json_dict(parse(PROMPT, 10))
    out = run_json(capsys, ["prompt", PROMPT, "--steps", "10", "--hires-steps", "6"])
    parsed = parse(PROMPT, 10, 6)
    assert out == {**to_json_dict(parsed), "hires": to_json_dict(parsed.hires)}


def test_prompt_with_model_adds_chunk_token_counts_and_warnings(capsys, tiny_ckpt, embeddings_dir):
    prompt = PROMPT + " BREAK zqxstyle " + "x " * 80
    out = run_json(capsys, ["prompt", prompt, "--steps", "10", "--model", str(tiny_ckpt), "--embeddings", str(embeddings_dir)])
    expected = to_json_dict(parse(prompt, 10))
    counts = [[entry.pop("chunk_token_counts") for entry in sub["schedule"]] for sub in out["subprompts"]]
    assert out.pop("warnings") == []  # the LoRA tag is listed in extra_networks; generate applies it
    assert out == expected  # only keys added
    # "a red cat" | "a red dog" (3 tokens); " a hat :0.5 " (no longer a weight: text follows it, so
    # 6 tokens) BREAK, the 2-vector embedding and 80 x's: 6 | 75 | 7
    assert counts == [[[3], [3]], [[6, 75, 7]]]


def test_prompt_errors(capsys, tmp_path):
    assert "--steps must be at least 1" in run_error(capsys, ["prompt", "x", "--steps", "0"])
    assert "--embeddings needs --model" in run_error(capsys, ["prompt", "x", "--embeddings", str(tmp_path)])


def generate(tmp_path, ckpt, prompt, name, *extra):
    out = tmp_path / f"{name}.png"
    argv = ["generate", prompt, "--model", str(ckpt), "--steps", "3", "--seed", "5", "--sampler", "Euler",
            "-o", str(out), "-q", *extra]
    return main(argv), out


def test_generate_uses_embeddings_and_warns_about_a_missing_lora(tmp_path, sensitive_ckpt, embeddings_dir, caplog):
    code, plain = generate(tmp_path, sensitive_ckpt, "a zqxstyle cat", "plain", "--negative", "[ugly:blurry:2]")
    assert code == 0
    with caplog.at_level(logging.WARNING, logger="sdstudio"):
        code, styled = generate(tmp_path, sensitive_ckpt, "a zqxstyle cat AND a hat :0.5 <lora:detail:0.7>", "styled",
                                "--embeddings", str(embeddings_dir), "--negative", "[ugly:blurry:2]")
    assert code == 0
    assert [r.getMessage() for r in caplog.records if r.name == "sdstudio"] == [
        "LoRA 'detail' not found: no LoRA folder given (--lora-dir DIR)"
    ]
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, styled))
    assert np.abs(a - b).max() > 2  # the embedding changed the picture
    prompt, negative, _ = parse_infotext(Image.open(styled).info["parameters"])
    assert (prompt, negative) == ("a zqxstyle cat AND a hat :0.5 <lora:detail:0.7>", "[ugly:blurry:2]")


def test_generate_with_a_bad_embedding_fails_unless_skipped(tmp_path, tiny_ckpt, embeddings_dir, capsys, caplog):
    save_file({"emb_params": torch.zeros(1, 768)}, embeddings_dir / "wide.safetensors")
    out = tmp_path / "o.png"
    line = run_error(capsys, ["generate", "wide cat", "--model", str(tiny_ckpt), "--steps", "2", "-o", str(out), "-q",
                              "--embeddings", str(embeddings_dir)])
    assert "wide.safetensors: embedding vectors are 768 wide" in line and "expects 32" in line
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="sdstudio"):
        code, out = generate(tmp_path, tiny_ckpt, "wide cat", "skipped", "--embeddings", str(embeddings_dir),
                             "--skip-bad-embeddings")
    assert code == 0 and out.exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "sdstudio"]
    assert any("wide.safetensors" in m for m in messages)
    assert "embedding 'wide' was skipped (bad file), so the prompt uses it as plain text" in messages
