"""AUTOMATIC1111 hypernetworks (``<hypernet:NAME:MULT>``): small MLPs that rewrite the keys' and values' input
of every cross-attention layer whose context has a width they were trained for.

Source: A1111 ``modules/hypernetworks/hypernetwork.py`` (the format of its ``.pt`` files and the formula) and
``modules/sd_hijack_optimizations.py`` (where it is applied). A file is a pickled dict::

    {768: (k_state, v_state), 320: (...), ...,     # per context width, two HypernetworkModule state dicts
     "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
     "activate_output": False, "use_dropout": ..., "dropout_structure": [0, 0, 0], "last_layer_dropout": ...,
     "weight_initialization": "Normal", "name": ..., "step": ..., "sd_checkpoint": ..., "sd_checkpoint_name": ...,
     "optional_info": ...}

A ``HypernetworkModule`` for width ``dim`` is ``nn.Sequential`` named ``linear``; for each step ``i`` of
``layer_structure`` it holds, in order: ``Linear(int(dim * ls[i]), int(dim * ls[i + 1]))``; the activation,
except for ``"linear"`` / None and after the last Linear unless ``activate_output``; a ``LayerNorm`` if
``is_layer_norm``; a ``Dropout`` if ``dropout_structure[i + 1] > 0``. Dropout does nothing at inference, but
it takes an index in the Sequential, so it decides the state-dict keys (``linear.3.weight``...). Its
output is ``x + linear(x) * multiplier``. Defaults when a field is missing are those of ``Hypernetwork.load``
(``activate_output`` True, ``layer_structure`` [1, 2, 1], ``last_layer_dropout`` False); the oldest files'
``linear1`` / ``linear2`` keys are ``linear.0`` / ``linear.1``.

Applied in every ``CrossAttention`` (``apply_hypernetworks``): ``context_k = context_v = context`` (the text
for attn2, the layer's own normalised input ``x`` for attn1, the self-attention), then for each hypernetwork
in order, the pair for ``context_k.shape[2]`` (none: unchanged) maps ``context_k`` with its first module and
``context_v`` with its second; ``to_k`` reads ``context_k``, ``to_v`` reads ``context_v``. So an SD 1 file's
320 / 640 / 1280 pairs change the self-attention too.

Activation names are A1111's ``activation_dict``: ``linear`` (none), ``relu``, ``leakyrelu``, ``elu``,
``swish`` (which A1111 maps to ``Hardswish``), ``tanh``, ``sigmoid``, then every class of
``torch.nn.modules.activation`` by its lower-case name, built with its default arguments. Here they are the
functional forms of those defaults; the classes that cannot work on ``[batch, tokens, width]`` inputs as
A1111 builds them are refused with one line.

Files are read with ``weights_only=True`` (``sdstudio.models.loading.load_pickle``): a file that needs code
to unpickle is refused, nothing from it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models.loading import file_head, load_pickle, looks_like_safetensors

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "Hypernetwork",
    "HypernetworkLayer",
    "HypernetworkModule",
    "HypernetworkStack",
    "HypernetworkUse",
    "load_hypernetwork",
    "prepare_hypernetworks",
]

_Activation = Callable[[Tensor, "Tensor | None"], Tensor]  # (x, learned parameter or None) -> y


def _plain(fn: Callable[[Tensor], Tensor]) -> _Activation:
    return lambda x, _weight: fn(x)


# A1111's names -> torch's module with its default arguments, in eval mode, as a function.
ACTIVATIONS: Mapping[str, _Activation] = {
    "relu": _plain(F.relu),
    "leakyrelu": _plain(F.leaky_relu),  # negative_slope 0.01
    "elu": _plain(F.elu),
    "swish": _plain(F.hardswish),  # A1111: "swish": torch.nn.Hardswish
    "tanh": _plain(torch.tanh),
    "sigmoid": _plain(torch.sigmoid),
    "celu": _plain(F.celu),
    "gelu": _plain(F.gelu),
    "hardshrink": _plain(F.hardshrink),
    "hardsigmoid": _plain(F.hardsigmoid),
    "hardswish": _plain(F.hardswish),
    "hardtanh": _plain(F.hardtanh),
    "logsigmoid": _plain(F.logsigmoid),
    "mish": _plain(F.mish),
    "prelu": lambda x, weight: F.prelu(x, weight),  # its slope is learned: linear.<i>.weight, [1]
    "relu6": _plain(F.relu6),
    "rrelu": _plain(lambda x: F.rrelu(x, training=False)),  # eval: slope (1/8 + 1/3) / 2
    "selu": _plain(F.selu),
    "silu": _plain(F.silu),
    "softplus": _plain(F.softplus),
    "softshrink": _plain(F.softshrink),
    "softsign": _plain(F.softsign),
    "tanhshrink": _plain(F.tanhshrink),
}
_REFUSED = {
    "glu": "halves the width, so the next layer cannot take it (A1111 fails on it too)",
    "threshold": "cannot be built without arguments (A1111 fails on it too)",
    "multiheadattention": "cannot be built without arguments (A1111 fails on it too)",
    **dict.fromkeys(
        ("softmax", "softmin", "logsoftmax", "softmax2d"),
        "normalises over torch's implicit dimension, the batch for [batch, tokens, width] inputs, so its "
        "result depends on which images share a batch: not supported",
    ),
}
_FIELDS = {"layer_structure", "activation_func", "is_layer_norm", "activate_output", "use_dropout",
           "dropout_structure", "last_layer_dropout", "weight_initialization", "name", "step", "sd_checkpoint",
           "sd_checkpoint_name", "optional_info"}  # fmt: skip
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip
_DAMAGED = "it is damaged or incomplete: download it again"
_EXAMPLES = 3


@dataclass(frozen=True, eq=False)
class HypernetworkLayer:
    """One Linear of a ``HypernetworkModule`` and the activation and LayerNorm that follow it."""

    weight: Tensor  # [out, in]
    bias: Tensor  # [out]
    activation: str | None = None  # a key of ACTIVATIONS; None: none
    activation_weight: Tensor | None = None  # PReLU's learned slope, [1]
    norm_weight: Tensor | None = None  # LayerNorm (eps 1e-5) after the activation: [out]
    norm_bias: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.activation is not None:
            h = ACTIVATIONS[self.activation](h, self.activation_weight)
        if self.norm_weight is not None:
            h = F.layer_norm(h, (h.shape[-1],), self.norm_weight, self.norm_bias)
        return h

    def to(self, device: torch.device | str, dtype: torch.dtype) -> HypernetworkLayer:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return HypernetworkLayer(
            self.weight.to(device=device, dtype=dtype), self.bias.to(device=device, dtype=dtype),
            self.activation, move(self.activation_weight), move(self.norm_weight), move(self.norm_bias),
        )  # fmt: skip


@dataclass(frozen=True, eq=False)
class HypernetworkModule:
    """A1111's ``HypernetworkModule`` as data: ``x + mlp(x) * multiplier``, the width of ``x`` kept."""

    layers: tuple[HypernetworkLayer, ...]

    def __call__(self, x: Tensor, multiplier: float) -> Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        return x + h * multiplier  # [..., width]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> HypernetworkModule:
        return HypernetworkModule(tuple(layer.to(device, dtype) for layer in self.layers))


