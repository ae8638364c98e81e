"""Noise drawn on the CPU from per-image seeds, so a seed gives the same image on any device and image i
of a batch equals generating it alone (AUTOMATIC1111's per-image RNG)."""

from __future__ import annotations

import torch
from torch import Tensor


class ImageNoise:
    """One CPU generator per image: the first draw is the initial latent noise, later draws feed
    ancestral/SDE samplers (as a ``NoiseSampler``: ``(sigma, sigma_next) -> noise``)."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.shape = shape  # per image, e.g. [4, h, w]
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def draw(self) -> Tensor:
        """[B, *shape] float32 standard normal, one slice per image's generator."""
        out = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(self.device)

    def __call__(self, sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        return self.draw()
