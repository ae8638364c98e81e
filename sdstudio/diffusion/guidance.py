"""Classifier-free guidance (Ho & Salimans 2022) as denoiser wrappers the samplers call like any other."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sdstudio.diffusion.denoiser import ControlFn, Denoiser
from sdstudio.types import CondSchedule, WeightedCond


def _call(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    context: Tensor,
    extra: Tensor | None,
    vector: Tensor | None,
    control: ControlFn | None = None,
) -> Tensor:
    """``denoiser(x, sigma, context, extra)``, with SDXL's ``vector`` and ControlNet's ``control`` only where
    there are some: any callable of the first four arguments stands for a denoiser of a model without them."""
    if vector is None and control is None:
        return denoiser(x, sigma, context, extra)
    return denoiser(x, sigma, context, extra, vector=vector, control=control)


class Control(Protocol):
    """ControlNets over a sampling pass (``sdstudio.control.apply.ControlStack``): their residuals for a batch
    whose rows ``cond_mask`` marks 1 (prompt) or 0 (negative prompt), at ``progress`` (the step's share of the
    pass, for each network's guidance start / end)."""

    def residuals(
        self, x: Tensor, t: Tensor, context: Tensor, vector: Tensor | None, *, cond_mask: Tensor, progress: float
    ) -> list[Tensor] | None: ...


@dataclass(frozen=True)
class CFGDenoiser:
    """``D(x) = D_u(x) + scale (D_c(x) - D_u(x))``; cond and uncond go through the UNet as one batch.

    Guidance on x0 equals guidance on eps, since x0 = x - sigma eps is affine in eps.
    """

    denoiser: Denoiser
    cond: Tensor  # [B, tokens, width]
    uncond: Tensor  # [B, tokens, width], same token count as cond
    scale: float
    extra: Tensor | None = None  # [B, extra_channels, h, w] for inpainting models
    cond_vector: Tensor | None = None  # SDXL: [B, adm_in_channels] for cond and uncond
    uncond_vector: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.scale == 1.0:
            return _call(self.denoiser, x, sigma, self.cond, self.extra, self.cond_vector)
        extra = None if self.extra is None else torch.cat([self.extra, self.extra])
        vector = None
        if self.cond_vector is not None and self.uncond_vector is not None:
            vector = torch.cat([self.cond_vector, self.uncond_vector])
        out = _call(
            self.denoiser, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.cond, self.uncond]), extra, vector
        )
        cond, uncond = out.chunk(2)
        return uncond + (cond - uncond) * self.scale


DenoiserFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PromptGuidedDenoiser:
    """CFG over scheduled, composable prompts (AUTOMATIC1111's ``CFGDenoiser`` without its counter).

    ``D(x) = D_u(x) + sum_i w_i scale (D_i(x) - D_u(x))`` over the AND sub-prompts ``i`` (Liu et al.
    2022, "Compositional Visual Generation with Composable Diffusion Models"), where each sub-prompt
    and the negative pick their row of ``conds`` for the current step from their schedules.

    The step is derived from sigma, never counted: an evaluation at noise level ``sigma`` belongs to
    step ``i`` with ``sigmas[i + 1] < sigma <= sigmas[i]``. So the second evaluation of Heun-like
    samplers (at ``sigmas[i + 1]``) sees the conditioning of the noise level it evaluates, midpoint
    evaluations (DPM2, DPM++ 2S/SDE) that of their step, and one object can be called in any order.
    Every distinct row in use at a step goes through the UNet in one batch.

    ``ngms`` (AUTOMATIC1111's "Negative Guidance minimum sigma", ``s_min_uncond``): at ``sigma < ngms``
    the negative row is left out of the batch and the first sub-prompt stands in for it, so a plain
    prompt is denoised by itself, without CFG. Unless ``ngms_all_steps``, only on odd steps: A1111
    counts model calls there, this the step an evaluation belongs to (as for prompt editing above), so
    the two agree for one-call samplers (Euler, Euler a, DDIM, DPM++ 2M, ...) and differ for Heun, DPM2
    and the other samplers with two calls a step. Guidance at low noise mostly amplifies the small,
    noise-driven differences between the cond and uncond predictions of a nearly clean image
    (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution
    Quality in Diffusion Models").
    """

    denoiser: Denoiser
    conds: Tensor  # [n_texts, tokens, width], every distinct text's conditioning
    positive: tuple[WeightedCond, ...]
    negative: CondSchedule
    scale: float
    sigmas: tuple[float, ...]  # the sampler's sigma list, decreasing
    extra: Tensor | None = None  # [B, extra_channels, h, w] for inpainting models
    ngms: float = 0.0  # 0: off
    ngms_all_steps: bool = False
    vectors: Tensor | None = None  # SDXL: [n_texts, adm_in_channels], the rows of ``conds``' vectors
    control: Control | None = None  # ControlNets applied at each evaluation

    def _control(self, rows: int, negative_from: int, step: int) -> ControlFn | None:
        """The ControlNets' call for a batch whose rows from ``negative_from`` on are the negative prompt's."""
        if self.control is None:
            return None
        mask = torch.ones(rows)
        mask[negative_from:] = 0.0
        progress = step / max(1, len(self.sigmas) - 1)
        return functools.partial(self.control.residuals, cond_mask=mask, progress=progress)

    def skips_negative(self, sigma: float, step: int) -> bool:
        """Whether the evaluation at ``sigma`` (of ``step``) leaves out the negative (NGMS)."""
        return 0.0 < self.ngms and sigma < self.ngms and (self.ngms_all_steps or step % 2 == 1)

    def step_at(self, sigma: float) -> int:
        """The 0-based step whose interval ``(sigmas[i + 1], sigmas[i]]`` holds ``sigma``."""
        # sigma reaches us as float32; the list is float64: allow for that rounding
        threshold = sigma * (1 - 1e-5)
        for i in range(len(self.sigmas) - 2, -1, -1):
            if self.sigmas[i] >= threshold:
                return i
        return 0

    def rows_at(self, step: int) -> tuple[list[tuple[float, int]], int]:
        """((weight, row) per sub-prompt, negative row) in force at ``step``."""
        return [(c.weight, c.schedule.at(step)) for c in self.positive], self.negative.at(step)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma[0])
        step = self.step_at(s)
        positive, negative = self.rows_at(step)
        batch = x.shape[0]
        skip = self.skips_negative(s, step)
        if skip:
            negative = positive[0][1]  # uncond := the first sub-prompt's prediction
        # one sub-prompt without CFG (scale 1, or NGMS: uncond + w scale (cond - cond) = cond)
        if len(positive) == 1 and (skip or (self.scale == 1.0 and positive[0][0] == 1.0)):
            context = self.conds[positive[0][1]].expand(batch, -1, -1)
            vector = None if self.vectors is None else self.vectors[positive[0][1]].expand(batch, -1)
            return _call(self.denoiser, x, sigma, context, self.extra, vector, self._control(batch, batch, step))
        rows = list(dict.fromkeys([row for _, row in positive] + [negative]))  # distinct, in order
        n = len(rows)
        # rows by slicing and expanding: an index list or repeat_interleave would wait for a GPU
        picked = torch.cat([self.conds[r : r + 1] for r in rows])  # [n, tokens, width]
        context = picked[:, None].expand(n, batch, *picked.shape[1:]).reshape(n * batch, *picked.shape[1:])
        extra = None if self.extra is None else self.extra.repeat(n, *([1] * (self.extra.ndim - 1)))
        vector = None
        if self.vectors is not None:
            vectors = torch.cat([self.vectors[r : r + 1] for r in rows])  # [n, adm]
            vector = vectors[:, None].expand(n, batch, vectors.shape[-1]).reshape(n * batch, -1)
        # rows: the distinct positives, then the negative unless a positive has its text (or NGMS skips it)
        own_negative = all(row != negative for _, row in positive)
        control = self._control(n * batch, (n - 1) * batch if own_negative else n * batch, step)
        out = _call(self.denoiser, x.repeat(n, 1, 1, 1), sigma.repeat(n), context, extra, vector, control)
        out = out.view(n, batch, *out.shape[1:])  # [n, B, C, h, w]
        uncond = out[rows.index(negative)]
        denoised = uncond
        for weight, row in positive:
            denoised = denoised + (out[rows.index(row)] - uncond) * (weight * self.scale)
        return denoised


@dataclass(frozen=True)
class SwitchedDenoiser:
    """SDXL's refiner as AUTOMATIC1111 switches to it (``refiner_switch_at``, by timestep, its default) and as
    diffusers' ``denoising_end`` / ``denoising_start`` split a run: evaluations whose nearest training
    timestep is below ``cutoff`` = round(timesteps * (1 - switch_at)) go to ``second``, the rest to ``first``.
    Derived from sigma, so any sampler calls it in any order."""

    first: DenoiserFn
    second: DenoiserFn
    sigma_to_t: Callable[[Tensor], Tensor]  # the schedule's quantized sigma -> timestep
    cutoff: int

    def uses_second(self, sigma: Tensor) -> bool:
        return int(self.sigma_to_t(sigma.float().max()[None])[0]) < self.cutoff

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.second(x, sigma) if self.uses_second(sigma) else self.first(x, sigma)
