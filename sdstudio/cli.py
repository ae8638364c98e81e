"""The ``sdstudio`` command: translates arguments to requests and results to files, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.io.files import check_writable

if TYPE_CHECKING:
    from sdstudio.pipelines.validate import Limits
    from sdstudio.prompt.parser import ParsedPrompt
    from sdstudio.types import ControlSpec, GenerationRequest

log = logging.getLogger("sdstudio")

EMBEDDED_MODEL = "toyworld.safetensors"
SEED_FIELD = "<seed>"  # in --outdir file names only, replaced by each image's seed
EMBEDDED_IMAGE_ENCODER = "toyworld_image_encoder.safetensors"


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path | None:
    path = resources.files("sdstudio") / "assets" / name
    return Path(str(path)) if path.is_file() else None


def embedded_model_help() -> str:
    """What ``generate --help`` says of the embedded model: its size and every word it learned."""
    import textwrap

    from sdstudio.toyworld.language import EXAMPLE_PROMPTS, word_groups

    lines = [
        "The embedded model (used without --model) draws 64x64 scenes of the toy world and knows only these",
        "words; other words and other sizes get a warning (other words are ignored or confuse it):",
    ]
    for group, words in word_groups().items():
        lines += textwrap.wrap(", ".join(words), 100, initial_indent=f"  {group}: ", subsequent_indent="    ")
    lines += ["Examples:", *(f'  sdstudio generate "{p}" -o out.png --upscale 8' for p in EXAMPLE_PROMPTS)]
    return "\n".join(lines)


def _output_paths(args: argparse.Namespace, seeds: int) -> list[Path]:
    """Where each image of the batch goes; checked before any work so nothing is half-written."""
    if args.output:
        out = Path(args.output)
        if out.suffix.lower() != ".png":
            raise SdStudioError(f"{out}: the output file must end in .png")
        paths = [out] if seeds == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(seeds)]
    else:
        outdir = Path(args.outdir)
        if outdir.exists() and not outdir.is_dir():
            raise SdStudioError(f"{outdir}: exists and is not a folder; pass another --outdir")
        taken = [int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
        start = max(taken, default=-1) + 1
        paths = [outdir / f"{start + i:05d}-{SEED_FIELD}.png" for i in range(seeds)]
    for p in paths:
        check_writable(p, "output image")
        if not args.overwrite and SEED_FIELD not in p.name and p.exists():
            raise SdStudioError(f"{p}: already exists; pass --overwrite to replace it or choose another -o")
    return paths


# Defaults of the options --from-png may set; a flag given on the command line overrides both.
GENERATE_DEFAULTS: dict[str, object] = {
    "prompt": None, "negative": "", "sampler": "Euler a", "scheduler": "Automatic", "steps": 20, "cfg": 7.0,
    "seed": -1, "width": None, "height": None, "clip_skip": None, "eta": None, "ensd": 0, "subseed": -1,
    "subseed_strength": 0.0, "strength": 0.75, "resize_mode": "just resize", "mask_blur": 4,
    "inpaint_only_masked": False, "masked_padding": 32, "masked_content": "original", "outpaint": None,
    "hires_scale": None, "hires_steps": 0, "hires_strength": 0.7, "hires_upscaler": "Latent", "tome": 0.0,
    "ngms": None, "ngms_all_steps": None,
}


def _bool(text: str) -> bool:
    """An infotext boolean, as AUTOMATIC1111 writes it (``True`` / ``False``)."""
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


# infotext key -> (option, parser), for --from-png
_PNG_OPTIONS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg", float), "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Eta": ("eta", float),
    "ENSD": ("ensd", int), "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Mask blur": ("mask_blur", int), "Masked area padding": ("masked_padding", int),
    "Masked content": ("masked_content", str), "Resize mode": ("resize_mode", str), "Outpaint": ("outpaint", str),
    "Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str), "Token merging ratio": ("tome", float),
    "NGMS": ("ngms", float), "NGMS all steps": ("ngms_all_steps", _bool),
}


def options_from_png(path: str) -> tuple[dict[str, object], dict[str, str]]:
    """The generate options recorded in a PNG's infotext, and the infotext's parameters as written."""
    from sdstudio.io.images import load_image
    from sdstudio.io.infotext import parse_infotext
    from sdstudio.models.configs import SamplingDefaults

    text = load_image(path, "PNG").info.get("parameters")
    if not text:
        raise SdStudioError(f"{path}: holds no generation parameters (no 'parameters' text chunk)")
    prompt, negative, params = parse_infotext(text)
    options: dict[str, object] = {"prompt": prompt, "negative": negative}
    for key, (name, kind) in _PNG_OPTIONS.items():
        if key in params:
            try:
                options[name] = kind(params[key])
            except ValueError:
                raise SdStudioError(f"{path}: bad {key!r} value {params[key]!r} in its parameters") from None
    # No NGMS key: made with it off (AUTOMATIC1111 writes it only when on; sdstudio also writes "NGMS: 0"
    # against a model default that is on); no "NGMS all steps": every other step.
    options.setdefault("ngms", 0.0)
    options.setdefault("ngms_all_steps", False)
    try:
        SamplingDefaults(options["ngms"], options["ngms_all_steps"])  # type: ignore[arg-type]
    except ValueError:
        raise SdStudioError(f"{path}: bad 'NGMS' value {params['NGMS']!r} in its parameters (a number >= 0)") from None
    if "Size" in params:
        w, _, h = params["Size"].partition("x")
        try:
            options["width"], options["height"] = int(w), int(h)
        except ValueError:
            raise SdStudioError(f"{path}: bad 'Size' value {params['Size']!r} in its parameters") from None
    if params.get("Inpaint area") == "Only masked":
        options["inpaint_only_masked"] = True
    if "Denoising strength" in params:
        key = "hires_strength" if "Hires upscale" in params else "strength"
        try:
            options[key] = float(params["Denoising strength"])
        except ValueError:
            raise SdStudioError(f"{path}: bad 'Denoising strength' {params['Denoising strength']!r}") from None
        options["_img2img"] = "Hires upscale" not in params
    # A1111 writes "Mask blur" for inpainting; an outpaint-only request (ours, with "Outpaint") has no mask
    options["_inpaint"] = "Mask blur" in params and "Outpaint" not in params
    return options, params


def build_request(args: argparse.Namespace) -> tuple[GenerationRequest, list[str]]:
    """The request from defaults, then --from-png's parameters, then the flags given; and warnings."""
    from sdstudio.io.images import load_image
    from sdstudio.io.infotext import parse_outpaint
    from sdstudio.types import GenerationRequest, Hires, InitImage, Inpaint, Outpaint

    values = dict(GENERATE_DEFAULTS)
    warnings: list[str] = []
    img2img_png = inpaint_png = False
    if args.from_png:
        options, _ = options_from_png(args.from_png)
        img2img_png = bool(options.pop("_img2img", False))
        inpaint_png = bool(options.pop("_inpaint", False))
        values.update(options)
    values.update({k: v for k, v in vars(args).items() if k in GENERATE_DEFAULTS and v is not None})
    if not values["prompt"] and not args.from_png:
        raise SdStudioError("no prompt given: pass a prompt or --from-png FILE")
    if img2img_png and not args.init_image:
        needs = "--init-image and --mask" if inpaint_png else "--init-image"
        raise SdStudioError(f"{args.from_png} was made by img2img (it has a denoising strength): pass {needs}")
    if inpaint_png and not args.mask:
        raise SdStudioError(
            f"{args.from_png} was made by inpainting (it records a mask blur): pass its mask with --mask"
        )
    init = inpaint = hires = None
    if args.init_image:
        init = InitImage(load_image(args.init_image, "init image"), values["strength"], values["resize_mode"])
    elif args.strength is not None:
        raise SdStudioError("--strength needs --init-image (for the hires fix use --hires-strength)")
    try:
        outpaint = parse_outpaint(values["outpaint"]) if values["outpaint"] else Outpaint()
    except ValueError as e:
        raise SdStudioError(str(e)) from None
    if args.mask or outpaint.any:
        mask = load_image(args.mask, "mask") if args.mask else None
        inpaint = Inpaint(
            mask, values["mask_blur"], values["inpaint_only_masked"], values["masked_padding"],
            values["masked_content"], outpaint,
        )
    if values["hires_scale"] is not None:
        hires = Hires(values["hires_scale"], values["hires_steps"], values["hires_strength"], values["hires_upscaler"])
    request = GenerationRequest(
        prompt=values["prompt"] or "",
        negative_prompt=values["negative"],
        sampler=values["sampler"],
        scheduler=values["scheduler"],
        steps=values["steps"],
        cfg_scale=values["cfg"],
        seed=values["seed"],
        width=values["width"],
        height=values["height"],
        batch_size=args.batch,
        clip_skip=values["clip_skip"],
        eta=values["eta"],
        ensd=values["ensd"],
        subseed=values["subseed"],
        subseed_strength=values["subseed_strength"],
        token_merging_ratio=values["tome"],
        ngms=values["ngms"],
        ngms_all_steps=values["ngms_all_steps"],
        init=init,
        inpaint=inpaint,
        hires=hires,
        vae_tiling={"auto": None, "on": True, "off": False}[args.vae_tiling],
        refiner_switch_at=_refiner_switch_at(args),
        controls=_controls(args),
    )
    return request, warnings


