"""One pipeline for txt2img, img2img, inpainting, outpainting and the hires fix; they differ only in where
the first pass starts (noise or an encoded image), whether a mask is blended or fed to the model, and
whether a second pass follows:

plan -> memory check -> conditioning -> [source image -> latents] -> sample -> [upscale -> sample] -> decode
-> [paste back]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from sdstudio import __version__
from sdstudio.control.apply import (
    CONTROL_DOWNSAMPLE,
    ControlStack,
    ResolvedControl,
    control_stack,
    infotext_entries,
    prepare_controls,
)
from sdstudio.diffusion.noise import ImageNoise
from sdstudio.diffusion.samplers import SamplerStep
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.io.images import from_pil, to_pil
from sdstudio.io.infotext import format_infotext, format_number, format_outpaint
from sdstudio.models.loading import LoadedModel
from sdstudio.models.sdxl import SizeConditioning
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines import vae_tiling
from sdstudio.pipelines.hires import LATENT_UPSCALERS, upscale_images, upscale_latents
from sdstudio.pipelines.img2img import SourceImage, prepare_source
from sdstudio.pipelines.inpaint import conditioning_mask, inpaint_extra, latent_keep, paste_back
from sdstudio.pipelines.memory import check_memory, guidance_rows
from sdstudio.pipelines.sampling import LatentSource, Plan, RefinerPass, pass_sigmas, plan, sample_latents
from sdstudio.pipelines.validate import DEFAULT_LIMITS, Limits
from sdstudio.prompt.conditioning import Conditioning, encode_conditioning, prompt_warnings
from sdstudio.prompt.embeddings import EmbeddingDatabase
from sdstudio.prompt.parser import ParsedPrompt, parse
from sdstudio.prompt.vocabulary import trained_on_warnings
from sdstudio.types import GeneratedImage, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from sdstudio.adapters.activate import ActiveNetworks
    from sdstudio.upscale import Upscaler as ImageUpscaler

log = logging.getLogger(__name__)

Callback = Callable[[SamplerStep], None]


def parse_request(request: GenerationRequest) -> tuple[ParsedPrompt, ParsedPrompt]:
    """The prompt (composable) and the negative (scheduled, not composable), for the request's steps and,
    with the hires fix, its second pass (``.hires``)."""
    hires_steps = None if request.hires is None else (request.hires.steps or request.steps)
    return (
        parse(request.prompt, request.steps, hires_steps),
        parse(request.negative_prompt, request.steps, hires_steps, composable=False),
    )


def infotext(
    model: LoadedModel,
    request: GenerationRequest,
    p: Plan,
    index: int,
    extra: Sequence[tuple[str, str]] = (),
    prompt_tags: str = "",
) -> str:
    """AUTOMATIC1111's parameter line for image ``index``, in its key order and spelling. ``extra``: entries
    A1111 adds after its own (``Lora hashes``, ``TI hashes``, ...); ``prompt_tags``: network tags for the
    request's ``networks``, appended to the prompt so that the line replays them."""
    seed = p.seeds[index]
    init, inpaint, hires = request.init, request.inpaint, request.hires
    strength = init.strength if init is not None else hires.strength if hires is not None else None
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": p.sampler.name,
        "Schedule type": p.scheduler if p.scheduler != "Automatic" else None,
        "CFG scale": format_number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model.short_hash or None,
        "Model": model.name,
        "VAE hash": model.vae_hash,
        "VAE": model.vae_name,
        "Variation seed": p.subseeds[index] if p.subseeds else None,
        "Variation seed strength": format_number(p.subseed_strength) if p.subseeds else None,
        "Denoising strength": format_number(strength) if strength is not None else None,
        "Clip skip": p.clip_skip if p.clip_skip != 1 and not model.config.is_sdxl else None,
        "ENSD": p.ensd or None,
        "Resize mode": init.resize_mode if init is not None and init.resize_mode != "just resize" else None,
    }
    if inpaint is not None:
        params["Mask blur"] = inpaint.blur
        params["Masked content"] = inpaint.masked_content
        if inpaint.only_masked:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = inpaint.only_masked_padding
        params["Outpaint"] = format_outpaint(inpaint.outpaint) if inpaint.outpaint.any else None
    if hires is not None:
        params["Hires upscale"] = format_number(hires.scale)
        params["Hires steps"] = hires.steps or None
        params["Hires upscaler"] = hires.upscaler
    params["Eta"] = format_number(p.eta) if p.eta is not None else None
    params["Token merging ratio"] = format_number(p.token_merging) if p.token_merging else None
    # Also where it is off against a model default that is on, so that the line replays exactly.
    params["NGMS"] = format_number(p.ngms) if p.ngms or model.config.sampling.ngms else None
    all_steps = p.ngms and (p.ngms_all_steps or model.config.sampling.ngms_all_steps)
    params["NGMS all steps"] = str(p.ngms_all_steps) if all_steps else None
    params.update(extra)
    params["Version"] = f"sdstudio {__version__}"
    prompt = f"{request.prompt} {prompt_tags}" if prompt_tags else request.prompt
    return format_infotext(prompt, request.negative_prompt, params)


