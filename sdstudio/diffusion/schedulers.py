"""Schedule types: which ``steps + 1`` noise levels a sampler visits (AUTOMATIC1111's "Schedule type").

Every function has the form ``name(schedule, steps, ...) -> Tensor`` and returns ``steps + 1``
float32 sigmas, decreasing. The k-diffusion types end with 0; the timestep types used by
AUTOMATIC1111's DDIM/PLMS/UniPC end at sigma(t=0) > 0, after which the caller rescales the result
to the VP latent (:meth:`SamplerInfo.final_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sdstudio.diffusion.schedule import DiscreteSchedule

if TYPE_CHECKING:
    from sdstudio.diffusion.samplers import SamplerInfo


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def _num_timesteps(schedule: DiscreteSchedule) -> int:
    return int(schedule.sigmas.shape[0])


def uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """k-diffusion's ``DiscreteSchedule.get_sigmas``: ``steps`` timesteps evenly spaced from T-1 to 0
    (fractional ones interpolated in log sigma), then 0. AUTOMATIC1111's default for k-diffusion
    samplers."""
    _check_steps(steps)
    t = torch.linspace(_num_timesteps(schedule) - 1, 0, steps)
    return _append_zero(schedule.t_to_sigma(t))


def karras(
    schedule: DiscreteSchedule,
    steps: int,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Karras et al. 2022 eq. 5: evenly spaced in ``sigma^(1/rho)`` between the model's sigma_max and
    sigma_min (its first and last training sigma unless given), then 0."""
    _check_steps(steps)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _append_zero(sigmas)


def exponential(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0 (k-diffusion
    ``get_sigmas_exponential``)."""
    _check_steps(steps)
    log_sigmas = torch.linspace(
        math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float64
    )
    return _append_zero(log_sigmas.exp())


def sgm_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Stability sgm's uniform discretisation: ``steps + 1`` timesteps evenly spaced from T-1 to 0
    with the last one dropped, then 0 (so the final interval goes straight to sigma 0)."""
    _check_steps(steps)
    t = torch.linspace(_num_timesteps(schedule) - 1, 0, steps + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def ddim_timesteps(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """AUTOMATIC1111's DDIM/PLMS timesteps: ``range(0, T, T // steps) + 1``, decreasing. [n] int64

    When ``T % steps`` is large this holds one more timestep than asked (31 for 30 steps), a quirk kept
    so that a pasted A1111 generation gives the same image. Where ``T // steps`` divides evenly
    (10, 20, 25, 50 ... steps) it equals diffusers' ``DDIMScheduler(timestep_spacing="leading",
    steps_offset=1)``.
    """
    _check_steps(steps)
    num = _num_timesteps(schedule)
    if steps > num - 1:
        raise ValueError(f"DDIM timesteps support at most {num - 1} steps, got {steps}")
    t = (torch.arange(0, num, num // steps, dtype=torch.int64) + 1).clamp(max=num - 1)
    return t.flip(0)


def ddim(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Sigmas of :func:`ddim_timesteps`, ending at sigma(t=0): the last DDIM step goes to
    ``alpha_bar_0`` (``set_alpha_to_one=False``), not to a clean image. For DDIM and PLMS."""
    t = ddim_timesteps(schedule, steps)
    sigmas = schedule.sigmas[t]
    return torch.cat([sigmas, schedule.sigmas[:1]]).float()


def time_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """UniPC / DPM-Solver's ``time_uniform`` skip type as AUTOMATIC1111 runs UniPC: ``steps + 1``
    timesteps evenly spaced from T-1 to 0 (continuous time 1 .. 1/T), ending at sigma(t=0).

    Fractional timesteps interpolate log sigma (the original interpolates log alpha; the two differ
    by < 1e-3 relative)."""
    _check_steps(steps)
    t = torch.linspace(_num_timesteps(schedule) - 1, 0, steps + 1)
    return schedule.t_to_sigma(t).float()


def lcm_timesteps(schedule: DiscreteSchedule, steps: int, original_steps: int = 50) -> Tensor:
    """Latent Consistency Models' timesteps (Luo et al. 2023; diffusers ``LCMScheduler``): ``steps``
    evenly spaced picks, from the top, of the ``original_steps`` distillation timesteps
    ``k * T / original_steps - 1``. [steps] int64, decreasing."""
    _check_steps(steps)
    if steps > original_steps:
        raise ValueError(f"LCM schedule supports at most {original_steps} steps, got {steps}")
    num = _num_timesteps(schedule)
    origin = (torch.arange(1, original_steps + 1, dtype=torch.int64) * (num // original_steps) - 1).flip(0)
    picks = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return origin[picks]


def lcm(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Sigmas of :func:`lcm_timesteps`, then 0. The default for LCM."""
    return _append_zero(schedule.sigmas[lcm_timesteps(schedule, steps)])


Scheduler = Callable[[DiscreteSchedule, int], Tensor]

SCHEDULERS: dict[str, Scheduler] = {
    "Uniform": uniform,
    "Karras": karras,
    "Exponential": exponential,
    "SGM Uniform": sgm_uniform,
    "DDIM": ddim,
    "Time Uniform": time_uniform,
    "LCM": lcm,
}
"""Schedule types by display name; ``"Automatic"`` is resolved by :func:`get_sigmas`."""

AUTOMATIC = "Automatic"


def scheduler_names() -> list[str]:
    """Valid schedule type names, ``Automatic`` first."""
    return [AUTOMATIC, *SCHEDULERS]


def resolve_scheduler(name: str, sampler: SamplerInfo) -> str:
    """The canonical schedule type for ``name`` (case-insensitive), ``Automatic`` resolved to the
    sampler's default. Raises ``ValueError`` listing the valid names."""
    key = " ".join(name.split()).casefold()
    if key == AUTOMATIC.casefold():
        return sampler.default_scheduler
    for canonical in SCHEDULERS:
        if canonical.casefold() == key:
            return canonical
    raise ValueError(f"unknown schedule type {name!r}; valid names: {', '.join(scheduler_names())}")


def get_sigmas(scheduler_name: str, schedule: DiscreteSchedule, steps: int, sampler: SamplerInfo) -> Tensor:
    """The ``steps + 1`` sigmas ``sampler`` should run for ``steps`` steps of ``scheduler_name``.

    For samplers with ``discard_penultimate_sigma`` (DPM2, DPM2 a, DPM++ 3M SDE) this is
    AUTOMATIC1111's rule: build ``steps + 2`` sigmas and drop the next-to-last one.
    """
    fn = SCHEDULERS[resolve_scheduler(scheduler_name, sampler)]
    if sampler.discard_penultimate_sigma:
        sigmas = fn(schedule, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return fn(schedule, steps)