def parse_control(text: str) -> tuple[str, str | None, float, float, float]:
    """``MODEL:IMAGE[:WEIGHT[:START:END]]`` -> (model, image or None, weight, start, end); an empty IMAGE
    (``MODEL:``) or none (``MODEL``) takes the init image."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 5 or len(parts) == 4:
        raise SdStudioError(
            f"--control {text!r}: expected MODEL:IMAGE[:WEIGHT[:START:END]] (e.g. control_canny:edges.png:0.8:0:1)"
        )
    try:
        numbers = [float(v) for v in parts[2:]]
    except ValueError:
        raise SdStudioError(f"--control {text!r}: WEIGHT, START and END must be numbers") from None
    weight, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers) :])[:3] if numbers else (1.0, 0.0, 1.0)
    image = parts[1] if len(parts) > 1 and parts[1] else None
    return parts[0], image, weight, start, end


def _controls(args: argparse.Namespace) -> tuple[ControlSpec, ...]:
    """``--control`` units with ``--control-preprocess`` / ``--control-mode`` / ``--control-resize`` /
    ``--control-threshold-a|b`` (one value for every unit, or one per unit in order)."""
    from sdstudio.io.images import load_image
    from sdstudio.types import ControlSpec

    texts = getattr(args, "control", None) or []
    options = {
        "--control-preprocess": getattr(args, "control_preprocess", None) or [],
        "--control-mode": getattr(args, "control_mode", None) or [],
        "--control-resize": getattr(args, "control_resize", None) or [],
        "--control-threshold-a": getattr(args, "control_threshold_a", None) or [],
        "--control-threshold-b": getattr(args, "control_threshold_b", None) or [],
    }
    if not texts:
        given = [flag for flag, values in options.items() if values]
        if given:
            raise SdStudioError(f"{given[0]} needs a ControlNet: --control MODEL:IMAGE")
        return ()
    for flag, values in options.items():
        if len(values) not in (0, 1, len(texts)):
            raise SdStudioError(f"{flag}: give it once for every --control, or once for all ({len(texts)} units)")

    def pick(flag: str, i: int, default: object) -> object:
        values = options[flag]
        return default if not values else values[i if len(values) > 1 else 0]

    units = []
    for i, text in enumerate(texts):
        model, image, weight, start, end = parse_control(text)
        units.append(ControlSpec(
            model=model, image=load_image(image, f"control image {i}") if image else None,
            preprocessor=str(pick("--control-preprocess", i, "none")), weight=weight, start=start, end=end,
            mode=pick("--control-mode", i, "Balanced"),  # type: ignore[arg-type]
            resize_mode=pick("--control-resize", i, "Crop and Resize"),  # type: ignore[arg-type]
            threshold_a=pick("--control-threshold-a", i, None),  # type: ignore[arg-type]
            threshold_b=pick("--control-threshold-b", i, None),  # type: ignore[arg-type]
        ))  # fmt: skip
    return tuple(units)


def _learned_upscaler(args: argparse.Namespace, request: GenerationRequest) -> tuple[str, ...]:
    """The hires upscaler's name when it is a learned one found in ``--upscaler-dir`` (or a path): found
    before the model loads, so that a wrong name costs nothing."""
    from sdstudio.pipelines.hires import UPSCALERS

    if request.hires is None or request.hires.upscaler in UPSCALERS:
        return ()
    from sdstudio.upscale import find_upscaler, upscaler_library

    folders = getattr(args, "upscaler_dir", None) or ()
    name = request.hires.upscaler
    if not folders and not Path(name).is_file():
        return ()  # check_request names the built-in ones
    found = find_upscaler(name, upscaler_library(folders))
    return (name,) if found.path is not None else ()


def _refiner_switch_at(args: argparse.Namespace) -> float | None:
    """The request's refiner switch (A1111's default 0.8 with --refiner), None without a refiner."""
    refiner, switch_at = getattr(args, "refiner", None), getattr(args, "refiner_switch_at", None)
    if switch_at is not None and not refiner:
        raise SdStudioError("--refiner-switch-at needs a refiner: --refiner FILE")
    if refiner and not Path(refiner).exists():
        raise SdStudioError(f"{refiner}: no such refiner checkpoint (--refiner)")
    if not refiner:
        return None
    return 0.8 if switch_at is None else switch_at


def _preview_path(args: argparse.Namespace) -> Path:
    if args.output:
        out = Path(args.output)
        return out.with_name(f"{out.stem}-preview.png")
    return Path(args.outdir) / "preview.png"


MAX_UPSCALE = 8


def limits_from_args(args: argparse.Namespace) -> Limits:
    from sdstudio.pipelines.validate import Limits

    given = {
        k: getattr(args, k) for k in ("max_pixels", "max_steps", "max_batch") if getattr(args, k) is not None
    }
    return Limits(**given)


def check_generate_args(args: argparse.Namespace) -> None:
    """The command's own options (not part of a request), checked before anything loads."""
    from sdstudio.pipelines.validate import check_int

    check_int("--upscale", args.upscale, 1, MAX_UPSCALE)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    if args.preview_every is not None and args.preview_every < 1:
        raise SdStudioError(f"--preview-every must be at least 1 (got {args.preview_every})")
    if args.model is not None and not Path(args.model).exists():
        raise SdStudioError(f"{args.model}: no such file or folder (--model)")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise SdStudioError(f"{args.embeddings}: embeddings folder does not exist or is not a folder")
    for flag, folders in (("--lora-dir", args.lora_dir), ("--hypernetwork-dir", args.hypernetwork_dir)):
        for folder in folders or ():
            if not Path(folder).is_dir():
                raise SdStudioError(f"{folder}: folder does not exist or is not a folder ({flag})")
    if args.vae is not None and not Path(args.vae).exists():
        raise SdStudioError(f"{args.vae}: no such VAE file or folder (--vae)")