def ti_hashes(
    embeddings: EmbeddingDatabase, tokenizer: ClipTokenizer, prompts: Sequence[ParsedPrompt]
) -> list[tuple[str, str]]:
    """AUTOMATIC1111's ``TI hashes: "name: 0123456789ab, ..."`` for the embeddings the prompts use (12
    digits of the file's sha256; ``:`` and ``,`` removed from names), or nothing."""
    texts: dict[str, None] = {}
    for parsed in prompts:
        for part in (parsed, parsed.hires):
            for sub in part.subprompts if part is not None else ():
                for entry in sub.schedule:
                    texts.update(dict.fromkeys(fragment for fragment, _ in entry.attention))
    used = embeddings.used_in(tokenizer, texts)
    hashes = [f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in used if e.short_hash]
    return [("TI hashes", ", ".join(hashes))] if hashes else []


def encode_images(model: LoadedModel, images: list[Image.Image], tiled: bool | None) -> Tensor:
    """RGB images -> scaled latents (posterior mean). [B, 4, h, w]"""
    x = torch.cat([from_pil(im) for im in images])
    return vae_tiling.encode_mean(model.model.vae, x, tiled) * model.config.vae.scale_factor


def decode_latents(model: LoadedModel, latents: Tensor, tiled: bool | None = False) -> Tensor:
    """Scaled latents -> images in [-1, 1], float32, unchecked. [B, 3, H, W]"""
    return vae_tiling.decode(model.model.vae, latents / model.config.vae.scale_factor, tiled)


def decode_images(model: LoadedModel, latents: Tensor, tiled: bool | None) -> tuple[Tensor, list[str]]:
    """Scaled latents -> images in [-1, 1], tiled above a size, re-decoded in float32 on NaN/inf."""
    return vae_tiling.decode_checked(model.model.vae, latents / model.config.vae.scale_factor, tiled)


def unmasked_extra(
    model: LoadedModel, batch: int, height: int, width: int, tiled: bool | None
) -> Tensor | None:
    """Inpainting models without a mask (txt2img, hires, plain img2img): repaint everything, masked image
    all grey (AUTOMATIC1111's ``txt2img_image_conditioning``). None for normal models. [B, 5, h, w]"""
    if not model.config.is_inpainting:
        return None
    grey = torch.zeros(1, 3, height, width)
    latents = vae_tiling.encode_mean(model.model.vae, grey, tiled) * model.config.vae.scale_factor
    return inpaint_extra(conditioning_mask(None, height, width), latents.expand(batch, -1, -1, -1))


def source_latents(
    model: LoadedModel, request: GenerationRequest, p: Plan, src: SourceImage
) -> tuple[LatentSource, Tensor | None]:
    """The first pass's start for img2img/inpainting, and the inpainting model's extra input."""
    assert request.init is not None
    batch = len(p.seeds)
    tiled = request.vae_tiling
    latents = encode_images(model, [src.image], tiled).expand(batch, -1, -1, -1)
    if src.mask is None:
        extra = unmasked_extra(model, batch, p.height, p.width, tiled)
        return LatentSource(latents, request.init.strength), extra
    assert request.inpaint is not None
    keep = latent_keep(src.mask, latents.shape[-2], latents.shape[-1]).to(latents.device)
    content = request.inpaint.masked_content
    if content == "latent noise":  # A1111 draws it from the seeds: the same noise as the first draw
        noise = ImageNoise(list(p.seeds), tuple(latents.shape[1:])).draw().to(latents.device)
        latents = latents * keep + noise * (1 - keep)
    elif content == "latent nothing":
        latents = latents * keep
    extra = None
    if model.config.is_inpainting:
        cmask = conditioning_mask(src.mask, p.height, p.width)
        masked_image = from_pil(src.image) * (1 - cmask)
        masked = vae_tiling.encode_mean(model.model.vae, masked_image, tiled) * model.config.vae.scale_factor
        extra = inpaint_extra(cmask, masked.expand(batch, -1, -1, -1))
        keep_for_blend = None  # the model sees the mask; the overlay restores the kept pixels afterwards
    else:
        keep_for_blend = keep
    return LatentSource(latents, request.init.strength, keep=keep_for_blend), extra


