"""Fine-tuning a loaded model on a folder of captioned images: the data every method shares, and the runs.

One data flow for every method: the dataset folder is scanned (``datasets.scan_dataset``), each step takes
one batch of one bucket (``datasets.batches``), each sample its view and caption from its own seeded
generator (``sample_rng``), the VAE posterior from the latent cache (encoded once per image and view), a
latent drawn from it and scaled as the UNet sees latents. A method is the loss over (latents, captions) and
what it writes; the loop is ``trainer.train``, which resumes a killed run from its ``train_state.pt``.

Run folders (``--out``): ``train_state.pt`` and ``log.jsonl`` of the loop, the result file(s) named after
the method's output, ``latents/`` (the cache, unless the data folder is given another). A folder holding
anything else is refused unless ``overwrite``; a folder of an earlier run of the same settings resumes.

Under ``torchrun`` (``sdstudio.training.distributed``) every method trains data-parallel: ``batch_size`` is
per process, each rank computes its rows of the global batch (``TrainingData.rows``, passed to
``Denoiser.training_loss(rows=...)``), rank 0 prepares the run folder and writes every file, and the run
functions return the same paths on every rank. A run folder records the global batch, so a run resumes
on any number of processes that gives the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import DTYPES, LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.training.datasets import (
    Dataset,
    DatasetConfig,
    LatentCache,
    batches,
    caption_for,
    choose_view,
    sample_rng,
    scan_dataset,
    vae_hash,
)
from sdstudio.training.distributed import ALONE, Rows, Shard, shard_from_env
from sdstudio.training.embedding import (
    EmbeddingTrainConfig,
    TrainableEmbedding,
    embedding_loss,
    save_embedding,
)
from sdstudio.training.preview import SAVES_FOLDER, PreviewSettings, render_preview, saved_name
from sdstudio.training.trainer import STATE_FILE, OptimizerName, Schedule, TrainConfig, train

log = logging.getLogger(__name__)

__all__ = [
    "RunConfig", "TrainingData", "dataset_config_for", "prepare_run_folder", "run_settings", "train_embedding",
    "training_denoiser",
]  # fmt: skip

RUN_FILE = "run.json"  # the settings of the run, to tell a resume from a clash
Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class RunConfig:
    """What every method's run shares: steps, batch, learning rate and its schedule, seed, precision."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 5e-3
    warmup: int = 0
    cosine: bool = False  # cosine decay to 10 % after warm-up; constant otherwise (A1111's default)
    seed: int = 0
    bf16: bool = True  # autocast to bf16 (fast on AMX / AVX-512 BF16 CPUs and on GPUs)
    snr_gamma: float = 0.0  # Min-SNR-gamma weighting (0: off)
    save_every: int = 500  # steps between saves of the training state (and of the result so far)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise SdStudioError(
                f"steps and batch size must be at least 1 (got {self.steps}, {self.batch_size})"
            )
        if not (self.lr > 0 and self.lr < 10):
            raise SdStudioError(
                f"learning rate {self.lr}: must be a positive number below 10 (5e-3 is usual)"
            )
        if self.save_every < 1:
            raise SdStudioError(f"save every {self.save_every} steps: must be at least 1")

    def train_config(self, weight_decay: float = 0.0) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, lr=self.lr, warmup=self.warmup, weight_decay=weight_decay, bf16=self.bf16,
            cosine=self.cosine, checkpoint_every=self.save_every, log_every=max(1, min(50, self.steps // 20)),
            seed=self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class LoopOptions:
    """What the methods that write a file of their own (LoRA, DreamBooth, full fine-tune) add to the shared
    ``RunConfig``: the output name (``NAME.safetensors``, kohya's ``--output_name``), ``--noise_offset``,
    ``--lr_scheduler`` (None: the run's, constant or ``--cosine``), ``--gradient_accumulation_steps``,
    ``--optimizer_type``, ``--save_precision`` and the AdamW weight decay (torch's default, kohya's and
    diffusers' ``--adam_weight_decay``)."""

    name: str
    noise_offset: float = 0.0  # 0.05-0.1 usual
    lr_schedule: Schedule | None = None
    gradient_accumulation: int = 1
    optimizer: OptimizerName = "adamw"
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if not self.name.strip() or any(c in self.name for c in '/\\:<>"|?*'):
            raise SdStudioError(f'output name {self.name!r}: use a file name without a folder or /\\:<>"|?*')
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise SdStudioError(f"noise offset {self.noise_offset}: must not be negative (0.05 is usual)")
        if self.save_dtype not in DTYPES:
            raise SdStudioError(f"save dtype {self.save_dtype!r}: choose {', '.join(DTYPES)}")
        self.train_config(RunConfig(steps=1))  # the loop's own checks, now rather than after any work

    def train_config(self, run: RunConfig, bf16: bool | None = None, lr: float | None = None) -> TrainConfig:
        """The loop's settings: ``run``'s, with these options, ``bf16`` (None: the run's) and ``lr`` (None: the
        run's; the base of the schedule and of the log's rate)."""
        return dataclasses.replace(
            run.train_config(self.weight_decay),
            lr=run.lr if lr is None else lr,
            bf16=run.bf16 if bf16 is None else bf16,
            schedule=self.lr_schedule,
            grad_accumulation=self.gradient_accumulation,
            optimizer=self.optimizer,
            betas=(0.9, 0.999),  # torch's AdamW defaults, as kohya and diffusers train
        )


def dataset_config_for(model: LoadedModel, **options: object) -> DatasetConfig:
    """Dataset options with the model's own size as the resolution, and buckets from half to twice it."""
    size = int(options.pop("resolution", None) or model.config.default_size)  # type: ignore[call-overload]
    step = 64 if size >= 64 else 8
    low = max(step, (size // 2) // step * step)
    high = max(size, -(-2 * size // step) * step)
    return DatasetConfig(resolution=size, bucket_min=low, bucket_max=high, bucket_step=step, **options)  # type: ignore[arg-type]


@dataclass
class TrainingData:
    """Batches of (scaled latents, captions) for a run: the same ones for the same seed and step.

    ``batch_size`` is the global batch (every rank's rows together); ``shard`` says which rows of it this
    process computes (all of them alone)."""

    dataset: Dataset
    config: DatasetConfig
    cache: LatentCache
    model: LoadedModel
    batch_size: int
    seed: int
    shard: Shard = ALONE
    _epochs: dict[int, list] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, folder: str | os.PathLike, config: DatasetConfig, model: LoadedModel, cache_folder: Path,
        batch_size: int, seed: int, *, shard: Shard = ALONE,
    ) -> TrainingData:  # fmt: skip
        """``batch_size`` per process (kohya's and diffusers' ``--train_batch_size``): the global batch is
        ``batch_size * shard.world``. Under torchrun every rank must see the same images (checked). The cache
        folder may be shared by the ranks: its files are written atomically (a temp file, then a rename)."""
        dataset = scan_dataset(folder, config)
        if shard.main:
            for warning in dataset.warnings:
                log.warning("%s", warning)
        identity = [(item.sha256, item.bucket, item.repeats) for item in dataset.items]
        shard.check_same(identity, f"images in {folder}", "every node needs the same data folder")
        if not dataset.items:
            raise SdStudioError(f"{folder}: no usable image (see the warnings above)")
        cache = LatentCache(cache_folder, vae_hash(model.model.vae))
        return cls(dataset, config, cache, model, batch_size * shard.world, seed, shard)

    def _epoch(self, epoch: int) -> list:
        if epoch not in self._epochs:  # the current epoch only: batches() shuffles the whole dataset
            self._epochs = {epoch: batches(self.dataset, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch]

    @cached_property
    def batches_per_epoch(self) -> int:
        """The same every epoch (each bucket cut into batches; only the order changes), without shuffling."""
        counts = self.dataset.bucket_counts()  # samples per bucket, repeats counted
        return sum(-(-n // self.batch_size) for n in counts.values())

    def _global(self, step: int) -> tuple[int, int, list]:
        """(epoch, batch index in it, the global batch's items) of step ``step``."""
        epoch, index = divmod(step, self.batches_per_epoch)
        batch = self._epoch(epoch)[index]
        return epoch, index, [self.dataset.items[i] for i in batch.items]

    def rows(self, step: int) -> Rows:
        """This process's rows of step ``step``'s global batch: what ``Denoiser.training_loss(rows=...)``
        takes with the latents of :meth:`batch` (all rows, weight 1, alone)."""
        return self.shard.rows(len(self._global(step)[2]))

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """Step ``step``'s latents ([B, 4, h, w], scaled, float32, drawn from the posterior with
        ``generator``) and captions: this process's rows (:meth:`rows`) of the global batch, whose posterior
        noise is drawn whole, so every rank's generator stays in step with one process's."""
        epoch, index, everything = self._global(step)
        rows = self.shard.rows(len(everything))
        items = [everything[slot] for slot in rows.index]
        views, captions = [], []
        for slot, item in zip(rows.index, items):
            rng = sample_rng(self.seed, epoch, index, slot)  # the global slot: the same draw as alone
            views.append(choose_view(item, rng, self.config))
            captions.append(caption_for(item, rng, self.config))
        posterior = self.cache.latents(items, views, self.model.model.vae)
        noise = rows.take(torch.randn((rows.total, *posterior.mean.shape[1:]), generator=generator))
        latents = (
            posterior.mean + (0.5 * posterior.logvar).exp() * noise
        ) * self.model.config.vae.scale_factor
        return latents.to(self.model.device), captions


def check_patterns(option: str, patterns: Sequence[str]) -> None:
    """Refuse by name a module filter (``--modules``, ``--skip-modules``) that is not a regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise SdStudioError(
                f"{option} {pattern!r}: not a regular expression ({e}); escape brackets as \\[ "
            ) from None


def run_settings(run: RunConfig, shard: Shard = ALONE) -> dict:
    """``run`` as a run folder records it: with the global batch (``batch_size * world``) as ``batch_size``,
    so a resume on another number of processes is accepted exactly when it trains the same batches."""
    return asdict(run) | {"batch_size": run.batch_size * shard.world}


def prepare_run_folder(out: Path, settings: object, overwrite: bool, shard: Shard = ALONE) -> bool:
    """Make ``out`` ready: new, or an earlier run of the same settings (returns True: resume), or, with
    ``overwrite``, emptied. Anything else is refused before any work.

    Under torchrun rank 0 does it while the others wait; every rank gets its answer, or its error. The
    ranks' settings must agree."""
    shard.check_same(settings, "settings", "start every process with the same command")
    return shard.on_main(lambda: _prepare_run_folder(out, settings, overwrite))


def _prepare_run_folder(out: Path, settings: object, overwrite: bool) -> bool:
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise SdStudioError(f"{out}: exists and is not a folder; pass another --out")
    if out.is_dir() and any(out.iterdir()):
        same = run_file.is_file() and json.loads(run_file.read_text()) == settings
        if same and (out / "state" / STATE_FILE).exists() and not overwrite:
            return True
        if not overwrite:
            why = "an earlier run with other settings" if run_file.is_file() else "other files"
            raise SdStudioError(
                f"{out}: holds {why}; pass --overwrite to start again there, or another --out"
            )
        for child in out.iterdir():
            if child.name != "latents":  # the cache stays valid: it is keyed by the VAE and the images
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))
    return False


def training_denoiser(model: LoadedModel) -> Denoiser:
    """The model's UNet as a denoiser in sigma space, on the model's device: what every method's loss calls."""
    return Denoiser(model.model.unet, DiscreteSchedule.from_config(model.config.schedule).to(model.device),
                    model.config.prediction)  # fmt: skip


def holds_word(text: str, word: str) -> bool:
    """Whether ``text`` holds ``word`` as a word of its own (any case, not inside a longer word)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, re.IGNORECASE) is not None


def check_names_embedding(dataset: Dataset, config: DatasetConfig, name: str, data: object) -> None:
    """Refuse a run whose prompts never hold the embedding's name: its vectors would get no gradient."""
    if any("[name]" in line for line in config.template):
        return
    if not any(holds_word(c, name) for item in dataset.items for c in item.captions):
        where = "the template has no [name] and no caption" if config.template else "no caption"
        raise SdStudioError(
            f"{data}: {where} holds the embedding's name {name!r}, so it would never be trained; pass "
            f"--template subject_filewords ('a photo of [name], [filewords]') or write {name!r} in the captions"
        )


def train_embedding(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    embedding_config: EmbeddingTrainConfig,
    run: RunConfig,
    dataset_options: dict | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    """Textual inversion on ``data``; writes ``NAME.pt`` (A1111) and ``NAME.safetensors`` into ``out``, and at
    each save ``saves/NAME-STEP.pt`` (and with ``preview`` its preview image, ``training.preview``).

    Under torchrun (``torchrun --nproc_per_node 2 $(which sdstudio) train embedding ...``) it trains
    data-parallel (``sdstudio.training.distributed``): ``run.batch_size`` per process, rank 0 writes the
    files, every rank returns their paths."""
    out = Path(out)
    shard = shard_from_env(model.device)
    options = {"missing_caption": "filename", **(dataset_options or {})}  # A1111 captions by file name
    config = dataset_config_for(model, **options, name=embedding_config.name)
    settings = jsonable({"method": "embedding", "model": str(model.path), "data": str(data),
                          "run": run_settings(run, shard), "embedding": asdict(embedding_config),
                          "dataset": asdict(config)})  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite, shard)
    log.info("%s %s", "resuming" if resume else "starting", out)
    tokenizer = ClipTokenizer()
    source = TrainingData.open(data, config, model, out / "latents", run.batch_size, run.seed, shard=shard)
    check_names_embedding(source.dataset, config, embedding_config.name, data)
    sd = model.model
    sd.requires_grad_(False)
    embedding = TrainableEmbedding.create(embedding_config, sd.text_encoder.token_embedding, tokenizer)
    denoiser = training_denoiser(model)
    clip_skip = model.config.text.default_clip_skip

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        latents, captions = source.batch(step, generator)
        return embedding_loss(embedding, denoiser, sd.text_encoder, tokenizer, model.config.text, clip_skip,
                              latents, captions, generator, snr_gamma=run.snr_gamma,
                              rows=source.rows(step))  # fmt: skip

    name = embedding_config.name
    common = {"name": name, "checkpoint_hash": model.short_hash, "checkpoint_name": model.name}

    def on_save(step: int) -> None:
        saved = out / SAVES_FOLDER / f"{saved_name(name, step)}.pt"
        saved.parent.mkdir(exist_ok=True)
        save_embedding(embedding, saved, overwrite=True, step=step, **common)  # type: ignore[arg-type]
        if preview is not None:
            render_preview(model, preview, out, step, name, "embedding", saved)

    train(
        embedding,
        loss_fn,
        run.train_config(),
        out / "state",
        parameters=[embedding.vectors],
        progress=progress,
        shard=shard,
        on_save=on_save,
    )
    common["step"] = run.steps  # type: ignore[assignment]
    paths = [out / f"{name}{suffix}" for suffix in (".pt", ".safetensors")]
    if shard.main:
        for path in paths:
            save_embedding(embedding, path, overwrite=True, **common)  # type: ignore[arg-type]
    shard.barrier()  # the files exist when any rank returns
    return paths


def jsonable(value: object) -> object:
    """``value`` as run.json holds it (paths and other objects as strings), to compare a resume's settings."""
    return json.loads(json.dumps(value, default=str))