@dataclass(frozen=True, eq=False)
class Hypernetwork:
    """An A1111 hypernetwork file as read: per context width, the modules for the keys and for the values
    (float32, CPU), and the file's fields. ``warnings``: what of the file was not used."""

    name: str
    path: Path | None
    layers: Mapping[int, tuple[HypernetworkModule, HypernetworkModule]]  # width -> (for k, for v)
    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = None
    is_layer_norm: bool = False
    activate_output: bool = True
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = (0, 0, 0)  # as A1111 derives it; decides only the key layout
    last_layer_dropout: bool = False
    weight_initialization: str | None = None
    trained_name: str | None = None  # the file's "name" (A1111 shows it; tags find files by their stem)
    step: int | None = None
    sd_checkpoint: str | None = None  # the hash of the model it was trained on
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    warnings: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the file's non-tensor fields

    @property
    def widths(self) -> tuple[int, ...]:
        """The context widths it changes: 768 for SD 1's text, 320 / 640 / 1280 for its self-attention..."""
        return tuple(sorted(self.layers))


@dataclass(frozen=True)
class HypernetworkUse:
    """A hypernetwork and its strength, as ``<hypernet:NAME:MULT>`` asks for it."""

    hypernetwork: Hypernetwork
    multiplier: float = 1.0


