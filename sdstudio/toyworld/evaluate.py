"""Evaluate a toyworld model: prompt adherence read back by the judge, FID on the toy image encoder's
features, and the VAE's reconstruction PSNR.

Three prompt sets, built deterministically from a seed, each prompt paired with the ``Description`` the
judge checks (its caption parsed back, so the judge scores exactly what the prompt says):

- ``seen``: one object, colour-shape pairs seen in training (``split="train"``);
- ``heldout``: one object, a held-out colour-shape pair (``HELDOUT_PAIRS``: composition, not memory);
- ``two``: two objects whose caption states a relation ("a red circle left of a blue star").

Captions always state size and, for one object, the position, so every attribute is tested.
Images come from the real pipeline (``Pipeline``): one request per prompt, its ``images_per_prompt``
seeds as the batch. The same prompts and seeds serve every (sampler, CFG), so settings are compared on
paired samples.

Cost (``toyworld`` preset, 20 steps, measured on one core of a 2-core machine busy with training):
18 ms per image-step at CFG > 1 and 13 ms at CFG 1 at batch 2, judging ~1 ms an image. The default
run, 4 samplers x 3 CFGs x 3 sets x 16 prompts x 2 images = 1152 images, comes to ~7 minutes at
that rate (from the measured 9 s per set of 32 images at CFG 1, 12.5 s above); expect about half
on 2 free cores. Batching several prompts in one UNet call would save another ~1.6x (batch 32:
11 ms per image-step at CFG 7) but needs per-image prompts in ``txt2img``, which it does not offer;
copying its sampling loop here would make a second pipeline.

``evaluate_concept`` measures a fine-tuned concept (``concepts.py``: ring, pink, outlined) the same way:
its seen and unseen prompts, the base prompts under the same method (what it forgot), and the VAE's
round trips of the prompts' renders (what any method that keeps the VAE can reach). Its default, 72
images at Euler a, CFG 7, 20 steps, took 18 s on one thread (2-core machine, shipped model).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.eval.metrics import frechet_distance
from sdstudio.io.images import to_pil
from sdstudio.toyworld.concepts import SPLITS, Concept, concept_prompts, get_concept
from sdstudio.toyworld.judge import Score, score
from sdstudio.toyworld.recipe import IMAGE_ENCODER, load_image_encoder
from sdstudio.toyworld.world import (
    Description,
    Scene,
    Split,
    caption,
    parse_caption,
    render,
    sample_scene,
    unknown_words,
)
from sdstudio.training.contrastive import ImageEncoder
from sdstudio.types import GenerationRequest, NetworkSpec

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "toyworld.safetensors"
SHIPPED_IMAGE_ENCODER = ASSETS / "toyworld_image_encoder.safetensors"

# name -> (split, objects per scene); the order fixes each set's random stream.
PROMPT_SETS: dict[str, tuple[Split, int]] = {
    "seen": ("train", 1),
    "heldout": ("heldout", 1),
    "two": ("train", 2),
}
ATTRIBUTES = ("colour", "shape", "size", "position", "all")
TWO_OBJECT_ATTRIBUTES = ("relation", "both_right")

# Offsets into the seed's random streams: [seed, stream] keeps the sets independent of each other.
_FID_STREAM = 10
_PSNR_STREAM = 11
_EXTRA_STREAM = 12


@dataclass(frozen=True)
class EvalSettings:
    """What ``evaluate`` runs. ``fid_reference = 0`` or ``psnr_images = 0`` leaves that metric out."""

    cfgs: tuple[float, ...] = (1.0, 3.0, 7.0)
    samplers: tuple[str, ...] = ("Euler a", "Euler", "DPM++ 2M", "DDIM")
    steps: int = 20
    prompts_per_set: int = 16
    images_per_prompt: int = 2
    seed: int = 0
    sets: tuple[str, ...] = tuple(PROMPT_SETS)
    fid_reference: int = 512  # rendered images the generated ones are compared with
    psnr_images: int = 64  # held-out renders passed through the VAE
    ngms: float | None = None  # negative guidance minimum sigma; None: the model's default
    ngms_all_steps: bool | None = None  # None: the model's default

    def __post_init__(self) -> None:
        unknown = [s for s in self.sets if s not in PROMPT_SETS]
        if unknown:
            raise ValueError(f"unknown prompt set(s) {unknown}; sets are {tuple(PROMPT_SETS)}")
        if not self.cfgs or not self.samplers or not self.sets:
            raise ValueError("cfgs, samplers and sets must not be empty")
        if min(self.steps, self.prompts_per_set, self.images_per_prompt) < 1:
            raise ValueError("steps, prompts_per_set and images_per_prompt must be at least 1")

    @classmethod
    def quick(cls) -> EvalSettings:
        """Seconds, not minutes: checks the plumbing (tests, CI); too few images for real figures."""
        return cls(
            cfgs=(1.0, 7.0),
            samplers=("Euler a", "DDIM"),
            steps=4,
            prompts_per_set=2,
            images_per_prompt=2,
            fid_reference=32,
            psnr_images=8,
        )

    @property
    def main_cfg(self) -> float:
        """The CFG that FID and extra prompts use: 7 when evaluated, else the largest."""
        return 7.0 if 7.0 in self.cfgs else max(self.cfgs)

    @property
    def main_sampler(self) -> str:
        return self.samplers[0]

    @property
    def images(self) -> int:
        """Images generated for the prompt sets (extra prompts not counted)."""
        per_set = self.prompts_per_set * self.images_per_prompt
        return len(self.samplers) * len(self.cfgs) * len(self.sets) * per_set


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a set: its text, what the judge checks, the scene it was captioned from, and the
    first seed of its batch."""

    set: str
    text: str
    description: Description
    scene: Scene
    seed: int


