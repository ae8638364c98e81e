"""The UNet as a denoiser in sigma space, for sampling (``__call__``) and training (``loss``) alike.

k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser`` (Karras et al. 2022, Table 1 and
Appendix B.6; v-prediction from Salimans & Ho 2022): ``D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma))``.
One object serves both directions so the trainer cannot drift from the sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sdstudio.diffusion.noise import to_device
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.models.configs import Prediction

if TYPE_CHECKING:  # the types only: diffusion imports neither adapters nor training at run time
    from sdstudio.adapters.hypernetwork import HypernetworkStack
    from sdstudio.training.distributed import Rows


# ControlNet residuals of one UNet evaluation: (UNet input [B, 4, h, w], timesteps [B], context, SDXL vector or
# None) -> one residual per input block and the middle block's, or None where no control applies.
ControlFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], "list[Tensor] | None"]


@dataclass(frozen=True)
class Denoiser:
    unet: nn.Module
    schedule: DiscreteSchedule
    prediction: Prediction = "epsilon"
    quantize: bool = True  # feed the nearest training timestep (as AUTOMATIC1111 and diffusers do)
    token_merging: float = 0.0  # ToMe ratio passed to the UNet (0: exact)
    hypernetworks: HypernetworkStack | None = None  # A1111 hypernetworks passed to the UNet (None: none)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each [B, 1, 1, 1]; sigma_data = 1 as in SD."""
        sigma = sigma.float()[:, None, None, None]
        c_in = 1 / (sigma**2 + 1) ** 0.5
        if self.prediction == "v":
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in
        return torch.ones_like(sigma), -sigma, c_in

    def raw(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor,
        extra: Tensor | None = None,
        vector: Tensor | None = None,
        control: ControlFn | None = None,
    ) -> Tensor:
        """The network's own output F (eps or v) for the VE latent ``x`` at ``sigma``. [B, C, h, w]

        ``vector``: SDXL's ``y`` [B, adm_in_channels] (pooled text and micro-conditioning); None otherwise.
        ``control``: ControlNet residuals for the UNet's input (``c_in x``, the latent channels only), its
        timesteps, context and vector; None, or a call that returns None: no control at this evaluation."""
        sigma = to_device(sigma, x.device)  # samplers keep sigma on the CPU: read there without a sync
        _, _, c_in = self.scalings(sigma)
        t = self.schedule.sigma_to_t(sigma.float(), quantize=self.quantize)
        inp = x.float() * c_in
        if extra is not None:  # inpainting models: mask and masked-image latents as extra channels
            inp = torch.cat([inp, extra.float()], dim=1)
        dtype = next(self.unet.parameters()).dtype
        # options only when set: the UNet is any module taking (x, t, context), as in tests
        options: dict[str, Any] = {}
        if self.token_merging:
            options["token_merging"] = self.token_merging
        if self.hypernetworks is not None:
            options["hypernetworks"] = self.hypernetworks
        if vector is not None:
            options["y"] = vector.to(x.device, dtype)
        if control is not None:
            y = options.get("y")
            residuals = control(inp[:, : x.shape[1]].to(dtype), t, context.to(dtype), y)
            if residuals is not None:
                options["control"] = residuals
        return self.unet(inp.to(dtype), t, context.to(dtype), **options).float()

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor,
        extra: Tensor | None = None,
        vector: Tensor | None = None,
        control: ControlFn | None = None,
    ) -> Tensor:
        """The x0 estimate, float32. x [B, C, h, w], sigma [B] (any device), context [B, tokens, width],
        vector [B, adm_in_channels] for SDXL, control as for :meth:`raw`."""
        sigma = to_device(sigma, x.device)
        c_skip, c_out, _ = self.scalings(sigma)
        return x.float() * c_skip + self.raw(x, sigma, context, extra, vector, control) * c_out

    def loss(
        self,
        x0: Tensor,
        noise: Tensor,
        sigma: Tensor,
        context: Tensor,
        extra: Tensor | None = None,
        snr_gamma: float = 0.0,
        vector: Tensor | None = None,
        control: ControlFn | None = None,
        teacher: Denoiser | None = None,
    ) -> Tensor:
        """Per-sample MSE between F and its target (eps, or v), the DDPM objective. [B]

        ``vector`` / ``control``: SDXL's y and ControlNet residuals, as for :meth:`raw` (training a
        ControlNet passes its residuals here, the UNet frozen).

        ``teacher``: the target is instead the teacher's own output F at the same noised latents, sigma and
        context (without a gradient): a distillation loss, zero while the network equals its teacher. Prior
        preservation against the base model (``PriorPreservation.target == "base"``) uses it; the teacher
        must predict what this denoiser predicts.

        ``snr_gamma > 0`` weights it by Min-SNR-gamma (Hang et al. 2023, as diffusers' ``--snr_gamma``):
        ``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma) / (SNR + 1)`` for v, with SNR = 1 / sigma^2.
        Low-noise steps, whose eps error stands for a tiny x0 error, stop dominating the gradient.
        """
        sigma = to_device(sigma, x0.device)
        c_skip, c_out, _ = self.scalings(sigma)
        noised = x0.float() + noise.float() * sigma.float()[:, None, None, None]
        if teacher is None:
            target = (x0.float() - c_skip * noised) / c_out
        else:
            if teacher.prediction != self.prediction:
                raise ValueError(f"a {teacher.prediction} teacher for a {self.prediction} denoiser")
            with torch.no_grad():
                target = teacher.raw(noised, sigma, context, extra, vector, control).float()
        mse = (self.raw(noised, sigma, context, extra, vector, control) - target).pow(2).flatten(1).mean(1)
        if snr_gamma <= 0:
            return mse
        snr = sigma.float().pow(-2)
        return mse * snr.clamp(max=snr_gamma) / (snr + 1 if self.prediction == "v" else snr)

    def training_loss(
        self,
        x0: Tensor,
        context: Tensor,
        generator: torch.Generator,
        *,
        extra: Tensor | None = None,
        snr_gamma: float = 0.0,
        noise_offset: float = 0.0,
        rows: Rows | None = None,
        vector: Tensor | None = None,
        control: ControlFn | None = None,
        teacher: Denoiser | None = None,
    ) -> Tensor:
        """:meth:`loss` at random training timesteps, what every fine-tuning method minimises. [B]

        Draws from ``generator`` (on the CPU, so a seed gives the same run on any device), in this order:
        timesteps uniform over the schedule's training steps (as kohya and diffusers draw them, here as their
        sigmas) [B], noise like ``x0``, and with ``noise_offset`` (kohya / diffusers ``--noise_offset``, after
        Guttenberg's "Diffusion with Offset Noise") ``noise_offset * N(0, 1)`` per sample and channel added
        to the noise, so that the model learns to change an image's mean brightness.

        ``rows`` (data-parallel training, ``sdstudio.training.distributed``): ``x0`` and ``context`` are this
        rank's rows of a global batch of ``rows.total``; everything is drawn for the global batch, as one
        process would draw it, and this rank's rows kept, so the ranks together compute what one process does.
        The losses come back times the rows' weights (1 unless the batch does not split evenly)."""
        sigmas = self.schedule.sigmas
        total = x0.shape[0] if rows is None else rows.total
        if rows is not None and len(rows.index) != x0.shape[0]:
            raise ValueError(f"{x0.shape[0]} rows given for a shard of {len(rows.index)}")
        shape = (total, *x0.shape[1:])
        t = torch.randint(0, len(sigmas), (total,), generator=generator)
        noise = torch.randn(shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
        if rows is not None:
            t, noise = rows.take(t), rows.take(noise)
        sigma = sigmas.cpu()[t].to(x0.device)
        losses = self.loss(
            x0, noise.to(x0), sigma, context, extra, snr_gamma=snr_gamma, vector=vector, control=control,
            teacher=teacher,
        )
        return losses if rows is None else rows.weigh(losses)
