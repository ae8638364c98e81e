"""Few-step models through the existing samplers: an LCM-LoRA (random, kohya format, on the UNet) with the
``LCM`` sampler at CFG 1 equals diffusers' LCMScheduler with the same LoRA fused, in one step (a step of
SD-Turbo / LCM's single-step use); in four steps it runs without warnings and uses every key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstudio.adapters.library import NetworkLibrary
from sdstudio.engine import Pipeline
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import chunk_tokens
from sdstudio.types import GenerationRequest
from tests.adapters.loras import loaded, lora_targets, random_kohya, tiny_model
from tests.reference import diffusers_pipeline

diffusers = pytest.importorskip("diffusers")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_lcm_lora_in_one_step_equals_diffusers_lcm(tmp_path: Path) -> None:
    model = tiny_model("tiny", seed=3)
    targets = {k: v for k, v in lora_targets(model.config, model.state_dict()).items() if k.startswith("lora_unet_")}
    lora = random_kohya(targets, rank=4, alpha=4.0, seed=5)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(lora, str(folder / "lcm-lora.safetensors"))
    pipe = Pipeline(loaded(model), loras=NetworkLibrary([folder]), strict_networks=True)
    request = GenerationRequest(prompt="a red circle <lora:lcm-lora:1>", sampler="LCM", steps=1, cfg_scale=1.0,
                                seed=21, width=64, height=64)  # fmt: skip
    ours = pipe(request)
    assert not ours.warnings and "Lora hashes" in ours.images[0].infotext
    four = pipe(GenerationRequest(**{**request.__dict__, "steps": 4}))
    assert not four.warnings
    plain = pipe(GenerationRequest(**{**request.__dict__, "prompt": "a red circle"}))

    state = model.state_dict()
    dpipe, clip = diffusers_pipeline(
        model.config, state,
        diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               set_alpha_to_one=False, steps_offset=1),
    )  # fmt: skip
    dpipe.load_lora_weights(str(folder / "lcm-lora.safetensors"))
    dpipe.fuse_lora()
    tokenizer = ClipTokenizer()
    ids = chunk_tokens(tokenizer.encode("a red circle"), model.config.text)[0]
    with torch.inference_mode():
        embeds = clip(torch.tensor([ids])).last_hidden_state
        latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(21))
        theirs = dpipe(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=1.0, latents=latents,
                       height=64, width=64, output_type="pt").images  # fmt: skip

    def tensor(result) -> torch.Tensor:
        return torch.from_numpy(np.asarray(result.images[0].image)).permute(2, 0, 1)[None].float() / 255

    # diffusers' LCM applies the consistency boundary scalings; at t = 999 they are 1 and ~1e-8
    assert _psnr(tensor(ours), theirs) > 45
    assert _psnr(tensor(plain), theirs) < 35  # the LoRA mattered
    assert np.abs(np.asarray(four.images[0].image, dtype=int) - np.asarray(ours.images[0].image)).mean() > 1
