"""Merging networks into a model's weights, and putting the exact original weights back.

Patches are data applied to weights in one place (the project style guide; ComfyUI's ``ModelPatcher``),
never wrappers or replaced ``forward`` methods: the model runs its ordinary code on changed weights, so
LoRAs cost nothing per step once merged. Each patched weight becomes ``W0 + sum_i m_i * dW_i``, computed
in float32 from the original ``W0`` and cast once to the weight's dtype (as ComfyUI sums its patches);
the original of each touched tensor is kept, and restoring copies it back: bit-identical, including in
fp16 / bf16 where subtracting the deltas again would not be.

Weights change in place (``copy_``), which keeps every alias valid: the UNet's oneDNN-packed weight
caches (``sdstudio.models.prepacked``) key on the parameter's version counter, which ``copy_`` moves, so
they repack on the next call; CUDA graphs (``sdstudio.models.cuda_graphs``) replay on the same memory and
see the merged values.

Switching from one set of networks to another recomputes each weight from its kept original, so a switch
is one pass over the touched weights, with no restore in between; weights only the old set touched are
restored and their originals dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdstudio.adapters.network import ModuleDelta, Network
from sdstudio.models.loading import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["NetworkUse", "WeightPatcher", "networks_applied"]

# float32 elements per block of rows when merging (4 MiB: stays in a core's L2 / L3 share)
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class NetworkUse:
    """A network with AUTOMATIC1111's two multipliers: ``<lora:name:te>`` / ``<lora:name:te:unet>``."""

    network: Network
    te: float = 1.0
    unet: float = 1.0

    def multiplier(self, part: str) -> float:
        return self.te if part == "te" else self.unet


Uses = Sequence[NetworkUse | tuple[Network, float, float]]


def _uses(uses: Uses) -> tuple[NetworkUse, ...]:
    return tuple(u if isinstance(u, NetworkUse) else NetworkUse(*u) for u in uses)


