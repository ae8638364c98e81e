"""DreamBooth and full fine-tuning: the UNet (and optionally the text encoder) trained on a folder of
captioned images, written as one single-file checkpoint.

DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") with prior preservation as diffusers' ``train_dreambooth.py`` does it: class images are
generated once by this model from a class prompt into a folder (``--num_class_images``; images already
there are counted and reused, so a second run generates none), every step trains on an instance batch and
an equally large class batch, and the loss is ``mean(instance MSE) + prior_loss_weight * mean(class MSE)``.

Full fine-tuning (kohya ``fine_tune.py``): the same loop without class images, usually with an EMA of the
UNet's weights, written as LDM's ``model_ema.*`` keys (``LitEma``: ``model.a.b`` -> ``model_ema.ab``, plus
``model_ema.decay`` and ``model_ema.num_updates``) so that ``load_model(..., use_ema=True)`` and
AUTOMATIC1111 read them.

Both share: the denoiser's own loss (``Denoiser.loss``: eps or v target, Min-SNR-gamma), noise offset
(Guttenberg 2023, "Diffusion with Offset Noise": ``noise + offset * N(0, 1)`` per sample and channel, as
diffusers' ``--noise_offset``), gradient accumulation, the learning-rate schedules and the optimizers of
``trainer.train`` (AdamW, or bitsandbytes' 8-bit AdamW), a text encoder learning rate of its own, and
gradient checkpointing (:class:`CheckpointedUNet`: each UNet block's activations are recomputed in the
backward pass instead of kept; Chen et al. 2016).

The model is trained in place: after ``train_dreambooth`` / ``train_finetune`` the ``LoadedModel`` holds the
trained (not the EMA) weights, frozen again.

Under torchrun both train data-parallel (``sdstudio.training.distributed``): ``run.batch_size`` instance
(and as many class) images per process; rank 0 makes the class images (the others wait, then read them: the
class folder must be one every rank sees) and writes the checkpoint; every rank returns its path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, write_text_atomic
from sdstudio.models.configs import Prediction
from sdstudio.models.loading import DTYPES, LoadedModel, save_model
from sdstudio.models.stablediffusion import EMA_PREFIX, UNET_PREFIX, ema_key
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.models.unet import UNetModel, timestep_embedding
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.prompt.embeddings import EmbeddingDatabase
from sdstudio.training.datasets import scan_dataset
from sdstudio.training.distributed import Shard, shard_from_env
from sdstudio.training.embedding import EmbeddingTrainConfig, TrainableEmbedding, save_embedding
from sdstudio.training.finetune import (
    LoopOptions,
    RunConfig,
    TrainingData,
    check_names_embedding,
    check_patterns,
    dataset_config_for,
    holds_word,
    jsonable,
    prepare_run_folder,
    run_settings,
)
from sdstudio.training.preview import PreviewSettings, render_preview
from sdstudio.training.trainer import EMA, EmaWarmup, TrainConfig, bf16_native, train

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_MANIFEST", "EMBEDDINGS_FOLDER", "PRIOR_TARGETS", "CheckpointedUNet", "ClassImages", "DreamBoothConfig",
    "FinetuneConfig", "PriorPreservation", "bf16_native", "check_class_folder", "class_captions", "class_folder",
    "ema_tensors", "open_class_data", "prepare_class_images",
    "prior_preservation_loss", "train_dreambooth", "train_finetune",
]  # fmt: skip

CLASS_MANIFEST = "class_images.jsonl"  # one line per generated class image: file, prompt, seed, settings
CLASS_FOLDER = "class_images"  # the default class data folder inside the run folder
EMBEDDINGS_FOLDER = "embeddings"  # a pivotal run's trained word, for --embeddings
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Progress = Callable[[int, float], None]
# (model, prior, first seed, count) -> [(image, seed)]: how class images are made
ClassImageMaker = Callable[[LoadedModel, "PriorPreservation", int, int], list[tuple[Image.Image, int]]]


PRIOR_TARGETS = ("noise", "base")


@dataclass(frozen=True)
class PriorPreservation:
    """diffusers' ``--with_prior_preservation``: class images of ``class_prompt`` (made by the model being
    trained, ``num_class_images`` of them, in ``class_data`` or the run folder's ``class_images/``) trained
    beside the instance images with ``prior_loss_weight``. A class image's caption is its same-stem ``.txt``
    if it has one (kohya's captioned regularisation images; generated ones get the class prompt), else the
    class prompt. Without a class prompt, ``class_data`` must already hold ``num_class_images`` captioned
    images (kohya's ``--reg_data_dir``). Generation: ``sampler``, ``steps``, ``cfg_scale`` and seeds
    ``seed``, ``seed + 1``, ... at the model's size, ``batch`` images per call."""

    class_prompt: str
    class_data: str | None = None
    num_class_images: int = 100  # diffusers' default
    prior_loss_weight: float = 1.0
    # what the class images' loss compares with: "noise", DreamBooth's (the noise, or v, as for the instance
    # images), or "base", the base model's own prediction at the same noised latents (a distillation: zero
    # until the network moves, and without the noise target's variance, so it holds the base closer)
    target: str = "noise"
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    batch: int = 4

    def __post_init__(self) -> None:
        if not self.class_prompt.strip() and not self.class_data:
            raise SdStudioError(
                "prior preservation needs a class prompt (--class-prompt, 'a photo of a dog') or a folder "
                "of captioned class images (--class-data)"
            )
        if self.num_class_images < 1 or self.steps < 1 or self.batch < 1:
            raise SdStudioError(
                f"class images {self.num_class_images}, steps {self.steps}, batch {self.batch}: each must be >= 1"
            )
        if self.prior_loss_weight < 0:
            raise SdStudioError(
                f"prior loss weight {self.prior_loss_weight}: must not be negative (1.0 is usual)"
            )
        if self.target not in PRIOR_TARGETS:
            raise SdStudioError(
                f"prior target {self.target!r}: expected one of {', '.join(PRIOR_TARGETS)} (--prior-target)"
            )


@dataclass(frozen=True)
class _ModelTraining(LoopOptions):
    """What DreamBooth and full fine-tuning share: the loop options, the text encoder (``text_lr`` None: the
    run's learning rate), gradient checkpointing, the target (``prediction`` None: the model's own; ``"v"`` on
    an eps model teaches it v-prediction, and the checkpoint says so) and the EMA of the UNet.

    ``pivotal``: a caption word's vectors (textual inversion, started from its ``init_text``) trained with the
    UNet at ``pivotal_lr``, as the LoRA's pivotal tuning does (``lora.LoraRunOptions``), and written as
    ``embeddings/WORD.safetensors`` beside the checkpoint: a word the text encoder never learnt then stands
    for the concept in new combinations, while the rest of the text encoder stays as it was."""

    train_text_encoder: bool = False
    text_lr: float | None = None
    pivotal: EmbeddingTrainConfig | None = None
    pivotal_lr: float = 5e-3
    gradient_checkpointing: bool = False
    prediction: Prediction | None = None
    ema_decay: float = 0.0  # 0: no EMA
    ema_warmup: EmaWarmup = "ldm"
    # regular expressions searched in the UNet's checkpoint keys (model.diffusion_model.input_blocks.1.1.
    # transformer_blocks.0.attn2.to_k.weight): only the weights one of them finds train, as OneTrainer's
    # layer filter ("transformer_blocks": attention and feed-forward, no convolution); empty: the whole UNet
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_patterns("--modules", self.modules)
        if self.text_lr is not None and not 0 < self.text_lr < 10:
            raise SdStudioError(
                f"text encoder learning rate {self.text_lr}: must be a positive number below 10"
            )
        if self.prediction not in (None, "epsilon", "v"):
            raise SdStudioError(f"prediction {self.prediction!r}: choose epsilon or v")
        if not 0 < self.pivotal_lr < 10:
            raise SdStudioError(f"pivotal learning rate {self.pivotal_lr}: must be a positive number below 10")
        super().__post_init__()  # the name, the shared options and the loop's own checks

    def train_config(self, run: RunConfig, bf16: bool | None = None, lr: float | None = None) -> TrainConfig:
        return dataclasses.replace(
            super().train_config(run, bf16, lr), ema_decay=self.ema_decay, ema_warmup=self.ema_warmup
        )


@dataclass(frozen=True)
class DreamBoothConfig(_ModelTraining):
    """``instance_prompt`` (non-empty): the caption of every instance image ("a photo of sks dog"), as
    diffusers' ``--instance_prompt``; empty: the dataset's captions (kohya ``N_name`` folders, .txt files).
    ``prior``: prior preservation, or None (plain fine-tuning on the instance images)."""

    name: str = "dreambooth"
    instance_prompt: str = ""
    prior: PriorPreservation | None = None


@dataclass(frozen=True)
class FinetuneConfig(_ModelTraining):
    """Full fine-tuning on captioned images, with an EMA of the UNet (0.9999 with LitEma's warm-up
    ``min(decay, (1 + n) / (10 + n))`` by default, so short runs still average only their last steps)."""

    name: str = "finetune"
    ema_decay: float = 0.9999


# ------------------------------------------------------------------------------------------------ pieces


class CheckpointedUNet(nn.Module):
    """``UNetModel.forward`` with every input, middle and output block (and the final norm-conv) under
    ``torch.utils.checkpoint``: only block inputs are kept for the backward pass, each block's inner
    activations are recomputed there (about one more forward pass of compute). Same outputs and gradients
    as the UNet itself; it wraps the UNet without changing it, so checkpoint keys and the UNet used for
    sampling are untouched."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, **options: object) -> Tensor:
        if options:  # token merging and hypernetworks are inference features
            raise SdStudioError(f"gradient checkpointing does not take {', '.join(options)}")
        unet = self.unet
        dtype = unet.dtype
        emb = unet.time_embed(timestep_embedding(timesteps, unet.config.model_channels).to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        skips: list[Tensor] = []
        for block in unet.input_blocks:
            h = checkpoint(block, h, emb, context, use_reentrant=False)
            skips.append(h)
        h = checkpoint(unet.middle_block, h, emb, context, use_reentrant=False)
        for block in unet.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [batch, ch + skip_ch, h, w]
            up_size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None
            h = checkpoint(block, h, emb, context, up_size, use_reentrant=False)
        return checkpoint(unet.out, h, use_reentrant=False)


def prior_preservation_loss(instance: Tensor, prior: Tensor, weight: float) -> Tensor:
    """diffusers' DreamBooth loss: ``instance.mean() + weight * prior.mean()`` of per-sample losses."""
    return instance.mean() + weight * prior.mean()


# ------------------------------------------------------------------------------------------ class images


@dataclass(frozen=True)
class ClassImages:
    folder: Path
    found: int  # images already in the folder when the run began
    generated: int  # images this call made


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _manifest(folder: Path) -> list[dict]:
    path = folder / CLASS_MANIFEST
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill; its image is counted (or not) by the folder itself
    return lines


def pipeline_class_images(
    model: LoadedModel, prior: PriorPreservation, first_seed: int, count: int
) -> list[tuple[Image.Image, int]]:
    """``count`` images of the class prompt from seeds ``first_seed, first_seed + 1, ...`` by sdstudio's own
    generation pipeline (txt2img at the model's size), with their seeds."""
    # the one place training uses the pipeline: class images must be what inference makes of the prompt
    from sdstudio.pipelines.generate import generate
    from sdstudio.types import GenerationRequest

    request = GenerationRequest(
        prompt=prior.class_prompt, negative_prompt=prior.negative_prompt, sampler=prior.sampler,
        steps=prior.steps, cfg_scale=prior.cfg_scale, seed=first_seed, batch_size=count,
    )  # fmt: skip
    result = generate(model, ClipTokenizer(), request)
    return [(g.image, g.seed) for g in result.images]


def prepare_class_images(
    model: LoadedModel,
    prior: PriorPreservation,
    folder: str | os.PathLike,
    *,
    make_images: ClassImageMaker = pipeline_class_images,
) -> ClassImages:
    """Make ``folder`` hold at least ``prior.num_class_images`` images (diffusers: "class images are
    generated once"): the images already there, of any origin, are counted and reused; the missing ones are
    generated (``make_images``), each written with a same-stem ``.txt`` caption (the class prompt) and a
    line in ``class_images.jsonl`` (file, prompt, negative prompt, seed, sampler, steps, CFG, model). A
    folder whose manifest names another class prompt is refused: its images would teach another class."""
    folder = Path(folder)
    check_class_folder(prior, folder)
    folder.mkdir(parents=True, exist_ok=True)
    other = {m.get("prompt") for m in _manifest(folder)} - {prior.class_prompt}
    if other and prior.class_prompt:
        raise SdStudioError(
            f"{folder}: holds class images of {min(map(str, other))!r} ({CLASS_MANIFEST}), not of "
            f"{prior.class_prompt!r}; give another --class-data folder or empty it"
        )
    found = len(_images_in(folder))
    missing = prior.num_class_images - found
    if missing <= 0:
        log.info("%s: %d class images found, none generated", folder, found)
        return ClassImages(folder, found, 0)
    log.info("%s: %d class images found, generating %d of %r", folder, found, missing, prior.class_prompt)
    made = 0
    index = found
    while made < missing:
        count = min(prior.batch, missing - made)
        with torch.no_grad():
            images = make_images(model, prior, prior.seed + index, count)
        for image, seed in images:
            name = f"{index:05d}-{seed}"
            _save_png(image, folder / f"{name}.png")
            write_text_atomic(folder / f"{name}.txt", prior.class_prompt)
            record = {"file": f"{name}.png", "prompt": prior.class_prompt, "negative_prompt": prior.negative_prompt,
                      "seed": seed, "sampler": prior.sampler, "steps": prior.steps, "cfg_scale": prior.cfg_scale,
                      "model": model.name, "model_hash": model.short_hash}  # fmt: skip
            with open(folder / CLASS_MANIFEST, "a") as f:
                f.write(json.dumps(record) + "\n")
            index += 1
        made += len(images)
    return ClassImages(folder, found, made)


def check_class_folder(prior: PriorPreservation, folder: Path) -> None:
    """What can be said of a class folder before any work: not a file; without a class prompt (nothing can
    be generated), a folder that already holds ``num_class_images`` images."""
    if folder.exists() and not folder.is_dir():
        raise SdStudioError(f"{folder}: is a file; give a folder for the class images (--class-data)")
    if prior.class_prompt:
        return
    if not folder.is_dir():
        raise SdStudioError(f"{folder}: no such folder of class images; give --class-prompt to generate them")
    found = len(_images_in(folder))
    if found < prior.num_class_images:
        raise SdStudioError(
            f"{folder}: {found} class images, {prior.num_class_images} asked for; give --class-prompt to "
            f"generate the missing ones, or --num-class-images {found} or fewer"
        )


def class_folder(prior: PriorPreservation, out: Path) -> Path:
    """Where a run's class images are: ``prior.class_data``, else the run folder's ``class_images/``."""
    return Path(prior.class_data) if prior.class_data else out / CLASS_FOLDER


def open_class_data(
    model: LoadedModel,
    prior: PriorPreservation,
    out: Path,
    resolution: int | tuple[int, int],
    batch_size: int,
    seed: int,
    shard: Shard,
    make_images: ClassImageMaker = pipeline_class_images,
) -> TrainingData:
    """The class images of a prior-preservation run (DreamBooth, LoRA) as training batches: ``prior.class_data``
    (default ``out/class_images``) filled up to ``num_class_images`` by rank 0 (``prepare_class_images``),
    at the instance images' ``resolution``, their latents cached in ``out/latents``. Without a class prompt,
    every class image needs a caption of its own (refused by name otherwise)."""
    folder = class_folder(prior, out)
    shard.on_main(lambda: prepare_class_images(model, prior, folder, make_images=make_images))
    config = dataset_config_for(model, missing_caption="empty", resolution=resolution)
    classes = TrainingData.open(folder, config, model, out / "latents", batch_size, seed, shard=shard)
    if not prior.class_prompt:
        bare = [item.name for item in classes.dataset.items if not any(c.strip() for c in item.captions)]
        if bare:
            raise SdStudioError(
                f"{folder}: class images without a caption ({', '.join(bare[:3])}"
                f"{', ...' if len(bare) > 3 else ''}); add same-stem .txt captions or give --class-prompt"
            )
    return classes


def class_captions(prior: PriorPreservation, captions: Sequence[str]) -> list[str]:
    """A class batch's captions: each image's own, the class prompt where it has none."""
    return [c or prior.class_prompt for c in captions]


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------- saving


def ema_tensors(ema: EMA | None, ema_updates: int, decay: float) -> dict[str, Tensor]:
    """LDM's ``LitEma`` keys for an EMA of the UNet (none without one): ``model_ema.<UNet key without
    "model." and dots>`` for each UNet weight, ``model_ema.decay`` and ``model_ema.num_updates``. The
    tensors are the EMA's own (no copies)."""
    if ema is None:
        return {}
    state = {ema_key(UNET_PREFIX + key): value for key, value in ema.shadow.items()}
    state[EMA_PREFIX + "decay"] = torch.tensor(decay, dtype=torch.float32)
    state[EMA_PREFIX + "num_updates"] = torch.tensor(ema_updates, dtype=torch.int32)
    return state


# ------------------------------------------------------------------------------------------------- runs


def train_dreambooth(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: DreamBoothConfig,
    run: RunConfig,
    dataset_options: dict | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    make_class_images: ClassImageMaker = pipeline_class_images,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    """DreamBooth on the instance images in ``data``, with prior preservation if ``config.prior``; writes
    ``NAME.safetensors`` (the whole model, single file) into ``out`` and returns its path (then, with
    ``config.pivotal``, the word's ``embeddings/WORD.safetensors``)."""
    return _train_model("dreambooth", model, data, out, config, run, dataset_options, overwrite, progress,
                        make_class_images, preview)  # fmt: skip


def train_finetune(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig,
    run: RunConfig,
    dataset_options: dict | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    """Full fine-tuning on the captioned images in ``data``; writes ``NAME.safetensors`` (the whole model,
    single file, with ``model_ema.*`` keys when ``config.ema_decay > 0``) into ``out`` (then, with
    ``config.pivotal``, the word's ``embeddings/WORD.safetensors``)."""
    return _train_model("finetune", model, data, out, config, run, dataset_options, overwrite, progress,
                        pipeline_class_images, preview)  # fmt: skip


def trained_unet_weights(model: LoadedModel, modules: Sequence[str]) -> list[nn.Parameter]:
    """The UNet weights a DreamBooth or fine-tuning run trains: all of them, or with ``modules`` those whose
    checkpoint key (``model.diffusion_model.``...) one of the regular expressions finds (refused by name when
    none does)."""
    named = list(model.model.unet.named_parameters())
    if not modules:
        return [weight for _, weight in named]
    chosen = [weight for name, weight in named if any(re.search(p, UNET_PREFIX + name) for p in modules)]
    if not chosen:
        example = next((name for name, _ in named if "attn2.to_k" in name), named[0][0])
        raise SdStudioError(
            f"--modules {list(modules)}: no UNet weight of {model.name} matches; they are searched in checkpoint "
            f"keys such as {UNET_PREFIX + example} ('transformer_blocks': attention and feed-forward)"
        )
    return chosen


def _encode(
    model: LoadedModel,
    tokenizer: ClipTokenizer,
    captions: Sequence[str],
    trained: bool,
    words: EmbeddingDatabase | None = None,
) -> Tensor:
    clip_skip = model.config.text.default_clip_skip
    text_config = model.config.text
    if trained:
        return encode_captions(model.model.text_encoder, tokenizer, text_config, captions, clip_skip, words)
    with torch.no_grad():  # a frozen text encoder keeps no graph
        return encode_captions(model.model.text_encoder, tokenizer, text_config, captions, clip_skip, words)


def _train_model(
    method: str,
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: DreamBoothConfig | FinetuneConfig,
    run: RunConfig,
    dataset_options: dict | None,
    overwrite: bool,
    progress: Progress | None,
    make_class_images: ClassImageMaker,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    out = Path(out)
    shard = shard_from_env(model.device)
    if model.model.unet.dtype != torch.float32:
        raise SdStudioError(
            f"{model.path}: training needs fp32 weights; load the model in fp32 (--precision fp32)"
        )
    options = dict(dataset_options or {})
    instance_prompt = config.instance_prompt if isinstance(config, DreamBoothConfig) else ""
    if instance_prompt:  # every image's caption is the instance prompt (diffusers --instance_prompt)
        options |= {"template": (instance_prompt,), "missing_caption": "empty"}
    if config.pivotal is not None:
        options |= {"name": config.pivotal.name}  # the template's [name]
    data_config = dataset_config_for(model, **options)
    if config.pivotal is not None:  # a word no caption names would get no gradient
        if not instance_prompt:
            check_names_embedding(scan_dataset(data, data_config), data_config, config.pivotal.name, data)
        elif "[name]" not in instance_prompt and not holds_word(instance_prompt, config.pivotal.name):
            raise SdStudioError(
                f"the instance prompt {instance_prompt!r} does not hold the pivotal word "
                f"{config.pivotal.name!r}, so it would never be trained; write it in --instance-prompt"
            )
    prior = config.prior if isinstance(config, DreamBoothConfig) else None
    classes_at = None
    if prior is not None:
        classes_at = class_folder(prior, out)
        check_class_folder(prior, classes_at)
        if prior.target == "base" and config.prediction not in (None, model.config.prediction):
            raise SdStudioError(
                f"--prior-target base compares with the base model's own {model.config.prediction} "
                f"prediction; a run that teaches {config.prediction} cannot use it: leave out one of the two"
            )
    unet_weights = trained_unet_weights(model, config.modules)  # refused before the run folder is made
    settings = jsonable({"method": method, "model": str(model.path), "data": str(data),
                          "run": run_settings(run, shard), method: asdict(config), "dataset": asdict(data_config),
                          "class_data": str(classes_at) if classes_at else None})  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite, shard)
    log.info("%s %s", "resuming" if resume else "starting", out)
    sd = model.model
    sd.requires_grad_(False)
    # prior preservation against the base: a frozen copy of the UNet as it starts, before a resumed state
    base_unet = copy.deepcopy(sd.unet).eval() if prior is not None and prior.target == "base" else None
    source = TrainingData.open(
        data, data_config, model, out / "latents", run.batch_size, run.seed, shard=shard
    )
    classes = None
    if prior is not None:
        classes = open_class_data(model, prior, out, data_config.resolution, run.batch_size, run.seed + 1, shard,
                                  make_class_images)  # fmt: skip

    bf16 = run.bf16 and bf16_native(model.device)
    if run.bf16 and not bf16:
        log.info("%s has no native bf16: training in fp32", model.device)
    train_config = config.train_config(run, bf16)
    trained = nn.ModuleDict({"unet": sd.unet})
    groups: list[dict] = [{"params": unet_weights, "lr": run.lr}]
    if config.train_text_encoder:
        trained["text_encoder"] = sd.text_encoder
        groups.append({"params": list(sd.text_encoder.parameters()), "lr": config.text_lr or run.lr})
    tokenizer = ClipTokenizer()
    words = None  # pivotal tuning: the word's vectors, trained at their own rate
    if config.pivotal is not None:
        words = TrainableEmbedding.create(config.pivotal, sd.text_encoder.token_embedding, tokenizer)
        trained["embedding"] = words
        groups.append({"params": [words.vectors], "lr": config.pivotal_lr, "name": "embedding"})
    database = words.database if words is not None else None
    trained.requires_grad_(True)
    if config.modules:  # the UNet's other weights stay frozen: no gradient, no optimizer state
        sd.unet.requires_grad_(False)
        for weight in unet_weights:
            weight.requires_grad_(True)
    prediction = config.prediction or model.config.prediction
    unet: nn.Module = CheckpointedUNet(sd.unet) if config.gradient_checkpointing else sd.unet
    schedule = DiscreteSchedule.from_config(model.config.schedule).to(model.device)
    denoiser = Denoiser(unet, schedule, prediction)
    text_trained = config.train_text_encoder or words is not None
    teacher = None if base_unet is None else Denoiser(base_unet, schedule, prediction)

    def loss_fn(index: int, generator: torch.Generator) -> Tensor:
        latents, captions = source.batch(index, generator)
        context = _encode(model, tokenizer, captions, text_trained, database)
        instance = denoiser.training_loss(latents, context, generator, snr_gamma=run.snr_gamma,
                                          noise_offset=config.noise_offset,
                                          rows=source.rows(index))  # fmt: skip
        if words is not None:  # a batch whose captions were all dropped: a zero gradient, every rank alike
            instance = instance + 0.0 * words.vectors.sum()
        if classes is None or prior is None:
            return instance.mean()
        class_latents, captions_of_class = classes.batch(index, generator)
        class_context = _encode(model, tokenizer, class_captions(prior, captions_of_class), text_trained, database)
        kept = denoiser.training_loss(class_latents, class_context, generator, snr_gamma=run.snr_gamma,
                                      noise_offset=config.noise_offset, rows=classes.rows(index),
                                      teacher=teacher)  # fmt: skip
        return prior_preservation_loss(instance, kept, prior.prior_loss_weight)

    try:
        previewed = dataclasses.replace(
            model, config=dataclasses.replace(model.config, prediction=prediction)
        )

        def on_save(step: int) -> None:  # the weights as they are now: no intermediate checkpoint
            if preview is not None:
                render_preview(previewed, preview, out, step, config.name, "model")

        _, ema = train(trained, loss_fn, train_config, out / "state", parameters=groups, progress=progress,
                       ema_module=sd.unet, shard=shard, on_save=on_save)  # fmt: skip
    finally:
        sd.requires_grad_(False).eval()
    saved_config = dataclasses.replace(model.config, prediction=prediction)
    updates = max(0, train_config.steps - train_config.ema_start)
    extra = ema_tensors(ema, updates, config.ema_decay)
    metadata = {"sdstudio.training": json.dumps({"method": method, "steps": run.steps, "base_model": model.name,
                                                 "base_hash": model.short_hash})}  # fmt: skip
    paths = [out / f"{config.name}.safetensors"]
    if words is not None:
        paths.append(out / EMBEDDINGS_FOLDER / f"{words.config.name}.safetensors")
    if shard.main:
        save_model(sd, paths[0], dtype=DTYPES[config.save_dtype], metadata=metadata, overwrite=True, extra=extra,
                   config=saved_config)  # fmt: skip
        if words is not None:
            paths[1].parent.mkdir(exist_ok=True)
            save_embedding(words, paths[1], step=run.steps, overwrite=True)
    shard.barrier()  # the files exist when any rank returns
    return paths
