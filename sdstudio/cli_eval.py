"""``sdstudio eval images``: FID, KID, precision/recall and CLIP score of a folder of generated images
against a folder of real ones. ``add_eval_commands`` adds it to ``sdstudio eval``'s subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

METRICS = ("fid", "kid", "precision-recall", "clip-score")
DEFAULT_METRICS = ("fid", "kid", "precision-recall")
KID_SUBSET_SIZE = 1000  # KID paper's and torch-fidelity's


@dataclass(frozen=True)
class ImageEvalRequest:
    """What ``evaluate_images`` measures. ``features``: ``toyworld``, ``inception`` or ``clip``, with
    ``features_file`` (``toyworld``: default the shipped encoder). ``clip_file``: the CLIP model for the CLIP
    score (default: ``features_file`` when ``features == "clip"``). ``kid_subset_size`` None: 1000, or the
    smaller folder's count when it has fewer images (with a warning)."""

    real: str
    fake: str
    metrics: tuple[str, ...] = DEFAULT_METRICS
    features: str = "toyworld"
    features_file: str | None = None
    clip_file: str | None = None
    prompts_file: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int | None = None
    pr_k: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise SdStudioError(f"--metrics {','.join(self.metrics)!r}: choose from {','.join(METRICS)}")


@dataclass(frozen=True)
class ImageEvalResult:
    """The figures (None: not asked for) and what they were measured on."""

    real: str
    fake: str
    n_real: int
    n_fake: int
    skipped: tuple[str, ...]
    features: str
    features_file: str
    feature_dim: int
    resize: str | None
    fid: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_subsets: int | None = None
    kid_subset_size: int | None = None
    precision: float | None = None
    recall: float | None = None
    pr_k: int | None = None
    clip_score: float | None = None
    clip_file: str | None = None

    def summary(self) -> str:
        """``FID 12.34  KID 0.0012 ± 0.0003  precision 0.81 recall 0.77  CLIP score 31.20``"""
        parts = []
        if self.fid is not None:
            parts.append(f"FID {self.fid:.2f}")
        if self.kid_mean is not None:
            std = self.kid_std if self.kid_std > 1e-12 * max(1.0, abs(self.kid_mean)) else 0.0  # rounding
            parts.append(f"KID {self.kid_mean:.4g} ± {std:.2g}")
        if self.precision is not None:
            parts.append(f"precision {self.precision:.2f} recall {self.recall:.2f}")
        if self.clip_score is not None:
            parts.append(f"CLIP score {self.clip_score:.2f}")
        return "  ".join(parts)


def fake_prompts(paths: tuple[Path, ...], all_files: list[Path], prompts_file: str | None) -> list[str]:
    """The prompt of each readable fake image: line ``i`` of ``prompts_file`` for the ``i``-th image file in
    sorted order (unreadable ones included), else the ``.txt`` beside each image."""
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise SdStudioError(f"{prompts_file}: no such prompts file (--prompts)") from None
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(all_files):
            raise SdStudioError(f"{prompts_file}: {len(lines)} prompt lines for {len(all_files)} fake images; "
                                "give one line per image file, in sorted file-name order")  # fmt: skip
        by_file = dict(zip(all_files, lines))
        return [by_file[p] for p in paths]
    missing = [p.with_suffix(".txt") for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise SdStudioError(
            f"clip-score needs the prompt of every fake image: {len(missing)} of {len(paths)} have no .txt "
            f"beside them (e.g. {missing[0]}); add them or give --prompts FILE (one line per image, sorted)"
        )
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]


