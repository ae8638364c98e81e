"""Merging networks into the weights and restoring them: exact originals afterwards (bit for bit, in every
dtype and memory layout the engine uses), zero multipliers cost nothing, several networks add up, a switch
equals a fresh merge, and the UNet's packed-weight caches follow the weights."""

import copy

import pytest
import torch

from sdstudio.adapters import NetworkUse, WeightPatcher, key_table, network_from_state_dict, networks_applied
from sdstudio.models import prepacked
from tests.adapters.loras import loaded, lora_targets, random_kohya, tiny_model


def networks(model, seeds=(1, 2)):
    table = key_table(model)
    targets = lora_targets(model.config, {k: v.float() for k, v in model.state_dict().items()})
    return [
        network_from_state_dict(random_kohya(targets, seed=s, alpha=2.0 + s), table, name=f"n{s}")
        for s in seeds
    ]


def snapshot(model) -> dict[str, torch.Tensor]:
    """The UNet's and text encoder's tensors (the VAE has no LoRA targets; copying it made the tests slow)."""
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("first_stage_model.")
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (floats as same-sized integers: -0.0 differs from 0.0, NaN equals itself)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(model, before) -> bool:
    state = model.state_dict()
    return all(
        torch.equal(bits(state[k]), bits(before[k])) and state[k].stride() == before[k].stride()
        for k in before
    )


@pytest.mark.parametrize(
    ("arch", "dtype", "channels_last"),
    [
        ("tiny", torch.float32, False),
        ("tiny", torch.float16, False),
        ("tiny", torch.bfloat16, True),
        ("tiny-sd2", torch.float32, True),
    ],
)
def test_restore_is_bit_identical_and_switch_equals_fresh_merge(arch, dtype, channels_last):
    model = tiny_model(arch, dtype=dtype)
    if channels_last:  # as the engine runs bf16 on CPUs and fp16 on GPUs
        model.unet.to(memory_format=torch.channels_last)
    a, b = networks(model)
    before = snapshot(model)
    patcher = WeightPatcher(loaded(model, dtype))
    patcher.apply([NetworkUse(b, 0.5, 1.5)])
    fresh_b = snapshot(model)
    assert not same_bits(model, before)
    patcher.restore()
    assert same_bits(model, before) and patcher.patched_keys == frozenset()

    patcher.apply([NetworkUse(a, 1.0, 1.0)])
    patcher.apply([(a, 1.0, 1.0), (b, 0.5, 1.5)])
    patcher.apply([(b, 0.5, 1.5)])  # a switch: from the kept originals, not by subtracting
    assert same_bits(model, fresh_b)
    patcher.apply([])
    assert same_bits(model, before)
    if channels_last:
        conv = model.unet.input_blocks[1][0].in_layers[2].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_merged_values_and_several_networks_add_up():
    model = tiny_model("tiny", dtype=torch.float16)
    a, b = networks(model)
    before = snapshot(model)
    with networks_applied(model, [(a, 0.7, 1.2), (b, -0.4, 0.3)]) as patcher:
        state = model.state_dict()
        touched = {m.target.key for m in a.modules}
        assert patcher.patched_keys == touched
        for key in touched:
            expected = before[key].float()
            for network, te, unet in ((a, 0.7, 1.2), (b, -0.4, 0.3)):
                for m in network.modules:
                    if m.target.key == key:
                        region = expected if m.target.rows is None else expected[slice(*m.target.rows)]
                        region += m.delta(te if m.target.part == "te" else unet)
            # one rounding of the float32 sum to fp16 (the sums may differ in their last float32 bit)
            torch.testing.assert_close(state[key], expected.half(), rtol=2**-10, atol=0, msg=key)
    assert same_bits(model, before)


