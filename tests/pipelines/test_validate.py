"""Property tests over requests: whatever a caller puts in a request (a wrong type, NaN, a size of 2**40, a
name that does not exist), the result is an image or one ``SdStudioError`` line, never another exception;
and the command line writes a file only when it succeeds."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdstudio.cli import main
from sdstudio.errors import SdStudioError
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import generate
from sdstudio.pipelines.sampling import plan
from sdstudio.pipelines.validate import Limits, check_request
from sdstudio.types import GenerationRequest, Hires, InitImage, Inpaint, Outpaint

TOKENIZER = ClipTokenizer()
NAN, INF = float("nan"), float("inf")

junk = st.sampled_from([None, "7", (), NAN, INF, -INF, True, b"x", 2**70])


def either(valid, *invalid):
    """Mostly valid values (two branches of four), so that whole requests are often valid too."""
    return st.one_of(valid, valid, st.sampled_from(invalid), junk)


def opt(strategy):
    return st.one_of(st.none(), strategy)


images = st.builds(lambda size: Image.new("RGB", size, (90, 30, 200)), st.sampled_from([(8, 8), (33, 17), (1, 1), (40, 64)]))
masks = st.builds(lambda size: Image.new("L", size, 255), st.sampled_from([(8, 8), (33, 17), (1, 1)]))
unit = st.floats(0, 1)
sides = either(st.integers(0, 16), -8, 10**9)

# fmt: off
requests = st.builds(
    GenerationRequest,
    prompt=either(st.text(max_size=12), 3),
    negative_prompt=either(st.text(max_size=6), 3),
    sampler=either(st.sampled_from(["Euler", "Euler a", "DDIM", "DPM++ 2M Karras", "DPM++ SDE", "LCM", "PLMS"]),
                   "nope", "", "DPM++ 2M Nope"),
    scheduler=either(st.sampled_from(["Automatic", "Karras", "Exponential", "SGM Uniform", "Uniform"]), "bogus", ""),
    steps=either(st.integers(1, 3), 0, -1, 1001, 10**12, 2.5),
    cfg_scale=either(st.floats(0, 12), -1.0, 1e9, 101.0),
    seed=either(st.integers(-1, 2**32 - 1), 2**32, -(2**70)),
    width=opt(either(st.sampled_from([8, 16, 32, 48]), 0, 7, 60, -8, 100000, 2**40)),
    height=opt(either(st.sampled_from([8, 16, 32, 48]), 0, 7, 60, -8, 100000, 2**40)),
    batch_size=either(st.integers(1, 2), 0, -3, 65, 10**9),
    clip_skip=opt(either(st.integers(1, 2), 0, 3, -1)),
    eta=opt(either(unit, -1.0, 1.5)),
    ensd=either(st.integers(0, 100), 2**40),
    subseed=either(st.integers(-1, 1000), 2**33),
    subseed_strength=either(unit, -0.1, 1.1),
    token_merging_ratio=either(st.floats(0, 0.75), 0.9, -0.1),
    ngms=opt(either(st.floats(0, 5), -1.0)),
    ngms_all_steps=opt(either(st.booleans(), "yes")),
    init=opt(either(st.builds(InitImage, images, unit, st.sampled_from(["just resize", "crop and resize", "resize and fill"])),
                    InitImage(Image.new("RGB", (8, 8)), 2.0), InitImage(Image.new("RGB", (8, 8)), 0.5, "stretch"),
                    InitImage("init.png"))),
    inpaint=opt(either(st.builds(Inpaint, opt(masks), st.integers(0, 4), st.booleans(), st.integers(0, 8),
                                 st.sampled_from(["fill", "original", "latent noise", "latent nothing"]),
                                 st.builds(Outpaint, sides, sides, sides, sides)),
                       Inpaint(None), Inpaint(masked_content="void"), Inpaint(blur=-1))),
    hires=opt(either(st.builds(Hires, st.floats(0.5, 2), st.integers(0, 2), unit,
                               st.sampled_from(["Latent", "Latent (nearest)", "Lanczos", "Nearest"])),
                     Hires(scale=0), Hires(scale=NAN), Hires(scale=1e300), Hires(upscaler="ESRGAN"), Hires(steps=-1))),
    vae_tiling=opt(either(st.booleans(), 1)),
)
# fmt: on


@pytest.fixture(scope="module")
def tiny():
    config = PRESETS["tiny"]
    return LoadedModel(random_model(config, seed=2), config, Path("tiny"), torch.float32, False)


def one_line(error: SdStudioError) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_any_request_gives_images_or_one_sdstudio_error(tiny, request):
    try:
        p = plan(tiny, request)
    except SdStudioError as e:
        one_line(e)
        return
    try:
        result = generate(tiny, TOKENIZER, request)
    except SdStudioError as e:  # refused only once the work started: allowed, but must still be one line
        one_line(e)
        return
    assert len(result.images) == request.batch_size
    size = p.hires_size or (p.width, p.height)
    if request.inpaint is None or not request.inpaint.only_masked:
        assert result.images[0].image.size == size


def test_the_checks_catch_what_a_broken_variant_would_let_through(tiny):
    """The property is not vacuous: requests that the old checks passed (NaN CFG, huge sizes, a mistyped
    schedule type) are refused, and a valid request passes."""
    assert check_request(GenerationRequest("a cat", steps=2))[0].name == "Euler a"
    for bad in (
        GenerationRequest("a", cfg_scale=NAN), GenerationRequest("a", width=100000, height=100000),
        GenerationRequest("a", scheduler="Karras2"), GenerationRequest("a", steps=10**6),
        GenerationRequest("a", hires=Hires(scale=100)), GenerationRequest("a", eta=-1.0, sampler="Euler a"),
        GenerationRequest("a", steps="20"), GenerationRequest("a", width=64.0),  # type: ignore[arg-type]
    ):  # fmt: skip
        with pytest.raises(SdStudioError):
            plan(tiny, bad)
    with pytest.raises(SdStudioError, match="over the limit of 4096"):
        plan(tiny, GenerationRequest("a", width=72, height=64), Limits(max_pixels=4096))
    assert plan(tiny, GenerationRequest("a", width=64, height=64), Limits(max_pixels=4096)).width == 64


def text(valid, *invalid):
    """A flag's value as typed: mostly valid, else one that parses as the flag's type but is out of range."""
    return st.one_of(valid, valid, st.sampled_from(invalid))


flag_values = {
    "--steps": text(st.integers(1, 2).map(str), "0", "-1", "5000"),
    "--cfg": text(st.floats(0, 10).map(str), "nan", "inf", "-inf", "-3", "1e300"),
    "--width": text(st.sampled_from(["16", "32"]), "0", "12", "-16", "100000"),
    "--eta": text(st.floats(0, 1).map(str), "-1", "nan", "2"),
    "--hires-scale": text(st.sampled_from(["1", "1.5"]), "0", "100", "nan", "-2"),
    "--sampler": text(st.sampled_from(["Euler a", "DDIM"]), "Nope", "DPM++ 2M Nope"),
    "--scheduler": text(st.sampled_from(["Karras", "Automatic"]), "nope"),
    "--upscale": text(st.sampled_from(["1", "2"]), "0", "-1", "99"),
    "--batch": text(st.sampled_from(["1", "2"]), "0", "100"),
    "--subseed-strength": text(unit.map(str), "nan", "1.5"),
}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    assert main(["checkpoint", "random", "--arch", "tiny", "--seed", "1", "-o", str(path)]) == 0
    return path


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flags=st.dictionaries(st.sampled_from(sorted(flag_values)), st.just(None), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: flag_values[k] for k in keys})))  # fmt: skip
def test_the_command_writes_files_only_when_it_succeeds(tiny_file, capsys, flags):
    with tempfile.TemporaryDirectory() as folder:
        argv = ["generate", "x", "--model", str(tiny_file), "--steps", "1", "--outdir", folder, "-q"]
        argv += [f"{flag}={value}" for flag, value in flags.items()]  # "=": "-3" is a value, not a flag
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        written = list(Path(folder).iterdir())
        if code == 0:
            assert len(written) == int(flags.get("--batch", "1"))
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("sdstudio: error: "), err
            assert written == []
        bad_cfg = "--cfg" in flags and not 0 <= float(flags["--cfg"]) <= 100
        assert not (bad_cfg and code == 0)
        assert math.isfinite(float(flags.get("--cfg", "7"))) or code == 2
