"""Token merging (ToMe) for the UNet's self-attention: Bolya & Hoffman 2023, "Token Merging for Fast
Stable Diffusion", the method of the ``tomesd`` package that AUTOMATIC1111's "Token merging ratio" uses.

Before a full-resolution transformer block's self-attention, the tokens are split into destinations
(the top-left token of each 2x2 cell of the feature map, as AUTOMATIC1111 runs tomesd: ``use_rand=False``,
which keeps every step and sampler deterministic) and sources; the
``ratio * tokens`` sources most similar (cosine) to some destination are averaged into it. Self-attention
runs on the fewer tokens; afterwards each merged source takes its destination's output back. At ratio
0.5 the full-resolution self-attention sees half the tokens, a quarter of the scores. Not exact: the
image changes (``benchmarks/tome.py`` measures by how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_RATIO", "MergePlan", "TokenMerging", "merge", "plan_merge", "unmerge"]

MAX_RATIO = 0.75  # every source merged: 3 of each 4 tokens


@dataclass(frozen=True)
class TokenMerging:
    """Merge ``ratio`` of the tokens of the maps of ``tokens`` tokens (the UNet's full resolution, as
    tomesd's default ``max_downsample=1``)."""

    ratio: float
    tokens: int


@dataclass(frozen=True)
class MergePlan:
    src_pos: Tensor  # [sources] positions of the source tokens in the map
    dst_pos: Tensor  # [destinations]
    kept: Tensor  # [batch, sources - r] sources left as they are (indices into the sources)
    merged: Tensor  # [batch, r] sources merged away (indices into the sources)
    into: Tensor  # [batch, r] the destination each merged source joins (indices into the destinations)


def _destinations(height: int, width: int, device: torch.device) -> Tensor:
    """[height * width] bool: the top-left token of each whole 2x2 cell; odd last rows/columns are sources."""
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[0 : height // 2 * 2 : 2, 0 : width // 2 * 2 : 2] = True
    return mask.flatten()


def plan_merge(metric: Tensor, height: int, width: int, settings: TokenMerging) -> MergePlan | None:
    """Which tokens of ``metric`` [batch, height * width, channels] merge where; None if none would."""
    is_dst = _destinations(height, width, metric.device)
    # sources then destinations, each in map order; a stable sort, not nonzero(): no wait for a GPU
    by_kind = is_dst.to(torch.uint8).argsort(stable=True)
    sources = height * width - (height // 2) * (width // 2)
    src_pos, dst_pos = by_kind[:sources], by_kind[sources:]
    r = min(int(metric.shape[1] * settings.ratio), len(src_pos))
    if r <= 0 or len(dst_pos) == 0:
        return None
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    similarity = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # [batch, sources, destinations]
    best, best_dst = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)  # most similar sources first
    merged = order[:, :r]
    return MergePlan(src_pos, dst_pos, order[:, r:], merged, best_dst.gather(1, merged))


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x [batch, n, c], index [batch, k] -> [batch, k, c]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def merge(x: Tensor, plan: MergePlan) -> Tensor:
    """[batch, tokens, c] -> [batch, tokens - r, c]: kept sources, then destinations (mean of what joined)."""
    src, dst = x[:, plan.src_pos], x[:, plan.dst_pos]
    index = plan.into[..., None].expand(-1, -1, x.shape[-1])
    dst = dst.scatter_reduce(1, index, _take(src, plan.merged), reduce="mean", include_self=True)
    return torch.cat([_take(src, plan.kept), dst], dim=1)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """[batch, tokens - r, c] -> [batch, tokens, c]: each merged source gets its destination's value."""
    kept = plan.kept.shape[1]
    dst = y[:, kept:]
    batch, channels = y.shape[0], y.shape[-1]
    src = y.new_empty(batch, len(plan.src_pos), channels)
    src.scatter_(1, plan.kept[..., None].expand(-1, -1, channels), y[:, :kept])
    src.scatter_(1, plan.merged[..., None].expand(-1, -1, channels), _take(dst, plan.into))
    out = y.new_empty(batch, len(plan.src_pos) + len(plan.dst_pos), channels)
    out[:, plan.src_pos] = src
    out[:, plan.dst_pos] = dst
    return out
