"""Checkpoint merging (AUTOMATIC1111's checkpoint merger) and conversion between checkpoint formats, streamed
tensor by tensor.

**Merging** follows ``run_modelmerger`` in A1111's ``modules/extras.py``:

* weighted sum ``(1 - M) A + M B``; add difference ``A + M (B - C)``; computed in fp32 (fp64 stays fp64) and
  stored in the inputs' promoted dtype, or ``dtype`` (A1111 computes in the stored dtype, rounding each step);
* what is merged: A's tensors whose key contains ``model`` (A1111's test: every weight of the three networks and
  the EMA copies) and that B has (and C, for add difference; A1111 takes ``B - C`` as zero where C lacks a key,
  which leaves A). Everything else of A is kept as it is (the noise schedule's buffers, and ``position_ids``,
  which A1111 skips: some files store them as floats, and merged they would no longer be integers); keys only B or C has are left out, as A1111 does now;
* an inpainting (9 input channels) or instruct-pix2pix (8) model A with a plain (4) B: only the first four
  input channels of the input convolution are merged, the others stay A's; the result is the inpainting model
  (A1111's recipe "inpainting A + M (custom B - base C)"). The other way round is refused: A must be the
  inpainting model;
* EMA: ``no_ema`` drops ``model_ema.*`` (A1111's "discard weights" with ``model_ema``). Without it EMA copies are
  merged like the weights when every input has them; where only some have, A1111 keeps A's, an EMA of a
  model that is not the merge, which here is dropped with a warning instead;
* ``bake_vae``: the VAE weights come from that file (any layout ``sdstudio.models.vae_file`` reads), as A1111's
  "Bake in VAE";
* the recipe (method, alpha, input names and short hashes, dtype, EMA pruning, baked VAE) goes into the output's
  metadata under ``sdstudio.merge`` (A1111 writes its own ``sd_merge_recipe``; not written here).

Unlike A1111, architectures are compared first: the weights of the three networks must have the same keys and
shapes in every input (the extra input channels aside), else the merge is refused naming the first differing key.

**Memory.** ``.safetensors`` inputs are opened lazily (``safetensors.safe_open``, reading with ``pread``): one
tensor of each input is read at a time, merged, and written at its offset in the output file
(:class:`~sdstudio.models.diffusers_save.SafetensorsStream`), so a merge holds a few tensors, not three models.
Pickled ``.ckpt`` inputs have no lazy path: torch's zip format is memory-mapped (every page read stays in the
process's resident size until the file is closed, though the kernel may reclaim it: clean file pages), the legacy
format is read whole. Diffusers folders are read whole (their keys are converted on load). A ``.ckpt`` output is
collected in memory (``torch.save`` writes one object). ``benchmarks/checkpoint_merge.py``, weighted sum of two
random sd15 fp16 files (2034 MiB each; 2-core shared CPU box): peak resident size 369 MiB above the process's
baseline (0.18 of one model: fp32 copies of the largest tensor, the 49408 x 768 token embedding); the same
weights as ``.ckpt`` inputs 4129 MiB (their mapped pages; 363 MiB allocated); reading both files whole and saving
the merged dict, as A1111 does, 6205 MiB (3.05 models).

**Converting** writes ``.safetensors`` (streamed), ``.ckpt`` (``{"state_dict": ...}``, as the original releases)
or a diffusers folder (streamed, ``sdstudio.models.diffusers_save``), chosen by the output's name. EMA, as
diffusers' ``convert_original_stable_diffusion_to_diffusers.py --extract_ema`` and the "-emaonly" releases:
``ema="use"`` writes the EMA weights as the UNet's (the best for generating), ``"drop"`` leaves them out (the
trained weights, the ones to fine-tune further), ``"keep"`` keeps both where the format can (a diffusers folder
holds one UNet, so there they are dropped).

Outputs are written atomically: a file through ``sdstudio.io.files.atomic_write``, a folder in a temporary folder
beside it, renamed into place (an existing folder is moved aside first, then deleted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, final

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from sdstudio.errors import CheckpointError, SdStudioError
from sdstudio.io.files import atomic_write, check_writable
from sdstudio.models.configs import METADATA_KEY, ModelConfig, Prediction
from sdstudio.models.detect import detect_config, detect_vae
from sdstudio.models.diffusers_convert import load_diffusers_folder
from sdstudio.models.diffusers_save import (
    DiffusersFolderWriter,
    SafetensorsStream,
    TensorSpec,
    log_dropped_keys,
)
from sdstudio.models.loading import (
    file_head,
    file_sha256,
    has_ema,
    looks_like_safetensors,
    looks_like_v_prediction,
    parse_dtype,
    read_ckpt,
    stored_config,
)
from sdstudio.models.stablediffusion import EMA_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key
from sdstudio.models.unet import UNetModel
from sdstudio.models.vae_file import read_vae_file, vae_short_hash

log = logging.getLogger(__name__)

MergeMethod = Literal["weighted-sum", "add-difference"]
METHODS: tuple[MergeMethod, ...] = ("weighted-sum", "add-difference")
EmaChoice = Literal["keep", "drop", "use"]
OutputKind = Literal["safetensors", "ckpt", "diffusers"]
RECIPE_KEY = "sdstudio.merge"

_NETWORKS = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
# A1111's checkpoint_dict_skip_on_merge: ids some files store as floats, which a merge moves off the integers.
_SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
# Present in some files of an architecture and not in others; never a reason to refuse a merge.
_OPTIONAL = _SKIP_ON_MERGE | {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
_FILE_SUFFIXES: dict[str, OutputKind] = {
    ".safetensors": "safetensors",
    ".ckpt": "ckpt",
    ".pt": "ckpt",
    ".pth": "ckpt",
}
_UNWRITABLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".sft", ".gguf", ".onnx", ".json")
_DAMAGED = "it is damaged or incomplete: download or convert it again"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs


@final
class Source:
    """A checkpoint opened for reading one tensor at a time (single-file keys), with what its header says."""

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, TensorSpec],
        read: Callable[[str], Tensor],
        *,
        metadata: Mapping[str, str],
        config: ModelConfig | None,
        lazy: bool,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.specs = dict(specs)
        self.metadata = dict(metadata)
        self.config = config  # stored in the header (sdstudio.config) or read from a diffusers folder
        self.lazy = lazy  # tensors read on demand (safetensors), not held in memory
        self._read = read
        self._close = close

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str) -> Tensor:
        return self._read(key)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gist(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:160]


def _safe_open(path: Path) -> Any:
    """``safe_open`` reading each tensor with ``pread(2)`` into its own memory where the library can (safetensors
    >= 0.8): its default memory map keeps every page read resident in this process until the file is closed,
    so a merge's resident size would grow to the inputs' size (the kernel can reclaim those pages, but the
    figure is what users watch). Older versions have no choice of backend."""
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


def _open_safetensors(path: Path) -> Source:
    try:
        handle = _safe_open(path)
        metadata = handle.metadata() or {}
        specs = {}
        for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
            piece = handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {key} has dtype {piece.get_dtype()}, which sdstudio does not read"
                )
            specs[key] = TensorSpec(tuple(piece.get_shape()), dtype)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({_gist(e)}); {_DAMAGED}") from None

    def read(key: str) -> Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({_gist(e)}); {_DAMAGED}") from None

    return Source(
        path,
        specs,
        read,
        metadata=metadata,
        config=stored_config(path, metadata),
        lazy=True,
        close=lambda: handle.__exit__(None, None, None),
    )


def _in_memory(path: Path, state: Mapping[str, Tensor], config: ModelConfig | None) -> Source:
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
    return Source(path, specs, state.__getitem__, metadata={}, config=config, lazy=False)


def open_source(path: str | os.PathLike) -> Source:
    """A ``.safetensors`` file (lazy), a pickled ``.ckpt`` / ``.pt`` (weights only, see ``loading.load_pickle``)
    or a diffusers folder (converted to single-file keys on load)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        config, state = load_diffusers_folder(path)
        return _in_memory(path, state, config)
    if looks_like_safetensors(path, file_head(path)):
        return _open_safetensors(path)
    return _in_memory(path, read_ckpt(path), None)


