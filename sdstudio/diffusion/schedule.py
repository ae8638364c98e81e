"""The model's training noise schedule, in the sigma parametrisation of k-diffusion.

DDPM (Ho et al. 2020) trains on ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Dividing by
``sqrt(abar_t)`` gives the variance-exploding form ``x = x0 + sigma eps`` with
``sigma_t = sqrt((1 - abar_t) / abar_t)`` (Karras et al. 2022, "Elucidating...", Table 1), in which every
sampler here works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdstudio.models.configs import ScheduleConfig


def scaled_linear_betas(config: ScheduleConfig) -> torch.Tensor:
    """SD's "scaled linear" betas: linear in sqrt(beta), float64. [timesteps]"""
    return (
        torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.timesteps, dtype=torch.float64)
        ** 2
    )


@dataclass(frozen=True)
class DiscreteSchedule:
    """Sigmas of the discrete training timesteps 0..T-1, and conversions between t and sigma."""

    alphas_cumprod: torch.Tensor  # [T] float64
    sigmas: torch.Tensor  # [T] float32, increasing
    log_sigmas: torch.Tensor  # [T] float32

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> DiscreteSchedule:
        alphas_cumprod = torch.cumprod(1.0 - scaled_linear_betas(config), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(alphas_cumprod, sigmas.float(), sigmas.log().float())

    def to(self, device: torch.device | str) -> DiscreteSchedule:
        """The same schedule with its tables on ``device``, so converting a sigma there copies nothing."""
        return DiscreteSchedule(
            self.alphas_cumprod.to(device), self.sigmas.to(device), self.log_sigmas.to(device)
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """The (fractional, or nearest when ``quantize``) timestep of each sigma; float32 like sigma."""
        log_sigma = sigma.float().log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        dists = log_sigma[..., None] - log_sigmas  # [..., T]
        if quantize:
            return dists.abs().argmin(dim=-1).to(sigma.dtype).view(sigma.shape)
        low = dists.ge(0).cumsum(dim=-1).argmax(dim=-1).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.to(sigma.dtype).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep, interpolating log-sigma linearly."""
        t = t.float()
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(0, log_sigmas.shape[0] - 1)
        high = t.ceil().long().clamp(0, log_sigmas.shape[0] - 1)
        w = t - low.float()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
