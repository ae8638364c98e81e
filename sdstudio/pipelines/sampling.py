"""One sampling pass, shared by txt2img, img2img, inpainting and the hires fix: plan the request, pick the
pass's sigmas, draw the seeds' noise, run the sampler over the guided denoiser."""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sdstudio.control.apply import ControlStack
from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.guidance import DenoiserFn, PromptGuidedDenoiser, SwitchedDenoiser
from sdstudio.diffusion.noise import ImageNoise, to_device
from sdstudio.diffusion.samplers import BrownianTreeNoiseSampler, NoiseSampler, SamplerInfo, SamplerStep
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.diffusion.schedulers import get_sigmas
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel
from sdstudio.pipelines.validate import (
    DEFAULT_LIMITS,
    MAX_SEED,
    Limits,
    check_pixels,
    check_request,
    check_size,
)
from sdstudio.prompt.conditioning import Conditioning
from sdstudio.types import GenerationRequest

if TYPE_CHECKING:
    from sdstudio.adapters.hypernetwork import HypernetworkStack

log = logging.getLogger(__name__)


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
    subseeds: tuple[int, ...] | None = None  # per image, when subseed_strength > 0
    subseed_strength: float = 0.0
    ensd: int = 0  # 0 where the sampler draws no step noise from the seeds (stated in ``warnings``)
    hires_size: tuple[int, int] | None = None  # (width, height) of the hires pass
    warnings: tuple[str, ...] = ()
    token_merging: float = 0.0
    ngms: float = 0.0  # Negative Guidance minimum sigma (0: off)
    ngms_all_steps: bool = False
    # the request's hypernetworks, prepared for the model's device and dtype (None: none)
    hypernetworks: HypernetworkStack | None = None


def canvas_size(request: GenerationRequest) -> tuple[int, int] | None:
    """The init image's size after outpainting, or None without an init image."""
    if request.init is None:
        return None
    w, h = request.init.image.size
    if request.inpaint is not None:
        o = request.inpaint.outpaint
        w, h = w + o.left + o.right, h + o.up + o.down
    return w, h


def plan(
    model: LoadedModel, request: GenerationRequest, limits: Limits = DEFAULT_LIMITS, upscalers: Collection[str] = ()
) -> Plan:
    """Check a request against a model and ``limits``; raise ``SdStudioError`` naming the problem and the fix.
    ``upscalers``: the learned upscalers' names the caller has loaded (see ``check_request``)."""
    config = model.config
    warnings: list[str] = []
    sampler, scheduler = check_request(request, limits, upscalers)
    canvas = canvas_size(request)
    default_w = default_h = config.default_size
    if canvas is not None:  # img2img: the image's own size, down to a multiple of 8
        default_w, default_h = max(8, canvas[0] // 8 * 8), max(8, canvas[1] // 8 * 8)
        if (request.width is None or request.height is None) and (default_w, default_h) != canvas:
            warnings.append(
                f"image size {canvas[0]}x{canvas[1]} is not a multiple of 8: generating at {default_w}x{default_h}"
            )
    width = default_w if request.width is None else request.width
    height = default_h if request.height is None else request.height
    check_size("width", width)
    check_size("height", height)
    check_pixels("size", width, height, limits)
    clip_skip = request.clip_skip if request.clip_skip is not None else config.text.default_clip_skip
    if not 1 <= clip_skip <= config.text.layers:
        raise SdStudioError(f"clip skip must be between 1 and {config.text.layers} (got {clip_skip})")
    if config.is_sdxl and clip_skip != config.text.default_clip_skip:
        # as AUTOMATIC1111 (without its sdxl_clip_l_skip option): SDXL was trained on the penultimate layers
        warnings.append(f"clip skip {clip_skip} ignored: SDXL always takes its text encoders' penultimate layers")
        clip_skip = config.text.default_clip_skip
    sampling = config.sampling.overridden(request.ngms, request.ngms_all_steps)
    ensd = request.ensd
    if ensd and sampler.brownian_noise:
        warnings.append(
            f"ENSD ignored: sampler {sampler.name!r} takes its noise from per-image Brownian trees of the seeds"
        )
        ensd = 0
    elif ensd and not sampler.needs_noise(request.eta):
        warnings.append(
            f"ENSD ignored: sampler {sampler.name!r} draws no noise after the first (eta {request.eta or 0})"
        )
        ensd = 0
    seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED)
    n = request.batch_size
    subseeds = None
    if request.subseed_strength > 0:
        # AUTOMATIC1111: with variations every image keeps the seed and the variation seed counts up.
        subseed = request.subseed if request.subseed >= 0 else secrets.randbelow(MAX_SEED)
        seeds = (seed,) * n
        subseeds = tuple((subseed + i) % (MAX_SEED + 1) for i in range(n))
    else:
        seeds = tuple((seed + i) % (MAX_SEED + 1) for i in range(n))
    hires_size = None
    if request.hires is not None:
        from sdstudio.pipelines.hires import hires_size as target

        hires_size, warning = target(width, height, request.hires.scale)
        check_pixels("hires size", *hires_size, limits)
        warnings += [warning] if warning else []
    return Plan(
        sampler=sampler,
        scheduler=scheduler,
        width=width,
        height=height,
        seeds=seeds,
        clip_skip=clip_skip,
        eta=request.eta,
        subseeds=subseeds,
        subseed_strength=request.subseed_strength,
        ensd=ensd,
        hires_size=hires_size,
        warnings=tuple(warnings),
        token_merging=request.token_merging_ratio,
        ngms=sampling.ngms,
        ngms_all_steps=sampling.ngms_all_steps,
    )