def check_png_files(args: argparse.Namespace, params: dict[str, str]) -> list[str]:
    """For ``--from-png``: the LoRAs, hypernetworks and VAE the PNG was made with must be at hand (one line
    naming the first missing file and the flag that finds it); files whose hashes differ give warnings."""
    from sdstudio.adapters.activate import check_replay, infotext_names
    from sdstudio.adapters.library import NetworkLibrary
    from sdstudio.engine import HYPERNETWORK_SUFFIXES

    source = args.from_png
    warnings: list[str] = []
    if params.get("Lora hashes"):
        loras = NetworkLibrary(args.lora_dir or (), kind="LoRA", flag="--lora-dir")
        warnings += check_replay(infotext_names(params["Lora hashes"]), loras, "lora", source)
    if params.get("Hypernet"):
        hypernets = NetworkLibrary(
            args.hypernetwork_dir or (), kind="hypernetwork", flag="--hypernetwork-dir", suffixes=HYPERNETWORK_SUFFIXES
        )  # fmt: skip
        names = [name for name, _ in infotext_names(params["Hypernet"])]
        digests = [d.strip() for d in params.get("Hypernet hash", "").split(",")]
        pairs = [(n, digests[i] if i < len(digests) else "") for i, n in enumerate(names)]
        warnings += check_replay(pairs, hypernets, "hypernet", source)
    if params.get("VAE") or params.get("VAE hash"):
        recorded = f"VAE {params.get('VAE') or '?'} (hash {params.get('VAE hash') or '?'})"
        if args.vae is None:
            raise SdStudioError(f"{source} was made with {recorded}: pass that file with --vae FILE")
        from sdstudio.models.vae_file import vae_short_hash

        if params.get("VAE hash") and Path(args.vae).exists() and vae_short_hash(args.vae) != params["VAE hash"]:
            warnings.append(f"{source} was made with {recorded}; {args.vae} differs")
    return warnings


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.diffusion.samplers import SamplerStep
    from sdstudio.engine import Pipeline, choose_device, choose_dtype
    from sdstudio.io.images import save_png
    from sdstudio.pipelines.preview import previewer_for
    from sdstudio.pipelines.validate import check_request

    # Everything that can be refused without the model is refused before it loads.
    check_generate_args(args)
    model_path = args.model or embedded_model_path()
    if model_path is None:
        raise SdStudioError(
            "no --model given and the embedded default model is not shipped yet: pass --model PATH "
            "(a .safetensors or .ckpt file, or a diffusers folder); "
            "`sdstudio checkpoint random --arch tiny -o tiny.safetensors` makes a random one for testing"
        )
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    limits = limits_from_args(args)
    request, warnings = build_request(args)
    if args.style:
        from sdstudio.prompt.styles import apply_styles, find_styles, load_styles

        if not args.styles:
            raise SdStudioError("--style needs --styles FILE (a styles.csv with name,prompt,negative_prompt)")
        styles = find_styles(load_styles(args.styles), args.style, source=args.styles)
        prompt, negative = apply_styles(request.prompt, request.negative_prompt, styles)
        request = dataclasses.replace(request, prompt=prompt, negative_prompt=negative)
    learned = _learned_upscaler(args, request)
    check_request(request, limits, learned)
    if request.controls:  # every ControlNet named is found before the model loads
        from sdstudio.adapters.library import NetworkLibrary
        from sdstudio.engine import CONTROLNET_SUFFIXES

        library = NetworkLibrary(args.controlnet_dir or (), kind="ControlNet", flag="--controlnet-dir",
                                 suffixes=CONTROLNET_SUFFIXES)  # fmt: skip
        for spec in request.controls:
            if not Path(spec.model).exists():
                library.find(spec.model)
    png_params = options_from_png(args.from_png)[1] if args.from_png else {}
    warnings += check_png_files(args, png_params)
    paths = _output_paths(args, request.batch_size)
    preview_path = _preview_path(args)
    if args.preview_every:
        if preview_path.exists() and not args.overwrite:
            raise SdStudioError(f"{preview_path}: already exists; pass --overwrite to replace it")
        check_writable(preview_path, "preview image")
    pipeline = Pipeline.from_file(
        model_path,
        dtype=dtype,
        use_ema=args.ema,
        prediction=args.prediction,
        embeddings_dir=args.embeddings,
        skip_bad_embeddings=args.skip_bad_embeddings,
        device=device,
        compile=args.compile,
        cuda_graphs=False if args.no_cuda_graphs else None,
        vae=args.vae,
        lora_dirs=args.lora_dir or (),
        hypernetwork_dirs=args.hypernetwork_dir or (),
        strict_networks=args.strict_networks,
        refiner=args.refiner,
        controlnet_dirs=args.controlnet_dir or (),
        upscaler_dirs=args.upscaler_dir or (),
    )
    if args.from_png:
        png_hash = png_params.get("Model hash")
        if png_hash and pipeline.model.short_hash and png_hash != pipeline.model.short_hash:
            warnings.append(
                f"{args.from_png} was made with model hash {png_hash}; this model's is {pipeline.model.short_hash}"
            )
    bar = tqdm(total=request.steps, disable=args.quiet, file=sys.stderr, desc="sampling", unit="step")
    previewer = previewer_for(pipeline.model) if args.preview_every else None

    def progress(step: SamplerStep) -> None:
        bar.total = step.total  # img2img, hires and DDIM/PLMS change the count
        bar.update(1)
        if previewer is not None and ((step.i + 1) % args.preview_every == 0 or step.i + 1 == step.total):
            tiles = previewer(step.denoised, upscale=pipeline.model.config.vae.downsample)
            strip = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height))
            for k, tile in enumerate(tiles):
                strip.paste(tile, (k * tile.width, 0))
            save_png(strip, preview_path, None, overwrite=True)

    with bar:
        result = pipeline(request, callback=progress, limits=limits)
    written = []
    for path, generated in zip(paths, result.images):
        path = path.with_name(path.name.replace(SEED_FIELD, str(generated.seed)))
        image, infotext = generated.image, generated.infotext
        if args.upscale > 1:  # for viewing small images; says so in the metadata
            image = image.resize((image.width * args.upscale, image.height * args.upscale), Image.LANCZOS)
            infotext += (
                f", Postprocess upscale by: {args.upscale}, Postprocess upscaler: Lanczos (plain resampling)"
            )
        written.append(save_png(image, path, infotext, overwrite=args.overwrite))
    for warning in [*warnings, *result.warnings]:
        log.warning(warning)
    for path in written:  # after every file is written: a closed stdout loses nothing
        print(path)
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    """The parsed prompt as JSON (``to_json_dict``); with ``--model``, chunk token counts and warnings too."""
    from sdstudio.prompt.parser import parse, to_json_dict

    for name, value in (("--steps", args.steps), ("--hires-steps", args.hires_steps)):
        if value is not None and value < 1:
            raise SdStudioError(f"{name} must be at least 1 (got {value})")
    if args.embeddings and not args.model:
        raise SdStudioError("--embeddings needs --model: an embedding must match the model's text encoder width")
    parsed = parse(args.prompt, args.steps, args.hires_steps)
    out = to_json_dict(parsed)
    if parsed.hires is not None:
        out["hires"] = to_json_dict(parsed.hires)
    if args.model:
        _add_token_counts(args, parsed, out)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def _add_token_counts(args: argparse.Namespace, parsed: ParsedPrompt, out: dict) -> None:
    """Add ``chunk_token_counts`` to every schedule entry of ``out`` (and its hires part) and ``warnings``."""
    from sdstudio.models.detect import detect_config
    from sdstudio.models.loading import load_state
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.prompt.conditioning import prompt_warnings, tokenize_attention
    from sdstudio.prompt.embeddings import load_embeddings_for

    stored, state, _ = load_state(args.model)
    config = stored or detect_config({k: tuple(v.shape) for k, v in state.items()})
    text = config.text
    del state
    tokenizer = ClipTokenizer()
    embeddings = None
    if args.embeddings:
        embeddings = load_embeddings_for(args.embeddings, config, tokenizer, skip_bad=args.skip_bad_embeddings)
    for part, part_json in ((parsed, out), (parsed.hires, out.get("hires"))):
        if part is None:
            continue
        for sub, sub_json in zip(part.subprompts, part_json["subprompts"]):
            for entry, entry_json in zip(sub.schedule, sub_json["schedule"]):
                chunks = tokenize_attention(entry.attention, tokenizer, text, embeddings)
                entry_json["chunk_token_counts"] = [chunk.length for chunk in chunks]
    # LoRA and hypernetwork tags are listed in "extra_networks" and applied by generate
    out["warnings"] = [*(embeddings.warnings if embeddings else ()), *prompt_warnings(parsed, embeddings, True)]


