"""End to end: our SDXL DDIM txt2img equals diffusers' StableDiffusionXLPipeline on the same random weights,
prompt, seed, steps, CFG and sizes (text encoders, UNet and VAE each reach diffusers through its own
single-file converters; prompt embeddings from transformers' CLIP models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.sdxl import SizeConditioning
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.txt2img import decode_latents, parse_request, plan, sample_latents
from sdstudio.prompt.conditioning import chunk_tokens, encode_conditioning, repad
from sdstudio.types import GenerationRequest
from tests.reference import a1111_scheduler, diffusers_sdxl_pipeline, randomise_

diffusers = pytest.importorskip("diffusers")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


@pytest.mark.parametrize(("negative", "cfg"), [("blurry, dark", 7.0), ("", 5.0)])
def test_sdxl_ddim_txt2img_equals_diffusers(negative: str, cfg: float) -> None:
    config = PRESETS["tiny-sdxl"]
    model = random_model(config)
    randomise_(model, seed=5)
    loaded = LoadedModel(model=model, config=config, path=Path("tiny-sdxl"), dtype=torch.float32, ema=False)
    width, height = 64, 48
    request = GenerationRequest(
        prompt="a red circle left of a blue square", negative_prompt=negative, sampler="DDIM", steps=8,
        cfg_scale=cfg, seed=1234, width=width, height=height,
    )  # fmt: skip
    tokenizer = ClipTokenizer()
    p = plan(loaded, request)
    with torch.inference_mode():
        cond = encode_conditioning(
            model.text_encoder, tokenizer, config.text, *parse_request(request), p.clip_skip,
            size=SizeConditioning.of_image(width, height),
        )  # fmt: skip
        ours = decode_latents(loaded, sample_latents(loaded, p, cond, request.steps, request.cfg_scale))

    pipe, clip_l, big_g = diffusers_sdxl_pipeline(config, model.state_dict(), a1111_scheduler("ddim"))
    ids = [chunk_tokens(tokenizer.encode(t), config.text)[0] for t in (request.prompt, negative)]
    with torch.inference_mode():
        out_l = clip_l(torch.tensor(ids), output_hidden_states=True)
        out_g = big_g(torch.tensor([repad(i, pad_with_eos=False) for i in ids]), output_hidden_states=True)
        embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        pooled = out_g.text_embeds
        if not negative:  # A1111 and diffusers: an empty negative prompt is zeros
            embeds[1:], pooled[1:] = 0.0, 0.0
        latents = torch.randn(
            (1, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(request.seed)
        )
        theirs = pipe(
            prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
            negative_pooled_prompt_embeds=pooled[1:], num_inference_steps=request.steps, guidance_scale=cfg,
            eta=0.0, latents=latents, height=height, width=width, output_type="pt",
        ).images  # fmt: skip
    ours01 = ((ours + 1) / 2).clamp(0, 1)
    assert ours01.std() > 0.05  # a real picture, not a flat one
    assert _psnr(ours01, theirs) > 40
    torch.testing.assert_close(ours01, theirs, rtol=0, atol=5e-4)
    # the conditioning itself: context rows and the vectors' pooled part
    torch.testing.assert_close(cond.tensors, embeds, rtol=0, atol=1e-5)
    assert cond.vectors is not None
    torch.testing.assert_close(cond.vectors[:, : pooled.shape[1]], pooled, rtol=0, atol=1e-5)


def _loaded(name: str, seed: int) -> LoadedModel:
    model = random_model(PRESETS[name])
    randomise_(model, seed=seed)
    return LoadedModel(model=model, config=model.config, path=Path(name), dtype=torch.float32, ema=False)


def test_sdxl_base_and_refiner_equal_diffusers() -> None:
    """A1111's "Refiner switch at" 0.75 against diffusers' base ``denoising_end`` + refiner
    ``denoising_start``: the refiner takes the steps below timestep 250 and decodes with its own VAE."""
    from sdstudio.pipelines.generate import generate
    from tests.reference import diffusers_unet, diffusers_vae, transformers_open_clip

    base, refiner = _loaded("tiny-sdxl", 5), _loaded("tiny-sdxl-refiner", 6)
    width = height = 64
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blurry", sampler="DDIM", steps=10, cfg_scale=6.0, seed=77,
        width=width, height=height, refiner_switch_at=0.75,
    )  # fmt: skip
    tokenizer = ClipTokenizer()
    result = generate(base, tokenizer, request, refiner=refiner)
    ours = torch.from_numpy(np.asarray(result.images[0].image)).permute(2, 0, 1)[None] / 255.0
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.75" in result.images[0].infotext

    pipe, clip_l, big_g = diffusers_sdxl_pipeline(
        base.config, base.model.state_dict(), a1111_scheduler("ddim")
    )
    rstate = refiner.model.state_dict()
    rconfig = refiner.config
    refiner_g = transformers_open_clip(rconfig.text, rstate, "conditioner.embedders.0.model.")
    refine = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=diffusers_vae(rconfig, rstate), text_encoder=None, text_encoder_2=refiner_g, tokenizer=None,
        tokenizer_2=None, unet=diffusers_unet(rconfig, rstate), scheduler=a1111_scheduler("ddim"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    refine.set_progress_bar_config(disable=True)
    ids = [
        chunk_tokens(tokenizer.encode(t), base.config.text)[0]
        for t in (request.prompt, request.negative_prompt)
    ]
    ids_g = torch.tensor([repad(i, pad_with_eos=False) for i in ids])
    with torch.inference_mode():
        out_l = clip_l(torch.tensor(ids), output_hidden_states=True)
        out_g = big_g(ids_g, output_hidden_states=True)
        embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        noise = torch.randn(
            (1, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(request.seed)
        )
        latents = pipe(
            prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=out_g.text_embeds[:1],
            negative_pooled_prompt_embeds=out_g.text_embeds[1:], num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale, eta=0.0, latents=noise, height=height, width=width,
            denoising_end=0.75, output_type="latent",
        ).images  # fmt: skip
        out_r = refiner_g(ids_g, output_hidden_states=True)
        theirs = refine(
            image=latents, prompt_embeds=out_r.hidden_states[-2][:1], negative_prompt_embeds=out_r.hidden_states[-2][1:],
            pooled_prompt_embeds=out_r.text_embeds[:1], negative_pooled_prompt_embeds=out_r.text_embeds[1:],
            num_inference_steps=request.steps, guidance_scale=request.cfg_scale, eta=0.0, denoising_start=0.75,
            output_type="pt",
        ).images  # fmt: skip
    assert theirs.std() > 0.05
    # 8-bit rounding of our PNG bounds the PSNR near 59 dB; switching one step early gives 44 dB
    assert _psnr(ours, theirs) > 52
    # the refiner changed the picture: the base alone (switch at 1) is far from it
    alone = generate(base, tokenizer, dataclasses.replace(request, refiner_switch_at=1.0), refiner=refiner)
    alone01 = torch.from_numpy(np.asarray(alone.images[0].image)).permute(2, 0, 1)[None] / 255.0
    assert _psnr(alone01, theirs) < 30
