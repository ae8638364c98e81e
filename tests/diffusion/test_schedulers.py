"""Schedule types: lengths, endpoints, and agreement with diffusers' timestep and sigma choices."""

from __future__ import annotations

import math

import pytest
import torch

from sdstudio.diffusion.samplers import SAMPLERS
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.diffusion.schedulers import (
    SCHEDULERS,
    ddim_timesteps,
    get_sigmas,
    karras,
    lcm_timesteps,
    resolve_scheduler,
    scheduler_names,
    sgm_uniform,
    uniform,
)
from sdstudio.models.configs import ScheduleConfig

SCHEDULE = DiscreteSchedule.from_config(ScheduleConfig())
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
RTOL = 1e-4  # diffusers computes alphas_cumprod in float32, the schedule in float64

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 2, 4, 20, 30, 50])
def test_shape_dtype_monotonic(name: str, steps: int) -> None:
    sigmas = SCHEDULERS[name](SCHEDULE, steps)
    n = len(range(0, 1000, 1000 // steps)) if name == "DDIM" else steps  # A1111's DDIM range quirk
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert float(sigmas[0]) <= SCHEDULE.sigma_max * (1 + 1e-6)
    if name in ("DDIM", "Time Uniform"):
        assert float(sigmas[-1]) == pytest.approx(SCHEDULE.sigma_min)  # sigma(t=0), not 0
    else:
        assert float(sigmas[-1]) == 0.0


def test_uniform_is_k_diffusion_get_sigmas() -> None:
    # 4 steps: t = 999, 666, 333, 0, all whole, so diffusers' linear-in-sigma interpolation agrees.
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(4)
    torch.testing.assert_close(uniform(SCHEDULE, 4), sched.sigmas.float(), rtol=RTOL, atol=0)
    # Fractional timesteps interpolate log sigma (k-diffusion), between the neighbours' sigmas.
    s = uniform(SCHEDULE, 7)  # t = 999, 832.5, ...
    expected = math.exp((math.log(SCHEDULE.sigmas[832]) + math.log(SCHEDULE.sigmas[833])) / 2)
    assert float(s[1]) == pytest.approx(expected, rel=1e-5)


def test_karras_matches_diffusers() -> None:
    sched = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=True)
    sched.set_timesteps(20)
    torch.testing.assert_close(karras(SCHEDULE, 20), sched.sigmas.float(), rtol=RTOL, atol=0)
    assert float(karras(SCHEDULE, 5, sigma_min=0.1, sigma_max=10.0)[0]) == pytest.approx(10.0)


def test_exponential_matches_diffusers() -> None:
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_exponential_sigmas=True)
    sched.set_timesteps(15)
    torch.testing.assert_close(
        SCHEDULERS["Exponential"](SCHEDULE, 15), sched.sigmas.float(), rtol=RTOL, atol=0
    )


def test_sgm_uniform() -> None:
    expected = torch.cat([SCHEDULE.sigmas[[999, 666, 333]], torch.zeros(1)])
    torch.testing.assert_close(sgm_uniform(SCHEDULE, 3), expected)


def test_ddim_timesteps_keep_a1111_range_quirk() -> None:
    # range(0, 1000, 33) + 1: 31 timesteps for 30 steps, as AUTOMATIC1111 runs DDIM and PLMS
    t = ddim_timesteps(SCHEDULE, 30)
    assert t.tolist() == [k + 1 for k in range(0, 1000, 33)][::-1]
    assert len(SCHEDULERS["DDIM"](SCHEDULE, 30)) == 32
    assert ddim_timesteps(SCHEDULE, 3).tolist() == [1000 - 1, 667, 334, 1]  # range(0, 1000, 333) + 1, clipped


@pytest.mark.parametrize("steps", [1, 10, 20, 25, 50])
def test_ddim_timesteps_match_diffusers_leading(steps: int) -> None:
    sched = diffusers.DDIMScheduler(
        **SD_CONFIG, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False
    )
    sched.set_timesteps(steps)
    assert ddim_timesteps(SCHEDULE, steps).tolist() == sched.timesteps.tolist()
    sigmas = SCHEDULERS["DDIM"](SCHEDULE, steps)
    torch.testing.assert_close(sigmas[:-1], SCHEDULE.sigmas[sched.timesteps])
    with pytest.raises(ValueError, match="at most 999"):
        ddim_timesteps(SCHEDULE, 1000)


@pytest.mark.parametrize("steps", [1, 4, 8, 20])
def test_lcm_timesteps_match_diffusers(steps: int) -> None:
    sched = diffusers.LCMScheduler(**SD_CONFIG)
    sched.set_timesteps(steps)
    assert lcm_timesteps(SCHEDULE, steps).tolist() == sched.timesteps.tolist()


def test_time_uniform_matches_unipc_sigma_min() -> None:
    sched = diffusers.UniPCMultistepScheduler(**SD_CONFIG, final_sigmas_type="sigma_min")
    sched.set_timesteps(9)  # 999 / 9 whole: no rounding difference
    torch.testing.assert_close(
        SCHEDULERS["Time Uniform"](SCHEDULE, 9), sched.sigmas.float(), rtol=RTOL, atol=0
    )


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_automatic_resolves_to_the_sampler_default(name: str) -> None:
    info = SAMPLERS[name]
    assert resolve_scheduler("Automatic", info) == info.default_scheduler
    sigmas = get_sigmas("automatic", SCHEDULE, 10, info)
    assert sigmas.shape == (11,)
    if not info.discard_penultimate_sigma:
        torch.testing.assert_close(sigmas, SCHEDULERS[info.default_scheduler](SCHEDULE, 10), atol=0, rtol=0)


def test_discard_penultimate_sigma() -> None:
    info = SAMPLERS["DPM2"]
    assert info.discard_penultimate_sigma
    full = karras(SCHEDULE, 11)
    expected = torch.cat([full[:-2], full[-1:]])
    torch.testing.assert_close(get_sigmas("Karras", SCHEDULE, 10, info), expected, atol=0, rtol=0)


def test_resolve_scheduler_names() -> None:
    info = SAMPLERS["Euler"]
    assert resolve_scheduler("karras", info) == "Karras"
    assert resolve_scheduler("sgm  uniform", info) == "SGM Uniform"
    assert scheduler_names()[0] == "Automatic"
    with pytest.raises(ValueError) as err:
        resolve_scheduler("Polyexponential", info)
    for name in scheduler_names():
        assert name in str(err.value)
