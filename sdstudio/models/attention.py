"""Scaled dot-product attention for the UNet, the VAE and the text encoders.

On GPUs and for short sequences this is ``F.scaled_dot_product_attention``. On CPUs, PyTorch's fused
kernel is slow for the long, narrow heads of Stable Diffusion (4096 tokens of head width 40 at 512x512):
in bf16 it runs at about 80 GFLOP/s on this project's 2-core EPYC, where its softmax, not its matmuls,
is the cost. Computing each head in slices of queries, with the score block small enough to stay in
cache, is 2.2-3.9x faster there in bf16 (``python benchmarks/levers.py``) and never holds more than one
slice of scores. In fp32 the fused kernel is the faster one (by 10-30 %) and is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "prefer_sliced"]

# The sliced path runs for heads of at least this width and queries x keys x head width of at least
# this much work per head: there it gains 1.8-3.9x (512 tokens x 40, 1024 x 32, 256 x 160, 4096 x 40);
# below, the Python loop over heads and the narrow matmuls cost more than they save (256 x 32: 0.88x,
# 1024 x 16: 0.6x).
SLICED_MIN_HEAD_DIM = 32
SLICED_MIN_WORK = 2**23
# Bytes of scores one slice may hold: a little above one core's L2 on the EPYC this was tuned on.
SLICE_BYTES = 2 * 1024 * 1024


def attention(q: Tensor, k: Tensor, v: Tensor, *, sliced: bool | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over ``[batch, heads, tokens, head_dim]`` tensors, no mask.

    ``sliced`` forces (True) or forbids (False) the CPU slicing; by default it is used on CPU for long
    sequences in bf16 when no gradient is needed (training keeps the fused kernel and its backward).
    """
    if sliced is None:
        sliced = prefer_sliced(q, k, v)
    if not sliced:
        return F.scaled_dot_product_attention(q, k, v)
    return _sliced_attention(q, k, v)


def prefer_sliced(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """CPU, bf16, enough work per head (see ``SLICED_MIN_WORK``), no gradient wanted, not being compiled
    (a traced Python loop over heads and slices would unroll into thousands of nodes)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.shape[-1] >= SLICED_MIN_HEAD_DIM
        and q.shape[-2] * k.shape[-2] * q.shape[-1] >= SLICED_MIN_WORK
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and not torch.compiler.is_compiling()
    )


def _sliced_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    *lead, queries, head_dim = q.shape
    keys = k.shape[-2]
    q = q.reshape(-1, queries, head_dim) * head_dim**-0.5  # [batch * heads, queries, head_dim]
    kt = k.reshape(-1, keys, head_dim).transpose(1, 2)  # [batch * heads, head_dim, keys]
    v = v.reshape(-1, keys, v.shape[-1])
    out = q.new_empty(q.shape[0], queries, v.shape[-1])
    rows = max(16, min(queries, SLICE_BYTES // (keys * q.element_size())))
    for head in range(q.shape[0]):
        for start in range(0, queries, rows):
            scores = torch.mm(q[head, start : start + rows], kt[head])  # [rows, keys]
            torch.mm(torch.softmax(scores, dim=-1), v[head], out=out[head, start : start + rows])
    return out.reshape(*lead, queries, v.shape[-1])
