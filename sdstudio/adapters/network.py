"""LoRA-family files as data: a ``Network`` of ``ModuleDelta`` records, each bound to one weight of a model.

Reading is two steps: the file's keys are grouped per module and classified by their parameter names
(LoRA / LoCon, LoHa, LoKr; see ``deltas``), then each module name is looked up in the model's
``KeyTable``. What cannot be used is not silently dropped: keys that name nothing in the model, modules
whose shapes do not fit (a LoRA made for another architecture), and formats not supported (DoRA, IA3,
OFT, norms, ...) each become one warning naming the file, kept in ``Network.warnings`` and logged.

Damaged files fail as the checkpoint loader fails (``sdstudio.models.loading``: one-line
``CheckpointError``, pickles that need code refused); NaN or infinite values are refused the same way,
since merging them would turn every image black.

Alphas and scales (sources: kohya ``networks/lora.py``, A1111 ``network.py`` ``calc_scale``, diffusers
``utils/peft_utils.py`` ``get_peft_kwargs``): kohya and LyCORIS store a 0-d ``alpha`` per module, scale
``alpha / rank``, none means scale 1. diffusers / PEFT files carry no alpha (scale 1) unless the file has
``<module>.alpha`` tensors (diffusers' kohya conversions) or a ``lora_adapter_metadata`` JSON header entry
(``{"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {...}, "unet.use_rslora": false, ...}``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdstudio.adapters.deltas import Factors, LoHa, LoKr, LoRA, RowDelta, fits
from sdstudio.adapters.keys import KeyTable, Target
from sdstudio.errors import CheckpointError
from sdstudio.models.loading import read_state_dict

log = logging.getLogger(__name__)

__all__ = ["ModuleDelta", "Network", "load_network", "network_from_state_dict"]

# Parameter-name endings -> the role of the tensor. Longest first: ".lora.down.weight" before ".down.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_mid.weight": "mid",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down",  # diffusers <= 0.24 text-encoder MLPs
            ".lora_linear_layer.up.weight": "up",
            ".down.weight": "down",  # diffusers <= 0.24 processors: "attn1.processor.to_q_lora.down.weight"
            ".up.weight": "up",
            ".alpha": "alpha",
            ".dora_scale": "dora_scale",
            **{f".{n}": n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
            **{f".{n}": n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
            ".lokr_t2": "lokr_t2",
            # recognised so that they are reported as unsupported rather than as unknown keys
            **{f".{n}": n for n in ("w_norm", "b_norm", "diff", "diff_b", "bias", "weight", "on_input",
                                    "oft_blocks", "oft_diag", "rescale", "a1.weight", "a2.weight",
                                    "b1.weight", "b2.weight", "lora_up.bias", "lora_down.bias")},
        }.items(),
        key=lambda item: -len(item[0]),
    )
)  # fmt: skip
_LORA_PARTS = {"down", "up", "mid", "alpha"}
_LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
_LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
# what each unsupported key set is, for the warning (A1111 / ComfyUI module types)
_UNSUPPORTED = {"dora_scale": "DoRA", "w_norm": "norm", "b_norm": "norm", "diff": "full diff", "diff_b": "full diff",
                "bias": "bias", "weight": "IA3 or full weight", "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT",
                "rescale": "BOFT", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA",
                "b2.weight": "GLoRA", "lora_up.bias": "bias", "lora_down.bias": "bias"}  # fmt: skip
_PEFT_METADATA = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
_EXAMPLES = 3


@dataclass(frozen=True, eq=False)
class ModuleDelta:
    """One module of a network: the weight it patches and the factors of its change."""

    name: str  # as the file names it: "lora_unet_down_blocks_0_attentions_0_proj_in"
    target: Target
    factors: Factors

    @property
    def kind(self) -> str:
        return self.factors.kind

    def prepare(self, multiplier: float, device: torch.device | str = "cpu") -> RowDelta:
        """``multiplier * scale * dW`` in float32 on ``device``, to add by blocks of rows."""
        return self.factors.prepare(multiplier, torch.device(device))

    def delta(
        self, multiplier: float = 1.0, dtype: torch.dtype = torch.float32, device: Any = "cpu"
    ) -> Tensor:
        """``multiplier * scale * dW`` shaped as the target, ``[out, in]`` or ``[out, in, kh, kw]``
        (computed in float32, then cast to ``dtype``)."""
        acc = torch.zeros(self.target.shape, dtype=torch.float32, device=device)
        self.prepare(multiplier, acc.device).add_rows_(acc, 0, acc.shape[0])
        return acc.to(dtype)


@dataclass(frozen=True, eq=False)
class Network:
    """A LoRA-family file read for one architecture (the ``KeyTable`` it was read with): it applies to any
    model of that architecture. ``warnings`` say what of the file was not used and why."""

    name: str
    path: Path | None
    modules: tuple[ModuleDelta, ...]
    warnings: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def kinds(self) -> dict[str, int]:
        """How many modules of each format: ``{"lora": 264}``."""
        counts: dict[str, int] = {}
        for m in self.modules:
            counts[m.kind] = counts.get(m.kind, 0) + 1
        return counts


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _peft_config(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    text = metadata.get(_PEFT_METADATA)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        log.warning("%s: ignoring its %s (not JSON)", where, _PEFT_METADATA)
        return {}
    return config if isinstance(config, dict) else {}


def _peft_scale(module: str, rank: int, config: Mapping[str, Any]) -> float | None:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module`` from the adapter metadata, or None.

    ``alpha_pattern`` keys match a suffix of the module path, as PEFT's ``get_pattern_key`` matches them."""
    component, _, path = module.partition(".")
    if component not in ("unet", "text_encoder", "text_encoder_2"):  # SDXL's second encoder: its own entries
        return None
    alpha = config.get(f"{component}.lora_alpha")
    patterns = config.get(f"{component}.alpha_pattern") or {}
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
                alpha = value
                break
    if not isinstance(alpha, (int, float)):
        return None
    divisor = math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank
    return float(alpha) / divisor


