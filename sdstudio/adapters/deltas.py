"""The weight change each LoRA-family format stores, as pure functions of its factors: tensors in, ``dW`` out.

Every class holds one module's factors as read from a file (any dtype, on the CPU) and the scale the
format prescribes; ``prepare(multiplier, device)`` gives ``multiplier * scale * dW`` as a ``RowDelta``, to
add by blocks of output rows to float32 tensors shaped as the target weight (``[out, in]`` for a linear,
``[out, in, kh, kw]`` for a convolution, or a row block of SD 2's fused ``in_proj_weight``). All products
run in float32 whatever the file's dtype, as AUTOMATIC1111 (``extensions-builtin/Lora/network_*.py``) and
ComfyUI (``comfy/weight_adapter/*.py``) compute them.

Formulas (r = rank; shapes as stored by kohya's sd-scripts and LyCORIS):

* LoRA / LoCon (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): ``down`` [r, in(, kh, kw)],
  ``up`` [out, r(, 1, 1)]; ``dW = up @ down`` with the kernel dimensions of ``down`` kept. LyCORIS' Tucker
  variant adds ``mid`` [r, r, kh, kw] with ``down`` [r, in, 1, 1]:
  ``dW[o, c, k, l] = sum_{n, m} up[o, n] mid[n, m, k, l] down[m, c]``. Scale ``alpha / r``.
* LoHa (Hyeon-Woo et al. 2022, "FedPara"): ``dW = (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product),
  ``w*_a`` [out, r], ``w*_b`` [r, in * kh * kw]; Tucker: ``t*`` [r, r, kh, kw], ``w*_a`` [r, out],
  ``w*_b`` [r, in], each factor ``sum_{i, j} t[i, j, k, l] w_a[i, o] w_b[j, c]``. Scale ``alpha / r``,
  ``r = w1_b.shape[0]``.
* LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
  Evaluation"): ``dW = kron(W1, W2)``, ``W1`` [a, c] (``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``), ``W2``
  [p, q(, kh, kw)] (``lokr_w2``, ``lokr_w2_a @ lokr_w2_b``, or Tucker with ``lokr_t2``); out = a * p,
  in = c * q. Scale ``alpha / r`` with r the first dimension of the factored ``*_b`` matrix (``w2_b``'s if
  both are factored), 1 when neither is factored or there is no alpha (A1111 ``network_lokr.py``,
  ComfyUI ``lokr.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Factors", "LoHa", "LoKr", "LoRA", "RowDelta", "fits"]


def _f32(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``sum_{i, j} core[i, j, k, l] a[i, o] b[j, c]`` -> [o, c, kh, kw]; core [r, r, kh, kw], a [r, o], b [r, c]."""
    return torch.einsum("ijkl,io,jc->ockl", core, a, b)


