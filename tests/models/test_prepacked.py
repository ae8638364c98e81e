"""Layers with oneDNN-packed weights: the same outputs as ``nn.Linear`` / ``nn.Conv2d``, the packed copy made
again whenever the weight changes, and never used where it does not apply."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from sdstudio.models import prepacked
from sdstudio.models.configs import preset
from sdstudio.models.prepacked import Conv2d, Linear
from sdstudio.models.unet import GEGLU
from tests.reference import cfg_inputs, random_unet

# Where oneDNN has no bf16 kernels the layers run plain; the equality tests still hold, the cache ones skip.
needs_packing = pytest.mark.skipif(
    not prepacked._mkldnn_bf16(), reason="this CPU has no oneDNN bf16 kernels: the layers run plain"
)


def layers(seed: int = 0) -> list[tuple[nn.Module, nn.Module, torch.Tensor]]:
    """(plain layer, prepacked twin with the same weights, a bf16 input) for the shapes the UNet has."""
    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[nn.Module, nn.Module, torch.Tensor]] = []
    for plain, twin, shape in [
        (nn.Linear(64, 96), Linear(64, 96), (2, 50, 64)),
        (nn.Linear(64, 32, bias=False), Linear(64, 32, bias=False), (2, 7, 64)),
        (nn.Conv2d(16, 24, 3, padding=1), Conv2d(16, 24, 3, padding=1), (2, 16, 9, 11)),
        (nn.Conv2d(16, 16, 3, stride=2, padding=1), Conv2d(16, 16, 3, stride=2, padding=1), (2, 16, 9, 11)),
        (nn.Conv2d(16, 8, 1), Conv2d(16, 8, 1), (2, 16, 8, 8)),
    ]:
        plain = plain.to(torch.bfloat16)
        twin = twin.to(torch.bfloat16)
        twin.load_state_dict(plain.state_dict())
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        if x.dim() == 4:  # as the UNet runs on the CPU in bf16
            plain.to(memory_format=torch.channels_last)
            twin.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        cases.append((plain, twin, x))
    return cases


@pytest.mark.parametrize("case", range(5))
def test_packed_layers_give_the_plain_layers_output_exactly(case):
    plain, twin, x = layers()[case]
    with torch.inference_mode():
        expected = plain(x)
        assert torch.equal(twin(x), expected)
        assert torch.equal(twin(x), expected)  # second call: from the packed copy
    assert (twin._packed.weight is not None) == prepacked._mkldnn_bf16()


@needs_packing
@pytest.mark.parametrize("case", [0, 2])
def test_a_weight_changed_in_place_or_replaced_is_packed_again(case):
    plain, twin, x = layers()[case]
    with torch.inference_mode():
        twin(x)
        first = twin._packed.weight
        with torch.no_grad():  # a patch merged into the weights, as a LoRA would be
            plain.weight.add_(0.5)
            twin.weight.add_(0.5)
        assert torch.equal(twin(x), plain(x))
        assert twin._packed.weight is not first
        # new parameter objects (load_state_dict with assign, as the loader does)
        state = {k: v.clone() * 2 for k, v in plain.state_dict().items()}
        plain.load_state_dict(state)
        twin.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        assert torch.equal(twin(x), plain(x))


@needs_packing
def test_a_conv_packs_again_for_a_new_input_shape():
    plain, twin, x = layers()[2]
    with torch.inference_mode():
        twin(x)
        bigger = torch.randn(1, 16, 20, 12).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert torch.equal(twin(bigger), plain(bigger))
        assert twin._packed.key[-1] == tuple(bigger.shape)
        assert torch.equal(twin(x), plain(x))


def test_training_fp32_and_unpacked_instances_run_the_plain_layer():
    plain, twin, x = layers()[0]
    # gradients wanted: the plain layer, with its backward
    twin.train()
    out = twin(x)
    out.float().sum().backward()
    assert twin.weight.grad is not None
    assert twin._packed.weight is None
    # fp32 weights
    twin32 = copy.deepcopy(twin).float()
    with torch.inference_mode():
        torch.testing.assert_close(twin32(x.float()), plain.float()(x.float()))
    assert twin32._packed.weight is None
    # an instance told not to pack (what benchmarks/levers.py measures against)
    twin.prepack = False
    with torch.inference_mode():
        assert torch.equal(twin(x), plain.to(torch.bfloat16)(x))
    assert twin._packed.weight is None


@needs_packing
def test_copies_and_pickles_pack_their_own_weight():
    _plain, twin, x = layers()[2]
    with torch.inference_mode():
        expected = twin(x)
    assert twin._packed.weight is not None
    for other in (copy.deepcopy(twin), pickle.loads(pickle.dumps(twin))):
        assert other._packed.weight is None  # the opaque packed tensor is not copied
        with torch.inference_mode():
            assert torch.equal(other(x), expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_unet_gives_the_same_output_with_and_without_packed_weights(channels_last):
    config = preset("tiny").unet
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = random_unet(config)
    x, t, context = cfg_inputs(config, 16)
    with torch.inference_mode():
        exact = unet(x, t, context).double()
    unet.to(torch.bfloat16).to(memory_format=fmt)
    x, context = x.to(torch.bfloat16).contiguous(memory_format=fmt), context.to(torch.bfloat16)
    packed_layers = [m for m in unet.modules() if isinstance(m, (Linear, Conv2d))]
    assert len(packed_layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    geglu = {id(m.proj) for m in unet.modules() if isinstance(m, GEGLU)}
    with torch.inference_mode():
        packed = unet(x, t, context)
        for m in packed_layers:
            m.prepack = False
        plain = unet(x, t, context)
        for m in packed_layers:
            m.prepack, m.fuse_gelu = True, False
        packed_but_geglu = unet(x, t, context)
    # Every packed layer gives the plain layer's bits (GEGLU unfused). The fused GEGLU differs by bf16
    # roundings (its GELU reads the fp32 accumulator, not the rounded bf16 output) and is as close to fp32
    # as the plain path (measured on seeds 0-2: 0.0136 / 0.0134, 0.0176 / 0.0186, 0.0138 / 0.0144
    # relative L2).
    assert torch.equal(packed_but_geglu, plain)
    err_packed, err_plain = ((y.double() - exact).norm() / exact.norm() for y in (packed, plain))
    assert err_plain < 0.03 and err_packed < 1.1 * err_plain, (err_packed, err_plain)
    # NCHW: the linears pack, the convolutions run plain (packed, they would turn the maps channels-last)
    expect = [prepacked._mkldnn_bf16() and (channels_last or isinstance(m, Linear)) for m in packed_layers]
    cached = [(m._packed_halves if id(m) in geglu else m._packed).weight is not None for m in packed_layers]
    assert cached == expect


def test_gelu_gated_is_geglu_and_follows_its_weight():
    gen = torch.Generator().manual_seed(3)
    layer = Linear(64, 2 * 48).to(torch.bfloat16)
    x = torch.randn(2, 50, 64, generator=gen).to(torch.bfloat16)

    def reference() -> torch.Tensor:  # in float64 from the same bf16 numbers
        a, g = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double()).chunk(2, -1)
        return a * torch.nn.functional.gelu(g)

    with torch.inference_mode():
        fused = layer.gelu_gated(x)
        layer.prepack = False
        plain = layer.gelu_gated(x)
        layer.prepack = True
    exact = reference()
    assert fused.shape == plain.shape == (2, 50, 48) and fused.dtype == torch.bfloat16
    err_fused, err_plain = ((y.double() - exact).abs().mean() for y in (fused, plain))
    scale = exact.abs().mean()
    # within about one bf16 rounding of the output; the fused path rounds once less than the plain one
    assert err_fused < 2**-8 * scale and err_fused <= err_plain * 1.05, (err_fused / scale, err_plain / scale)
    with torch.no_grad():
        layer.weight.mul_(-0.5)  # in place: the packed halves must follow
    with torch.inference_mode():
        again = layer.gelu_gated(x)
    assert (again.double() - reference()).abs().mean() < 2**-8 * reference().abs().mean()


@needs_packing
def test_converting_the_module_drops_the_packed_copy():
    """A model moved to another device or dtype must not keep a CPU copy of its old weights."""
    plain, twin, x = layers()[2]
    with torch.inference_mode():
        twin(x)
    assert twin._packed.weight is not None
    twin.float()
    assert twin._packed.weight is None
    with torch.inference_mode():
        torch.testing.assert_close(twin(x.float()), plain.float()(x.float()))


@pytest.mark.parametrize("case", [0, 2])
def test_a_trainable_bias_alone_still_gets_its_gradient(case):
    _plain, twin, x = layers()[case]
    twin.weight.requires_grad_(False)  # frozen weight, trainable bias: the packed op has no backward
    twin(x).float().sum().backward()
    assert twin.bias.grad is not None
    assert twin._packed.weight is None


@pytest.mark.parametrize("case", [0, 2])
def test_no_grad_packs_as_inference_mode_does(case):
    plain, twin, x = layers()[case]
    with torch.no_grad():
        assert torch.equal(twin(x), plain(x))
    assert (twin._packed.weight is not None) == prepacked._mkldnn_bf16()


def test_an_nchw_input_runs_the_plain_conv_and_keeps_its_format():
    """oneDNN's packed convolution returns channels-last; NCHW callers get the plain layer's NCHW output."""
    plain, twin, x = layers()[2]
    plain.to(memory_format=torch.contiguous_format)
    twin.to(memory_format=torch.contiguous_format)
    x = x.contiguous()
    with torch.inference_mode():
        out = twin(x)
        assert torch.equal(out, plain(x))
    assert out.is_contiguous()
    assert twin._packed.weight is None


@pytest.mark.parametrize("case", [0, 2])
def test_compiling_traces_one_graph_through_the_layer(case):
    """Under ``torch.compile`` the layers are the plain ones, with no graph break (``fullgraph``)."""
    plain, twin, x = layers()[case]
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    with torch.inference_mode():
        assert torch.equal(compiled(x), plain(x))
