"""Learned upscalers (ESRGAN, Real-ESRGAN, Real-ESRGAN Compact) and resampling filters, for AUTOMATIC1111's
Extras tab (``sdstudio upscale``) and its hires fix: architectures in :mod:`.arches`, tiled running in
:mod:`.tiling`, files, names and A1111's sizing rules in :mod:`.load`."""

from sdstudio.upscale.load import (
    A1111_NAMES,
    MODEL_SUFFIXES,
    RESAMPLERS,
    ModelUpscaler,
    ResampleUpscaler,
    Upscaler,
    UpscalerRef,
    extras_size,
    find_upscaler,
    load_found,
    load_upscaler,
    read_upscaler_state,
    resolve_upscaler,
    upscaler_library,
    upscaler_names,
)
from sdstudio.upscale.tiling import Tiling

__all__ = [
    "A1111_NAMES",
    "MODEL_SUFFIXES",
    "RESAMPLERS",
    "ModelUpscaler",
    "ResampleUpscaler",
    "Tiling",
    "Upscaler",
    "UpscalerRef",
    "extras_size",
    "find_upscaler",
    "load_found",
    "load_upscaler",
    "read_upscaler_state",
    "resolve_upscaler",
    "upscaler_library",
    "upscaler_names",
]
