"""Training datasets as users keep them, shared by every fine-tuning method.

Layouts read by :func:`scan_dataset`:

- a folder of images with same-stem caption files (``cat.png`` + ``cat.txt`` or ``cat.caption``), as
  kohya sd-scripts and AUTOMATIC1111 read them;
- kohya's repeat folders ``N_name`` under the dataset folder (``10_sks dog``): every image in it counts
  ``N`` times per epoch, and ``name`` is the caption of its images that have no caption file
  (sd-scripts ``config_util.generate_dreambooth_subsets_config_by_subdirs``, ``DreamBoothDataset``);
- diffusers' ``ImageFolder`` metadata: a ``metadata.jsonl`` (or ``metadata.csv``) next to the images whose
  rows name an image in ``file_name`` (relative to that file) and its caption in a text column (``text``);
- AUTOMATIC1111's textual-inversion / hypernetwork prompt templates: one line drawn per sample, ``[name]``
  replaced by the embedding's name and ``[filewords]`` by the image's caption, which may come from its file
  name (leading numbers and dashes dropped, optionally only the words ``filename_regex`` finds;
  ``modules/textual_inversion/dataset.py``).

Images are placed in aspect-ratio buckets by kohya's rules (``BucketManager``, ``make_bucket_resolutions``),
scaled to cover their bucket and cropped (centre or random), optionally flipped. Batches only hold images
of one bucket. VAE posteriors are cached on disk per (VAE, image content, bucket, crop, flip), so a second
run encodes nothing. Unusable files are reported by name and skipped while scanning, never mid-training.

Every random choice draws from a ``random.Random`` the caller passes in, made from the seed by
:func:`sample_rng`, so a seed replays the same batches, crops, flips and captions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write
from sdstudio.io.images import flatten, from_pil
from sdstudio.models.vae import AutoencoderKL, LatentDistribution

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) in pixels, as PIL and kohya order them
CaptionSource = Literal["metadata", "file", "folder", "filename", "none"]

# kohya's IMAGE_EXTENSIONS (without the optional AVIF / JPEG XL plugins); compared in lower case.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image formats a user may drop in a dataset folder that we do not train on: reported, not read.
_OTHER_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".svg", ".psd", ".ico", ".tga", ".jp2",
     ".dng", ".cr2", ".nef", ".arw", ".exr", ".hdr", ".ppm", ".pgm", ".pbm", ".pcx", ".dds", ".qoi"}
)  # fmt: skip
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # AUTOMATIC1111's re_numbers_at_start

# A few prompt templates in AUTOMATIC1111's format (one prompt per line); any template file works too.
TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "filewords": ("[filewords]",),
        "subject": (
            "a photo of a [name]",
            "a close-up photo of the [name]",
            "a good photo of a [name]",
            "a rendering of the [name]",
            "a cropped photo of a [name]",
        ),
        "subject_filewords": (
            "a photo of a [name], [filewords]",
            "a close-up photo of the [name], [filewords]",
            "a good photo of a [name], [filewords]",
            "a rendering of the [name], [filewords]",
            "a cropped photo of a [name], [filewords]",
        ),
        "style": (
            "a painting, art by [name]",
            "a rendering, art by [name]",
            "a picture, art by [name]",
            "a good painting, art by [name]",
        ),
        "style_filewords": (
            "a painting of [filewords], art by [name]",
            "a rendering of [filewords], art by [name]",
            "a picture of [filewords], art by [name]",
            "a good painting of [filewords], art by [name]",
        ),
    }
)


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class DatasetConfig:
    """How a dataset folder is read and augmented. Defaults are kohya sd-scripts' where it has one."""

    resolution: int | tuple[int, int] = 512  # square side, or (width, height); max bucket area = w * h
    buckets: bool = True  # aspect-ratio buckets; False: every image covers resolution and is cropped
    bucket_min: int = 256  # kohya --min_bucket_reso
    bucket_max: int = 1024  # kohya --max_bucket_reso
    bucket_step: int = 64  # kohya --bucket_reso_steps
    bucket_no_upscale: bool = False  # kohya --bucket_no_upscale: buckets from each image's own size
    crop: Literal["center", "random"] = "center"
    flip: bool = False  # horizontal flip with probability 1/2 (kohya --flip_aug)
    caption_extensions: tuple[str, ...] = (".txt", ".caption")  # tried in this order
    caption_column: str = "text"  # the caption column of metadata.jsonl / metadata.csv (diffusers)
    # An image with no caption from metadata, caption file or repeat folder name: reported and skipped,
    # trained with an empty caption, or captioned by its file name (AUTOMATIC1111).
    missing_caption: Literal["skip", "empty", "filename"] = "skip"
    filename_regex: str = ""  # AUTOMATIC1111's dataset_filename_word_regex: keep only the words it finds
    filename_join: str = " "  # AUTOMATIC1111's dataset_filename_join_string
    caption_dropout_rate: float = 0.0  # whole caption replaced by "" (kohya --caption_dropout_rate)
    shuffle_tags: bool = False  # shuffle comma-separated tags (kohya --shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay first and are never dropped (kohya --keep_tokens)
    tag_dropout_rate: float = 0.0  # each other tag dropped with this chance (--caption_tag_dropout_rate)
    repeats: int = 1  # repeats of images not in an N_name folder
    template: tuple[str, ...] = ()  # prompt template lines; () uses the caption as it is
    name: str = ""  # what [name] becomes in the template (the embedding / hypernetwork name)
    verify: bool = True  # decode every image while scanning, so a truncated file is caught then

    def __post_init__(self) -> None:
        width, height = self.max_resolution
        step = self.bucket_step
        if width < 8 or height < 8:
            raise SdStudioError(
                f"resolution {self.resolution}: too small; use at least 8 pixels (64 or more)"
            )
        if step < 8 or step % 8:
            raise SdStudioError(f"bucket step {step}: must be a positive multiple of 8 (64 is usual)")
        if self.buckets and not self.bucket_no_upscale:
            if self.bucket_min % step or self.bucket_max % step:
                raise SdStudioError(
                    f"bucket sizes {self.bucket_min}..{self.bucket_max}: must be multiples of the step {step}"
                )
            if not step <= self.bucket_min <= self.bucket_max or self.bucket_max < max(width, height):
                raise SdStudioError(
                    f"bucket sizes {self.bucket_min}..{self.bucket_max}: need min <= max and max >= the "
                    f"resolution {width}x{height}"
                )
        if self.crop not in ("center", "random"):
            raise SdStudioError(f"crop {self.crop!r}: choose center or random")
        if self.missing_caption not in ("skip", "empty", "filename"):
            raise SdStudioError(f"missing_caption {self.missing_caption!r}: choose skip, empty or filename")
        for what, rate in (
            ("caption dropout", self.caption_dropout_rate),
            ("tag dropout", self.tag_dropout_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise SdStudioError(f"{what} rate {rate}: must be between 0 and 1")
        if self.keep_tokens < 0 or self.repeats < 1:
            raise SdStudioError("keep_tokens must be >= 0 and repeats >= 1")
        if any(not ext.startswith(".") for ext in self.caption_extensions):
            raise SdStudioError(f"caption extensions {self.caption_extensions}: each must start with a dot")
        try:
            re.compile(self.filename_regex)
        except re.error as e:
            raise SdStudioError(
                f"filename regex {self.filename_regex!r}: not a valid regular expression ({e})"
            ) from None
        if any("[name]" in line for line in self.template) and not self.name:
            raise SdStudioError("the prompt template uses [name]; give the embedding's name")

    @property
    def max_resolution(self) -> Size:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

    @property
    def needs_captions(self) -> bool:
        """Whether an image's caption is used: always, unless a template without ``[filewords]`` is set."""
        return not self.template or any("[filewords]" in line for line in self.template)


def load_template(spec: str | os.PathLike) -> tuple[str, ...]:
    """A prompt template: a name in :data:`TEMPLATES`, or a text file with one prompt per line (AUTOMATIC1111's
    ``textual_inversion_templates/*.txt``); blank lines are dropped."""
    if isinstance(spec, str) and spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    try:
        lines = tuple(line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    except FileNotFoundError:
        raise SdStudioError(
            f"{spec}: no such template file (built-in templates: {', '.join(TEMPLATES)})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SdStudioError(f"{path}: cannot read the template ({e})") from None
    lines = tuple(line for line in lines if line)
    if not lines:
        raise SdStudioError(f"{path}: the template has no prompts; write one prompt per line")
    return lines


# ------------------------------------------------------------------------------------------------ buckets


@dataclass(frozen=True)
class Placement:
    """Where an image goes: scaled to ``resized`` (covering ``bucket``), then cropped to ``bucket``."""

    bucket: Size
    resized: Size


def bucket_resolutions(
    resolution: int | Size = 512, min_size: int = 256, max_size: int = 1024, step: int = 64
) -> tuple[Size, ...]:
    """kohya's bucket list (``model_util.make_bucket_resolutions``), sorted: the largest square of area at
    most ``w * h`` in multiples of ``step``; then for each width from ``min_size`` to ``max_size`` the tallest
    height (a multiple of ``step``, at most ``max_size``) within that area, and its transpose, kept when
    the height is at least ``min_size``."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    max_area = width * height
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (max_area // w) // step * step)
        if h >= min_size:
            resos.update({(w, h), (h, w)})
    return tuple(sorted(resos))


def fit_to_bucket(size: Size, bucket: Size) -> Size:
    """The size ``size`` scales to so that it covers ``bucket`` exactly along one side (kohya's
    ``select_bucket``: rounded half up)."""
    w, h = size
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    return int(w * scale + 0.5), int(h * scale + 0.5)


def select_bucket(size: Size, resolutions: Sequence[Size]) -> Placement:
    """The bucket of ``resolutions`` for an image: its own size if that is a bucket, else the one of nearest
    aspect ratio (the first in order on a tie, as numpy's ``argmin``)."""
    if tuple(size) in resolutions:
        return Placement(tuple(size), tuple(size))
    aspect = size[0] / size[1]
    bucket = min(resolutions, key=lambda r: abs(r[0] / r[1] - aspect))
    return Placement(bucket, fit_to_bucket(size, bucket))


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def select_bucket_no_upscale(size: Size, max_area: int, step: int) -> Placement | None:
    """kohya's ``--bucket_no_upscale``: shrink to ``max_area`` only when larger (the side whose rounding keeps
    the aspect ratio better decides), then crop each side down to a multiple of ``step``. None when a side
    would be cropped to nothing."""
    w, h = size
    resized = (w, h)
    if w * h > max_area:
        aspect = w / h
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = _round_to_step(rw, step)
        bh_of_bw = _round_to_step(bw / aspect, step)
        bh = _round_to_step(rh, step)
        bw_of_bh = _round_to_step(bh * aspect, step)
        err_w = abs(bw / bh_of_bw - aspect) if bh_of_bw else math.inf
        err_h = abs(bw_of_bh / bh - aspect) if bh else math.inf
        if err_w < err_h:
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        return None
    return Placement(bucket, resized)


def assign_buckets(sizes: Sequence[Size], config: DatasetConfig) -> list[Placement | None]:
    """Each image's bucket and scaled size under ``config`` (None: too small for the bucket step)."""
    width, height = config.max_resolution
    if not config.buckets:
        return [select_bucket(s, ((width, height),)) for s in sizes]
    if config.bucket_no_upscale:
        return [select_bucket_no_upscale(s, width * height, config.bucket_step) for s in sizes]
    resolutions = bucket_resolutions(
        (width, height), config.bucket_min, config.bucket_max, config.bucket_step
    )
    return [select_bucket(s, resolutions) for s in sizes]


# ------------------------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class DatasetItem:
    """One usable image. ``captions`` holds alternatives (a metadata list), usually one."""

    path: Path
    name: str  # path relative to the dataset folder, as warnings and logs name it
    captions: tuple[str, ...]
    caption_source: CaptionSource
    repeats: int
    size: Size  # after EXIF orientation
    sha256: str  # of the file's bytes: the latent cache's key
    bucket: Size
    resized: Size


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class Dataset:
    root: Path
    config: DatasetConfig
    items: tuple[DatasetItem, ...]
    skipped: tuple[Skipped, ...]  # images (and folders, metadata rows) left out, and why

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(str(s) for s in self.skipped)

    @property
    def num_samples(self) -> int:
        """Images per epoch, repeats counted."""
        return sum(item.repeats for item in self.items)

    def bucket_counts(self) -> dict[Size, int]:
        """Samples per epoch in each bucket, repeats counted, in bucket order."""
        counts: dict[Size, int] = {}
        for item in sorted(self.items, key=lambda i: i.bucket):
            counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
        return counts


@dataclass(frozen=True)
class _Source:
    """A folder whose images are read: the dataset folder, or one of its ``N_name`` folders."""

    folder: Path
    repeats: int
    class_tokens: str  # "" when none


@dataclass(frozen=True)
class _Probe:
    size: Size
    sha256: str


def filename_words(stem: str, regex: str = "", join: str = " ") -> str:
    """AUTOMATIC1111's caption from a file name: leading digits and dashes (``00012-``) dropped, then, with
    a ``regex``, only the words it finds, joined by ``join``."""
    text = _NUMBERS_AT_START.sub("", stem)
    if regex:
        text = join.join(re.findall(regex, text))
    return text


def _sources(root: Path, config: DatasetConfig, listed: set[str], skipped: list[Skipped]) -> list[_Source]:
    """The dataset folder, then its ``N_name`` folders; other folders with images are reported unless the
    dataset folder's metadata (``listed``) names files in them."""
    sources = [_Source(root, config.repeats, "")]
    referenced = {name.split("/", 1)[0] for name in listed if "/" in name}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) >= 1:
            sources.append(_Source(sub, int(match.group(1)), match.group(2).strip()))
        elif match:
            skipped.append(Skipped(f"{sub.name}/", "0 repeats: the folder is left out"))
        elif sub.name not in referenced and any(_is_image(p) for p in sub.iterdir() if p.is_file()):
            skipped.append(
                Skipped(f"{sub.name}/", "folder left out: name it N_name to train on it N times per epoch")
            )
    return sources


def _read_metadata(folder: Path, column: str, root: Path) -> tuple[dict[str, tuple[str, ...]], list[Skipped]]:
    """diffusers ImageFolder metadata: ``{file_name: captions}`` (posix paths relative to ``folder``) and
    the problems found, named relative to ``root``."""
    rows: dict[str, tuple[str, ...]] = {}
    problems: list[Skipped] = []
    for meta in METADATA_FILES:
        path = folder / meta
        if not path.is_file():
            continue
        where = _rel(path, root)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Skipped(where, f"cannot read it ({e}); its captions are not used"))
            continue
        records: list[tuple[int, object]] = []
        if meta.endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(
                        Skipped(f"{where} line {number}", f"not JSON ({e.msg}); the row is left out")
                    )
        else:
            records = [(number, row) for number, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
        for number, record in records:
            name = record.get("file_name") if isinstance(record, dict) else None
            if not isinstance(name, str) or not name:
                problems.append(Skipped(f"{where} line {number}", "no file_name; the row is left out"))
                continue
            value = record.get(column)
            captions = (value,) if isinstance(value, str) else value if isinstance(value, list) else ()
            captions = tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())
            rows[Path(name).as_posix()] = captions
    return rows, problems


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _orientation(im: Image.Image, loaded: bool) -> int:
    """The EXIF orientation tag. A PNG's ``getexif`` decodes the whole image to find an eXIf chunk after the
    pixels, so an unverified scan only reads one that comes before them."""
    if loaded or im.format != "PNG":
        return int(im.getexif().get(0x0112, 1))
    exif = Image.Exif()
    if "exif" in im.info:
        exif.load(im.info["exif"])
    return int(exif.get(0x0112, 1))


def _probe(path: Path, verify: bool) -> _Probe | str:
    """The image's size (after EXIF orientation) and content hash, or why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read the file ({e.strerror or e})"
    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if verify:
                im.load()
            size = im.size
            if _orientation(im, verify) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
                size = (size[1], size[0])
    except UnidentifiedImageError:
        return "not an image Pillow can read (corrupt, or not the format its extension says)"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return f"corrupt or truncated image ({e})"
    except Exception as e:  # Pillow's decoders raise assorted types (struct.error, IndexError) on bad data
        log.debug("%s: Pillow failed", path, exc_info=True)
        return f"corrupt image ({type(e).__name__}: {e})"
    if size[0] <= 0 or size[1] <= 0:
        return f"zero-size image ({size[0]}x{size[1]})"
    return _Probe(size, hashlib.sha256(data).hexdigest())


def _caption_file(image: Path, extensions: Sequence[str]) -> tuple[Path | None, str | None]:
    """The first existing caption file and its caption (the first non-blank line, as kohya reads it);
    the caption is None when the file is blank; raises UnicodeDecodeError / OSError when unreadable."""
    for ext in extensions:
        path = image.with_suffix(ext)
        if path.is_file():
            lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
            return path, next((line for line in lines if line), None)
    return None, None


def _captions(
    image: Path, source: _Source, metadata: Mapping[str, tuple[str, ...]], config: DatasetConfig
) -> tuple[tuple[str, ...], CaptionSource] | str:
    """(captions, where from), or why the image is skipped: metadata, caption file, repeat folder name,
    then ``missing_caption``."""
    listed = metadata.get(image.relative_to(source.folder).as_posix())
    if listed:
        return listed, "metadata"
    try:
        path, caption = _caption_file(image, config.caption_extensions)
    except UnicodeDecodeError:
        return "its caption file is not UTF-8 text; save it as UTF-8"
    except OSError as e:
        return f"cannot read its caption file ({e.strerror or e})"
    if caption is not None:
        return (caption,), "file"
    if source.class_tokens:
        return (source.class_tokens,), "folder"
    if config.missing_caption == "filename":
        return (filename_words(image.stem, config.filename_regex, config.filename_join),), "filename"
    if config.missing_caption == "empty" or not config.needs_captions:
        return ("",), "none"
    if path is not None:
        return f"its caption file {path.name} is empty"
    looked = ", ".join(image.stem + ext for ext in config.caption_extensions)
    return f"no caption (looked for {looked}); add one, or set missing captions to empty or filename"


def _candidates(
    source: _Source, metadata: Mapping[str, tuple[str, ...]], root: Path
) -> tuple[list[Path], list[Skipped]]:
    """The files a source offers: those in its folder, and those its metadata names anywhere below it."""
    files = {p for p in source.folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    problems = []
    for name in metadata:
        path = source.folder / name
        if not path.resolve().is_relative_to(source.folder.resolve()):
            problems.append(Skipped(name, "metadata names a file outside the dataset folder; left out"))
        elif not path.is_file():
            problems.append(Skipped(_rel(path, root), "listed in the metadata but no such file"))
        else:
            files.add(path)
    return sorted(files), problems


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _unsupported(path: Path, config: DatasetConfig) -> str | None:
    """Why a non-image file is reported (an image format we do not read), or None to pass over it quietly."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS or ext in config.caption_extensions:
        return None
    if ext in _OTHER_IMAGE_EXTENSIONS or ext in Image.registered_extensions():
        return f"unsupported image format {ext}; convert it to PNG, JPEG, WebP or BMP"
    return None


def _scan_file(
    file: Path, source: _Source, metadata: Mapping[str, tuple[str, ...]], config: DatasetConfig
) -> tuple[_Probe, tuple[str, ...], CaptionSource] | str | None:
    """An image's probe and captions, why it is left out, or None for a file passed over quietly."""
    if not _is_image(file):
        return _unsupported(file, config)
    probe = _probe(file, config.verify)
    if isinstance(probe, str):
        return probe
    captions = _captions(file, source, metadata, config)
    if isinstance(captions, str):
        return captions
    return probe, captions[0], captions[1]


def scan_dataset(path: str | os.PathLike, config: DatasetConfig = DatasetConfig()) -> Dataset:
    """Read a dataset folder: its images, captions, repeats and buckets, and what was left out and why.

    Never stops at a bad file: corrupt, truncated or empty images, images without a caption (when one is
    needed), unsupported formats and bad metadata rows are logged and listed in ``Dataset.skipped`` by
    name. Raises ``SdStudioError`` only when the folder is missing or nothing usable is found.
    """
    root = Path(path)
    if not root.is_dir():
        raise SdStudioError(f"{root}: no such dataset folder")
    skipped: list[Skipped] = []
    found: list[tuple[Path, str, int, _Probe, tuple[str, ...], CaptionSource]] = []
    seen: set[Path] = set()  # an image the dataset folder's metadata names inside an N_name folder too
    listed, _ = _read_metadata(root, config.caption_column, root)
    for source in _sources(root, config, set(listed), skipped):
        metadata, problems = _read_metadata(source.folder, config.caption_column, root)
        files, missing = _candidates(source, metadata, root)
        skipped += problems + missing
        for file in (f for f in files if f not in seen):
            seen.add(file)
            result = _scan_file(file, source, metadata, config)
            if isinstance(result, str):
                skipped.append(Skipped(_rel(file, root), result))
            elif result is not None:
                found.append((file, _rel(file, root), source.repeats, *result))
    items = []
    for (file, name, repeats, probe, captions, origin), placement in zip(
        found, assign_buckets([f[3].size for f in found], config)
    ):
        if placement is None:
            w, h = probe.size
            skipped.append(Skipped(name, f"too small ({w}x{h}) for {config.bucket_step}-pixel buckets"))
            continue
        items.append(
            DatasetItem(
                file,
                name,
                captions,
                origin,
                repeats,
                probe.size,
                probe.sha256,
                placement.bucket,
                placement.resized,
            )
        )
    for s in skipped:
        log.warning("dataset %s: skipped %s", root, s)
    if not items:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise SdStudioError(f"{root}: no usable images ({len(skipped)} files left out{first})")
    items.sort(key=lambda i: i.name)
    dataset = Dataset(root, config, tuple(items), tuple(skipped))
    log.info(
        "dataset %s: %d images, %d samples per epoch in %d buckets, %d files left out",
        root, len(items), dataset.num_samples, len(dataset.bucket_counts()), len(skipped),
    )  # fmt: skip
    return dataset


# ------------------------------------------------------------------------------------------------ sampling


def sample_rng(seed: int, epoch: int, *where: int) -> random.Random:
    """A generator for one draw site: ``sample_rng(seed, epoch)`` orders an epoch's batches,
    ``sample_rng(seed, epoch, batch, slot)`` draws one sample's crop, flip and caption. Seeding ``Random``
    with a string hashes it with SHA-512, so the stream is the same on every machine and Python run."""
    return random.Random(":".join(str(x) for x in ("sdstudio-dataset", seed, epoch, *where)))


@dataclass(frozen=True)
class Batch:
    bucket: Size
    items: tuple[int, ...]  # indices into Dataset.items; an image with repeats may appear more than once


def batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """One epoch of batches, each of one bucket (kohya's ``BucketManager``): every item ``repeats`` times in
    its bucket, each bucket shuffled and cut into batches (the last one may be short), then the batches
    shuffled. The same seed and epoch give the same list."""
    if batch_size < 1:
        raise SdStudioError(f"batch size {batch_size}: must be at least 1")
    rng = sample_rng(seed, epoch)
    by_bucket: dict[Size, list[int]] = {}
    for index, item in enumerate(dataset.items):
        by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
    out = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        out += [Batch(bucket, tuple(indices[i : i + batch_size])) for i in range(0, len(indices), batch_size)]
    rng.shuffle(out)
    return out


def process_tags(caption: str, rng: random.Random, config: DatasetConfig) -> str:
    """kohya's ``shuffle_caption`` / ``caption_tag_dropout_rate`` over comma-separated tags: the first
    ``keep_tokens`` tags stay in place and are never dropped; the rest are shuffled, then each dropped with
    ``tag_dropout_rate``. The tags are joined by ", ". Unchanged when neither is on."""
    if not (config.shuffle_tags or config.tag_dropout_rate > 0):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, flex = tags[: config.keep_tokens], tags[config.keep_tokens :]
    if config.shuffle_tags:
        rng.shuffle(flex)
    if config.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= config.tag_dropout_rate]
    return ", ".join(fixed + flex)


def caption_for(item: DatasetItem, rng: random.Random, config: DatasetConfig) -> str:
    """The caption one sample trains on. Draws, in this order: caption dropout (kohya: the whole caption
    becomes "", template included), one of several captions, tag shuffle and dropout, the template line
    (AUTOMATIC1111's ``create_text``: ``[filewords]`` -> the caption, ``[name]`` -> ``config.name``)."""
    if config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate:
        return ""
    caption = item.captions[0] if len(item.captions) == 1 else rng.choice(item.captions)
    caption = process_tags(caption, rng, config)
    if not config.template:
        return caption
    line = rng.choice(config.template)
    return line.replace("[filewords]", caption).replace("[name]", config.name)


@dataclass(frozen=True)
class View:
    """How one sample is cut from its image: scaled to ``resized``, cropped at ``crop`` (left, top) to
    ``bucket``, then mirrored if ``flip``. Pixel sizes are (width, height)."""

    bucket: Size
    resized: Size
    crop: tuple[int, int]
    flip: bool


def choose_view(item: DatasetItem, rng: random.Random, config: DatasetConfig) -> View:
    """The crop and flip for one sample, without reading the image (so a cached latent needs no decode).
    As kohya's ``trim_and_resize_if_required``: the excess width, then height, is trimmed in the middle
    (``excess // 2``) or, for a random crop, at ``randint(0, excess)``; then a flip with probability 1/2."""
    offsets = []
    for resized, bucket in zip(item.resized, item.bucket):
        excess = resized - bucket
        offsets.append(
            0 if excess <= 0 else rng.randint(0, excess) if config.crop == "random" else excess // 2
        )
    flip = config.flip and rng.random() < 0.5
    return View(item.bucket, item.resized, (offsets[0], offsets[1]), flip)


def render_view(item: DatasetItem, view: View) -> Tensor:
    """The sample's pixels: the image (EXIF orientation applied, transparency over white) scaled with
    Lanczos to ``view.resized``, cropped, maybe mirrored; mapped to [-1, 1] as ``io.images.from_pil``.
    Raises ``SdStudioError`` if the file changed since it was scanned (its latents would be cached under
    the old content). [3, H, W] float32"""
    try:
        data = item.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise SdStudioError(f"{item.path}: changed since the dataset was scanned; start the run again")
        with Image.open(io.BytesIO(data)) as im:
            image = flatten(ImageOps.exif_transpose(im))
    except SdStudioError:
        raise
    except Exception as e:  # it decoded while scanning: whatever fails now is a changed or vanished file
        log.debug("%s: reading failed", item.path, exc_info=True)
        raise SdStudioError(
            f"{item.path}: cannot read the image any more ({type(e).__name__}: {e})"
        ) from None
    return from_pil(cut_to_view(image, view))[0]


def cut_to_view(image: Image.Image, view: View) -> Image.Image:
    """``image`` as ``view`` cuts a sample: scaled with Lanczos to ``view.resized``, cropped to the bucket,
    maybe mirrored."""
    if image.size != view.resized:
        image = image.resize(view.resized, Image.LANCZOS)
    left, top = view.crop
    image = image.crop((left, top, left + view.bucket[0], top + view.bucket[1]))
    return ImageOps.mirror(image) if view.flip else image


def load_sample(item: DatasetItem, rng: random.Random, config: DatasetConfig) -> tuple[Tensor, View]:
    """:func:`choose_view` then :func:`render_view`: the pixels [3, H, W] and how they were cut."""
    view = choose_view(item, rng, config)
    return render_view(item, view), view


# ------------------------------------------------------------------------------------------------ latents


CACHE_FORMAT = "sdstudio-latents-1"  # bump when the pixels a View renders to change (resampling, flatten)


def vae_hash(vae: nn.Module) -> str:
    """SHA-256 of a VAE's weights (names, dtypes, shapes, bytes): the latent cache's notion of "same VAE"."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class LatentCache:
    """VAE posteriors (mean and log-variance, unscaled, float32) on disk, one safetensors file per (VAE, image
    content, bucket, scaled size, crop, flip), under ``folder / <vae hash>``. Files are written atomically;
    one that cannot be read or does not match its key is reported, encoded again and rewritten.

    ``hits``, ``misses`` and ``damaged`` count what :meth:`latents` found, for logs and tests."""

    def __init__(self, folder: str | os.PathLike, vae_hash: str) -> None:
        self.vae_hash = vae_hash
        safe = re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", vae_hash) and not vae_hash.startswith(".")
        self.folder = Path(folder) / (
            vae_hash if safe else hashlib.sha256(vae_hash.encode()).hexdigest()[:32]
        )
        self.hits = self.misses = self.damaged = 0

    def _fields(self, sha256: str, view: View) -> str:
        return json.dumps(
            {"format": CACHE_FORMAT, "vae": self.vae_hash, "image": sha256, "bucket": view.bucket,
             "resized": view.resized, "crop": view.crop, "flip": view.flip},
            sort_keys=True,
        )  # fmt: skip

    def path(self, sha256: str, view: View) -> Path:
        key = hashlib.sha256(self._fields(sha256, view).encode()).hexdigest()[:40]
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, sha256: str, view: View, downsample: int) -> LatentDistribution | None:
        """The cached posterior [1, C, h, w], or None when absent or damaged (then reported)."""
        path = self.path(sha256, view)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                key = (f.metadata() or {}).get("key")
                mean, logvar = f.get_tensor("mean"), f.get_tensor("logvar")
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            self._damaged(path, f"unreadable ({e})")
            return None
        if key != self._fields(sha256, view):
            self._damaged(path, "written for another image or VAE")
            return None
        shape = (view.bucket[1] // downsample, view.bucket[0] // downsample)
        if mean.shape != logvar.shape or mean.ndim != 4 or tuple(mean.shape[-2:]) != shape:
            self._damaged(
                path, f"latents of shape {tuple(mean.shape)}, expected [1, C, {shape[0]}, {shape[1]}]"
            )
            return None
        if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
            self._damaged(path, "holds NaN or inf")
            return None
        return LatentDistribution(mean=mean, logvar=logvar)

    def _damaged(self, path: Path, why: str) -> None:
        self.damaged += 1
        log.warning("latent cache %s: %s; encoding again", path, why)

    def store(self, sha256: str, view: View, posterior: LatentDistribution) -> Path:
        tensors = {
            "mean": posterior.mean.float().cpu().contiguous(),
            "logvar": posterior.logvar.float().cpu().contiguous(),
        }
        metadata = {"key": self._fields(sha256, view)}
        return atomic_write(self.path(sha256, view), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @torch.no_grad()
    def latents(
        self,
        items: Sequence[DatasetItem],
        views: Sequence[View],
        vae: AutoencoderKL,
        render: Callable[[DatasetItem, View], Tensor] = render_view,
    ) -> LatentDistribution:
        """The posteriors of a batch of samples (all of one bucket), from the cache where present; the others
        rendered, encoded in one VAE call, and stored. [B, C, h, w] float32 on the CPU"""
        f = vae.config.downsample
        found = [self.load(item.sha256, view, f) for item, view in zip(items, views)]
        missing = [i for i, post in enumerate(found) if post is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        if missing:
            weight = vae.quant_conv.weight
            pixels = torch.stack([render(items[i], views[i]) for i in missing])
            encoded = vae.encode(pixels.to(device=weight.device, dtype=weight.dtype))
            for j, i in enumerate(missing):
                post = LatentDistribution(
                    mean=encoded.mean[j : j + 1].float().cpu(), logvar=encoded.logvar[j : j + 1].float().cpu()
                )
                self.store(items[i].sha256, views[i], post)
                found[i] = post
        posteriors = [p for p in found if p is not None]
        return LatentDistribution(
            mean=torch.cat([p.mean for p in posteriors]), logvar=torch.cat([p.logvar for p in posteriors])
        )