def cmd_checkpoint_random(args: argparse.Namespace) -> int:
    from sdstudio.models.configs import preset
    from sdstudio.models.loading import parse_dtype, save_model
    from sdstudio.models.stablediffusion import random_model

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SdStudioError(f"{out}: already exists; pass --overwrite to replace it")
    try:
        config = preset(args.arch)
    except ValueError as e:
        raise SdStudioError(str(e)) from None
    model = random_model(config, seed=args.seed)
    save_model(model, out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    print(out)
    return 0


def cmd_checkpoint_info(args: argparse.Namespace) -> int:
    from sdstudio.models.loading import checkpoint_info

    print(json.dumps(checkpoint_info(args.file), indent=2))
    return 0


def cmd_train_toyworld(args: argparse.Namespace) -> int:
    from sdstudio.toyworld.recipe import CLIP_PAIR, STAGES, ToyRecipe, run_recipe

    recipe = ToyRecipe.smoke() if args.smoke else ToyRecipe(seed=args.seed)
    stages = tuple(args.stage) if args.stage else STAGES
    path = run_recipe(args.out, recipe, stages, start=args.start)
    if path.exists():
        print(path)
    if "clip" in stages and (path.parent / CLIP_PAIR).exists():
        print(path.parent / CLIP_PAIR)  # the toy CLIP pair's image side (sdstudio caption --toy-pair)
    return 0


# each method's default (learning rate, steps): for a checkpoint of the user's, and for the embedded toy model,
# which is small and learns a concept in a few hundred steps at a higher rate (benchmarks/toy_concepts.py)
TRAINING_DEFAULTS: dict[str, dict[str, tuple[float, int]]] = {
    "embedding": {"model": (5e-3, 1000), "embedded": (5e-3, 1000)},
    "lora": {"model": (1e-4, 1000), "embedded": (1e-3, 400)},
    "hypernetwork": {"model": (1e-5, 2000), "embedded": (1e-3, 400)},
    "dreambooth": {"model": (5e-6, 800), "embedded": (1e-4, 300)},
    "finetune": {"model": (1e-5, 1000), "embedded": (1e-4, 300)},
}


def _training_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    """The options every fine-tuning method shares."""
    (lr, steps), (toy_lr, toy_steps) = TRAINING_DEFAULTS[method]["model"], TRAINING_DEFAULTS[method]["embedded"]
    parser.set_defaults(method=method)
    parser.add_argument("--model", help="base checkpoint (default: the embedded model)")
    parser.add_argument("--data", required=True, metavar="DIR", help="images with same-stem .txt / .caption "
                        "captions, kohya N_name repeat folders, or a metadata.jsonl folder")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: results, state, log; "
                        "a run of the same settings resumes there")  # fmt: skip
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {steps}; {toy_steps} on the embedded model)")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {lr:g}; {toy_lr:g} on the embedded model)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    parser.add_argument("--cosine", action="store_true", help="cosine learning-rate decay (default constant)")
    parser.add_argument("--resolution", type=int, help="training size (default: the model's)")
    parser.add_argument("--template", metavar="NAME|FILE", help="prompt template: filewords, subject, "
                        "subject_filewords, style, style_filewords, or a file with one line per prompt")  # fmt: skip
    parser.add_argument("--flip", action="store_true", help="mirror images at random")
    parser.add_argument("--shuffle-tags", action="store_true", help="shuffle comma-separated caption tags")
    parser.add_argument("--keep-tokens", type=int, default=0, help="with --shuffle-tags: the first N tags stay")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="share of steps with an empty caption")
    parser.add_argument("--snr-gamma", type=float, default=0.0, help="Min-SNR-gamma loss weighting (0: off; 5 usual)")
    parser.add_argument("--save-every", type=int, default=500, help="steps between saves of the state, the "
                        "result so far (saves/NAME-STEP.*) and the preview (default 500)")  # fmt: skip
    parser.add_argument("--preview-prompt", help="at each save, generate previews/NAME-STEP.png from this prompt "
                        "with what was learnt so far")  # fmt: skip
    parser.add_argument("--preview-negative", default="", help="negative prompt of the previews")
    parser.add_argument("--preview-sampler", default="Euler a", help="sampler of the previews (default Euler a)")
    parser.add_argument("--preview-steps", type=int, default=20, help="sampler steps of the previews (default 20)")
    parser.add_argument("--preview-cfg", type=float, default=7.0, help="CFG scale of the previews (default 7)")
    parser.add_argument("--preview-seed", type=int, default=0, help="seed of the previews (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where fast), fp32 or bf16")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _training_setup(args: argparse.Namespace) -> tuple[object, object, dict]:
    """The base model (fp32 weights), the run options and the dataset options of a training command."""
    import torch

    from sdstudio.engine import choose_dtype
    from sdstudio.models.loading import load_model
    from sdstudio.training.datasets import load_template
    from sdstudio.training.finetune import RunConfig

    if not Path(args.data).is_dir():
        raise SdStudioError(f"{args.data}: no such folder (--data)")
    lr, steps = TRAINING_DEFAULTS[args.method]["model" if args.model else "embedded"]
    args.lr = lr if args.lr is None else args.lr
    args.steps = steps if args.steps is None else args.steps
    run = RunConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup, cosine=args.cosine, seed=args.seed,
        bf16=choose_dtype(args.precision) == torch.bfloat16, snr_gamma=args.snr_gamma, save_every=args.save_every,
    )  # fmt: skip
    options: dict = {"flip": args.flip, "shuffle_tags": args.shuffle_tags, "keep_tokens": args.keep_tokens,
                     "caption_dropout_rate": args.caption_dropout}  # fmt: skip
    if args.resolution:
        options["resolution"] = args.resolution
    if args.template:
        options["template"] = load_template(args.template)
    model_path = args.model or embedded_model_path()
    if model_path is None:
        raise SdStudioError("no --model given and the embedded model is not shipped")
    if not Path(model_path).exists():
        raise SdStudioError(f"{model_path}: no such file or folder (--model)")
    loaded = load_model(model_path)
    if loaded.config.is_sdxl:
        raise SdStudioError(
            f"{model_path}: an SDXL model; sdstudio trains SD 1.x / 2.x models so far (SDXL generates, with LoRAs "
            "and embeddings made elsewhere)"
        )
    return loaded, run, options


def _preview(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The preview request of a training command, or None without --preview-prompt."""
    from sdstudio.training.preview import PreviewSettings

    if args.preview_prompt is None:
        return None
    return PreviewSettings(args.preview_prompt, args.preview_negative, args.preview_sampler, args.preview_steps,
                           args.preview_cfg, args.preview_seed)  # fmt: skip


def _progress_bar(args: argparse.Namespace, steps: int):  # type: ignore[no-untyped-def]
    """A tqdm bar with the smoothed loss and the speed; under torchrun on rank 0 only."""
    from tqdm import tqdm

    from sdstudio.training.distributed import is_main

    bar = tqdm(total=steps, disable=args.quiet or not is_main(), file=sys.stderr, desc="training", unit="step")

    def update(step: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()

    return bar, update


def cmd_train_embedding(args: argparse.Namespace) -> int:
    from sdstudio.training.embedding import EmbeddingTrainConfig
    from sdstudio.training.finetune import train_embedding

    config = EmbeddingTrainConfig(args.name, args.vectors, args.init_text)
    model, run, options = _training_setup(args)
    bar, update = _progress_bar(args, args.steps)
    with bar:
        paths = train_embedding(model, args.data, args.out, config, run, options, overwrite=args.overwrite,
                                progress=update, preview=_preview(args))  # type: ignore[arg-type]  # fmt: skip
    return _print_paths(paths)


def _loop_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The loop options of the methods that train the model's own weights or LoRA factors (kohya's names)."""
    from sdstudio.training.trainer import OPTIMIZERS, SCHEDULES

    parser.add_argument("--name", default=name, help=f"output file name without suffix (default {name})")
    parser.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    parser.add_argument("--text-lr", type=float, help="text encoder learning rate (default: a LoRA's half the "
                        "UNet's; a model's the same as the UNet's)")  # fmt: skip
    parser.add_argument("--lr-schedule", choices=SCHEDULES, help="learning-rate schedule after the warm-up "
                        "(default constant; --cosine is cosine)")  # fmt: skip
    parser.add_argument("--noise-offset", type=float, default=0.0, help="offset noise (0.05-0.1 usual; 0: off)")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="adamw, or adamw8bit (bitsandbytes' 8-bit moments, where it runs)")  # fmt: skip
    parser.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="dtype of the "
                        "written weights (default fp16)")  # fmt: skip


def _print_paths(paths: list) -> int:
    """The written files, one per line (under torchrun by rank 0 only; the rank then ends in ``entry``)."""
    from sdstudio.training.distributed import is_main

    if is_main():
        for path in paths:
            print(path)
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    from sdstudio.training.lora import LoraRunOptions, LoraTrainConfig, train_lora

    model, run, options = _training_setup(args)
    config = LoraTrainConfig(
        rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
        train_text_encoder=args.train_text_encoder, unet_lr=args.lr,
        text_lr=args.lr / 2 if args.text_lr is None else args.text_lr,
        modules=tuple(args.modules), skip_modules=tuple(args.skip_modules),
    )  # fmt: skip
    run_options = LoraRunOptions(
        name=args.name, noise_offset=args.noise_offset, lr_schedule=args.lr_schedule,
        gradient_accumulation=args.grad_accumulation, optimizer=args.optimizer, save_dtype=args.save_dtype,
        prior=_prior(args), embeddings=args.embeddings, pivotal_lr=args.pivotal_lr, pivotal=_pivotal(args),
    )  # fmt: skip
    bar, update = _progress_bar(args, args.steps)
    with bar:
        paths = train_lora(model, args.data, args.out, config, run, run_options, options,  # type: ignore[arg-type]
                           overwrite=args.overwrite, progress=update, preview=_preview(args))  # fmt: skip
    return _print_paths(paths)


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise SdStudioError(f"{flag} {text!r}: comma-separated numbers, such as 1,2,1") from None