# --------------------------------------------------------------------------------------------------
# Prompt sets and reference images.


def _prompt(rng: np.random.Generator, name: str) -> EvalPrompt:
    split, n_objects = PROMPT_SETS[name]
    scene = sample_scene(rng, split, n_objects)
    # Two objects: redraw the caption until it states the relation (3 of the 6 caption styles do).
    for _ in range(100):
        text = caption(scene, rng, p_size=1.0, p_position=1.0)
        description = parse_caption(text)
        if description is None:
            raise AssertionError(f"the world's own caption does not parse: {text!r}")
        if n_objects == 1 or description.relation is not None:
            return EvalPrompt(name, text, description, scene, int(rng.integers(0, 2**31)))
    raise AssertionError("no caption with a relation in 100 draws")


def prompt_sets(
    seed: int, prompts_per_set: int, sets: Sequence[str] = tuple(PROMPT_SETS)
) -> dict[str, tuple[EvalPrompt, ...]]:
    """The prompt sets: a pure function of its arguments (each set has its own random stream, so its
    prompts do not depend on which other sets are asked for)."""
    out = {}
    for name in sets:
        rng = np.random.default_rng([seed, list(PROMPT_SETS).index(name)])
        out[name] = tuple(_prompt(rng, name) for _ in range(prompts_per_set))
    return out


def reference_scenes(seed: int, n: int, sets: Sequence[str] = tuple(PROMPT_SETS)) -> list[Scene]:
    """``n`` scenes drawn like the scenes of ``sets``, in equal parts: the FID's reference."""
    rng = np.random.default_rng([seed, _FID_STREAM])
    kinds = [PROMPT_SETS[name] for name in sets]
    return [sample_scene(rng, *kinds[i % len(kinds)]) for i in range(n)]


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [64, 64, 3] images -> [B, 3, 64, 64] float32 in [-1, 1]."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------
# Metrics.


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two equally shaped images (all pixels and channels); inf
    when they are equal."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [n, d] (unbiased covariance)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [n >= 2, d] feature sets of equal d, got {a.shape} and {b.shape}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@torch.no_grad()
def image_features(encoder: ImageEncoder, images: Sequence[np.ndarray], batch: int = 256) -> np.ndarray:
    """Toy image encoder features [n, width] float64 of uint8 [64, 64, 3] images."""
    feats = [encoder(_to_tensor(images[i : i + batch])).double() for i in range(0, len(images), batch)]
    return torch.cat(feats).numpy()


