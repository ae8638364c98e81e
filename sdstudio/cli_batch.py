"""``sdstudio batch``: arguments to :mod:`sdstudio.batch`; each finished line's files to stdout, progress and
warnings to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdstudio.errors import SdStudioError

__all__ = ["add_batch_commands", "cmd_batch"]

log = logging.getLogger("sdstudio")

LOCAL_RAY = "local"  # --ray without an address: a Ray started for the run


def _check_args(args: argparse.Namespace) -> None:
    """The command's own options, checked before the file is read or anything loads."""
    if args.workers is not None:
        if args.ray is None:
            raise SdStudioError("--workers needs --ray (without Ray, one process generates every line)")
        if args.workers < 1:
            raise SdStudioError(f"--workers must be at least 1 (got {args.workers})")
    if args.ray is not None and args.threads is not None:
        raise SdStudioError(
            "--threads is for runs without --ray; Ray CPU workers share out their node's CPUs"
        )
    if args.ray is not None and args.device != "auto":
        raise SdStudioError(
            "--device is for runs without --ray; Ray workers use a GPU each, or the CPU with --workers"
        )
    if args.threads is not None and args.threads < 1:
        raise SdStudioError(f"--threads must be at least 1 (got {args.threads})")
    if args.max_size < 8:
        raise SdStudioError(f"--max-size must be at least 8 (got {args.max_size})")
    if args.model is not None and not Path(args.model).exists():
        raise SdStudioError(f"{args.model}: no such file or folder (--model)")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise SdStudioError(f"{args.embeddings}: embeddings folder does not exist or is not a folder")
    for folder in args.lora_dir or ():
        if not Path(folder).is_dir():
            raise SdStudioError(f"{folder}: folder does not exist or is not a folder (--lora-dir)")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise SdStudioError(f"{outdir}: exists and is not a folder; pass another --outdir")


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.batch import (
        MANIFEST_NAME,
        LineFailure,
        ManifestEntry,
        PipelineSpec,
        RayOptions,
        import_ray,
        read_batch,
    )
    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import choose_device, choose_dtype
    from sdstudio.io.files import check_writable
    from sdstudio.server.a1111 import ServerLimits

    _check_args(args)
    if args.ray is not None:
        import_ray()  # not installed: say so before any work
        if args.ray == LOCAL_RAY and args.workers is None:
            import torch

            if not torch.cuda.is_available():
                raise SdStudioError(
                    "--ray: this machine has no CUDA GPU; pass --workers N to run N CPU workers"
                )
    else:
        choose_dtype(args.precision, choose_device(args.device))
    model = Path(args.model) if args.model else embedded_model_path()
    if model is None:
        raise SdStudioError(
            "no --model given and the embedded default model is not shipped: pass --model PATH"
        )
    # as `serve`: sizes a line leaves out are A1111's 512, or the embedded model's own 64
    limits = ServerLimits(max_size=args.max_size, default_size=None if args.model is None else 512)
    lines = read_batch(args.prompts, limits)
    outdir = Path(args.outdir)
    check_writable(outdir / MANIFEST_NAME, "manifest")
    spec = PipelineSpec(
        model=model.resolve(),
        lora_dirs=tuple(Path(d).resolve() for d in args.lora_dir or ()),
        embeddings_dir=Path(args.embeddings).resolve() if args.embeddings else None,
        device=args.device,
        precision=args.precision,
    )
    ray = None
    if args.ray is not None:
        ray = RayOptions(address=None if args.ray == LOCAL_RAY else args.ray, workers=args.workers)

    bar = tqdm(total=len(lines), disable=args.quiet, file=sys.stderr, desc="lines", unit="line")

    def progress(number: int, result: ManifestEntry | LineFailure) -> None:
        bar.update(1)
        if isinstance(result, LineFailure):
            log.error("line %d failed: %s", number, result.message)
            return
        for warning in result.warnings:
            log.warning("line %d: %s", number, warning)
        for name in result.files:
            print(outdir / name, flush=True)

    from sdstudio.batch import run_batch

    with bar:
        report = run_batch(lines, outdir, spec, ray=ray, on_line=progress)
        bar.update(len(report.skipped))
    if report.skipped:
        log.warning(
            "%d of %d lines were already finished in %s (skipped)", len(report.skipped), len(lines), outdir
        )
    if report.failed:
        numbers = ", ".join(str(n) for n, _ in report.failed)
        log.error("%d of %d lines failed (%s); run the command again to retry them", len(report.failed),
                  len(lines), numbers)  # fmt: skip
        return 1
    return 0


def add_batch_commands(top_sub: argparse._SubParsersAction) -> None:
    """Add the ``batch`` command to the top-level subcommands."""
    bt = top_sub.add_parser(
        "batch", help="generate a file of requests (JSON lines) into a folder; a rerun resumes",
        description="Generate every request of PROMPTS.jsonl: one JSON object per line with the fields of "
        "AUTOMATIC1111's /sdapi/v1/txt2img payload (prompt, negative_prompt, seed, steps, cfg_scale, "
        "sampler_name, width, height, batch_size, n_iter, enable_hr, ...); blank lines and lines starting "
        "with # are skipped. Any bad line refuses the whole file before work. Line N's images go to "
        "DIR/NNNNN-KK.png (with infotext) and an entry to DIR/manifest.jsonl; a rerun skips the lines "
        "finished unchanged and generates the rest, and lines that changed, again.",
    )  # fmt: skip
    bt.add_argument("prompts", metavar="PROMPTS.jsonl", help="the requests, one JSON object per line")
    bt.add_argument("--outdir", required=True, metavar="DIR", help="where images and manifest.jsonl go")
    bt.add_argument("--model", help="checkpoint (default: the embedded toy model)")
    bt.add_argument("--lora-dir", action="append", metavar="DIR", help="folder of LoRAs (repeatable)")
    bt.add_argument("--embeddings", metavar="DIR", help="folder of textual inversion embeddings")
    bt.add_argument("--device", default="auto", help="without --ray: auto (default), cpu, cuda or cuda:N")
    bt.add_argument("--precision", default="auto", help="auto (default), fp32, bf16 or fp16")
    bt.add_argument(
        "--max-size", type=int, default=2048, metavar="PX", help="largest width or height (default 2048)"
    )
    bt.add_argument(
        "--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
        help="spread the lines over Ray actors that load the model once each: alone, a local Ray started for "
        "the run; 'auto' or HOST:PORT, a running cluster (sdstudio and the model's path must exist on its "
        "nodes). Put it after PROMPTS.jsonl. Needs: pip install 'sdstudio[ray]'",
    )  # fmt: skip
    bt.add_argument(
        "--workers", type=int, metavar="N", help="with --ray: N CPU actors (default: one per GPU)"
    )
    bt.add_argument("--threads", type=int, metavar="N", help="without --ray: CPU threads (default: the cores "
                    "other processes leave free); Ray CPU workers share out their node's CPUs")  # fmt: skip
    bt.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bt.set_defaults(func=cmd_batch)
