"""Convolutions and linear layers that hand oneDNN their weights in its own blocked layout, packed once.

On the CPU, PyTorch's bf16 ``conv2d`` and ``linear`` reorder the weight into oneDNN's blocked layout on
every call. Where the weight is large against the activations (the UNet's 1280-channel convs at 8x8 and
16x16 latents, its 2560-wide GEGLU projections) that reorder costs up to a third of the call: a 1280->1280
3x3 conv at 8x8, batch 2, takes 6.8 ms plain and 4.3 ms on a packed weight. These layers keep the packed
weight beside the parameter and reuse it while the parameter is unchanged: one sd15 CFG step at 512x512
goes from 2.49 to 2.33 s (6.7 %; ``python benchmarks/levers.py --arch sd15 --latent 64``), at the cost of
a second copy of the UNet's weights (1.7 GB for sd15 in bf16). The SD VAE decoder gained nothing (its
convs run on large maps), so only the UNet uses these layers.

The parameters stay ordinary ``weight`` / ``bias`` tensors, so checkpoint keys, ``state_dict``, training
and patches applied to the weights are unchanged. The packed copy is used only for inference on the CPU
in bf16 (where oneDNN supports bf16; convolutions on channels-last inputs only, as the engine runs them),
and is made again when the parameter is replaced or changed in place (its version counter moves:
``copy_``, ``add_``, ``load_state_dict``, optimizer steps; not seen: writes through ``.data`` and fused
optimizers such as ``AdamW(fused=True)``, which leave the version alone). Outputs equal the plain
layers' bit for bit on this project's CPUs (``tests/models/test_prepacked.py``), except
``Linear.gelu_gated``'s, by design: its GELU reads the fp32 accumulator, one bf16 rounding fewer.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv2d", "Linear", "packable"]


@functools.cache
def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable(x: Tensor, layer: nn.Module) -> bool:
    """Inference on the CPU in bf16 with oneDNN's bf16 kernels, outside ``torch.compile``, with no
    gradient wanted for the input or any of the layer's parameters."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    weight = layer.weight
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and not weight.is_inference()  # its version counter, which tells changes apart, is not kept
        and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())))
        and torch.backends.mkldnn.enabled
        and _mkldnn_bf16()
    )


class _Packed:
    """The packed weight and what it was packed from. Not copied, not pickled: a copy packs anew.

    One ``(key, packed)`` tuple, read and published in single assignments, so that threads sharing a layer
    never see a key with another key's weight. The key holds the parameter weakly: a replaced parameter is
    not kept alive by it.
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[tuple[Any, ...], Tensor] | None = None

    @property
    def key(self) -> tuple[Any, ...] | None:
        entry = self.entry
        return None if entry is None else entry[0]

    @property
    def weight(self) -> Tensor | None:
        entry = self.entry
        return None if entry is None else entry[1]

    def get(self, weight: Tensor, extra: tuple[Any, ...], pack: Any) -> Tensor:
        # The parameter object (replaced by ``load_state_dict(assign=True)``), its memory and its version
        # (moved by in-place writes), and what else the layout depends on.
        key = (weakref.ref(weight), weight.data_ptr(), weight._version, *extra)
        entry = self.entry
        if entry is not None and entry[0][0]() is weight and entry[0][1:] == key[1:]:
            return entry[1]
        self.entry = None  # free the old copy before making the new one
        packed = pack()
        self.entry = (key, packed)
        return packed

    def __deepcopy__(self, memo: dict[int, Any]) -> _Packed:
        return _Packed()

    def __reduce__(self) -> tuple[type[_Packed], tuple[()]]:
        return (_Packed, ())


class _KeepsPacked(nn.Module):
    """What both layers share: the cache, and dropping it when the module is converted (``.to``, ``.cuda``,
    ``.half``), so that a model moved to a GPU does not keep a CPU copy of its weights."""

    prepack = True  # set False on an instance to measure it without (``benchmarks/levers.py``)
    _caches: tuple[str, ...] = ("_packed",)  # the layer's ``_Packed`` attributes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drop_packed()

    def _drop_packed(self) -> None:
        for name in self._caches:
            setattr(self, name, _Packed())

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._drop_packed()
        return super()._apply(fn, recurse)


class Linear(_KeepsPacked, nn.Linear):
    """``nn.Linear`` with the same parameters; a packed weight for bf16 inference on the CPU."""

    # ``gelu_gated``'s fusion: set False on an instance to measure it without (``benchmarks/levers.py``)
    fuse_gelu = True
    _caches = ("_packed", "_packed_halves")  # ``gelu_gated`` packs the weight's two halves apart

    def forward(self, x: Tensor) -> Tensor:
        if not (self.prepack and packable(x, self)):
            return super().forward(x)
        weight = self._packed.get(
            self.weight, (), lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        )
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")

    def gelu_gated(self, x: Tensor) -> Tensor:
        """``a * gelu(g)``, where ``a`` and ``g`` are the first and second halves of this layer's output
        features: GEGLU (Shazeer 2020).

        Packed, it runs as two products whose GELU and multiplication are oneDNN post-ops on the fp32
        accumulators: no 2x-wide output is written and read back, no bf16 rounding before the GELU. On a
        2-core Xeon with AMX it makes the sd15 CFG step at 512x512 4.5 % faster (``python
        benchmarks/levers.py --arch sd15 --latent 64``, lever "GEGLU not fused"). Plain otherwise.
        """
        if not (self.fuse_gelu and self.prepack and packable(x, self)):
            a, g = self.forward(x).chunk(2, dim=-1)
            return a * F.gelu(g)

        def pack() -> tuple[Tensor, Tensor]:
            a, g = self.weight.detach().chunk(2)
            return tuple(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) for w in (a, g))

        weight_a, weight_g = self._packed_halves.get(self.weight, (), pack)
        bias_a, bias_g = (None, None) if self.bias is None else self.bias.chunk(2)
        gate = torch.ops.mkldnn._linear_pointwise(x, weight_g, bias_g, "gelu", [], "none")  # exact (erf) GELU
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight_a, bias_a, "mul")


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
            # oneDNN's packed convolution returns channels-last whatever it is given: NCHW stays plain
            and x.is_contiguous(memory_format=torch.channels_last)
            and packable(x, self)
        ):
            return super().forward(x)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        weight = self._packed.get(
            self.weight,
            (tuple(x.shape),),
            lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), padding, stride, dilation, self.groups, list(x.shape)
            ),
        )
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, self.bias, padding, stride, dilation, self.groups, "none", [], ""
        )
