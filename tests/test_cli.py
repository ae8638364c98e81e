"""The CLI contract: images with infotext, and one clear error line (exit 2, no output) on bad input."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.cli import main
from sdstudio.io.infotext import parse_infotext


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["checkpoint", "random", "--arch", "tiny", "--seed", "3", "-o", str(path)]) == 0
    return path


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdstudio: error: "), err
    return err[0]


def test_generate_writes_png_with_a1111_infotext(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--negative", "dog", "--model", str(tiny_ckpt), "--steps", "3",
            "--seed", "42", "--sampler", "Euler", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)
        prompt, negative, params = parse_infotext(im.info["parameters"])
    assert (prompt, negative) == ("a cat", "dog")
    assert params["Steps"] == "3" and params["Sampler"] == "Euler" and params["Seed"] == "42"
    assert params["CFG scale"] == "7" and params["Size"] == "64x64" and params["Model"] == "tiny"
    assert len(params["Model hash"]) == 10
    # the same seed gives the same image; existing files are not overwritten
    code = main(argv)
    assert code == 2 and "already exists" in capsys.readouterr().err
    again = tmp_path / "again.png"
    assert main(argv[:-3] + ["-o", str(again), "--quiet"]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


def test_batch_seeds_and_outdir(tmp_path, tiny_ckpt):
    argv = ["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--seed", "7", "--batch", "2",
            "--outdir", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-7.png", "00001-8.png"]
    # image 1 of the batch equals generating seed 8 alone
    single = tmp_path / "single" / "s.png"
    assert main(["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--seed", "8", "-o", str(single), "-q"]) == 0
    a = np.asarray(Image.open(tmp_path / "00001-8.png"), dtype=np.int16)
    b = np.asarray(Image.open(single), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # batched and single convolutions may round differently


def test_checkpoint_info_json(tiny_ckpt, capsys):
    assert main(["checkpoint", "info", str(tiny_ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "tiny" and info["ema"] is False and info["dtypes"] == ["float16"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "60"], "width 60 is not a positive multiple of 8"),
        (["--height", "0"], "height 0 is not a positive multiple of 8"),
        (["--steps", "0"], "steps must be a whole number between 1 and 1000"),
        (["--sampler", "Nope"], "unknown sampler 'Nope'.*Euler a"),
        (["--clip-skip", "9"], "clip skip must be between 1 and 2"),
        (["--device", "tpu"], "unknown device 'tpu'; choose auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_options(tmp_path, tiny_ckpt, capsys, extra, message):
    import re

    out = tmp_path / "o.png"
    line = run_error(capsys, ["generate", "x", "--model", str(tiny_ckpt), "-o", str(out), "-q", *extra])
    assert re.search(message, line), line
    assert not out.exists()


def test_bad_model_files(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert "no such file" in run_error(capsys, ["generate", "x", "--model", str(tmp_path / "nope.ckpt"), "-o", str(out)])
    text = tmp_path / "readme.safetensors"
    text.write_text("not weights")
    assert "not a valid .safetensors" in run_error(capsys, ["generate", "x", "--model", str(text), "-o", str(out)])
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": pickle.PickleError("x")}, evil)
    assert "needs code" in run_error(capsys, ["generate", "x", "--model", str(evil), "-o", str(out)])
    weird = tmp_path / "weird.safetensors"
    from safetensors.torch import save_file

    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, weird)
    assert "no UNet" in run_error(capsys, ["generate", "x", "--model", str(weird), "-o", str(out)])
    assert not list(tmp_path.glob("*.png"))


def test_unknown_preset(tmp_path, capsys):
    line = run_error(capsys, ["checkpoint", "random", "--arch", "sd9", "-o", str(tmp_path / "x.safetensors")])
    assert "unknown architecture preset 'sd9'" in line and "sd15" in line


def test_upscale_for_viewing_is_stated_in_metadata(tmp_path, tiny_ckpt):
    out = tmp_path / "big.png"
    argv = ["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--seed", "1", "--upscale", "4",
            "-o", str(out), "-q"]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.size == (256, 256)
        params = parse_infotext(im.info["parameters"])[2]
    assert params["Size"] == "64x64"
    assert params["Postprocess upscale by"] == "4"
    assert "plain resampling" in params["Postprocess upscaler"]


def test_from_png_replays_and_flags_override(tmp_path, tiny_ckpt):
    first = tmp_path / "first.png"
    argv = ["generate", "a cat", "--negative", "dog", "--model", str(tiny_ckpt), "--steps", "3", "--seed", "5",
            "--sampler", "Euler a", "--scheduler", "Karras", "--cfg", "5.5", "--eta", "0.7", "--ensd", "31337",
            "--subseed", "9", "--subseed-strength", "0.25", "--width", "32", "--height", "48",
            "--hires-scale", "1.5", "--hires-steps", "2", "--hires-strength", "0.6", "--hires-upscaler", "Latent (nearest)",
            "--tome", "0.5", "--ngms", "1.5", "--ngms-all-steps", "-o", str(first), "-q"]
    assert main(argv) == 0
    params = parse_infotext(Image.open(first).info["parameters"])[2]
    assert params["ENSD"] == "31337" and params["Variation seed"] == "9" and params["Variation seed strength"] == "0.25"
    assert params["Hires upscale"] == "1.5" and params["Hires steps"] == "2" and params["Denoising strength"] == "0.6"
    assert params["Hires upscaler"] == "Latent (nearest)" and params["Size"] == "32x48" and params["Eta"] == "0.7"
    assert params["Token merging ratio"] == "0.5" and params["NGMS"] == "1.5" and params["NGMS all steps"] == "True"
    replay = tmp_path / "replay.png"
    assert main(["generate", "--from-png", str(first), "--model", str(tiny_ckpt), "-o", str(replay), "-q"]) == 0
    assert Image.open(replay).tobytes() == Image.open(first).tobytes()
    assert Image.open(replay).info["parameters"] == Image.open(first).info["parameters"]
    other = tmp_path / "other.png"
    assert main(["generate", "--from-png", str(first), "--model", str(tiny_ckpt), "--seed", "6", "-o", str(other), "-q"]) == 0
    params = parse_infotext(Image.open(other).info["parameters"])[2]
    assert params["Seed"] == "6" and params["ENSD"] == "31337"
    assert Image.open(other).tobytes() != Image.open(first).tobytes()


def test_img2img_inpaint_outpaint_flags(tmp_path, tiny_ckpt, capsys):
    init = tmp_path / "init.png"
    Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[10:20, 10:20] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "inpaint.png"
    argv = ["generate", "x", "--model", str(tiny_ckpt), "--steps", "4", "--seed", "1", "--init-image", str(init),
            "--strength", "0.8", "--mask", str(mask), "--mask-blur", "1", "--masked-content", "fill",
            "--inpaint-only-masked", "--masked-padding", "4", "--preview-every", "2", "-o", str(out), "-q"]
    assert main(argv) == 0
    params = parse_infotext(Image.open(out).info["parameters"])[2]
    assert params["Denoising strength"] == "0.8" and params["Mask blur"] == "1" and params["Masked content"] == "fill"
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "4"
    assert (tmp_path / "inpaint-preview.png").exists()
    a, b = np.asarray(Image.open(out), np.int16), np.asarray(Image.open(init), np.int16)
    assert np.abs(a - b)[:4].max() == 0  # far from the mask: the original pixels
    # an img2img PNG replays only with its init image
    line = run_error(capsys, ["generate", "--from-png", str(out), "--model", str(tiny_ckpt), "-o", str(tmp_path / "r.png")])
    assert "made by img2img" in line and "--init-image" in line
    replay = tmp_path / "replay.png"
    assert main(["generate", "--from-png", str(out), "--model", str(tiny_ckpt), "--init-image", str(init),
                 "--mask", str(mask), "-o", str(replay), "-q"]) == 0
    assert Image.open(replay).tobytes() == Image.open(out).tobytes()
    wide = tmp_path / "wide.png"
    assert main(["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--init-image", str(init),
                 "--outpaint", "left,right:8", "-o", str(wide), "-q"]) == 0
    assert Image.open(wide).size == (48, 32)
    assert parse_infotext(Image.open(wide).info["parameters"])[2]["Outpaint"] == "left:8,right:8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--init-image", "{missing}"], "no such init image file"),
        (["--init-image", "{text}"], "cannot read the init image"),
        (["--init-image", "{init}", "--strength", "1.5"], "strength .* between 0 and 1"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", "{init}", "--mask", "{text}"], "cannot read the mask"),
        (["--mask", "{init}"], "needs an init image"),
        (["--init-image", "{init}", "--outpaint", "sideways:8"], "outpaint side 'sideways'"),
        (["--hires-scale", "2", "--hires-upscaler", "ESRGAN"], "unknown hires upscaler 'ESRGAN'"),
        (["--sampler", "Euler", "--eta", "0.3"], "sampler 'Euler' does not use eta"),
        (["--subseed-strength", "-1"], "variation seed strength"),
        (["--from-png", "{init}"], "holds no generation parameters"),
        (["--preview-every", "0"], "--preview-every must be at least 1"),
    ],
)
def test_bad_edit_options(tmp_path, tiny_ckpt, capsys, extra, message):
    import re

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(init)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    names = {"{missing}": str(tmp_path / "missing.png"), "{text}": str(text), "{init}": str(init)}
    extra = [names.get(e, e) for e in extra]
    out = tmp_path / "o.png"
    line = run_error(capsys, ["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "-o", str(out), "-q", *extra])
    assert re.search(message, line), line
    assert not out.exists()


def test_output_names_are_literal(tmp_path, tiny_ckpt):
    out = tmp_path / "a{x}-{seed}.png"
    assert main(["generate", "x", "--model", str(tiny_ckpt), "--steps", "1", "--seed", "1", "-o", str(out), "-q"]) == 0
    assert out.exists()


def test_unwritable_output_is_one_line(tmp_path, tiny_ckpt, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder is needed")
    line = run_error(capsys, ["generate", "x", "--model", str(tiny_ckpt), "--steps", "1", "-q", "-o", str(blocker / "o.png")])
    assert "file.txt" in line


@pytest.fixture(scope="module")
def ngms_ckpt(tmp_path_factory):
    """A tiny model whose file asks for NGMS on every step below sigma 20 (every step: no CFG at all)."""
    import dataclasses

    from sdstudio.models.configs import PRESETS, SamplingDefaults
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model
    from tests.reference import randomise_

    config = dataclasses.replace(PRESETS["tiny"], sampling=SamplingDefaults(ngms=20.0, ngms_all_steps=True))
    model = random_model(config)
    randomise_(model, seed=3)  # cond and uncond differ, so NGMS changes the picture
    return save_model(model, tmp_path_factory.mktemp("ngms") / "ngms.safetensors", dtype=torch.float32)


def test_ngms_replays_on_a_model_whose_default_is_on(tmp_path, ngms_ckpt, capsys):
    base = ["--model", str(ngms_ckpt), "--steps", "3", "--seed", "5", "--negative", "dog", "-q"]

    def make(name, *extra):
        path = tmp_path / name
        assert main(["generate", "a cat", *base, *extra, "-o", str(path)]) == 0
        return path, parse_infotext(Image.open(path).info["parameters"])[2]

    def replay(png, name):
        path = tmp_path / name
        assert main(["generate", "--from-png", str(png), "--model", str(ngms_ckpt), "-q", "-o", str(path)]) == 0
        return Image.open(path).tobytes()

    default, params = make("default.png")
    assert params["NGMS"] == "20" and params["NGMS all steps"] == "True"
    off, params = make("off.png", "--ngms", "0")
    assert params["NGMS"] == "0" and "NGMS all steps" not in params
    odd, params = make("odd.png", "--no-ngms-all-steps")
    assert params["NGMS"] == "20" and params["NGMS all steps"] == "False"
    images = {Image.open(p).tobytes() for p in (default, off, odd)}
    assert len(images) == 3
    for png in (default, off, odd):
        assert replay(png, f"replay-{png.name}") == Image.open(png).tobytes()
    # A PNG without NGMS keys (AUTOMATIC1111's, or an older sdstudio's) was made with it off
    text = Image.open(off).info["parameters"].replace(", NGMS: 0", "")
    assert "NGMS" not in text
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    a1111 = tmp_path / "a1111.png"
    Image.open(off).save(a1111, pnginfo=info)
    assert replay(a1111, "replay-a1111.png") == Image.open(off).tobytes()
    # bad values recorded in a PNG are named with the file
    for bad, key in ((", NGMS: -1", "'NGMS'"), (", NGMS: 20, NGMS all steps: yes", "'NGMS all steps'")):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text.replace(", Version", bad + ", Version"))
        broken = tmp_path / "broken.png"
        Image.open(off).save(broken, pnginfo=info)
        line = run_error(capsys, ["generate", "--from-png", str(broken), "--model", str(ngms_ckpt), "-o", str(tmp_path / "x.png")])
        assert "broken.png" in line and key in line, line
