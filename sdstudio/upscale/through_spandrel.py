"""Upscaler architectures sdstudio does not implement, run by spandrel where it imports.

sdstudio runs ESRGAN, Real-ESRGAN Compact, SPAN, RealPLKSR, SwinIR, HAT and DAT in its own code (equal to
spandrel's classes; the tests compare them). spandrel, the library ComfyUI and AUTOMATIC1111 load upscalers
with, knows some forty more (Real-CUGAN, OmniSR, ATD, SAFMN, DRCT, ...). Where it is installed and imports,
a file none of ours reads goes to spandrel's ``ModelLoader``: the same detection as ComfyUI's, the model
called through spandrel's descriptor (which pads a tile to the architecture's size requirements and crops
the result). spandrel's package imports torchvision (for two architectures that are not upscalers): without
a working torchvision it does not import, and the refusal says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

__all__ = ["SpandrelConfig", "SpandrelNet", "from_spandrel", "spandrel_unavailable"]

# spandrel's purposes that map an image to an image of the same kind: upscaling or restoring it
_IMAGE_PURPOSES = ("SR", "Restoration")


@dataclass(frozen=True)
class SpandrelConfig:
    """What spandrel detected in a file: its architecture's name, scale and channels."""

    architecture: str
    scale: int
    image_channels: int
    multiple_of: int = 1  # spandrel's size requirement: sides padded to a multiple of this
    supports_half: bool = False
    supports_bfloat16: bool = False
    whole_image: bool = False  # spandrel's ModelTiling.INTERNAL: the model tiles itself

    @property
    def align(self) -> int:  # tiles start on the grid the architecture pads to
        return self.multiple_of

    def supports(self, dtype: torch.dtype) -> bool:
        return (
            dtype == torch.float32
            or (dtype == torch.float16 and self.supports_half)
            or (dtype == torch.bfloat16 and self.supports_bfloat16)
        )

    def describe(self) -> str:
        gray = ", grayscale" if self.image_channels == 1 else ""
        return f"{self.architecture} x{self.scale}{gray} (run by spandrel)"


class SpandrelNet(nn.Module):
    """spandrel's model behind its descriptor's call: ``[B, C, H, W]`` in [0, 1] -> upscaled, padded to the
    architecture's size requirements and cropped back as spandrel does."""

    def __init__(self, descriptor: object) -> None:
        super().__init__()
        self.net = descriptor.model  # type: ignore[attr-defined]  # registered: .to() and .eval() reach it
        self._call = descriptor  # not a Module: spandrel's wrapper around self.net

    def forward(self, x: Tensor) -> Tensor:
        return self._call(x)


def _import_spandrel() -> tuple[object | None, str]:
    try:
        import spandrel

        spandrel.ModelLoader  # noqa: B018  (a stand-in package without the loader is no spandrel)
    except Exception as e:  # noqa: BLE001  ImportError, or torchvision failing to register its operators
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}"[:200]
    return spandrel, ""


def spandrel_unavailable() -> str:
    """Why spandrel cannot run files here ('' when it can)."""
    return _import_spandrel()[1]


def from_spandrel(state: Mapping[str, Tensor]) -> tuple[SpandrelNet, SpandrelConfig] | None:
    """The network spandrel builds for ``state`` (weights loaded, eval mode), or None when spandrel does not
    import or does not know the file. ``SdStudioError`` when spandrel knows it as something other than an
    image-to-image model (an inpainting or face-restoration model)."""
    spandrel, _ = _import_spandrel()
    if spandrel is None:
        return None
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state))  # type: ignore[attr-defined]
    except spandrel.UnsupportedModelError:  # type: ignore[attr-defined]
        return None
    except Exception as e:  # noqa: BLE001  spandrel knew the keys; the file does not fit the architecture
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else repr(e)
        raise SdStudioError(
            f"spandrel knows its keys but could not load it ({type(e).__name__}: {detail[:200]}); "
            "a truncated or modified file?"
        ) from None
    name = descriptor.architecture.name
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in _IMAGE_PURPOSES:
        raise SdStudioError(f"spandrel reads it as {name}, a {descriptor.purpose} model, not an upscaler")
    channels = descriptor.input_channels
    if channels != descriptor.output_channels or channels not in (1, 3):
        raise SdStudioError(
            f"spandrel reads it as {name} with {channels} input and {descriptor.output_channels} output channels;"
            " an upscaler maps RGB or grayscale to the same"
        )
    config = SpandrelConfig(
        architecture=name, scale=int(descriptor.scale), image_channels=channels,
        multiple_of=max(1, int(descriptor.size_requirements.multiple_of)),
        supports_half=bool(descriptor.supports_half), supports_bfloat16=bool(descriptor.supports_bfloat16),
        whole_image=descriptor.tiling == spandrel.ModelTiling.INTERNAL,  # type: ignore[attr-defined]
    )  # fmt: skip
    log.info("spandrel: %s", config.describe())
    return SpandrelNet(descriptor).eval(), config
