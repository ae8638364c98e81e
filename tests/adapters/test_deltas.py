"""Each format's weight change against its formula written out element by element, and LyCORIS' LoCon, LoHa
and LoKr against the ``lycoris-lora`` package's own reconstruction (``get_weight(shape) * multiplier``;
its ``get_diff_weight`` applies the scale twice, see the design note of issue 21)."""

import itertools
import math

import pytest
import torch
from torch import nn

from sdstudio.adapters import KeyTable, Target, network_from_state_dict

MULT = 0.8


def table_for(shape: tuple[int, ...]) -> KeyTable:
    """A one-weight table: the file's module ``lora_unet_x`` patches a weight of ``shape``."""
    return KeyTable(
        targets={"lora_unet_x": Target(key="x.weight", part="unet", shape=shape)}, architecture="test"
    )


def delta_of(
    state: dict[str, torch.Tensor], shape: tuple[int, ...], multiplier: float = MULT
) -> torch.Tensor:
    network = network_from_state_dict(
        {f"lora_unet_x.{k}": v for k, v in state.items()}, table_for(shape), name="t"
    )
    assert network.warnings == () and len(network.modules) == 1
    return network.modules[0].delta(multiplier)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


# ------------------------------------------------------------------------------------ hand formulas


def test_locon_3x3_and_fp16_factors():
    out, cin, r = 5, 3, 2
    down, up = rand(r, cin, 3, 3, seed=1).half(), rand(out, r, 1, 1, seed=2).half()
    expected = torch.zeros(out, cin, 3, 3, dtype=torch.float64)
    for o, c, k, l, n in itertools.product(range(out), range(cin), range(3), range(3), range(r)):
        expected[o, c, k, l] += float(up[o, n, 0, 0]) * float(down[n, c, k, l])
    state = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(3.0, dtype=torch.float16)}
    torch.testing.assert_close(
        delta_of(state, (out, cin, 3, 3)).double(), MULT * 1.5 * expected, rtol=0, atol=1e-6
    )


