"""The whole model as one module whose state-dict keys equal the original single-file checkpoint's.

``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (text encoder):
loading a real ``.safetensors``/``.ckpt`` is ``load_state_dict`` with no renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from sdstudio.models.clip import build_text_encoder
from sdstudio.models.configs import ModelConfig, UNetConfig
from sdstudio.models.sdxl import GeneralConditioner
from sdstudio.models.unet import UNetModel
from sdstudio.models.vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SDXL_TEXT_PREFIX = "conditioner."  # SDXL: conditioner.embedders.N.*
EMA_PREFIX = "model_ema."


class DiffusionWrapper(nn.Module):
    """LDM's ``DiffusionWrapper``: only here so the UNet's keys start with ``model.diffusion_model``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.diffusion_model = UNetModel(config)


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(config.unet)
        self.first_stage_model = AutoencoderKL(config.vae)
        # The text side under the checkpoint's own prefix: one encoder, or SDXL's conditioner.
        if config.is_sdxl:
            self.conditioner = GeneralConditioner(config)
        else:
            self.cond_stage_model = build_text_encoder(config.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        """The text side: a ``TextEncoder``, or SDXL's ``GeneralConditioner``."""
        return self.conditioner if self.config.is_sdxl else self.cond_stage_model

    @property
    def text_prefix(self) -> str:
        return SDXL_TEXT_PREFIX if self.config.is_sdxl else TEXT_PREFIX

    def parameter_counts(self) -> dict[str, int]:
        return {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "vae": sum(p.numel() for p in self.vae.parameters()),
            "text_encoder": sum(p.numel() for p in self.text_encoder.parameters()),
        }


def ema_key(unet_key: str) -> str:
    """The key LDM's ``LitEma`` stores a UNet parameter under: ``model.a.b`` -> ``model_ema.ab``."""
    assert unet_key.startswith("model.")
    return EMA_PREFIX + unet_key[len("model.") :].replace(".", "")


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """A randomly initialised model (PyTorch's default inits), reproducible from ``seed``."""
    with torch.random.fork_rng(devices=[]):  # module inits draw from the global generator
        torch.manual_seed(seed)
        model = StableDiffusion(config)
    return model.to(dtype).eval().requires_grad_(False)