def short_hash(path: Path) -> str | None:
    """A1111's model hash: the first 10 hex digits of the file's sha256 (None for a folder)."""
    if path.is_dir():
        return None
    try:
        return file_sha256(path)[:10]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def _detect(source: Source, prediction: Prediction | None) -> ModelConfig:
    shapes = {k: s.shape for k, s in source.specs.items()}
    try:
        return detect_config(shapes, prediction)
    except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(
            f"{source.path}: cannot tell the architecture from its weights' shapes ({_gist(e)}); {_DAMAGED}"
        ) from None


@torch.no_grad()
def _predicts_v(source: Source, config: ModelConfig) -> bool:
    """``loading.looks_like_v_prediction`` on the file's UNet (built alone, in fp32)."""
    with torch.device("meta"):
        unet = UNetModel(config.unet)
    state = {k[len(UNET_PREFIX) :]: source.get(k).float() for k in source.specs if k.startswith(UNET_PREFIX)}
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source.path}: its UNet does not fit the detected architecture ({_gist(e)})"
        ) from None
    return looks_like_v_prediction(unet.eval(), config.unet.context_dim)


def source_config(source: Source, prediction: Prediction | None = None) -> ModelConfig:
    """The architecture of ``source``: stored (header or diffusers configs), else detected from its shapes; an SD
    2.x file's prediction, which its shapes cannot tell, is tested on its UNet as ``loading.load_model`` does."""
    config = source.config
    if config is None:
        config = _detect(source, prediction)
        if prediction is None and config.text.kind == "open_clip" and not config.is_sdxl and _predicts_v(source, config):
            log.info("%s: SD 2.x weights behave as v-prediction (override: --prediction)", source.path)
            config = _detect(source, "v")
    if prediction is not None and prediction != config.prediction:
        config = dataclasses.replace(config, prediction=prediction)
    return config