def test_zero_multiplier_costs_nothing():
    model = tiny_model("tiny")
    (a,) = networks(model, seeds=(1,))
    before = snapshot(model)
    patcher = WeightPatcher(model)
    patcher.apply([NetworkUse(a, te=0.0, unet=1.0)])
    assert patcher.patched_keys and not any(k.startswith("cond_stage_model.") for k in patcher.patched_keys)
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before if k.startswith("cond_stage_model."))
    versions = {k: p._version for k, p in model.named_parameters()}
    patcher.apply([NetworkUse(a, te=0.0, unet=1.0)])  # the same again: nothing is written
    assert versions == {k: p._version for k, p in model.named_parameters()}
    patcher.apply([NetworkUse(a, te=0.0, unet=0.0)])
    assert patcher.patched_keys == frozenset() and same_bits(model, before)
    assert versions != {k: p._version for k, p in model.named_parameters()}  # restored


def test_inference_tensors_and_errors_restore():
    with torch.inference_mode():  # weights made under inference mode can only be written inside it
        model = tiny_model("tiny")
    (a,) = networks(model, seeds=(1,))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), networks_applied(model, [(a, 1.0, 1.0)]):
        assert not same_bits(model, before)
        raise RuntimeError("boom")
    assert same_bits(model, before)
    other = tiny_model("tiny-sd2")
    with pytest.raises(ValueError, match="read for a model of another architecture"):
        WeightPatcher(other).apply([(a, 1.0, 1.0)])


def test_packed_weight_caches_follow_merge_and_restore():
    """bf16 on the CPU with channels-last maps: the UNet's linears and convolutions run on oneDNN-packed
    copies of their weights. After a merge they must compute with the merged weights (as a layer freshly
    made with them does), after the restore exactly as before."""
    model = tiny_model("tiny", dtype=torch.bfloat16)
    model.unet.to(memory_format=torch.channels_last)
    linear = model.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q  # prepacked.Linear [32, 32]
    conv = model.unet.input_blocks[1][0].in_layers[2]  # prepacked.Conv2d 32 -> 32, 3x3
    gen = torch.Generator().manual_seed(0)
    inputs = {
        linear: torch.randn(2, 16, 32, generator=gen).bfloat16(),
        conv: torch.randn(2, 32, 8, 8, generator=gen)
        .bfloat16()
        .contiguous(memory_format=torch.channels_last),
    }
    if not prepacked.packable(inputs[linear], linear):
        pytest.skip("no oneDNN bf16 on this CPU: nothing is packed")
    (a,) = networks(model, seeds=(1,))

    def fresh(layer):  # the same layer and weights, with empty caches (a copy packs anew)
        return copy.deepcopy(layer)

    with torch.no_grad():
        before = {layer: layer(x) for layer, x in inputs.items()}
        assert all(layer._packed.entry is not None for layer in inputs)  # the caches are in use
        with networks_applied(model, [(a, 1.0, 1.0)]):
            for layer, x in inputs.items():
                merged = layer(x)
                assert not torch.equal(merged, before[layer])
                assert torch.equal(merged, fresh(layer)(x)), type(layer).__name__
        for layer, x in inputs.items():
            assert torch.equal(layer(x), before[layer]), type(layer).__name__


def test_keep_originals_reuses_the_copies():
    model = tiny_model("tiny", dtype=torch.float16)
    a, b = networks(model)
    before = snapshot(model)
    patcher = WeightPatcher(model, keep_originals=True)
    patcher.apply([(a, 1.0, 1.0)])
    fresh_a = snapshot(model)
    copies = {k: v.data_ptr() for k, v in patcher._originals.items()}
    patcher.restore()
    assert same_bits(model, before) and patcher.patched_keys == frozenset()
    patcher.apply([(b, 1.0, 0.5)])
    patcher.apply([(a, 1.0, 1.0)])
    assert same_bits(model, fresh_a)
    assert {k: v.data_ptr() for k, v in patcher._originals.items()} == copies  # no second copy was made
    patcher.apply([])
    assert same_bits(model, before)