@dataclass(frozen=True)
class LatentSource:
    """What an img2img-style pass starts from, instead of pure noise."""

    latents: Tensor  # [B, C, h, w] clean latents, scaled as the UNet sees them
    strength: float  # AUTOMATIC1111's denoising strength
    fixed_steps: bool = False  # run exactly ``steps`` steps (A1111's hires second pass with its own steps)
    keep: Tensor | None = None  # [B or 1, 1, h, w], 1 = keep ``latents`` there (inpainting, normal models)


def pass_sigmas(model: LoadedModel, p: Plan, steps: int, source: LatentSource | None = None) -> Tensor | None:
    """The sigmas one pass runs: the whole schedule for txt2img; for img2img AUTOMATIC1111's accounting
    (``setup_img2img_steps`` + ``sigmas[steps - t_enc - 1:]``): the last ``t_enc + 2`` sigmas, i.e.
    ``t_enc + 1`` steps, of a ``steps``-long schedule with ``t_enc = int(min(strength, 0.999) * steps)``;
    with ``fixed_steps``, ``steps`` steps of a schedule ``int(steps / strength)`` long.

    None for strength 0: nothing is sampled (A1111 still runs its one last step there).
    """
    schedule = DiscreteSchedule.from_config(model.config.schedule)
    if source is None:
        return get_sigmas(p.scheduler, schedule, steps, p.sampler)
    if source.strength == 0:
        return None
    strength = min(source.strength, 0.999)
    if source.fixed_steps:
        total, t_enc = int(steps / strength), steps - 1
    else:
        total, t_enc = steps, int(strength * steps)
    try:
        sigmas = get_sigmas(p.scheduler, schedule, total, p.sampler)
    except ValueError as e:
        raise SdStudioError(
            f"{e} (img2img at strength {source.strength} needs a {total}-step schedule)"
        ) from None
    # counted from the end: DDIM's schedule can hold one more sigma than asked (see ddim_timesteps)
    return sigmas[-(t_enc + 2) :]


@dataclass(frozen=True)
class BlendedDenoiser:
    """Inpainting with a normal model (AUTOMATIC1111's ``CFGDenoiser`` blend): after every model call
    the x0 estimate is replaced by the original latents where ``keep`` is 1."""

    inner: DenoiserFn
    latents: Tensor  # [B, C, h, w]
    keep: Tensor  # [B or 1, 1, h, w]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.latents * self.keep + self.inner(x, sigma) * (1 - self.keep)


class PacedCallback:
    """Reports each sampler step when the GPU has finished it, not when it was queued.

    On CUDA the sampling loop has no host-device syncs, so the CPU queues steps ahead of the GPU. A
    progress bar fed at queue time would run ahead and then stall on the VAE decode. So each step records
    an event, and a step is reported once the next step is queued and its own event has completed. The
    GPU therefore always has a step queued and never waits for the CPU; ``flush`` reports the last one.
    ``event`` makes the events (``torch.cuda.Event``; tests pass a stand-in).
    """

    def __init__(self, callback: Callable[[SamplerStep], None], event: Callable[[], Any] = torch.cuda.Event):
        self.callback = callback
        self.event = event
        self.pending: deque[tuple[Any, SamplerStep]] = deque()

    def __call__(self, step: SamplerStep) -> None:
        done = self.event()
        done.record()
        self.pending.append((done, step))
        while len(self.pending) > 1:
            self._report()

    def flush(self) -> None:
        while self.pending:
            self._report()

    def _report(self) -> None:
        done, step = self.pending.popleft()
        done.synchronize()
        self.callback(step)