def test_lora_1x1_and_linear_reshape_both_ways():
    down, up = rand(2, 4, seed=1), rand(6, 2, seed=2)
    flat = MULT * (up.double() @ down.double())  # no alpha: scale 1
    state = {"lora_down.weight": down, "lora_up.weight": up}
    conv_state = {"lora_down.weight": down[:, :, None, None], "lora_up.weight": up[:, :, None, None]}
    torch.testing.assert_close(
        delta_of(state, (6, 4, 1, 1)).double(), flat[:, :, None, None], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(delta_of(conv_state, (6, 4)).double(), flat, rtol=0, atol=1e-6)


def test_locon_tucker():
    out, cin, r = 4, 3, 2
    down, mid, up = rand(r, cin, 1, 1, seed=1), rand(r, r, 3, 3, seed=2), rand(out, r, 1, 1, seed=3)
    expected = torch.zeros(out, cin, 3, 3, dtype=torch.float64)
    for o, c, k, l, n, m in itertools.product(range(out), range(cin), range(3), range(3), range(r), range(r)):
        expected[o, c, k, l] += float(up[o, n, 0, 0]) * float(mid[n, m, k, l]) * float(down[m, c, 0, 0])
    state = {
        "lora_down.weight": down,
        "lora_mid.weight": mid,
        "lora_up.weight": up,
        "alpha": torch.tensor(1.0),
    }
    torch.testing.assert_close(
        delta_of(state, (out, cin, 3, 3)).double(), MULT * 0.5 * expected, rtol=0, atol=1e-6
    )


def test_loha_plain_and_tucker():
    out, cin, r = 4, 3, 2
    w = {n: rand(out, r, seed=i) if n.endswith("a") else rand(r, cin * 9, seed=i)
         for i, n in enumerate(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"])}  # fmt: skip
    expected = torch.zeros(out, cin * 9, dtype=torch.float64)
    for o, c in itertools.product(range(out), range(cin * 9)):
        a = sum(float(w["hada_w1_a"][o, n]) * float(w["hada_w1_b"][n, c]) for n in range(r))
        b = sum(float(w["hada_w2_a"][o, n]) * float(w["hada_w2_b"][n, c]) for n in range(r))
        expected[o, c] = a * b
    got = delta_of({**w, "alpha": torch.tensor(5.0)}, (out, cin, 3, 3))
    torch.testing.assert_close(got.double(), MULT * 2.5 * expected.reshape(out, cin, 3, 3), rtol=0, atol=1e-6)

    t1, t2 = rand(r, r, 3, 3, seed=10), rand(r, r, 3, 3, seed=11)
    wt = {"hada_w1_a": rand(r, out, seed=12), "hada_w1_b": rand(r, cin, seed=13),
          "hada_w2_a": rand(r, out, seed=14), "hada_w2_b": rand(r, cin, seed=15)}  # fmt: skip

    def factor(t, a, b, o, c, k, l):
        return sum(float(t[i, j, k, l]) * float(a[i, o]) * float(b[j, c]) for i in range(r) for j in range(r))

    expected = torch.zeros(out, cin, 3, 3, dtype=torch.float64)
    for o, c, k, l in itertools.product(range(out), range(cin), range(3), range(3)):
        expected[o, c, k, l] = factor(t1, wt["hada_w1_a"], wt["hada_w1_b"], o, c, k, l) * factor(
            t2, wt["hada_w2_a"], wt["hada_w2_b"], o, c, k, l
        )
    got = delta_of({**wt, "hada_t1": t1, "hada_t2": t2, "alpha": torch.tensor(1.0)}, (out, cin, 3, 3))
    torch.testing.assert_close(got.double(), MULT * 0.5 * expected, rtol=0, atol=1e-6)


def kron_by_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of the result is ``w1[i, j] * w2``: the Kronecker product written out."""
    a, c = w1.shape
    p, q = w2.shape[:2]
    out = torch.zeros(a * p, c * q, *w2.shape[2:], dtype=torch.float64)
    for i, j in itertools.product(range(a), range(c)):
        out[i * p : (i + 1) * p, j * q : (j + 1) * q] = float(w1[i, j]) * w2.double()
    return out


def test_lokr_forms():
    # full w1 [2, 3], factored w2 = w2_a [4, r] @ w2_b [r, 5]: out 8, in 15; scale alpha / w2_b rank
    w1, w2_a, w2_b = rand(2, 3, seed=1), rand(4, 2, seed=2), rand(2, 5, seed=3)
    expected = kron_by_blocks(w1, w2_a.double() @ w2_b.double())
    got = delta_of({"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b, "alpha": torch.tensor(3.0)}, (8, 15))
    torch.testing.assert_close(got.double(), MULT * 1.5 * expected, rtol=0, atol=1e-6)
    # both full: scale 1 whatever alpha says
    w2 = rand(4, 5, seed=4)
    got = delta_of({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}, (8, 15))
    torch.testing.assert_close(got.double(), MULT * kron_by_blocks(w1, w2), rtol=0, atol=1e-6)
    # conv: full 4-D w2 [4, 5, 3, 3] -> [8, 15, 3, 3]; factored w1 (rank 1, alpha 2)
    w1_a, w1_b, w2c = rand(2, 1, seed=5), rand(1, 3, seed=6), rand(4, 5, 3, 3, seed=7)
    expected = kron_by_blocks(w1_a.double() @ w1_b.double(), w2c)
    got = delta_of(
        {"lokr_w1_a": w1_a, "lokr_w1_b": w1_b, "lokr_w2": w2c, "alpha": torch.tensor(2.0)}, (8, 15, 3, 3)
    )
    torch.testing.assert_close(got.double(), MULT * 2.0 * expected, rtol=0, atol=1e-6)
    # conv with a flattened factored w2_b [r, 5 * 9]: the same kernel layout as the 4-D form
    w2_a, w2_b = rand(4, 2, seed=8), rand(2, 45, seed=9)
    expected = kron_by_blocks(w1, (w2_a.double() @ w2_b.double()).reshape(4, 5, 3, 3))
    got = delta_of(
        {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b, "alpha": torch.tensor(1.0)}, (8, 15, 3, 3)
    )
    torch.testing.assert_close(got.double(), MULT * 0.5 * expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- lycoris-lora's own


def _lycoris_case(kind: str, layer: nn.Module, **options):
    modules = pytest.importorskip("lycoris.modules")
    cls = {"locon": modules.LoConModule, "loha": modules.LohaModule, "lokr": modules.LokrModule}[kind]
    module = cls("lora_unet_x", layer, multiplier=MULT, **options)
    gen = torch.Generator().manual_seed(sum(map(ord, kind)) + len(options))
    with torch.no_grad():
        for p in module.parameters():  # LyCORIS zero-inits one factor of each; every one random here
            if p is not layer.weight and p is not getattr(layer, "bias", None):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    shape = tuple(layer.weight.shape)
    if kind == "locon":
        reference = module.make_weight() * module.scale * MULT  # make_weight is unscaled for LoCon
    else:
        reference = module.get_weight(shape) * MULT  # includes the scale once
    state = {k: v.detach() for k, v in module.custom_state_dict().items()}
    return state, shape, reference.detach().reshape(shape), module


LINEAR = {"in_features": 96, "out_features": 64}
CONV = {"in_channels": 48, "out_channels": 64, "kernel_size": 3, "padding": 1}


@pytest.mark.parametrize(
    ("kind", "layer", "options"),
    [
        ("locon", "linear", {"lora_dim": 4, "alpha": 3}),
        ("locon", "conv", {"lora_dim": 4, "alpha": 2}),
        ("locon", "conv", {"lora_dim": 4, "alpha": 6, "use_tucker": True}),
        ("loha", "linear", {"lora_dim": 4, "alpha": 3}),
        ("loha", "conv", {"lora_dim": 4, "alpha": 1}),
        ("loha", "conv", {"lora_dim": 3, "alpha": 5, "use_tucker": True}),
        ("lokr", "linear", {"lora_dim": 4, "alpha": 3, "factor": 4}),
        ("lokr", "linear", {"lora_dim": 2, "alpha": 3, "factor": 8, "decompose_both": True}),
        ("lokr", "linear", {"lora_dim": 4, "alpha": 3, "full_matrix": True}),
        ("lokr", "conv", {"lora_dim": 4, "alpha": 3, "factor": 4}),
        ("lokr", "conv", {"lora_dim": 4, "alpha": 3, "factor": 4, "use_tucker": True}),
        ("lokr", "conv", {"lora_dim": 64, "alpha": 8, "factor": 8}),  # w2 kept whole: 4-D lokr_w2
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_against_lycoris(kind, layer, options):
    torch.manual_seed(0)  # LyCORIS' own inits draw from the global generator
    module = nn.Linear(**LINEAR) if layer == "linear" else nn.Conv2d(**CONV)
    state, shape, reference, lyco = _lycoris_case(kind, module, **options)
    expected_keys = {"lokr": "lokr_", "loha": "hada_", "locon": "lora_"}[kind]
    assert any(k.startswith(expected_keys) for k in state)
    if options.get("use_tucker"):
        assert {"lora_mid.weight", "hada_t1", "lokr_t2"} & set(state)
    got = delta_of(state, shape)
    assert reference.abs().max() > 0.1  # a real change
    torch.testing.assert_close(
        got, reference.float(), rtol=0, atol=1e-5 * max(1.0, reference.abs().max().item())
    )
    both_whole = kind == "lokr" and lyco.use_w1 and lyco.use_w2  # LyCORIS then forces scale 1, as we do
    assert both_whole or not math.isclose(lyco.scale, 1.0)  # alpha / rank is exercised
