"""The CLI on SDXL checkpoint files: detection from the file's keys, the refiner flags and their errors."""

from __future__ import annotations

import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.io.infotext import parse_infotext
from tests.reference import write_random_checkpoint
from tests.test_cli import run_error


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    base, refiner = folder / "xlbase.safetensors", folder / "xlrefiner.safetensors"
    # fan-in-scaled weights: LDM's zero-initialised outputs would make every image alike
    write_random_checkpoint("tiny-sdxl", base, seed=3)
    write_random_checkpoint("tiny-sdxl-refiner", refiner, seed=4)
    return base, refiner


def test_sdxl_generates_with_and_without_refiner(tmp_path, sdxl_files, capsys):
    base, refiner = sdxl_files
    plain, refined = tmp_path / "plain.png", tmp_path / "refined.png"
    common = ["generate", "a cat", "--model", str(base), "--steps", "4", "--seed", "9", "--sampler", "DDIM", "-q"]
    assert main([*common, "-o", str(plain)]) == 0
    assert main([*common, "--refiner", str(refiner), "--refiner-switch-at", "0.5", "-o", str(refined)]) == 0
    with Image.open(plain) as a, Image.open(refined) as b:
        assert a.size == b.size == (64, 64)
        _, _, params = parse_infotext(b.info["parameters"])
        assert a.tobytes() != b.tobytes()  # the refiner took the last steps
    assert params["Refiner"].startswith("xlrefiner [") and params["Refiner switch at"] == "0.5"
    assert "Clip skip" not in params


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--refiner-switch-at", "0.5"], "--refiner-switch-at needs a refiner"),
        (["--refiner", "missing.safetensors"], "no such refiner checkpoint"),
        (["--refiner", "{refiner}", "--refiner-switch-at", "1.5"], "refiner switch at"),
        (["--refiner", "{sd1}"], "another latent space"),
    ],
)
def test_refiner_errors(tmp_path, sdxl_files, capsys, extra, message):
    base, refiner = sdxl_files
    sd1 = tmp_path / "sd1.safetensors"
    assert main(["checkpoint", "random", "--arch", "tiny", "-o", str(sd1)]) == 0
    extra = [e.format(refiner=refiner, sd1=sd1) for e in extra]
    out = tmp_path / "x.png"
    err = run_error(capsys, ["generate", "x", "--model", str(base), "--steps", "2", "-o", str(out), *extra])
    assert message in err
    assert not out.exists()
