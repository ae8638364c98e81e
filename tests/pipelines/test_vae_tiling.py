"""Tiled VAE decode/encode against the untiled one, on a random VAE with SD's 8x downsampling."""

import pytest
import torch

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import VAEConfig
from sdstudio.models.vae import AutoencoderKL
from sdstudio.pipelines.vae_tiling import (
    Tiling,
    decode,
    decode_checked,
    decoder_context,
    encode_mean,
    encoder_context,
    should_tile,
)

CONFIG = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8)


@pytest.fixture(scope="module")
def vae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))


def test_context_covers_the_convolutions():
    assert decoder_context(VAEConfig()) == 18 and decoder_context(CONFIG) == 14
    assert encoder_context(VAEConfig()) == 15 and encoder_context(CONFIG) == 11
    assert should_tile(97, 96, None) and not should_tile(96, 96, None) and should_tile(8, 8, True)


def test_tiled_decode_matches_untiled(vae, latents):
    with torch.inference_mode():
        full = decode(vae, latents, tiled=False)  # [1, 3, 320, 320]
        # tiles that see everything (2 x 2 of them): the tiling and blending machinery alone is exact
        whole = decode(vae, latents, tiled=True, tiling=Tiling(24, 8, context=40))
        torch.testing.assert_close(whole, full, rtol=0, atol=1e-5)
        # 16-latent tiles (3 x 3 of them) with the convolutions' context: only GroupNorm and the
        # mid-block attention see less than the whole image
        tiled = decode(vae, latents, tiled=True, tiling=Tiling(16, 4))
        bare = decode(vae, latents, tiled=True, tiling=Tiling(16, 4, context=0))
    err, bare_err = (tiled - full).abs(), (bare - full).abs()
    assert full.std() > 0.2
    # measured: mean 0.0096, max 0.21 on images of std 0.36 (random weights; trained VAEs blend better)
    assert err.mean() < 0.015 and err.max() < 0.3, (err.mean(), err.max())
    assert bare_err.mean() > 3 * err.mean()  # without the context, seams


def test_tiled_encode_matches_untiled(vae, latents):
    with torch.inference_mode():
        images = decode(vae, latents, tiled=False).clamp(-1, 1)
        full = encode_mean(vae, images, tiled=False)
        tiled = encode_mean(vae, images, tiled=True, tiling=Tiling(16, 4))
    err = (tiled - full).abs()
    assert err.mean() < 0.02 * full.abs().mean() * 10 and err.max() < 0.5 * full.abs().max(), (
        err.mean(),
        err.max(),
    )


def test_nan_decode_retries_in_float32(vae, latents):
    half = AutoencoderKL(CONFIG).eval().requires_grad_(False)
    half.load_state_dict(vae.state_dict())
    half = half.to(torch.float16)
    assert half.dtype == torch.float16
    z = latents[..., :8, :8] * 1e5  # conv_in overflows float16's 65504, not float32
    with torch.inference_mode():
        images, warnings = decode_checked(half, z)
        expected = decode(half.float(), z)  # the same (float16-rounded) weights in float32
    assert warnings == ["the VAE produced NaN/inf in float16; decoded again in float32"]
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), pytest.raises(SdStudioError, match="NaN/inf values even in float32"):
        decode_checked(vae, torch.full((1, 4, 8, 8), float("nan")))
