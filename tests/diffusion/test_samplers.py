"""Samplers: parity with diffusers' schedulers, convergence on Gaussian data, the common contract.

The toy problem throughout: data x0 ~ N(MU, S^2) independently per dimension, whose exact denoiser
is the posterior mean ``D(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor

from sdstudio.diffusion.samplers import (
    SAMPLERS,
    BrownianTreeNoiseSampler,
    SamplerInfo,
    SamplerStep,
    ancestral_step,
    resolve_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.diffusion.schedulers import get_sigmas
from sdstudio.models.configs import ScheduleConfig

SCHEDULE = DiscreteSchedule.from_config(ScheduleConfig())
MU, S = 0.5, 0.3
SHAPE = (2, 4, 16, 16)  # 2 x 1024 dims for parity; convergence uses more

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def gaussian_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """Exact posterior mean of x0 ~ N(MU, S^2) given x = x0 + sigma * eps."""
    var = sigma.to(x).view(-1, *([1] * (x.ndim - 1))) ** 2
    return (S**2 * x + var * MU) / (S**2 + var)


def gaussian_consistency(x: Tensor, sigma: Tensor) -> Tensor:
    """Exact consistency function of the same problem: the probability-flow ODE's map to sigma 0."""
    var = sigma.to(x).view(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + (x - MU) * (S / (S**2 + var).sqrt())


def eps_vp(x_vp: Tensor, sigma: float) -> Tensor:
    """The same model as a diffusers eps-prediction model on the VP latent at VE noise level sigma."""
    x = x_vp * math.sqrt(1 + sigma**2)
    return (x - gaussian_denoiser(x, torch.full((x.shape[0],), sigma))) / sigma


class SeededNoise:
    """Per-image CPU generators, as the pipeline draws noise: image i depends only on seeds[i]."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int]) -> None:
        self.shape = tuple(shape[1:])
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class RecordedNoise:
    """Hands out a fixed list of noise tensors in order (the same list diffusers is fed)."""

    def __init__(self, noises: Sequence[Tensor]) -> None:
        self._it: Iterator[Tensor] = iter(noises)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return next(self._it)


def recorded(seed: int, count: int, shape: Sequence[int] = SHAPE) -> list[Tensor]:
    """What diffusers' ``randn_tensor(shape, generator=Generator().manual_seed(seed))`` draws."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=g) for _ in range(count)]


def start_noise(seed: int = 0, shape: Sequence[int] = SHAPE) -> Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def noise_for(info: SamplerInfo, shape: Sequence[int], sigmas: Tensor, seeds: Sequence[int]) -> Callable:
    if info.brownian_noise:
        return BrownianTreeNoiseSampler.for_sigmas(shape, sigmas, seeds)
    return SeededNoise(shape, seeds)


# --------------------------------------------------------------------------------------------------
# 1. Parity with diffusers. Each diffusers loop runs an eps model that reads the VE sigma the scheduler
# is at (its ``sigmas[step_index]``), so both sides evaluate the same function at the same points;
# tolerance 2e-4 absolute on latents of magnitude ~1 (float32 throughout, diffusers' alphas in float32).

ATOL = 2e-4

diffusers = pytest.importorskip("diffusers")


def _k_style_loop(sched, z: Tensor, noises: Sequence[Tensor] | None = None) -> Tensor:
    """diffusers loop for the k-diffusion-style schedulers (sample in VE form)."""
    x = z * sched.init_noise_sigma
    kwargs = {"generator": torch.Generator().manual_seed(1234)} if noises is not None else {}
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        sigma = float(sched.sigmas[sched.step_index])
        x = sched.step(eps_vp(inp, sigma), t, x, **kwargs).prev_sample
    return x


def _vp_loop(sched, z: Tensor, noises: Sequence[Tensor] | None = None, sigma_of_t: bool = False) -> Tensor:
    """diffusers loop for the schedulers whose sample is the VP latent."""
    x = z.clone()
    for i, t in enumerate(sched.timesteps):
        if sigma_of_t:
            sigma = float(SCHEDULE.sigmas[int(t)])
        else:
            sigma = float(sched.sigmas[sched.step_index if sched.step_index is not None else 0])
        kwargs = {"variance_noise": noises[i]} if noises is not None else {}
        x = sched.step(eps_vp(sched.scale_model_input(x, t), sigma), t, x, **kwargs).prev_sample
    return x


def _ours_vp(fn: Callable, info: SamplerInfo, sigmas: Tensor, z: Tensor, **kwargs) -> Tensor:
    """Run ours from the same VP noise and convert the result to the VP latent (x_ve = x_vp / sqrt(abar))."""
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = fn(gaussian_denoiser, x, sigmas, **kwargs)
    return out * info.final_scale(float(sigmas[-1]))


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_matches_diffusers(steps: int) -> None:
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(steps)
    z = start_noise()
    theirs = _k_style_loop(sched, z)
    ours = sample_euler(gaussian_denoiser, z * sched.sigmas[0], sched.sigmas)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_euler_ancestral_matches_diffusers() -> None:
    steps = 15
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(steps)
    z = start_noise()
    theirs = _k_style_loop(sched, z, noises=[])
    ours = sample_euler_ancestral(
        gaussian_denoiser, z * sched.sigmas[0], sched.sigmas, noise=RecordedNoise(recorded(1234, steps))
    )
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_heun_matches_diffusers() -> None:
    sched = diffusers.HeunDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(12)
    z = start_noise()
    theirs = _k_style_loop(sched, z)
    # diffusers interleaves the sigmas of the second evaluations: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0].
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1::2]])
    assert len(sigmas) == 13
    ours = sample_heun(gaussian_denoiser, z * sigmas[0], sigmas)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_lms_matches_diffusers() -> None:
    pytest.importorskip("scipy")
    sched = diffusers.LMSDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(15)
    z = start_noise()
    theirs = _k_style_loop(sched, z)
    ours = sample_lms(gaussian_denoiser, z * sched.sigmas[0], sched.sigmas)
    # diffusers integrates with scipy quad (epsrel 1e-4); ours is exact Gauss-Legendre.
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_lms_coefficients_integrate_polynomials_exactly() -> None:
    """Without scipy: the LMS weights must integrate any derivative polynomial of degree < order
    exactly. With d(sigma) = sigma^3 (order 4, from the 4th step on) x moves by the exact integral."""
    sigmas = get_sigmas("Karras", SCHEDULE, 8, SAMPLERS["LMS"]).double()

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma[0])
        return x - s * s**3  # d = (x - D) / sigma = sigma^3

    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    warm = sample_lms(model, x0, sigmas[:4], order=4)  # lower-order warm-up steps are inexact
    out = sample_lms(model, x0, sigmas, order=4)
    assert out.shape == x0.shape
    # Run the last steps from the warm-up state: from step 3 on the order is 4 and exact for sigma^3.
    expected_tail = (float(sigmas[-1]) ** 4 - float(sigmas[3]) ** 4) / 4
    tail = out - warm
    assert abs(float(tail) - expected_tail) < 1e-9 * max(1.0, abs(expected_tail))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(karras: bool) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    sched.set_timesteps(12)
    z = start_noise()
    theirs = _vp_loop(sched, z)
    ours = _ours_vp(sample_dpmpp_2m, SAMPLERS["DPM++ 2M"], sched.sigmas, z)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_dpmpp_2m_sde_matches_diffusers() -> None:
    steps = 12
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    sched.set_timesteps(steps)
    z = start_noise()
    noises = recorded(7, steps)
    theirs = _vp_loop(sched, z, noises=noises)
    ours = _ours_vp(
        sample_dpmpp_2m_sde, SAMPLERS["DPM++ 2M SDE"], sched.sigmas, z, noise=RecordedNoise(noises)
    )
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_matches_diffusers(eta: float) -> None:
    steps = 20
    sched = diffusers.DDIMScheduler(
        **SD_CONFIG, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(steps)
    info = SAMPLERS["DDIM"]
    sigmas = get_sigmas("Automatic", SCHEDULE, steps, info)
    torch.testing.assert_close(sigmas[:-1], SCHEDULE.sigmas[sched.timesteps])
    z = start_noise()
    noises = recorded(3, steps)
    x = z.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(
            eps_vp(x, float(SCHEDULE.sigmas[t])), t, x, eta=eta, variance_noise=noises[i]
        ).prev_sample
    ours = _ours_vp(sample_ddim, info, sigmas, z, eta=eta, noise=RecordedNoise(noises))
    torch.testing.assert_close(ours, x, atol=ATOL, rtol=0)


def test_ddim_eta0_equals_euler() -> None:
    sigmas = get_sigmas("Karras", SCHEDULE, 10, SAMPLERS["DDIM"])
    x = start_noise() * sigmas[0]
    torch.testing.assert_close(
        sample_ddim(gaussian_denoiser, x, sigmas),
        sample_euler(gaussian_denoiser, x, sigmas),
        atol=1e-5,
        rtol=0,
    )


def test_ddim_eta1_equals_euler_ancestral() -> None:
    sigmas = get_sigmas("Karras", SCHEDULE, 10, SAMPLERS["DDIM"])
    x = start_noise() * sigmas[0]
    a = sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, noise=RecordedNoise(recorded(5, 10)))
    b = sample_euler_ancestral(gaussian_denoiser, x, sigmas, eta=1.0, noise=RecordedNoise(recorded(5, 10)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_plms_matches_diffusers_pndm() -> None:
    steps = 20  # 1000 / 20 is whole, so A1111's range() timesteps equal diffusers' "leading" ones
    sched = diffusers.PNDMScheduler(
        **SD_CONFIG, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    sched.set_timesteps(steps)
    z = start_noise()
    theirs = _vp_loop(sched, z, sigma_of_t=True)
    info = SAMPLERS["PLMS"]
    ours = _ours_vp(sample_plms, info, get_sigmas("Automatic", SCHEDULE, steps, info), z)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("order", "variant", "final"),
    [(2, "bh2", "zero"), (3, "bh2", "zero"), (3, "bh1", "sigma_min"), (2, "bh1", "sigma_min")],
)
def test_unipc_matches_diffusers(order: int, variant: str, final: str) -> None:
    steps = 9  # 999 / 9 is whole, so diffusers' rounded timesteps equal Time Uniform's
    sched = diffusers.UniPCMultistepScheduler(
        **SD_CONFIG, solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    sched.set_timesteps(steps)
    info = SAMPLERS["UniPC"]
    if final == "sigma_min":
        sigmas = get_sigmas("Automatic", SCHEDULE, steps, info)
        torch.testing.assert_close(sigmas, sched.sigmas.float(), rtol=1e-4, atol=0)  # float32 alphas
    else:
        sigmas = sched.sigmas.float()
    z = start_noise()
    theirs = _vp_loop(sched, z)
    ours = _ours_vp(sample_unipc, info, sigmas, z, order=order, variant=variant)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_lcm_matches_diffusers() -> None:
    steps = 4
    sched = diffusers.LCMScheduler(**SD_CONFIG, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    info = SAMPLERS["LCM"]
    sigmas = get_sigmas("Automatic", SCHEDULE, steps, info)
    torch.testing.assert_close(sigmas[:-1], SCHEDULE.sigmas[sched.timesteps])

    def boundary(t: float) -> tuple[float, float]:
        # LCM's consistency boundary condition (sigma_data 0.5, timestep scaling 10): the denoiser's job.
        scaled = 10.0 * t
        return 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)

    z = start_noise()
    noises = recorded(11, steps)
    g = torch.Generator().manual_seed(11)
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(eps_vp(x, float(SCHEDULE.sigmas[t])), t, x, generator=g).prev_sample

    def lcm_denoiser(x_ve: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out = boundary(float(SCHEDULE.sigma_to_t(sigma[:1])))
        x_vp = x_ve / math.sqrt(1 + float(sigma[0]) ** 2)
        return c_out * gaussian_denoiser(x_ve, sigma) + c_skip * x_vp

    ours = sample_lcm(
        lcm_denoiser, z * info.initial_scale(float(sigmas[0])), sigmas, noise=RecordedNoise(noises)
    )
    torch.testing.assert_close(ours, x, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# 2. Convergence: from x = sigmas[0] * noise every sampler reaches N(MU, S^2). 2 x 4096 dims; the
# Monte-Carlo error of the std is ~0.8%. First-order samplers get 250 steps and 7%, the rest 50 steps
# and 5% on the std; the mean within 0.02 (the deterministic samplers start from mean 0, not MU, and
# keep MU * S / sigma_max = 0.01 of that).

FIRST_ORDER = {"Euler", "Euler a", "DDIM", "LCM"}


def _convergence_cases() -> list[tuple[str, str]]:
    cases = []
    for name in SAMPLERS:
        for scheduler in ("Automatic", "Karras", "Exponential"):
            if name == "LCM" and scheduler == "Automatic":
                continue  # the LCM schedule starts at 4 steps' worth of noise; tested below
            cases.append((name, scheduler))
    return cases


@pytest.mark.parametrize(("name", "scheduler"), _convergence_cases())
def test_sampler_converges_on_gaussian(name: str, scheduler: str) -> None:
    info = SAMPLERS[name]
    steps = 250 if name in FIRST_ORDER else 50
    tol = 0.07 if name in FIRST_ORDER else 0.05
    shape = (2, 4, 32, 32)
    sigmas = get_sigmas(scheduler, SCHEDULE, steps, info)
    z = start_noise(1, shape)
    z = (z - z.mean()) / z.std()  # exact moments, so the deterministic samplers show only their error
    model = gaussian_consistency if name == "LCM" else gaussian_denoiser
    x = info.function(
        model, z * info.initial_scale(float(sigmas[0])), sigmas, noise=noise_for(info, shape, sigmas, [5, 6])
    )
    x = x * info.final_scale(float(sigmas[-1]))
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) / S - 1) < tol


def test_lcm_default_schedule_samples_exactly_with_a_consistency_function() -> None:
    info = SAMPLERS["LCM"]
    shape = (2, 4, 32, 32)
    sigmas = get_sigmas("Automatic", SCHEDULE, 4, info)
    x = info.function(
        gaussian_consistency, start_noise(1, shape) * sigmas[0], sigmas, noise=SeededNoise(shape, [1, 2])
    )
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) / S - 1) < 0.03


# --------------------------------------------------------------------------------------------------
# 3. The common contract, for every registered sampler.


def _common_sigmas(info: SamplerInfo) -> Tensor:
    return get_sigmas("Automatic", SCHEDULE, 4 if info.name == "LCM" else 8, info)


def _run(info: SamplerInfo, x: Tensor, sigmas: Tensor, seeds: Sequence[int], callback=None) -> Tensor:
    return info.function(
        gaussian_denoiser, x, sigmas, noise=noise_for(info, x.shape, sigmas, seeds), callback=callback
    )


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step(name: str) -> None:
    info = SAMPLERS[name]
    sigmas = _common_sigmas(info)
    steps: list[SamplerStep] = []
    x = start_noise() * info.initial_scale(float(sigmas[0]))
    _run(info, x, sigmas, [1, 2], callback=steps.append)
    n = len(sigmas) - 1
    assert [s.i for s in steps] == list(range(n))
    assert all(s.total == n for s in steps)
    assert all(s.x.shape == x.shape and s.denoised.shape == x.shape for s in steps)
    assert float(steps[0].sigma) == pytest.approx(float(sigmas[0]))
    with pytest.raises(AttributeError):
        steps[0].i = 5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_deterministic_given_noise(name: str) -> None:
    info = SAMPLERS[name]
    sigmas = _common_sigmas(info)
    x = start_noise() * info.initial_scale(float(sigmas[0]))
    a = _run(info, x, sigmas, [1, 2])
    b = _run(info, x, sigmas, [1, 2])
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    if info.stochastic:
        assert not torch.equal(a, _run(info, x, sigmas, [3, 4]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batch_item_equals_item_alone(name: str) -> None:
    info = SAMPLERS[name]
    sigmas = _common_sigmas(info)
    x = start_noise() * info.initial_scale(float(sigmas[0]))
    batch = _run(info, x, sigmas, [10, 20])
    alone = _run(info, x[1:2], sigmas, [20])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n, i in SAMPLERS.items() if i.stochastic])
def test_stochastic_sampler_without_noise_raises(name: str) -> None:
    info = SAMPLERS[name]
    sigmas = _common_sigmas(info)
    with pytest.raises(ValueError, match="noise sampler"):
        info.function(gaussian_denoiser, start_noise() * sigmas[0], sigmas)


def test_registry_fields() -> None:
    expected = [
        "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
        "DPM++ 2M SDE", "DPM++ 3M SDE", "LMS", "DDIM", "PLMS", "UniPC", "LCM",
    ]  # fmt: skip
    assert sorted(SAMPLERS) == sorted(expected)
    assert SAMPLERS["Euler a"].default_eta == 1.0 and SAMPLERS["DDIM"].default_eta == 0.0
    assert {n for n, i in SAMPLERS.items() if i.timestep_based} == {"DDIM", "PLMS", "UniPC"}
    assert {n for n, i in SAMPLERS.items() if i.brownian_noise} == {
        "DPM++ SDE",
        "DPM++ 2M SDE",
        "DPM++ 3M SDE",
    }
    ddim = SAMPLERS["DDIM"]
    assert ddim.initial_scale(14.0) == pytest.approx(math.sqrt(1 + 14.0**2))
    assert ddim.final_scale(0.03) == pytest.approx(1 / math.sqrt(1 + 0.03**2))
    assert SAMPLERS["Euler"].initial_scale(14.0) == 14.0 and SAMPLERS["Euler"].final_scale(0.0) == 1.0
    assert ddim.needs_noise() is False and ddim.needs_noise(0.5) is True
    assert SAMPLERS["Euler a"].needs_noise() and not SAMPLERS["Euler a"].needs_noise(0.0)
    assert SAMPLERS["LCM"].needs_noise() and not SAMPLERS["DPM++ 2M"].needs_noise()
    assert SAMPLERS["PLMS"].model_calls(10) == 11 and SAMPLERS["Heun"].model_calls(10) == 20


def test_ancestral_step_splits_variance() -> None:
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0, 1.0) == (0.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Brownian tree


def test_brownian_increments_are_standard_normal_and_additive() -> None:
    shape = (2, 4, 32, 32)
    tree = BrownianTreeNoiseSampler(shape, 0.03, 14.6, [1, 2])
    a, b, c = torch.tensor(10.0), torch.tensor(3.0), torch.tensor(0.5)
    ab, bc, ac = tree(a, b), tree(b, c), tree(a, c)
    for z in (ab, bc, ac):
        assert z.shape == shape and z.dtype == torch.float32
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    # W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)), each returned normalised by sqrt|dt|.
    torch.testing.assert_close(
        ac * math.sqrt(9.5), ab * math.sqrt(7.0) + bc * math.sqrt(2.5), atol=1e-4, rtol=0
    )
    # Disjoint increments are independent; images are independent.
    assert abs(float((ab * bc).mean())) < 0.05
    assert abs(float((ab[0] * ab[1]).mean())) < 0.05
    # Querying again (any order) gives the same path.
    torch.testing.assert_close(tree(b, c), bc, atol=0, rtol=0)
    assert torch.equal(BrownianTreeNoiseSampler(shape, 0.03, 14.6, [1, 2])(a, b), ab)


def test_brownian_tree_per_image_seed() -> None:
    shape = (2, 3, 4, 4)
    both = BrownianTreeNoiseSampler(shape, 0.03, 14.6, [7, 8])(torch.tensor(5.0), torch.tensor(1.0))
    alone = BrownianTreeNoiseSampler((1, 3, 4, 4), 0.03, 14.6, [8])(torch.tensor(5.0), torch.tensor(1.0))
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match="one seed per batch item"):
        BrownianTreeNoiseSampler(shape, 0.03, 14.6, [7])


# --------------------------------------------------------------------------------------------------
# 4. Names


@pytest.mark.parametrize(
    ("name", "sampler", "scheduler"),
    [
        ("Euler a", "Euler a", None),
        ("euler A", "Euler a", None),
        ("k_euler_a", "Euler a", None),
        ("DPM++ 2M", "DPM++ 2M", None),
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE", "DPM++ 2M SDE", None),
        ("DPM++ 3M SDE Exponential", "DPM++ 3M SDE", "Exponential"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("DPM++ 2S a Karras", "DPM++ 2S a", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("Euler SGM Uniform", "Euler", "SGM Uniform"),
        ("  UniPC  ", "UniPC", None),
        ("DDIM", "DDIM", None),
    ],
)
def test_resolve_sampler(name: str, sampler: str, scheduler: str | None) -> None:
    info, sched = resolve_sampler(name)
    assert info.name == sampler and sched == scheduler


@pytest.mark.parametrize("name", ["Foo", "DPM++ 2M Foo", "Karras", "DPM++ 4M", ""])
def test_resolve_unknown_sampler_lists_names(name: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_sampler(name)
    for valid in SAMPLERS:
        assert valid in str(err.value)