@torch.no_grad()
def vae_round_trip(pipe: Pipeline, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 [64, 64, 3] images through the pipeline's VAE, ``decode(encode(x).mode())``, back to uint8
    as the pipeline writes them; in batches of 64."""
    vae = pipe.model.model.vae
    param = next(vae.parameters())
    out: list[np.ndarray] = []
    for i in range(0, len(images), 64):
        x = _to_tensor(images[i : i + 64]).to(device=param.device, dtype=param.dtype)
        out += [np.asarray(img) for img in to_pil(vae.decode(vae.encode(x).mode()).float())]
    return out


def vae_psnr(pipe: Pipeline, scenes: Sequence[Scene]) -> float:
    """Mean per-image PSNR (dB) of renders against their VAE round trip ``decode(encode(x).mode())``,
    both as uint8 images, as the pipeline writes them."""
    originals = [render(s) for s in scenes]
    return float(np.mean([psnr(o, r) for o, r in zip(originals, vae_round_trip(pipe, originals))]))


def adherence(scores: Sequence[Score], two_objects: bool) -> dict[str, float | None]:
    """Fractions of ``scores`` with each attribute right; ``relation`` and ``both_right`` are None for
    one-object prompts."""
    n = len(scores)
    row: dict[str, float | None] = {a: sum(getattr(s, a) for s in scores) / n for a in ATTRIBUTES}
    if two_objects:
        row["relation"] = sum(s.relation_ok for s in scores) / n
        # Every attribute of both objects and the relation; unlike "all", a stray extra blob is allowed.
        row["both_right"] = sum(all(o.all for o in s.per_object) and s.relation_ok for s in scores) / n
    else:
        row.update(dict.fromkeys(TWO_OBJECT_ATTRIBUTES))
    return row


# --------------------------------------------------------------------------------------------------
# Generation and the evaluation itself.


def _generate(
    pipe: Pipeline,
    prompt: str,
    sampler: str,
    cfg: float,
    steps: int,
    seed: int,
    n: int,
    ngms: float | None = None,
    ngms_all_steps: bool | None = None,
    *,
    networks: Sequence[NetworkSpec] = (),
) -> list[np.ndarray]:
    """``n`` images (uint8 [64, 64, 3]) of one prompt, seeds ``seed .. seed + n - 1``; ``ngms`` and
    ``ngms_all_steps`` None: the model's defaults; ``networks``: LoRAs / hypernetworks to apply."""
    request = GenerationRequest(
        prompt=prompt, negative_prompt="", sampler=sampler, steps=steps, cfg_scale=cfg, seed=seed,
        width=64, height=64, batch_size=n, ngms=ngms, ngms_all_steps=ngms_all_steps, networks=tuple(networks),
    )  # fmt: skip
    return [np.asarray(g.image.convert("RGB")) for g in pipe(request).images]


def find_image_encoder(model_path: str | os.PathLike) -> Path | None:
    """The image encoder that belongs to a model: beside it as the recipe writes it
    (``image_encoder.safetensors``) or as shipped (``<stem>_image_encoder.safetensors``)."""
    path = Path(model_path)
    for candidate in (path.parent / IMAGE_ENCODER, path.parent / f"{path.stem}_image_encoder.safetensors"):
        if candidate.is_file():
            return candidate
    return None


def _load_encoder(path: Path) -> ImageEncoder:
    with safe_open(str(path), framework="pt") as f:
        width = f.get_slice("proj.weight").get_shape()[0]  # proj: Linear(flat features -> width)
    return load_image_encoder(path, width=width)


def _extra_prompt_report(pipe: Pipeline, prompts: Sequence[str], s: EvalSettings) -> list[dict[str, object]]:
    """Each user prompt generated at the main setting; scored when ``parse_caption`` reads it."""
    rng = np.random.default_rng([s.seed, _EXTRA_STREAM])
    out: list[dict[str, object]] = []
    for text in prompts:
        seed = int(rng.integers(0, 2**31))
        images = _generate(pipe, text, s.main_sampler, s.main_cfg, s.steps, seed, s.images_per_prompt, s.ngms,
                           s.ngms_all_steps)  # fmt: skip
        description = parse_caption(text)
        unknown = unknown_words(text)
        entry: dict[str, object] = {"prompt": text, "unknown_words": unknown, "seed": seed, "n": len(images)}
        if description is None:
            why = "unknown words" if unknown else "not a sentence of the toyworld language"
            entry.update(scored=False, note=f"not scored: {why}")
        else:
            entry.update(
                scored=True,
                note="",
                **adherence([score(i, description) for i in images], len(description.objects) == 2),
            )
        out.append(entry)
    return out


def evaluate(
    model_path: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    cfgs: Sequence[float] | None = None,
    samplers: Sequence[str] | None = None,
    steps: int | None = None,
    prompts_per_set: int | None = None,
    images_per_prompt: int | None = None,
    seed: int | None = None,
    ngms: float | None = None,
    ngms_all_steps: bool | None = None,
    image_encoder_path: str | os.PathLike | None = None,
    extra_prompts: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate each prompt set's images with every (sampler, CFG), judge them, and measure FID and
    VAE PSNR. Keyword values override ``settings`` (default: ``EvalSettings()``; see
    ``EvalSettings.quick()``). ``progress(done, total)`` counts generated images.

    Returns a JSON-serialisable dict: ``rows`` (per sampler, CFG and set: fractions of images with
    each attribute right; ``relation`` and ``both_right`` for the two-object set, else None),
    ``fid`` (per sampler at ``main.cfg``, on the toy image encoder's features against renders;
    None without an image encoder), ``vae_psnr_db``, ``prompts`` and ``extra_prompts``.
    """
    s = settings or EvalSettings()
    overrides = {
        "cfgs": tuple(float(c) for c in cfgs) if cfgs is not None else None,
        "samplers": tuple(samplers) if samplers is not None else None,
        "steps": steps,
        "prompts_per_set": prompts_per_set,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "ngms": ngms,
        "ngms_all_steps": ngms_all_steps,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    pipe = Pipeline.from_file(model_path)
    sets = prompt_sets(s.seed, s.prompts_per_set, s.sets)
    total = s.images + len(extra_prompts) * s.images_per_prompt
    done = 0
    rows: list[dict[str, object]] = []
    main_images: dict[str, list[np.ndarray]] = {}
    for sampler in s.samplers:
        for cfg in s.cfgs:
            t_setting = time.perf_counter()
            for name, prompts in sets.items():
                scores: list[Score] = []
                for p in prompts:
                    images = _generate(
                        pipe, p.text, sampler, cfg, s.steps, p.seed, s.images_per_prompt, s.ngms,
                        s.ngms_all_steps,
                    )  # fmt: skip
                    scores += [score(img, p.description) for img in images]
                    if cfg == s.main_cfg:
                        main_images.setdefault(sampler, []).extend(images)
                    done += len(images)
                    if progress is not None:
                        progress(done, total)
                row = {"sampler": sampler, "cfg": cfg, "set": name, "n": len(scores)}
                rows.append(row | adherence(scores, PROMPT_SETS[name][1] == 2))
            log.info("%s, CFG %g: %.1f s", sampler, cfg, time.perf_counter() - t_setting)

    encoder_path = (
        Path(image_encoder_path) if image_encoder_path is not None else find_image_encoder(model_path)
    )
    fid: dict[str, float] | None = None
    if s.fid_reference > 0 and encoder_path is None:
        log.warning("no image encoder beside %s and none given: FID left out", model_path)
    elif s.fid_reference > 0:
        encoder = _load_encoder(encoder_path)
        reference = image_features(
            encoder, [render(sc) for sc in reference_scenes(s.seed, s.fid_reference, s.sets)]
        )
        fid = {
            name: fid_from_features(image_features(encoder, imgs), reference)
            for name, imgs in main_images.items()
        }

    psnr_db = None
    if s.psnr_images > 0:
        rng = np.random.default_rng([s.seed, _PSNR_STREAM])
        psnr_db = vae_psnr(pipe, [sample_scene(rng, "heldout", 1 + i % 2) for i in range(s.psnr_images)])

    extra = _extra_prompt_report(pipe, extra_prompts, s)
    sampling = pipe.model.config.sampling.overridden(s.ngms, s.ngms_all_steps)
    if progress is not None and extra:
        progress(total, total)
    return {
        "model": str(model_path),
        "image_encoder": str(encoder_path) if encoder_path is not None else None,
        "settings": asdict(s),
        "main": {"sampler": s.main_sampler, "cfg": s.main_cfg},
        "ngms": {"value": sampling.ngms, "all_steps": sampling.ngms_all_steps},
        "rows": rows,
        "fid": fid,
        "fid_images": {"generated": len(next(iter(main_images.values()), [])), "reference": s.fid_reference},
        "vae_psnr_db": psnr_db,
        "prompts": {name: [{"prompt": p.text, "seed": p.seed} for p in ps] for name, ps in sets.items()},
        "extra_prompts": extra,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------
# Concepts: what a fine-tuned model learned of a new concept, and what it forgot of the base world.

CONCEPT_ATTRIBUTES = ("concept", "rest", "all", "colour", "shape", "size", "position", "style")
_JUDGED = ("colour", "shape", "size", "position", "style")  # per-object attributes of ``ObjectScore``


@dataclass(frozen=True)
class ConceptEvalSettings:
    """What ``evaluate_concept`` runs: ``prompts_per_split`` prompts of each concept split and
    ``base_prompts_per_set`` of each base prompt set (the first of ``prompt_sets``; 0: no forgetting
    figures), ``images_per_prompt`` seeds each, at one sampler, CFG and step count (the base eval's main
    setting). ``ceiling``: also judge the VAE's round trips of the concept prompts' renders."""

    sampler: str = "Euler a"
    cfg: float = 7.0
    steps: int = 20
    prompts_per_split: int = 12
    images_per_prompt: int = 2
    base_prompts_per_set: int = 4
    seed: int = 0
    ngms: float | None = None  # None: the model's default
    ngms_all_steps: bool | None = None
    ceiling: bool = True

    def __post_init__(self) -> None:
        if min(self.steps, self.prompts_per_split, self.images_per_prompt) < 1:
            raise ValueError("steps, prompts_per_split and images_per_prompt must be at least 1")
        if self.base_prompts_per_set < 0:
            raise ValueError("base_prompts_per_set must not be negative")

    @classmethod
    def quick(cls) -> ConceptEvalSettings:
        """Seconds: checks the plumbing (tests); too few images for figures."""
        return cls(steps=4, prompts_per_split=2, images_per_prompt=1, base_prompts_per_set=1)

    @property
    def images(self) -> int:
        """Images generated: both concept splits and the base sets."""
        prompts = len(SPLITS) * self.prompts_per_split + len(PROMPT_SETS) * self.base_prompts_per_set
        return prompts * self.images_per_prompt


def concept_adherence(scores: Sequence[Score], concept: Concept) -> dict[str, float]:
    """Fractions of a concept split's images (one-object prompts): ``concept``, the judge finds the concept
    on the object paired with the described one; ``rest``, that object has every other stated attribute
    right and nothing else is in the image; ``all``, both; then each attribute of that object."""
    n = len(scores)
    row = {a: 0.0 for a in CONCEPT_ATTRIBUTES}
    for s in scores:
        (obj,) = s.per_object
        concept_ok = obj.found and getattr(obj, concept.kind)
        rest_ok = obj.found and s.count_ok and all(getattr(obj, a) for a in _JUDGED if a != concept.kind)
        row["concept"] += concept_ok
        row["rest"] += rest_ok
        row["all"] += concept_ok and rest_ok
        for a in _JUDGED:
            row[a] += obj.found and getattr(obj, a)
    return {a: v / n for a, v in row.items()}


def concept_leak(scores: Sequence[Score], concept: Concept) -> float:
    """Fraction of images in which the judge sees ``concept`` on any object: on base prompts, which never
    ask for it, how far a method spread it."""
    return sum(any(concept.shown_by(d) for d in s.detected) for s in scores) / len(scores)


def _concept_pipeline(
    model: str | os.PathLike | Pipeline,
    lora_dirs: Sequence[str | os.PathLike],
    hypernetwork_dirs: Sequence[str | os.PathLike],
    embeddings_dir: str | os.PathLike | None,
) -> tuple[Pipeline, str]:
    if not isinstance(model, Pipeline):
        pipe = Pipeline.from_file(
            model, lora_dirs=lora_dirs, hypernetwork_dirs=hypernetwork_dirs, embeddings_dir=embeddings_dir
        )
        return pipe, str(model)
    if lora_dirs or hypernetwork_dirs or embeddings_dir is not None:
        raise SdStudioError("network and embedding folders are for a model path; load them into the Pipeline")
    return model, str(model.model.path)


def evaluate_concept(
    model: str | os.PathLike | Pipeline,
    concept: str,
    settings: ConceptEvalSettings | None = None,
    *,
    networks: Sequence[NetworkSpec] = (),
    prompt_suffix: str = "",
    concept_word: str | None = None,
    lora_dirs: Sequence[str | os.PathLike] = (),
    hypernetwork_dirs: Sequence[str | os.PathLike] = (),
    embeddings_dir: str | os.PathLike | None = None,
    method: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Measure one fine-tuning method on ``concept`` (``concepts.CONCEPTS``): adherence on the concept
    prompts of both splits (``seen``: combinations of its dataset; ``unseen``: held-out colours, shapes
    and positions), and, on the base eval's own prompts at the same setting, the base figures (what it
    forgot) and how often the concept shows up unasked (``leak``). Run it once without any method for
    the baseline.

    ``model``: a checkpoint (a full fine-tune or DreamBooth result, or the base model) loaded with the
    network and embedding folders given, or a ready ``Pipeline``. ``networks`` go into every request
    (LoRAs, hypernetworks); ``prompt_suffix`` is added to every prompt (``" <lora:pink:1>"``);
    ``concept_word`` replaces the concept's word in its prompts (a textual inversion embedding's name,
    a DreamBooth token). ``method``: a label for the report.

    Returns a JSON-serialisable dict: ``concept_rows`` per split (``concept_adherence``), ``ceiling``
    (the same, judged on VAE round trips of the prompts' renders: the most a method that keeps this
    VAE can reach; None unless ``settings.ceiling``), ``base_rows`` per base set (``adherence``),
    ``leak``, ``prompts`` (as sent, with their seeds), ``seconds``.
    """
    s = settings or ConceptEvalSettings()
    c = get_concept(concept)
    t0 = time.perf_counter()
    pipe, model_name = _concept_pipeline(model, lora_dirs, hypernetwork_dirs, embeddings_dir)
    done = 0

    def run(text: str, seed: int) -> list[np.ndarray]:
        nonlocal done
        images = _generate(pipe, text + prompt_suffix, s.sampler, s.cfg, s.steps, seed, s.images_per_prompt,
                           s.ngms, s.ngms_all_steps, networks=networks)  # fmt: skip
        done += len(images)
        if progress is not None:
            progress(done, s.images)
        return images

    splits = {split: concept_prompts(c.name, split, s.prompts_per_split, s.seed) for split in SPLITS}
    texts = {
        split: [p.text_with(concept_word) if concept_word else p.text for p in ps]
        for split, ps in splits.items()
    }
    concept_rows, ceiling_rows = [], []
    for split, prompts in splits.items():
        scores = [score(img, p.description) for p, t in zip(prompts, texts[split]) for img in run(t, p.seed)]
        concept_rows.append({"split": split, "n": len(scores)} | concept_adherence(scores, c))
        if s.ceiling:
            trips = vae_round_trip(pipe, [render(p.scene) for p in prompts])
            judged = [score(img, p.description) for p, img in zip(prompts, trips)]
            ceiling_rows.append({"split": split, "n": len(judged)} | concept_adherence(judged, c))

    base_rows: list[dict[str, object]] = []
    base_scores: list[Score] = []
    if s.base_prompts_per_set > 0:
        for name, prompts in prompt_sets(s.seed, s.base_prompts_per_set).items():
            scores = [score(img, p.description) for p in prompts for img in run(p.text, p.seed)]
            base_scores += scores
            base_rows.append({"set": name, "n": len(scores)} | adherence(scores, PROMPT_SETS[name][1] == 2))
    seconds = time.perf_counter() - t0
    log.info("concept %s%s: %d images in %.1f s", c.name, f" ({method})" if method else "", done, seconds)
    return {
        "concept": c.name,
        "method": method,
        "model": model_name,
        "networks": [n.tag() for n in networks],
        "prompt_suffix": prompt_suffix,
        "concept_word": concept_word or c.word,
        "settings": asdict(s),
        "concept_rows": concept_rows,
        "ceiling": ceiling_rows if s.ceiling else None,
        "base_rows": base_rows,
        "leak": concept_leak(base_scores, c) if base_scores else None,
        "prompts": {
            split: [
                {"prompt": t + prompt_suffix, "seed": p.seed} for p, t in zip(splits[split], texts[split])
            ]
            for split in SPLITS
        },
        "images": done,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------------
# Printing.


def _pct(v: object) -> str:
    return "-" if v is None else f"{100 * float(v):5.1f}"  # type: ignore[arg-type]


def format_table(results: dict) -> str:
    """A readable table of ``evaluate``'s results: percentages of images with each attribute right."""
    columns = (*ATTRIBUTES, *TWO_OBJECT_ATTRIBUTES)
    head = f"{'sampler':<10} {'cfg':>4} {'set':<8} {'n':>4}  " + " ".join(f"{c:>10}" for c in columns)
    ngms = results.get("ngms") or {"value": 0}
    guidance = (
        f"NGMS {ngms['value']:g}: below sigma {ngms['value']:g} "
        f"{'every step' if ngms['all_steps'] else 'every other step'} uses the prompt alone, without CFG"
        if ngms["value"] else "NGMS off: CFG at every step"
    )  # fmt: skip
    lines = [f"model: {results['model']}", guidance, head, "-" * len(head)]
    for r in results["rows"]:
        cells = " ".join(f"{_pct(r[c]):>10}" for c in columns)
        lines.append(f"{r['sampler']:<10} {r['cfg']:>4g} {r['set']:<8} {r['n']:>4}  {cells}")
    main = results["main"]
    if results["fid"] is not None:
        sizes = results["fid_images"]
        lines.append("")
        lines.append(
            f"FID (toy image encoder, CFG {main['cfg']:g}, {sizes['generated']} generated vs "
            f"{sizes['reference']} rendered):"
        )
        lines += [f"  {name:<10} {value:8.2f}" for name, value in results["fid"].items()]
    if results["vae_psnr_db"] is not None:
        lines.append(f"VAE reconstruction PSNR on held-out renders: {results['vae_psnr_db']:.2f} dB")
    if results["extra_prompts"]:
        lines.append("")
        lines.append(f"Your prompts ({main['sampler']}, CFG {main['cfg']:g}):")
        for e in results["extra_prompts"]:
            unknown = f"  unknown words: {', '.join(e['unknown_words'])}" if e["unknown_words"] else ""
            verdict = f"all {_pct(e['all']).strip()} %" if e["scored"] else e["note"]
            lines.append(f"  {e['prompt']!r}: {verdict}{unknown}")
    lines.append(f"({results['seconds']:.0f} s)")
    return "\n".join(lines)


def format_concept_table(results: dict) -> str:
    """A readable table of ``evaluate_concept``'s results: percentages of images."""
    s = results["settings"]
    label = f" [{results['method']}]" if results["method"] else ""
    head = f"{'split':<8} {'n':>4}  " + " ".join(f"{c:>9}" for c in CONCEPT_ATTRIBUTES)
    lines = [
        f"concept {results['concept']!r}{label}, model {results['model']}, word {results['concept_word']!r}"
        + (f", networks {' '.join(results['networks'])}" if results["networks"] else ""),
        f"{s['sampler']}, CFG {s['cfg']:g}, {s['steps']} steps",
        head,
        "-" * len(head),
    ]
    for r in results["concept_rows"]:
        lines.append(
            f"{r['split']:<8} {r['n']:>4}  " + " ".join(f"{_pct(r[c]):>9}" for c in CONCEPT_ATTRIBUTES)
        )
    if results["ceiling"]:
        lines.append("VAE round trips of the prompts' renders (the ceiling with this VAE):")
        for r in results["ceiling"]:
            cells = " ".join(f"{_pct(r[c]):>9}" for c in CONCEPT_ATTRIBUTES)
            lines.append(f"{r['split']:<8} {r['n']:>4}  {cells}")
    if results["base_rows"]:
        lines.append("")
        lines.append("Base prompts (what it forgot):")
        lines.append(f"{'set':<8} {'n':>4}  " + " ".join(f"{c:>9}" for c in (*ATTRIBUTES, "relation")))
        for r in results["base_rows"]:
            cells = " ".join(f"{_pct(r[c]):>9}" for c in (*ATTRIBUTES, "relation"))
            lines.append(f"{r['set']:<8} {r['n']:>4}  {cells}")
        lines.append(f"concept seen unasked on base prompts: {_pct(results['leak']).strip()} %")
    lines.append(f"({results['images']} images, {results['seconds']:.0f} s)")
    return "\n".join(lines)
