"""ControlNet in generation: our txt2img with a ControlNet equals diffusers' StableDiffusionControlNetPipeline
and StableDiffusionXLControlNetPipeline on the same random weights, control image and conditioning scale;
the extension's control modes and guidance start / end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.control.apply import ControlStack, ControlUnit, ResolvedControl, control_scales
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import generate
from sdstudio.prompt.conditioning import chunk_tokens, repad
from sdstudio.types import ControlSpec, GenerationRequest
from tests.reference import (
    a1111_scheduler,
    diffusers_controlnet,
    diffusers_pipeline,
    diffusers_sdxl_pipeline,
    random_controlnet,
    randomise_,
)

diffusers = pytest.importorskip("diffusers")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def _control_image(width: int, height: int) -> Image.Image:
    """White shapes on black, as an edge or mask map is."""
    a = np.zeros((height, width, 3), np.uint8)
    a[height // 4 : height // 2, width // 5 : width // 2] = 255
    a[height // 2 :, 2 * width // 3 :] = 180
    return Image.fromarray(a)


def _loaded(name: str, seed: int, **unet: object) -> LoadedModel:
    """The preset with a VAE of 4 levels (8x, as every real one): the hint encoder's stride."""
    config = PRESETS[name]
    config = dataclasses.replace(
        config,
        vae=dataclasses.replace(config.vae, ch_mult=(1, 1, 2, 2)),
        unet=dataclasses.replace(config.unet, **unet),  # type: ignore[arg-type]
    )
    model = random_model(config)
    randomise_(model, seed=seed)
    return LoadedModel(model=model, config=model.config, path=Path(name), dtype=torch.float32, ema=False)


def _ours01(result) -> torch.Tensor:
    return torch.from_numpy(np.asarray(result.images[0].image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize(
    ("mode", "weight", "guess_mode", "min_psnr"),
    [("Balanced", 0.7, False, 52.0), ("ControlNet is more important", 1.0, True, 45.0)],
)
def test_sd1_controlnet_txt2img_equals_diffusers(mode: str, weight: float, guess_mode: bool, min_psnr: float):
    """"ControlNet is more important" is diffusers' guess mode: control on the prompt's rows only, residual i
    of 13 scaled by 0.825 ** (12 - i) (diffusers: 10 ** ((i - 12) / 12), the same to 0.6 %). SD 1.5's 13
    residuals: four levels of two ResBlocks."""
    base = _loaded("tiny", 5, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_resolutions=(4, 2))
    net = random_controlnet(base.config.unet, seed=8)
    control = _control_image(64, 64)
    spec = ControlSpec(model="rand", image=control, weight=weight, mode=mode)  # type: ignore[arg-type]
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blurry", sampler="DDIM", steps=8, cfg_scale=6.0, seed=11,
        width=64, height=64, controls=(spec,),
    )  # fmt: skip
    tokenizer = ClipTokenizer()
    ours = generate(base, tokenizer, request, controls=[ResolvedControl(spec, net, "rand", "0123abcd")])
    plain = generate(base, tokenizer, dataclasses.replace(request, controls=()))
    assert 'ControlNet 0: "Module: none, Model: rand [0123abcd], Weight: ' in ours.images[0].infotext

    pipe, clip = diffusers_pipeline(base.config, base.model.state_dict(), a1111_scheduler("ddim"))
    cpipe = diffusers.StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=diffusers_controlnet(base.config.unet, net.state_dict())
    )
    cpipe.set_progress_bar_config(disable=True)
    ids = [chunk_tokens(tokenizer.encode(t), base.config.text)[0] for t in (request.prompt, request.negative_prompt)]
    with torch.inference_mode():
        embeds = clip(torch.tensor(ids)).last_hidden_state
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(request.seed))
        theirs = cpipe(
            prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], image=control, num_inference_steps=8,
            guidance_scale=6.0, eta=0.0, latents=latents, height=64, width=64, output_type="pt",
            controlnet_conditioning_scale=weight, guess_mode=guess_mode,
        ).images  # fmt: skip
    assert _psnr(_ours01(ours), theirs) > min_psnr
    assert _psnr(_ours01(plain), theirs) < 35  # the ControlNet changed the image


