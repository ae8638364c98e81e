"""AUTOMATIC1111 hypernetworks: files built here as A1111's ``HypernetworkModule`` lays them out (torch.nn
modules in a Sequential, written independently of ``sdstudio.adapters.hypernetwork``), values against
A1111's formula worked out by hand, the UNet against the formula applied by hooks at every attention layer
(self-attention included), and one clear error for every bad file."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdstudio.adapters.hypernetwork import (
    ACTIVATIONS,
    HypernetworkStack,
    HypernetworkUse,
    load_hypernetwork,
    prepare_hypernetworks,
)
from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import CheckpointError
from sdstudio.models.unet import CrossAttention
from tests.adapters.loras import tiny_model

# A1111 HypernetworkModule.activation_dict: its seven names, then torch.nn.modules.activation's classes.
A1111_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
A1111_ACTIVATIONS.update(
    {
        name.lower(): cls
        for name, cls in inspect.getmembers(torch.nn.modules.activation)
        if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"
    }
)


def a1111_sequential(
    dim: int,
    layer_structure: list[float],
    activation: str | None,
    layer_norm: bool,
    activate_output: bool,
    dropout: list[float],
    gen: torch.Generator,
) -> nn.Sequential:
    """``HypernetworkModule.linear`` for width ``dim``, random weights (std 0.5: effects well above rounding)."""
    modules: list[nn.Module] = []
    last = len(layer_structure) - 2
    for i in range(len(layer_structure) - 1):
        width_out = int(dim * layer_structure[i + 1])
        modules.append(nn.Linear(int(dim * layer_structure[i]), width_out))
        if activation not in ("linear", None) and (i < last or activate_output):
            modules.append(A1111_ACTIVATIONS[activation]())
        if layer_norm:
            modules.append(nn.LayerNorm(width_out))
        if dropout[i + 1] > 0:
            modules.append(nn.Dropout(p=dropout[i + 1]))
    seq = nn.Sequential(*modules)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return seq.eval()


def module_state(seq: nn.Sequential) -> OrderedDict:
    """As ``HypernetworkModule.state_dict()``: the Sequential is its attribute ``linear``."""
    return OrderedDict((f"linear.{k}", v.clone()) for k, v in seq.state_dict().items())


def a1111_file(
    path: Path,
    widths: tuple[int, ...],
    fields: dict,
    *,
    dropout: list[float],
    seed: int = 0,
) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
    """Save an A1111 hypernetwork with ``fields`` (as ``Hypernetwork.save`` writes them; missing ones take
    ``Hypernetwork.load``'s defaults, which the Sequentials follow); ``dropout``: the structure A1111 derives
    from the fields. Returns the (k, v) Sequentials per width."""
    gen = torch.Generator().manual_seed(seed)
    structure = fields.get("layer_structure", [1, 2, 1])
    args = (
        structure,
        fields.get("activation_func"),
        fields.get("is_layer_norm", False),
        fields.get("activate_output", True),
        dropout,
    )
    seqs = {w: (a1111_sequential(w, *args, gen), a1111_sequential(w, *args, gen)) for w in widths}
    state: dict = {w: (module_state(k), module_state(v)) for w, (k, v) in seqs.items()}
    state.update(fields)
    torch.save(state, path)
    return seqs


def formula(seq: nn.Sequential, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """A1111 ``HypernetworkModule.forward``."""
    return x + seq(x) * multiplier


FULL_FIELDS = {
    "step": 1200,
    "name": "trained-name",
    "weight_initialization": "Normal",
    "sd_checkpoint": "a1b2c3d4",
    "sd_checkpoint_name": "v1-5-pruned",
    "optional_info": "made in a test",
}

# (fields, the dropout structure A1111 derives from them)
LAYOUTS = {
    "relu-121": ({"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
                  "use_dropout": False, "activate_output": False, "last_layer_dropout": False}, [0, 0, 0]),
    "ln-dropout-1221": ({"layer_structure": [1, 2, 2, 1], "activation_func": "leakyrelu", "is_layer_norm": True,
                         "use_dropout": True, "activate_output": False, "last_layer_dropout": False},
                        [0, 0.3, 0, 0]),
    "last-dropout-1221": ({"layer_structure": [1, 2, 2, 1], "activation_func": "swish", "is_layer_norm": False,
                           "use_dropout": True, "activate_output": True, "last_layer_dropout": True},
                          [0, 0.3, 0.3, 0]),
    "explicit-dropout": ({"layer_structure": [1, 1.5, 0.5, 1], "activation_func": "tanh", "is_layer_norm": True,
                          "use_dropout": False, "dropout_structure": [0, 0.1, 0.2, 0], "activate_output": True},
                         [0, 0.1, 0.2, 0]),
    "defaults": ({}, [0, 0, 0]),  # the oldest files: no fields (no activation, activate_output True)
    "prelu-output": ({"layer_structure": [1, 2, 1], "activation_func": "prelu", "activate_output": True,
                      "is_layer_norm": True}, [0, 0, 0]),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loads_a1111_layouts(tmp_path: Path, layout: str) -> None:
    fields, dropout = LAYOUTS[layout]
    path = tmp_path / "net.pt"
    seqs = a1111_file(path, (8, 12), {**fields, **FULL_FIELDS}, dropout=dropout, seed=1)
    hn = load_hypernetwork(path)
    assert hn.name == "net" and hn.path == path and hn.widths == (8, 12) and hn.warnings == ()
    assert hn.trained_name == "trained-name" and hn.step == 1200 and hn.sd_checkpoint == "a1b2c3d4"
    assert hn.sd_checkpoint_name == "v1-5-pruned" and hn.optional_info == "made in a test"
    assert list(hn.dropout_structure) == dropout
    assert hn.activate_output == fields.get("activate_output", True)
    gen = torch.Generator().manual_seed(2)
    for width, (k_seq, v_seq) in seqs.items():
        k_mod, v_mod = hn.layers[width]
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (k_mod.layers[0].weight,))
        x = torch.randn(2, 5, width, generator=gen)
        for mod, seq in ((k_mod, k_seq), (v_mod, v_seq)):
            with torch.no_grad():
                expected = formula(seq, x, 0.6)
            torch.testing.assert_close(mod(x, 0.6), expected, rtol=1e-5, atol=1e-5)
        # the k and v modules are not interchangeable: the comparison above can fail
        assert (k_mod(x, 0.6) - v_mod(x, 0.6)).abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_as_a1111_builds_them(tmp_path: Path, name: str) -> None:
    """Every activation name against the torch.nn module A1111's dictionary builds (``swish``: Hardswish)."""
    path = tmp_path / "act.pt"
    fields = {"layer_structure": [1, 1.5, 1], "activation_func": name, "activate_output": True}
    ((k_seq, _),) = a1111_file(path, (8,), fields, dropout=[0, 0, 0], seed=3).values()
    k_mod, _ = load_hypernetwork(path).layers[8]
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        expected = formula(k_seq, x, 1.0)
    torch.testing.assert_close(k_mod(x, 1.0), expected, rtol=1e-5, atol=1e-5)


def test_old_linear1_linear2_keys(tmp_path: Path) -> None:
    """The first files: ``linear1`` / ``linear2`` and no fields, i.e. two Linears, no activation."""
    gen = torch.Generator().manual_seed(5)
    w1, b1, w2, b2 = (torch.randn(s, generator=gen) for s in ((8, 4), (8,), (4, 8), (4,)))
    old = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    torch.save({4: (old, {k: -v for k, v in old.items()})}, tmp_path / "old.pt")
    k_mod, v_mod = load_hypernetwork(tmp_path / "old.pt").layers[4]
    x = torch.randn(2, 3, 4, generator=gen)
    torch.testing.assert_close(k_mod(x, 0.5), x + 0.5 * ((x @ w1.T + b1) @ w2.T + b2))
    torch.testing.assert_close(v_mod(x, 0.5), x + 0.5 * ((x @ -w1.T - b1) @ -w2.T - b2))


def hand_file(path: Path, width: int, k_state: dict, v_state: dict, **fields: object) -> None:
    as_tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in k_state.items()}
    v_tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in v_state.items()}
    torch.save({width: (as_tensors, v_tensors), **fields}, path)


