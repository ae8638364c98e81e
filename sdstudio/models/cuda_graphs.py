"""Replaying the UNet's kernels from CUDA graphs: one capture per input shape, then one launch per call.

A sd15 UNet forward is about a thousand kernels. On a fast GPU each finishes in microseconds, so launching
them from Python costs as much as running them; a captured graph launches them all at once (the
``torch.cuda.graph`` recipe: warm up on a side stream, capture into static buffers, replay after copying
the inputs in). The UNet must then make no host-device syncs, which ours does not.

Used only for inference on CUDA: with gradients, on other devices, or while another capture is running,
calls go to the UNet itself. A shape whose capture fails (an op that syncs) is run eagerly from then on,
once logged. A graph replays the kernels on the weights' memory as captured: weights changed in place
(a LoRA merged into them) are seen; weights replaced by new tensors (``.to(...)``, ``load_state_dict``
with ``assign``) are noticed at the next call, and every graph is captured again. The graphs keep their
memory until :meth:`reset` or the runner goes. One call at a time: replays share their buffers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MAX_GRAPHS = 16  # distinct input shapes kept; beyond that, new shapes run eagerly


class CudaGraphRunner(nn.Module):
    """Calls ``unet(x, t, context, **options)`` through a CUDA graph captured for those shapes and options.

    Outputs are copies: the graph's own output buffer is overwritten by the next replay.
    """

    def __init__(self, unet: nn.Module, warmups: int = 2) -> None:
        super().__init__()
        self.unet = unet
        self.warmups = warmups
        self._graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Tensor] | None] = {}
        self._pool: Any = None  # one memory pool for every graph: they never run at the same time
        self._weights: tuple[int, ...] = ()  # the addresses the graphs were captured on

    def reset(self) -> None:
        """Forget every graph and free their memory."""
        self._graphs.clear()
        self._pool = None
        self._weights = ()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.unet.parameters(), *self.unet.buffers()))

    @property
    def captured(self) -> int:
        """How many shapes run from a graph."""
        return sum(entry is not None for entry in self._graphs.values())

    def forward(self, x: Tensor, t: Tensor, context: Tensor, **options: Any) -> Tensor:
        if (
            torch.is_grad_enabled()
            or x.device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()
            or torch.compiler.is_compiling()
        ):
            return self.unet(x, t, context, **options)
        inputs = (x, t, context)
        key = (
            tuple((tuple(a.shape), a.stride(), a.dtype) for a in inputs),
            x.device,
            torch.is_inference_mode_enabled(),  # static inputs made in inference mode cannot leave it
            tuple(sorted(options.items())),
        )
        addresses = self._addresses()
        if addresses != self._weights:  # new weight tensors: the graphs read freed memory
            self.reset()
            self._weights = addresses
        with torch.cuda.device(x.device):  # capture and replay on the inputs' GPU, not the current one
            if key not in self._graphs:
                if len(self._graphs) >= MAX_GRAPHS:
                    return self.unet(x, t, context, **options)
                self._graphs[key] = self._capture(inputs, options)
            entry = self._graphs[key]
            if entry is None:
                return self.unet(x, t, context, **options)
            graph, static_inputs, static_output = entry
            for static, value in zip(static_inputs, inputs):
                static.copy_(value)
            graph.replay()
            return static_output.clone()

    def _capture(
        self, inputs: tuple[Tensor, ...], options: dict[str, Any]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Tensor] | None:
        static_inputs = tuple(a.clone() for a in inputs)
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-ups: lazy init, cuDNN/cuBLAS plans, compiled kernels
            for _ in range(self.warmups):
                self.unet(*static_inputs, **options)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.Stream(device=inputs[0].device)  # the default capture stream is cuda:0's
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=capture):
                static_output = self.unet(*static_inputs, **options)
        except RuntimeError as e:
            log.warning("CUDA graph capture failed for shapes %s (%s); running them eagerly",
                        [tuple(a.shape) for a in inputs], str(e).splitlines()[0])  # fmt: skip
            return None
        self._pool = graph.pool()
        return graph, static_inputs, static_output
