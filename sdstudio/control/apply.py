"""ControlNets over a sampling pass, as AUTOMATIC1111's sd-webui-controlnet extension applies them.

Each unit is one ControlNet with its control image (the "hint", at the pass's pixel size), a weight, a
guidance start / end (shares of the pass's steps) and a control mode:

* "Balanced": every residual times the weight, on prompt and negative rows alike;
* "My prompt is more important": soft injection, residual ``i`` of 13 times ``weight * 0.825 ** (12 - i)``
  (the input blocks' first residuals least, the middle block's most; SDXL's 10 residuals take the first 10
  of those scales, as the extension's ``zip`` does);
* "ControlNet is more important": the soft scales, and the residuals on the prompt's rows only (the
  negative prompt's prediction is made without control, so CFG pushes towards it: "cfg injection").

The residuals of all active units are summed and added to the UNet's skip connections and middle block
(:meth:`sdstudio.models.unet.UNetModel.forward`'s ``control``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from sdstudio.control.preprocess import (
    PREPROCESSORS,
    control_hint,
    preprocess,
    resize_control,
    resize_inpaint_control,
    resolve_preprocessor,
)
from sdstudio.errors import SdStudioError
from sdstudio.types import CONTROL_MODES, ControlModeName, ControlSpec

__all__ = ["CONTROL_MODES", "ControlStack", "ControlUnit", "control_scales", "control_stack", "prepare_controls"]

SOFT_BASE = 0.825  # the extension's soft-injection decay per residual
CONTROL_DOWNSAMPLE = 8  # the hint encoder's stride: control images are 8x the latents' size


def control_scales(weight: float, count: int, mode: ControlModeName) -> list[float]:
    """The factor of each of ``count`` residuals (input blocks first, the middle block's last)."""
    if mode == "Balanced":
        return [weight] * count
    return [weight * SOFT_BASE ** float(12 - i) for i in range(13)][:count]


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet in a pass: ``network(x, hint, timesteps, context, y)`` gives its residuals; ``hint``
    [1, C, H, W] is the control image at the pass's pixel size (values as the network was trained on: [0, 1],
    or -1 where an inpainting ControlNet's mask is)."""

    network: nn.Module
    hint: Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlModeName = "Balanced"
    # the hint encoder's output, made once for the pass (it depends on neither the latents nor the step)
    hint_embedding: Tensor | None = None

    def active(self, progress: float) -> bool:
        """The extension's ``guidance_stopped`` the other way round: ``start <= progress <= end``."""
        return self.start <= progress <= self.end and self.weight != 0.0


@dataclass(frozen=True)
class ControlStack:
    """Every ControlNet of a pass; the guided denoiser asks it for each evaluation's residuals."""

    units: tuple[ControlUnit, ...]

    def residuals(
        self, x: Tensor, t: Tensor, context: Tensor, vector: Tensor | None, *, cond_mask: Tensor, progress: float
    ) -> list[Tensor] | None:
        """The summed residuals for UNet input ``x`` [B, 4, h, w] at ``t`` [B] with ``context`` / ``vector``;
        ``cond_mask`` [B] is 1 on the prompt's rows and 0 on the negative prompt's. None: no unit active."""
        total: list[Tensor] | None = None
        for unit in self.units:
            if not unit.active(progress):
                continue
            if unit.hint_embedding is not None:
                out = unit.network(x, unit.hint, t, context, vector, hint_embedding=unit.hint_embedding)
            else:  # one hint for the whole batch: the network broadcasts it
                out = unit.network(x, unit.hint.to(x.device, x.dtype), t, context, vector)
            scales = control_scales(unit.weight, len(out), unit.mode)
            rows = None
            if unit.mode == "ControlNet is more important":  # the negative prompt's rows get no control
                rows = cond_mask.to(x.device, x.dtype)[:, None, None, None]
            scaled = [r * s if rows is None else r * s * rows for r, s in zip(out, scales)]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
        return total


@dataclass(frozen=True)
class ResolvedControl:
    """A request's ControlNet unit with its network loaded: ``name`` and ``short_hash`` (A1111's old model
    hash, as the extension writes it after the name) for the infotext."""

    spec: ControlSpec
    network: nn.Module
    name: str
    short_hash: str = ""


@dataclass(frozen=True)
class PreparedControl:
    """A unit's control map made once per request, fitted to each pass's size by :func:`control_stack`:
    the preprocessor's output, or for the inpaint preprocessors the source image and mask (they are
    resized together first, then made into the hint, as the extension does)."""

    control: ResolvedControl
    image: Image.Image
    mask: Image.Image | None = None


def preprocessor_params(spec: ControlSpec) -> dict[str, object]:
    """``threshold_a`` / ``threshold_b`` as the preprocessor's own parameters (the extension's two sliders),
    each checked against its range; ``SdStudioError`` for an unknown preprocessor or a bad value."""
    pre = PREPROCESSORS[resolve_preprocessor(spec.preprocessor)]
    given = [spec.threshold_a, spec.threshold_b]
    if any(v is not None for v in given[len(pre.params) :]):
        raise SdStudioError(
            f"ControlNet preprocessor {pre.name!r} takes {pre.describe()}: no threshold "
            f"{'a' if not pre.params else 'b'} (leave it out)"
        )
    # A1111's API sends every threshold as a float: 100.0 for an integer parameter is 100
    params = {
        p.name: int(v) if p.integer and float(v).is_integer() else v
        for p, v in zip(pre.params, given)
        if v is not None
    }
    for p in pre.params:
        if p.name in params:
            p.check(params[p.name], pre.name)
    return params


def prepare_controls(
    controls: Sequence[ResolvedControl], init: Image.Image | None, mask: Image.Image | None
) -> list[PreparedControl]:
    """Each unit's control image run through its preprocessor (its image, else ``init``: img2img's image
    controls itself, as in the extension); an inpaint preprocessor takes the request's ``mask``."""
    prepared = []
    for i, control in enumerate(controls):
        spec = control.spec
        image = spec.image if spec.image is not None else init
        if image is None:
            raise SdStudioError(f"ControlNet {i}: no control image and no init image to use instead")
        image = image.convert("RGB")
        pre = PREPROCESSORS[resolve_preprocessor(spec.preprocessor)]
        if pre.needs_mask:
            if mask is None:
                raise SdStudioError(f"ControlNet {i}: preprocessor {pre.name!r} needs the inpainting mask (--mask)")
            prepared.append(PreparedControl(control, image, mask.convert("L").resize(image.size)))
            continue
        prepared.append(PreparedControl(control, preprocess(pre.name, image, **preprocessor_params(spec)).image))
    return prepared


def control_stack(prepared: Sequence[PreparedControl], width: int, height: int) -> ControlStack | None:
    """The units of a pass at ``width`` x ``height`` pixels (None without any)."""
    if not prepared:
        return None
    units = []
    for item in prepared:
        spec = item.control.spec
        if item.mask is not None:
            image, mask = resize_inpaint_control(item.image, item.mask, width, height, spec.resize_mode)
            hint = preprocess(spec.preprocessor, image, mask=mask).hint
        else:
            hint = control_hint(resize_control(item.image, width, height, spec.resize_mode))
        network = item.control.network
        tensor = hint_tensor(hint)
        embedding = None
        if hasattr(network, "embed_hint"):
            param = next(network.parameters())
            embedding = network.embed_hint(tensor.to(param.device, param.dtype))
        units.append(ControlUnit(network, tensor, spec.weight, spec.start, spec.end, spec.mode, embedding))
    return ControlStack(tuple(units))


def infotext_entries(controls: Sequence[ResolvedControl]) -> list[tuple[str, str]]:
    """The extension's ``ControlNet N: "Module: ..., Model: name [hash], ..."`` entries."""
    entries = []
    for i, control in enumerate(controls):
        spec = control.spec
        model = f"{control.name} [{control.short_hash}]" if control.short_hash else control.name
        fields = [
            ("Module", resolve_preprocessor(spec.preprocessor)), ("Model", model), ("Weight", f"{spec.weight:g}"),
            ("Resize Mode", spec.resize_mode),
        ]  # fmt: skip
        fields += [(f"Threshold {k}", f"{v:g}") for k, v in (("A", spec.threshold_a), ("B", spec.threshold_b)) if v is not None]
        fields += [("Guidance Start", f"{spec.start:g}"), ("Guidance End", f"{spec.end:g}"), ("Control Mode", spec.mode)]
        text = ", ".join(f"{k}: {v}" for k, v in fields)
        entries.append((f"ControlNet {i}", text))  # quoted by the infotext writer, as A1111's quote()
    return entries


def hint_tensor(image: object) -> Tensor:
    """A control image (PIL RGB, or a float array [H, W, C] already in the network's range) as [1, C, H, W]."""
    import numpy as np

    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
