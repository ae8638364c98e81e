"""UNetModel: checkpoint layout, and numerical parity with diffusers' UNet2DConditionModel.

Parity procedure: random weights in our (original-checkpoint) layout -> diffusers' own single-file
converter -> strict load into ``UNet2DConditionModel`` -> same inputs -> max abs diff <= 1e-4 (fp32).
Weights are re-randomised because LDM zero-inits every residual branch's last layer, which would make
both networks return ~0 and the comparison empty.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from sdstudio.models.configs import UNetConfig, preset
from sdstudio.models.unet import UNetModel
from tests.reference import random_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

PREFIX = "model.diffusion_model."
ATOL = 1e-4
FULL_PRESETS = ["sd15", "sd15-inpaint", "sd2", "sd2-v", "sd2-inpaint"]
TINY_INPAINT = dataclasses.replace(preset("tiny").unet, in_channels=9)


def diffusers_config(config: UNetConfig, vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)) -> dict[str, Any]:
    """diffusers' own reading of an original LDM yaml that describes ``config``."""
    params: dict[str, Any] = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "channel_mult": list(config.channel_mult),
        "num_res_blocks": config.num_res_blocks,
        "attention_resolutions": list(config.attention_resolutions),
        "transformer_depth": config.transformer_depth,
        "context_dim": config.context_dim,
        "use_linear_in_transformer": config.use_linear_in_transformer,
    }
    # The real yamls name exactly one of these: num_heads (v1) or num_head_channels (v2).
    if config.num_head_channels == -1:
        params["num_heads"] = config.num_heads
    else:
        params["num_head_channels"] = config.num_head_channels
    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(vae_ch_mult)}}},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there; it only sets sample_size
        result = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    result["norm_num_groups"] = config.norm_groups  # not in the yamls: LDM hard-codes 32
    return result


def converted(model: UNetModel, config: dict[str, Any]) -> dict[str, Tensor]:
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    return convert_ldm_unet_checkpoint(checkpoint, config)


def reference_unet(model: UNetModel, config: UNetConfig) -> UNet2DConditionModel:
    """diffusers' UNet holding ``model``'s weights (shared storage, via the single-file converter)."""
    dconfig = diffusers_config(config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**dconfig)
    result = ref.load_state_dict(converted(model, dconfig), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(t.device.type == "cpu" for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def inputs(config: UNetConfig, batch: int, size: tuple[int, int], tokens: int = 77) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, config.in_channels, *size, generator=gen)  # [batch, c, h, w]
    t = torch.tensor([3.7, 801.25, 999.0, 0.0][:batch])  # fractional timesteps, both ends
    context = torch.randn(batch, tokens, config.context_dim, generator=gen)  # [batch, tokens, dim]
    return x, t, context


def assert_parity(config: UNetConfig, size: tuple[int, int], batch: int = 2, tokens: int = 77) -> None:
    model = random_unet(config)
    ref = reference_unet(model, config)
    x, t, context = inputs(config, batch, size, tokens)
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (batch, config.out_channels, *size)
    assert ours.std() > 0.1, "outputs near zero: parity would be vacuous"
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=ATOL)
    del model, ref


# --- layout -----------------------------------------------------------------------------------------


def test_sd15_keys_and_parameter_count() -> None:
    with torch.device("meta"):
        model = UNetModel(preset("sd15").unet)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    known = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.out_layers.3.bias": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
        "out.2.bias": (4,),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in shapes  # q/k/v have no bias
    assert len(state) == 686
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd2_uses_linear_projections_and_64_channel_heads() -> None:
    with torch.device("meta"):
        model = UNetModel(preset("sd2").unet)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert shapes["middle_block.1.proj_out.weight"] == (1280, 1280)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 20  # 1280 / 64
    assert sum(p.numel() for p in model.parameters()) == 865_910_724


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_layout_matches_diffusers_converter(name: str) -> None:
    """Every key we produce is one the converter maps, onto exactly diffusers' keys and shapes (meta)."""
    config = preset(name).unet
    dconfig = diffusers_config(config)
    with torch.device("meta"):
        ours = UNetModel(config)
        ref = UNet2DConditionModel(**dconfig)
    mapped = converted(ours, dconfig)
    assert len(mapped) == len(ours.state_dict())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    if config.in_channels == 9:
        assert expected["conv_in.weight"] == (320, 9, 3, 3)


def test_output_layers_are_zero_initialised() -> None:
    """As LDM's zero_module: a fresh model predicts exactly zero."""
    config = preset("tiny").unet
    model = UNetModel(config).eval()
    x, t, context = inputs(config, 2, (8, 8), tokens=5)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, context)) == 0
    assert torch.count_nonzero(model.input_blocks[1][0].out_layers[3].weight) == 0
    assert torch.count_nonzero(model.input_blocks[1][1].proj_out.weight) == 0


# --- parity with diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_parity_tiny(name: str) -> None:
    assert_parity(preset(name).unet, (16, 16), tokens=7)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_parity_tiny_odd_latent_size(name: str) -> None:
    """A side that is not a multiple of 2 ** (levels - 1): upsampling follows the skip's size."""
    assert_parity(preset(name).unet, (9, 7), batch=1, tokens=7)


def test_parity_tiny_inpainting() -> None:
    assert_parity(TINY_INPAINT, (8, 8), tokens=7)


def test_parity_tiny_depth_two() -> None:
    assert_parity(dataclasses.replace(preset("tiny").unet, transformer_depth=2), (8, 8), tokens=7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_parity_full_width(name: str) -> None:
    try:
        assert_parity(preset(name).unet, (8, 8), batch=2, tokens=77)
    finally:
        gc.collect()  # 3.5 GB of weights; other test processes share this machine


# --- precision --------------------------------------------------------------------------------------


def test_bf16_close_to_fp32() -> None:
    config = preset("tiny").unet
    model = random_unet(config, seed=3)
    x, t, context = inputs(config, 2, (16, 16), tokens=7)
    with torch.no_grad():
        full = model(x, t, context)
        half = model.to(torch.bfloat16)(x, t, context)  # fp32 inputs are cast to the weights' dtype
    assert half.dtype == torch.bfloat16
    relative = (half.float() - full).norm() / full.norm()
    assert relative < 0.05, relative
