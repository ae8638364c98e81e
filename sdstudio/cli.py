"""The ``sdstudio`` command: translates arguments to requests and results to files, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from sdstudio.errors import SdStudioError

if TYPE_CHECKING:
    from sdstudio.prompt.parser import ParsedPrompt

log = logging.getLogger("sdstudio")

EMBEDDED_MODEL = "toyworld.safetensors"
EMBEDDED_IMAGE_ENCODER = "toyworld_image_encoder.safetensors"


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path | None:
    path = resources.files("sdstudio") / "assets" / name
    return Path(str(path)) if path.is_file() else None


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
        paths = [outdir / f"{start + i:05d}-{{seed}}.png" for i in range(seeds)]
    if not args.overwrite:
        for p in paths:
            if "{seed}" not in p.name and p.exists():
                raise SdStudioError(f"{p}: already exists; pass --overwrite to replace it or choose another -o")
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.diffusion.samplers import SamplerStep
    from sdstudio.engine import Pipeline, choose_dtype
    from sdstudio.io.images import save_png
    from sdstudio.pipelines.txt2img import plan
    from sdstudio.types import GenerationRequest

    model_path = args.model or embedded_model_path()
    if model_path is None:
        raise SdStudioError(
            "no --model given and the embedded default model is not shipped yet: pass --model PATH "
            "(a .safetensors or .ckpt file, or a diffusers folder); "
            "`sdstudio checkpoint random --arch tiny -o tiny.safetensors` makes a random one for testing"
        )
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        sampler=args.sampler,
        scheduler=args.scheduler,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        width=args.width,
        height=args.height,
        batch_size=args.batch,
        clip_skip=args.clip_skip,
        eta=args.eta,
    )
    paths = _output_paths(args, request.batch_size)
    pipeline = Pipeline.from_file(
        model_path,
        dtype=choose_dtype(args.precision),
        use_ema=args.ema,
        prediction=args.prediction,
        embeddings_dir=args.embeddings,
        skip_bad_embeddings=args.skip_bad_embeddings,
    )
    plan(pipeline.model, request)  # fail on bad options before any work
    bar = tqdm(total=request.steps, disable=args.quiet, file=sys.stderr, desc="sampling", unit="step")

    def progress(step: SamplerStep) -> None:
        bar.total = step.total  # DDIM/PLMS may run one step more than asked, as AUTOMATIC1111 does
        bar.update(1)

    with bar:
        result = pipeline(request, callback=progress)
    for path, generated in zip(paths, result.images):
        path = path.with_name(path.name.format(seed=generated.seed))
        image, infotext = generated.image, generated.infotext
        if args.upscale > 1:  # for viewing small images; says so in the metadata
            image = image.resize((image.width * args.upscale, image.height * args.upscale), Image.LANCZOS)
            infotext += f", Postprocess upscale by: {args.upscale}, Postprocess upscaler: Lanczos (plain resampling)"
        save_png(image, path, infotext, overwrite=args.overwrite)
        print(path)
    for warning in result.warnings:
        log.warning(warning)
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
    from sdstudio.prompt.embeddings import load_embeddings

    stored, state, _ = load_state(args.model)
    text = (stored or detect_config({k: tuple(v.shape) for k, v in state.items()})).text
    del state
    tokenizer = ClipTokenizer()
    embeddings = None
    if args.embeddings:
        embeddings = load_embeddings(args.embeddings, text.width, tokenizer, skip_bad=args.skip_bad_embeddings)
    for part, part_json in ((parsed, out), (parsed.hires, out.get("hires"))):
        if part is None:
            continue
        for sub, sub_json in zip(part.subprompts, part_json["subprompts"]):
            for entry, entry_json in zip(sub.schedule, sub_json["schedule"]):
                chunks = tokenize_attention(entry.attention, tokenizer, text, embeddings)
                entry_json["chunk_token_counts"] = [chunk.length for chunk in chunks]
    out["warnings"] = [*(embeddings.warnings if embeddings else ()), *prompt_warnings(parsed, embeddings)]


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
    from sdstudio.toyworld.recipe import STAGES, ToyRecipe, run_recipe

    recipe = ToyRecipe.smoke() if args.smoke else ToyRecipe(seed=args.seed)
    stages = tuple(args.stage) if args.stage else STAGES
    path = run_recipe(args.out, recipe, stages)
    if path.exists():
        print(path)
    return 0


def cmd_eval_toyworld(args: argparse.Namespace) -> int:
    from sdstudio.toyworld.evaluate import evaluate, format_table

    model = args.model or embedded_model_path()
    if model is None:
        raise SdStudioError("no --model given and the embedded default model is not shipped yet")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SdStudioError(f"{args.json}: already exists; pass --overwrite to replace it")
    encoder = args.image_encoder or embedded_model_path(EMBEDDED_IMAGE_ENCODER)
    results = evaluate(model, image_encoder_path=encoder, extra_prompts=args.prompt or (), **(
        {"prompts_per_set": args.prompts} if args.prompts else {}))
    print(format_table(results))
    if args.json:
        from sdstudio.io.files import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdstudio", description="Stable Diffusion: generate, edit, train, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a text prompt (txt2img)")
    gen.add_argument("prompt", help="the prompt")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--model", help="checkpoint: .safetensors, .ckpt or a diffusers folder (default: embedded)")
    gen.add_argument("--sampler", default="Euler a", help="sampler name as AUTOMATIC1111 shows it (default: Euler a)")
    gen.add_argument("--scheduler", default="Automatic", help="schedule type: Automatic, Uniform, Karras, ...")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    gen.add_argument("--seed", type=int, default=-1, help="seed of the first image (-1: random)")
    gen.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (default: the model's size)")
    gen.add_argument("--height", type=int, help="height in pixels, a multiple of 8")
    gen.add_argument("--batch", type=int, default=1, help="images to make, with seeds seed..seed+N-1")
    gen.add_argument("--clip-skip", type=int, help="use the N-th text encoder layer from the end (1 = last)")
    gen.add_argument("--eta", type=float, help="noise multiplier for ancestral and DDIM samplers")
    gen.add_argument(
        "--precision",
        "--dtype",
        default="auto",
        help="compute precision: auto (fastest safe choice for this machine), fp32, bf16 or fp16",
    )
    gen.add_argument("--upscale", type=int, default=1, help="enlarge the saved image N times (plain Lanczos resampling)")
    gen.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    gen.add_argument("--prediction", choices=["epsilon", "v"], help="override the model's prediction type")
    gen.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings (name = file stem)")
    gen.add_argument("--skip-bad-embeddings", action="store_true", help="warn about unusable embedding files, don't fail")
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
    tw.add_argument("--stage", action="append", choices=["vae", "text", "latents", "unet"],
                    help="run only this stage (repeatable; earlier stages must be done)")
    tw.add_argument("--seed", type=int, default=0)
    tw.add_argument("--smoke", action="store_true", help="a few steps per stage, to check the set-up")
    tw.set_defaults(func=cmd_train_toyworld)

    ev = sub.add_parser("eval", help="measure models")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ew = ev_sub.add_parser("toyworld", help="prompt adherence, VAE PSNR and FID of a toy-world model")
    ew.add_argument("--model", help="checkpoint (default: the embedded model)")
    ew.add_argument("--image-encoder", help="toy image encoder for FID (default: the embedded one)")
    ew.add_argument("--prompts", type=int, help="prompts per set")
    ew.add_argument("--prompt", action="append", help="also generate for this prompt and report unknown words")
    ew.add_argument("--json", help="also write the table as JSON to this file")
    ew.add_argument("--overwrite", action="store_true")
    ew.set_defaults(func=cmd_eval_toyworld)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sdstudio: %(message)s")
    try:
        return args.func(args)
    except SdStudioError as e:
        print(f"sdstudio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdstudio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
