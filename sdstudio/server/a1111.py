"""AUTOMATIC1111 (v1.10) API payloads <-> :class:`GenerationRequest` / results: translation only."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from sdstudio.errors import SdStudioError
from sdstudio.io.infotext import parse_infotext
from sdstudio.types import (
    CONTROL_MODES,
    MASKED_CONTENTS,
    RESIZE_MODES,
    ControlSpec,
    GenerationRequest,
    Hires,
    InitImage,
    Inpaint,
)

TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0.0,
    "sampler_name": None,
    "sampler_index": "Euler",
    "scheduler": None,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "batch_size": 1,
    "n_iter": 1,
    "eta": None,
    "enable_hr": False,
    "hr_scale": 2.0,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "denoising_strength": None,
    "override_settings": {},
    "send_images": True,
    "save_images": False,
    "refiner_checkpoint": None,  # SDXL's refiner: a checkpoint title, or None / "None"
    "refiner_switch_at": None,
    "alwayson_scripts": {},  # {"controlnet": {"args": [unit, ...]}}: sd-webui-controlnet's units
}
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("enable_hr", "hr_"))},
    "init_images": [],
    "denoising_strength": 0.75,
    "resize_mode": 0,
    "mask": None,
    "mask_blur": 4,
    "inpainting_fill": 0,
    "inpaint_full_res": True,  # A1111's API defaults (its UI's differ)
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
}
KINDS = ("txt2img", "img2img")


class FieldError(ValueError):
    """A payload field the server refuses: answered 422 with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ServerLimits:
    max_size: int = 2048  # --max-size: the largest width or height of a request, pixels
    default_size: int | None = 512  # None: the model's own size when the payload names none


_JSON_TYPES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string",
                                dict: "object", list: "array"}  # fmt: skip
# fields whose default is None, by the type they take
_NULL_DEFAULT_TYPES = {"sampler_name": "string", "scheduler": "string", "eta": "number",
                       "denoising_strength": "number", "mask": "string", "refiner_checkpoint": "string",
                       "refiner_switch_at": "number"}  # fmt: skip
NO_REFINER = ("", "None", "none")  # refiner_checkpoint values meaning no refiner, as A1111 reads them
DEFAULT_REFINER_SWITCH_AT = 0.8  # A1111's UI default, for a payload naming a refiner without a switch

# sd-webui-controlnet (Mikubill/sd-webui-controlnet, scripts/external_code.py): its units come as
# alwayson_scripts.controlnet.args (the script's title in any case, as A1111 matches it)
CONTROLNET_SCRIPT = "controlnet"
# the ControlNet file of each enabled unit, resolved by the server when the job is queued (a list of paths,
# in the units' order); to_request loads those files and never a name or path a client sent
CONTROLNET_FIELD = "_sdstudio_controlnets"
_UNIT_KEY_ALIASES = {"input_image": "image", "guidance": "guidance_end"}  # the extension's ext_compat_keys
NO_CONTROL_MODEL = ("", "None", "none")
MAX_CONTROL_UNITS = 8  # enabled units in one request: each runs its ControlNet at every step
CONTROLNET_API_VERSION = 2  # what the extension's /controlnet/version answers
DETECT_MAX_SIDE = 4096  # /controlnet/detect runs at the image's own size: larger images are refused


