"""A ControlNet trained by the project on the toy world (issue 26): does the embedded model draw the object where
the control image puts it?

    python benchmarks/toy_controlnet.py --train                       # write the data, train, measure
    python benchmarks/toy_controlnet.py --controlnet RUN/controlnet.safetensors --n 200
    python benchmarks/toy_controlnet.py --train --kind edges --out runs/toy_cn_edges

``--train`` writes a training folder (``toyworld.control_data.write_control_dataset``: ``--train-images``
world scenes, a lone object within 6 px of its grid cell's centre, small or large, never purple or orange,
captions without size or position) and runs ``sdstudio train controlnet --data DATA --out RUN`` with its
defaults for the embedded model (the same parser and function as the command; ``--train-args`` adds
options), timed. Then ``--n`` held-out scenes (``heldout_scenes``: one object between the grid's cells, at
least 7 px from every cell centre along x or y, of a size between the world's two, purple or orange: nothing
the folder shows) are generated through the pipeline (``Pipeline.from_file(model)``, a ``GenerationRequest``
with one ``ControlSpec``: the scene's control image, preprocessor "none", weight 1, Balanced) from the
prompt "a COLOUR SHAPE" (no position, no size: the control image says those), and again without the
ControlNet, the baseline, with the same seeds.

The criterion (``control_data.placement``): the judge detects an object whose centroid lies inside the
control image's silhouette grown by 2 px and whose bounding box has IoU >= 0.5 with the silhouette's:
"placed". "As asked" also needs the prompt's colour and shape on that object. Printed as % of ``--n``, with
the mean IoU of the best such detection; ``--json`` writes them with the settings and the training time.

The script owns its process: it sets the thread policy of ``sdstudio generate`` (``sdstudio.threads``: as
many threads as cores not kept busy by other processes), which on a shared 2-core machine makes training
several times faster than two threads competing with another process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("toy_controlnet")


def train(data: Path, run: Path, extra: list[str], overwrite: bool) -> tuple[Path, float, list[str]]:
    """``sdstudio train controlnet --data DATA --out RUN EXTRA`` in this process; (file, seconds, argv)."""
    from sdstudio.cli_control import add_train_controlnet_parser

    parser = argparse.ArgumentParser(prog="sdstudio")
    train_sub = parser.add_subparsers(dest="command").add_parser("train").add_subparsers(dest="train_command")
    add_train_controlnet_parser(train_sub)
    argv = ["train", "controlnet", "--data", str(data), "--out", str(run), *extra]
    if overwrite:
        argv.append("--overwrite")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.func(args)
    return run / f"{args.name}.safetensors", time.perf_counter() - start, argv


def measure(model: Path, controlnet: Path | None, kind: str, n: int, seed: int, sampler: str, steps: int,
            cfg: float) -> dict:  # fmt: skip
    """Placement over ``n`` held-out scenes, with the ControlNet (None: without)."""
    import numpy as np
    from PIL import Image

    from sdstudio.engine import Pipeline
    from sdstudio.toyworld import control_data as cd
    from sdstudio.types import ControlSpec, GenerationRequest

    pipe = Pipeline.from_file(model)
    placed = asked = 0
    ious = []
    start = time.perf_counter()
    for i, scene in enumerate(cd.heldout_scenes(n, seed)):
        (obj,) = scene.objects
        controls = ()
        if controlnet is not None:
            hint = Image.fromarray(cd.control_image(scene, kind))  # type: ignore[arg-type]
            controls = (ControlSpec(model=str(controlnet), image=hint, preprocessor="none"),)
        request = GenerationRequest(
            prompt=f"a {obj.colour} {obj.shape}", sampler=sampler, steps=steps, cfg_scale=cfg, seed=seed + i,
            width=64, height=64, controls=controls,
        )  # fmt: skip
        image = np.asarray(pipe(request).images[0].image.convert("RGB"))
        p = cd.placement(image, scene)
        placed += p.placed
        asked += p.as_asked
        ious.append(p.iou)
    return {"placed": 100.0 * placed / n, "as_asked": 100.0 * asked / n, "mean_iou": float(np.mean(ious)),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlnet", type=Path, help="a trained ControlNet (else --train)")
    parser.add_argument("--train", action="store_true", help="write the training folder and train one first")
    parser.add_argument("--out", type=Path, default=Path("runs/toy_controlnet"), help="data/ and run/ go here")
    parser.add_argument("--kind", choices=("mask", "edges"), default="mask", help="control images (default mask)")
    parser.add_argument("--train-images", type=int, default=2000, help="training folder size (default 2000)")
    parser.add_argument("--train-args", default="", help="more `sdstudio train controlnet` options, one string")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --train run in --out")
    parser.add_argument("--model", type=Path, help="base model (default: the embedded one)")
    parser.add_argument("--n", type=int, default=100, help="held-out scenes (default 100)")
    parser.add_argument("--seed", type=int, default=1000, help="held-out scenes' and generation's seed")
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without the ControlNet")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    from sdstudio.threads import apply_thread_policy

    log.info("threads: %s", apply_thread_policy(None))
    from sdstudio.cli import embedded_model_path

    model = args.model or embedded_model_path()
    results: dict = {"kind": args.kind, "n": args.n, "seed": args.seed, "sampler": args.sampler,
                     "steps": args.steps, "cfg": args.cfg}  # fmt: skip
    controlnet = args.controlnet
    if args.train:
        from sdstudio.toyworld.control_data import write_control_dataset

        data = args.out / "data"
        if not (data / "metadata.jsonl").is_file() or args.overwrite:
            write_control_dataset(args.kind, args.train_images, data, overwrite=args.overwrite)
        controlnet, seconds, argv = train(data, args.out / "run", args.train_args.split(), args.overwrite)
        results["training"] = {"command": "sdstudio " + " ".join(argv), "seconds": round(seconds, 1),
                               "images": args.train_images}  # fmt: skip
        log.info("trained in %.0f s: %s", seconds, controlnet)
    if controlnet is None:
        parser.error("give --controlnet FILE or --train")
    results["controlnet"] = str(controlnet)
    results["with"] = measure(model, controlnet, args.kind, args.n, args.seed, args.sampler, args.steps, args.cfg)
    if not args.no_baseline:
        results["without"] = measure(model, None, args.kind, args.n, args.seed, args.sampler, args.steps, args.cfg)
    print(f"held-out scenes: {args.n} ({args.kind}; {args.sampler}, {args.steps} steps, CFG {args.cfg})")
    print(f"{'':>20} {'placed':>8} {'as asked':>9} {'mean IoU':>9}")
    for name in ("with", "without"):
        if name in results:
            r = results[name]
            print(f"{name + ' ControlNet':>20} {r['placed']:7.1f}% {r['as_asked']:8.1f}% {r['mean_iou']:9.3f}")
    if "training" in results:
        print(f"training: {results['training']['seconds']:.0f} s, {results['training']['command']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