def test_hand_computed_keys_and_values(tmp_path: Path) -> None:
    """Width 2, ``[1, 1, 1]``, relu between the Linears, none after the last; two hypernetworks in order and
    one for another width. Every expected number is worked out below."""
    relu = {"layer_structure": [1, 1, 1], "activation_func": "relu", "activate_output": False}
    # Sequential: linear.0 Linear, linear.1 ReLU, linear.2 Linear
    hand_file(
        tmp_path / "a.pt", 2,
        {"linear.0.weight": [[1, 2], [0, -1]], "linear.0.bias": [0.5, 0], "linear.2.weight": [[1, 0], [1, 1]],
         "linear.2.bias": [0, -1]},
        {"linear.0.weight": [[0, 1], [1, 0]], "linear.0.bias": [0, 0], "linear.2.weight": [[-1, 0], [0, 2]],
         "linear.2.bias": [1, 1]},
        **relu,
    )  # fmt: skip
    # [1, 1], no activation: one Linear, linear.0
    hand_file(
        tmp_path / "b.pt", 2,
        {"linear.0.weight": [[1, 0], [0, 1]], "linear.0.bias": [0, 0]},
        {"linear.0.weight": [[0, 0], [0, 0]], "linear.0.bias": [1, -1]},
        layer_structure=[1, 1], activation_func="linear",
    )  # fmt: skip
    hand_file(
        tmp_path / "c.pt", 3,
        {"linear.0.weight": [[9] * 3] * 3, "linear.0.bias": [9] * 3},
        {"linear.0.weight": [[9] * 3] * 3, "linear.0.bias": [9] * 3},
        layer_structure=[1, 1],
    )  # fmt: skip
    a, b, c = (load_hypernetwork(tmp_path / f"{n}.pt") for n in "abc")
    x = torch.tensor([[[1.0, 1.0], [-2.0, 1.0]]])  # [batch 1, tokens 2, width 2]

    # a alone, multiplier 0.5.
    # k, token [1, 1]:  W0 x + b0 = [3.5, -1] -> relu [3.5, 0] -> W2 h + b2 = [3.5, 2.5]; x + 0.5 * that
    # k, token [-2, 1]: [0.5, -1] -> [0.5, 0] -> [0.5, -0.5]
    # v, token [1, 1]:  [1, 1] -> [1, 1] -> [0, 3];   v, token [-2, 1]: [1, -2] -> [1, 0] -> [0, 1]
    k, v = prepare_hypernetworks([HypernetworkUse(a, 0.5)], "cpu", torch.float32).kv(x)
    torch.testing.assert_close(k, torch.tensor([[[2.75, 2.25], [-1.75, 0.75]]]))
    torch.testing.assert_close(v, torch.tensor([[[1.0, 2.5], [-2.0, 1.5]]]))

    # then b at 1: k + 1 * (I k) = 2k; v + [1, -1]. c (width 3) changes nothing at width 2.
    stack = prepare_hypernetworks(
        [HypernetworkUse(a, 0.5), HypernetworkUse(c, 1.0), HypernetworkUse(b, 1.0)], "cpu", torch.float32
    )
    assert stack is not None and stack.widths == {2, 3}
    k, v = stack.kv(x)
    torch.testing.assert_close(k, torch.tensor([[[5.5, 4.5], [-3.5, 1.5]]]))
    torch.testing.assert_close(v, torch.tensor([[[2.0, 1.5], [-1.0, 0.5]]]))
    # order matters: b first, then a. k, token [1, 1]: 2x = [2, 2]; W0 [2, 2] + b0 = [6.5, -2] -> relu
    # [6.5, 0] -> W2 h + b2 = [6.5, 5.5]; [2, 2] + 0.5 * that
    reverse = prepare_hypernetworks([HypernetworkUse(b, 1.0), HypernetworkUse(a, 0.5)], "cpu", torch.float32)
    torch.testing.assert_close(reverse.kv(x)[0][0, 0], torch.tensor([5.25, 4.75]))
    # a context of a width no hypernetwork has is returned as it is, for k and v alike
    x4 = torch.ones(1, 2, 4)
    k, v = stack.kv(x4)
    assert k is x4 and v is x4


