"""Checks of a request that need no model: every name known, every value of the right type, finite and in
range, every size within the operator's caps. The CLI runs them before it loads a model; :func:`plan`
(``sdstudio.pipelines.sampling``) runs them again for every other caller, so the Python API and the HTTP
API refuse the same requests with the same one-line messages."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from numbers import Real

from PIL import Image

from sdstudio.diffusion.samplers import SamplerInfo, resolve_sampler
from sdstudio.diffusion.schedulers import resolve_scheduler
from sdstudio.errors import SdStudioError
from sdstudio.models.tome import MAX_RATIO
from sdstudio.types import (
    CONTROL_MODES,
    CONTROL_RESIZE_MODES,
    MASKED_CONTENTS,
    RESIZE_MODES,
    ControlSpec,
    GenerationRequest,
    Hires,
    InitImage,
    Inpaint,
    Outpaint,
)

MAX_SEED = 2**32 - 1
MAX_CFG = 100.0  # ComfyUI's cap too; past it every image is burnt
MAX_HIRES_SCALE = 16.0  # the pixel cap binds long before; this keeps int(side * scale) finite
MAX_MASK_BLUR = 256
MAX_PADDING = 4096


@dataclass(frozen=True)
class Limits:
    """Caps an operator sets (``--max-pixels``, ``--max-steps``, ``--max-batch``). They stop a typo from
    running for hours or from exhausting memory; what fits in memory is decided later, by the memory
    estimate, against the machine's free memory.

    ``max_pixels`` bounds width x height of every pass of one image (the hires pass's too): 2048 x 2048 by
    default, twice AUTOMATIC1111's UI maximum side in area terms.
    """

    max_pixels: int = 2048 * 2048
    max_steps: int = 1000  # the schedule has 1000 timesteps; more steps only repeat them
    max_batch: int = 64

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_batch"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise SdStudioError(f"{name.replace('_', '-')} must be a whole number >= 1 (got {value!r})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


DEFAULT_LIMITS = Limits()


def check_int(label: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` if it is a whole number in ``[lo, hi]``; else ``SdStudioError`` naming ``label``."""
    allowed = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
    if not _is_int(value) or value < lo or (hi is not None and value > hi):  # type: ignore[operator]
        raise SdStudioError(f"{label} must be a whole number {allowed} (got {value!r})")
    return value  # type: ignore[return-value]


def check_number(label: str, value: object, lo: float, hi: float, *, above_lo: bool = False) -> float:
    """``value`` if it is a finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``above_lo``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if above_lo else value >= lo) and value <= hi  # type: ignore[operator]
    if not ok:
        low = f"more than {lo:g}" if above_lo else f"{lo:g}"
        raise SdStudioError(f"{label} must be a finite number between {low} and {hi:g} (got {value!r})")
    return float(value)  # type: ignore[arg-type]


def check_size(label: str, value: object) -> int:
    if not _is_int(value) or value < 8 or value % 8:  # type: ignore[operator]
        hint = f"; use e.g. {max(8, value // 8 * 8)}" if _is_int(value) else ""  # type: ignore[operator]
        raise SdStudioError(f"{label} {value!r} is not a positive multiple of 8{hint}")
    return value  # type: ignore[return-value]


def check_pixels(what: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        side = math.isqrt(limits.max_pixels) // 8 * 8
        raise SdStudioError(
            f"{what} {width}x{height} is {width * height} pixels, over the limit of {limits.max_pixels} "
            f"(about {side}x{side}); use a smaller size, or raise the limit with --max-pixels"
        )


def _check_type(label: str, value: object, kind: type | tuple[type, ...], allowed: str) -> None:
    if not isinstance(value, kind):
        raise SdStudioError(f"{label} must be {allowed} (got {type(value).__name__} {value!r:.60})")


def _check_name(label: str, value: object, names: tuple[str, ...]) -> None:
    if value not in names:
        raise SdStudioError(f"unknown {label} {value!r}; choose one of: {', '.join(names)}")


def check_sampler(request: GenerationRequest) -> tuple[SamplerInfo, str]:
    """The sampler and the schedule type the request names (a legacy name such as ``DPM++ 2M Karras``
    carries both), each checked against the known names."""
    _check_type("sampler", request.sampler, str, "a sampler name")
    _check_type("schedule type (--scheduler)", request.scheduler, str, "a schedule type name")
    try:
        sampler, legacy_scheduler = resolve_sampler(request.sampler)
        scheduler = legacy_scheduler or request.scheduler
        resolve_scheduler(scheduler, sampler)
    except ValueError as e:
        raise SdStudioError(str(e)) from None
    return sampler, scheduler


def _check_init(init: InitImage) -> None:
    _check_type("init image", init.image, Image.Image, "a PIL image")
    check_number("denoising strength (--strength)", init.strength, 0.0, 1.0)
    _check_name("resize mode", init.resize_mode, RESIZE_MODES)


def _check_inpaint(inpaint: Inpaint) -> None:
    if inpaint.mask is not None:
        _check_type("mask", inpaint.mask, Image.Image, "a PIL image or None")
    check_int("mask blur (--mask-blur)", inpaint.blur, 0, MAX_MASK_BLUR)
    check_int("masked area padding (--masked-padding)", inpaint.only_masked_padding, 0, MAX_PADDING)
    _check_type("inpaint only masked", inpaint.only_masked, bool, "True or False")
    _check_name("masked content", inpaint.masked_content, MASKED_CONTENTS)
    _check_type("outpaint", inpaint.outpaint, Outpaint, "an Outpaint")
    o = inpaint.outpaint
    for side in ("left", "right", "up", "down"):
        check_int(f"outpaint pixels ({side})", getattr(o, side), 0, MAX_PADDING)
    if inpaint.mask is None and not o.any:
        raise SdStudioError("inpainting needs a mask (--mask) or an outpaint border (--outpaint)")


def _check_hires(hires: Hires, limits: Limits, upscalers: Collection[str] = ()) -> None:
    from sdstudio.pipelines.hires import UPSCALERS

    check_number("hires scale (--hires-scale)", hires.scale, 0.0, MAX_HIRES_SCALE, above_lo=True)
    check_int("hires steps (--hires-steps; 0: as many as --steps)", hires.steps, 0, limits.max_steps)
    check_number("hires denoising strength (--hires-strength)", hires.strength, 0.0, 1.0)
    if hires.upscaler not in (*UPSCALERS, *upscalers):
        raise SdStudioError(
            f"unknown hires upscaler {hires.upscaler!r}; choose one of: {', '.join(UPSCALERS)}, or a learned "
            "upscaler's file name in --upscaler-dir"
        )


def check_request(
    request: GenerationRequest, limits: Limits = DEFAULT_LIMITS, upscalers: Collection[str] = ()
) -> tuple[SamplerInfo, str]:
    """Refuse (``SdStudioError``, one line naming the field and the allowed values) anything in ``request``
    that no model could run; return the sampler and the schedule type it names. ``upscalers``: learned
    upscalers' names the caller has found, allowed as the hires upscaler besides the built-in ones.

    Sizes left to the model (None) are checked against the caps by :func:`plan`, once the model's default
    size is known."""
    _check_type("request", request, GenerationRequest, "a GenerationRequest")
    _check_type("prompt", request.prompt, str, "text")
    _check_type("negative prompt", request.negative_prompt, str, "text")
    sampler, scheduler = check_sampler(request)
    check_int("steps", request.steps, 1, limits.max_steps)
    check_number("CFG scale (--cfg)", request.cfg_scale, 0.0, MAX_CFG)
    check_int("seed (-1: random)", request.seed, -(2**63), MAX_SEED)
    check_int("variation seed (--subseed; -1: random)", request.subseed, -(2**63), MAX_SEED)
    check_int("eta noise seed delta (--ensd)", request.ensd, -MAX_SEED, MAX_SEED)
    check_int("batch size", request.batch_size, 1, limits.max_batch)
    if request.clip_skip is not None:
        check_int("clip skip", request.clip_skip, 1)
    if request.refiner_switch_at is not None:
        check_number("refiner switch at (--refiner-switch-at)", request.refiner_switch_at, 0.0, 1.0)
    if request.eta is not None:
        check_number("eta", request.eta, 0.0, 1.0)
        if not sampler.uses_eta:
            raise SdStudioError(
                f"sampler {sampler.name!r} does not use eta; leave --eta out or pick an ancestral/DDIM sampler"
            )
    check_number("variation seed strength (--subseed-strength)", request.subseed_strength, 0.0, 1.0)
    tome = request.token_merging_ratio
    if not isinstance(tome, Real) or isinstance(tome, bool) or not 0 <= tome <= MAX_RATIO:
        raise SdStudioError(
            f"token merging ratio must be between 0 and {MAX_RATIO} (got {tome!r}); "
            "0 turns it off, 0.5 is the usual setting"
        )
    ngms = request.ngms
    if ngms is not None and (
        not isinstance(ngms, Real) or isinstance(ngms, bool) or not 0 <= ngms < math.inf
    ):
        raise SdStudioError(
            f"NGMS (negative guidance minimum sigma) must be a finite number >= 0, 0 turns it off (got {ngms!r})"
        )
    for label, value in (("NGMS all steps", request.ngms_all_steps), ("VAE tiling", request.vae_tiling)):
        if value is not None:
            _check_type(label, value, bool, "True, False or None")
    for label, value in (("width", request.width), ("height", request.height)):
        if value is not None:
            check_size(label, value)
    if request.width is not None and request.height is not None:
        check_pixels("size", request.width, request.height, limits)
    for label, value, kind in (
        ("init", request.init, InitImage), ("inpaint", request.inpaint, Inpaint), ("hires", request.hires, Hires),
    ):  # fmt: skip
        if value is not None:
            _check_type(label, value, kind, f"a {kind.__name__} or None")
    if request.init is not None:
        _check_init(request.init)
    if request.inpaint is not None:
        if request.init is None:
            raise SdStudioError("a mask or outpainting needs an init image (--init-image)")
        _check_inpaint(request.inpaint)
    if request.hires is not None:
        if request.init is not None:
            raise SdStudioError("the hires fix is for txt2img; leave out --hires-scale with --init-image")
        _check_hires(request.hires, limits, upscalers)
    _check_type("controls", request.controls, tuple, "a tuple of ControlSpec")
    for i, control in enumerate(request.controls):
        _check_control(i, control, request)
    return sampler, scheduler


def _check_control(index: int, control: ControlSpec, request: GenerationRequest) -> None:
    label = f"ControlNet {index}"
    _check_type(label, control, ControlSpec, "a ControlSpec")
    _check_type(f"{label} model", control.model, str, "a ControlNet name or path")
    if not control.model:
        raise SdStudioError(f"{label}: no model given (--control MODEL:IMAGE)")
    if control.image is None and request.init is None:
        raise SdStudioError(f"{label}: no control image, and no init image to use instead (--control MODEL:IMAGE)")
    if control.image is not None:
        _check_type(f"{label} image", control.image, Image.Image, "a PIL image")
    check_number(f"{label} weight", control.weight, 0.0, 2.0)
    check_number(f"{label} guidance start", control.start, 0.0, 1.0)
    check_number(f"{label} guidance end", control.end, 0.0, 1.0)
    if control.start > control.end:
        raise SdStudioError(f"{label}: guidance start {control.start} is after its end {control.end}")
    _check_name(f"{label} control mode", control.mode, CONTROL_MODES)
    _check_name(f"{label} resize mode", control.resize_mode, CONTROL_RESIZE_MODES)
    for name in ("threshold_a", "threshold_b"):
        value = getattr(control, name)
        if value is not None:
            check_number(f"{label} {name.replace('_', ' ')}", value, -math.inf, math.inf)
    from sdstudio.control.apply import preprocessor_params  # here: the control package needs torch

    preprocessor_params(control)
