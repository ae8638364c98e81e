"""Upscalers by name or file, and AUTOMATIC1111's two ways of using them.

An upscaler is a learned model file (convolutional: ESRGAN, Real-ESRGAN, Real-ESRGAN Compact in
:mod:`sdstudio.upscale.arches`, SPAN in :mod:`.span`, RealPLKSR in :mod:`.plksr`; transformers: SwinIR in
:mod:`.swinir`, HAT in :mod:`.hat`, DAT in :mod:`.dat`; ``.pth`` read with ``weights_only``, or
``.safetensors``; other architectures through spandrel where it imports, :mod:`.through_spandrel`) or one of
the resampling filters
``Lanczos`` and ``Nearest``. Files are found by stem in ``--upscaler-dir`` folders, as A1111 lists
``models/ESRGAN`` (or given as a path).

How they are used is AUTOMATIC1111's (``modules/upscaler.py`` ``Upscaler.upscale`` and
``modules/images.py`` ``resize_image``):

- :meth:`Upscaler.upscale_by` (the Extras tab): the target is ``int(side * factor)`` rounded down to a
  multiple of 8; the model is applied (up to 3 passes) until the image is at least that large, then
  Lanczos resamples it to exactly the target.
- :meth:`Upscaler.upscale` (the hires fix, img2img resizing): to ``width x height``: ``upscale_by`` with
  the larger of the two ratios when it is above 1, then Lanczos to exactly ``width x height``.

Models see RGB in [0, 1], as they were trained (Real-ESRGAN's ``RealESRGANer``, the original ESRGAN test
script, ComfyUI and chaiNNer feed RGB; A1111's ``upscale_without_tiling`` flips to BGR first, so its
colours differ slightly from these). The output is rounded to 8 bits (A1111 truncates).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sdstudio.adapters.library import NetworkLibrary, NetworkNotFound
from sdstudio.errors import CheckpointError, SdStudioError
from sdstudio.upscale.arches import (
    CompactConfig,
    RRDBConfig,
    RRDBNet,
    SRVGGNetCompact,
    compact_config,
    describe_unknown,
    is_compact,
    is_rrdb,
    rrdb_config,
    rrdb_old_layout,
)
from sdstudio.upscale.dat import DAT, DATConfig, dat_config, dat_layout, is_dat
from sdstudio.upscale.hat import HAT, HATConfig, hat_config, hat_layout, is_hat
from sdstudio.upscale.plksr import RealPLKSR, RealPLKSRConfig, is_realplksr, realplksr_config
from sdstudio.upscale.span import SPAN, SPANConfig, is_span, span_config, span_layout
from sdstudio.upscale.swinir import (
    SwinIR,
    SwinIRConfig,
    WindowRestorer,
    is_swinir,
    swinir_config,
    swinir_layout,
)
from sdstudio.upscale.through_spandrel import SpandrelConfig, from_spandrel, spandrel_unavailable
from sdstudio.upscale.tiling import Progress, Tiling, upscale_tiled

UpscalerConfig = (
    RRDBConfig | CompactConfig | SPANConfig | RealPLKSRConfig | SwinIRConfig | HATConfig | DATConfig | SpandrelConfig
)

log = logging.getLogger(__name__)

__all__ = [
    "A1111_NAMES",
    "DEFAULT_TILING",
    "MAX_PASSES",
    "MODEL_SUFFIXES",
    "RESAMPLERS",
    "ModelUpscaler",
    "ResampleUpscaler",
    "Upscaler",
    "UpscalerRef",
    "build_upscaler_model",
    "extras_size",
    "find_upscaler",
    "load_found",
    "load_upscaler",
    "read_upscaler_state",
    "resolve_upscaler",
    "upscaler_library",
    "upscaler_names",
]

MODEL_SUFFIXES = (".pth", ".safetensors")
RESAMPLERS: dict[str, Image.Resampling] = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
# AUTOMATIC1111's names for Real-ESRGAN's release files (``modules/realesrgan_model.py``), as its infotexts and
# /sdapi/v1/upscalers write them -> the files' stems
A1111_NAMES: dict[str, str] = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    # extensions-builtin/SwinIR: the file its SWINIR_MODEL_URL downloads
    "SwinIR 4x": "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN",
}
MAX_PASSES = 3  # A1111's Upscaler.upscale: a x2 model reaches x4 in two passes, x8 in three
# Training frameworks' wrappers around the weights (BasicSR's params_ema / params, Lightning's state_dict):
# the first one present is the state dict; EMA weights first, as Real-ESRGAN's inference takes them.
_WRAPPERS = ("params_ema", "params-ema", "params", "state_dict", "model", "net", "generator")
_PREFIXES = ("module.", "netG.")  # DataParallel's and old BasicSR's
DEFAULT_TILING = Tiling()  # A1111's ESRGAN_tile 192, ESRGAN_tile_overlap 8


class Upscaler(ABC):
    """Enlarges images: :meth:`step` is one pass (A1111's ``do_upscale``); the rest is shared."""

    name: str

    @abstractmethod
    def step(self, image: Image.Image, factor: float) -> Image.Image:
        """One pass over an RGB image: a model's own factor, a filter's ``factor``."""

    def upscale_by(self, image: Image.Image, factor: float) -> Image.Image:
        """AUTOMATIC1111's Extras "Scale by": ``extras_size(image.size, factor)``, through passes of
        :meth:`step` then Lanczos. ``image`` RGB."""
        width, height = extras_size(image.size, factor)
        if width < 8 or height < 8:
            raise SdStudioError(
                f"{image.width}x{image.height} scaled by {factor:g} is under 8 pixels a side (sides are rounded "
                "down to multiples of 8)"
            )
        for i in range(MAX_PASSES):
            # a factor of 1 still runs a model once: a 1x model restores without enlarging
            if image.width >= width and image.height >= height and (i > 0 or factor != 1):
                break
            before = image.size
            image = self.step(image, factor)
            if image.size == before:
                break
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        return image

    def upscale(self, images: Sequence[Image.Image], width: int, height: int) -> list[Image.Image]:
        """Each image to exactly ``width x height`` (AUTOMATIC1111's ``resize_image`` "just resize" with an
        upscaler, as its hires fix calls it): :meth:`upscale_by` the larger ratio when above 1, then Lanczos."""
        out = []
        for image in images:
            image = image.convert("RGB")
            factor = max(width / image.width, height / image.height)
            if factor > 1:
                image = self.upscale_by(image, factor)
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            out.append(image)
        return out


def extras_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """AUTOMATIC1111's target for "Scale by" ``factor``: each side times ``factor``, rounded down to a
    multiple of 8."""
    return int(size[0] * factor // 8 * 8), int(size[1] * factor // 8 * 8)


class ResampleUpscaler(Upscaler):
    """``Lanczos`` or ``Nearest``: a pass resizes by the factor asked for with that filter."""

    def __init__(self, name: str) -> None:
        if name not in RESAMPLERS:
            raise SdStudioError(f"unknown resampler {name!r}; choose {' or '.join(RESAMPLERS)}")
        self.name = name
        self.filter = RESAMPLERS[name]

    def step(self, image: Image.Image, factor: float) -> Image.Image:
        return image.resize((int(image.width * factor), int(image.height * factor)), self.filter)

    def __repr__(self) -> str:
        return f"ResampleUpscaler({self.name!r})"


class ModelUpscaler(Upscaler):
    """A loaded upscaler model on ``device`` in ``dtype``, run in tiles of ``tiling``."""

    def __init__(
        self, name: str, model: nn.Module, config: UpscalerConfig, *, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32, tiling: Tiling = DEFAULT_TILING, path: Path | None = None,
    ) -> None:  # fmt: skip
        self.name, self.config, self.path, self.tiling = name, config, path, tiling
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)

    @property
    def scale(self) -> int:
        return self.config.scale

    def upscale_tensor(self, x: Tensor, progress: Progress | None = None) -> Tensor:
        """``[1, C, H, W]`` in [0, 1] -> ``[1, C, H * scale, W * scale]`` float32 on the CPU, in tiles."""
        align = self.config.align

        def run(tile: Tensor) -> Tensor:
            return self.model(tile.to(self.device, self.dtype))

        with torch.inference_mode():
            return upscale_tiled(run, x, self.scale, self.tiling, align=align, progress=progress)

    def step(self, image: Image.Image, factor: float = 0) -> Image.Image:
        """One model pass (its own factor; ``factor`` is the caller's target and only logged)."""
        gray = self.config.image_channels == 1
        arr = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255
        x = torch.from_numpy(arr.reshape(*arr.shape[:2], -1)).permute(2, 0, 1)[None]  # [1, C, H, W]
        log.debug("%s: %dx%d pass (x%d toward x%g)", self.name, image.width, image.height, self.scale, factor)
        y = self.upscale_tensor(x)
        out = (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        result = Image.fromarray(out[..., 0] if gray else out, "L" if gray else "RGB")
        return result.convert("RGB")

    def __repr__(self) -> str:
        return f"ModelUpscaler({self.name!r}, {self.config.describe()}, {self.device}, {self.dtype})"


# ------------------------------------------------------------------------------------------------ files


def _unwrap(obj: object) -> object:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_upscaler_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of an upscaler file: ``.safetensors``, or a pickle loaded with ``weights_only`` (nothing in
    it runs), unwrapped from ``params_ema`` / ``params`` / ``state_dict`` and a ``module.`` prefix."""
    from sdstudio.models.loading import (  # the checkpoint loader's safe readers
        _check_state,
        file_head,
        load_pickle,
        looks_like_safetensors,
        read_safetensors,
    )

    path = Path(path)
    if not path.exists():
        raise SdStudioError(f"{path}: no such upscaler file")
    if looks_like_safetensors(path, file_head(path)):
        state, _ = read_safetensors(path)
    else:
        state = _check_state(path, _unwrap(load_pickle(path)))  # the same checks as for checkpoints
    return _strip_prefix(dict(state))


def build_upscaler_model(state: Mapping[str, Tensor]) -> tuple[nn.Module, UpscalerConfig]:
    """The architecture a state dict is for, with its weights loaded (float32, CPU). ``SdStudioError`` (without
    the file's name) when it is none this module knows, or is malformed."""
    model: nn.Module
    config: UpscalerConfig
    if is_rrdb(state):
        state = rrdb_old_layout(state)
        config = rrdb_config(state)
        with torch.device("meta"):
            model = RRDBNet(config)
    elif is_compact(state):
        config = compact_config(state)
        with torch.device("meta"):
            model = SRVGGNetCompact(config)
    elif is_span(state):
        config = span_config(state)
        state = span_layout(state)
        with torch.device("meta"):
            model = SPAN(config)
    elif is_realplksr(state):
        config = realplksr_config(state)
        with torch.device("meta"):
            model = RealPLKSR(config)
    elif is_dat(state):
        config = dat_config(state)
        state = dat_layout(state)
        with torch.device("meta"):
            model = DAT(config)
    elif is_hat(state):  # before SwinIR: a HAT file has SwinIR's block keys too
        config = hat_config(state)
        state = hat_layout(state)
        with torch.device("meta"):
            model = HAT(config)
    elif is_swinir(state):
        config = swinir_config(state)
        state = swinir_layout(state)
        with torch.device("meta"):
            model = SwinIR(config)
    else:
        found = from_spandrel(state)  # the architectures spandrel knows and we do not, where it imports
        if found is not None:
            return found
        why = spandrel_unavailable()
        others = (f"others through spandrel, which does not import here ({why}): pip install spandrel torchvision"
                  if why else "others through spandrel, which does not know this file either")  # fmt: skip
        raise SdStudioError(
            f"not an upscaler sdstudio can run: {describe_unknown(state)}. Supported: ESRGAN (RRDBNet: old "
            "ESRGAN, Real-ESRGAN and BSRGAN layouts), Real-ESRGAN Compact (SRVGGNetCompact), SPAN, RealPLKSR, "
            f"SwinIR, HAT and DAT in sdstudio's own code; {others}"
        )
    model.to_empty(device="cpu")  # no random init: every parameter is read from the file
    if isinstance(model, WindowRestorer):
        model.reset_buffers()  # computed, not read: to_empty left them uninitialised
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch"
        raise SdStudioError(f"its weights do not fit {config.describe()}: {detail[:300]}") from None
    return model.eval(), config


def load_upscaler(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
    tiling: Tiling = DEFAULT_TILING, name: str | None = None,
) -> ModelUpscaler:  # fmt: skip
    """An upscaler model file ready to run: architecture, scale and sizes detected from its weights.

    Every failure is one line naming the file (``CheckpointError`` for unreadable files, ``SdStudioError``
    for unknown architectures)."""
    path = Path(path)
    state = read_upscaler_state(path)
    try:
        model, config = build_upscaler_model(state)
    except SdStudioError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if isinstance(config, SpandrelConfig) and not config.supports(dtype):
        log.warning("%s: %s does not run in %s (spandrel says); float32 instead", path, config.architecture, dtype)
        dtype = torch.float32
    if isinstance(config, SpandrelConfig) and config.whole_image and tiling.size:
        log.info("%s: %s tiles internally (spandrel says): the whole image at once", path, config.architecture)
        tiling = Tiling(size=0, overlap=0)
    log.info("%s: %s", path, config.describe())
    return ModelUpscaler(name or path.stem, model, config, device=device, dtype=dtype, tiling=tiling, path=path)


# ------------------------------------------------------------------------------------------------ names


def upscaler_library(folders: Sequence[str | os.PathLike] = ()) -> NetworkLibrary:
    """The upscaler files (``.pth``, ``.safetensors``) of ``folders``, by stem."""
    return NetworkLibrary(folders, kind="upscaler", flag="--upscaler-dir", suffixes=MODEL_SUFFIXES)


def upscaler_names(library: NetworkLibrary | None = None) -> list[str]:
    """The names of every upscaler there is: the resamplers, then the library's files by stem."""
    return [*RESAMPLERS, *(library.names if library else ())]


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(MODEL_SUFFIXES) or os.sep in text or (os.altsep or os.sep) in text


@dataclass(frozen=True)
class UpscalerRef:
    """An upscaler found by name, not loaded: the name it goes by (in infotexts), and its file (None for a
    resampler)."""

    name: str
    path: Path | None = None


def find_upscaler(name: str, library: NetworkLibrary | None = None) -> UpscalerRef:
    """What ``name`` means: a resampler; a path (anything ending in ``.pth`` / ``.safetensors`` or with a
    folder in it); a file stem in the library; or one of AUTOMATIC1111's names for Real-ESRGAN's files
    (``R-ESRGAN 4x+``: ``RealESRGAN_x4plus``), kept as the name. Nothing is loaded; an unknown name is
    refused listing the closest names."""
    if name in RESAMPLERS:
        return UpscalerRef(name)
    builtin = f"built in: {', '.join(RESAMPLERS)}"
    if _looks_like_path(name):
        path = Path(name)
        if not path.is_file():
            raise SdStudioError(f"{name}: no such upscaler file")
        return UpscalerRef(path.stem, path)
    if library is None:
        raise SdStudioError(
            f"upscaler {name!r} not found: no upscaler folder given (--upscaler-dir DIR); {builtin}"
        )
    stem = A1111_NAMES.get(name, name)
    if stem != name and library.get(name) is None and (found := library.get(stem)) is not None:
        return UpscalerRef(name, found.path)
    try:
        return UpscalerRef(name, library.find(name).path)
    except NetworkNotFound as e:
        also = f" (A1111's name for {stem})" if stem != name else ""
        raise SdStudioError(f"{e}{also}; {builtin}") from None


def load_found(
    ref: UpscalerRef, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
    tiling: Tiling = DEFAULT_TILING,
) -> Upscaler:  # fmt: skip
    """The upscaler ``find_upscaler`` found, loaded (a resampler needs nothing loaded)."""
    if ref.path is None:
        return ResampleUpscaler(ref.name)
    return load_upscaler(ref.path, device, dtype, tiling=tiling, name=ref.name)


def resolve_upscaler(
    name: str, library: NetworkLibrary | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, *, tiling: Tiling = DEFAULT_TILING,
) -> Upscaler:  # fmt: skip
    """``find_upscaler`` then ``load_found``."""
    return load_found(find_upscaler(name, library), device, dtype, tiling=tiling)
