"""Short UNet-stage experiments on the toyworld: train only the UNet stage, from a finished run's VAE, text
encoder and encoded latents, with some recipe fields changed; then evaluate. Compares variants of the
UNet stage at a fraction of the whole recipe's time (a 1800-step run takes ~10 minutes on the 2-core CPU).

    python benchmarks/toyworld_unet_ab.py --base runs/toyworld --out runs/ab-snr5 --steps 1800 --set snr_gamma=5
    python benchmarks/toyworld_unet_ab.py --base runs/toyworld --out runs/ab-skip2 --steps 1800 --clip-skip 2

``--set FIELD=VALUE`` takes any ``ToyRecipe`` field (Python literal values), ``--set unet.FIELD=VALUE`` a
field of the UNet stage's ``TrainConfig`` (``--set unet.lr=1e-3``), ``--set config.unet.FIELD=VALUE`` a field
of the UNet's architecture (``--set "config.unet.attention_resolutions=(4, 2)"``). The run's UNet starts from the
recipe's seeded init, as in a whole run. The evaluation is ``benchmarks/toyworld_eval.py`` with Euler and
DPM++ 2M at CFG 7, 32 prompts per set, 2 images each; its JSON goes to ``OUT/eval.json``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import toyworld_eval
from sdstudio.models.configs import UNetConfig
from sdstudio.models.loading import load_model, save_model
from sdstudio.models.stablediffusion import random_model
from sdstudio.toyworld import recipe as R
from sdstudio.training.trainer import TrainConfig

RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(R.ToyRecipe))
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
UNET_FIELDS = frozenset(f.name for f in dataclasses.fields(UNetConfig))


def base_recipe(run: Path) -> R.ToyRecipe:
    """The recipe of a finished run, from its ``recipe.json`` (the model config stays the preset's: the
    run's own config, scale factor included, travels in its checkpoint's header)."""
    saved = json.loads((run / R.RECIPE).read_text())
    # Fields newer than the run take the values that reproduce what it did.
    kept = {
        "snr_gamma": 0.0, "text_bf16": False, "unet_p_two_objects": None, "small_object_weight": 1.0,
        "text_hard_negatives": 0.0,
    }  # fmt: skip
    kept.update({k: v for k, v in saved.items() if k in RECIPE_FIELDS - {"config"}})
    for stage in ("vae", "text", "unet"):
        kept[stage] = TrainConfig(**{**saved[stage], "betas": tuple(saved[stage]["betas"])})
    return R.ToyRecipe(**kept)


def prepare(base: Path, out: Path, recipe: R.ToyRecipe) -> None:
    """``out`` as a run whose VAE, text and latents stages are ``base``'s, ready for the UNet stage."""
    done = json.loads((base / "stages.json").read_text())
    if not {"vae", "text", "latents"} <= set(done):
        raise SystemExit(f"{base}: its VAE, text and latents stages are not all finished ({done})")
    if out.exists():
        raise SystemExit(f"{out}: exists; choose a new --out folder")
    out.mkdir(parents=True)
    for name in (R.IMAGE_ENCODER, R.LATENTS, "vae_check.json"):
        shutil.copy(base / name, out / name)
    model = load_model(base / R.WORK_MODEL).model
    fresh = random_model(recipe.config, seed=recipe.seed).model.diffusion_model
    model.model.diffusion_model = fresh
    model.config = dataclasses.replace(model.config, text=recipe.config.text, unet=recipe.config.unet)
    save_model(model, out / R.WORK_MODEL, dtype=None, overwrite=True)
    (out / "stages.json").write_text(json.dumps(["vae", "text", "latents"]))
    (out / R.RECIPE).write_text(recipe.to_json())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a run folder with finished vae, text and latents stages")
    parser.add_argument("--out", required=True, help="a new folder for this run")
    parser.add_argument("--steps", type=int, default=1800, help="UNet steps (default 1800)")
    parser.add_argument("--ema-start", type=int, default=None, help="default: 0.45 x steps")
    parser.add_argument("--clip-skip", type=int, default=None, help="the text layer the UNet reads (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a ToyRecipe field, unet.<TrainConfig field> or config.unet.<UNetConfig field>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    base = base_recipe(Path(args.base))
    overrides, unet_overrides, arch_overrides = {}, {}, {}
    for item in args.set:
        key, _, value = item.partition("=")
        train_key, arch_key = key.removeprefix("unet."), key.removeprefix("config.unet.")
        if train_key != key and train_key in TRAIN_FIELDS - {"steps", "ema_start"}:
            unet_overrides[train_key] = ast.literal_eval(value)
        elif arch_key != key and arch_key in UNET_FIELDS:
            arch_overrides[arch_key] = ast.literal_eval(value)
        elif key in RECIPE_FIELDS - {"unet", "config"}:
            overrides[key] = ast.literal_eval(value)
        else:
            raise SystemExit(f"--set {item}: {key!r} is neither a ToyRecipe field, unet.<TrainConfig field> "
                             "(steps and ema_start have their own options) nor config.unet.<UNetConfig field>")
    config = dataclasses.replace(base.config, unet=dataclasses.replace(base.config.unet, **arch_overrides))
    if args.clip_skip is not None:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, default_clip_skip=args.clip_skip))
    ema_start = args.ema_start if args.ema_start is not None else int(0.45 * args.steps)
    unet = dataclasses.replace(base.unet, steps=args.steps, ema_start=ema_start, **unet_overrides)
    recipe = dataclasses.replace(base, config=config, unet=unet, **overrides)
    out = Path(args.out)
    prepare(Path(args.base), out, recipe)
    final = R.run_recipe(out, recipe, stages=("unet",))

    toyworld_eval.main([str(final), "--image-encoder", str(out / R.IMAGE_ENCODER), "--sampler", "Euler",
                        "--sampler", "DPM++ 2M", "--cfg", "7", "--prompts-per-set", "32", "--out", str(out / "eval.json")])


if __name__ == "__main__":
    main()
