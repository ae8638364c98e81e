"""The hires fix with a learned upscaler from ``--upscaler-dir``: decode, upscale by the network, Lanczos to
the hires size, encode, as AUTOMATIC1111 does with an ESRGAN upscaler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.cli import main
from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.io.infotext import parse_infotext
from sdstudio.types import GenerationRequest, Hires
from sdstudio.upscale.arches import CompactConfig, SRVGGNetCompact
from tests.reference import write_random_checkpoint
from tests.test_cli import run_error


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hires")
    write_random_checkpoint("tiny", folder / "tiny.safetensors", seed=3)
    ups = folder / "upscalers"
    ups.mkdir()
    torch.manual_seed(0)
    net = SRVGGNetCompact(CompactConfig(nf=8, num_conv=2, scale=2))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # a net that visibly changes the picture
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ups / "2x-Toy.safetensors"))
    return folder


def _request(upscaler: str) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", steps=3, seed=4, hires=Hires(scale=2.0, steps=2, strength=0.1, upscaler=upscaler))


def test_learned_upscaler_in_the_hires_fix(files):
    pipe = Pipeline.from_file(files / "tiny.safetensors", upscaler_dirs=[files / "upscalers"])
    learned = pipe(_request("2x-Toy"))
    lanczos = pipe(_request("Lanczos"))
    a, b = (np.asarray(r.images[0].image, dtype=int) for r in (learned, lanczos))
    assert a.shape == b.shape == (128, 128, 3)
    assert np.abs(a - b).mean() > 1  # the network's upscale, not Lanczos's
    assert "Hires upscaler: 2x-Toy" in learned.images[0].infotext
    with pytest.raises(SdStudioError, match="2x-Tyo"):
        pipe(_request("2x-Tyo"))


def test_cli_finds_the_upscaler_before_loading(tmp_path, files, capsys):
    out = tmp_path / "h.png"
    base = ["generate", "a cat", "--model", str(files / "tiny.safetensors"), "--steps", "2", "--hires-scale", "2",
            "--upscaler-dir", str(files / "upscalers"), "-o", str(out)]  # fmt: skip
    assert main([*base, "--hires-upscaler", "2x-Toy", "-q"]) == 0
    with Image.open(out) as im:
        assert im.size == (128, 128) and parse_infotext(im.info["parameters"])[2]["Hires upscaler"] == "2x-Toy"
    out.unlink()
    assert "2x-Tyo" in run_error(capsys, [*base, "--hires-upscaler", "2x-Tyo"])
    assert not out.exists()
