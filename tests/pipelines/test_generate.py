"""The shared pipeline on a tiny random model: seeds, img2img, inpainting, outpainting, hires fix, progress."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.diffusion.schedulers import get_sigmas
from sdstudio.errors import SdStudioError
from sdstudio.io.images import to_pil
from sdstudio.io.infotext import parse_infotext
from sdstudio.models.configs import PRESETS, SamplingDefaults
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import decode_latents, encode_images, generate
from sdstudio.pipelines.sampling import LatentSource, pass_sigmas, plan
from sdstudio.types import GenerationRequest, Hires, InitImage, Inpaint, Outpaint
from tests.reference import randomise_

TOKENIZER = ClipTokenizer()


def loaded(config):
    model = random_model(config)
    randomise_(model, seed=3)  # non-zero residual branches, so every setting changes the picture
    return LoadedModel(model=model, config=config, path=Path(config.name), dtype=torch.float32, ema=False)


@pytest.fixture(scope="module")
def tiny():
    return loaded(PRESETS["tiny"])


@pytest.fixture(scope="module")
def tiny_inpaint():
    config = PRESETS["tiny"]
    return loaded(
        dataclasses.replace(config, name="tiny-inpaint", unet=dataclasses.replace(config.unet, in_channels=9))
    )


def request(**kw):
    base = {
        "prompt": "a red ball",
        "negative_prompt": "blur",
        "sampler": "Euler a",
        "steps": 4,
        "seed": 11,
        "width": 32,
        "height": 32,
    }
    return GenerationRequest(**{**base, **kw})


def arr(image):
    return np.asarray(image, dtype=np.int16)


def picture(size=(32, 32)):
    """A deterministic, structured RGB test image."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([(x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_batch_image_equals_generating_it_alone(tiny):
    for kw in ({"ensd": 31337}, {"subseed": 40, "subseed_strength": 0.4}, {"sampler": "DPM++ SDE"}):
        batch = generate(tiny, TOKENIZER, request(batch_size=3, **kw))
        seed, sub = batch.images[2].seed, batch.images[2].subseed
        alone = generate(
            tiny, TOKENIZER, request(**{**kw, "seed": seed, "subseed": sub if sub is not None else -1})
        )
        assert np.abs(arr(batch.images[2].image) - arr(alone.images[0].image)).max() <= 1, kw


def test_seed_assignment_follows_a1111(tiny):
    p = plan(tiny, request(batch_size=3))
    assert p.seeds == (11, 12, 13) and p.subseeds is None
    p = plan(tiny, request(batch_size=3, subseed=40, subseed_strength=0.5))
    assert p.seeds == (11, 11, 11) and p.subseeds == (40, 41, 42)


def test_ensd_changes_ancestral_noise_only(tiny):
    base = generate(tiny, TOKENIZER, request()).images[0]
    ensd = generate(tiny, TOKENIZER, request(ensd=31337)).images[0]
    assert np.abs(arr(base.image) - arr(ensd.image)).max() > 5
    assert (
        parse_infotext(ensd.infotext)[2]["ENSD"] == "31337" and "ENSD" not in parse_infotext(base.infotext)[2]
    )
    # Euler draws no noise after the first: ENSD cannot matter, and the result says so
    euler = generate(tiny, TOKENIZER, request(sampler="Euler"))
    euler_ensd = generate(tiny, TOKENIZER, request(sampler="Euler", ensd=31337))
    assert euler.images[0].image.tobytes() == euler_ensd.images[0].image.tobytes()
    assert any("ENSD ignored" in w and "Euler" in w for w in euler_ensd.warnings)