def fits(natural: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a delta computed as ``natural`` lands on ``target``: the same output rows and element count,
    and the same kernel where both are convolutions with a kernel other than 1x1 (a 1x1 convolution and a
    linear are the same map, so 2-D and 4-D 1x1 shapes fit each other both ways)."""
    if not natural or not target or natural[0] != target[0] or math.prod(natural) != math.prod(target):
        return False
    kernel_a, kernel_b = natural[2:], target[2:]
    if kernel_a and kernel_b and math.prod(kernel_a) > 1 and math.prod(kernel_b) > 1:
        return kernel_a == kernel_b
    return True


class RowDelta:
    """``multiplier * scale * dW`` ready to add, by blocks of output rows (so that a patcher can add it into
    a small float32 buffer that stays in cache, instead of a float32 copy of the whole weight)."""

    rows: int

    def add_rows_(self, acc: Tensor, start: int, stop: int) -> None:
        """``acc += dW[start:stop]``; ``acc`` is contiguous float32, ``stop - start`` rows of the target's shape."""
        raise NotImplementedError


class _LowRankRows(RowDelta):
    def __init__(self, up: Tensor, down: Tensor) -> None:
        self.up, self.down, self.rows = up, down, up.shape[0]  # [out, r] (scaled), [r, in * kh * kw]

    def add_rows_(self, acc: Tensor, start: int, stop: int) -> None:
        acc.view(stop - start, -1).addmm_(self.up[start:stop], self.down)


class _DenseRows(RowDelta):
    def __init__(self, delta: Tensor) -> None:
        self.delta, self.rows = delta, delta.shape[0]  # [out, ...] in its natural shape

    def add_rows_(self, acc: Tensor, start: int, stop: int) -> None:
        acc.view(stop - start, -1).add_(self.delta[start:stop].reshape(stop - start, -1))


@dataclass(frozen=True, eq=False)
class LoRA:
    """kohya LoRA / LoCon, LyCORIS LoCon (optionally Tucker), diffusers / PEFT LoRA."""

    down: Tensor  # [r, in] or [r, in, kh, kw]; Tucker: [r, in, 1, 1]
    up: Tensor  # [out, r] or [out, r, 1, 1]
    mid: Tensor | None  # Tucker core [r, r, kh, kw]
    scale: float

    kind = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def natural_shape(self) -> tuple[int, ...]:
        out, rank = self.up.shape[0], self.up[0].numel()
        if rank != self.down.shape[0] or (self.mid is not None and tuple(self.mid.shape[:2]) != (rank, rank)):
            return ()  # inconsistent factors: fit nothing
        if self.mid is not None:
            return (out, self.down.shape[1], *self.mid.shape[2:])
        return (out, *self.down.shape[1:])

    def prepare(self, multiplier: float, device: torch.device) -> RowDelta:
        coef = multiplier * self.scale
        up = _f32(self.up, device).flatten(1)  # [out, r]
        if self.mid is None:
            # the product is formed per block of rows as it is added: no [out, in] temporary
            return _LowRankRows(up * coef, _f32(self.down, device).flatten(1))  # [out, r], [r, in * kh * kw]
        down = _f32(self.down, device).flatten(1)  # [r, in]
        mid = _f32(self.mid, device)  # [r, r, kh, kw]
        return _DenseRows(torch.einsum("on,nmkl,mc->ockl", up, mid, down) * coef)


@dataclass(frozen=True, eq=False)
class LoHa:
    """LyCORIS LoHa: the Hadamard product of two rank-r products."""

    w1_a: Tensor  # [out, r]; Tucker: [r, out]
    w1_b: Tensor  # [r, in * kh * kw]; Tucker: [r, in]
    w2_a: Tensor
    w2_b: Tensor
    t1: Tensor | None  # Tucker cores [r, r, kh, kw]
    t2: Tensor | None
    scale: float

    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def natural_shape(self) -> tuple[int, ...]:
        if self.t1 is not None and self.t2 is not None:
            return (self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:])
        return (self.w1_a.shape[0], self.w1_b[0].numel())

    def _product(self, device: torch.device) -> Tensor:
        w1_a, w1_b, w2_a, w2_b = (_f32(t, device) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        if self.t1 is not None and self.t2 is not None:
            return _tucker(_f32(self.t1, device), w1_a, w1_b) * _tucker(_f32(self.t2, device), w2_a, w2_b)
        return (w1_a @ w1_b.flatten(1)) * (w2_a @ w2_b.flatten(1))

    def prepare(self, multiplier: float, device: torch.device) -> RowDelta:
        return _DenseRows(self._product(device) * (multiplier * self.scale))


@dataclass(frozen=True, eq=False)
class LoKr:
    """LyCORIS LoKr: the Kronecker product of a small and a (possibly low-rank) large factor."""

    w1: Tensor | None  # [a, c]
    w1_a: Tensor | None  # [a, r]
    w1_b: Tensor | None  # [r, c]
    w2: Tensor | None  # [p, q] or [p, q, kh, kw]
    w2_a: Tensor | None  # [p, r]; Tucker: [r, p]
    w2_b: Tensor | None  # [r, q * kh * kw] or [r, q, kh, kw]; Tucker: [r, q]
    t2: Tensor | None  # Tucker core [r, r, kh, kw]
    scale: float

    kind = "lokr"

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return self.w1.shape[0], self.w1.shape[1]
        assert self.w1_a is not None and self.w1_b is not None
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        assert self.w2_a is not None and self.w2_b is not None
        if self.t2 is not None:
            return (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        return (self.w2_a.shape[0], self.w2_b[0].numel())

    def natural_shape(self) -> tuple[int, ...]:
        (a, c), w2 = self._w1_shape(), self._w2_shape()
        return (a * w2[0], c * w2[1], *w2[2:])

    def _product(self, device: torch.device) -> Tensor:
        if self.w1 is not None:
            w1 = _f32(self.w1, device)
        else:
            assert self.w1_a is not None and self.w1_b is not None
            w1 = _f32(self.w1_a, device) @ _f32(self.w1_b, device)  # [a, c]
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        else:
            assert self.w2_a is not None and self.w2_b is not None
            w2_a, w2_b = _f32(self.w2_a, device), _f32(self.w2_b, device)
            if self.t2 is not None:
                w2 = _tucker(_f32(self.t2, device), w2_a, w2_b)  # [p, q, kh, kw]
            else:
                # a 2-D [p, q * kh * kw] factor: the 2-D kron's columns c * (q * kh * kw) reshape to [c * q, kh, kw]
                w2 = w2_a @ w2_b.flatten(1)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]  # [a, c, 1, 1]: kron then gives [a * p, c * q, kh, kw]
        return torch.kron(
            w1.contiguous(), w2.contiguous()
        )  # kron of an einsum result (a permuted view) fails

    def prepare(self, multiplier: float, device: torch.device) -> RowDelta:
        return _DenseRows(self._product(device) * (multiplier * self.scale))


Factors = LoRA | LoHa | LoKr