def _scale(parts: Mapping[str, Tensor], rank: int | None) -> float:
    """kohya / LyCORIS: ``alpha / rank``; no alpha (or no rank to divide by) means 1."""
    alpha = parts.get("alpha")
    if alpha is None or rank is None or rank == 0:
        return 1.0
    return float(alpha.float().reshape(-1)[0]) / rank


def _factors(module: str, parts: Mapping[str, Tensor], peft: Mapping[str, Any]) -> Factors | str:
    """The module's factors, or why it cannot be used."""
    roles = set(parts)
    unsupported = sorted({_UNSUPPORTED[r] for r in roles if r in _UNSUPPORTED})
    if unsupported:
        return f"unsupported {'/'.join(unsupported)}"
    if roles <= _LORA_PARTS and {"down", "up"} <= roles:
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        scale = _scale(parts, rank) if "alpha" in parts else (_peft_scale(module, rank, peft) or 1.0)
        return LoRA(down=down, up=up, mid=parts.get("mid"), scale=scale)
    if roles <= _LOHA_PARTS and {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        tucker = {"hada_t1", "hada_t2"} & roles
        if tucker and tucker != {"hada_t1", "hada_t2"}:
            return "LoHa with only one of hada_t1 / hada_t2"
        return LoHa(
            w1_a=parts["hada_w1_a"], w1_b=parts["hada_w1_b"], w2_a=parts["hada_w2_a"], w2_b=parts["hada_w2_b"],
            t1=parts.get("hada_t1"), t2=parts.get("hada_t2"), scale=_scale(parts, parts["hada_w1_b"].shape[0]),
        )  # fmt: skip
    if roles <= _LOKR_PARTS:
        has_w1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
        has_w2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
        if has_w1 and has_w2:
            rank = None  # A1111 network_lokr.py: the rank of the factored *_b matrix, w2's over w1's
            if "lokr_w1" not in roles:
                rank = parts["lokr_w1_b"].shape[0]
            if "lokr_w2" not in roles:
                rank = parts["lokr_w2_b"].shape[0]
            return LoKr(
                w1=parts.get("lokr_w1"), w1_a=parts.get("lokr_w1_a"), w1_b=parts.get("lokr_w1_b"),
                w2=parts.get("lokr_w2"), w2_a=parts.get("lokr_w2_a"), w2_b=parts.get("lokr_w2_b"),
                t2=parts.get("lokr_t2") if "lokr_w2" not in roles else None, scale=_scale(parts, rank),
            )  # fmt: skip
    return f"incomplete or mixed keys ({', '.join(sorted(roles))})"


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _architecture_hint(metadata: Mapping[str, str]) -> str:
    """What the file says it was trained on (kohya's ss_* and modelspec metadata), for the warning."""
    said = [
        f"{k}={metadata[k]}"
        for k in ("modelspec.architecture", "ss_base_model_version", "ss_v2")
        if metadata.get(k)
    ]
    return f"; the file says {', '.join(said)}" if said else ""


def _check_finite(state: Mapping[str, Tensor], where: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{where}: tensor {key!r} holds NaN or infinite values; the LoRA is damaged "
                "(or was saved from a diverged training run) and would ruin every image"
            )


def network_from_state_dict(
    state: Mapping[str, Tensor],
    table: KeyTable,
    *,
    name: str,
    path: Path | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Network:
    """A ``Network`` from a LoRA state dict already in memory (``load_network`` reads files with it)."""
    metadata = dict(metadata or {})
    where = str(path) if path is not None else name
    _check_finite(state, where)
    peft = _peft_config(metadata, where)

    groups: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = tensor

    modules: list[ModuleDelta] = []
    unmatched: list[str] = []
    unusable: dict[str, list[str]] = {}
    misfits: list[str] = []
    for module, parts in groups.items():
        target = table.get(module)
        if target is None:
            unmatched.append(module)
            continue
        factors = _factors(module, parts, peft)
        if isinstance(factors, str):
            unusable.setdefault(factors, []).append(module)
            continue
        natural = factors.natural_shape()
        if not fits(natural, target.shape):
            misfits.append(f"{module} {list(natural)} vs {list(target.shape)}")
            continue
        modules.append(ModuleDelta(name=module, target=target, factors=factors))

    warnings: list[str] = []
    total = len(groups)
    if misfits:
        warnings.append(
            f"{where}: {len(misfits)} of {total} modules do not fit the weights of this {table.architecture} "
            f"model and are skipped: made for another architecture?{_architecture_hint(metadata)} "
            f"(e.g. {_examples(misfits)})"
        )
    if unmatched and (modules or misfits):
        warnings.append(
            f"{where}: {len(unmatched)} of {total} module names match nothing in this {table.architecture} "
            f"model and are skipped (e.g. {_examples(unmatched)})"
        )
    elif unmatched:
        warnings.append(
            f"{where}: none of its {total} module names matches anything in this {table.architecture} model: "
            f"made for another architecture?{_architecture_hint(metadata)} (e.g. {_examples(unmatched)})"
        )
    for reason, names in unusable.items():
        warnings.append(f"{where}: {len(names)} modules skipped, {reason} (e.g. {_examples(names)})")
    if unknown:
        warnings.append(
            f"{where}: {len(unknown)} keys of no known LoRA format ignored (e.g. {_examples(unknown)})"
        )
    if not modules and not warnings:
        warnings.append(f"{where}: holds no LoRA weights")
    for warning in warnings:
        log.warning("%s", warning)
    return Network(name=name, path=path, modules=tuple(modules), warnings=tuple(warnings), metadata=metadata)


def load_network(path: str | Path, table: KeyTable, name: str | None = None) -> Network:
    """Read a LoRA / LyCORIS / diffusers-PEFT file (``.safetensors``, or a weights-only pickle ``.pt`` /
    ``.ckpt``) for the model ``table`` was built from. ``name`` defaults to the file's stem."""
    path = Path(path)
    state, metadata = read_state_dict(path)
    return network_from_state_dict(state, table, name=name or path.stem, path=path, metadata=metadata)
