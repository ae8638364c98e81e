"""AutoencoderKL: checkpoint layout, and numerical parity with diffusers' AutoencoderKL.

Parity procedure: random weights in our (original-checkpoint) layout -> diffusers' own single-file
converter -> strict load into diffusers' ``AutoencoderKL`` -> same inputs -> max abs diff <= 1e-4 (fp32).
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from sdstudio.models.configs import VAEConfig, preset
from sdstudio.models.vae import AutoencoderKL, LatentDistribution
from tests.reference import randomise_

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

PREFIX = "first_stage_model."
ATOL = 1e-4


def random_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    model.to_empty(device="cpu")
    randomise_(model, seed)
    return model.eval()


def diffusers_config(config: VAEConfig) -> dict[str, Any]:
    """diffusers' own reading of an original LDM yaml that describes ``config``."""
    ddconfig = {
        "double_z": True,
        "z_channels": config.z_channels,
        "in_channels": config.in_channels,
        "out_ch": config.out_ch,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [],
    }
    original = {
        "model": {
            "params": {
                "scale_factor": config.scale_factor,
                "first_stage_config": {"params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there; it only sets sample_size
        result = create_vae_diffusers_config_from_ldm(original, {}, image_size=512)
    result["norm_num_groups"] = config.norm_groups  # not in the yamls: LDM hard-codes 32
    return result


def converted(model: AutoencoderKL, config: dict[str, Any]) -> dict[str, Tensor]:
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    return convert_ldm_vae_checkpoint(checkpoint, config)


def reference_vae(model: AutoencoderKL) -> DiffusersAutoencoderKL:
    dconfig = diffusers_config(model.config)
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL(**dconfig)
    result = ref.load_state_dict(converted(model, dconfig), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(t.device.type == "cpu" for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def assert_parity(config: VAEConfig, image_size: int, batch: int = 2) -> None:
    model = random_vae(config)
    ref = reference_vae(model)
    gen = torch.Generator().manual_seed(99)
    x = torch.rand(batch, config.in_channels, image_size, image_size, generator=gen) * 2 - 1  # [-1, 1]
    latent = image_size // config.downsample
    z = torch.randn(batch, config.embed_dim, latent, latent, generator=gen)
    with torch.no_grad():
        ours = model.encode(x)
        theirs = ref.encode(x).latent_dist
        decoded = model.decode(z)
        ref_decoded = ref.decode(z).sample
    assert ours.mean.shape == (batch, config.embed_dim, latent, latent)
    assert decoded.shape == (batch, config.out_ch, image_size, image_size)
    for value in (ours.mean, ours.logvar, decoded):
        assert value.std() > 0.1, "outputs near constant: parity would be vacuous"
    torch.testing.assert_close(ours.mean, theirs.mean, rtol=0.0, atol=ATOL)
    torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=0.0, atol=ATOL)
    torch.testing.assert_close(decoded, ref_decoded, rtol=0.0, atol=ATOL)
    del model, ref


# --- layout -----------------------------------------------------------------------------------------


def test_sd15_keys_and_parameter_count() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(preset("sd15").vae)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    known = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.bias": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.norm2.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv1.weight": (128, 128, 3, 3),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in state)
    assert len(state) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_sd2_vae_is_sd15_vae() -> None:
    """So the full-width parity test below covers both."""
    assert preset("sd2").vae == preset("sd15").vae == preset("sd15-inpaint").vae


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_layout_matches_diffusers_converter(name: str) -> None:
    config = preset(name).vae
    dconfig = diffusers_config(config)
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        ref = DiffusersAutoencoderKL(**dconfig)
    mapped = converted(ours, dconfig)
    assert len(mapped) == len(ours.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


# --- the posterior ----------------------------------------------------------------------------------


def test_latent_distribution_sample_and_mode() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, logvar, noise = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    dist = LatentDistribution(mean=mean, logvar=logvar)
    torch.testing.assert_close(dist.sample(noise), mean + torch.exp(0.5 * logvar) * noise)
    assert dist.mode() is mean


def test_logvar_is_clamped() -> None:
    model = random_vae(preset("tiny").vae)
    embed = model.config.embed_dim
    with torch.no_grad():
        model.quant_conv.bias[embed:] = torch.tensor([1e3, -1e3, 0.0, 0.0])  # the logvar channels
        dist = model.encode(torch.zeros(1, 3, 16, 16))
    assert torch.all(dist.logvar[:, 0] == 20.0) and torch.all(dist.logvar[:, 1] == -30.0)


# --- parity with diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_parity_tiny(name: str) -> None:
    assert_parity(preset(name).vae, image_size=32)


@pytest.mark.slow
def test_parity_full_width() -> None:
    try:
        assert_parity(preset("sd15").vae, image_size=64, batch=1)
    finally:
        gc.collect()


def test_bf16_close_to_fp32() -> None:
    model = random_vae(preset("tiny").vae, seed=5)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.decode(z)
        half = model.to(torch.bfloat16).decode(z)
    assert half.dtype == torch.bfloat16
    relative = (half.float() - full).norm() / full.norm()
    assert relative < 0.05, relative
