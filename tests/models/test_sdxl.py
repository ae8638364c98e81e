"""SDXL in our own code against diffusers / transformers on the same random weights (each reached through
diffusers' own single-file converters): the UNet with its vector y, both text encoders, and detection."""

from __future__ import annotations

import pytest
import torch

from sdstudio.models.configs import PRESETS
from sdstudio.models.detect import detect_config
from sdstudio.models.sdxl import SizeConditioning, size_vector
from sdstudio.models.stablediffusion import StableDiffusion, random_model
from tests.reference import diffusers_unet, randomise_, transformers_sdxl_text

pytest.importorskip("diffusers")


def _model(name: str, seed: int = 0) -> StableDiffusion:
    with torch.device("meta"):
        model = StableDiffusion(PRESETS[name])
    model.to_empty(device="cpu")
    randomise_(model, seed)
    return model.eval().requires_grad_(False)


def _unet_parity(name: str, side: int, atol: float) -> None:
    model = _model(name)
    config = model.config
    unet = model.unet
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, config.unet.in_channels, side, side, generator=gen)
    context = torch.randn(2, 77, config.unet.context_dim, generator=gen)
    projection = config.unet.adm_in_channels - 256 * (5 if config.conditioner == "sdxl_refiner" else 6)
    pooled = torch.randn(2, projection, generator=gen)
    size = SizeConditioning(original=(96, 80), target=(64, 72), crop=(8, 4), aesthetic=5.5)
    refiner = config.conditioner == "sdxl_refiner"
    y = size_vector(pooled, size, refiner)
    t = torch.tensor([981.0, 20.0])
    with torch.no_grad():
        ours = unet(x, t, context, y=y)
        state = {k.removeprefix("model.diffusion_model."): v for k, v in model.state_dict().items()}
        del model, unet
        theirs_unet = diffusers_unet(config, {"model.diffusion_model." + k: v for k, v in state.items()})
        # diffusers' add_time_ids: original size + crop top-left + target size (refiner: aesthetic score)
        time_ids = torch.tensor(
            [[96.0, 80.0, 8.0, 4.0, 5.5] if refiner else [96.0, 80.0, 8.0, 4.0, 64.0, 72.0]] * 2
        )
        theirs = theirs_unet(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    assert ours.std() > 0.1  # a real output, not a zero-initialised one
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    # the vector matters: a wrong size changes the output
    with torch.no_grad():
        other = theirs_unet(
            x, t, encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids + 64},
        ).sample  # fmt: skip
    assert (other - theirs).abs().max() > 100 * atol


def test_tiny_sdxl_unet_equals_diffusers() -> None:
    _unet_parity("tiny-sdxl", 16, 1e-4)


def test_unet_refuses_a_missing_or_wrong_vector() -> None:
    unet = random_model(PRESETS["tiny-sdxl"]).unet
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="needs y"):
        unet(x, t, context)
    with pytest.raises(ValueError, match="needs y"):
        unet(x, t, context, y=torch.zeros(1, 7))
    with pytest.raises(ValueError, match="takes no vector"):
        random_model(PRESETS["tiny"]).unet(x, t, torch.zeros(1, 77, 32), y=torch.zeros(1, 7))


def _text_parity(name: str, atol: float) -> None:
    model = _model(name, seed=1)
    config = model.config
    conditioner = model.text_encoder
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(1, 49000, (2, 12), generator=gen)
    # CLIP-L pads with EOS, bigG with 0 after the first EOS
    framed = torch.cat([torch.full((2, 1), 49406), body, torch.full((2, 1), 49407)], dim=1)
    ids_l = torch.cat([framed, torch.full((2, 63), 49407)], dim=1)
    ids_g = torch.cat([framed, torch.zeros(2, 63, dtype=torch.long)], dim=1)
    with torch.no_grad():
        (hidden_l, hidden_g), pooled = conditioner.encode([ids_l, ids_g], 2)
        clip_l, big_g = transformers_sdxl_text(config, model.state_dict())
        out_l = clip_l(ids_l, output_hidden_states=True)
        out_g = big_g(ids_g, output_hidden_states=True)
    # the penultimate layers without the final LayerNorm, and bigG's projected pooled text
    torch.testing.assert_close(hidden_l, out_l.hidden_states[-2], rtol=0, atol=atol)
    torch.testing.assert_close(hidden_g, out_g.hidden_states[-2], rtol=0, atol=atol)
    torch.testing.assert_close(pooled, out_g.text_embeds, rtol=0, atol=atol)
    assert (hidden_g - out_g.last_hidden_state).abs().max() > 100 * atol  # not the last layer


def test_tiny_sdxl_text_encoders_equal_transformers() -> None:
    _text_parity("tiny-sdxl", 1e-5)


@pytest.mark.slow
@pytest.mark.heavy
def test_sdxl_text_encoders_full_width() -> None:
    _text_parity("sdxl", 1e-4)


@pytest.mark.slow
@pytest.mark.heavy
def test_sdxl_unet_full_width() -> None:
    _unet_parity("sdxl", 8, 1e-4)


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_presets_are_detected_from_keys(name: str) -> None:
    with torch.device("meta"):
        model = StableDiffusion(PRESETS[name])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    detected = detect_config(shapes)
    assert detected.name == name and detected == PRESETS[name]
    # the UNet's keys and sizes of the real files: 2.567 B (base), 2.26 B (refiner) parameters
    counts = model.parameter_counts()
    assert round(counts["unet"] / 1e6) == {"sdxl": 2567, "sdxl-refiner": 2260}[name]
    assert round(counts["text_encoder"] / 1e6) == {"sdxl": 818, "sdxl-refiner": 695}[name]