def _offset(callback: Callback | None, offset: int, total: int) -> Callback | None:
    """Report a pass's steps as steps of the whole generation."""
    if callback is None:
        return None
    return lambda s: callback(SamplerStep(offset + s.i, total, s.x, s.sigma, s.denoised))


def _steps(sigmas: Tensor | None) -> int:
    return 0 if sigmas is None else len(sigmas) - 1


def check_refiner(model: LoadedModel, refiner: LoadedModel | None, request: GenerationRequest) -> None:
    """A refiner asked for must be loaded, and must share the model's latent space."""
    if request.refiner_switch_at is None:
        return
    if refiner is None:
        raise SdStudioError(
            "the request asks for a refiner (refiner_switch_at) but none is loaded: load one with --refiner FILE"
        )
    check_refiner_fits(model, refiner)


def check_refiner_fits(model: LoadedModel, refiner: LoadedModel) -> None:
    """A refiner must share the model's latent space (and its kind of UNet input)."""
    a, b = model.config.vae, refiner.config.vae
    if (a.z_channels, a.downsample, a.scale_factor) != (b.z_channels, b.downsample, b.scale_factor):
        raise SdStudioError(
            f"refiner {refiner.name!r} works in another latent space than {model.name!r} (VAE latents "
            f"{b.z_channels} x /{b.downsample}, scale {b.scale_factor} against {a.z_channels} x /{a.downsample}, "
            f"scale {a.scale_factor}): pick a refiner of the same family (SDXL's for SDXL)"
        )
    if refiner.config.unet.in_channels != model.config.unet.in_channels:
        raise SdStudioError(f"refiner {refiner.name!r}: an inpainting model cannot refine a normal one (or back)")


def refiner_conditioning(
    refiner: LoadedModel, tokenizer: ClipTokenizer, positive: ParsedPrompt, negative: ParsedPrompt, width: int,
    height: int,
) -> Conditioning:  # fmt: skip
    """The prompt as the refiner's own text encoder(s) read it, at its default clip skip (no embeddings:
    their vectors belong to the base model's text encoder)."""
    size = SizeConditioning.of_image(width, height)
    text = refiner.config.text
    return encode_conditioning(
        refiner.model.text_encoder, tokenizer, text, positive, negative, text.default_clip_skip, None, size=size
    )


def refiner_takes_over(model: LoadedModel, sigmas: Tensor | None, switch_at: float) -> bool:
    """Whether a pass over ``sigmas`` reaches the refiner's steps (an evaluation below its cutoff)."""
    if sigmas is None or len(sigmas) < 2:
        return False
    schedule = DiscreteSchedule.from_config(model.config.schedule)
    cutoff = round(model.config.schedule.timesteps * (1 - switch_at))
    evaluated = sigmas[:-1].float().cpu()
    return bool((schedule.sigma_to_t(evaluated[evaluated > 0]) < cutoff).any())


def hires_refined(model: LoadedModel, request: GenerationRequest, p: Plan, refine: RefinerPass) -> bool:
    """Whether the hires pass reached the refiner (it runs on it throughout once the first pass did)."""
    if refine.whole_pass:
        return True
    assert request.hires is not None
    hp = dataclasses.replace(p, width=p.hires_size[0], height=p.hires_size[1]) if p.hires_size else p
    source = LatentSource(torch.empty(0), request.hires.strength, fixed_steps=request.hires.steps > 0)
    return refiner_takes_over(model, pass_sigmas(model, hp, request.hires.steps or request.steps, source), refine.switch_at)