def cmd_train_hypernetwork(args: argparse.Namespace) -> int:
    from sdstudio.training.hypernetwork import HypernetworkTrainConfig, train_hypernetwork

    dropout = _float_list(args.dropout_structure, "--dropout-structure") if args.dropout_structure else None
    config = HypernetworkTrainConfig(
        args.name, layer_structure=_float_list(args.layer_structure, "--layer-structure"),
        activation_func=args.activation, weight_initialization=args.weight_init, is_layer_norm=args.layer_norm,
        use_dropout=args.dropout or dropout is not None, dropout_structure=dropout,
        activate_output=args.activate_output,
        widths=tuple(int(w) for w in _float_list(args.widths, "--widths")) if args.widths else None,
    )  # fmt: skip
    model, run, options = _training_setup(args)
    bar, update = _progress_bar(args, args.steps)
    with bar:
        paths = train_hypernetwork(model, args.data, args.out, config, run, options,  # type: ignore[arg-type]
                                   overwrite=args.overwrite, progress=update, preview=_preview(args))  # fmt: skip
    return _print_paths(paths)


def _prior(args: argparse.Namespace) -> object:
    """The prior preservation (regularisation images) the class arguments ask for, or None."""
    from sdstudio.training.dreambooth import PriorPreservation

    if not (args.class_prompt or args.class_data):
        if args.prior_target != "noise":
            raise SdStudioError(
                f"--prior-target {args.prior_target} is the class images' target: give them with "
                "--class-prompt or --class-data"
            )
        return None
    return PriorPreservation(
        args.class_prompt or "", class_data=args.class_data, num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight, target=args.prior_target, steps=args.class_steps,
        seed=args.seed,
    )  # fmt: skip


def _pivotal_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--pivotal", metavar="WORD", help=f"pivotal tuning: also learn the vectors of WORD (a "
                        f"word the captions use) with {what}; written as OUT/embeddings/WORD.safetensors, to "
                        "generate with --embeddings OUT/embeddings")  # fmt: skip
    parser.add_argument("--pivotal-init", default="*", metavar="TEXT",
                        help="the text WORD's vectors start from (default '*'; a related word: 'red' for pink)")  # fmt: skip
    parser.add_argument("--pivotal-vectors", type=int, default=1, help="vectors of WORD (default 1)")
    parser.add_argument("--pivotal-lr", type=float, default=5e-3, help="learning rate of WORD's vectors (default "
                        "5e-3, textual inversion's)")  # fmt: skip


def _pivotal(args: argparse.Namespace) -> object:
    from sdstudio.training.embedding import EmbeddingTrainConfig

    return EmbeddingTrainConfig(args.pivotal, args.pivotal_vectors, args.pivotal_init) if args.pivotal else None


def _prior_arguments(parser: argparse.ArgumentParser) -> None:
    from sdstudio.training.dreambooth import PRIOR_TARGETS

    parser.add_argument("--class-prompt", help="prior preservation: class images of this prompt ('a photo of a "
                        "dog'), made by the model itself and cached in --class-data")  # fmt: skip
    parser.add_argument("--class-data", metavar="DIR", help="class (regularisation) images folder, captioned by "
                        "same-stem .txt files or by --class-prompt (default OUT/class_images); images already "
                        "there are used first")  # fmt: skip
    parser.add_argument("--num-class-images", type=int, default=100, help="class images (default 100)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class loss")
    parser.add_argument("--prior-target", choices=PRIOR_TARGETS, default="noise",
                        help="what the class images' loss compares with: the noise (DreamBooth's, default) or "
                        "the base model's own prediction at the same noised latents and caption (a distillation that "
                        "holds the base closer; DreamBooth keeps a copy of the UNet for it)")  # fmt: skip
    parser.add_argument("--class-steps", type=int, default=20, help="sampler steps per class image")


def cmd_train_model(args: argparse.Namespace) -> int:
    """DreamBooth and full fine-tuning: the model's own weights."""
    from sdstudio.training.dreambooth import (
        DreamBoothConfig,
        FinetuneConfig,
        train_dreambooth,
        train_finetune,
    )

    common = {
        "name": args.name, "train_text_encoder": args.train_text_encoder, "text_lr": args.text_lr,
        "noise_offset": args.noise_offset, "gradient_accumulation": args.grad_accumulation,
        "gradient_checkpointing": args.gradient_checkpointing, "optimizer": args.optimizer,
        "lr_schedule": args.lr_schedule, "prediction": args.prediction_target, "save_dtype": args.save_dtype,
        "ema_warmup": args.ema_warmup, "pivotal": _pivotal(args), "pivotal_lr": args.pivotal_lr,
        "modules": tuple(args.modules),
    }  # fmt: skip
    if args.ema_decay is not None:
        common["ema_decay"] = args.ema_decay
    if args.method == "dreambooth":
        config: object = DreamBoothConfig(**common, instance_prompt=args.instance_prompt or "", prior=_prior(args))
        method = train_dreambooth
    else:
        config, method = FinetuneConfig(**common), train_finetune
    model, run, options = _training_setup(args)
    bar, update = _progress_bar(args, args.steps)
    with bar:
        paths = method(model, args.data, args.out, config, run, options,  # type: ignore[arg-type,operator]
                       overwrite=args.overwrite, progress=update, preview=_preview(args))  # fmt: skip
    return _print_paths(paths)


def cmd_toyworld_dataset(args: argparse.Namespace) -> int:
    from sdstudio.toyworld.concepts import write_concept_dataset

    print(write_concept_dataset(args.concept, args.n, Path(args.out), seed=args.seed, overwrite=args.overwrite))
    return 0


