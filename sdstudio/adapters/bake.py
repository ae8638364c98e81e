"""LoRAs baked into a checkpoint, and a LoRA extracted from the difference of two checkpoints.

``bake``: the checkpoint's weights become ``W0 + sum_i m_i * dW_i`` (each network's text-encoder or UNet
multiplier, as AUTOMATIC1111's ``<lora:name:te:unet>`` applies them), computed in float32 and cast once to
the output dtype, so that generating with the baked file equals generating with the LoRAs merged at run
time by ``WeightPatcher`` (``tests/adapters/test_bake_extract.py``). The recipe (base file and hash, each
LoRA's file, A1111 hash and multipliers) is written into the header as JSON under ``sdstudio_lora_bake``.

``extract`` (kohya sd-scripts ``networks/extract_lora_from_models.py``, after cloneofsimo's
``lora_diffusion/cli_svd.py``): for each weight kohya's ``networks/lora.py`` puts a LoRA on, the
difference ``D = TUNED - BASE`` in float32 is truncated by its SVD (Eckart-Young: the best rank-r
approximation in the Frobenius norm) into ``up = U_r S_r`` [out, r] and ``down = V_r^T`` [r, in(, kh, kw)],
with ``alpha = r`` (scale 1). Targets, as kohya's: the transformer blocks' linears and 1x1 convolutions
and the text encoder's attention and MLP linears; with ``conv_rank`` also the ResNet blocks (3x3
convolutions at ``conv_rank``, their linears and 1x1 shortcuts at ``rank``) and the down / up samplers. A
3x3 convolution is the matrix [out, in * kh * kw] (kohya's LoCon). ``conv_in``, ``conv_out``, the time
embedding, biases, norms and token embeddings are no kohya targets: their difference is reported as lying
outside the LoRA. Decisions where kohya's script differs:

* a module is skipped when ``||D|| <= min_diff * ||W_base||`` (Frobenius norms; default 1e-3, five times
  the rounding noise of an fp16 copy of a float32 model), where kohya drops the whole text encoder when no
  element differs by more than an absolute 0.01;
* kohya clamps ``up`` and ``down`` at the 0.99 quantile of their values by default; here clamping is off
  unless ``clamp_quantile`` is given (it costs captured energy: the rank-r product is no longer the best);
* the captured fraction of the difference's energy, ``1 - ||D - up @ down||^2 / ||D||^2``, is measured on
  the factors as written (after clamping and the cast to the file's dtype) and reported per part.

The header has the ``ss_*`` entries kohya writes and A1111 reads (``ss_network_module``, ``ss_network_dim``,
``ss_network_alpha``, ``ss_network_args``, ``ss_v2``, ``ss_base_model_version``) and ``sshs_model_hash``,
the sha256 of the tensor data after the header (``hashes.addnet_hash``), which A1111 shows as the LoRA's hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from torch import Tensor, nn

from sdstudio.adapters.hashes import short_hash
from sdstudio.adapters.keys import KeyTable, Part, Target, key_table
from sdstudio.adapters.network import ModuleDelta, Network, load_network
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, check_writable
from sdstudio.models.loading import DTYPES, LoadedModel, file_sha256, load_model, read_safetensors, save_model
from sdstudio.models.stablediffusion import SDXL_TEXT_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

log = logging.getLogger(__name__)

__all__ = [
    "BakeResult", "BakedNetwork", "ExtractReport", "KohyaModule", "LoraSpec", "LowRank", "ModuleEnergy",
    "PartEnergy", "bake", "extract", "kohya_modules", "low_rank", "parse_lora_spec", "stored_dtype",
]  # fmt: skip

BAKE_METADATA = "sdstudio_lora_bake"
EXTRACT_METADATA = "sdstudio_lora_extract"
# SDXL keeps its text encoders under "conditioner."
_PART_PREFIX: dict[Part, tuple[str, ...]] = {"unet": (UNET_PREFIX,), "te": (TEXT_PREFIX, SDXL_TEXT_PREFIX)}
_PART_NAME: dict[Part, str] = {"unet": "UNet", "te": "text encoder"}
_QUANTILE_LIMIT = 1 << 24


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The one floating dtype of a ``.safetensors`` checkpoint's UNet and text encoder (fp32, fp16 or bf16),
    read from its memory map; None for mixed dtypes and for other formats (not read: a ``.ckpt`` costs a
    full unpickling)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    state, _ = read_safetensors(path)
    prefixes = (UNET_PREFIX, TEXT_PREFIX, SDXL_TEXT_PREFIX)
    dtypes = {t.dtype for k, t in state.items() if k.startswith(prefixes) and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES.values() else None


def _check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse, before any work, an output that is not ``.safetensors``, cannot be written, exists (without
    ``overwrite``) or is one of the inputs."""
    if output.suffix != ".safetensors":
        raise SdStudioError(f"{output}: the output file must end in .safetensors")
    check_writable(output, "output file")
    if output.exists() and not overwrite:
        raise SdStudioError(f"{output}: already exists; pass --overwrite to replace it")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise SdStudioError(f"{output}: is also an input; write the result to another file")


