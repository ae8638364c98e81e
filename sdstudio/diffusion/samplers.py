"""Samplers over a denoiser in the variance-exploding sigma parametrisation (k-diffusion's contract).

A sampler is a pure function ``sample_x(model, x, sigmas, *, noise=None, callback=None, **settings)``:

- ``model`` is a :data:`Denoiser` ``(x [B,C,H,W], sigma [B]) -> x0 estimate [B,C,H,W]`` for
  ``x = x0 + sigma * eps`` (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models"). Conditioning, CFG and eps/v adapters are closed over by the caller.
- ``x`` is already at noise level ``sigmas[0]``; ``sigmas`` is 1-D and decreasing, usually ending in 0.
  The result is ``x`` at ``sigmas[-1]``.
- ``noise`` is a :data:`NoiseSampler` ``(sigma, sigma_next) -> standard normal like x``; samplers never
  draw random numbers themselves, so the caller decides the seeds (per image, on the CPU).
- ``callback`` receives one :class:`SamplerStep` per step, after the step's first model evaluation.

Scalar coefficients are computed in Python floats (float64) from ``sigmas.tolist()``, so a sampler
costs one device sync per call rather than one per coefficient.

Samplers are registered under AUTOMATIC1111's names in :data:`SAMPLERS`; :func:`resolve_sampler`
also accepts the legacy combined names such as ``"DPM++ 2M Karras"``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdstudio.diffusion.noise import to_device
from sdstudio.errors import SdStudioError

logger = logging.getLogger(__name__)

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``(x [B,C,H,W], sigma [B]) -> denoised x0 estimate [B,C,H,W]``."""

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
"""``(sigma, sigma_next) -> standard normal tensor shaped like x`` (0-d sigma tensors)."""


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler reports once per step: ``x`` at noise level ``sigma`` and its x0 estimate."""

    i: int  # step index, 0 .. total - 1
    total: int  # number of steps, len(sigmas) - 1
    x: Tensor  # [B,C,H,W] the latent the model was evaluated on
    sigma: Tensor  # 0-d, the noise level of x
    denoised: Tensor  # [B,C,H,W]


Callback = Callable[[SamplerStep], None]


class UnknownSamplerError(SdStudioError, ValueError):
    """A sampler name that is not in the registry."""


# --------------------------------------------------------------------------------------------------
# Helpers


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    """The scalar noise level broadcast to the batch, as the denoiser expects, on the CPU wherever ``x``
    is: wrappers read it (``float(sigma[0])``) without waiting for an accelerator, and the denoiser
    moves it to ``x``'s device without a sync. [B]"""
    return torch.full((x.shape[0],), sigma, dtype=x.dtype)


def _draw(noise: NoiseSampler | None, x: Tensor, sigma: float, sigma_next: float, sampler: str) -> Tensor:
    """One standard-normal tensor like ``x`` from the caller's noise sampler."""
    if noise is None:
        raise ValueError(f"{sampler} is stochastic with these settings and needs a noise sampler")
    z = noise(torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32))
    if z.shape != x.shape:
        raise ValueError(f"noise sampler returned shape {tuple(z.shape)}, expected {tuple(x.shape)}")
    return to_device(z, x.device).to(x.dtype)


