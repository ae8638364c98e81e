"""Convolutions and linear layers that hand oneDNN their weights in its own blocked layout, packed once.

On the CPU, PyTorch's bf16 ``conv2d`` and ``linear`` reorder the weight into oneDNN's blocked layout on
every call. Where the weight is large against the activations (the UNet's 1280-channel convs at 8x8 and
16x16 latents, its 2560-wide GEGLU projections) that reorder costs up to a third of the call: a 1280->1280
3x3 conv at 8x8, batch 2, takes 6.8 ms plain and 4.3 ms on a packed weight. These layers keep the packed
weight beside the parameter and reuse it while the parameter is unchanged: one sd15 CFG step at 512x512
goes from 2.38 to 2.25 s (5.5 %; ``python benchmarks/levers.py --arch sd15 --latent 64``), at the cost of
a second copy of the UNet's weights (1.7 GB for sd15 in bf16). The SD VAE decoder gained nothing (its
convs run on large maps), so only the UNet uses these layers.

The parameters stay ordinary ``weight`` / ``bias`` tensors, so checkpoint keys, ``state_dict``, training
and patches applied to the weights are unchanged. The packed copy is used only for inference on the CPU
in bf16 (where oneDNN supports bf16), and is made again when the parameter is replaced or changed in
place (its version counter moves: ``copy_``, ``add_``, ``load_state_dict``; a write through ``.data`` is
not seen). Outputs equal the plain layers' bit for bit (``tests/models/test_prepacked.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Conv2d", "Linear", "packable"]


@functools.cache
def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable(x: Tensor, weight: Tensor) -> bool:
    """Inference on the CPU in bf16 with oneDNN's bf16 kernels, outside ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and not weight.is_inference()  # its version counter, which tells changes apart, is not kept
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled
        and _mkldnn_bf16()
    )


class _Packed:
    """The packed weight and what it was packed from. Not copied, not pickled: a copy packs anew."""

    __slots__ = ("key", "weight")

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.weight: Tensor | None = None

    def get(self, key: tuple[Any, ...], pack: Any) -> Tensor:
        if self.key is None or self.key[0] is not key[0] or self.key[1:] != key[1:]:
            self.weight = None  # free the old copy before making the new one
            self.weight = pack()
            self.key = key
        assert self.weight is not None
        return self.weight

    def __deepcopy__(self, memo: dict[int, Any]) -> _Packed:
        return _Packed()

    def __reduce__(self) -> tuple[type[_Packed], tuple[()]]:
        return (_Packed, ())


def _source(weight: Tensor) -> tuple[Any, ...]:
    # The parameter object (replaced by ``load_state_dict(assign=True)`` or ``.to``), its memory and its
    # version (moved by in-place writes).
    return (weight, weight.data_ptr(), weight._version)


class _KeepsPacked(nn.Module):
    """What both layers share: the cache, and dropping it when the module is converted (``.to``, ``.cuda``,
    ``.half``), so that a model moved to a GPU does not keep a CPU copy of its weights."""

    prepack = True  # set False on an instance to measure it without (``benchmarks/levers.py``)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packed = _Packed()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._packed = _Packed()
        return super()._apply(fn, recurse)


class Linear(_KeepsPacked, nn.Linear):
    """``nn.Linear`` with the same parameters; a packed weight for bf16 inference on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.prepack and packable(x, self.weight)):
            return super().forward(x)
        weight = self._packed.get(
            _source(self.weight), lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        )
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


class Conv2d(_KeepsPacked, nn.Conv2d):
    """``nn.Conv2d`` with the same parameters; a packed weight for bf16 inference on the CPU.

    oneDNN picks the blocked layout for an input shape (packed without one, the layout made the step 35 %
    slower), so the weight is packed again when the input shape changes: once per image size.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (
            self.prepack
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.dim() == 4
            and packable(x, self.weight)
        ):
            return super().forward(x)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        weight = self._packed.get(
            (*_source(self.weight), tuple(x.shape)),
            lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), padding, stride, dilation, self.groups, list(x.shape)
            ),
        )
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, self.bias, padding, stride, dilation, self.groups, "none", [], ""
        )
