"""LoRAs through the engine and the command: tags in prompts, --lora-dir, the infotext's Lora hashes,
--from-png replays, --strict-networks; a request without LoRAs after one with them gives the loaded
model's image and weights, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.adapters import short_hash
from sdstudio.cli import main
from sdstudio.engine import Pipeline
from sdstudio.io.infotext import parse_infotext
from sdstudio.types import GenerationRequest, NetworkSpec

pytest.importorskip("diffusers")  # lora_targets names the modules with diffusers' converters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint whose UNet depends on the text, and a folder with a LoRA for it."""
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model
    from tests.adapters.loras import lora_targets, random_kohya
    from tests.reference import randomise_

    model = random_model(PRESETS["tiny"])
    randomise_(model, seed=5)
    root = tmp_path_factory.mktemp("networks")
    ckpt = save_model(model, root / "sensitive.safetensors", dtype=torch.float32)
    loras = root / "loras" / "styles"
    loras.mkdir(parents=True)
    targets = lora_targets(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    save_file(random_kohya(targets, seed=1, alpha=8.0), str(loras / "style.safetensors"),
              metadata={"ss_output_name": "my_style"})  # fmt: skip
    return ckpt, root / "loras"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def run(tmp_path, ckpt, name, *argv):
    out = tmp_path / f"{name}.png"
    code = main(["generate", "--model", str(ckpt), "--steps", "3", "--seed", "5", "--sampler", "Euler",
                 "-o", str(out), "-q", *argv])  # fmt: skip
    return code, out


def test_lora_tag_changes_the_image_and_replays_from_png(tmp_path, files, capsys):
    ckpt, loras = files
    assert run(tmp_path, ckpt, "plain", "a red cat")[0] == 0
    code, styled = run(tmp_path, ckpt, "styled", "a red cat <lora:my_style:1:1.5>", "--lora-dir", str(loras))
    assert code == 0
    assert np.abs(pixels(tmp_path / "plain.png") - pixels(styled)).max() > 10
    prompt, _, params = parse_infotext(Image.open(styled).info["parameters"])
    assert prompt == "a red cat <lora:my_style:1:1.5>"
    from tests.adapters.test_activate import load_metadata

    digest = short_hash(
        loras / "styles" / "style.safetensors", load_metadata(loras / "styles" / "style.safetensors")
    )
    assert params["Lora hashes"] == f"my_style: {digest}"
    assert f'Lora hashes: "my_style: {digest}"' in Image.open(styled).info["parameters"]  # quoted as A1111

    capsys.readouterr()
    code, replay = run(tmp_path, ckpt, "replay", "--from-png", str(styled), "--lora-dir", str(loras))
    assert code == 0 and np.array_equal(pixels(replay), pixels(styled))

    capsys.readouterr()
    code, missing = run(tmp_path, ckpt, "missing", "--from-png", str(styled))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not missing.exists()
    assert "was made with LoRA 'my_style'" in err[0] and "--lora-dir" in err[0]


def test_strict_networks_and_bad_folders(tmp_path, files, capsys):
    ckpt, loras = files
    code, out = run(
        tmp_path, ckpt, "strict", "a cat <lora:my_stile:1>", "--lora-dir", str(loras), "--strict-networks"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and len(err) == 1
    assert "LoRA 'my_stile' not found in" in err[0] and "closest names: my_style" in err[0]

    code, out = run(tmp_path, ckpt, "lenient", "a cat <lora:my_stile:1>", "--lora-dir", str(loras))
    assert code == 0 and out.exists()
    assert "Lora hashes" not in Image.open(out).info["parameters"]

    code, out = run(tmp_path, ckpt, "nofolder", "a cat", "--lora-dir", str(tmp_path / "nope"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and "nope: folder does not exist" in err[-1]
    code, out = run(tmp_path, ckpt, "badtag", "a cat <lora:my_style:strong>", "--lora-dir", str(loras))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and "multiplier 'strong' is not a number" in err[-1]


def test_pipeline_switches_loras_without_reloading_and_restores_exactly(tmp_path, files):
    ckpt, loras = files
    pipeline = Pipeline.from_file(ckpt, lora_dirs=[loras])
    params = pipeline.model.model.state_dict()
    before = {k: v.clone() for k, v in params.items()}
    request = GenerationRequest("a red cat", sampler="Euler", steps=3, seed=5)
    plain = pipeline(request).images[0]
    lora = pipeline(GenerationRequest("a red cat <lora:style:0.8>", sampler="Euler", steps=3, seed=5)).images[
        0
    ]
    as_data = pipeline(
        GenerationRequest(
            "a red cat", sampler="Euler", steps=3, seed=5, networks=(NetworkSpec("style", 0.8),)
        )
    ).images[0]
    again = pipeline(request).images[0]
    assert np.array_equal(np.asarray(plain.image), np.asarray(again.image))
    assert all(torch.equal(v, before[k]) for k, v in pipeline.model.model.state_dict().items())
    assert np.array_equal(np.asarray(lora.image), np.asarray(as_data.image))
    assert not np.array_equal(np.asarray(lora.image), np.asarray(plain.image))
    # the request's networks are written as tags into the infotext's prompt: the PNG replays them
    assert parse_infotext(as_data.infotext)[0] == "a red cat <lora:style:0.8>"
    assert "Lora hashes" not in plain.infotext and "Lora hashes: " in as_data.infotext


def test_ti_hashes_in_the_infotext(tmp_path, files):
    from sdstudio.models.loading import file_sha256
    from tests.prompt.test_embeddings import save_a1111_pt

    ckpt, _ = files
    folder = tmp_path / "emb"
    folder.mkdir()
    save_a1111_pt(folder / "zqx.pt", torch.ones(2, 32))
    shutil.copy(folder / "zqx.pt", folder / "other.pt")
    pipeline = Pipeline.from_file(ckpt, embeddings_dir=folder)
    result = pipeline(GenerationRequest("a zqx cat", "blurry", sampler="Euler", steps=2, seed=1))
    params = parse_infotext(result.images[0].infotext)[2]
    assert params["TI hashes"] == f"zqx: {file_sha256(folder / 'zqx.pt')[:12]}"
    plain = pipeline(GenerationRequest("a cat", sampler="Euler", steps=2, seed=1))
    assert "TI hashes" not in plain.images[0].infotext


def test_hypernetwork_tag_changes_the_image_and_replays(tmp_path, files, capsys):
    from tests.adapters.test_hypernetwork import a1111_file

    ckpt, _ = files
    folder = tmp_path / "hypernetworks" / "sub"
    folder.mkdir(parents=True)
    fields = {
        "layer_structure": [1, 2, 1],
        "activation_func": "relu",
        "activate_output": False,
        "name": "grain",
    }
    a1111_file(folder / "grain.pt", (32, 64), fields, dropout=[0, 0, 0], seed=3)
    a1111_file(folder / "wide.pt", (768, 320), fields, dropout=[0, 0, 0], seed=3)  # an sd15 one
    hyper = ["--hypernetwork-dir", str(tmp_path / "hypernetworks")]
    assert run(tmp_path, ckpt, "plain", "a red cat")[0] == 0
    code, out = run(tmp_path, ckpt, "hyper", "a red cat <hypernet:grain:0.7>", *hyper)
    assert code == 0
    assert np.abs(pixels(tmp_path / "plain.png") - pixels(out)).max() > 10
    text = Image.open(out).info["parameters"]
    params = parse_infotext(text)[2]
    assert (
        params["Hypernet"] == "grain"
        and params["Hypernet strength"] == "0.7"
        and len(params["Hypernet hash"]) == 10
    )
    code, zero = run(tmp_path, ckpt, "zero", "a red cat <hypernet:grain:0>", *hyper)
    assert code == 0 and np.array_equal(pixels(zero), pixels(tmp_path / "plain.png"))  # costs nothing

    capsys.readouterr()
    code, replay = run(tmp_path, ckpt, "replay", "--from-png", str(out), *hyper)
    assert code == 0 and np.array_equal(pixels(replay), pixels(out))
    code, _ = run(tmp_path, ckpt, "noreplay", "--from-png", str(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "was made with hypernetwork 'grain'" in err[-1] and "--hypernetwork-dir" in err[-1]

    code, out = run(tmp_path, ckpt, "wide", "a red cat <hypernet:wide:1>", *hyper, "--strict-networks")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "wide.pt: its widths [320, 768] meet no attention layer" in err[-1]


def test_vae_file_is_used_recorded_and_needed_for_replay(tmp_path, files, capsys):
    from sdstudio.models.loading import file_sha256, load_model

    ckpt, _ = files
    vae = load_model(ckpt).model.vae
    with torch.no_grad():
        for p in vae.decoder.conv_out.parameters():
            p.mul_(-1)  # another VAE: the colours turn
    vae_path = tmp_path / "negative.vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_path))
    assert run(tmp_path, ckpt, "plain", "a red cat")[0] == 0
    code, out = run(tmp_path, ckpt, "vae", "a red cat", "--vae", str(vae_path))
    assert code == 0 and np.abs(pixels(tmp_path / "plain.png") - pixels(out)).max() > 50
    params = parse_infotext(Image.open(out).info["parameters"])[2]
    assert params["VAE"] == "negative.vae.safetensors" and params["VAE hash"] == file_sha256(vae_path)[:10]
    capsys.readouterr()
    code, replay = run(tmp_path, ckpt, "replay", "--from-png", str(out), "--vae", str(vae_path))
    assert code == 0 and np.array_equal(pixels(replay), pixels(out))
    code, _ = run(tmp_path, ckpt, "noreplay", "--from-png", str(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "negative.vae.safetensors" in err[-1] and "--vae FILE" in err[-1]


def test_lora_bake_command_generates_as_the_tag_does(tmp_path, files, capsys):
    ckpt, loras = files
    baked = tmp_path / "baked.safetensors"
    lora = loras / "styles" / "style.safetensors"
    assert main(["lora", "bake", str(ckpt), f"{lora}:0.8:1.2", "-o", str(baked)]) == 0
    fp32 = ("--precision", "fp32")
    assert (
        run(tmp_path, ckpt, "tag", "a red cat <lora:style:0.8:1.2>", "--lora-dir", str(loras), *fp32)[0] == 0
    )
    assert run(tmp_path, baked, "baked", "a red cat", *fp32)[0] == 0
    assert run(tmp_path, ckpt, "plain", "a red cat", *fp32)[0] == 0
    tag, bake, plain = (pixels(tmp_path / f"{n}.png") for n in ("tag", "baked", "plain"))
    assert np.abs(tag - bake).max() <= 1 and np.abs(tag - plain).max() > 10
    capsys.readouterr()
    assert main(["lora", "bake", str(ckpt), str(lora), "-o", str(baked)]) == 2  # exists: --overwrite
    assert "already exists" in capsys.readouterr().err