def test_sdxl_controlnet_txt2img_equals_diffusers():
    base = _loaded("tiny-sdxl", 5)
    net = random_controlnet(base.config.unet, seed=9)
    width, height = 64, 48
    control = _control_image(width, height)
    spec = ControlSpec(model="xl", image=control, weight=0.8)
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blurry", sampler="DDIM", steps=8, cfg_scale=5.0, seed=3,
        width=width, height=height, controls=(spec,),
    )  # fmt: skip
    tokenizer = ClipTokenizer()
    ours = generate(base, tokenizer, request, controls=[ResolvedControl(spec, net, "xl")])
    pipe, clip_l, big_g = diffusers_sdxl_pipeline(base.config, base.model.state_dict(), a1111_scheduler("ddim"))
    cpipe = diffusers.StableDiffusionXLControlNetPipeline(
        **pipe.components, controlnet=diffusers_controlnet(base.config.unet, net.state_dict())
    )
    cpipe.set_progress_bar_config(disable=True)
    ids = [chunk_tokens(tokenizer.encode(t), base.config.text)[0] for t in (request.prompt, request.negative_prompt)]
    with torch.inference_mode():
        out_l = clip_l(torch.tensor(ids), output_hidden_states=True)
        out_g = big_g(torch.tensor([repad(i, pad_with_eos=False) for i in ids]), output_hidden_states=True)
        embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        latents = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(request.seed))
        theirs = cpipe(
            prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=out_g.text_embeds[:1],
            negative_pooled_prompt_embeds=out_g.text_embeds[1:], image=control, num_inference_steps=8,
            guidance_scale=5.0, eta=0.0, latents=latents, height=height, width=width, output_type="pt",
            controlnet_conditioning_scale=0.8,
        ).images  # fmt: skip
    assert _psnr(_ours01(ours), theirs) > 52


class _Recorder(torch.nn.Module):
    """A stand-in ControlNet: residuals of ones, recording the progress it was called at."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, hint, t, context, y):
        self.calls += 1
        return [torch.ones(x.shape[0], 1, 1, 1) for _ in range(13)]


def test_modes_scales_and_guidance_window():
    assert control_scales(0.5, 13, "Balanced") == [0.5] * 13
    soft = control_scales(1.0, 13, "My prompt is more important")
    assert soft[-1] == 1.0 and soft[0] == pytest.approx(0.825**12)
    assert control_scales(1.0, 10, "ControlNet is more important") == soft[:10]  # SDXL: the first ten
    net = _Recorder()
    hint = torch.zeros(1, 3, 8, 8)
    x, t, ctx = torch.zeros(4, 4, 1, 1), torch.zeros(4), torch.zeros(4, 77, 8)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    cfg = ControlStack((ControlUnit(net, hint, 2.0, mode="ControlNet is more important"),))
    out = cfg.residuals(x, t, ctx, None, cond_mask=mask, progress=0.5)
    assert out is not None and out[-1].flatten().tolist() == [2.0, 2.0, 0.0, 0.0]  # negative rows: no control
    windowed = ControlStack((ControlUnit(net, hint, 1.0, start=0.25, end=0.5),))
    active = [windowed.residuals(x, t, ctx, None, cond_mask=mask, progress=p) is not None for p in (0.2, 0.25, 0.5, 0.6)]
    assert active == [False, True, True, False]
    two = ControlStack((ControlUnit(net, hint, 1.0), ControlUnit(net, hint, 0.5)))
    assert two.residuals(x, t, ctx, None, cond_mask=mask, progress=0.0)[0].flatten().tolist() == [1.5] * 4