def hires_pass(
    model: LoadedModel,
    request: GenerationRequest,
    p: Plan,
    cond: Conditioning,
    latents: Tensor,
    callback: Callback | None,
    refiner: RefinerPass | None = None,
    control: ControlStack | None = None,
    upscaler: ImageUpscaler | None = None,
) -> Tensor:
    """AUTOMATIC1111's hires fix second pass: upscale, then img2img at the hires strength with fresh
    noise from the same seeds at the new size (``refiner``: SDXL's refiner in this pass)."""
    hires = request.hires
    assert hires is not None and p.hires_size is not None
    width, height = p.hires_size
    down = model.config.vae.downsample
    if hires.upscaler in LATENT_UPSCALERS:
        up = upscale_latents(latents, (height // down, width // down), hires.upscaler)
    else:
        images = to_pil(decode_images(model, latents, request.vae_tiling)[0])
        if upscaler is not None:  # a learned upscaler (ESRGAN family), then Lanczos to the size
            resized = upscaler.upscale(images, width, height)
        else:
            resized = upscale_images(images, width, height, hires.upscaler)
        up = encode_images(model, resized, request.vae_tiling)
    hp = dataclasses.replace(p, width=width, height=height)
    source = LatentSource(up, hires.strength, fixed_steps=hires.steps > 0)
    extra = unmasked_extra(model, len(p.seeds), height, width, request.vae_tiling)
    return sample_latents(
        model, hp, cond, hires.steps or request.steps, request.cfg_scale, callback, source=source, extra=extra,
        refiner=refiner, control=control,
    )  # fmt: skip


def generate(
    model: LoadedModel,
    tokenizer: ClipTokenizer,
    request: GenerationRequest,
    callback: Callback | None = None,
    embeddings: EmbeddingDatabase | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    memory_budget: int | None = None,
    networks: ActiveNetworks | None = None,
    refiner: LoadedModel | None = None,
    controls: Sequence[ResolvedControl] = (),
    upscaler: ImageUpscaler | None = None,
) -> GenerationResult:
    """txt2img, img2img, inpainting, outpainting, hires fix: whichever ``request`` asks for.

    ``callback`` gets every sampler step, numbered over all passes (``total`` counts both passes).
    The request is checked against ``limits`` (:func:`plan`), then its peak memory is estimated and
    checked against ``memory_budget`` bytes (None: what the machine can give now;
    :func:`sdstudio.pipelines.memory.check_memory`): a request that cannot fit raises ``SdStudioError``
    before any work, and automatic VAE tiling is turned on where that makes it fit.

    ``networks``: the request's LoRAs (already merged into the weights) and hypernetworks, as
    :meth:`sdstudio.adapters.activate.ModelNetworks.activate` made them for this request; without them the
    prompt's ``<lora:...>`` / ``<hypernet:...>`` tags are ignored with a warning.

    ``refiner``: SDXL's refiner, used when the request gives ``refiner_switch_at`` (AUTOMATIC1111's
    semantics: it takes every step whose timestep is below that share of the schedule, keeps the rest of the
    run, hires pass included, and decodes with its own VAE). ``controls``: the request's ControlNet units
    with their networks loaded (``request.controls``, resolved by the caller), applied in every pass.
    ``upscaler``: the learned upscaler the hires fix's ``upscaler`` names, loaded by the caller.
    """
    learned = (request.hires.upscaler,) if upscaler is not None and request.hires is not None else ()
    p = plan(model, request, limits, learned)
    check_refiner(model, refiner, request)
    if networks is not None and networks.hypernetworks:
        from sdstudio.adapters.hypernetwork import prepare_hypernetworks

        p = dataclasses.replace(
            p,
            hypernetworks=prepare_hypernetworks(networks.hypernetworks, model.device, model.model.unet.dtype),
        )
    sd = model.model
    positive, negative = parse_request(request)
    rows = max(guidance_rows(request, part) for part in (positive, positive.hires) if part is not None)
    memory = check_memory(model, p, request, rows=rows, available=memory_budget)
    result_request = request
    if memory.tiled != request.vae_tiling:  # every encode and decode below reads the request's tiling
        request = dataclasses.replace(request, vae_tiling=memory.tiled)
    warnings = [*p.warnings, *memory.warnings, *(embeddings.warnings if embeddings else ())]
    warnings += networks.warnings if networks is not None else ()
    applied = networks is not None
    warnings += [
        *prompt_warnings(positive, embeddings, applied),
        *prompt_warnings(negative, embeddings, applied),
    ]
    warnings += trained_on_warnings(  # a model that states its vocabulary and sizes (the embedded one)
        model.config, positive, negative, (p.width, p.height), p.hires_size,
        embeddings.embeddings if embeddings else (),
    )  # fmt: skip
    src = prepare_source(request, p.width, p.height) if request.init is not None else None
    warnings += src.warnings if src is not None else ()
    if len(controls) != len(request.controls):
        raise SdStudioError(f"{len(request.controls)} ControlNet units asked for, {len(controls)} loaded")
    if controls and model.config.vae.downsample != CONTROL_DOWNSAMPLE:
        raise SdStudioError(
            f"ControlNets read their control image at {CONTROL_DOWNSAMPLE}x the latents' size; this model's VAE "
            f"scales by {model.config.vae.downsample}: no ControlNet fits it"
        )
    init_image = request.init.image if request.init is not None else None
    mask = request.inpaint.mask if request.inpaint is not None else None
    prepared = prepare_controls(controls, init_image, mask)
    with torch.inference_mode():
        cond = encode_conditioning(
            sd.text_encoder, tokenizer, model.config.text, positive, negative, p.clip_skip, embeddings,
            size=SizeConditioning.of_image(p.width, p.height),
        )  # fmt: skip
        if src is not None:
            source, extra = source_latents(model, request, p, src)
        else:
            source, extra = None, unmasked_extra(model, len(p.seeds), p.height, p.width, request.vae_tiling)
        first_sigmas = pass_sigmas(model, p, request.steps, source)
        first = _steps(first_sigmas)
        refine = None
        if refiner is not None and request.refiner_switch_at is not None:
            refine = RefinerPass(
                refiner, refiner_conditioning(refiner, tokenizer, positive, negative, p.width, p.height),
                request.refiner_switch_at,
            )  # fmt: skip
        second = 0
        if request.hires is not None:
            hires_source = LatentSource(
                torch.empty(0), request.hires.strength, fixed_steps=request.hires.steps > 0
            )
            second = _steps(pass_sigmas(model, p, request.hires.steps or request.steps, hires_source))
        total = first + second
        latents = sample_latents(
            model,
            p,
            cond,
            request.steps,
            request.cfg_scale,
            _offset(callback, 0, total),
            source=source,
            extra=extra,
            refiner=refine,
            control=control_stack(prepared, p.width, p.height),
        )
        refined = refine is not None and refiner_takes_over(model, first_sigmas, refine.switch_at)
        if request.hires is not None:
            assert positive.hires is not None and negative.hires is not None
            hires_cond = encode_conditioning(
                sd.text_encoder,
                tokenizer,
                model.config.text,
                positive.hires,
                negative.hires,
                p.clip_skip,
                embeddings,
                size=SizeConditioning.of_image(*p.hires_size) if p.hires_size else None,
            )
            hires_refine = None
            if refine is not None:
                assert p.hires_size is not None and positive.hires is not None and negative.hires is not None
                hires_refine = RefinerPass(
                    refine.model,
                    refiner_conditioning(refine.model, tokenizer, positive.hires, negative.hires, *p.hires_size),
                    refine.switch_at,
                    whole_pass=refined,
                )
            hires_control = control_stack(prepared, *p.hires_size) if p.hires_size else None
            latents = hires_pass(
                model, request, p, hires_cond, latents, _offset(callback, first, total), hires_refine, hires_control,
                upscaler,
            )
            refined = refined or (hires_refine is not None and hires_refined(model, request, p, hires_refine))
        decoder = refiner if refined and refiner is not None else model
        decoded, decode_warnings = decode_images(decoder, latents, request.vae_tiling)
        images = to_pil(decoded)
    warnings += decode_warnings
    if src is not None and src.overlay is not None:
        images = [paste_back(im, src.overlay, src.base, src.box) for im in images]
    extra = list(networks.params if networks is not None else ())
    if refine is not None and refiner is not None:  # A1111's entries, written whenever a refiner is asked for
        hashed = f"{refiner.name} [{refiner.short_hash}]" if refiner.short_hash else refiner.name
        extra += [("Refiner", hashed), ("Refiner switch at", format_number(refine.switch_at))]
    extra += infotext_entries(controls)
    if embeddings is not None:
        extra += ti_hashes(embeddings, tokenizer, [positive, negative])
    tags = networks.tags if networks is not None else ""
    return GenerationResult(
        request=result_request,
        images=tuple(
            GeneratedImage(
                image=img,
                seed=p.seeds[i],
                infotext=infotext(model, result_request, p, i, extra, tags),
                subseed=p.subseeds[i] if p.subseeds else None,
            )
            for i, img in enumerate(images)
        ),
        warnings=tuple(dict.fromkeys(warnings)),
    )
