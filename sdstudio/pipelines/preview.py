"""Cheap live previews: latents -> RGB by one fixed linear map of the latent channels, no VAE call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdstudio.io.images import to_pil
from sdstudio.models.configs import VAEConfig
from sdstudio.models.loading import LoadedModel

# AUTOMATIC1111's "Approx cheap" (sd_vae_approx.cheap_approximation) for SD 1.x/2.x's VAE: rows are the
# four scaled latent channels, columns R, G, B in [-1, 1].
SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


@dataclass(frozen=True)
class LatentPreviewer:
    weight: Tensor  # [C, 3]
    bias: Tensor  # [3]

    def rgb(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> approximate images [B, 3, h, w] in [-1, 1]."""
        out = (
            torch.einsum("bchw,cr->brhw", latents.float().cpu(), self.weight) + self.bias[None, :, None, None]
        )
        return out.clamp(-1, 1)

    def __call__(self, latents: Tensor, upscale: int = 1) -> list[Image.Image]:
        images = to_pil(self.rgb(latents))
        if upscale > 1:
            images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
        return images


def fit_previewer(model: LoadedModel, samples: int = 16, seed: int = 0) -> LatentPreviewer:
    """Least-squares fit of ``rgb ~ latents @ W + b`` for any VAE: encode smooth random colour fields and
    regress their colours, average-pooled to the latent grid, on the latents."""
    vae, f = model.model.vae, model.config.vae.downsample
    side = 8 * f
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(samples, 3, 4, 4, generator=gen) * 2 - 1
    images = F.interpolate(colours, size=(side, side), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        latents = vae.encode(images).mean.float().cpu() * model.config.vae.scale_factor  # [N, C, 8, 8]
    target = F.avg_pool2d(images, f)  # [N, 3, 8, 8]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    return LatentPreviewer(solution[:-1].contiguous(), solution[-1].contiguous())


def previewer_for(model: LoadedModel) -> LatentPreviewer:
    """SD's VAE: the well-known coefficients; any other VAE: a fit (:func:`fit_previewer`)."""
    vae = model.config.vae
    if vae == VAEConfig():  # SD 1.x / 2.x architecture and scale factor
        return LatentPreviewer(torch.tensor(SD_LATENT_RGB), torch.zeros(3))
    return fit_previewer(model)