def test_hand_computed_layer_norm(tmp_path: Path) -> None:
    """``is_layer_norm``: a LayerNorm after every Linear (after its activation), the last one's too.

    Sequential: linear.0 Linear, .1 ReLU, .2 LayerNorm, .3 Linear, .4 LayerNorm. Token [1, 1]:
    [3.5, -1] -> relu [3.5, 0] -> LN [1, -1] -> W3 [1, 0] + [0, -1] = [1, -1] -> LN [1, -1]; k = x + that.
    """
    ln = {
        "linear.2.weight": [1, 1],
        "linear.2.bias": [0, 0],
        "linear.4.weight": [1, 1],
        "linear.4.bias": [0, 0],
    }
    state = {"linear.0.weight": [[1, 2], [0, -1]], "linear.0.bias": [0.5, 0], "linear.3.weight": [[1, 0], [1, 1]],
             "linear.3.bias": [0, -1], **ln}  # fmt: skip
    hand_file(
        tmp_path / "ln.pt", 2, state, state,
        layer_structure=[1, 1, 1], activation_func="relu", is_layer_norm=True, activate_output=False,
    )  # fmt: skip
    hn = load_hypernetwork(tmp_path / "ln.pt")
    k, v = prepare_hypernetworks([HypernetworkUse(hn, 1.0)], "cpu", torch.float32).kv(torch.ones(1, 1, 2))
    torch.testing.assert_close(k, torch.tensor([[[2.0, 0.0]]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(v, k)


def test_prepare_skips_zero_multipliers_and_casts(tmp_path: Path) -> None:
    a1111_file(tmp_path / "n.pt", (8,), LAYOUTS["relu-121"][0], dropout=[0, 0, 0])
    hn = load_hypernetwork(tmp_path / "n.pt", name="custom")
    assert hn.name == "custom"
    assert prepare_hypernetworks([], "cpu", torch.float32) is None
    assert prepare_hypernetworks([HypernetworkUse(hn, 0.0)], "cpu", torch.float32) is None
    stack = prepare_hypernetworks([HypernetworkUse(hn, 0.0), HypernetworkUse(hn, 0.8)], "cpu", torch.bfloat16)
    assert stack is not None and len(stack.uses) == 1 and stack.uses[0].multiplier == 0.8
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(6))
    k, v = stack.kv(x.bfloat16())
    assert k.dtype == v.dtype == torch.bfloat16
    full = prepare_hypernetworks([HypernetworkUse(hn, 0.8)], "cpu", torch.float32).kv(x)
    torch.testing.assert_close(k.float(), full[0], rtol=0.05, atol=0.05)
    assert hash(stack) != hash(prepare_hypernetworks([HypernetworkUse(hn, 0.8)], "cpu", torch.bfloat16))


# ---------------------------------------------------------------- through the UNet


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_model("tiny", seed=7).unet.eval()


def attention_layers(unet: nn.Module) -> list[tuple[str, CrossAttention]]:
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, CrossAttention)]
    assert {n.rsplit(".", 1)[-1] for n, _ in layers} == {"attn1", "attn2"}
    return layers