# --- bake -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its multipliers, as A1111's ``<lora:name:te:unet>``: ``unet`` defaults to ``te``."""

    path: Path
    te: float = 1.0
    unet: float | None = None

    @property
    def unet_multiplier(self) -> float:
        return self.te if self.unet is None else self.unet


def parse_lora_spec(text: str) -> LoraSpec:
    """``FILE``, ``FILE:M`` (both multipliers M) or ``FILE:TE:UNET``. Only trailing ``:number`` parts are
    multipliers, so a path with colons (``C:\\loras\\a.safetensors``) stays whole."""
    path, numbers = text, []
    while len(numbers) < 2:
        head, colon, tail = path.rpartition(":")
        if not colon or not head:
            break
        try:
            value = float(tail)
        except ValueError:
            break
        if not math.isfinite(value):
            raise SdStudioError(f"{text}: multiplier {tail!r} is not a finite number")
        numbers.insert(0, value)
        path = head
    if not path:
        raise SdStudioError(f"{text!r}: no LoRA file (write FILE, FILE:MULT or FILE:TE_MULT:UNET_MULT)")
    if not numbers:
        return LoraSpec(Path(path))
    return LoraSpec(Path(path), numbers[0], numbers[1] if len(numbers) > 1 else None)


@dataclass(frozen=True)
class BakedNetwork:
    """One network as baked: its file, A1111 hash, multipliers and the modules it changed."""

    name: str
    path: Path
    hash: str  # the 12 hex digits A1111 writes into ``Lora hashes``
    te: float
    unet: float
    modules: int


@dataclass(frozen=True)
class BakeResult:
    output: Path
    checkpoint: Path
    base_hash: str  # A1111's "Model hash" of the checkpoint (10 hex digits; "" for a diffusers folder)
    dtype: str  # of the written weights: "fp16", "bf16" or "fp32"
    networks: tuple[BakedNetwork, ...]
    weights: int  # weights of the checkpoint that changed
    warnings: tuple[str, ...] = ()

    def summary(self) -> list[str]:
        lines = [
            f"{n.name}: {n.modules} modules, te {n.te:g}, unet {n.unet:g} (hash {n.hash})"
            for n in self.networks
        ]
        return [*lines, f"{self.weights} weights changed; written as {self.dtype} to {self.output}"]


def _merge(model: nn.Module, uses: Sequence[tuple[Network, float, float]]) -> int:
    """Add ``m * dW`` of every module of ``uses`` to the weights, each weight summed in float32 from its
    original and cast once (the order ``WeightPatcher`` sums in); the number of weights changed."""
    params = dict(model.named_parameters())
    plan: dict[str, list[tuple[ModuleDelta, float]]] = {}
    for network, te, unet in uses:
        for delta in network.modules:
            multiplier = te if delta.target.part == "te" else unet
            if multiplier != 0:
                plan.setdefault(delta.target.key, []).append((delta, multiplier))
    with torch.no_grad():
        for key, deltas in plan.items():
            param = params[key]
            acc = torch.empty(param.shape, dtype=torch.float32, device=param.device)  # [out, in(, kh, kw)]
            acc.copy_(param)
            for delta, multiplier in deltas:
                first, last = delta.target.rows or (0, acc.shape[0])
                delta.prepare(multiplier, acc.device).add_rows_(acc[first:last], 0, last - first)
            param.copy_(acc)
    return len(plan)


