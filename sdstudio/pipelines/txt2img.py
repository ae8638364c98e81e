"""txt2img: prompt -> conditioning -> sampler over the guided denoiser -> latents -> VAE -> images."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdstudio import __version__
from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.guidance import PromptGuidedDenoiser
from sdstudio.diffusion.noise import ImageNoise
from sdstudio.diffusion.samplers import (
    BrownianTreeNoiseSampler,
    NoiseSampler,
    SamplerInfo,
    SamplerStep,
    resolve_sampler,
)
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.diffusion.schedulers import get_sigmas
from sdstudio.errors import SdStudioError
from sdstudio.io.images import to_pil
from sdstudio.io.infotext import format_infotext, format_number
from sdstudio.models.loading import LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import Conditioning, encode_conditioning, prompt_warnings
from sdstudio.prompt.embeddings import EmbeddingDatabase
from sdstudio.prompt.parser import ParsedPrompt, parse
from sdstudio.types import GeneratedImage, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Plan:
    """A request with every default resolved and every value checked."""

    sampler: SamplerInfo
    scheduler: str
    width: int
    height: int
    seeds: tuple[int, ...]
    clip_skip: int
    eta: float | None


def plan(model: LoadedModel, request: GenerationRequest) -> Plan:
    """Check a request against a model; raise ``SdStudioError`` naming the problem and the fix."""
    config = model.config
    try:
        sampler, legacy_scheduler = resolve_sampler(request.sampler)
    except ValueError as e:
        raise SdStudioError(str(e)) from None
    scheduler = legacy_scheduler or request.scheduler
    width = config.default_size if request.width is None else request.width
    height = config.default_size if request.height is None else request.height
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise SdStudioError(f"{name} {value} is not a positive multiple of 8; use e.g. {max(8, value // 8 * 8)}")
    if request.steps < 1:
        raise SdStudioError(f"steps must be at least 1 (got {request.steps})")
    if request.batch_size < 1:
        raise SdStudioError(f"batch size must be at least 1 (got {request.batch_size})")
    if request.cfg_scale < 0:
        raise SdStudioError(f"CFG scale must be >= 0 (got {request.cfg_scale})")
    clip_skip = request.clip_skip if request.clip_skip is not None else config.text.default_clip_skip
    if not 1 <= clip_skip <= config.text.layers:
        raise SdStudioError(f"clip skip must be between 1 and {config.text.layers} (got {clip_skip})")
    if request.eta is not None and not sampler.uses_eta:
        raise SdStudioError(f"sampler {sampler.name!r} does not use eta; leave --eta out or pick an ancestral/DDIM sampler")
    seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED)
    if seed > MAX_SEED:
        raise SdStudioError(f"seed must be at most {MAX_SEED} (got {seed})")
    seeds = tuple((seed + i) % (MAX_SEED + 1) for i in range(request.batch_size))
    return Plan(sampler, scheduler, width, height, seeds, clip_skip, request.eta)


def infotext(model: LoadedModel, request: GenerationRequest, p: Plan, seed: int) -> str:
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": p.sampler.name,
        "Schedule type": p.scheduler if p.scheduler != "Automatic" else None,
        "CFG scale": format_number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model.short_hash or None,
        "Model": model.name,
        "Clip skip": p.clip_skip if p.clip_skip != 1 else None,
        "Eta": format_number(p.eta) if p.eta is not None else None,
        "Version": f"sdstudio {__version__}",
    }
    return format_infotext(request.prompt, request.negative_prompt, params)


def sample_latents(
    model: LoadedModel,
    p: Plan,
    cond: Conditioning,
    steps: int,
    cfg_scale: float,
    callback: Callable[[SamplerStep], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from the seeds' noise; the clean latents (unscaled, as the UNet sees them). [B, 4, h, w]"""
    config = model.config
    schedule = DiscreteSchedule.from_config(config.schedule)
    denoiser = Denoiser(model.model.unet, schedule, config.prediction)
    sigmas = get_sigmas(p.scheduler, schedule, steps, p.sampler)
    guided = PromptGuidedDenoiser(
        denoiser, cond.tensors, cond.positive, cond.negative, cfg_scale, tuple(sigmas.tolist())
    )
    down = config.vae.downsample
    noise = ImageNoise(list(p.seeds), (config.unet.out_channels, p.height // down, p.width // down))
    x = noise.draw() * p.sampler.initial_scale(sigmas[0])
    settings = {"eta": p.eta} if p.eta is not None else {}
    step_noise: NoiseSampler = noise
    if p.sampler.brownian_noise:  # SDE samplers: one Brownian tree per image, from its seed
        step_noise = BrownianTreeNoiseSampler.for_sigmas(x.shape, sigmas, p.seeds)
    latents = p.sampler.function(guided, x, sigmas, noise=step_noise, callback=callback, **settings)
    return latents * p.sampler.final_scale(sigmas[-1])


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], float32. [B, 3, H, W]"""
    vae = model.model.vae
    dtype = next(vae.parameters()).dtype
    return vae.decode((latents / model.config.vae.scale_factor).to(dtype)).float()


def parse_request(request: GenerationRequest) -> tuple[ParsedPrompt, ParsedPrompt]:
    """The prompt (composable) and the negative (scheduled, not composable), for the request's steps."""
    return parse(request.prompt, request.steps), parse(request.negative_prompt, request.steps, composable=False)


def txt2img(
    model: LoadedModel,
    tokenizer: ClipTokenizer,
    request: GenerationRequest,
    callback: Callable[[SamplerStep], None] | None = None,
    embeddings: EmbeddingDatabase | None = None,
) -> GenerationResult:
    p = plan(model, request)
    sd = model.model
    positive, negative = parse_request(request)
    warnings = [*(embeddings.warnings if embeddings else ()), *prompt_warnings(positive, embeddings)]
    warnings += prompt_warnings(negative, embeddings)
    with torch.inference_mode():
        cond = encode_conditioning(
            sd.text_encoder, tokenizer, model.config.text, positive, negative, p.clip_skip, embeddings
        )
        latents = sample_latents(model, p, cond, request.steps, request.cfg_scale, callback)
        images = to_pil(decode_latents(model, latents))
    return GenerationResult(
        request=request,
        images=tuple(
            GeneratedImage(image=img, seed=seed, infotext=infotext(model, request, p, seed))
            for img, seed in zip(images, p.seeds)
        ),
        warnings=tuple(dict.fromkeys(warnings)),
    )
