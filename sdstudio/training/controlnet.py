"""ControlNet training (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models", 3.2-3.4; lllyasviel's ``cldm``, diffusers' ``train_controlnet.py``, kohya's ``train_controlnet.py``):
a ControlNet made from the base model's UNet encoder, its zero convolutions at zero, trained on (image,
caption, control image) triples with the base model's frozen UNet, VAE and text encoder and its own denoiser
loss; written as the original single file (``control_model.*`` keys) that ``load_controlnet`` and every
ControlNet loader read.

The data is kohya's ControlNet subset: images with same-stem captions (any layout ``datasets.scan_dataset``
reads: caption files, ``N_name`` repeat folders, ``metadata.jsonl``) and a folder of control images with the
images' names (``conditioning_data_dir``), of the images' sizes. ``--data DIR`` with ``DIR/images`` and
``DIR/conditioning`` (``toyworld.control_data``'s folders) is read as that pair; ``conditioning=`` names the
control folder of any other image folder. A missing folder, an image without its control image, a control
image of another size or one that cannot be read is refused by name before any work, as kohya does.

Each sample's control image is cut as its image is (the same bucket, scaled size, crop and flip) and read
in [0, 1], the range sd-webui-controlnet feeds the network. The ControlNet's hint encoder takes the control
image at the pixel size: its number of stride-2 levels is the VAE's downsampling (cldm's four levels,
16-32-96-256 channels, for SD's 8; the first ``log2(f) + 1`` of those widths for a VAE that downsamples by
``f``).

Precision: the ControlNet trains in float32 master weights under the loop's bf16 autocast where the device
runs bf16 natively; the frozen model may be float32 or bf16. The file is fp16 unless ``save_dtype`` says
otherwise. Resumes from ``train_state.pt`` as every method does (``trainer.train``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file
from torch import Tensor, nn

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, check_writable
from sdstudio.io.images import flatten
from sdstudio.models.controlnet import PREFIX, ControlNet, ControlNetConfig
from sdstudio.models.loading import DTYPES, LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.models.unet import UNetModel
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.training.datasets import (
    IMAGE_EXTENSIONS,
    Dataset,
    DatasetConfig,
    DatasetItem,
    LatentCache,
    View,
    choose_view,
    cut_to_view,
    sample_rng,
    scan_dataset,
    vae_hash,
)
from sdstudio.training.distributed import ALONE, Rows, Shard, shard_from_env
from sdstudio.training.finetune import (
    LoopOptions,
    RunConfig,
    TrainingData,
    dataset_config_for,
    jsonable,
    prepare_run_folder,
    run_settings,
    training_denoiser,
)
from sdstudio.training.preview import SAVES_FOLDER, saved_name
from sdstudio.training.trainer import bf16_native, train

log = logging.getLogger(__name__)

__all__ = [
    "CONDITIONING_FOLDER",
    "HINT_WIDTHS",
    "IMAGES_FOLDER",
    "ControlNetRunOptions",
    "ControlTrainingData",
    "controlnet_for",
    "controlnet_loss",
    "find_conditioning",
    "save_controlnet",
    "split_layout",
    "train_controlnet",
]

IMAGES_FOLDER = "images"  # DIR/images + DIR/conditioning: toyworld.control_data's folders
CONDITIONING_FOLDER = "conditioning"
HINT_WIDTHS: tuple[int, ...] = (16, 32, 96, 256)  # cldm's hint encoder levels for SD's 8x downsampling
HintInit = Literal["zero", "random"]
HINT_INITS: tuple[HintInit, ...] = ("zero", "random")
Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class ControlNetRunOptions(LoopOptions):
    """The loop options of a ControlNet run (``finetune.LoopOptions``: noise offset, schedule, accumulation,
    optimizer, save dtype, weight decay); the file is ``controlnet.safetensors`` unless named."""

    name: str = "controlnet"
    hint_init: HintInit = "zero"  # the hint encoder's last conv: zeros (cldm's) or torch's default init

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hint_init not in HINT_INITS:
            raise SdStudioError(f"hint encoder initialisation {self.hint_init!r}: choose {', '.join(HINT_INITS)}")


# ------------------------------------------------------------------------------------------------ the network


def hint_widths(downsample: int) -> tuple[int, ...]:
    """The hint encoder's level widths for a VAE that downsamples by ``downsample`` (a power of two, at most
    8): cldm's 16, 32, 96, 256 for SD's 8, their first ``log2(downsample) + 1`` otherwise."""
    levels = int(math.log2(downsample)) if downsample >= 1 else -1
    if downsample < 1 or 2**levels != downsample or levels >= len(HINT_WIDTHS):
        raise SdStudioError(
            f"a VAE that downsamples by {downsample}: a ControlNet's hint encoder needs a power of two up to 8"
        )
    return HINT_WIDTHS[: levels + 1]


def controlnet_for(
    unet: UNetModel, downsample: int = 8, hint_channels: int = 3, *, hint_init: HintInit = "zero", seed: int = 0
) -> ControlNet:
    """A new ControlNet for ``unet`` whose hint encoder takes control images ``downsample`` times the latents'
    size: the UNet's encoder (time embedding, input blocks, middle block, SDXL's label embedding) copied, the
    zero convolutions and the hint encoder's last conv at zero (the paper's 3.2), so that it adds nothing
    until trained; the hint encoder's other convs in torch's default initialisation drawn from ``seed`` (and
    with ``hint_init="random"`` its last conv too). ``models.controlnet.controlnet_from_unet`` with the hint
    encoder fitted to the VAE and a seed. On the UNet's device and dtype."""
    param = next(unet.parameters())
    config = ControlNetConfig(unet=unet.config, hint_channels=hint_channels, hint_block_channels=hint_widths(downsample))
    with torch.random.fork_rng(devices=[]):  # the hint encoder's default init from ``seed``, not the global RNG
        torch.manual_seed(seed)
        controlnet = ControlNet(config)
    controlnet = controlnet.to(device=param.device, dtype=param.dtype)
    shared = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    result = controlnet.load_state_dict({k: v for k, v in unet.state_dict().items() if k.startswith(shared)},
                                        strict=False)  # fmt: skip
    copied = {k for k in controlnet.state_dict() if k.startswith(shared)}
    if result.unexpected_keys or copied & set(result.missing_keys):
        raise SdStudioError(f"the UNet's encoder does not fit a ControlNet ({result})")
    if hint_init == "random":
        last = controlnet.input_hint_block[-1]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # torch's default Conv2d initialisation, from the run's seed
            weight = torch.empty(last.weight.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(last.weight[0].numel())
            last.weight.copy_(weight)
            last.bias.copy_(torch.empty(last.bias.shape).uniform_(-bound, bound, generator=generator))
    elif hint_init != "zero":
        raise SdStudioError(f"hint encoder initialisation {hint_init!r}: choose {', '.join(HINT_INITS)}")
    return controlnet


def save_controlnet(
    controlnet: ControlNet,
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write ``controlnet`` as the original single files are (``control_v11p_sd15_canny.safetensors``): its
    state dict under ``control_model.`` (cldm's ``ControlLDM`` keeps it so), floating tensors in ``dtype``,
    the ``metadata`` as strings. Atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdStudioError(f"{path}: a ControlNet file is written as .safetensors")
    check_writable(path, "ControlNet file")
    if path.exists() and not overwrite:
        raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
    tensors = {
        PREFIX + key: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
        for key, value in controlnet.state_dict().items()
    }
    header = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    log.info("wrote a ControlNet (%d tensors) to %s", len(tensors), path)
    return path


def controlnet_loss(
    denoiser: Denoiser,
    controlnet: ControlNet,
    latents: Tensor,
    context: Tensor,
    hints: Tensor,
    generator: torch.Generator,
    *,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    rows: Rows | None = None,
) -> Tensor:
    """One training loss (scalar): the denoiser's own loss (``Denoiser.training_loss``: timesteps and noise
    from ``generator``) with the ControlNet's residuals for ``hints`` [B, C, H, W] (the control images in
    [0, 1] at the pixel size) added by the frozen UNet."""
    if not (latents.shape[0] == context.shape[0] == hints.shape[0]):
        raise ValueError(f"{latents.shape[0]} latents, {context.shape[0]} contexts, {hints.shape[0]} hints")
    hints = hints.to(latents.device)

    def control(x: Tensor, t: Tensor, c: Tensor, y: Tensor | None) -> list[Tensor]:
        return controlnet(x, hints, t, c, y)

    losses = denoiser.training_loss(
        latents, context, generator, snr_gamma=snr_gamma, noise_offset=noise_offset, rows=rows, control=control
    )
    return losses.mean()


# ------------------------------------------------------------------------------------------------ the data


def split_layout(data: str | os.PathLike, conditioning: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(image folder, control image folder): ``data`` and ``conditioning`` when given; else ``data/images`` and
    ``data/conditioning`` when ``data`` has both. ``SdStudioError`` naming what is missing otherwise."""
    data = Path(data)
    if not data.is_dir():
        raise SdStudioError(f"{data}: no such dataset folder (--data)")
    if conditioning is not None:
        cond = Path(conditioning)
        if not cond.is_dir():
            raise SdStudioError(f"{cond}: no such folder of control images (--conditioning)")
        return data, cond
    images, cond = data / IMAGES_FOLDER, data / CONDITIONING_FOLDER
    if images.is_dir() and cond.is_dir():
        return images, cond
    if images.is_dir() or cond.is_dir():
        missing = cond if images.is_dir() else images
        raise SdStudioError(f"{data}: has no {missing.name}/ folder; a ControlNet dataset needs "
                            f"{IMAGES_FOLDER}/NAME.png + NAME.txt and {CONDITIONING_FOLDER}/NAME.png")  # fmt: skip
    raise SdStudioError(
        f"{data}: no control images: expected {IMAGES_FOLDER}/NAME.png + NAME.txt and {CONDITIONING_FOLDER}/NAME.png "
        f"in it (kohya's image_dir and conditioning_data_dir), or pass the control images' folder (--conditioning)"
    )


def _control_size(path: Path) -> tuple[int, int] | str:
    """A control image's size after EXIF orientation, or why it cannot be used."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        return f"cannot be read as an image ({type(e).__name__}: {e})"


def find_conditioning(dataset: Dataset, folder: Path) -> dict[str, Path]:
    """Each image's control image (``dataset`` items by name -> path): the file in ``folder`` at the image's
    path relative to the dataset folder, with any image extension (kohya: the same base name). Every image
    must have one, of its own size, that can be read; ``SdStudioError`` naming the first offenders otherwise,
    before any work."""
    found: dict[str, Path] = {}
    missing, unreadable, mismatched = [], [], []
    stems: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            stems.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    if not stems:
        raise SdStudioError(
            f"{folder}: no control images ({', '.join(IMAGE_EXTENSIONS)}); put one per training image there, "
            "with the image's name"
        )
    for item in dataset.items:
        stem = Path(item.name).with_suffix("").as_posix()
        path = stems.get(stem) or stems.get(Path(item.name).stem)  # kohya: the base name alone
        if path is None:
            missing.append(item.name)
            continue
        size = _control_size(path)
        if isinstance(size, str):
            unreadable.append(f"{folder.name}/{path.relative_to(folder).as_posix()} {size}")
        elif size != item.size:
            mismatched.append(f"{folder.name}/{path.relative_to(folder).as_posix()} is {size[0]}x{size[1]}, its "
                              f"image {item.name} {item.size[0]}x{item.size[1]}")  # fmt: skip
        found[item.name] = path
    problems = []
    if missing:
        problems.append(f"{len(missing)} images have no control image of the same name in {folder} "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")  # fmt: skip
    if unreadable:
        problems.append(f"{len(unreadable)} control images are unusable ({'; '.join(unreadable[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} control images are not their image's size "
                        f"({'; '.join(mismatched[:3])}): make each control image at its image's size")  # fmt: skip
    if problems:
        raise SdStudioError(f"{dataset.root}: " + "; ".join(problems))
    return found


def render_control(path: Path, view: View) -> Tensor:
    """A control image cut as its sample's image is (``datasets.render_view``: scaled with Lanczos, cropped,
    maybe mirrored), RGB in [0, 1]. [3, H, W] float32"""
    try:
        with Image.open(path) as im:
            image = flatten(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise SdStudioError(f"{path}: cannot read the control image any more ({type(e).__name__}: {e})") from None
    image = cut_to_view(image, view)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float() / 255.0


@dataclass
class ControlTrainingData(TrainingData):
    """``TrainingData`` with each sample's control image: :meth:`samples` gives a step's latents, captions and
    control images, cut alike."""

    conditioning: dict[str, Path] = field(default_factory=dict)

    def views(self, step: int) -> list[View]:
        """This process's samples' views at ``step``: ``TrainingData.batch`` draws each from its own
        ``sample_rng(seed, epoch, batch, slot)``, the view first; drawn here again, they are the same."""
        epoch, index, everything = self._global(step)
        rows = self.shard.rows(len(everything))
        return [choose_view(everything[slot], sample_rng(self.seed, epoch, index, slot), self.config)
                for slot in rows.index]  # fmt: skip

    def items(self, step: int) -> list[DatasetItem]:
        _, _, everything = self._global(step)
        return [everything[slot] for slot in self.shard.rows(len(everything)).index]

    def samples(self, step: int, generator: torch.Generator) -> tuple[Tensor, list[str], Tensor]:
        """(latents [B, 4, h, w], captions, control images [B, 3, H, W] in [0, 1]) of step ``step``."""
        latents, captions = self.batch(step, generator)
        hints = torch.stack([render_control(self.conditioning[item.name], view)
                             for item, view in zip(self.items(step), self.views(step))])  # fmt: skip
        return latents, captions, hints


def open_control_data(
    images: Path,
    conditioning: Path,
    config: DatasetConfig,
    model: LoadedModel,
    cache_folder: Path,
    batch_size: int,
    seed: int,
    *,
    shard: Shard = ALONE,
) -> ControlTrainingData:
    """The run's data: ``images`` scanned (``datasets.scan_dataset``), each image's control image found and
    checked (``find_conditioning``), latents cached under ``cache_folder``."""
    dataset = scan_dataset(images, config)
    if shard.main:
        for warning in dataset.warnings:
            log.warning("%s", warning)
    found = find_conditioning(dataset, conditioning)
    identity = [(item.sha256, item.bucket, item.repeats) for item in dataset.items]
    shard.check_same(identity, f"images in {images}", "every node needs the same data folder")
    cache = LatentCache(cache_folder, vae_hash(model.model.vae))
    return ControlTrainingData(dataset, config, cache, model, batch_size * shard.world, seed, shard, conditioning=found)


def _folder_digest(conditioning: Mapping[str, Path]) -> str:
    """SHA-256 over the control images' names and bytes: a resume with other control images is another run."""
    digest = hashlib.sha256()
    for name, path in sorted(conditioning.items()):
        digest.update(f"{name}|".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ the run


def train_controlnet(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    run: RunConfig,
    options: ControlNetRunOptions = ControlNetRunOptions(),
    dataset_options: dict | None = None,
    *,
    conditioning: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """A ControlNet for ``model`` trained on ``data``'s images, captions and control images (``split_layout``)
    in the shared loop (resumable, logged); writes ``NAME.safetensors`` (``save_controlnet``) into ``out``
    and at each save ``saves/NAME-STEP.safetensors``.

    The model is not changed: its UNet, VAE and text encoder are frozen (their ``requires_grad`` flags are
    restored afterwards). Under torchrun data-parallel: ``run.batch_size`` per process, rank 0 writes the
    files, every rank returns their paths."""
    out = Path(out)
    shard = shard_from_env(model.device)
    images, cond_folder = split_layout(data, conditioning)
    data_config = dataset_config_for(model, **(dataset_options or {}))
    downsample = model.config.vae.downsample
    hint_widths(downsample)  # refuses a VAE no hint encoder fits, before any work
    source = open_control_data(images, cond_folder, data_config, model, out / "latents", run.batch_size, run.seed,
                               shard=shard)  # fmt: skip
    settings = jsonable(
        {"method": "controlnet", "model": str(model.path), "data": str(images), "conditioning": str(cond_folder),
         "conditioning_sha256": _folder_digest(source.conditioning), "run": run_settings(run, shard),
         "options": asdict(options), "dataset": asdict(data_config)},
    )  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite, shard)
    log.info("%s %s", "resuming" if resume else "starting", out)
    sd = model.model
    flags = {name: p.requires_grad for name, p in sd.named_parameters()}
    sd.requires_grad_(False)
    sd.eval()
    controlnet = controlnet_for(sd.unet, downsample, hint_init=options.hint_init, seed=run.seed)
    controlnet = controlnet.float().requires_grad_(True)
    denoiser = training_denoiser(model)
    tokenizer = ClipTokenizer()
    text_config, clip_skip = model.config.text, model.config.text.default_clip_skip
    bf16 = run.bf16 and bf16_native(model.device)
    if run.bf16 and not bf16:
        log.info("%s has no native bf16: training in fp32", model.device)
    train_config = options.train_config(run, bf16)
    metadata_base = {"method": "controlnet", "base_model": model.name, "base_hash": model.short_hash,
                     "hint_channels": controlnet.config.hint_channels, "images": len(source.dataset.items)}  # fmt: skip

    def loss_fn(index: int, generator: torch.Generator) -> Tensor:
        latents, captions, hints = source.samples(index, generator)
        with torch.no_grad():  # a frozen text encoder keeps no graph
            context = encode_captions(sd.text_encoder, tokenizer, text_config, captions, clip_skip)
        return controlnet_loss(denoiser, controlnet, latents, context, hints, generator, snr_gamma=run.snr_gamma,
                               noise_offset=options.noise_offset, rows=source.rows(index))  # fmt: skip

    def metadata(step: int) -> dict[str, str]:
        return {"sdstudio.training": json.dumps(metadata_base | {"steps": step})}

    def on_save(step: int) -> None:
        saved = out / SAVES_FOLDER / f"{saved_name(options.name, step)}.safetensors"
        save_controlnet(controlnet, saved, metadata(step), dtype=DTYPES[options.save_dtype], overwrite=True)

    try:
        train(controlnet, loss_fn, train_config, out / "state", progress=progress, shard=shard, on_save=on_save)
    finally:
        for name, p in sd.named_parameters():
            p.requires_grad_(flags[name])
    controlnet.requires_grad_(False).eval()
    path = out / f"{options.name}.safetensors"
    if shard.main:
        save_controlnet(controlnet, path, metadata(run.steps), dtype=DTYPES[options.save_dtype], overwrite=True)
    shard.barrier()  # the file exists when any rank returns
    return [path]