# ----------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Output:
    """One tensor of the output: its key, what it will be, and how to compute it when its turn comes."""

    key: str
    spec: TensorSpec
    make: Callable[[], Tensor]


def output_kind(path: Path) -> OutputKind:
    """``.safetensors``; ``.ckpt`` / ``.pt`` / ``.pth``; any other name is a diffusers folder."""
    suffix = path.suffix.lower()
    if suffix in _FILE_SUFFIXES:
        return _FILE_SUFFIXES[suffix]
    if suffix in _UNWRITABLE_SUFFIXES:
        raise SdStudioError(
            f"{path}: cannot write {suffix} files; name a .safetensors or .ckpt file, or a folder (diffusers)"
        )
    return "diffusers"


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def check_output(path: Path, inputs: Sequence[Path], overwrite: bool) -> OutputKind:
    """Refuse, before any work, an output that is an input (or a folder holding one), an existing output without
    ``overwrite``, a non-diffusers folder to be replaced, and a place that cannot be written."""
    kind = output_kind(path)
    for source in inputs:
        if _same(path, source):
            raise SdStudioError(f"{path}: is also an input; write the result to another path")
        if path.is_dir() and source.resolve().is_relative_to(path.resolve()):
            raise SdStudioError(f"{path}: holds the input {source}; write the result to another folder")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
        if kind == "diffusers" and not path.is_dir():
            raise SdStudioError(
                f"{path}: is a file; a diffusers output is a folder (or name a .safetensors file)"
            )
        if kind == "diffusers" and any(path.iterdir()) and not (path / "model_index.json").is_file():
            raise SdStudioError(f"{path}: is a folder but not a diffusers model; refusing to replace it")
    if kind == "diffusers":
        # the new folder is made beside it and renamed into place: its parent must be writable
        check_writable(path.with_name(f"{path.name}.new"), "output folder")
    else:
        check_writable(path, "output file")
    return kind