def request_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a txt2img / img2img payload, for the OpenAPI docs: every field optional and
    nullable (null means the default), other fields allowed and ignored, as A1111 has them."""
    defaults = TXT2IMG_DEFAULTS if kind == "txt2img" else IMG2IMG_DEFAULTS
    properties: dict[str, Any] = {}
    for name, default in defaults.items():
        json_type = _NULL_DEFAULT_TYPES.get(name) if default is None else _JSON_TYPES[type(default)]
        prop: dict[str, Any] = {"type": [json_type, "null"]}
        if default is not None:
            prop["default"] = default
        if json_type == "array":
            prop["items"] = {"type": "string", "description": "a base64 image"}
        properties[name] = prop
    return {
        "type": "object",
        "title": f"{kind} request",
        "properties": properties,
        "additionalProperties": True,
    }


def with_defaults(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with A1111's defaults filled in; unknown fields are dropped (A1111 ignores them too)."""
    if kind not in KINDS:
        raise FieldError("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    defaults = TXT2IMG_DEFAULTS if kind == "txt2img" else IMG2IMG_DEFAULTS
    return {k: payload.get(k, v) if payload.get(k) is not None else v for k, v in defaults.items()}


def decode_image(data: Any, field: str) -> Image.Image:
    """A base64 image (optionally a ``data:`` URL), fully read; decompression bombs refused."""
    if not isinstance(data, str) or not data:
        raise FieldError(field, "expected a base64-encoded image string")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(field, f"invalid base64 ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FieldError(field, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise FieldError(field, f"not a readable image ({e})") from None


def encode_png(path_or_image: Any) -> str:
    if isinstance(path_or_image, Image.Image):
        buf = io.BytesIO()
        path_or_image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    with open(path_or_image, "rb") as f:
        return base64.b64encode(f.read()).decode()


def _number(params: dict[str, Any], name: str, kind: type, low: float | None = None) -> Any:
    value = params[name]
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise FieldError(name, f"expected {kind.__name__} (got {params[name]!r})") from None
    if low is not None and value < low:
        raise FieldError(name, f"must be at least {low} (got {value})")
    return value


def _size(params: dict[str, Any], name: str, limits: ServerLimits, given: bool) -> int | None:
    if not given and limits.default_size is None:
        return None
    value = _number(params, name, int, 8) if given else limits.default_size
    if value > limits.max_size:
        raise FieldError(name, f"{value} exceeds the server's --max-size {limits.max_size}")
    return value


def _hr_scale(resize: tuple[int, int], width: int | None, height: int | None) -> float:
    """The hires scale that gives AUTOMATIC1111's second-pass size for ``hr_resize_x`` / ``hr_resize_y``
    (one of them 0: the other side follows the first pass's aspect ratio, ``x * height // width``)."""
    x, y = resize
    if width is None or height is None:
        raise FieldError(
            "hr_resize_x", "give width and height with hr_resize_x / hr_resize_y (or use hr_scale)"
        )
    target = (x, x * height // width) if y == 0 else (y * width // height, y) if x == 0 else (x, y)
    scale = target[0] / width if x else target[1] / height
    for factor in (1.0, 1 + 1e-12):  # int(width * x / width) can land one below x in floating point
        got = int(width * scale * factor), int(height * scale * factor)
        if got == target:
            return scale * factor
    raise FieldError(
        "hr_resize_x",
        f"a second pass of {target[0]}x{target[1]} is not one scale of the first pass's {width}x{height} "
        "(A1111 would crop); give one of hr_resize_x / hr_resize_y, or hr_scale",
    )


def to_request(
    kind: str, payload: dict[str, Any], limits: ServerLimits, seed: int | None = None
) -> GenerationRequest:
    """One ``n_iter`` iteration's request; ``seed`` overrides the payload's (for iterations after the first)."""
    p = with_defaults(kind, payload)
    overrides = p["override_settings"] if isinstance(p["override_settings"], dict) else {}
    clip_skip = overrides.get("CLIP_stop_at_last_layers")
    ensd = overrides.get("eta_noise_seed_delta")
    sampler = p["sampler_name"] or p["sampler_index"]
    if p["scheduler"] not in (None, "", "Automatic", "automatic"):
        scheduler = str(p["scheduler"])
    else:
        scheduler = "Automatic"
    kwargs: dict[str, Any] = {
        "prompt": str(p["prompt"]),
        "negative_prompt": str(p["negative_prompt"]),
        "sampler": str(sampler),
        "scheduler": scheduler,
        "steps": _number(p, "steps", int, 1),
        "cfg_scale": _number(p, "cfg_scale", float),
        "seed": _number(p, "seed", int) if seed is None else seed,
        "width": _size(p, "width", limits, "width" in payload and payload["width"] is not None),
        "height": _size(p, "height", limits, "height" in payload and payload["height"] is not None),
        "batch_size": _number(p, "batch_size", int, 1),
        "subseed": _number(p, "subseed", int),
        "subseed_strength": _number(p, "subseed_strength", float, 0),
        "eta": None if p["eta"] is None else _number(p, "eta", float),
        "clip_skip": None if clip_skip is None else _number(overrides, "CLIP_stop_at_last_layers", int, 1),
        "ensd": 0 if ensd is None else _number(overrides, "eta_noise_seed_delta", int),
    }
    # A1111's settings for ToMe and "Negative Guidance minimum sigma"
    if overrides.get("token_merging_ratio") is not None:
        kwargs["token_merging_ratio"] = _number(overrides, "token_merging_ratio", float, 0)
    if overrides.get("s_min_uncond") is not None:
        kwargs["ngms"] = _number(overrides, "s_min_uncond", float, 0)
    if overrides.get("s_min_uncond_all") is not None:
        kwargs["ngms_all_steps"] = bool(overrides["s_min_uncond_all"])
    if kind == "txt2img" and p["enable_hr"]:
        resize = _number(p, "hr_resize_x", int, 0), _number(p, "hr_resize_y", int, 0)
        kwargs["hires"] = Hires(
            scale=_hr_scale(resize, kwargs["width"], kwargs["height"])
            if any(resize)
            else _number(p, "hr_scale", float),
            steps=_number(p, "hr_second_pass_steps", int, 0),
            strength=0.7 if p["denoising_strength"] is None else _number(p, "denoising_strength", float),
            upscaler=str(p["hr_upscaler"]),
        )
    if kind == "img2img":
        kwargs.update(_img2img(p))
    if refiner_title(p) is not None:
        switch = (
            DEFAULT_REFINER_SWITCH_AT
            if p["refiner_switch_at"] is None
            else _number(p, "refiner_switch_at", float)
        )
        if not 0.0 <= switch <= 1.0:
            raise FieldError(
                "refiner_switch_at",
                f"must be in 0..1, the share of the steps before the refiner (got {switch})",
            )
        kwargs["refiner_switch_at"] = switch
    kwargs["controls"] = _controls(payload, kwargs.get("init") is not None, kwargs.get("inpaint") is not None)
    return GenerationRequest(**kwargs)


def refiner_title(payload: dict[str, Any]) -> str | None:
    """The payload's ``refiner_checkpoint`` (a checkpoint title), None for none (absent, "" or "None")."""
    title = payload.get("refiner_checkpoint")
    if title is None or title in NO_REFINER:
        return None
    if not isinstance(title, str):
        raise FieldError("refiner_checkpoint", f'expected a checkpoint title or "None" (got {title!r})')
    return title


def _control_args(payload: dict[str, Any]) -> list[Any]:
    """``alwayson_scripts.controlnet.args`` ([] without it)."""
    scripts = payload.get("alwayson_scripts")
    if scripts is None:
        return []
    if not isinstance(scripts, dict):
        raise FieldError(
            "alwayson_scripts", f"expected an object of script names (got {type(scripts).__name__})"
        )
    entry = next(
        (v for k, v in scripts.items() if isinstance(k, str) and k.lower() == CONTROLNET_SCRIPT), None
    )
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else entry
    if args is None:
        return []
    if not isinstance(args, list):
        raise FieldError("alwayson_scripts.controlnet.args", "expected a list of ControlNet units")
    return args


def control_units(payload: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The enabled ControlNet units of a payload, each with the field that names it in errors
    (``alwayson_scripts.controlnet.args[i]``); keys as the extension reads them (``input_image`` -> ``image``,
    ``guidance`` -> ``guidance_end``). Disabled units (``"enabled": false``) and null entries are skipped."""
    units = []
    for i, unit in enumerate(_control_args(payload)):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        if unit is None:
            continue
        if not isinstance(unit, dict):
            raise FieldError(field, f"expected a ControlNet unit object (got {type(unit).__name__})")
        unit = {_UNIT_KEY_ALIASES.get(k, k): v for k, v in unit.items()}
        if unit.get("enabled", True) in (False, None, 0, "false", "False"):
            continue
        units.append((field, unit))
    if len(units) > MAX_CONTROL_UNITS:
        raise FieldError(
            "alwayson_scripts.controlnet.args",
            f"at most {MAX_CONTROL_UNITS} enabled units (got {len(units)})",
        )
    return units


def control_models(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, model title) of each enabled unit, for the server to find in its ControlNet folders."""
    models = []
    for field, unit in control_units(payload):
        model = unit.get("model")
        if not isinstance(model, str) or model.strip() in NO_CONTROL_MODEL:
            raise FieldError(
                f"{field}.model",
                f"an enabled unit needs a ControlNet model (got {model!r}); see /controlnet/model_list",
            )
        models.append((f"{field}.model", model))
    return models


def _controls(payload: dict[str, Any], has_init: bool, has_mask: bool) -> tuple[ControlSpec, ...]:
    units = control_units(payload)
    resolved = payload.get(CONTROLNET_FIELD)
    if not isinstance(resolved, list) or len(resolved) != len(units):
        # before the server resolved the files (a check at submission): the names without their hash
        from sdstudio.server.models import controlnet_name

        resolved = [controlnet_name(model) for _, model in control_models(payload)]
    return tuple(_control_spec(field, unit, str(model), has_init, has_mask)
                 for (field, unit), model in zip(units, resolved))  # fmt: skip


def _unit_number(
    unit: dict[str, Any], field: str, name: str, default: float, low: float, high: float
) -> float:
    value = unit.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise FieldError(f"{field}.{name}", f"expected a number in {low:g}..{high:g} (got {value!r})")
    return float(value)


def _unit_image(unit: dict[str, Any], field: str) -> Image.Image | None:
    """The unit's image: base64 (or a data URL), or the extension's ``{"image": ..., "mask": ...}``; a mask
    with anything masked is refused (ControlSpec has none: inpaint units take img2img's mask)."""
    image, mask = unit.get("image"), unit.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") if image.get("mask") is not None else mask
    if mask not in (None, ""):
        decoded = decode_image(mask, f"{field}.mask").convert("L")
        if decoded.getextrema()[1] > 0:
            raise FieldError(
                f"{field}.mask", "a unit's own mask is not supported; inpaint units take img2img's mask"
            )
    if image in (None, ""):
        return None
    return decode_image(image, f"{field}.image").convert("RGB")


def _control_mode(unit: dict[str, Any], field: str) -> str:
    mode = unit.get("control_mode", 0)
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(CONTROL_MODES):
        return CONTROL_MODES[mode]
    if isinstance(mode, str):
        for name in CONTROL_MODES:
            if mode.strip().lower() == name.lower():
                return name
    raise FieldError(
        f"{field}.control_mode",
        f"unknown control mode {mode!r}; use 0, 1, 2 or {', '.join(map(repr, CONTROL_MODES))}",
    )


def _resize_mode(unit: dict[str, Any], field: str) -> str:
    from sdstudio.control.preprocess import parse_resize_mode

    mode = unit.get("resize_mode", 1)  # the extension's default: Crop and Resize
    if mode == 3 and not isinstance(mode, bool):  # the extension's "Just Resize (Latent upscale)"
        mode = 0
    try:
        return parse_resize_mode(mode).value
    except SdStudioError as e:
        raise FieldError(f"{field}.resize_mode", str(e)) from None


def _thresholds(
    unit: dict[str, Any], field: str, module: str, names: tuple[str, str] = ("threshold_a", "threshold_b")
) -> tuple[float | None, float | None]:
    """``threshold_a`` / ``threshold_b`` as the preprocessor's parameters: a negative value (the extension's
    -1) or none is the default, a slider the preprocessor lacks is ignored (as the extension ignores it),
    and the others are checked against the parameter's range."""
    from sdstudio.control.preprocess import PREPROCESSORS

    params = PREPROCESSORS[module].params
    values: list[float | None] = []
    for i, name in enumerate(names):
        value = unit.get(name)
        label = f"{field}.{name}" if field else name
        if value is None or i >= len(params):
            values.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(label, f"expected a number (got {value!r})")
        if value < 0:
            values.append(None)
            continue
        param = params[i]
        given = int(value) if param.integer and float(value).is_integer() else value
        try:
            param.check(given, f"{module} {name}")
        except SdStudioError as e:
            raise FieldError(label, str(e)) from None
        values.append(float(value))
    return values[0], values[1]


def _control_spec(
    field: str, unit: dict[str, Any], model: str, has_init: bool, has_mask: bool
) -> ControlSpec:
    from sdstudio.control.preprocess import PREPROCESSORS

    module = _resolve_module(unit.get("module"), f"{field}.module")
    if PREPROCESSORS[module].needs_mask and not has_mask:
        raise FieldError(f"{field}.module", f"preprocessor {module!r} needs img2img's inpainting mask (mask)")
    image = _unit_image(unit, field)
    if image is None and not has_init:
        raise FieldError(
            f"{field}.image", "a ControlNet unit needs an image (img2img's units may use its init image)"
        )
    start = _unit_number(unit, field, "guidance_start", 0.0, 0.0, 1.0)
    end = _unit_number(unit, field, "guidance_end", 1.0, 0.0, 1.0)
    if start > end:
        raise FieldError(f"{field}.guidance_start", f"guidance_start {start:g} is after guidance_end {end:g}")
    threshold_a, threshold_b = _thresholds(unit, field, module)
    return ControlSpec(
        model=model, image=image, preprocessor=module, weight=_unit_number(unit, field, "weight", 1.0, 0.0, 2.0),
        start=start, end=end, mode=_control_mode(unit, field), resize_mode=_resize_mode(unit, field),  # type: ignore[arg-type]
        threshold_a=threshold_a, threshold_b=threshold_b,
    )  # fmt: skip


def _resolve_module(module: Any, field: str) -> str:
    from sdstudio.control.preprocess import resolve_preprocessor

    try:
        return resolve_preprocessor("none" if module is None else module)
    except SdStudioError as e:
        raise FieldError(field, str(e)) from None


def module_list(alias_names: bool = False) -> dict[str, Any]:
    """The extension's ``/controlnet/module_list``: our preprocessors' names (``alias_names``: the labels its
    UI shows), and ``module_detail`` with each one's sliders (threshold_a, threshold_b in order)."""
    from sdstudio.control.preprocess import PREPROCESSORS

    def sliders(pre: Any) -> list[dict[str, Any]]:
        return [{"name": p.name, "value": p.default, "min": p.minimum, "max": p.maximum,
                 "step": 1 if p.integer else 0.01} for p in pre.params]  # fmt: skip

    names = [pre.label if alias_names else pre.name for pre in PREPROCESSORS.values()]
    detail = {
        name: {"model_free": False, "sliders": sliders(pre)}
        for name, pre in zip(names, PREPROCESSORS.values())
    }
    return {"module_list": names, "module_detail": detail}


def controlnet_detect(payload: dict[str, Any]) -> dict[str, Any]:
    """The extension's ``/controlnet/detect``: each of ``controlnet_input_images`` (webuiapi sends
    ``controlnet_images``) through ``controlnet_module`` with ``controlnet_threshold_a`` / ``_b`` as
    :func:`_thresholds` reads them; the inpaint modules take ``controlnet_masks``, one per image. Answers
    ``{"images": [base64 PNG], "info": "Success"}``. The preprocessor works at the image's own size:
    ``controlnet_processor_res`` is accepted and not applied (see ``sdstudio.control.preprocess``)."""
    from sdstudio.control.preprocess import PREPROCESSORS, preprocess

    module = _resolve_module(payload.get("controlnet_module"), "controlnet_module")
    field = "controlnet_input_images" if "controlnet_input_images" in payload else "controlnet_images"
    images = payload.get(field)
    if not isinstance(images, list) or not images:
        raise FieldError("controlnet_input_images", "no image selected: give a list of base64 images")
    masks = payload.get("controlnet_masks") or []
    needs_mask = PREPROCESSORS[module].needs_mask
    if not isinstance(masks, list) or (needs_mask and len(masks) != len(images)):
        raise FieldError("controlnet_masks", f"preprocessor {module!r} needs one base64 mask per image")
    thresholds = _thresholds(payload, "", module, ("controlnet_threshold_a", "controlnet_threshold_b"))
    pre = PREPROCESSORS[module]
    params: dict[str, Any] = {
        p.name: int(v) if p.integer else v for p, v in zip(pre.params, thresholds) if v is not None
    }
    out = []
    for i, data in enumerate(images):
        image = decode_image(data, f"{field}[{i}]")
        if max(image.size) > DETECT_MAX_SIDE:
            raise FieldError(
                f"{field}[{i}]", f"{image.width}x{image.height} is over {DETECT_MAX_SIDE} pixels a side"
            )
        if needs_mask:
            mask = decode_image(masks[i], f"controlnet_masks[{i}]").convert("L")
            result = preprocess(module, image.convert("RGB"), mask=mask)
        else:
            result = preprocess(module, image, **params)
        out.append(encode_png(result.image))
    return {"images": out, "info": "Success"}


def without_control_images(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with its ControlNet units' images left out (as a job's history shows its request)."""
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return payload
    out_scripts = dict(scripts)
    for key, entry in scripts.items():
        if isinstance(key, str) and key.lower() == CONTROLNET_SCRIPT and isinstance(entry, dict):
            args = entry.get("args")
            if isinstance(args, list):
                args = [{k: v for k, v in unit.items() if k not in ("image", "input_image", "mask")}
                        if isinstance(unit, dict) else unit for unit in args]  # fmt: skip
                out_scripts[key] = {**entry, "args": args}
    return {**payload, "alwayson_scripts": out_scripts}


def _img2img(p: dict[str, Any]) -> dict[str, Any]:
    images = p["init_images"]
    if not isinstance(images, list) or not images:
        raise FieldError("init_images", "img2img needs one base64 image in init_images")
    init = decode_image(images[0], "init_images[0]").convert("RGB")
    mode = _number(p, "resize_mode", int, 0)
    if mode >= len(RESIZE_MODES):
        raise FieldError("resize_mode", f"supported: 0..{len(RESIZE_MODES) - 1} ({', '.join(RESIZE_MODES)})")
    strength = _number(p, "denoising_strength", float, 0)
    out: dict[str, Any] = {"init": InitImage(init, strength=strength, resize_mode=RESIZE_MODES[mode])}
    if p["mask"]:
        mask = decode_image(p["mask"], "mask").convert("L")
        if p["inpainting_mask_invert"]:
            mask = ImageOps.invert(mask)
        fill = _number(p, "inpainting_fill", int, 0)
        if fill >= len(MASKED_CONTENTS):
            raise FieldError(
                "inpainting_fill", f"supported: 0..{len(MASKED_CONTENTS) - 1} ({', '.join(MASKED_CONTENTS)})"
            )
        out["inpaint"] = Inpaint(
            mask=mask,
            blur=_number(p, "mask_blur", int, 0),
            only_masked=bool(p["inpaint_full_res"]),
            only_masked_padding=_number(p, "inpaint_full_res_padding", int, 0),
            masked_content=MASKED_CONTENTS[fill],
        )
    return out


def response(kind: str, payload: dict[str, Any], images: list[str], seeds: list[int], infotexts: list[str],
             subseeds: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """A1111's ``{"images", "parameters", "info"}``; ``info`` is a JSON string, as there."""
    p = with_defaults(kind, payload)
    if kind == "img2img":
        p["init_images"] = None
        p["mask"] = None
    info = {
        "prompt": p["prompt"],
        "negative_prompt": p["negative_prompt"],
        "seed": seeds[0] if seeds else p["seed"],
        "all_seeds": seeds,
        "subseed": (subseeds or [p["subseed"]])[0],
        "all_subseeds": subseeds or [p["subseed"]] * len(seeds),
        "all_prompts": [p["prompt"]] * len(seeds),
        "all_negative_prompts": [p["negative_prompt"]] * len(seeds),
        "sampler_name": p["sampler_name"] or p["sampler_index"],
        "steps": p["steps"],
        "cfg_scale": p["cfg_scale"],
        "width": p["width"],
        "height": p["height"],
        "batch_size": p["batch_size"],
        "infotexts": infotexts,
        "index_of_first_image": 0,
        "job_timestamp": "",
    }
    return {"images": images if p["send_images"] else [], "parameters": p, "info": json.dumps(info)}


def png_info(image: Image.Image) -> dict[str, Any]:
    """A1111's answer (``info``, ``items``, ``parameters``), and ``payload``: the parameters as the txt2img /
    img2img payload fields that make the image again (:func:`payload_from_infotext`)."""
    text = image.info.get("parameters")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    if not text:
        return {"info": "", "items": items, "parameters": {}, "payload": {}}
    prompt, negative, params = parse_infotext(text)
    items.pop("parameters", None)
    return {
        "info": text,
        "items": items,
        "parameters": {"Prompt": prompt, "Negative prompt": negative, **params},
        "payload": payload_from_infotext(text),
    }


# infotext key -> (payload field, type); override_settings' fields under "override_settings."
_INFOTEXT_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int), "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("denoising_strength", float),
    "Eta": ("eta", float), "Mask blur": ("mask_blur", int), "Masked area padding": ("inpaint_full_res_padding", int),
    "Hires upscale": ("hr_scale", float), "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str), "Clip skip": ("override_settings.CLIP_stop_at_last_layers", int),
    "ENSD": ("override_settings.eta_noise_seed_delta", int), "Model": ("override_settings.sd_model_checkpoint", str),
    "VAE": ("override_settings.sd_vae", str), "Token merging ratio": ("override_settings.token_merging_ratio", float),
    "NGMS": ("override_settings.s_min_uncond", float), "Refiner": ("refiner_checkpoint", str),
    "Refiner switch at": ("refiner_switch_at", float),
}  # fmt: skip


def payload_from_infotext(text: str) -> dict[str, Any]:
    """The txt2img / img2img payload fields an infotext records (A1111's "send to txt2img"); a value that
    does not parse is left out, so what can be restored is."""
    prompt, negative, params = parse_infotext(text)
    payload: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    overrides: dict[str, Any] = {}
    for key, (name, kind) in _INFOTEXT_FIELDS.items():
        if key not in params:
            continue
        try:
            value = kind(params[key])
        except ValueError:
            continue
        if name.startswith("override_settings."):
            overrides[name.split(".", 1)[1]] = value
        else:
            payload[name] = value
    width, _, height = params.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        payload["width"], payload["height"] = int(width), int(height)
    if params.get("NGMS all steps") in ("True", "False"):
        overrides["s_min_uncond_all"] = params["NGMS all steps"] == "True"
    if "Hires upscale" in params:
        payload["enable_hr"] = True
    if params.get("Masked content") in MASKED_CONTENTS:
        payload["inpainting_fill"] = MASKED_CONTENTS.index(params["Masked content"])
    if "Mask blur" in params:
        payload["inpaint_full_res"] = params.get("Inpaint area") == "Only masked"
    if params.get("Resize mode", "just resize") in RESIZE_MODES:
        payload["resize_mode"] = RESIZE_MODES.index(params.get("Resize mode", "just resize"))
    if overrides:
        payload["override_settings"] = overrides
    return payload
