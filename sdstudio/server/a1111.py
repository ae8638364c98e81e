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

from sdstudio.io.infotext import parse_infotext
from sdstudio.types import MASKED_CONTENTS, RESIZE_MODES, GenerationRequest, Hires, InitImage, Inpaint

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
                       "denoising_strength": "number", "mask": "string"}  # fmt: skip


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
    return GenerationRequest(**kwargs)


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
    "NGMS": ("override_settings.s_min_uncond", float),
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