def _write_folder_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` fills a new folder beside ``path``, which then replaces ``path`` by renames (an existing folder
    is renamed aside first, then deleted: a crash in between leaves it as ``.NAME.*.old``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)  # onto the empty folder just made
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _progress(outputs: Sequence[Output], what: str) -> Iterator[Output]:
    # tqdm shows itself on a terminal only (disable=None)
    return iter(tqdm(outputs, desc=what, unit="tensor", disable=None, leave=False))


def write_checkpoint(
    path: Path,
    outputs: Sequence[Output],
    *,
    metadata: Mapping[str, str],
    config: Callable[[], ModelConfig],
    kind: OutputKind | None = None,
) -> list[str]:
    """Compute and write every output tensor, one at a time (all of them at once for ``.ckpt``); returns the
    keys a diffusers folder had no place for. ``config`` is asked only for a diffusers folder."""
    kind = kind or output_kind(path)
    if kind == "safetensors":

        def write_file(tmp: Path) -> None:
            with SafetensorsStream(
                tmp, {o.key: o.spec for o in outputs}, {"format": "pt", **metadata}
            ) as stream:
                for output in _progress(outputs, path.name):
                    stream.put(output.key, output.make())

        atomic_write(path, write_file)
        return []
    if kind == "ckpt":
        state = {o.key: o.make() for o in _progress(outputs, path.name)}
        atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
        return []
    model_config = config()
    dropped: list[str] = []

    def write_folder(tmp: Path) -> None:
        writer = DiffusersFolderWriter(tmp, model_config, {o.key: o.spec for o in outputs})
        try:
            for output in _progress(outputs, path.name):
                if writer.wants(output.key):
                    writer.put(output.key, output.make())
        except BaseException:
            writer.abort()
            raise
        writer.close()
        log_dropped_keys(writer.layout.dropped)
        dropped.extend(writer.layout.dropped)

    _write_folder_atomically(path, write_folder)
    return dropped


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


# ----------------------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class MergeRecipe:
    """What made a merged checkpoint; stored as JSON in its header under ``sdstudio.merge``."""

    method: MergeMethod
    alpha: float
    models: tuple[str, ...]  # file names of A, B (and C)
    hashes: tuple[str | None, ...]  # their A1111 short hashes (sha256[:10]); None for a diffusers folder
    dtype: str | None = None  # "fp16" / "bf16" / "fp32"; None: as the inputs
    no_ema: bool = False
    bake_vae: str | None = None  # the baked VAE's file name
    bake_vae_hash: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergeRecipe:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class MergeReport:
    path: Path
    recipe: MergeRecipe
    merged: int  # tensors computed from every input
    kept: int  # tensors of A written as they are (not merged under A1111's rules)
    dropped: tuple[str, ...]  # A's keys left out (EMA pruning; a diffusers output's unplaceable keys)
    inpainting: bool  # A's extra input channels (inpainting / instruct-pix2pix) kept around the merge


def weighted_sum_(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """A1111's "Weighted sum" ``(1 - M) A + M B``, computed in ``a`` (``b`` is overwritten too): the operations
    of that expression in its order, so rounded alike, without its two temporaries. Exactly A at M = 0 and B at
    M = 1 (up to the sign of a zero)."""
    return a.mul_(1 - alpha).add_(b.mul_(alpha))


def add_difference_(a: Tensor, b: Tensor, c: Tensor, alpha: float) -> Tensor:
    """A1111's "Add difference" ``A + M (B - C)``, computed in ``a`` (``b`` is overwritten too), the difference
    first as A1111 takes it."""
    return a.add_(b.sub_(c).mul_(alpha))


def _extra_channels(a: TensorSpec, b: TensorSpec) -> bool:
    """A1111's inpainting merge: equal but for dim 1, 9 (inpainting) or 8 (instruct-pix2pix) in A, 4 in B."""
    return (
        len(a.shape) == 4 == len(b.shape)
        and a.shape[0] == b.shape[0]
        and a.shape[2:] == b.shape[2:]
        and a.shape[1] in (8, 9)
        and b.shape[1] == 4
    )


def _shape(spec: TensorSpec | None) -> str:
    return "absent" if spec is None else str(list(spec.shape))


def check_same_architecture(a: Source, b: Source, *, extra_channels: bool = False) -> None:
    """Every weight of the three networks in both, with equal shapes (with ``extra_channels``: A's inpainting
    input channels aside); else one line naming the first differing key (in sorted order) and both shapes."""
    keys = sorted(k for k in set(a.specs) | set(b.specs) if k.startswith(_NETWORKS) and k not in _OPTIONAL)
    for key in keys:
        sa, sb = a.specs.get(key), b.specs.get(key)
        if sa is not None and sb is not None:
            if sa.shape == sb.shape or (extra_channels and _extra_channels(sa, sb)):
                continue
            if extra_channels and _extra_channels(sb, sa):
                raise CheckpointError(
                    f"{b.name} is an inpainting (or instruct-pix2pix) model and {a.name} is not: "
                    f"give the inpainting model first, as model A ({key}: {_shape(sa)} vs {_shape(sb)})"
                )
        raise CheckpointError(
            f"{a.name} and {b.name} are different architectures: first differing key {key}: "
            f"{_shape(sa)} vs {_shape(sb)}; merge checkpoints of one architecture"
        )


def _merge_one(
    method: MergeMethod, alpha: float, sources: Sequence[Source], key: str, dtype: torch.dtype
) -> Tensor:
    """One merged tensor, computed in fp32 (or wider) copies of the inputs, one input read at a time."""
    compute = torch.float32
    for source in sources:
        compute = torch.promote_types(compute, source.specs[key].dtype)
    a, b, *c = (s.get(key).to(compute, copy=True) for s in sources)
    part = a if a.shape == b.shape else a[:, : b.shape[1]]  # inpainting A: the channels B has, in place
    if method == "weighted-sum":
        weighted_sum_(part, b, alpha)
    else:
        add_difference_(part, b, c[0], alpha)
    return a.to(dtype)


def _mergeable(key: str, a: TensorSpec, others: Sequence[TensorSpec | None]) -> bool:
    """A1111's test (a float tensor whose key contains ``model``, in every input, not ``position_ids``) and
    shapes that fit (equal, or A's extra input channels)."""
    if "model" not in key or key in _SKIP_ON_MERGE or not a.dtype.is_floating_point:
        return False
    present = [o for o in others if o is not None and o.dtype.is_floating_point]
    if len(present) < len(others):
        return False  # add difference where C lacks the key: A1111 takes B - C as zero, which leaves A
    b = present[0]
    if any(o.shape != b.shape for o in present) or not (a.shape == b.shape or _extra_channels(a, b)):
        log.warning("%s: shapes differ between the inputs; kept as in model A", key)
        return False
    return True


def _plan_merge(
    method: MergeMethod, alpha: float, sources: Sequence[Source], dtype: torch.dtype | None, no_ema: bool
) -> tuple[list[Output], int, list[str], bool]:
    """(outputs, how many are merged, A's keys dropped, inpainting) under A1111's rules (module docstring)."""
    a, others = sources[0], sources[1:]
    ema_everywhere = all(has_ema(set(s.specs)) for s in sources)
    outputs: list[Output] = []
    dropped: list[str] = []
    merged, inpainting = 0, False
    for key, spec in a.specs.items():
        if key.startswith(EMA_PREFIX) and (no_ema or not ema_everywhere):
            dropped.append(key)
            continue
        present = [s.specs.get(key) for s in others]
        if _mergeable(key, spec, present):
            out = spec.dtype
            for other in present:
                out = torch.promote_types(out, other.dtype)  # type: ignore[union-attr]
            out = dtype or out
            inpainting |= spec.shape != present[0].shape  # type: ignore[union-attr]
            make = lambda k=key, d=out: _merge_one(method, alpha, sources, k, d)
            merged += 1
        else:
            out = _out_dtype(spec.dtype, dtype)
            make = lambda k=key, d=out: _cast(a.get(k), d)
        outputs.append(Output(key, TensorSpec(spec.shape, out), make))
    if not no_ema and not ema_everywhere and dropped:
        log.warning(
            "%s has EMA weights but not every input has: the merge has none (A's alone would not describe it)",
            a.name,
        )
    return outputs, merged, dropped, inpainting


def _bake_vae(outputs: list[Output], a: Source, path: Path, dtype: torch.dtype | None) -> list[Output]:
    """A's VAE weights replaced by a VAE file's, checked against A's VAE architecture first."""
    shapes = {k: s.shape for k, s in a.specs.items()}
    vae_config = a.config.vae if a.config is not None else detect_vae(shapes)
    vae = {VAE_PREFIX + k: v for k, v in read_vae_file(path, vae_config).items()}
    baked = []
    for output in outputs:
        if output.key in vae:
            tensor = vae[output.key]
            out = _out_dtype(tensor.dtype, dtype)
            output = Output(
                output.key, TensorSpec(tuple(tensor.shape), out), lambda t=tensor, d=out: _cast(t, d)
            )
        baked.append(output)
    return baked


def merge_checkpoints(
    models: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    alpha: float,
    method: MergeMethod = "weighted-sum",
    dtype: str | None = None,
    no_ema: bool = False,
    bake_vae: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge A, B (and C for add difference) into ``output`` (``.safetensors``, ``.ckpt`` or a diffusers folder).

    ``alpha`` is A1111's multiplier M; ``dtype`` ("fp16", "bf16", "fp32") casts every floating tensor written.
    See the module docstring for which tensors are merged, EMA and the inpainting case."""
    if method not in METHODS:
        raise SdStudioError(f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}")
    wanted = 2 if method == "weighted-sum" else 3
    if len(models) != wanted:
        raise SdStudioError(
            f"{method} merges {wanted} models (A, B{', C' if wanted == 3 else ''}), got {len(models)}"
        )
    if not math.isfinite(alpha):
        raise SdStudioError(f"--alpha must be a finite number (got {alpha})")
    target = parse_dtype(dtype) if dtype is not None else None
    paths = [Path(m) for m in models]
    out = Path(output)
    kind = check_output(out, [*paths, *([Path(bake_vae)] if bake_vae else [])], overwrite)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_source(p)) for p in paths]
        for other in sources[1:]:
            check_same_architecture(sources[0], other, extra_channels=True)
        if len(sources) == 3:
            check_same_architecture(sources[1], sources[2])
        outputs, merged, dropped, inpainting = _plan_merge(method, alpha, sources, target, no_ema)
        vae_name = vae_hash = None
        if bake_vae is not None:
            outputs = _bake_vae(outputs, sources[0], Path(bake_vae), target)
            vae_name, vae_hash = Path(bake_vae).name, vae_short_hash(bake_vae)
        recipe = MergeRecipe(
            method=method,
            alpha=alpha,
            models=tuple(p.name for p in paths),
            hashes=tuple(short_hash(p) for p in paths),
            dtype=dtype,
            no_ema=no_ema,
            bake_vae=vae_name,
            bake_vae_hash=vae_hash,
        )
        if kind == "ckpt":
            log.warning(
                "%s: a .ckpt has no header; the merge recipe is not stored (name a .safetensors file)", out
            )
        metadata = {RECIPE_KEY: recipe.to_json()}
        if sources[0].config is not None:
            metadata[METADATA_KEY] = sources[0].config.to_json()
        log.info("merging %s (%d tensors, %d merged)", " + ".join(recipe.models), len(outputs), merged)
        unplaced = write_checkpoint(
            out, outputs, metadata=metadata, config=lambda: source_config(sources[0]), kind=kind
        )
    return MergeReport(
        path=out,
        recipe=recipe,
        merged=merged,
        kept=len(outputs) - merged,
        dropped=tuple(dropped + unplaced),
        inpainting=inpainting,
    )


# ---------------------------------------------------------------------------------------------- converting


@dataclass(frozen=True)
class ConvertReport:
    path: Path
    kind: OutputKind
    written: int  # tensors written (a diffusers folder counts single-file tensors placed)
    dropped: tuple[str, ...]  # keys of the input left out (EMA choice; what a diffusers folder cannot hold)
    config: ModelConfig | None  # the architecture written into a diffusers folder's configs or the header


def _plan_convert(
    source: Source, dtype: torch.dtype | None, ema: EmaChoice
) -> tuple[list[Output], list[str]]:
    specs = source.specs
    if ema == "use":
        missing = next((k for k in specs if k.startswith(UNET_PREFIX) and ema_key(k) not in specs), None)
        if missing is not None or not has_ema(set(specs)):
            raise CheckpointError(
                f"{source.path}: has no EMA weights (no {ema_key(missing) if missing else 'model_ema.*'}); "
                "convert without --ema"
            )
    outputs, dropped = [], []
    for key in specs:
        if key.startswith(EMA_PREFIX) and ema != "keep":
            dropped.append(key)
            continue
        read = ema_key(key) if ema == "use" and key.startswith(UNET_PREFIX) else key
        stored = specs[read]
        out = _out_dtype(stored.dtype, dtype)
        outputs.append(
            Output(key, TensorSpec(stored.shape, out), lambda k=read, d=out: _cast(source.get(k), d))
        )
    return outputs, dropped


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    ema: EmaChoice = "keep",
    prediction: Prediction | None = None,
    overwrite: bool = False,
) -> ConvertReport:
    """Convert between ``.ckpt``, single-file ``.safetensors`` and a diffusers folder (by the output's name).

    ``dtype`` casts every floating tensor; ``ema`` see the module docstring; ``prediction`` ("epsilon" / "v")
    overrides what the input says or what is detected (it decides a diffusers folder's scheduler config)."""
    if ema not in ("keep", "drop", "use"):
        raise SdStudioError(f"unknown EMA choice {ema!r}: keep, drop or use")
    target = parse_dtype(dtype) if dtype is not None else None
    path, out = Path(source), Path(output)
    kind = check_output(out, [path], overwrite)
    with open_source(path) as src:
        outputs, dropped = _plan_convert(src, target, ema)
        config = None
        if kind == "diffusers" or src.config is not None or prediction is not None:
            config = source_config(src, prediction)
        metadata = {} if kind == "diffusers" else dict(src.metadata)
        if config is not None:
            metadata[METADATA_KEY] = config.to_json()
        unplaced = write_checkpoint(out, outputs, metadata=metadata, config=lambda: config, kind=kind)
    written = len(outputs) - len(unplaced)
    log.info("%s -> %s: %d tensors written, %d left out", path, out, written, len(dropped) + len(unplaced))
    return ConvertReport(
        path=out, kind=kind, written=written, dropped=tuple(dropped + unplaced), config=config
    )
