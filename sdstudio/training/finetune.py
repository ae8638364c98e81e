"""Fine-tuning a loaded model on a folder of captioned images: the data every method shares, and the runs.

One data flow for every method: the dataset folder is scanned (``datasets.scan_dataset``), each step takes
one batch of one bucket (``datasets.batches``), each sample its view and caption from its own seeded
generator (``sample_rng``), the VAE posterior from the latent cache (encoded once per image and view), a
latent drawn from it and scaled as the UNet sees latents. A method is the loss over (latents, captions) and
what it writes; the loop is ``trainer.train``, which resumes a killed run from its ``train_state.pt``.

Run folders (``--out``): ``train_state.pt`` and ``log.jsonl`` of the loop, the result file(s) named after
the method's output, ``latents/`` (the cache, unless the data folder is given another). A folder holding
anything else is refused unless ``overwrite``; a folder of an earlier run of the same settings resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel
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
from sdstudio.training.embedding import (
    EmbeddingTrainConfig,
    TrainableEmbedding,
    embedding_loss,
    save_embedding,
)
from sdstudio.training.trainer import STATE_FILE, TrainConfig, train

log = logging.getLogger(__name__)

__all__ = [
    "RunConfig", "TrainingData", "dataset_config_for", "prepare_run_folder", "train_embedding", "training_denoiser",
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


def dataset_config_for(model: LoadedModel, **options: object) -> DatasetConfig:
    """Dataset options with the model's own size as the resolution, and buckets from half to twice it."""
    size = int(options.pop("resolution", None) or model.config.default_size)  # type: ignore[call-overload]
    step = 64 if size >= 64 else 8
    low = max(step, (size // 2) // step * step)
    high = max(size, -(-2 * size // step) * step)
    return DatasetConfig(resolution=size, bucket_min=low, bucket_max=high, bucket_step=step, **options)  # type: ignore[arg-type]


@dataclass
class TrainingData:
    """Batches of (scaled latents, captions) for a run: the same ones for the same seed and step."""

    dataset: Dataset
    config: DatasetConfig
    cache: LatentCache
    model: LoadedModel
    batch_size: int
    seed: int
    _epochs: dict[int, list] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, folder: str | os.PathLike, config: DatasetConfig, model: LoadedModel, cache_folder: Path,
        batch_size: int, seed: int,
    ) -> TrainingData:  # fmt: skip
        dataset = scan_dataset(folder, config)
        for warning in dataset.warnings:
            log.warning("%s", warning)
        if not dataset.items:
            raise SdStudioError(f"{folder}: no usable image (see the warnings above)")
        cache = LatentCache(cache_folder, vae_hash(model.model.vae))
        return cls(dataset, config, cache, model, batch_size, seed)

    def _epoch(self, epoch: int) -> list:
        if epoch not in self._epochs:  # the current epoch only: batches() shuffles the whole dataset
            self._epochs = {epoch: batches(self.dataset, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch]

    @cached_property
    def batches_per_epoch(self) -> int:
        """The same every epoch (each bucket cut into batches; only the order changes), without shuffling."""
        counts = self.dataset.bucket_counts()  # samples per bucket, repeats counted
        return sum(-(-n // self.batch_size) for n in counts.values())

    def batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """Step ``step``'s latents ([B, 4, h, w], scaled, float32, drawn from the posterior with
        ``generator``) and captions."""
        epoch, index = divmod(step, self.batches_per_epoch)
        batch = self._epoch(epoch)[index]
        items = [self.dataset.items[i] for i in batch.items]
        views, captions = [], []
        for slot, item in enumerate(items):
            rng = sample_rng(self.seed, epoch, index, slot)
            views.append(choose_view(item, rng, self.config))
            captions.append(caption_for(item, rng, self.config))
        posterior = self.cache.latents(items, views, self.model.model.vae)
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents = (
            posterior.mean + (0.5 * posterior.logvar).exp() * noise
        ) * self.model.config.vae.scale_factor
        return latents.to(self.model.device), captions


def prepare_run_folder(out: Path, settings: object, overwrite: bool) -> bool:
    """Make ``out`` ready: new, or an earlier run of the same settings (returns True: resume), or, with
    ``overwrite``, emptied. Anything else is refused before any work."""
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
) -> list[Path]:
    """Textual inversion on ``data``; writes ``NAME.pt`` (A1111) and ``NAME.safetensors`` into ``out``."""
    out = Path(out)
    options = {"missing_caption": "filename", **(dataset_options or {})}  # A1111 captions by file name
    config = dataset_config_for(model, **options, name=embedding_config.name)
    settings = _jsonable({"method": "embedding", "model": str(model.path), "data": str(data), "run": asdict(run),
                          "embedding": asdict(embedding_config), "dataset": asdict(config)})  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite)
    log.info("%s %s", "resuming" if resume else "starting", out)
    tokenizer = ClipTokenizer()
    source = TrainingData.open(data, config, model, out / "latents", run.batch_size, run.seed)
    sd = model.model
    sd.requires_grad_(False)
    embedding = TrainableEmbedding.create(embedding_config, sd.text_encoder.token_embedding, tokenizer)
    denoiser = training_denoiser(model)
    clip_skip = model.config.text.default_clip_skip

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        latents, captions = source.batch(step, generator)
        return embedding_loss(embedding, denoiser, sd.text_encoder, tokenizer, model.config.text, clip_skip,
                              latents, captions, generator, snr_gamma=run.snr_gamma)  # fmt: skip

    train(
        embedding,
        loss_fn,
        run.train_config(),
        out / "state",
        parameters=[embedding.vectors],
        progress=progress,
    )
    name = embedding_config.name
    common = {
        "name": name,
        "step": run.steps,
        "checkpoint_hash": model.short_hash,
        "checkpoint_name": model.name,
    }
    return [save_embedding(embedding, out / f"{name}{suffix}", overwrite=True, **common)  # type: ignore[arg-type]
            for suffix in (".pt", ".safetensors")]  # fmt: skip


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value, default=str))
