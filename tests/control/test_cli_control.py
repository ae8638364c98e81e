"""``sdstudio generate --control MODEL:IMAGE[:WEIGHT[:START:END]]`` and its options, and their errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.cli import main
from sdstudio.io.infotext import parse_infotext
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import save_model
from sdstudio.models.stablediffusion import random_model
from tests.reference import random_controlnet, randomise_
from tests.test_cli import run_error


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    # a VAE of four levels: ControlNets read their image at 8x the latents' size
    config = dataclasses.replace(PRESETS["tiny"], vae=dataclasses.replace(PRESETS["tiny"].vae, ch_mult=(1, 1, 2, 2)))
    model = random_model(config)
    randomise_(model, seed=1)
    save_model(model, folder / "base.safetensors", dtype=torch.float32)
    nets = folder / "nets"
    nets.mkdir()
    state = random_controlnet(config.unet, seed=2).state_dict()
    save_file({"control_model." + k: v.contiguous() for k, v in state.items()}, str(nets / "edges.safetensors"))
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:40, 8:30] = (200, 60, 60)
    Image.fromarray(picture).save(folder / "photo.png")
    return folder


def _run(files, out, *extra):
    argv = ["generate", "a red square", "--model", str(files / "base.safetensors"), "--steps", "3", "--seed", "5",
            "--controlnet-dir", str(files / "nets"), "-o", str(out), "-q", *extra]  # fmt: skip
    assert main(argv) == 0
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")), parse_infotext(im.info["parameters"])[2]


def test_control_changes_the_image_and_is_written_down(tmp_path, files):
    plain, params = _run(files, tmp_path / "plain.png")
    assert not any(k.startswith("ControlNet") for k in params)
    image = f"{files / 'photo.png'}"
    controlled, params = _run(
        files, tmp_path / "c.png", "--control", f"edges:{image}:0.8:0:0.9", "--control-preprocess", "canny",
        "--control-threshold-a", "50", "--control-threshold-b", "150", "--control-mode", "My prompt is more important",
    )  # fmt: skip
    assert np.abs(controlled.astype(int) - plain).mean() > 1
    entry = params["ControlNet 0"]
    for part in ("Module: canny", "Model: edges [", "Weight: 0.8", "Threshold A: 50", "Threshold B: 150",
                 "Guidance End: 0.9", "Control Mode: My prompt is more important"):  # fmt: skip
        assert part in entry, entry
    # two units: the same network twice at half weight each is one unit at full weight (residuals add up)
    half, _ = _run(files, tmp_path / "half.png", "--control", f"edges:{image}:0.5", "--control", f"edges:{image}:0.5")
    full, _ = _run(files, tmp_path / "full.png", "--control", f"edges:{image}:1")
    assert np.abs(half.astype(int) - full).max() <= 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-preprocess", "canny"], "--control-preprocess needs a ControlNet"),
        (["--control", "edges"], "no control image, and no init image"),
        (["--control", "edges:{photo}:x"], "must be numbers"),
        (["--control", "edges:{photo}:1:0"], "expected MODEL:IMAGE"),
        (["--control", "edges:{photo}:1:0.8:0.2"], "guidance start 0.8 is after its end 0.2"),
        (["--control", "edges:{photo}:3"], "weight"),
        (["--control", "edges:{photo}", "--control-preprocess", "cany"], "unknown ControlNet preprocessor 'cany'"),
        (["--control", "nosuch:{photo}"], "nosuch"),
        (["--control", "edges:missing.png"], "missing.png"),
        (["--control", "edges:{photo}", "--control", "edges:{photo}", "--control-mode", "Balanced",
          "--control-mode", "Balanced", "--control-mode", "Balanced"], "once for every --control"),
    ],
)
def test_bad_control_options(tmp_path, files, capsys, extra, message):
    extra = [e.format(photo=files / "photo.png") for e in extra]
    out = tmp_path / "x.png"
    argv = ["generate", "x", "--model", str(files / "base.safetensors"), "--steps", "2",
            "--controlnet-dir", str(files / "nets"), "-o", str(out), *extra]  # fmt: skip
    assert message in run_error(capsys, argv)
    assert not out.exists()