def evaluate_images(req: ImageEvalRequest) -> ImageEvalResult:
    """Read both folders, extract features, compute the asked metrics."""
    import torch

    from sdstudio.eval import features as ft
    from sdstudio.eval import metrics as mt

    clip_file = req.clip_file or (req.features_file if req.features == "clip" else None)
    if "clip-score" in req.metrics and clip_file is None:
        raise SdStudioError("clip-score needs a CLIP model: --clip FILE (or --features clip FILE)")
    real, fake = ft.read_folder(req.real), ft.read_folder(req.fake)
    prompts = None
    if "clip-score" in req.metrics:
        prompts = fake_prompts(fake.paths, ft.image_files(req.fake), req.prompts_file)

    clip_model = ft.load_clip_model(clip_file) if clip_file is not None else None
    dist_metrics = [m for m in req.metrics if m != "clip-score"]
    fr = ff = None
    note = None
    kind, features_file = req.features, req.features_file
    if dist_metrics:
        if kind == "clip" and clip_model is not None and clip_file == features_file:
            extractor = ft.clip_extractor(clip_file, clip_model)  # one model for both
        else:
            extractor = ft.load_extractor(kind, features_file)
        kind, features_file = extractor.kind, extractor.file
        note = ft.resize_note(extractor, (real, fake))
        if note is not None:
            (log.warning if len(real.sizes | fake.sizes) > 1 else log.info)("%s", note)
        fr, ff = ft.extract(extractor, real), ft.extract(extractor, fake)
    out: dict[str, object] = {}
    try:
        if "fid" in req.metrics:
            out["fid"] = mt.fid(fr, ff)
        if "kid" in req.metrics:
            n_min = min(len(real.images), len(fake.images))
            size = req.kid_subset_size
            if size is None:
                size = min(KID_SUBSET_SIZE, n_min)
                if size < KID_SUBSET_SIZE:
                    log.warning(
                        "KID: subsets of %d images (the smaller folder's count), not the usual %d: comparable "
                        "only to KIDs with the same subset size%s", size, KID_SUBSET_SIZE,
                        "; every subset is the whole folder, so the std is 0 (a smaller --kid-subset-size "
                        "gives a spread)" if size == max(len(real.images), len(fake.images)) else "",
                    )  # fmt: skip
            elif size > n_min:
                raise SdStudioError(f"--kid-subset-size {size}: needs at least {size} images in each folder, "
                                    f"got {len(real.images)} real and {len(fake.images)} fake")  # fmt: skip
            out["kid_mean"], out["kid_std"] = mt.kid(fr, ff, req.kid_subsets, size, req.seed)
            out["kid_subsets"], out["kid_subset_size"] = req.kid_subsets, size
        if "precision-recall" in req.metrics:
            pr = mt.precision_recall(fr, ff, k=req.pr_k)
            out["precision"], out["recall"], out["pr_k"] = pr.precision, pr.recall, pr.k
        if "clip-score" in req.metrics:
            assert prompts is not None and clip_model is not None
            with torch.no_grad():
                image_embeds = ft.clip_extractor(clip_file or "", clip_model).encode(fake.images)
                text_embeds = torch.cat([clip_model.encode_texts(prompts[i : i + 64])  # type: ignore[attr-defined]
                                         for i in range(0, len(prompts), 64)])  # fmt: skip
            out["clip_score"], out["clip_file"] = mt.clip_score(image_embeds, text_embeds), clip_file
    except ValueError as e:
        raise SdStudioError(str(e)) from None

    dim = fr.shape[1] if fr is not None else 0
    return ImageEvalResult(
        real=str(real.folder), fake=str(fake.folder), n_real=len(real.images), n_fake=len(fake.images),
        skipped=tuple(str(p) for p in real.skipped + fake.skipped), features=kind if dist_metrics else "",
        features_file=features_file or "", feature_dim=dim, resize=note, **out,  # type: ignore[arg-type]
    )  # fmt: skip


def _parse_features(values: list[str] | None) -> tuple[str, str | None]:
    if not values:
        return "toyworld", None
    if len(values) > 2 or values[0] not in ("toyworld", "inception", "clip"):
        raise SdStudioError(
            f"--features {' '.join(values)}: expected inception FILE, clip FILE or toyworld [FILE]"
        )
    return values[0], values[1] if len(values) == 2 else None


def cmd_eval_images(args: argparse.Namespace) -> int:
    from sdstudio.io.files import check_writable, write_text_atomic

    if args.json:
        if Path(args.json).exists() and not args.overwrite:
            raise SdStudioError(f"{args.json}: already exists; pass --overwrite to replace it")
        check_writable(args.json, "JSON report")
    kind, file = _parse_features(args.features)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    req = ImageEvalRequest(
        real=args.real, fake=args.fake, metrics=metrics, features=kind, features_file=file, clip_file=args.clip,
        prompts_file=args.prompts, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k, seed=args.seed,
    )  # fmt: skip
    result = evaluate_images(req)
    print(result.summary())
    if args.json:
        data = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(result).items()
        }
        write_text_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def add_eval_commands(ev_sub: argparse._SubParsersAction) -> None:
    """Add ``images`` to the subcommands of ``sdstudio eval``."""
    p = ev_sub.add_parser(
        "images", help="FID, KID, precision/recall and CLIP score of generated images vs real ones"
    )
    p.add_argument("--real", required=True, metavar="DIR", help="reference images (png, jpg, webp)")
    p.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, of {','.join(METRICS)} (default {','.join(DEFAULT_METRICS)})")  # fmt: skip
    p.add_argument("--features", nargs="+", metavar=("KIND", "FILE"),
                   help="inception FILE (pt_inception-2015-12-05-6726825d.pth), clip FILE, or toyworld [FILE] "
                   "(default: the shipped toy image encoder)")  # fmt: skip
    p.add_argument(
        "--clip", metavar="FILE", help="CLIP model for clip-score (default: the --features clip one)"
    )
    p.add_argument("--prompts", metavar="FILE", help="clip-score: one prompt per line per fake image, in sorted "
                   "file-name order (default: the .txt beside each image)")  # fmt: skip
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to this file")
    p.add_argument("--kid-subset-size", type=_positive, metavar="N",
                   help=f"images per KID subset (default {KID_SUBSET_SIZE}, or the smaller folder's count)")  # fmt: skip
    p.add_argument(
        "--kid-subsets", type=_positive, default=100, metavar="N", help="KID subsets (default 100)"
    )
    p.add_argument("--pr-k", type=_positive, default=3, metavar="K",
                   help="precision/recall: k-th nearest neighbour radius (default 3)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="KID subset draws")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_eval_images)