def _module(model: nn.Module | LoadedModel) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def _writing(param: Tensor) -> contextlib.AbstractContextManager[None]:
    # an inference tensor can only be written inside inference mode; any other under no_grad (which keeps
    # its version counter moving, unlike writes through .data)
    return torch.inference_mode() if param.is_inference() else torch.no_grad()


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """PyTorch's CPU ops on one thread for the body, the thread count restored after.

    Merging is a pass over memory, as fast on one core as on two; but with two threads, while another
    process kept one core busy, OpenMP's threads waited on each other at every one of the ~500 small ops a
    merge runs: an sd15 bf16 switch took 5-9 s instead of 0.46 s (``benchmarks/lora_speed.py`` on the
    2-core Xeon, load ~2). The count is the process's, so other threads' CPU ops run on one thread too
    while a merge runs."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class WeightPatcher:
    """The networks merged into one model's weights, and the originals of the weights they changed.

    ``keep_originals``: keep the copies of the originals after a restore, so that the next merge need not
    copy the weights again (a first merge costs about twice a switch: ``tests/adapters/switch_benchmark.py``),
    at the price of holding them (sd15, kohya's default targets: 0.7 GB in fp16) while no network is merged.
    The patcher assumes it is the only writer of the weights it patches: anything else that changes them
    while it holds their originals is undone by its next merge or restore.

    Not thread-safe: one request at a time per model, as sampling on it is.
    """

    def __init__(self, model: nn.Module | LoadedModel, *, keep_originals: bool = False) -> None:
        self._params = dict(_module(model).named_parameters())
        self._keep = keep_originals
        self._originals: dict[str, Tensor] = {}
        self._merged: set[str] = set()  # keys whose weights differ from their originals now
        self._applied: tuple[NetworkUse, ...] = ()
        self._signature: tuple[tuple[int, float, float], ...] = ()

    @property
    def applied(self) -> tuple[NetworkUse, ...]:
        return self._applied

    @property
    def patched_keys(self) -> frozenset[str]:
        """The parameter keys whose weights are merged now."""
        return frozenset(self._merged)

    def _plan(self, uses: tuple[NetworkUse, ...]) -> dict[str, list[tuple[ModuleDelta, float]]]:
        """Per parameter key, the module deltas to add and their multipliers; zero multipliers cost nothing."""
        plan: dict[str, list[tuple[ModuleDelta, float]]] = {}
        for use in uses:
            for delta in use.network.modules:
                multiplier = use.multiplier(delta.target.part)
                if multiplier == 0:
                    continue
                param = self._params.get(delta.target.key)
                rows = delta.target.rows or (0, 0 if param is None else param.shape[0])
                if param is None or (rows[1] - rows[0], *param.shape[1:]) != delta.target.shape:
                    raise ValueError(
                        f"{use.network.name}: {delta.target.key} {list(delta.target.shape)} is not a weight of "
                        "this model (the network was read for a model of another architecture)"
                    )
                plan.setdefault(delta.target.key, []).append((delta, multiplier))
        return plan

    def apply(self, uses: Uses) -> None:
        """Make the weights ``original + sum of deltas`` of ``uses`` (replacing what was applied before).

        A network given again with the same multipliers costs nothing; ``apply([])`` equals ``restore()``.
        """
        uses = _uses(uses)
        signature = tuple((id(u.network), float(u.te), float(u.unet)) for u in uses)
        if signature == self._signature:
            return
        started = time.perf_counter()
        plan = self._plan(uses)
        try:
            with one_cpu_thread():
                for key in [k for k in self._merged if k not in plan]:
                    self._put_back(key)
                # one float32 block buffer per device, for every weight
                buffers: dict[torch.device, Tensor] = {}
                for key, deltas in plan.items():
                    self._merge(key, deltas, buffers)
        except BaseException:
            self.restore()  # never leave a half-merged model behind
            raise
        self._applied, self._signature = uses, signature
        if uses:
            log.info(
                "merged %s into %d weights in %.2f s",
                ", ".join(f"{u.network.name} (te {u.te:g}, unet {u.unet:g})" for u in uses),
                len(plan),
                time.perf_counter() - started,
            )

    def restore(self) -> None:
        """Every patched weight back to its original bits (the copies are freed unless ``keep_originals``)."""
        with one_cpu_thread():
            for key in list(self._merged):
                self._put_back(key)
        self._applied, self._signature = (), ()

    def _put_back(self, key: str) -> None:
        param = self._params[key]
        original = self._originals[key] if self._keep else self._originals.pop(key)
        with _writing(param):
            param.copy_(original)
        self._merged.discard(key)

    def _merge(
        self, key: str, deltas: list[tuple[ModuleDelta, float]], buffers: dict[torch.device, Tensor]
    ) -> None:
        param = self._params[key]
        original = self._originals.get(key)
        if original is None:
            original = self._originals[key] = param.detach().clone()
        self._merged.add(key)  # before the first write: a failure half-way is restored too
        n = param.shape[0]
        # (first row, stop row) of each delta in the parameter, and the delta ready to add by rows
        pieces = [(d.target.rows or (0, n), d.prepare(m, param.device)) for d, m in deltas]
        # A float32 weight in the standard layout is its own accumulator; any other (fp16 / bf16, or
        # channels-last convolutions) goes through a float32 buffer, one block of rows at a time, so that the
        # block stays in cache between the copy, the additions and the cast back (a float32 copy of the
        # whole weight tripled the time of a switch: page faults and three passes over memory).
        in_place = param.dtype == torch.float32 and param.is_contiguous()
        row = max(1, param[0].numel())
        block = max(1, _BLOCK_ELEMENTS // row)
        flat = buffers.get(param.device)
        if not in_place and (flat is None or flat.numel() < block * row):
            flat = buffers[param.device] = torch.empty(block * row, dtype=torch.float32, device=param.device)
        with _writing(param):
            for start in range(0, n, block):
                stop = min(start + block, n)
                acc = (
                    param[start:stop]
                    if in_place
                    else flat[: (stop - start) * row].view(stop - start, *param.shape[1:])
                )
                acc.copy_(original[start:stop])
                for (first, last), piece in pieces:
                    lo, hi = max(start, first), min(stop, last)
                    if lo < hi:
                        piece.add_rows_(acc[lo - start : hi - start], lo - first, hi - first)
                if not in_place:
                    param[start:stop].copy_(acc)  # in place: the version counter moves, packed caches renew


@contextlib.contextmanager
def networks_applied(model: nn.Module | LoadedModel, uses: Uses) -> Iterator[WeightPatcher]:
    """Run the body with ``uses`` merged into ``model``'s weights; the originals are back afterwards, bit for bit."""
    patcher = WeightPatcher(model)
    patcher.apply(uses)
    try:
        yield patcher
    finally:
        patcher.restore()