def hooked(
    unet: nn.Module,
    seqs: dict[int, tuple[nn.Sequential, nn.Sequential]],
    multiplier: float,
    inputs: tuple[torch.Tensor, ...],
    *,
    which: tuple[str, ...] = ("attn1", "attn2"),
    swap: bool = False,
) -> torch.Tensor:
    """The UNet's output with A1111's formula put in front of ``to_k`` / ``to_v`` by forward pre-hooks."""

    def hook(seq_index: int) -> Callable:
        def pre(_module: nn.Module, args: tuple) -> tuple:
            (context,) = args
            pair = seqs.get(context.shape[-1])
            return args if pair is None else (formula(pair[seq_index], context, multiplier),)

        return pre

    handles = []
    for name, attn in attention_layers(unet):
        if name.rsplit(".", 1)[-1] in which:
            handles.append(attn.to_k.register_forward_pre_hook(hook(1 if swap else 0)))
            handles.append(attn.to_v.register_forward_pre_hook(hook(0 if swap else 1)))
    try:
        with torch.no_grad():
            return unet(*inputs)
    finally:
        for h in handles:
            h.remove()


def test_unet_applies_the_formula_to_self_and_cross_attention(tmp_path: Path, unet: nn.Module) -> None:
    """Tiny UNet: text context 32 wide; self-attention 32 wide (level 0) and 64 wide (level 1). A file with
    pairs for 32 and 64 changes attn2 everywhere and attn1 at both levels."""
    widths = {m.to_k.weight.shape[1] for _, m in attention_layers(unet)}
    assert widths == {32, 64} and unet.config.context_dim == 32
    fields = {"layer_structure": [1, 2, 1], "activation_func": "relu", "activate_output": False}
    seqs = a1111_file(tmp_path / "u.pt", (32, 64), fields, dropout=[0, 0, 0], seed=8)
    hn = load_hypernetwork(tmp_path / "u.pt")
    gen = torch.Generator().manual_seed(9)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.tensor([500.0, 500.0]),
        torch.randn(2, 7, 32, generator=gen),
    )
    with torch.no_grad():
        plain = unet(*inputs)
        none = unet(*inputs, hypernetworks=None)
        zero = unet(
            *inputs, hypernetworks=prepare_hypernetworks([HypernetworkUse(hn, 0.0)], "cpu", torch.float32)
        )
        stack = prepare_hypernetworks([HypernetworkUse(hn, 0.7)], "cpu", torch.float32)
        ours = unet(*inputs, hypernetworks=stack)
    assert torch.equal(plain, none) and torch.equal(plain, zero)
    reference = hooked(unet, seqs, 0.7, inputs)
    scale = (ours - plain).abs().max()
    assert scale > 0.05  # the hypernetwork changes the output
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # the broken variants are far from ours: the comparison above can fail
    for broken in (
        hooked(unet, seqs, 0.7, inputs, which=("attn2",)),  # cross-attention only
        hooked(unet, seqs, 0.7, inputs, which=("attn1",)),  # self-attention only
        hooked(unet, seqs, 0.7, inputs, swap=True),  # k and v swapped
        hooked(unet, seqs, 0.35, inputs),  # half the multiplier
    ):
        assert (broken - ours).abs().max() > 100 * 1e-5 and (broken - ours).abs().max() > 0.01 * scale