def _report(callback: Callback | None, i: int, total: int, x: Tensor, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback(SamplerStep(i, total, x, torch.tensor(sigma, dtype=torch.float32), denoised))


def _to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras 2022 eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to ``sigma_down`` and fresh noise
    of standard deviation ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2``.

    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)`` is exactly DDIM's
    ``sigma_t(eta)`` (Song et al. 2021, eq. 16) rescaled to the variance-exploding form, so eta 1 is
    the ancestral (DDPM posterior) step and eta 0 the deterministic one.
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def _sigmas_list(sigmas: Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    return [float(s) for s in sigmas.tolist()]


def _churn(
    x: Tensor,
    sigma: float,
    steps: int,
    noise: NoiseSampler | None,
    sigma_next: float,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    name: str,
) -> tuple[Tensor, float]:
    """Karras 2022 Alg. 2 lines 4-6: raise the noise level to ``sigma_hat = sigma (1 + gamma)``."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    x = x + _draw(noise, x, sigma, sigma_next, name) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


# --------------------------------------------------------------------------------------------------
# First-order samplers


def sample_euler(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the probability-flow ODE, Karras et al. 2022 Alg. 2 without the 2nd-order
    correction; with ``s_churn > 0`` it adds Alg. 2's stochastic churn (then needs ``noise``)."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, noise, sig[i + 1], s_churn, s_tmin, s_tmax, s_noise, "Euler")
        denoised = model(x, _sigma_batch(x, sigma_hat))
        _report(callback, i, n, x, sigma_hat, denoised)
        x = x + _to_d(x, sigma_hat, denoised) * (sig[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``): an Euler step down to ``sigma_down``
    followed by fresh noise of std ``sigma_up`` (:func:`ancestral_step`); ``eta`` scales the noise."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + _to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        if sigma_up > 0.0:
            x = x + _draw(noise, x, sig[i], sig[i + 1], "Euler a") * (s_noise * sigma_up)
    return x


def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma space.

    With ``alpha_bar = 1 / (1 + sigma^2)`` and ``x_ve = x_vp / sqrt(alpha_bar)``, eq. 12 becomes
    ``x_next = x0 + sqrt(sigma_next^2 - sigma_up^2) eps + sigma_up z`` with DDIM's ``sigma_t(eta)``
    rescaled to ``sigma_up`` (:func:`ancestral_step`). With eta 0 this is Euler on the same sigmas;
    with eta 1 it is the ancestral step.

    Run the AUTOMATIC1111 way (the ``DDIM`` schedule), ``sigmas`` end at sigma(t=0) > 0 rather than 0:
    the caller starts from ``noise * sqrt(1 + sigmas[0]**2)`` (unit-variance VP noise) and turns the
    result into the VP latent the VAE decodes by dividing by ``sqrt(1 + sigmas[-1]**2)``; see
    :meth:`SamplerInfo.initial_scale` and :meth:`SamplerInfo.final_scale`.
    """
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        # x0 + sigma_down * eps, with eps = (x - x0) / sigma: DDIM's "direction pointing to x_t".
        x = denoised + (x - denoised) * (sigma_down / sig[i])
        if sigma_up > 0.0:
            x = x + _draw(noise, x, sig[i], sig[i + 1], "DDIM") * sigma_up
    return x


# --------------------------------------------------------------------------------------------------
# Second-order singlestep samplers


def sample_heun(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 2 (Euler on the last step into sigma 0)."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, noise, sig[i + 1], s_churn, s_tmin, s_tmax, s_noise, "Heun")
        denoised = model(x, _sigma_batch(x, sigma_hat))
        _report(callback, i, n, x, sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0.0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _to_d(x_2, sig[i + 1], model(x_2, _sigma_batch(x_2, sig[i + 1])))
        x = x + (d + d_2) * (dt / 2)
    return x


def _log_midpoint(a: float, b: float) -> float:
    """The geometric mean: the midpoint in log sigma (DPM-Solver-2's intermediate point)."""
    return math.exp((math.log(a) + math.log(b)) / 2)


def sample_dpm_2(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Alg. 1) in Karras et al.'s form (k-diffusion
    ``sample_dpm_2``): the derivative at the log-sigma midpoint drives the full step; Alg. 2 churn."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, noise, sig[i + 1], s_churn, s_tmin, s_tmax, s_noise, "DPM2")
        denoised = model(x, _sigma_batch(x, sigma_hat))
        _report(callback, i, n, x, sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0.0:
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sig[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = _to_d(x_2, sigma_mid, model(x_2, _sigma_batch(x_2, sigma_mid)))
        x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion ``sample_dpm_2_ancestral``): a DPM-Solver-2 step down to
    ``sigma_down``, then fresh noise of std ``sigma_up`` (:func:`ancestral_step`)."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        d = _to_d(x, sig[i], denoised)
        if sigma_down == 0.0:
            x = x + d * (sigma_down - sig[i])
            continue
        sigma_mid = _log_midpoint(sig[i], sigma_down)
        x_2 = x + d * (sigma_mid - sig[i])
        d_2 = _to_d(x_2, sigma_mid, model(x_2, _sigma_batch(x_2, sigma_mid)))
        x = x + d_2 * (sigma_down - sig[i])
        if sigma_up > 0.0:
            x = x + _draw(noise, x, sig[i], sig[i + 1], "DPM2 a") * (s_noise * sigma_up)
    return x


def _lambda(sigma: float) -> float:
    """DPM-Solver's half-log-SNR ``lambda = log(alpha / sigma_vp) = -log(sigma)`` in sigma space."""
    return -math.log(sigma)


def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Alg. 1 with r = 1/2): a
    data-prediction singlestep 2nd-order step down to ``sigma_down``, then noise of std ``sigma_up``."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0.0:
            x = x + _to_d(x, sig[i], denoised) * (sigma_down - sig[i])
            continue
        h = _lambda(sigma_down) - _lambda(sig[i])
        sigma_s = math.exp(-(_lambda(sig[i]) + h / 2))
        x_2 = (sigma_s / sig[i]) * x - math.expm1(-h / 2) * denoised
        denoised_2 = model(x_2, _sigma_batch(x_2, sigma_s))
        x = (sigma_down / sig[i]) * x - math.expm1(-h) * denoised_2
        if sigma_up > 0.0:
            x = x + _draw(noise, x, sig[i], sig[i + 1], "DPM++ 2S a") * (s_noise * sigma_up)
    return x


def sample_dpmpp_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): the 2nd-order singlestep DPM-Solver++
    (Lu et al. 2022, Alg. 1) with an ancestral split of both sub-steps. Each step draws noise for
    (sigma, sigma_s) and (sigma, sigma_next), so use a :class:`BrownianTreeNoiseSampler` to make the
    two draws consistent increments of one path."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        sigma = sig[i]
        denoised = model(x, _sigma_batch(x, sigma))
        _report(callback, i, n, x, sigma, denoised)
        if sig[i + 1] == 0.0:
            x = x + _to_d(x, sigma, denoised) * (sig[i + 1] - sigma)
            continue
        lam, lam_next = _lambda(sigma), _lambda(sig[i + 1])
        h = lam_next - lam
        sigma_s = math.exp(-(lam + h * r))
        # Step 1: to sigma_s (ancestral split).
        sd, su = ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x - math.expm1(_lambda(sigma) - _lambda(sd)) * denoised
        if su > 0.0:
            x_2 = x_2 + _draw(noise, x, sigma, sigma_s, "DPM++ SDE") * (s_noise * su)
        denoised_2 = model(x_2, _sigma_batch(x_2, sigma_s))
        # Step 2: to sigma_next with the blended data prediction.
        sd, su = ancestral_step(sigma, sig[i + 1], eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - math.expm1(_lambda(sigma) - _lambda(sd)) * denoised_d
        if su > 0.0:
            x = x + _draw(noise, x, sigma, sig[i + 1], "DPM++ SDE") * (s_noise * su)
    return x


# --------------------------------------------------------------------------------------------------
# Multistep samplers


def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): multistep 2nd-order in data
    prediction; first-order on the first step and on the last step into sigma 0 (as diffusers'
    ``lower_order_final``)."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    old_denoised: Tensor | None = None
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        if sig[i + 1] == 0.0:
            x = denoised
        else:
            h = _lambda(sig[i + 1]) - _lambda(sig[i])
            d = denoised
            if old_denoised is not None:
                r = (_lambda(sig[i]) - _lambda(sig[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Sec. 5 / App. B; k-diffusion
    ``sample_dpmpp_2m_sde``), ``solver_type`` "midpoint" (diffusers' default) or "heun". ``eta``
    scales the SDE's noise (0: DPM-Solver++(2M))."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    old_denoised: Tensor | None = None
    h_last: float | None = None
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        if sig[i + 1] == 0.0:
            x = denoised
        else:
            h = _lambda(sig[i + 1]) - _lambda(sig[i])
            eta_h = eta * h
            x = (sig[i + 1] / sig[i] * math.exp(-eta_h)) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    coef = -math.expm1(-h - eta_h) / (-h - eta_h) + 1
                else:
                    coef = -0.5 * math.expm1(-h - eta_h)
                x = x + (coef / r) * (denoised - old_denoised)
            if eta > 0.0:
                std = sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
                x = x + _draw(noise, x, sig[i], sig[i + 1], "DPM++ 2M SDE") * (s_noise * std)
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(3M) (k-diffusion ``sample_dpmpp_3m_sde``, after Lu et al. 2022 "DPM-Solver++"):
    the 2M SDE step with a 3rd-order multistep correction from the last two data predictions."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        h: float | None = None
        if sig[i + 1] == 0.0:
            x = denoised
        else:
            h = _lambda(sig[i + 1]) - _lambda(sig[i])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                x = x + (phi_2 * h / h_1) * (denoised - denoised_1)
            if eta > 0.0:
                std = sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
                x = x + _draw(noise, x, sig[i], sig[i + 1], "DPM++ 3M SDE") * (s_noise * std)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _lms_coefficient(order: int, s: Sequence[float], i: int, j: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial through s[i], .., s[i-order+1]
    that is 1 at s[i-j] (the Adams-Bashforth weight of the j-th previous derivative).

    The integrand is a polynomial of degree < order <= 4, so 4-point Gauss-Legendre is exact.
    """
    nodes = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
    weights = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)
    a, b = s[i], s[i + 1]
    total = 0.0
    for node, weight in zip(nodes, weights):
        tau = (b - a) / 2 * node + (a + b) / 2
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        total += weight * prod
    return total * (b - a) / 2


def sample_lms(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma with variable steps; Karras et al. 2022 / k-diffusion
    ``sample_lms``): the ODE derivative integrated over each step through the last ``order`` points."""
    if not 1 <= order <= 4:
        raise ValueError(f"LMS order must be 1..4, got {order}")
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    ds: list[Tensor] = []  # most recent last
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        ds.append(_to_d(x, sig[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        for j in range(cur_order):
            x = x + _lms_coefficient(cur_order, sig, i, j) * ds[-1 - j]
    return x


def sample_plms(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods
    for Diffusion Models", eq. 12 with the pseudo improved Euler start), as SD's original sampler and
    AUTOMATIC1111 run it: fixed Adams-Bashforth weights on eps, DDIM's transfer step.

    In sigma space the transfer step with an eps estimate e is ``x + (sigma_next - sigma) e`` and
    ``eps = (x - D(x, sigma)) / sigma``. The first step evaluates the model twice. Timestep-based:
    see :func:`sample_ddim` for the start and end scaling when ``sigmas`` end above 0.
    """
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    old_eps: list[Tensor] = []  # most recent last, at most 3
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        eps = _to_d(x, sig[i], denoised)
        dt = sig[i + 1] - sig[i]
        if not old_eps:
            if sig[i + 1] > 0.0:
                # Pseudo improved Euler: average eps here and at the Euler prediction.
                x_2 = x + eps * dt
                eps_next = _to_d(x_2, sig[i + 1], model(x_2, _sigma_batch(x_2, sig[i + 1])))
                eps_prime = (eps + eps_next) / 2
            else:
                eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * dt
        old_eps.append(eps)
        if len(old_eps) > 3:
            old_eps.pop(0)
    return x


def _unipc_coefficients(
    order: int, h: float, rks: Sequence[float], variant: str, corrector: bool
) -> tuple[float, list[float]]:
    """B(h) and the rho weights of UniP-``order`` (``corrector=False``: ``order - 1`` weights) or
    UniC-``order`` (``order`` weights, the last for the new model output); Zhao et al. 2023 Alg. 2-3.

    ``rks`` are the step ratios r_k of the previous outputs, without the trailing 1.
    """
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b: list[float] = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_all = [*rks, 1.0]
    if corrector:
        if order == 1:
            return b_h, [0.5]
        mat = torch.tensor([[r**k for r in r_all] for k in range(order)], dtype=torch.float64)
        return b_h, torch.linalg.solve(mat, torch.tensor(b, dtype=torch.float64)).tolist()
    if order == 1:
        return b_h, []
    if order == 2:
        return b_h, [0.5]
    mat = torch.tensor([[r**k for r in rks] for k in range(order - 1)], dtype=torch.float64)
    return b_h, torch.linalg.solve(mat, torch.tensor(b[:-1], dtype=torch.float64)).tolist()


def sample_unipc(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", Alg. 2-3): the
    multistep predictor UniP-p in data prediction, and after every model evaluation but the last the
    corrector UniC, which reuses that evaluation (no extra model call).

    Defaults are AUTOMATIC1111's (order 3, variant "bh1", lower-order final steps); diffusers'
    ``UniPCMultistepScheduler`` defaults to order 2, "bh2". Orders ramp up over the first steps; a
    final step into sigma 0 is first order. Timestep-based: see :func:`sample_ddim` for the start and
    end scaling when ``sigmas`` end above 0 (AUTOMATIC1111's ``Time Uniform``).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise ValueError(f"UniPC order must be at least 1, got {order}")
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    outputs: list[Tensor] = []  # data predictions, most recent last
    lambdas: list[float] = []
    x_last: Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        lam = _lambda(sig[i])
        if x_last is not None:
            # UniC: correct x_i from x_{i-1} with the new output m_i (Alg. 3).
            h = lam - lambdas[-1]
            rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, last_order)]
            b_h, rhos = _unipc_coefficients(last_order, h, rks, variant, corrector=True)
            m0 = outputs[-1]
            corr = rhos[-1] * (denoised - m0)
            for k, rk in enumerate(rks, start=1):
                corr = corr + rhos[k - 1] * (outputs[-1 - k] - m0) / rk
            x = (sig[i] / sig[i - 1]) * x_last - math.expm1(-h) * m0 - b_h * corr
        outputs.append(denoised)
        lambdas.append(lam)
        if len(outputs) > order:
            outputs.pop(0)
            lambdas.pop(0)
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, i + 1)  # warm-up
        x_last = x
        last_order = step_order
        if sig[i + 1] == 0.0:
            # lambda = inf: every order reduces to the data prediction itself.
            x = denoised
            continue
        # UniP (Alg. 2).
        h = _lambda(sig[i + 1]) - lam
        rks = [(lambdas[-1 - k] - lam) / h for k in range(1, step_order)]
        b_h, rhos = _unipc_coefficients(step_order, h, rks, variant, corrector=False)
        x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised
        for k, rk in enumerate(rks, start=1):
            x = x - (b_h * rhos[k - 1] / rk) * (outputs[-1 - k] - denoised)
    return x


def sample_lcm(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
    Alg. 3; Song et al. 2023 "Consistency Models", Alg. 1): jump to the model's x0, then re-noise to
    the next level with fresh noise. The consistency boundary scalings (c_skip, c_out) belong to the
    denoiser, not here. Default schedule: ``LCM``."""
    sig = _sigmas_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        denoised = model(x, _sigma_batch(x, sig[i]))
        _report(callback, i, n, x, sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0.0:
            x = x + _draw(noise, x, sig[i], sig[i + 1], "LCM") * sig[i + 1]
    return x


# --------------------------------------------------------------------------------------------------
# Brownian-tree noise


def _node_seed(seed: int, node: int) -> int:
    """A 63-bit seed for a tree node, a hash of the image seed and the node's heap index."""
    digest = hashlib.blake2b(f"{seed}:{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BrownianTreeNoiseSampler:
    """Noise from one Brownian motion W per image on ``[sigma_min, sigma_max]``, queried by bisection
    (a Brownian tree: Gaines & Lyons 1997; Li et al. 2020, "Scalable Gradients for SDEs"), so the
    noise of overlapping intervals is consistent and independent of the step count's draw order.

    ``__call__(sigma, sigma_next)`` returns ``(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|``,
    a standard normal [B, ...] tensor. Each image has its own tree seeded by its seed, so image i of a
    batch equals image i alone. Nodes are sampled from the Brownian bridge with a seed derived from
    (seed, node); below ``tol`` W is interpolated linearly. Pure: a query only reads the seeds.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        sigma_min: float,
        sigma_max: float,
        seeds: Sequence[int],
        *,
        tol: float = 1e-6,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(seeds) != x_shape[0]:
            raise ValueError(f"need one seed per batch item: {len(seeds)} seeds for shape {tuple(x_shape)}")
        if not 0.0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.shape = tuple(int(s) for s in x_shape[1:])
        self.t0 = float(sigma_min)
        self.t1 = float(sigma_max)
        self.seeds = tuple(int(s) for s in seeds)
        self.tol = tol
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def for_sigmas(
        cls, x_shape: Sequence[int], sigmas: Tensor, seeds: Sequence[int], **kwargs: object
    ) -> BrownianTreeNoiseSampler:
        """The tree over the nonzero range of a sigma schedule, as k-diffusion sets it up."""
        positive = sigmas[sigmas > 0]
        return cls(x_shape, float(positive.min()), float(sigmas.max()), seeds, **kwargs)  # type: ignore[arg-type]

    def _normal(self, seed: int, node: int) -> Tensor:
        gen = torch.Generator().manual_seed(_node_seed(seed, node))
        return torch.randn(self.shape, generator=gen, dtype=torch.float32).double()

    def _w(self, seed: int, t: float) -> Tensor:
        """W(t) of one image's path, W(t0) = 0. [*shape] float64"""
        t = min(max(t, self.t0), self.t1)
        a, b = self.t0, self.t1
        w_a = torch.zeros(self.shape, dtype=torch.float64)
        w_b = self._normal(seed, 0) * math.sqrt(b - a)
        node = 1
        while b - a > self.tol:
            mid = (a + b) / 2
            # Brownian bridge at the midpoint: mean of the ends, variance (b - a) / 4.
            w_mid = (w_a + w_b) / 2 + self._normal(seed, node) * (math.sqrt(b - a) / 2)
            if t <= mid:
                b, w_b, node = mid, w_mid, 2 * node
            else:
                a, w_a, node = mid, w_mid, 2 * node + 1
            if t == a:
                return w_a
            if t == b:
                return w_b
        return w_a + (w_b - w_a) * ((t - a) / (b - a))

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        s0 = min(max(float(sigma), self.t0), self.t1)
        s1 = min(max(float(sigma_next), self.t0), self.t1)
        if s0 == s1:
            raise ValueError(f"zero-length noise interval at sigma {float(sigma)}")
        scale = 1.0 / math.sqrt(abs(s1 - s0))
        out = torch.stack([(self._w(seed, s1) - self._w(seed, s0)) * scale for seed in self.seeds])
        return out.to(device=self.device, dtype=self.dtype)


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and what a pipeline needs to know to run it, without special-casing names.

    ``stochastic``: draws noise at default settings (the caller must pass a noise sampler).
    ``uses_eta``: takes an ``eta`` keyword (``default_eta`` when the request gives none).
    ``default_scheduler``: what the ``Automatic`` schedule type resolves to.
    ``timestep_based``: run on the model's discrete timesteps, AUTOMATIC1111-style; its schedules
    end at sigma(t=0) > 0 and it starts from unit-variance VP noise (see the scale methods).
    ``discard_penultimate_sigma``: AUTOMATIC1111 builds steps + 1 sigmas and drops the next-to-last
    (DPM2's midpoint would otherwise be wasted on the last, tiny, interval).
    ``brownian_noise``: should get a :class:`BrownianTreeNoiseSampler` (SDE samplers).
    ``model_calls_per_step``, ``extra_model_calls``: denoiser evaluations per step (2 for the
    second-order singlestep samplers) and in all beyond that, for progress reporting.
    """

    name: str
    function: Callable[..., Tensor]
    stochastic: bool
    uses_eta: bool
    default_scheduler: str
    timestep_based: bool = False
    default_eta: float | None = None
    discard_penultimate_sigma: bool = False
    brownian_noise: bool = False
    model_calls_per_step: int = 1
    extra_model_calls: int = 0
    aliases: tuple[str, ...] = ()
    paper: str = ""

    def initial_scale(self, sigma0: float) -> float:
        """Factor turning unit normal noise into the txt2img starting latent at ``sigma0``.

        k-diffusion samplers start at ``x = sigma0 * noise``; the timestep-based ones start, as in
        DDPM/DDIM, from unit-variance VP noise, which in sigma space is ``noise * sqrt(1 + sigma0^2)``.
        """
        return math.sqrt(1.0 + sigma0**2) if self.timestep_based else sigma0

    def final_scale(self, sigma_last: float) -> float:
        """Factor turning the sampler's result at ``sigma_last`` into the latent the VAE decodes:
        ``1 / sqrt(1 + sigma_last^2)`` (the VP latent ``sqrt(alpha_bar) x``), 1 when it ends at 0."""
        return 1.0 / math.sqrt(1.0 + sigma_last**2)

    def needs_noise(self, eta: float | None = None) -> bool:
        """Whether a run with this ``eta`` (None: the default) draws noise, i.e. needs a noise sampler."""
        if not self.uses_eta:
            return self.stochastic
        return (self.default_eta if eta is None else eta) not in (None, 0.0)

    def model_calls(self, steps: int) -> int:
        """Upper bound on denoiser evaluations for ``steps`` steps (PLMS's first step takes two)."""
        return steps * self.model_calls_per_step + self.extra_model_calls


def _registry(infos: Sequence[SamplerInfo]) -> dict[str, SamplerInfo]:
    return {info.name: info for info in infos}


SAMPLERS: dict[str, SamplerInfo] = _registry(
    [
        SamplerInfo(
            "Euler",
            sample_euler,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Uniform",
            aliases=("k_euler", "euler"),
            paper="Karras et al. 2022, Alg. 2 (first order)",
        ),
        SamplerInfo(
            "Euler a",
            sample_euler_ancestral,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Uniform",
            default_eta=1.0,
            aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral"),
            paper="k-diffusion ancestral Euler (DDPM posterior step)",
        ),
        SamplerInfo(
            "Heun",
            sample_heun,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Uniform",
            model_calls_per_step=2,
            aliases=("k_heun", "heun"),
            paper="Karras et al. 2022, Alg. 2",
        ),
        SamplerInfo(
            "DPM2",
            sample_dpm_2,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Karras",
            discard_penultimate_sigma=True,
            model_calls_per_step=2,
            aliases=("k_dpm_2", "dpm_2"),
            paper="Lu et al. 2022 (DPM-Solver-2), Karras et al. 2022 form",
        ),
        SamplerInfo(
            "DPM2 a",
            sample_dpm_2_ancestral,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Karras",
            default_eta=1.0,
            discard_penultimate_sigma=True,
            model_calls_per_step=2,
            aliases=("k_dpm_2_a", "dpm_2_ancestral"),
            paper="Lu et al. 2022 (DPM-Solver-2), ancestral",
        ),
        SamplerInfo(
            "DPM++ 2S a",
            sample_dpmpp_2s_ancestral,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Karras",
            default_eta=1.0,
            model_calls_per_step=2,
            aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral"),
            paper="Lu et al. 2022 (DPM-Solver++ 2S), ancestral",
        ),
        SamplerInfo(
            "DPM++ 2M",
            sample_dpmpp_2m,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Karras",
            aliases=("k_dpmpp_2m", "dpmpp_2m"),
            paper="Lu et al. 2022 (DPM-Solver++ 2M), Alg. 2",
        ),
        SamplerInfo(
            "DPM++ SDE",
            sample_dpmpp_sde,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Karras",
            default_eta=1.0,
            brownian_noise=True,
            model_calls_per_step=2,
            aliases=("k_dpmpp_sde", "dpmpp_sde"),
            paper="Lu et al. 2022 (DPM-Solver++), k-diffusion SDE variant",
        ),
        SamplerInfo(
            "DPM++ 2M SDE",
            sample_dpmpp_2m_sde,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Exponential",
            default_eta=1.0,
            brownian_noise=True,
            aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
            paper="Lu et al. 2022 (SDE-DPM-Solver++ 2M)",
        ),
        SamplerInfo(
            "DPM++ 3M SDE",
            sample_dpmpp_3m_sde,
            stochastic=True,
            uses_eta=True,
            default_scheduler="Exponential",
            default_eta=1.0,
            brownian_noise=True,
            discard_penultimate_sigma=True,
            aliases=("k_dpmpp_3m_sde", "dpmpp_3m_sde"),
            paper="Lu et al. 2022 (SDE-DPM-Solver++ 3M), k-diffusion",
        ),
        SamplerInfo(
            "LMS",
            sample_lms,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Uniform",
            aliases=("k_lms", "lms"),
            paper="linear multistep, Karras et al. 2022 / k-diffusion",
        ),
        SamplerInfo(
            "DDIM",
            sample_ddim,
            stochastic=False,
            uses_eta=True,
            default_scheduler="DDIM",
            timestep_based=True,
            default_eta=0.0,
            aliases=("ddim",),
            paper="Song et al. 2021, eq. 12",
        ),
        SamplerInfo(
            "PLMS",
            sample_plms,
            stochastic=False,
            uses_eta=False,
            default_scheduler="DDIM",
            timestep_based=True,
            extra_model_calls=1,
            aliases=("plms", "pndm"),
            paper="Liu et al. 2022 (PNDM), PLMS",
        ),
        SamplerInfo(
            "UniPC",
            sample_unipc,
            stochastic=False,
            uses_eta=False,
            default_scheduler="Time Uniform",
            timestep_based=True,
            aliases=("unipc", "uni_pc"),
            paper="Zhao et al. 2023, Alg. 2-3",
        ),
        SamplerInfo(
            "LCM",
            sample_lcm,
            stochastic=True,
            uses_eta=False,
            default_scheduler="LCM",
            aliases=("k_lcm", "lcm"),
            paper="Luo et al. 2023, Alg. 3",
        ),
    ]
)


def sampler_names() -> list[str]:
    """The canonical sampler names, in registry order."""
    return list(SAMPLERS)


def resolve_sampler(name: str) -> tuple[SamplerInfo, str | None]:
    """The sampler for ``name`` and the schedule type it names, if any.

    Case-insensitive; accepts aliases (``"k_euler_a"``) and AUTOMATIC1111's legacy combined names
    (``"DPM++ 2M Karras"`` -> (DPM++ 2M, ``"Karras"``)). Raises :class:`UnknownSamplerError` (a
    ``ValueError``) listing the valid names.
    """
    from sdstudio.diffusion.schedulers import SCHEDULERS  # schedulers imports this module for types

    key = " ".join(name.split()).casefold()
    by_name: dict[str, SamplerInfo] = {}
    for info in SAMPLERS.values():
        by_name[info.name.casefold()] = info
        for alias in info.aliases:
            by_name.setdefault(alias.casefold(), info)
    if key in by_name:
        return by_name[key], None
    schedulers = {s.casefold(): s for s in SCHEDULERS}
    # Longest sampler name first, so "DPM++ 2M SDE Karras" is not read as "DPM++ 2M" + "SDE Karras".
    for sampler_key in sorted(by_name, key=len, reverse=True):
        if key.startswith(sampler_key + " "):
            rest = key[len(sampler_key) + 1 :]
            if rest in schedulers:
                logger.debug(
                    "legacy sampler name %r read as %r + %r",
                    name,
                    by_name[sampler_key].name,
                    schedulers[rest],
                )
                return by_name[sampler_key], schedulers[rest]
    raise UnknownSamplerError(
        f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} "
        f"(optionally followed by a schedule type: {', '.join(SCHEDULERS)})"
    )
