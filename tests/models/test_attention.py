"""The shared attention function (sliced on CPUs without AMX in bf16), bf16 GroupNorm and channels-last execution."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sdstudio.cpu import cpu_flags, has_amx
from sdstudio.engine import prefer_channels_last
from sdstudio.models import attention as attention_module
from sdstudio.models.attention import _sliced_attention, attention, prefer_sliced
from sdstudio.models.configs import preset
from sdstudio.models.unet import GroupNorm32
from tests.reference import cfg_inputs, random_unet


def qkv(shape_q, shape_kv, dtype=torch.float32, v_dim=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen)
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn((*shape_kv[:-1], v_dim or shape_kv[-1]), generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize(
    "shape_q, shape_kv, v_dim",
    [
        ((2, 8, 300, 40), (2, 8, 300, 40), None),  # 300 queries: slices of 64 and a remainder of 44
        ((2, 4, 1000, 16), (2, 4, 77, 16), None),  # cross-attention: fewer keys than queries
        ((1, 1, 64, 32), (1, 1, 2000, 32), 24),  # value width differs from the key width
    ],
)
def test_sliced_equals_fused_in_fp32(shape_q, shape_kv, v_dim):
    q, k, v = qkv(shape_q, shape_kv, v_dim=v_dim)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, sliced=True), expected, atol=2e-5, rtol=1e-4)
    # several slices per head, the last one short (16 KiB of fp32 scores: 4096 / keys rows)
    torch.testing.assert_close(_sliced_attention(q, k, v, slice_bytes=16384), expected, atol=2e-5, rtol=1e-4)


def test_sliced_takes_the_transposed_views_the_unet_passes():
    """q, k, v as ``CrossAttention`` makes them: [batch, tokens, heads, dim] transposed to heads-first."""
    q, k, v = (t.transpose(1, 2) for t in qkv((2, 300, 4, 32), (2, 300, 4, 32)))
    assert not q.is_contiguous()
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(_sliced_attention(q, k, v, slice_bytes=8192), expected, atol=2e-5, rtol=1e-4)


def test_shapes_the_sliced_path_cannot_take_fall_back_to_the_fused_kernel():
    q, k, v = qkv((2, 4, 64, 32), (1, 4, 64, 32))  # keys broadcast over the batch
    torch.testing.assert_close(attention(q, k, v, sliced=True), F.scaled_dot_product_attention(q, k, v))
    q, k, v = qkv((0, 4, 64, 32), (0, 4, 64, 32))  # empty batch
    assert attention(q, k, v, sliced=True).shape == (0, 4, 64, 32)


@pytest.mark.parametrize("logit_scale", [1.0, 4.0])  # 4: peaked softmaxes (logits of std ~25)
def test_sliced_bf16_is_as_close_to_fp32_as_bf16_rounding_allows(logit_scale):
    q, k, v = qkv((2, 8, 1024, 40), (2, 8, 1024, 40), torch.bfloat16)
    q = q * logit_scale
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = attention(q, k, v, sliced=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = (out.double() - exact).abs()
    # Scores and probabilities are rounded to bf16 (the fused kernel keeps them in fp32): the mean error
    # is about one bf16 rounding (2^-8 relative) of the output, what every bf16 matmul of the UNet adds,
    # 2.8 on peaked softmaxes (measured: 1.2 and 2.8 mean, 31 and 64 max).
    ulp = 2**-8 * exact.abs().mean()
    assert err.mean() < 4 * ulp and err.max() < 100 * ulp, (err.mean() / ulp, err.max() / ulp)


def test_sliced_path_is_chosen_for_long_wide_bf16_inference_without_amx_only():
    long_bf16 = qkv((1, 2, 512, 40), (1, 2, 512, 40), torch.bfloat16)
    assert prefer_sliced(*long_bf16, amx=False)
    assert not prefer_sliced(*long_bf16, amx=True)  # the fused kernel runs on the AMX tiles
    assert prefer_sliced(*long_bf16) == (not has_amx())  # by default, this machine's CPU decides
    assert not prefer_sliced(*qkv((1, 2, 512, 40), (1, 2, 512, 40)), amx=False)  # fp32: fused is faster
    assert not prefer_sliced(*qkv((1, 2, 64, 40), (1, 2, 77, 40), torch.bfloat16), amx=False)  # short
    assert not prefer_sliced(*qkv((1, 2, 1024, 16), (1, 2, 1024, 16), torch.bfloat16), amx=False)  # narrow
    q, k, v = (t.requires_grad_(True) for t in long_bf16)
    assert not prefer_sliced(q, k, v, amx=False)  # training keeps the fused kernel's backward
    with torch.no_grad():
        assert prefer_sliced(q, k, v, amx=False)


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    xeon, epyc = tmp_path / "xeon", tmp_path / "epyc"
    xeon.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    epyc.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert has_amx(cpu_flags(xeon)) and not has_amx(cpu_flags(epyc))


def test_attention_compiles_on_the_cpu_without_graph_breaks():
    """``prefer_sliced`` must answer inside a traced graph before it reads the CPU flags (which dynamo
    cannot trace): one graph, the fused kernel in it, the eager bf16 result."""
    q, k, v = qkv((1, 2, 512, 40), (1, 2, 512, 40), torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="eager")  # raises on any graph break
    with torch.no_grad():
        out = compiled(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_bf16_group_norm_runs_natively_and_matches_the_fp32_round_trip():
    norm = GroupNorm32(8, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 16, 16) * 3 + 1
    exact = norm(x)
    norm.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out = norm(xb)
    # the bf16 kernel itself, not a float32 round trip
    assert torch.equal(out, F.group_norm(xb, 8, norm.weight, norm.bias, norm.eps))
    # within a few bf16 ulps of values of magnitude ~5
    assert (out.float() - exact).abs().max() < 0.1


def unet_and_inputs(config, side: int, seed: int):
    """A randomised fp32 UNet and a CFG-sized batch of inputs at ``side`` x ``side`` latents."""
    return random_unet(config, seed), cfg_inputs(config, side, timesteps=(10.0, 700.0))


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])  # 1x1-conv and linear transformer projections
def test_channels_last_unet_gives_the_same_output_and_keeps_its_memory_format(arch):
    unet, inputs = unet_and_inputs(preset(arch).unet, 16, seed=1)
    with torch.no_grad():
        expected = unet(*inputs)
        unet.to(memory_format=torch.channels_last)
        out = unet(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_for_bf16_on_cpu_and_half_precision_on_cuda():
    assert prefer_channels_last(torch.bfloat16)
    assert not prefer_channels_last(torch.float32)
    assert not prefer_channels_last(torch.float16)
    assert prefer_channels_last(torch.float16, "cuda") and prefer_channels_last(torch.bfloat16, "cuda:1")
    assert not prefer_channels_last(torch.float32, "cuda")


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_channels_last_unet_tracks_fp32_with_either_attention_policy(amx, monkeypatch):
    """What the CPU bf16 policy runs at 32x32 latents against fp32 (1024 tokens of head width 32): the
    sliced path on CPUs without AMX, the fused kernel with AMX; each forced here whatever this CPU is."""
    monkeypatch.setattr(attention_module, "has_amx", lambda: amx)
    assert prefer_sliced(*qkv((2, 1, 1024, 32), (2, 1, 1024, 32), torch.bfloat16)) == (not amx)
    unet, (x, t, context) = unet_and_inputs(dataclasses.replace(preset("tiny").unet, num_heads=1), 32, seed=2)
    with torch.no_grad():
        expected = unet(x, t, context)
        unet.to(torch.bfloat16, memory_format=torch.channels_last)
        out = unet(x.to(torch.bfloat16), t, context.to(torch.bfloat16)).float()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.02, rel
