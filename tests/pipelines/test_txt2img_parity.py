"""End to end: our DDIM (eta 0) txt2img equals diffusers' StableDiffusionPipeline on the same random
weights, prompt, seed, steps and CFG (the text encoder, UNet and VAE each reach diffusers through its
own single-file converters)."""

from pathlib import Path

import pytest
import torch

from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.txt2img import decode_latents, parse_request, plan, sample_latents
from sdstudio.prompt.conditioning import chunk_tokens, encode_conditioning
from sdstudio.types import GenerationRequest
from tests.reference import diffusers_pipeline, randomise_

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_ddim_txt2img_equals_diffusers(cfg):
    config = PRESETS["tiny"]
    model = random_model(config)
    randomise_(model, seed=5)
    loaded = LoadedModel(model=model, config=config, path=Path("tiny"), dtype=torch.float32, ema=False)
    request = GenerationRequest(
        prompt="a red circle left of a blue square",
        negative_prompt="blurry",
        sampler="DDIM",
        steps=10,
        cfg_scale=cfg,
        seed=1234,
        width=64,
        height=64,
    )
    tokenizer = ClipTokenizer()
    p = plan(loaded, request)
    with torch.inference_mode():
        cond = encode_conditioning(model.text_encoder, tokenizer, config.text, *parse_request(request), 1)
        ours = decode_latents(loaded, sample_latents(loaded, p, cond, request.steps, request.cfg_scale))

    state = model.state_dict()
    pipe, clip = diffusers_pipeline(
        config,
        state,
        diffusers.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    ids = [chunk_tokens(tokenizer.encode(t), config.text)[0] for t in (request.prompt, request.negative_prompt)]
    with torch.inference_mode():
        embeds = clip(torch.tensor(ids)).last_hidden_state
        latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(request.seed))
        theirs = pipe(
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            num_inference_steps=request.steps,
            guidance_scale=cfg,
            eta=0.0,
            latents=latents,
            height=64,
            width=64,
            output_type="pt",
        ).images
    ours01 = ((ours + 1) / 2).clamp(0, 1)
    assert ours01.std() > 0.05  # a real picture, not a flat one
    torch.testing.assert_close(ours01, theirs, rtol=0, atol=2e-4)
    # the text conditioning itself agrees with transformers' hidden states
    assert cond.texts == (request.prompt, request.negative_prompt)
    torch.testing.assert_close(cond.tensors, embeds, rtol=0, atol=1e-5)