def test_ngms_defaults_come_from_the_model_and_replay_from_the_infotext(tiny):
    # NGMS above the largest sigma on every step: no step is guided, as at CFG 1
    on = loaded(dataclasses.replace(PRESETS["tiny"], sampling=SamplingDefaults(ngms=20.0, ngms_all_steps=True)))
    on.model.load_state_dict(tiny.model.state_dict())
    default = generate(on, TOKENIZER, request()).images[0]
    params = parse_infotext(default.infotext)[2]
    assert params["NGMS"] == "20" and params["NGMS all steps"] == "True"
    assert plan(on, request()).ngms == 20.0 and plan(on, request(ngms_all_steps=False)).ngms_all_steps is False
    assert default.image.tobytes() == generate(tiny, TOKENIZER, request(cfg_scale=1.0)).images[0].image.tobytes()
    # off, on a model whose default is on: the line says so, so that a replay does not turn it back on
    off = generate(on, TOKENIZER, request(ngms=0.0)).images[0]
    params = parse_infotext(off.infotext)[2]
    assert params["NGMS"] == "0" and "NGMS all steps" not in params
    plain = generate(tiny, TOKENIZER, request()).images[0]
    assert off.image.tobytes() == plain.image.tobytes() and "NGMS" not in parse_infotext(plain.infotext)[2]
    assert default.image.tobytes() != plain.image.tobytes()
    # A1111's own default, every other step, spelled out against a model default of every step
    odd = generate(on, TOKENIZER, request(ngms_all_steps=False)).images[0]
    assert parse_infotext(odd.infotext)[2]["NGMS all steps"] == "False"
    assert odd.image.tobytes() not in (default.image.tobytes(), plain.image.tobytes())


def test_variation_seed_infotext_and_effect(tiny):
    none = generate(tiny, TOKENIZER, request(subseed=40, subseed_strength=0.0)).images[0]
    base = generate(tiny, TOKENIZER, request()).images[0]
    assert none.image.tobytes() == base.image.tobytes()
    var = generate(tiny, TOKENIZER, request(subseed=40, subseed_strength=0.3)).images[0]
    params = parse_infotext(var.infotext)[2]
    assert params["Variation seed"] == "40" and params["Variation seed strength"] == "0.3"
    assert np.abs(arr(var.image) - arr(base.image)).max() > 5


def test_img2img_step_accounting_is_a1111s(tiny):
    p = plan(tiny, request(sampler="Euler"))
    full = get_sigmas("Automatic", DiscreteSchedule.from_config(tiny.config.schedule), 10, p.sampler)
    got = pass_sigmas(tiny, p, 10, LatentSource(torch.empty(0), 0.5))
    torch.testing.assert_close(got, full[10 - 5 - 1 :])  # t_enc = 5: 6 steps
    assert len(pass_sigmas(tiny, p, 10, LatentSource(torch.empty(0), 1.0))) == 11
    # the hires rule: exactly the requested steps, from a longer schedule
    longer = get_sigmas("Automatic", DiscreteSchedule.from_config(tiny.config.schedule), 20, p.sampler)
    torch.testing.assert_close(
        pass_sigmas(tiny, p, 6, LatentSource(torch.empty(0), 0.3, fixed_steps=True)), longer[-7:]
    )
    steps = []
    generate(
        tiny, TOKENIZER, request(sampler="Euler", steps=10, init=InitImage(picture(), 0.5)), steps.append
    )
    assert [(s.i, s.total) for s in steps] == [(i, 6) for i in range(6)]


def test_img2img_strength_zero_returns_the_input(tiny):
    image = picture()
    out = generate(tiny, TOKENIZER, request(init=InitImage(image, 0.0))).images[0]
    with torch.inference_mode():
        round_trip = to_pil(decode_latents(tiny, encode_images(tiny, [image], False)))[0]
    assert out.image.tobytes() == round_trip.tobytes()
    assert parse_infotext(out.infotext)[2]["Denoising strength"] == "0"
    changed = generate(tiny, TOKENIZER, request(init=InitImage(image, 0.8))).images[0]
    assert np.abs(arr(changed.image) - arr(round_trip)).max() > 5


def test_resize_modes_give_the_requested_size(tiny):
    wide = picture((48, 24))
    for mode in ("just resize", "crop and resize", "resize and fill"):
        out = generate(tiny, TOKENIZER, request(init=InitImage(wide, 0.3, mode))).images[0]
        assert out.image.size == (32, 32)
    # without a size, the image's own (down to a multiple of 8, said in the warnings)
    result = generate(
        tiny, TOKENIZER, request(width=None, height=None, init=InitImage(picture((44, 24)), 0.3))
    )
    assert result.images[0].image.size == (40, 24) and any(
        "not a multiple of 8" in w for w in result.warnings
    )