def _read_networks(specs: Sequence[LoraSpec], table: KeyTable, strict: bool) -> list[Network]:
    networks = []
    for spec in specs:
        network = load_network(spec.path, table)  # logs its warnings
        if strict and network.warnings:
            raise SdStudioError(f"{network.warnings[0]} (--strict-networks)")
        if not network.modules:
            raise SdStudioError(
                f"{spec.path}: none of its modules fits this {table.architecture} model; nothing to bake"
            )
        networks.append(network)
    return networks


def bake(
    checkpoint: str | Path,
    loras: Sequence[LoraSpec],
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> BakeResult:
    """Write ``checkpoint`` with ``loras`` merged into its weights to ``output`` (single-file ``.safetensors``).

    ``dtype``: of the written weights; None: the checkpoint's own (a ``.safetensors`` of one dtype), else
    fp16. The checkpoint is loaded in that dtype when it is stored in it (no copy of its memory map but for
    the changed weights), else in float32; either way each weight is summed in float32 and rounded once.
    ``strict``: a network that does not fully fit the model (its warnings) is an error (``--strict-networks``);
    a network none of whose modules fits is an error either way. EMA weights are not written."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not loras:
        raise SdStudioError("no LoRA to bake; give at least one FILE[:TE[:UNET]]")
    for spec in loras:
        if not spec.path.is_file():
            raise SdStudioError(f"{spec.path}: no such LoRA file")
    _check_output(output, overwrite, [checkpoint, *(s.path for s in loras)])
    stored = stored_dtype(checkpoint)
    out_dtype = dtype or stored or torch.float16
    loaded = load_model(checkpoint, dtype=out_dtype if stored == out_dtype else torch.float32)
    networks = _read_networks(loras, key_table(loaded.model), strict)
    uses = [(n, s.te, s.unet_multiplier) for n, s in zip(networks, loras)]
    weights = _merge(loaded.model, uses)
    sha = file_sha256(checkpoint) if checkpoint.is_file() else ""
    baked = tuple(
        BakedNetwork(n.name, s.path, short_hash(s.path, n.metadata), te, unet, len(n.modules))
        for (n, te, unet), s in zip(uses, loras)
    )
    recipe = {
        "base": {"file": checkpoint.name, "sha256": sha, "hash": sha[:10]},
        "loras": [
            {
                "name": b.name,
                "file": b.path.name,
                "hash": b.hash,
                "te": b.te,
                "unet": b.unet,
                "modules": b.modules,
            }
            for b in baked
        ],
        "dtype": _dtype_name(out_dtype),
    }
    save_model(
        loaded.model,
        output,
        dtype=out_dtype,
        metadata={BAKE_METADATA: json.dumps(recipe)},
        overwrite=overwrite,
    )
    warnings = tuple(w for n in networks for w in n.warnings)
    log.info("baked %s into %s: %d weights", ", ".join(b.name for b in baked), output, weights)
    return BakeResult(output, checkpoint, sha[:10], _dtype_name(out_dtype), baked, weights, warnings)


# --- extract ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KohyaModule:
    """A weight kohya's ``networks/lora.py`` can put a LoRA on, by the name kohya gives it."""

    name: str  # "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"
    path: str  # the diffusers / transformers module path it was made from
    target: Target

    @property
    def convolution(self) -> bool:
        """A convolution with a kernel over 1x1 (ranked by ``conv_rank``)."""
        return len(self.target.shape) == 4 and math.prod(self.target.shape[2:]) > 1

    @property
    def block(self) -> str:
        """Which of kohya's module classes holds it: ``transformer`` (``Transformer2DModel``), ``resnet``
        (``ResnetBlock2D``), ``sampler`` (``Downsample2D`` / ``Upsample2D``), ``text`` (``CLIPAttention`` /
        ``CLIPMLP``), or ``other`` (conv_in, conv_out, the time embedding: LyCORIS targets, not kohya's)."""
        if self.target.part == "te":
            return "text"
        if ".attentions." in self.path:
            return "transformer"
        if ".resnets." in self.path:
            return "resnet"
        if ".downsamplers." in self.path or ".upsamplers." in self.path:
            return "sampler"
        return "other"


def kohya_modules(table: KeyTable) -> list[KohyaModule]:
    """Every target of ``table`` with its kohya name: the table's inverse for writing.

    A target's kohya name is the ``lora_unet_`` / ``lora_te_`` entry made from the diffusers / transformers
    path the table also lists for it (``unet.<path>``, ``text_encoder.text_model.<path>``), which tells it
    from the LDM-path alias (``lora_unet_input_blocks_1_1_proj_in``). Exactly one per target: SD 2's q, k, v
    row blocks of one ``in_proj_weight`` are three targets, so three modules."""
    forms: dict[Target, list[tuple[str, str]]] = {}
    for name, target in table.targets.items():
        if name.startswith("unet."):
            path = name.removeprefix("unet.")
            kohya = "lora_unet_" + path.replace(".", "_")
        elif name.startswith("text_encoder.text_model."):
            path = name.removeprefix("text_encoder.")
            kohya = "lora_te_" + path.replace(".", "_")
        else:
            continue
        if table.get(kohya) == target:  # a processor alias ("...processor.to_q_lora") makes no kohya name
            forms.setdefault(target, []).append((kohya, path))
    modules = []
    for target in dict.fromkeys(table.targets.values()):
        names = forms.get(target, [])
        if len(names) != 1:
            raise AssertionError(
                f"{target.key} {target.rows}: {len(names)} kohya names ({names}), expected one"
            )
        modules.append(KohyaModule(names[0][0], names[0][1], target))
    return modules


def _extracted(modules: Sequence[KohyaModule], conv: bool) -> list[KohyaModule]:
    """kohya's targets: transformers and text always, ResNet blocks and samplers with LoCon (``conv_dim``)."""
    blocks = {"transformer", "text", "resnet", "sampler"} if conv else {"transformer", "text"}
    return [m for m in modules if m.block in blocks]


@dataclass(frozen=True, eq=False)
class LowRank:
    """A rank-r factorisation of one difference, as written: ``up @ down ~ D``."""

    up: Tensor  # [out, r]
    down: Tensor  # [r, in * kh * kw]
    difference: float  # ||D||^2
    residual: float  # ||D - up @ down||^2, with the factors as cast to their dtype

    @property
    def captured(self) -> float:
        return 1.0 - self.residual / self.difference if self.difference > 0 else 1.0


def low_rank(
    delta: Tensor, rank: int, *, clamp_quantile: float | None = None, dtype: torch.dtype = torch.float16
) -> LowRank:
    """The truncated SVD of ``delta`` [out, in(, kh, kw)] (computed in float32 on its device) at ``rank``
    (at most the matrix's rank bound), as ``up = U S`` and ``down = V^T``, optionally clamped as kohya
    clamps them (to +-the ``clamp_quantile`` quantile of their values), cast to ``dtype``."""
    matrix = delta.float().flatten(1)  # [out, in * kh * kw]
    rank = min(rank, *matrix.shape)
    if matrix.shape[0] < matrix.shape[1]:
        # D^T = U' S V'^T, so D = V' S U'^T: on the CPU, LAPACK factors the tall transpose (a view) 3-7x
        # faster than the wide matrix (1280 x 11520: 4 s against 30 s on 2 cores)
        u_t, s, vh_t = torch.linalg.svd(matrix.T, full_matrices=False)
        u, vh = vh_t.T, u_t.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]  # [out, r], [r, in * kh * kw]
    if clamp_quantile is not None:
        values = torch.cat([up.flatten(), down.flatten()])
        step = -(-values.numel() // _QUANTILE_LIMIT)  # torch.quantile refuses larger inputs: a strided sample
        high = torch.quantile(values[::step], clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    residual = torch.addmm(matrix, up.float(), down.float(), alpha=-1)
    return LowRank(up.cpu(), down.cpu(), float(matrix.square().sum()), float(residual.square().sum()))


@dataclass(frozen=True)
class ModuleEnergy:
    """One target's difference and what the extracted module leaves of it."""

    name: str  # kohya module name
    part: Part
    rank: int  # 0: skipped (its difference under ``min_diff``)
    difference: float  # ||D||^2
    residual: float  # ||D - up @ down||^2; the whole difference when skipped


@dataclass(frozen=True)
class PartEnergy:
    """The UNet's or the text encoder's totals."""

    part: Part
    modules: int  # written
    skipped: int  # with a difference under ``min_diff`` (unchanged targets are not counted)
    difference: float  # sum of ||D||^2 over its targets
    residual: float  # sum of ||D - up @ down||^2 over its targets (skipped ones whole)
    outside: float  # sum of squared differences of its other parameters (no LoRA holds them)

    @property
    def captured(self) -> float:
        """``1 - ||D - D_r||^2 / ||D||^2`` over the targets; 1 where nothing differs."""
        return 1.0 - self.residual / self.difference if self.difference > 0 else 1.0


@dataclass(frozen=True)
class ExtractReport:
    output: Path
    rank: int
    conv_rank: int | None
    modules: tuple[ModuleEnergy, ...]
    outside: Mapping[Part, float]  # per part, the energy of the differences outside the targets
    warnings: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[PartEnergy, ...]:
        out = []
        for part in ("unet", "te"):
            mine = [m for m in self.modules if m.part == part]
            out.append(
                PartEnergy(
                    part,
                    sum(1 for m in mine if m.rank > 0),
                    sum(1 for m in mine if m.rank == 0 and m.difference > 0),
                    sum(m.difference for m in mine),
                    sum(m.residual for m in mine),
                    self.outside.get(part, 0.0),
                )
            )
        return tuple(out)

    @property
    def captured(self) -> float:
        """``1 - ||D - D_r||^2 / ||D||^2`` over every target of both parts."""
        difference = sum(m.difference for m in self.modules)
        return 1.0 - sum(m.residual for m in self.modules) / difference if difference > 0 else 1.0

    def summary(self) -> list[str]:
        ranks = f"rank {self.rank}" + (f", convolutions {self.conv_rank}" if self.conv_rank else "")
        lines = []
        for p in self.parts:
            name = _PART_NAME[p.part]
            if p.difference == 0:
                lines.append(f"{name}: no difference in its LoRA targets")
                continue
            skipped = f", {p.skipped} skipped (difference under --min-diff)" if p.skipped else ""
            lines.append(
                f"{name}: {p.modules} modules{skipped}; {100 * p.captured:.3f} % of the difference's energy "
                f"captured ({p.residual / p.difference:.1e} left out)"
            )
            if p.outside > 0:
                share = p.outside / (p.outside + p.difference)
                lines.append(
                    f"  {100 * share:.3f} % of the {name}'s difference lies in weights the LoRA has no module for "
                    "(biases, norms, embeddings" + (")" if self.conv_rank else "; convolutions: --conv-rank)")
                )
        lines.append(
            f"all targets: {100 * self.captured:.3f} % captured at {ranks}; written to {self.output}"
        )
        return lines


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_same_architecture(tuned: LoadedModel, base: LoadedModel) -> None:
    mine, theirs = _shapes(tuned.model), _shapes(base.model)
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        if mine.get(key) != theirs.get(key):
            a, b = (list(s) if s is not None else "absent" for s in (mine.get(key), theirs.get(key)))
            raise SdStudioError(
                f"{tuned.path} ({tuned.config.name}) and {base.path} ({base.config.name}) are different "
                f"architectures: {key} is {a} in the first, {b} in the second; give a model and the base it was "
                "fine-tuned from"
            )


def _difference(tuned: Tensor, base: Tensor, device: torch.device) -> Tensor:
    return tuned.to(device, torch.float32) - base.to(device, torch.float32)


def _outside(
    tuned: dict[str, Tensor],
    base: dict[str, Tensor],
    covered: set[str],
    min_diff: float,
    device: torch.device,
) -> tuple[dict[Part, float], bool]:
    """Per part, the squared differences of the float parameters no target covers; and whether the VAEs
    differ (by more than ``min_diff`` of the VAE's norm: an fp16 copy of a float32 VAE does not)."""
    outside: dict[Part, float] = {"unet": 0.0, "te": 0.0}
    vae_difference = vae_norm = 0.0
    for key, value in tuned.items():
        if key in covered or not value.is_floating_point():
            continue
        squared = float(_difference(value, base[key], device).square().sum())
        if key.startswith(VAE_PREFIX):
            vae_difference += squared
            vae_norm += float(base[key].to(device, torch.float32).square().sum())
            continue
        part = next((p for p, prefix in _PART_PREFIX.items() if key.startswith(prefix)), None)
        if part is not None:
            outside[part] += squared
    return outside, vae_difference > min_diff**2 * vae_norm


def _metadata(
    rank: int, conv_rank: int | None, base: LoadedModel, recipe: dict[str, object], data_hash: str
) -> dict[str, str]:
    """kohya's minimum LoRA metadata (``extract_lora_from_models.py``; the version string of ``model_util``,
    from the base's prediction where kohya's script assumes v for every SD 2 unless told), its
    ``sshs_model_hash``, and our recipe."""
    v2 = base.config.text.kind == "open_clip"
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if base.config.prediction == "v" else "")
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(args),
        "ss_v2": str(v2),
        "ss_base_model_version": version,
        "sshs_model_hash": data_hash,
        EXTRACT_METADATA: json.dumps(recipe),
    }


