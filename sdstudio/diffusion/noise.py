"""Noise drawn on the CPU from per-image seeds, so a seed gives the same image on any device and image i
of a batch equals generating it alone (AUTOMATIC1111's per-image RNG, ``modules/rng.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from the CPU to a GPU through pinned memory, so the copy is queued behind the
    GPU's work instead of waiting for it (a pageable copy would make every sampling step a sync)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """AUTOMATIC1111's variation-seed interpolation, formula and quirks kept so pasted seeds reproduce:
    for one image's noise ``[C, H, W]`` the norms are taken over dim 1 (rows), giving one angle per
    ``(channel, column)``; nearly parallel inputs fall back to ``low * val + high * (1 - val)``.
    ``val`` 0 gives ``low``... except in that fallback, exactly as there."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


class ImageNoise:
    """One CPU generator per image: the first draw is the initial latent noise (mixed with the variation
    seeds' noise when ``subseed_strength > 0``), later draws feed ancestral/SDE samplers (as a
    ``NoiseSampler``: ``(sigma, sigma_next) -> noise``).

    With ``ensd`` (AUTOMATIC1111's "Eta noise seed delta") the later draws come from generators seeded
    ``seed + ensd`` instead of continuing the first draw's generators. One object per sampling pass:
    it holds generator state by design.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        ensd: int = 0,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)  # per image, e.g. [4, h, w]
        self.device = torch.device(device)
        self.seeds = tuple(int(s) for s in seeds)
        self.subseeds = tuple(int(s) for s in subseeds) if subseeds is not None else None
        if self.subseeds is not None and len(self.subseeds) != len(self.seeds):
            raise ValueError(
                f"need one variation seed per image: {len(self.subseeds)} for {len(self.seeds)} seeds"
            )
        self.subseed_strength = float(subseed_strength)
        self.ensd = int(ensd)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.first = True

    def _first(self) -> Tensor:
        xs = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            if self.subseeds is not None and self.subseed_strength != 0:
                sub = torch.Generator("cpu").manual_seed(self.subseeds[i])
                noise = slerp(
                    self.subseed_strength, noise, torch.randn(self.shape, generator=sub, dtype=torch.float32)
                )
            xs.append(noise)
        if self.ensd:
            self.generators = [torch.Generator("cpu").manual_seed(s + self.ensd) for s in self.seeds]
        return torch.stack(xs)

    def draw(self) -> Tensor:
        """[B, *shape] float32 standard normal, one slice per image's generator."""
        if self.first:
            self.first = False
            out = self._first()
        else:
            out = torch.stack(
                [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
            )
        return out.to(self.device)

    def __call__(self, sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        return self.draw()