def square_mask(size=(32, 32), box=(12, 12, 20, 20)):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting_keeps_unmasked_pixels(tiny, tiny_inpaint, content, only_masked):
    image, blur = picture(), 2
    far = np.ones((32, 32), bool)
    far[12 - 3 * blur : 20 + 3 * blur, 12 - 3 * blur : 20 + 3 * blur] = False  # outside the blurred mask
    for model in (tiny, tiny_inpaint):
        inpaint = Inpaint(square_mask(), blur, only_masked, 4, content)
        out = generate(model, TOKENIZER, request(init=InitImage(image, 0.9), inpaint=inpaint)).images[0]
        assert out.image.size == (32, 32)
        diff = np.abs(arr(out.image) - arr(image))
        assert diff[far].max() == 0, (model.config.name, content)
        assert diff[14:18, 14:18].max() > 5  # the masked area was repainted
    params = parse_infotext(out.infotext)[2]
    assert params["Mask blur"] == "2" and params["Masked content"] == content
    assert (params.get("Inpaint area") == "Only masked") == only_masked


def test_inpaint_model_txt2img_and_bad_masks(tiny_inpaint):
    out = generate(tiny_inpaint, TOKENIZER, request()).images[0]  # 9-channel model, no mask
    assert np.asarray(out.image).std() > 1
    small_mask = square_mask((16, 16), (6, 6, 10, 10))
    result = generate(
        tiny_inpaint, TOKENIZER, request(init=InitImage(picture(), 0.5), inpaint=Inpaint(small_mask))
    )
    assert any("mask size 16x16 differs" in w for w in result.warnings)


def test_outpainting_extends_the_canvas(tiny):
    image = picture((32, 24))
    inpaint = Inpaint(None, 2, outpaint=Outpaint(right=8, down=8))
    result = generate(
        tiny, TOKENIZER, request(width=None, height=None, init=InitImage(image, 0.9), inpaint=inpaint)
    )
    out = result.images[0]
    assert out.image.size == (40, 32)
    diff = np.abs(arr(out.image)[:24, :32] - arr(image))
    assert diff[: 24 - 4 * 2 - 6, : 32 - 4 * 2 - 6].max() == 0  # the original, away from the seam
    assert np.abs(arr(out.image)[:, 34:] - arr(out.image)[:, 31:32]).max() > 5  # new content, not the edge
    assert parse_infotext(out.infotext)[2]["Outpaint"] == "right:8,down:8"


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Lanczos"])
def test_hires_fix(tiny, upscaler):
    steps = []
    hires = Hires(scale=1.5, steps=3, strength=0.5, upscaler=upscaler)
    result = generate(tiny, TOKENIZER, request(hires=hires), steps.append)
    out = result.images[0]
    assert out.image.size == (48, 48)
    assert [(s.i, s.total) for s in steps] == [(i, 7) for i in range(7)]  # 4 + 3, numbered over both passes
    assert (
        steps[-1].x.shape[-1] == 24 and steps[0].x.shape[-1] == 16
    )  # the current latent at each pass's size
    params = parse_infotext(out.infotext)[2]
    assert params["Size"] == "32x32" and params["Hires upscale"] == "1.5" and params["Hires steps"] == "3"
    assert params["Hires upscaler"] == upscaler and params["Denoising strength"] == "0.5"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"init": InitImage(picture(), 1.5)}, "strength .* between 0 and 1"),
        ({"inpaint": Inpaint(square_mask())}, "needs an init image"),
        ({"init": InitImage(picture(), 0.5), "hires": Hires()}, "hires fix is for txt2img"),
        ({"hires": Hires(upscaler="ESRGAN")}, "unknown hires upscaler 'ESRGAN'"),
        ({"subseed_strength": 2.0}, "variation seed strength"),
        ({"sampler": "Euler", "eta": 0.5}, "does not use eta"),
        ({"ngms": -1.0}, "NGMS .* must be a finite number >= 0"),
        ({"ngms": float("nan")}, "NGMS .* must be a finite number >= 0"),
        ({"ngms": float("inf")}, "NGMS .* must be a finite number >= 0"),
    ],
)
def test_bad_requests(tiny, kw, message):
    with pytest.raises(SdStudioError, match=message):
        plan(tiny, request(**kw))