@dataclass(frozen=True, eq=False)
class _Prepared:
    multiplier: float
    layers: Mapping[int, tuple[HypernetworkModule, HypernetworkModule]]


@dataclass(frozen=True, eq=False)
class HypernetworkStack:
    """The hypernetworks of one request, on the UNet's device and in its dtype, in the order applied.

    Passed to ``UNetModel.forward(..., hypernetworks=stack)``; each ``CrossAttention`` asks :meth:`kv`.
    Hashed and compared by identity (it may key a cache of captured graphs)."""

    uses: tuple[_Prepared, ...]

    @property
    def widths(self) -> frozenset[int]:
        return frozenset(w for use in self.uses for w in use.layers)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """A1111's ``apply_hypernetworks``: (context_k, context_v) for ``to_k`` and ``to_v``.

        context: [batch, tokens, width], the text for cross-attention or ``x`` for self-attention."""
        context_k = context_v = context
        for use in self.uses:
            pair = use.layers.get(context_k.shape[-1])
            if pair is not None:
                context_k = pair[0](context_k, use.multiplier)
                context_v = pair[1](context_v, use.multiplier)
        return context_k, context_v


def prepare_hypernetworks(
    uses: Iterable[HypernetworkUse], device: torch.device | str, dtype: torch.dtype
) -> HypernetworkStack | None:
    """``uses`` moved once to ``device`` and ``dtype``; None when there is nothing to apply (no uses, or
    every multiplier 0: ``x + mlp(x) * 0`` is ``x``), so that the UNet runs as without them."""
    prepared = tuple(
        _Prepared(
            float(use.multiplier),
            {w: (k.to(device, dtype), v.to(device, dtype)) for w, (k, v) in use.hypernetwork.layers.items()},
        )
        for use in uses
        if use.multiplier != 0 and use.hypernetwork.layers
    )
    return HypernetworkStack(prepared) if prepared else None


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a usable AUTOMATIC1111 hypernetwork: {problem}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layer_structure(path: Path, value: object) -> tuple[float, ...]:
    if value is None:
        return (1, 2, 1)  # A1111 Hypernetwork.load's default
    if (
        not isinstance(value, (list, tuple))
        or len(value) < 2
        or not all(_number(v) and v > 0 for v in value)
        or value[0] != 1
        or value[-1] != 1
    ):
        raise _fail(
            path, f"its layer_structure {str(value)[:80]} is not a list of sizes that starts and ends with 1"
        )
    return tuple(value)


def _dropout_structure(
    path: Path, state: Mapping[Any, object], n: int
) -> tuple[bool, bool, tuple[float, ...]]:
    """(use_dropout, last_layer_dropout, dropout_structure) as A1111's ``load`` and ``parse_dropout_structure``
    derive them."""
    given = state.get("dropout_structure")
    last = bool(state.get("last_layer_dropout", False))
    if given is not None:
        if not isinstance(given, (list, tuple)) or not all(_number(p) for p in given):
            raise _fail(path, f"its dropout_structure {str(given)[:80]} is not a list of probabilities")
        use = any(given) or bool(state.get("use_dropout", False))
        structure = tuple(given)
    else:
        use = bool(state.get("use_dropout", False))
        structure = (0, *[0.3] * (n - 3), 0.3 if last else 0, 0) if use else (0,) * n
    if len(structure) < n:
        raise _fail(path, f"its dropout_structure {list(structure)} is shorter than its layer_structure")
    bad = next((p for p in structure[1:n] if not p < 1), None)
    if bad is not None:  # A1111 asserts 0 < p < 1 for every dropout it builds
        raise _fail(path, f"its dropout_structure has the probability {bad}, not below 1")
    return use, last, structure