def test_denoiser_passes_the_stack_only_when_set(tmp_path: Path) -> None:
    seen: list[dict] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(
            self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **options: object
        ) -> torch.Tensor:
            seen.append(options)
            return x

    a1111_file(tmp_path / "d.pt", (8,), {}, dropout=[0, 0, 0])
    stack = prepare_hypernetworks(
        [HypernetworkUse(load_hypernetwork(tmp_path / "d.pt"))], "cpu", torch.float32
    )
    assert isinstance(stack, HypernetworkStack)
    schedule = DiscreteSchedule.from_config(tiny_model().config.schedule)
    x, sigma, context = torch.zeros(1, 4, 2, 2), torch.tensor([1.0]), torch.zeros(1, 3, 8)
    Denoiser(Recorder(), schedule)(x, sigma, context)
    Denoiser(Recorder(), schedule, hypernetworks=stack)(x, sigma, context)
    Denoiser(Recorder(), schedule, token_merging=0.5, hypernetworks=stack)(x, sigma, context)
    assert seen == [{}, {"hypernetworks": stack}, {"token_merging": 0.5, "hypernetworks": stack}]


# ---------------------------------------------------------------- bad files


class NeedsCode:
    """An object a weights-only unpickler cannot build."""

    def __init__(self) -> None:
        self.value = 1


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_hypernetwork(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def good_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    seq = a1111_sequential(8, [1, 2, 1], "relu", False, False, [0, 0, 0], gen)
    return {8: (module_state(seq), module_state(seq)), "layer_structure": [1, 2, 1], "activation_func": "relu",
            "activate_output": False}  # fmt: skip


def test_refuses_a_pickle_that_needs_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({**good_state(), "optional_info": NeedsCode()}, path)
    message = one_line_error(path, "refusing to load")
    assert "NeedsCode" in message


def test_refuses_truncated_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(good_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(path, "damaged or incomplete")
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(tmp_path / "empty.pt", "empty")
    torch.save([1, 2, 3], tmp_path / "junk.pt")
    one_line_error(tmp_path / "junk.pt", "holds a list")


def test_refuses_nan_and_inf(tmp_path: Path) -> None:
    for bad in (math.nan, math.inf):
        state = good_state()
        state[8][1]["linear.2.bias"][3] = bad
        torch.save(state, tmp_path / "nan.pt")
        one_line_error(tmp_path / "nan.pt", "width 8 values module linear.2.bias holds NaN or infinite")


def test_refuses_missing_pairs_and_mismatched_layouts(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    state = good_state()
    torch.save({**state, 8: (state[8][0],)}, path)
    one_line_error(path, r"entry for width 8 is 1 entries, not a pair")
    torch.save({k: v for k, v in state.items() if k != 8}, path)
    one_line_error(path, "no layer pairs keyed by context width")
    torch.save({**state, "is_layer_norm": True}, path)  # the file has no LayerNorm tensors
    one_line_error(
        path,
        r"width 8 keys module does not fit .* \(missing \['linear.3.bias', 'linear.3.weight', 'linear.4.bias'\]",
    )
    torch.save({**state, "layer_structure": [1, 4, 1]}, path)
    one_line_error(path, r"linear.0.weight has shape \[16, 8\], expected \[32, 8\]")
    torch.save({**state, "layer_structure": [2, 1]}, path)
    one_line_error(path, "layer_structure .* starts and ends with 1")
    torch.save({**state, "dropout_structure": [0, 1.0, 0]}, path)
    one_line_error(path, "probability 1.0")
    state[8][0]["linear.0.weight"] = state[8][0]["linear.0.weight"].to(torch.int32)
    torch.save(state, path)
    one_line_error(path, "holds torch.int32")


def test_refuses_unknown_and_unusable_activations(tmp_path: Path) -> None:
    path = tmp_path / "act.pt"
    torch.save({**good_state(), "activation_func": "bogus"}, path)
    message = one_line_error(path, "unknown activation_func 'bogus'")
    assert "relu" in message and "swish" in message
    torch.save({**good_state(), "activation_func": "softmax"}, path)
    one_line_error(path, "'softmax' normalises over torch's implicit dimension")
    torch.save({**good_state(), "activation_func": "glu"}, path)
    one_line_error(path, "'glu' halves the width")
    # every name A1111 knows is either supported or refused with a reason
    assert set(A1111_ACTIVATIONS) - {"linear"} - set(ACTIVATIONS) == {
        "glu", "threshold", "multiheadattention", "softmax", "softmin", "logsoftmax", "softmax2d"
    }  # fmt: skip


def test_refuses_safetensors_and_warns_of_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    save_file({"linear.0.weight": torch.zeros(2, 2)}, str(path))
    one_line_error(path, "not an AUTOMATIC1111 hypernetwork .*saves them as .pt")
    torch.save({**good_state(), "skip_connection": True}, tmp_path / "ext.pt")
    hn = load_hypernetwork(tmp_path / "ext.pt")
    assert (
        len(hn.warnings) == 1
        and "skip_connection" in hn.warnings[0]
        and str(tmp_path / "ext.pt") in hn.warnings[0]
    )