def cmd_eval_toyworld(args: argparse.Namespace) -> int:
    from sdstudio.toyworld.evaluate import evaluate, format_table

    model = args.model or embedded_model_path()
    if model is None:
        raise SdStudioError("no --model given and the embedded default model is not shipped yet")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SdStudioError(f"{args.json}: already exists; pass --overwrite to replace it")
    if args.concept:
        from sdstudio.toyworld.evaluate import ConceptEvalSettings, evaluate_concept, format_concept_table

        counts = {"prompts_per_split": args.prompts, "base_prompts_per_set": args.base_prompts}
        settings = ConceptEvalSettings(ngms=args.ngms, ngms_all_steps=args.ngms_all_steps,
                                       **{k: v for k, v in counts.items() if v is not None})  # fmt: skip
        results = evaluate_concept(
            model, args.concept, settings, prompt_suffix="".join(f" {t}" for t in args.network),
            concept_word=args.concept_word, lora_dirs=args.lora_dir, hypernetwork_dirs=args.hypernetwork_dir,
            embeddings_dir=args.embeddings, method=args.method,
        )  # fmt: skip
        print(format_concept_table(results))
    else:
        encoder = args.image_encoder or embedded_model_path(EMBEDDED_IMAGE_ENCODER)
        results = evaluate(
            model, image_encoder_path=encoder, extra_prompts=args.prompt or (), ngms=args.ngms,
            ngms_all_steps=args.ngms_all_steps, **({"prompts_per_set": args.prompts} if args.prompts else {}),
        )  # fmt: skip
        print(format_table(results))
    if args.json:
        from sdstudio.io.files import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdstudio.types import CONTROL_MODES, CONTROL_RESIZE_MODES

    parser = argparse.ArgumentParser(prog="sdstudio", description="Stable Diffusion: generate, edit, train, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate images: txt2img, img2img, inpainting, outpainting, hires fix",
        epilog=embedded_model_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --from-png)")
    gen.add_argument("--from-png", metavar="FILE", help="replay the generation recorded in a PNG's parameters; flags given override them")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--styles", metavar="FILE", help="styles.csv (name,prompt,negative_prompt), as AUTOMATIC1111's")
    gen.add_argument("--style", action="append", metavar="NAME",
                     help="apply this style from --styles: {prompt} in it is replaced by the prompt, else it is "
                     "appended (repeatable)")  # fmt: skip
    gen.add_argument("--model", help="checkpoint: .safetensors, .ckpt or a diffusers folder (default: embedded)")
    gen.add_argument("--sampler", help="sampler name as AUTOMATIC1111 shows it (default: Euler a)")
    gen.add_argument("--scheduler", help="schedule type: Automatic (default), Uniform, Karras, ...")
    gen.add_argument("--steps", type=int, help="sampling steps (default 20)")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    gen.add_argument("--seed", type=int, help="seed of the first image (-1, the default: random)")
    gen.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (default: the model's size, or the init image's)")
    gen.add_argument("--height", type=int, help="height in pixels, a multiple of 8")
    gen.add_argument("--batch", type=int, default=1, help="images to make, with seeds seed..seed+N-1")
    gen.add_argument("--clip-skip", type=int, help="use the N-th text encoder layer from the end (1 = last)")
    gen.add_argument("--eta", type=float, help="noise multiplier for ancestral and DDIM samplers")
    gen.add_argument("--ensd", type=int, help="eta noise seed delta: sampler noise from seed + N, as AUTOMATIC1111 (default 0)")
    gen.add_argument(
        "--tome", type=float, metavar="RATIO",
        help="token merging: share of full-resolution tokens merged before self-attention (0-0.75; 0.5 usual). "
        "Faster at 512x512 and above; the image changes (default 0: exact)",
    )  # fmt: skip
    gen.add_argument(
        "--ngms", type=float, metavar="SIGMA",
        help="negative guidance minimum sigma (AUTOMATIC1111's NGMS): below this noise level steps use the "
        "prompt alone, without CFG; 0 turns it off (default: the model's: off, but 0.5 for toyworld models)",
    )  # fmt: skip
    gen.add_argument(
        "--ngms-all-steps", action=argparse.BooleanOptionalAction,
        help="apply --ngms at every step below it, not every other one as AUTOMATIC1111 (default: the model's)",
    )  # fmt: skip
    gen.add_argument("--subseed", type=int, help="variation seed (-1: random); used with --subseed-strength")
    gen.add_argument("--subseed-strength", type=float, help="variation strength 0..1 (default 0: none)")
    gen.add_argument("--init-image", metavar="PATH", help="img2img: start from this image")
    gen.add_argument("--strength", type=float, help="img2img denoising strength 0..1 (default 0.75)")
    gen.add_argument("--resize-mode", choices=["just resize", "crop and resize", "resize and fill"],
                     help="how the init image meets the size (default: just resize)")
    gen.add_argument("--mask", metavar="PATH", help="inpainting mask: white = repaint")
    gen.add_argument("--mask-blur", type=int, help="mask blur radius in pixels (default 4)")
    gen.add_argument("--inpaint-only-masked", action="store_true", default=None,
                     help="inpaint a crop around the mask at full resolution, then paste it back")
    gen.add_argument("--masked-padding", type=int, help="pixels around the mask for --inpaint-only-masked (default 32)")
    gen.add_argument("--masked-content", choices=["fill", "original", "latent noise", "latent nothing"],
                     help="what the masked area starts from (default: original)")
    gen.add_argument("--outpaint", metavar="SIDES:PIXELS", help="extend the init image, e.g. left,right:64 or up:32,down:64")
    gen.add_argument("--hires-scale", type=float, help="hires fix: upscale the first pass by this factor and denoise again")
    gen.add_argument("--hires-steps", type=int, help="hires fix second-pass steps (default 0: as --steps)")
    gen.add_argument("--hires-strength", type=float, help="hires fix denoising strength (default 0.7)")
    gen.add_argument("--hires-upscaler", help="Latent (default), Latent (nearest), Latent (bicubic), ..., Lanczos, "
                     "Nearest, or a learned upscaler: a file stem in --upscaler-dir (ESRGAN, Real-ESRGAN, Compact)")
    gen.add_argument("--upscaler-dir", action="append", metavar="DIR",
                     help="folder of upscaler files (.pth, .safetensors) for --hires-upscaler (repeatable)")
    gen.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                     help="tiled VAE decode/encode for large images (auto: above 96x96 latents)")
    gen.add_argument("--preview-every", type=int, metavar="N", help="write a cheap preview every N steps (NAME-preview.png)")
    gen.add_argument(
        "--precision",
        "--dtype",
        default="auto",
        help="compute precision: auto (fastest safe choice for this machine), fp32, bf16 or fp16",
    )
    gen.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="run the UNet through torch.compile (inductor): the first image pays the compile; on CPU it is "
        "slower than the default path (BENCHMARKS.md)",
    )
    gen.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, launch the UNet's kernels one by one")
    gen.add_argument("--upscale", type=int, default=1, help="enlarge the saved image N times, 1-8 (plain Lanczos resampling)")
    gen.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    gen.add_argument("--prediction", choices=["epsilon", "v"], help="override the model's prediction type")
    gen.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings (name = file stem)")
    gen.add_argument("--skip-bad-embeddings", action="store_true", help="warn about unusable embedding files, don't fail")
    net = gen.add_argument_group(
        "networks", "LoRA / LyCORIS and hypernetwork files, used by name in the prompt: <lora:NAME:MULT>, "
        "<lora:NAME:TE_MULT:UNET_MULT> (or te=, unet=), <hypernet:NAME:MULT>",
    )  # fmt: skip
    net.add_argument("--lora-dir", action="append", metavar="DIR",
                     help="folder of LoRA / LyCORIS files, subfolders included (repeatable); NAME is a file stem "
                     "or the name the file was trained under (ss_output_name)")
    net.add_argument("--hypernetwork-dir", action="append", metavar="DIR",
                     help="folder of AUTOMATIC1111 hypernetwork .pt files, subfolders included (repeatable)")
    net.add_argument("--strict-networks", action="store_true",
                     help="a network that is not found, cannot be read or does not fully fit the model is an "
                     "error (default: a warning, and the image is made without it)")
    gen.add_argument("--vae", metavar="FILE", help="VAE file (.safetensors, .ckpt, .pt, or a diffusers folder) to "
                     "use instead of the checkpoint's, e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    ctl = gen.add_argument_group("ControlNet", "AUTOMATIC1111's sd-webui-controlnet units (repeat --control for several)")
    ctl.add_argument("--control", action="append", metavar="MODEL:IMAGE[:WEIGHT[:START:END]]",
                     help="a ControlNet (file stem in --controlnet-dir, or a path) with its control image, weight "
                     "(default 1) and guidance start / end (shares of the steps, default 0:1); MODEL: alone uses "
                     "--init-image")
    ctl.add_argument("--control-preprocess", action="append", metavar="NAME",
                     help="preprocessor making the control map from the image: none (default), canny, invert, "
                     "threshold, scribble_threshold, scribble_xdog, softedge_sobel, shuffle, tile_resample, "
                     "blur_gaussian, inpaint, inpaint_only (once for all units, or once per --control)")
    ctl.add_argument("--control-mode", action="append", choices=list(CONTROL_MODES),
                     help="Balanced (default), My prompt is more important, ControlNet is more important")
    ctl.add_argument("--control-resize", action="append", choices=list(CONTROL_RESIZE_MODES),
                     help="how the control image fits the image size (default Crop and Resize)")
    ctl.add_argument("--control-threshold-a", action="append", type=float, metavar="X",
                     help="the preprocessor's first parameter (canny: low threshold)")
    ctl.add_argument("--control-threshold-b", action="append", type=float, metavar="X",
                     help="the preprocessor's second parameter (canny: high threshold)")
    ctl.add_argument("--controlnet-dir", action="append", metavar="DIR",
                     help="folder of ControlNet files (.safetensors, .pth), subfolders included (repeatable)")
    gen.add_argument("--refiner", metavar="FILE", help="SDXL refiner checkpoint that takes over the last steps "
                     "(AUTOMATIC1111's Refiner), e.g. sd_xl_refiner_1.0.safetensors")
    gen.add_argument("--refiner-switch-at", type=float, metavar="X", help="share of the noise schedule after which "
                     "the refiner takes over (default 0.8; needs --refiner)")
    gen.add_argument(
        "--threads", type=int, metavar="N",
        help="CPU threads (default: the cores this process may use, fewer when other processes keep some busy)",
    )  # fmt: skip
    lim = gen.add_argument_group("limits", "caps that refuse a request before any work (raise them to go further)")
    lim.add_argument("--max-pixels", type=int, metavar="N", help="most pixels of one image in any pass, hires included "
                     "(default 4194304: 2048x2048)")
    lim.add_argument("--max-steps", type=int, metavar="N", help="most sampling steps of a pass (default 1000)")
    lim.add_argument("--max-batch", type=int, metavar="N", help="most images of one request (default 64)")
    out = gen.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="output PNG file (a batch adds -0, -1, ...)")
    out.add_argument("--outdir", default="outputs", help="output folder (default: outputs)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing files")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    pr = sub.add_parser("prompt", help="print how a prompt parses (AUTOMATIC1111 syntax) as JSON")
    pr.add_argument("prompt", help="the prompt")
    pr.add_argument("--steps", type=int, default=20, help="sampling steps the schedule is for (default 20)")
    pr.add_argument("--hires-steps", type=int, help="also schedule a hires-fix second pass of M steps")
    pr.add_argument("--model", help="checkpoint: adds each chunk's token count and any warnings")
    pr.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings (needs --model)")
    pr.add_argument("--skip-bad-embeddings", action="store_true", help="warn about unusable embedding files, don't fail")
    pr.set_defaults(func=cmd_prompt)

    trn = sub.add_parser("train", help="train models")
    trn_sub = trn.add_subparsers(dest="train_command", required=True)
    tw = trn_sub.add_parser("toyworld", help="train the embedded toy-world model from scratch (VAE, text, UNet)")
    tw.add_argument("--out", required=True, help="run folder: an empty one, or a run of the same recipe to resume")
    tw.add_argument("--stage", action="append", choices=["vae", "text", "latents", "unet", "decoder", "clip"],
                    help="run only this stage (repeatable; earlier stages must be done)")
    tw.add_argument("--from", dest="start", metavar="MODEL", help="a finished toy-world model to run --stage "
                    "on, the stages before it counted as done (the shipped model got its decoder stage so)")
    tw.add_argument("--seed", type=int, default=0)
    tw.add_argument("--smoke", action="store_true", help="a few steps per stage, to check the set-up")
    tw.set_defaults(func=cmd_train_toyworld)
    emb = trn_sub.add_parser(
        "embedding", help="textual inversion: learn a new word from a folder of captioned images",
        description="Learn the vectors of a new word (AUTOMATIC1111's Train > Embedding). Captions name it, or a "
        "--template line such as 'a photo of [name], [filewords]' does. Writes NAME.pt (AUTOMATIC1111) and "
        "NAME.safetensors into --out; use them with --embeddings DIR.",
    )  # fmt: skip
    _training_arguments(emb, "embedding")
    emb.add_argument("--name", required=True, help="the word prompts use for it")
    emb.add_argument("--vectors", type=int, default=1, help="vectors per token (default 1)")
    emb.add_argument("--init-text", default="*", help="the text the vectors start from (default '*')")
    emb.set_defaults(func=cmd_train_embedding)
    lo = trn_sub.add_parser(
        "lora", help="LoRA / LoCon: low-rank weights beside the model's, from captioned images",
        description="Train a LoRA as kohya's sd-scripts do (train_network.py) and write NAME.safetensors in "
        "kohya's format with its ss_* metadata: use it with <lora:NAME:1> and --lora-dir, or diffusers' "
        "load_lora_weights. Captions name the concept (a trigger word), or kohya's N_trigger folders do.",
    )  # fmt: skip
    _training_arguments(lo, "lora")
    _loop_arguments(lo, "lora")
    lo.add_argument("--rank", type=int, default=16, help="network dim (default 16)")
    lo.add_argument("--alpha", type=float, help="network alpha (default: the rank, scale 1)")
    lo.add_argument("--conv-rank", type=int, help="LoCon: also the ResNet 3x3 convolutions at this rank")
    lo.add_argument("--conv-alpha", type=float, help="LoCon alpha (default: the conv rank)")
    lo.add_argument("--modules", nargs="+", default=[], metavar="REGEX",
                    help="of the modules kohya would train, only those whose kohya name one of these regular "
                    "expressions finds ('attn2_to_[kv]$': the cross-attention's keys and values)")  # fmt: skip
    lo.add_argument("--skip-modules", nargs="+", default=[], metavar="REGEX",
                    help="leave out the modules whose kohya name one of these regular expressions finds")
    _prior_arguments(lo)
    lo.add_argument("--embeddings", metavar="DIR", help="textual-inversion files the captions may name (by file "
                    "stem), their vectors kept as they are, as prompts use them")  # fmt: skip
    _pivotal_arguments(lo, "the LoRA")
    lo.set_defaults(func=cmd_train_lora)
    hn = trn_sub.add_parser(
        "hypernetwork", help="hypernetwork (AUTOMATIC1111): a style learnt in the attention's keys and values",
        description="Train a new hypernetwork as AUTOMATIC1111's Train tab does and write NAME.pt in its format; "
        "use it with <hypernet:NAME:1> and --hypernetwork-dir.",
    )  # fmt: skip
    _training_arguments(hn, "hypernetwork")
    hn.add_argument("--name", required=True, help="the hypernetwork's name (and file name)")
    hn.add_argument("--layer-structure", default="1,2,1", help="relative layer widths (default 1,2,1)")
    hn.add_argument("--activation", default="linear", help="linear (default), relu, leakyrelu, elu, swish, tanh, "
                    "sigmoid, celu, gelu, glu, hardswish, ...")  # fmt: skip
    hn.add_argument("--weight-init", default="Normal", help="Normal (default), KaimingUniform, KaimingNormal, "
                    "XavierUniform, XavierNormal")  # fmt: skip
    hn.add_argument("--layer-norm", action="store_true", help="layer normalisation after each layer")
    hn.add_argument("--dropout", action="store_true", help="dropout (AUTOMATIC1111's 0.3 where it puts it)")
    hn.add_argument("--dropout-structure", help="dropout per layer, such as 0,0.3,0 (implies --dropout)")
    hn.add_argument("--activate-output", action="store_true", help="the activation after the last layer too")
    hn.add_argument("--widths", help="context widths to learn modules for (default: the model's)")
    hn.set_defaults(func=cmd_train_hypernetwork)
    for method, text in (
        ("dreambooth", "DreamBooth: the whole UNet on a subject, with prior preservation; a new checkpoint"),
        ("finetune", "full fine-tune of the UNet (and text encoder) with EMA weights; a new checkpoint"),
    ):
        mp = trn_sub.add_parser(method, help=text, description=text + ": NAME.safetensors in --out, a single "
                                "file every Stable Diffusion tool loads.")  # fmt: skip
        _training_arguments(mp, method)
        _loop_arguments(mp, method)
        mp.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about a third slower")
        mp.add_argument("--prediction-target", choices=("epsilon", "v"), help="what the UNet learns to predict "
                        "(default: the model's own)")  # fmt: skip
        mp.add_argument("--ema-decay", type=float, help="EMA of the UNet, written as model_ema.* (default "
                        + ("0: none" if method == "dreambooth" else "0.9999") + ")")  # fmt: skip
        mp.add_argument("--ema-warmup", choices=("none", "ldm", "power"), default="ldm",
                        help="EMA warm-up: ldm min(decay, (1+n)/(10+n)) (default), power, none")  # fmt: skip
        mp.add_argument("--modules", nargs="+", default=[], metavar="REGEX",
                        help="train only the UNet weights whose checkpoint key one of these regular expressions "
                        "finds ('transformer_blocks': attention and feed-forward, no convolution); default: all")  # fmt: skip
        if method == "dreambooth":
            mp.add_argument("--instance-prompt", help="the caption of every instance image ('a photo of sks "
                            "dog'); default: the images' own captions")  # fmt: skip
            _prior_arguments(mp)
        _pivotal_arguments(mp, "the UNet")
        mp.set_defaults(func=cmd_train_model)

    ev = sub.add_parser("eval", help="measure models")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ew = ev_sub.add_parser("toyworld", help="prompt adherence, VAE PSNR and FID of a toy-world model")
    ew.add_argument("--model", help="checkpoint (default: the embedded model)")
    ew.add_argument("--image-encoder", help="toy image encoder for FID (default: the embedded one)")
    ew.add_argument("--prompts", type=int, help="prompts per set")
    ew.add_argument("--prompt", action="append", help="also generate for this prompt and report unknown words")
    ew.add_argument("--ngms", type=float, metavar="SIGMA", help="negative guidance minimum sigma (default: the model's; 0: off)")
    ew.add_argument("--ngms-all-steps", action=argparse.BooleanOptionalAction, help="with --ngms: every step below it (default: the model's)")
    ew.add_argument("--json", help="also write the table as JSON to this file")
    ew.add_argument("--overwrite", action="store_true")
    ew.add_argument("--concept", help="measure a concept (ring, pink, outlined) on seen and unseen combinations, "
                    "and what the base prompts lost")  # fmt: skip
    ew.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="with --concept: LoRA folder")
    ew.add_argument("--hypernetwork-dir", action="append", default=[], metavar="DIR", help="with --concept: hypernetworks")
    ew.add_argument("--embeddings", metavar="DIR", help="with --concept: textual inversion embeddings")
    ew.add_argument("--network", action="append", default=[], metavar="TAG",
                    help="with --concept: <lora:NAME:W> / <hypernet:NAME:W> added to every prompt")  # fmt: skip
    ew.add_argument("--concept-word", metavar="WORD", help="the word standing for the concept (embedding name, "
                    "DreamBooth token)")  # fmt: skip
    ew.add_argument("--method", default="", help="with --concept: a label for the report")
    ew.add_argument("--base-prompts", type=int, help="with --concept: base prompts per set, 2 images each "
                    "(default 4; 24 tell a 5-point drop from noise better)")  # fmt: skip
    ew.set_defaults(func=cmd_eval_toyworld)
    from sdstudio.cli_eval import add_eval_commands

    add_eval_commands(ev_sub)

    toy = sub.add_parser("toyworld", help="the toy world's data: fine-tuning sets of concepts the embedded model never saw")
    toy_sub = toy.add_subparsers(dest="toyworld_command", required=True)
    tds = toy_sub.add_parser("dataset", help="write a concept's fine-tuning folder: NNNN.png + NNNN.txt (kohya / A1111)")
    tds.add_argument("--concept", required=True, help="ring, pink or outlined; base: scenes of the world the "
                     "embedded model learnt (regularisation images for --class-data)")  # fmt: skip
    tds.add_argument("--n", type=int, required=True, help="image-caption pairs")
    tds.add_argument("--out", required=True, help="folder to write (empty or new)")
    tds.add_argument("--seed", type=int, default=0)
    tds.add_argument("--overwrite", action="store_true", help="replace the numbered pairs of a folder that has some")
    tds.set_defaults(func=cmd_toyworld_dataset)
    from sdstudio.cli_control import add_control_dataset_parser, add_train_controlnet_parser

    add_control_dataset_parser(toy_sub)
    add_train_controlnet_parser(trn_sub)

    ckpt = sub.add_parser("checkpoint", help="make or inspect checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    rnd = ckpt_sub.add_parser("random", help="write a randomly initialised checkpoint of a preset")
    rnd.add_argument("--arch", required=True, help="preset: sd15, sd15-inpaint, sd2, sd2-v, sd2-inpaint, tiny, ...")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    rnd.add_argument("-o", "--output", required=True, help="output .safetensors file")
    rnd.add_argument("--overwrite", action="store_true")
    rnd.set_defaults(func=cmd_checkpoint_random)
    info = ckpt_sub.add_parser("info", help="print a checkpoint's architecture as JSON")
    info.add_argument("file")
    info.set_defaults(func=cmd_checkpoint_info)
    from sdstudio.cli_checkpoint import add_checkpoint_commands
    from sdstudio.cli_lora import add_lora_commands

    add_checkpoint_commands(ckpt_sub)

    add_lora_commands(sub)
    from sdstudio.cli_batch import add_batch_commands

    add_batch_commands(sub)
    from sdstudio.cli_grid import add_grid_commands

    add_grid_commands(sub)
    from sdstudio.cli_caption import add_caption_commands

    add_caption_commands(sub)
    from sdstudio.cli_upscale import add_upscale_parser

    add_upscale_parser(sub)

    srv = sub.add_parser("serve", help="serve the web UI, AUTOMATIC1111's /sdapi/v1 API and a job API (/sdapi/v2/jobs) over HTTP")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=7860, help="port (default: 7860, as AUTOMATIC1111)")
    srv.add_argument("--model", help="the default checkpoint (default: the embedded toy model)")
    srv.add_argument("--models-dir", metavar="DIR", help="folder of more checkpoints (.safetensors, .ckpt, diffusers "
                     "folders), listed by /sdapi/v1/sd-models and switched to by title")
    srv.add_argument("--model-cache-mb", type=int, metavar="MB", help="memory the loaded checkpoints may take; "
                     "the least recently used is unloaded when over (default: half the free RAM)")
    srv.add_argument("--lora-dir", action="append", metavar="DIR", help="folder of LoRAs (repeatable)")
    srv.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings")
    srv.add_argument("--hypernetwork-dir", action="append", metavar="DIR", help="folder of hypernetworks (repeatable)")
    srv.add_argument("--controlnet-dir", action="append", metavar="DIR", help="folder of ControlNet models "
                     "(.safetensors, .pth, .ckpt, .pt; subfolders included) for sd-webui-controlnet's API: "
                     "/controlnet/model_list and alwayson_scripts units (repeatable)")
    srv.add_argument("--data-dir", metavar="DIR", help="where jobs (jobs.sqlite) and their outputs are kept "
                     "(default: $XDG_DATA_HOME/sdstudio or ~/.local/share/sdstudio)")
    srv.add_argument("--api-auth", metavar="USER:PASS[,...]", help="require HTTP Basic auth on every route")
    srv.add_argument("--max-size", type=int, default=2048, metavar="PX", help="largest width or height (default: 2048)")
    srv.add_argument("--cors-allow-origins", metavar="ORIGIN[,...]", help="allow these origins cross-origin "
                     "requests (CORS); off unless given")
    srv.add_argument("--workers", type=int, metavar="N", help="generation workers sharing the job queue, each "
                     "with its own copy of the models (default: one per GPU, worker i on cuda:i; on a CPU, one)")
    srv.add_argument("--no-ui", action="store_true", help="serve the API alone, without the web UI at /")
    srv.add_argument("--clip", metavar="FILE", help="/sdapi/v1/interrogate: a whole CLIP file (default: the "
                     "toy world's CLIP pair)")  # fmt: skip
    srv.add_argument("--blip", metavar="DIR", help="/sdapi/v1/interrogate: a BLIP captioning folder")
    srv.add_argument("--phrases", action="append", metavar="PATH", help="/sdapi/v1/interrogate: more phrase "
                     "lists (.txt files or folders)")  # fmt: skip
    srv.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sdstudio.server.app import config_from_args, create_app
    from sdstudio.threads import apply_thread_policy

    config, load = config_from_args(args, embedded_model_path())
    # the server owns its process, as `generate` does: threads for the cores other processes leave free
    choice = apply_thread_policy(None)
    log.info("threads: %s", choice)
    cpu_workers = sum(d == "cpu" for d in config.devices)
    if cpu_workers > 1:
        import torch

        # each worker's ops start their own thread team: split the threads so that together they fit
        torch.set_num_threads(max(1, choice.threads // cpu_workers))
        log.info("%d CPU workers, %d thread(s) each", cpu_workers, torch.get_num_threads())
    app = create_app(config, load)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if config.ui:
        print(f"sdstudio: web UI at http://{host}:{args.port}/ (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace, owns_process: bool = False) -> int:
    """Run the parsed command; errors become one line on stderr and exit status 2. ``owns_process``: the
    ``sdstudio`` command itself, free to set process-wide policies (threads, heap) for ``generate``."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="sdstudio: %(message)s"
    )
    try:
        if owns_process and args.command in ("generate", "batch", "grid", "upscale"):
            tune_process(args)
        return args.func(args)
    except SdStudioError as e:
        print(f"sdstudio: error: {e}", file=sys.stderr)
        return 2
    except (
        BrokenPipeError
    ):  # stdout closed early (`sdstudio prompt ... | head`): end quietly, as Unix tools do
        _silence_stdout()
        return 0
    except OSError as e:  # permission denied, disk full, ...: the file and the reason, no traceback
        name = f"{e.filename}: " if e.filename else ""
        print(f"sdstudio: error: {name}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdstudio: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit meets no closed pipe either."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stdout (tests) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def generates_on_cpu(args: argparse.Namespace) -> bool:
    """Whether the command generates images on the CPU: ``generate`` / ``grid`` with ``--device cpu``, or
    ``auto`` on a machine without a CUDA GPU."""
    if args.command not in ("generate", "grid"):
        return False
    if args.device == "auto":
        import torch

        return not torch.cuda.is_available()
    return args.device == "cpu"


def tune_process(args: argparse.Namespace) -> None:
    """Process-wide settings for ``generate``, ``batch`` and ``grid`` in a process the command owns.

    Threads: as many as the cores not kept busy by other processes, or ``--threads``
    (:mod:`sdstudio.threads`). Heap: on the CPU, freed tensor memory stays in the process's heap
    (:mod:`sdstudio.host_memory`: no page faults per activation, a sd15 512x512 request 1.09-1.11x
    faster). Not on a GPU, where it would only keep the freed CPU copies of the load, and not for training,
    where a shortened toyworld recipe ran no faster with it and peaked 0.3-0.6 GB higher."""
    from sdstudio.threads import apply_thread_policy

    log.info("threads: %s", apply_thread_policy(getattr(args, "threads", None)))
    if generates_on_cpu(args):
        from sdstudio.host_memory import keep_freed_memory

        keep_freed_memory()


def entry() -> int:
    """The ``sdstudio`` command: :func:`main` in a process it owns (see :func:`tune_process`). A rank of a
    torchrun launch leaves through ``distributed.leave``, past the interpreter's finalization."""
    code = run(build_parser().parse_args(), owns_process=True)
    if "torch.distributed" in sys.modules:
        from sdstudio.training import distributed

        if distributed.launched():
            distributed.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