@dataclass(frozen=True)
class RefinerPass:
    """SDXL's refiner in a sampling pass: its model and its own conditioning; it takes the steps below
    ``switch_at`` of the noise schedule's timesteps (A1111's "Refiner switch at", diffusers'
    ``denoising_end``), or the whole pass (``whole_pass``: a hires pass after the switch, as in A1111 where
    the refiner stays loaded once switched to)."""

    model: LoadedModel
    cond: Conditioning
    switch_at: float
    whole_pass: bool = False


def sample_latents(
    model: LoadedModel,
    p: Plan,
    cond: Conditioning,
    steps: int,
    cfg_scale: float,
    callback: Callable[[SamplerStep], None] | None = None,
    *,
    source: LatentSource | None = None,
    extra: Tensor | None = None,
    refiner: RefinerPass | None = None,
    control: ControlStack | None = None,
) -> Tensor:
    """Run the sampler from the seeds' noise (txt2img) or from ``source`` noised to its strength; the clean
    latents (scaled, as the UNet sees them). ``extra``: inpainting models' mask + masked-image latents;
    ``refiner``: SDXL's refiner takes over the pass's low-noise steps (or all of it); ``control``: the
    pass's ControlNets (the model's, not the refiner's steps). [B, 4, h, w]"""
    config = model.config
    device = model.device
    schedule = DiscreteSchedule.from_config(config.schedule).to(device)
    sigmas = pass_sigmas(model, p, steps, source)
    if sigmas is None:
        assert source is not None
        return source.latents

    def guided_by(loaded: LoadedModel, c: Conditioning, control: ControlStack | None = None) -> DenoiserFn:
        # a compiled or CUDA-graph runner takes the UNet's plain arguments only: hypernetworks run it directly
        # (and SDXL's vector y, which they were not captured with)
        plain = p.hypernetworks is None and c.vectors is None and control is None
        runner = loaded.unet_runner if plain else None
        unet = runner if runner is not None else loaded.model.unet
        denoiser = Denoiser(
            unet, schedule, loaded.config.prediction, token_merging=p.token_merging, hypernetworks=p.hypernetworks
        )
        return PromptGuidedDenoiser(
            denoiser, c.tensors, c.positive, c.negative, cfg_scale, tuple(sigmas.tolist()), extra,
            ngms=p.ngms, ngms_all_steps=p.ngms_all_steps, vectors=c.vectors, control=control,
        )  # fmt: skip

    guided = guided_by(model, cond, control)
    if refiner is not None:
        second = guided_by(refiner.model, refiner.cond)
        if refiner.whole_pass:
            guided = second
        else:
            cutoff = round(config.schedule.timesteps * (1 - refiner.switch_at))
            guided = SwitchedDenoiser(guided, second, schedule.sigma_to_t, cutoff)
    down = config.vae.downsample
    shape = (config.unet.out_channels, p.height // down, p.width // down)
    if source is not None:
        shape = tuple(source.latents.shape[1:])
    noise = ImageNoise(
        list(p.seeds), shape, subseeds=p.subseeds, subseed_strength=p.subseed_strength, ensd=p.ensd
    )
    first = to_device(noise.draw(), device)  # drawn on the CPU: a seed gives the same image on any device
    if source is None:
        x = first * p.sampler.initial_scale(sigmas[0])
    else:  # x = x0 + sigma eps for every sampler (VP: sqrt(abar) x0 + sqrt(1 - abar) eps, rescaled)
        x = source.latents + first * float(sigmas[0])
        if source.keep is not None:
            guided = BlendedDenoiser(guided, source.latents, source.keep)
    settings = {"eta": p.eta} if p.eta is not None else {}
    step_noise: NoiseSampler = noise
    if p.sampler.brownian_noise:  # SDE samplers: one Brownian tree per image, from its seed
        step_noise = BrownianTreeNoiseSampler.for_sigmas(x.shape, sigmas, p.seeds)
    paced = PacedCallback(callback) if callback is not None and device.type == "cuda" else None
    latents = p.sampler.function(guided, x, sigmas, noise=step_noise, callback=paced or callback, **settings)
    if paced is not None:
        paced.flush()
    latents = latents * p.sampler.final_scale(sigmas[-1])
    if source is not None and source.keep is not None:
        latents = latents * (1 - source.keep) + source.latents * source.keep
    return latents
