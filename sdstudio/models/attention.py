"""Scaled dot-product attention for the UNet and the VAE (the text encoders' causal attention is short
and stays on ``F.scaled_dot_product_attention``).

On GPUs, on CPUs with AMX and for short sequences this is ``F.scaled_dot_product_attention``. On CPUs
without AMX, PyTorch's fused kernel is slow for the long, narrow heads of Stable Diffusion (4096 tokens
of head width 40 at 512x512): in bf16 it runs at about 80 GFLOP/s on this project's 2-core AMD EPYC
(AVX-512 BF16, no AMX), where its softmax, not its matmuls, is the cost. Computing each head in slices of
queries, with the score block small enough to stay in cache, takes one sd15 step's attention at 512x512
from 1.68 s to 0.93 s there (``python benchmarks/levers.py --arch sd15 --latent 64``) and never holds
more than one slice of scores. On a 2-core Xeon with AMX the fused kernel runs its products on the
tiles and is the faster one at every shape measured, by 1.3-3x (4096 x 40, batch 2 x 8 heads: 82 ms
against 170 ms per call; ``python benchmarks/attention_shapes.py``; a whole sd15 step's 32 calls 0.53 s
against 1.07 s), so the slicing is for CPUs without AMX only. The sliced path rounds its scores and
probabilities to bf16 (the fused kernel keeps them in fp32), so its mean error is about one bf16
rounding of the output, as every bf16 matmul of the network adds, and ~3 on peaked softmaxes (logits of
std ~25; ``tests/models/test_attention.py``), where the fused kernel is ~7x more precise. The quality
guard (bf16 against fp32, ``benchmarks/quality_guard.py``) includes it. In fp32 the fused kernel is the faster one (by 10-30 %, measured per call) and is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdstudio.cpu import has_amx

__all__ = ["attention", "prefer_sliced"]

# The sliced path runs for heads of at least this width and queries x keys x head width of at least
# this much work per head: measured per call (bf16, batch 2), it gained 1.8-3.9x at 512 tokens x 40,
# 1024 x 32, 256 x 160 and 4096 x 40; below, the Python loop over heads and the narrow matmuls cost more
# than they save (256 x 32: 0.88x, 1024 x 16: 0.6x).
SLICED_MIN_HEAD_DIM = 32
SLICED_MIN_WORK = 2**23
# Bytes of scores one slice may hold: a little above one core's L2 on the EPYC this was tuned on.
SLICE_BYTES = 2 * 1024 * 1024


def attention(q: Tensor, k: Tensor, v: Tensor, *, sliced: bool | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over ``[batch, heads, tokens, head_dim]`` tensors, no mask.

    ``sliced`` forces (True) or forbids (False) the CPU slicing; by default it is used on CPUs without AMX
    for long sequences in bf16 when no gradient is needed (training keeps the fused kernel and its
    backward).
    """
    if sliced is None:
        sliced = prefer_sliced(q, k, v)
    if not sliced or not _sliceable(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    return _sliced_attention(q, k, v)


def _sliceable(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Same batch and heads everywhere (no broadcasting), and something to attend over."""
    return q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and k.shape[-2] > 0 and q.numel() > 0


def prefer_sliced(q: Tensor, k: Tensor, v: Tensor, *, amx: bool | None = None) -> bool:
    """Not being compiled (a traced Python loop over heads and slices would unroll into thousands of
    nodes; checked first, as dynamo cannot trace the CPU-flags lookup), CPU without AMX (``amx``: this
    machine's by default), bf16, enough work per head (see ``SLICED_MIN_WORK``), no gradient wanted."""
    if torch.compiler.is_compiling():
        return False
    return (
        q.device.type == "cpu"
        and not (has_amx() if amx is None else amx)
        and q.dtype == torch.bfloat16
        and q.shape[-1] >= SLICED_MIN_HEAD_DIM
        and q.shape[-2] * k.shape[-2] * q.shape[-1] >= SLICED_MIN_WORK
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


def _sliced_attention(q: Tensor, k: Tensor, v: Tensor, slice_bytes: int = SLICE_BYTES) -> Tensor:
    *lead, queries, head_dim = q.shape
    keys = k.shape[-2]
    q = q.reshape(-1, queries, head_dim) * head_dim**-0.5  # [batch * heads, queries, head_dim]
    kt = k.reshape(-1, keys, head_dim).transpose(1, 2)  # [batch * heads, head_dim, keys]
    # Values transposed, output computed transposed (v^T p^T): with the head width (40 at sd15's 64x64
    # latents) as the product's rows instead of its columns, the same bf16 products run 3.6 % faster per
    # 4096-token call; the result is the same bit for bit.
    vt = v.reshape(-1, keys, v.shape[-1]).transpose(1, 2).contiguous()  # [batch * heads, v_dim, keys]
    out_t = q.new_empty(q.shape[0], vt.shape[1], queries)  # [batch * heads, v_dim, queries]
    rows = max(16, min(queries, slice_bytes // (keys * q.element_size())))
    for head in range(q.shape[0]):
        for start in range(0, queries, rows):
            scores = torch.mm(q[head, start : start + rows], kt[head])  # [rows, keys]
            torch.mm(vt[head], torch.softmax(scores, dim=-1).t(), out=out_t[head, :, start : start + rows])
    return out_t.transpose(1, 2).reshape(*lead, queries, vt.shape[1])
