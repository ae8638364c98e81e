"""Per-step conditioning in the sampler loop: prompt editing switches at the right step for one- and
two-evaluation samplers, AND combines as A1111 does, and every UNet call is one batch."""

import math

import pytest
import torch

from sdstudio.diffusion.guidance import CFGDenoiser, PromptGuidedDenoiser
from sdstudio.diffusion.samplers import sample_dpm_2, sample_euler, sample_heun
from sdstudio.prompt.parser import parse
from sdstudio.types import CondSchedule, WeightedCond

TEXTS = ("cat", "dog", "bird", "blurry", "ugly", "")
SIGMAS = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # 10 steps
STEPS = 10


class StubDenoiser:
    """Returns, for each batch row, the id of the conditioning it was given (conds[k] is filled with
    k), and records every call's (sigma, ids)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, extra=None):
        ids = context[:, 0, 0].round().long()
        self.calls.append((round(float(sigma[0]), 4), ids.tolist()))
        return ids.float()[:, None, None, None].expand_as(x).clone()


def conds():
    return torch.arange(len(TEXTS), dtype=torch.float32)[:, None, None].expand(-1, 3, 4).clone()


def schedule(prompt, composable=True):
    """(weight, CondSchedule) per sub-prompt, rows looked up in TEXTS."""
    parsed = parse(prompt, STEPS, composable=composable)
    return tuple(
        WeightedCond(sub.weight, CondSchedule(tuple(e.end_at_step for e in sub.schedule),
                                              tuple(TEXTS.index(e.text.strip()) for e in sub.schedule)))
        for sub in parsed.subprompts
    )


def guided(stub, prompt, negative="", scale=7.0, sigmas=SIGMAS):
    return PromptGuidedDenoiser(stub, conds(), schedule(prompt), schedule(negative, False)[0].schedule,
                                scale, tuple(sigmas.tolist()))


def seen(stub):
    """(sigma, cond id) of each call, from a run at scale 1 (cond only)."""
    return [(sigma, ids[0]) for sigma, ids in stub.calls]


def test_prompt_editing_switches_at_the_scheduled_step_with_euler():
    stub = StubDenoiser()
    sample_euler(guided(stub, "[cat:dog:4]", scale=1.0), torch.zeros(1, 1, 2, 2), SIGMAS)
    # A1111 counts steps from 0 and uses an entry through its end_at_step: cat for steps 0..4
    assert seen(stub) == [(10.0 - i, 0 if i <= 4 else 1) for i in range(10)]


def test_heun_sees_the_step_of_each_noise_level_not_a_call_count():
    stub = StubDenoiser()
    sample_heun(guided(stub, "[cat:dog:4]", scale=1.0), torch.zeros(1, 1, 2, 2), SIGMAS)
    calls = seen(stub)
    assert len(calls) == 19  # two evaluations per step, one on the last step into sigma 0
    # the second evaluation of step i is at sigmas[i + 1]: it gets that noise level's conditioning,
    # so the switch happens at sigma 5 as with Euler (a call counter would switch at the 6th call, sigma 8)
    assert calls == [(s, 0 if s >= 6.0 else 1) for s in [10.0] + [s for i in range(1, 10) for s in (10.0 - i,) * 2]]


def test_midpoints_belong_to_their_step_and_alternation_follows_a1111():
    stub = StubDenoiser()
    sample_dpm_2(guided(stub, "[cat|dog]", scale=1.0), torch.zeros(1, 1, 2, 2), SIGMAS)
    # A1111's 0-based step with [a|b]: steps 0, 1 -> cat, then alternating (its schedule starts at 1)
    expected_by_step = [0, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    calls = seen(stub)
    assert len(calls) == 19 and sum(s != int(s) for s, _ in calls) == 9  # 9 midpoints between sigmas
    for sigma, cond in calls:  # a sigma in (sigmas[i + 1], sigmas[i]] = (9 - i, 10 - i] is in step i
        assert cond == expected_by_step[math.floor(10.0 - sigma + 1e-9)], (sigma, cond)
    g = guided(StubDenoiser(), "cat")
    assert [g.step_at(s) for s in (10.0, 9.5, 9.0, 8.999999, 1.0, 0.5, 11.0)] == [0, 0, 1, 1, 9, 9, 0]
    assert g.step_at(float(torch.tensor(7.0000001, dtype=torch.float32))) == 3


def test_and_combines_weighted_differences_against_the_uncond_in_one_batch():
    stub = StubDenoiser()
    g = guided(stub, "cat AND dog :0.5 AND bird :-0.25", negative="blurry", scale=7.0)
    x = torch.zeros(2, 1, 2, 2)  # two images
    out = g(x, torch.full((2,), 10.0))
    u = 3.0
    expected = u + 7.0 * (1.0 * (0 - u) + 0.5 * (1 - u) - 0.25 * (2 - u))
    torch.testing.assert_close(out, torch.full_like(x, expected))
    assert stub.calls == [(10.0, [0, 0, 1, 1, 2, 2, 3, 3])]  # every cond and the uncond, one UNet call


def test_negative_prompt_is_scheduled_and_shared_rows_are_evaluated_once():
    stub = StubDenoiser()
    sample_euler(guided(stub, "cat", negative="[blurry:ugly:2]"), torch.zeros(1, 1, 2, 2), SIGMAS)
    assert [ids for _, ids in stub.calls] == [[0, 3]] * 3 + [[0, 4]] * 7
    stub = StubDenoiser()
    g = guided(stub, "cat AND cat :0.5", negative="cat")
    torch.testing.assert_close(g(torch.zeros(1, 1, 2, 2), torch.tensor([3.0])), torch.zeros(1, 1, 2, 2))
    assert stub.calls == [(3.0, [0])]


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_plain_prompt_matches_the_plain_cfg_denoiser(scale):
    denoiser = lambda x, sigma, ctx, extra=None: x * ctx.mean(dim=(1, 2))[:, None, None, None] + sigma[:, None, None, None]
    c = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 4.0)
    new = PromptGuidedDenoiser(denoiser, c, (WeightedCond(1.0, CondSchedule((10,), (0,))),), CondSchedule((10,), (1,)),
                               scale, tuple(SIGMAS.tolist()))(x, sigma)
    old = CFGDenoiser(denoiser, c[:1].expand(2, -1, -1), c[1:].expand(2, -1, -1), scale)(x, sigma)
    assert torch.equal(new, old)


def ngms_guided(stub, prompt, ngms, all_steps, negative="blurry"):
    return PromptGuidedDenoiser(stub, conds(), schedule(prompt), schedule(negative, False)[0].schedule,
                                7.0, tuple(SIGMAS.tolist()), ngms=ngms, ngms_all_steps=all_steps)


@pytest.mark.parametrize("all_steps", [True, False])
def test_ngms_leaves_the_negative_out_below_its_sigma(all_steps):
    stub = StubDenoiser()
    sample_euler(ngms_guided(stub, "cat", 4.5, all_steps), torch.zeros(1, 1, 2, 2), SIGMAS)
    # steps 6..9 run at sigmas 4, 3, 2, 1 (< 4.5); A1111 skips the uncond on odd steps unless "all steps"
    skipped = {6, 7, 8, 9} if all_steps else {7, 9}
    assert [ids for _, ids in stub.calls] == [[0] if i in skipped else [0, 3] for i in range(10)]
    # a skipped step is the prompt's own prediction, a guided one extrapolates away from the negative
    g = ngms_guided(StubDenoiser(), "dog", 4.5, all_steps)
    x = torch.zeros(1, 1, 2, 2)
    torch.testing.assert_close(g(x, torch.tensor([3.0])), torch.full_like(x, 1.0))  # step 7: skipped
    torch.testing.assert_close(g(x, torch.tensor([5.0])), torch.full_like(x, 3.0 + 7.0 * (1 - 3.0)))


def test_ngms_with_and_uses_the_first_subprompt_as_the_uncond():
    stub = StubDenoiser()
    g = ngms_guided(stub, "cat AND dog :0.5", 4.5, True)
    out = g(torch.zeros(1, 1, 2, 2), torch.tensor([2.0]))
    # AUTOMATIC1111 puts the first sub-prompt's prediction where the uncond's would be
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 0.0 + 7.0 * 0.5 * (1 - 0.0)))
    assert stub.calls == [(2.0, [0, 1])]


def test_ngms_zero_changes_nothing():
    a, b = StubDenoiser(), StubDenoiser()
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out_a = sample_euler(guided(a, "cat", negative="blurry"), x, SIGMAS)
    out_b = sample_euler(ngms_guided(b, "cat", 0.0, True), x, SIGMAS)
    assert a.calls == b.calls and torch.equal(out_a, out_b)


def test_ngms_is_strictly_below_its_sigma():
    stub = StubDenoiser()
    g = ngms_guided(stub, "dog", 3.0, True)
    g(torch.zeros(1, 1, 2, 2), torch.tensor([3.0]))  # sigma == ngms: still guided
    g(torch.zeros(1, 1, 2, 2), torch.tensor([2.9999]))
    assert [ids for _, ids in stub.calls] == [[1, 3], [1]]


def test_ngms_every_other_step_counts_steps_not_calls():
    # Heun evaluates each step twice (at sigmas[i] and sigmas[i + 1]); parity follows the step an
    # evaluation belongs to, as prompt editing does (AUTOMATIC1111 counts calls here: see the docstring)
    stub = StubDenoiser()
    sample_heun(ngms_guided(stub, "cat", 4.5, False), torch.zeros(1, 1, 2, 2), SIGMAS)
    for sigma, ids in stub.calls:
        step = math.floor(10.0 - sigma + 1e-9)
        assert (ids == [0]) == (sigma < 4.5 and step % 2 == 1), (sigma, ids)