@dataclass(frozen=True)
class _Slot:
    """Where one Linear and the modules after it sit in A1111's Sequential."""

    linear: int
    features: tuple[int, int]  # (in, out)
    activation: str | None
    activation_index: int | None
    norm: int | None


def _slots(
    path: Path, dim: int, structure: tuple[float, ...], activation: str | None, layer_norm: bool,
    activate_output: bool, dropout: tuple[float, ...],
) -> list[_Slot]:  # fmt: skip
    """A1111 ``HypernetworkModule.__init__``'s layout for width ``dim``."""
    slots, index, n = [], 0, len(structure)
    for i in range(n - 1):
        linear = index
        index += 1
        act = None if activation in ("linear", None) or (i >= n - 2 and not activate_output) else activation
        act_index = None
        if act is not None:
            if act in _REFUSED:
                raise _fail(path, f"its activation_func {act!r} {_REFUSED[act]}")
            if act not in ACTIVATIONS:
                raise _fail(
                    path,
                    f"unknown activation_func {str(act)[:40]!r} (known: linear, {', '.join(sorted(ACTIVATIONS))})",
                )
            act_index, index = index, index + 1
        norm = None
        if layer_norm:
            norm, index = index, index + 1
        if dropout[i + 1] > 0:
            index += 1
        features = (int(dim * structure[i]), int(dim * structure[i + 1]))
        slots.append(_Slot(linear, features, act, act_index, norm))
    return slots