def _data_hash(tensors: dict[str, Tensor]) -> str:
    """sha256 of the tensor data as ``save_file`` lays it out (the same whatever the header holds)."""
    blob = save(tensors)
    (length,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + length :]).hexdigest()


def _check_extract_options(rank: int, conv_rank: int | None, min_diff: float, clamp: float | None) -> None:
    if rank < 1:
        raise SdStudioError(f"--rank {rank}: the rank must be at least 1")
    if conv_rank is not None and conv_rank < 1:
        raise SdStudioError(
            f"--conv-rank {conv_rank}: the rank must be at least 1 (leave it out for no convolutions)"
        )
    if not (min_diff >= 0 and math.isfinite(min_diff)):
        raise SdStudioError(f"--min-diff {min_diff}: give a number >= 0 (a fraction of each weight's norm)")
    if clamp is not None and not 0 < clamp <= 1:
        raise SdStudioError(f"--clamp-quantile {clamp}: give a number in (0, 1], e.g. kohya's 0.99")


def _extract_modules(
    tuned: dict[str, Tensor],
    base: dict[str, Tensor],
    modules: Sequence[KohyaModule],
    *,
    rank: int,
    conv_rank: int | None,
    min_diff: float,
    clamp_quantile: float | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[tuple[KohyaModule, LowRank | None, ModuleEnergy]]:
    """Each target's factors (None: skipped, its difference under ``min_diff``) and energies."""
    for module in modules:
        key, rows = module.target.key, module.target.rows or (0, base[module.target.key].shape[0])
        before = base[key][rows[0] : rows[1]]
        delta = _difference(tuned[key][rows[0] : rows[1]], before, device)  # [out, in(, kh, kw)]
        difference = float(delta.square().sum())
        weight = float(before.to(device, torch.float32).square().sum())
        if difference == 0 or difference <= min_diff**2 * weight:
            yield module, None, ModuleEnergy(module.name, module.target.part, 0, difference, difference)
            continue
        r = conv_rank if module.convolution and conv_rank is not None else rank
        factors = low_rank(delta, r, clamp_quantile=clamp_quantile, dtype=dtype)
        energy = ModuleEnergy(
            module.name, module.target.part, factors.down.shape[0], factors.difference, factors.residual
        )
        yield module, factors, energy


def _kohya_tensors(module: KohyaModule, factors: LowRank) -> dict[str, Tensor]:
    """kohya's layout: linears 2-D; convolutions ``down`` [r, in, kh, kw], ``up`` [out, r, 1, 1]."""
    shape = module.target.shape
    up, down = factors.up, factors.down
    if len(shape) == 4:
        up, down = up[:, :, None, None], down.reshape(down.shape[0], *shape[1:])
    alpha = torch.tensor(float(down.shape[0]), dtype=up.dtype)  # alpha = rank: scale 1
    return {
        f"{module.name}.lora_down.weight": down.contiguous(),
        f"{module.name}.lora_up.weight": up.contiguous(),
        f"{module.name}.alpha": alpha,
    }


def extract(
    tuned: str | Path,
    base: str | Path,
    output: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 1e-3,
    clamp_quantile: float | None = None,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> ExtractReport:
    """Write the kohya LoRA of rank ``rank`` that best approximates ``tuned - base`` to ``output``
    (``.safetensors``), and report how much of the difference it holds (see the module docstring).

    ``conv_rank``: also extract the ResNet blocks and samplers (LoCon), 3x3 convolutions at this rank.
    ``min_diff``: modules whose difference is at most this fraction of their weight's norm are left out.
    ``dtype``: of the written factors. ``device``: where the SVDs run."""
    tuned, base, output = Path(tuned), Path(base), Path(output)
    _check_extract_options(rank, conv_rank, min_diff, clamp_quantile)
    _check_output(output, overwrite, [tuned, base])
    models = [load_model(p, dtype=stored_dtype(p) or torch.float32) for p in (tuned, base)]
    _check_same_architecture(*models)
    if models[1].config.is_sdxl:
        raise SdStudioError(f"{base}: an SDXL model; LoRA extraction handles SD 1.x / 2.x models so far")
    tuned_state, base_state = (m.model.state_dict() for m in models)
    targets = _extracted(kohya_modules(key_table(models[1].model)), conv_rank is not None)
    device = torch.device(device)
    tensors: dict[str, Tensor] = {}
    energies = []
    for module, factors, energy in _extract_modules(
        tuned_state, base_state, targets, rank=rank, conv_rank=conv_rank, min_diff=min_diff,
        clamp_quantile=clamp_quantile, dtype=dtype, device=device,
    ):  # fmt: skip
        energies.append(energy)
        if factors is not None:
            tensors.update(_kohya_tensors(module, factors))
    outside, vae = _outside(tuned_state, base_state, {m.target.key for m in targets}, min_diff, device)
    if not tensors:
        if not any(e.difference for e in energies):
            raise SdStudioError(f"{tuned} and {base} do not differ in any LoRA target; nothing to extract")
        raise SdStudioError(
            f"every difference between {tuned} and {base} is under --min-diff {min_diff:g} of its weight; "
            "nothing to extract (lower --min-diff)"
        )
    warnings = []
    if vae:
        warnings.append(f"{tuned}: its VAE differs from {base}'s; a LoRA holds no VAE weights")
    for warning in warnings:
        log.warning("%s", warning)
    report = ExtractReport(output, rank, conv_rank, tuple(energies), outside, tuple(warnings))
    recipe = {
        "tuned": tuned.name, "base": base.name, "rank": rank, "conv_rank": conv_rank, "min_diff": min_diff,
        "clamp_quantile": clamp_quantile, "captured": {p.part: p.captured for p in report.parts},
    }  # fmt: skip
    metadata = _metadata(rank, conv_rank, models[1], recipe, _data_hash(tensors))
    atomic_write(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return report