def _expected_shapes(slots: list[_Slot]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for s in slots:
        fan_in, out = s.features
        shapes[f"linear.{s.linear}.weight"] = (out, fan_in)
        shapes[f"linear.{s.linear}.bias"] = (out,)
        if s.activation == "prelu":
            shapes[f"linear.{s.activation_index}.weight"] = (1,)
        if s.norm is not None:
            shapes[f"linear.{s.norm}.weight"] = (out,)
            shapes[f"linear.{s.norm}.bias"] = (out,)
    return shapes


def _tensor(path: Path, where: str, value: object, held: int) -> Tensor:
    """A plain, finite float CPU tensor whose data the file holds, as a float32 copy."""
    if not isinstance(value, Tensor):
        raise _fail(path, f"{where} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
        raise _fail(path, f"{where} is not a plain CPU tensor ({value.layout}, {value.device})")
    if not value.is_floating_point():
        raise _fail(path, f"{where} holds {value.dtype}, not floating-point weights")
    if value.numel() * value.element_size() > min(value.untyped_storage().nbytes(), held):
        raise CheckpointError(f"{path}: {where} claims more data than the file holds; {_DAMAGED}")
    out = value.to(torch.float32, copy=True)
    if not torch.isfinite(out).all():
        raise CheckpointError(
            f"{path}: {where} holds NaN or infinite values (a diverged training run?); it would turn every image "
            "black: use an earlier save of it"
        )
    return out


def _module(path: Path, where: str, state: object, slots: list[_Slot], held: int) -> HypernetworkModule:
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise _fail(path, f"{where} is a {type(state).__name__}, not a state dict")
    state = {_OLD_KEYS.get(k, k): v for k, v in state.items()}
    shapes = _expected_shapes(slots)
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        found = ", ".join(
            ([f"missing {missing[:_EXAMPLES]}"] if missing else [])
            + ([f"unexpected {extra[:_EXAMPLES]}"] if extra else [])
        )
        raise _fail(
            path,
            f"{where} does not fit its layer_structure / activation / layer norm / dropout fields ({found})",
        )
    tensors = {k: _tensor(path, f"{where} {k}", state[k], held) for k in shapes}
    wrong = next((k for k, shape in shapes.items() if tuple(tensors[k].shape) != shape), None)
    if wrong is not None:
        raise _fail(
            path, f"{where} {wrong} has shape {list(tensors[wrong].shape)}, expected {list(shapes[wrong])}"
        )

    def get(index: int | None, name: str) -> Tensor | None:
        return None if index is None else tensors[f"linear.{index}.{name}"]

    def layer(s: _Slot) -> HypernetworkLayer:
        slope = get(s.activation_index, "weight") if s.activation == "prelu" else None
        weight, bias = tensors[f"linear.{s.linear}.weight"], tensors[f"linear.{s.linear}.bias"]
        return HypernetworkLayer(
            weight, bias, s.activation, slope, get(s.norm, "weight"), get(s.norm, "bias")
        )

    return HypernetworkModule(tuple(layer(s) for s in slots))


def _optional(value: object, kind: type) -> Any:
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _read(path: Path) -> dict:
    if looks_like_safetensors(path, file_head(path)):
        raise CheckpointError(
            f"{path}: a .safetensors file is not an AUTOMATIC1111 hypernetwork (A1111 saves them as .pt pickles); "
            "if it is a LoRA, use it as <lora:...>"
        )
    state = load_pickle(path)
    if not isinstance(state, dict):
        raise _fail(path, f"it holds a {type(state).__name__}, not a dict")
    return state


def load_hypernetwork(path: str | Path, name: str | None = None) -> Hypernetwork:
    """Read an A1111 hypernetwork ``.pt``: every problem is one ``CheckpointError`` line naming the file.

    ``name``: what prompts call it (default: the file's stem, as A1111 lists them)."""
    path = Path(path)
    state = _read(path)
    pairs = {k: v for k, v in state.items() if type(k) is int}  # A1111: type(size) == int
    if not pairs:
        raise _fail(path, "it has no layer pairs keyed by context width (such as 768)")
    structure = _layer_structure(path, state.get("layer_structure"))
    activation = state.get("activation_func")
    if activation is not None and not isinstance(activation, str):
        raise _fail(path, f"its activation_func is a {type(activation).__name__}, not a name")
    layer_norm = bool(state.get("is_layer_norm", False))
    activate_output = bool(state.get("activate_output", True))
    use_dropout, last_dropout, dropout = _dropout_structure(path, state, len(structure))
    held = path.stat().st_size
    layers = {}
    for width, pair in sorted(pairs.items()):
        if width <= 0:
            raise _fail(path, f"its layer pair for width {width} is for no possible width")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            got = f"{len(pair)} entries" if isinstance(pair, (list, tuple)) else f"a {type(pair).__name__}"
            raise _fail(
                path, f"its entry for width {width} is {got}, not a pair of state dicts (keys, values)"
            )
        slots = _slots(path, width, structure, activation, layer_norm, activate_output, dropout)
        layers[width] = (
            _module(path, f"width {width} keys module", pair[0], slots, held),
            _module(path, f"width {width} values module", pair[1], slots, held),
        )
    unknown = sorted(str(k) for k in state if type(k) is not int and k not in _FIELDS)
    warnings: tuple[str, ...] = ()
    if unknown:
        more = ", ..." if len(unknown) > _EXAMPLES else ""
        warning = (
            f"{path}: ignoring fields AUTOMATIC1111 does not read ({', '.join(unknown[:_EXAMPLES])}{more}): "
            "an extension may have written them"
        )
        log.warning(warning)
        warnings = (warning,)
    return Hypernetwork(
        name=name if name is not None else path.stem,
        path=path,
        layers=layers,
        layer_structure=structure,
        activation_func=activation,
        is_layer_norm=layer_norm,
        activate_output=activate_output,
        use_dropout=use_dropout,
        dropout_structure=dropout,
        last_layer_dropout=last_dropout,
        weight_initialization=_optional(state.get("weight_initialization"), str),
        trained_name=_optional(state.get("name"), str),
        step=_optional(state.get("step"), int),
        sd_checkpoint=_optional(state.get("sd_checkpoint"), str),
        sd_checkpoint_name=_optional(state.get("sd_checkpoint_name"), str),
        optional_info=_optional(state.get("optional_info"), str),
        warnings=warnings,
        metadata={str(k): v for k, v in state.items() if type(k) is not int},
    )
