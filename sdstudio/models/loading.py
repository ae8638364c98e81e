"""Reading and writing checkpoints: single-file ``.safetensors`` (memory-mapped), ``.ckpt`` (weights only,
never unpickling code) and diffusers folders; EMA selection; dtype on load; atomic single-file saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import mmap
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdstudio.errors import CheckpointError
from sdstudio.io.files import atomic_write
from sdstudio.models.configs import METADATA_KEY, ModelConfig
from sdstudio.models.detect import detect_config
from sdstudio.models.stablediffusion import (
    EMA_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    StableDiffusion,
    ema_key,
)

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The safetensors library refuses larger headers; a length beyond it is damage, not a header to read.
_MAX_SAFETENSORS_HEADER = 100_000_000
# How torch.save's zip format starts (torch.serialization tells zip from legacy pickles the same way).
_ZIP_MAGIC = b"PK\x03\x04"
_DAMAGED = "it is damaged or incomplete: download or convert it again"

# Keys real checkpoints carry that are not weights of the three networks.
_IGNORED_PREFIXES = (EMA_PREFIX, "model_ema.", "lora_", "control_model.", "embedding_manager.")
_IGNORED_KEYS = {
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
}
# Present in the model, absent from some real SD 2.x / SDXL files; unused by Stable Diffusion (SDXL's pooled
# text needs bigG's text_projection: that one is required).
_OPTIONAL_KEYS = {
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "conditioner.embedders.0.model.logit_scale",
    "conditioner.embedders.1.model.logit_scale",
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


class _Malformed(ValueError):
    """What is wrong inside a checkpoint file; the reader that catches it names the file and the remedy."""


def _safetensors_header(f: io.BufferedReader, size: int) -> tuple[int, dict]:
    """The header's length and its JSON object, checked against the file's size before anything is read."""
    if size < 8:
        raise _Malformed(f"{size} bytes, too short for the 8-byte header length")
    first = f.read(8)
    (header_len,) = struct.unpack("<Q", first)
    if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
        pickled = first.startswith((_ZIP_MAGIC, b"\x80"))
        raise _Malformed(
            "it looks like a pickled .ckpt renamed to .safetensors" if pickled else
            f"its header claims {header_len} bytes but the file has {size - 8} after the length"
        )
    try:
        header = json.loads(f.read(header_len))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Malformed(f"its header is not JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise _Malformed(f"its header is a JSON {type(header).__name__}, not an object")
    return header_len, header


def _safetensors_metadata(header: dict) -> dict[str, str]:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Malformed("its '__metadata__' is not a map of strings")
    return metadata


def _tensor_entry(name: str, info: object) -> tuple[torch.dtype, list[int], int, int]:
    """dtype, shape and byte range of one header entry, checked so that the bytes hold exactly the shape."""
    entry = f"corrupt entry for tensor {name}"
    if not isinstance(info, dict):
        raise _Malformed(f"{entry} (not a JSON object)")
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise _Malformed(f"{entry} (dtype {info.get('dtype')!r}; readable: {', '.join(_SAFETENSORS_DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    # bool is an int to Python, not to the format
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _Malformed(f"{entry} (shape {str(shape)[:80]} is not a list of non-negative integers)")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _Malformed(f"{entry} (data offsets {str(offsets)[:80]} are not [start, end], 0 <= start <= end)")
    start, end = offsets
    # Python ints: a shape claiming 10**12 elements is compared, never allocated
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != end - start:
        raise _Malformed(
            f"{entry} (shape {str(shape)[:80]} of {info['dtype']} needs {nbytes} bytes, its offsets give {end - start})"
        )
    return dtype, shape, start, end


def _check_data_layout(entries: dict[str, tuple[torch.dtype, list[int], int, int]], data_len: int) -> None:
    """As the safetensors library demands: tensors tile the data section, with no overlap, gap or excess."""
    position = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if end > data_len:
            raise _Malformed(
                f"corrupt entry for tensor {name} (its bytes {start}..{end} run past the end of the data, "
                f"{data_len} bytes: truncated?)"
            )
        if start != position:
            problem = "overlap the previous tensor's" if start < position else "leave a gap after the previous tensor"
            raise _Malformed(f"corrupt entry for tensor {name} (its bytes {start}..{end} {problem})")
        position = end
    if position != data_len:
        raise _Malformed(f"its data section has {data_len} bytes, its tensors cover {position}")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as views of a private memory map of the file (no copy in RAM), and the header metadata.

    The whole header is checked before any tensor is made, so a damaged file costs no more than its header.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_len, header = _safetensors_header(f, size)
            metadata = _safetensors_metadata(header)
            entries = {name: _tensor_entry(name, info) for name, info in header.items()}
            base = 8 + header_len
            _check_data_layout(entries, size - base)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never changed
    except _Malformed as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file: {e}; {_DAMAGED}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        raw = data[base + start : base + end]
        if (base + start) % dtype.itemsize:
            raw = raw.clone()  # misaligned for a zero-copy view of this dtype
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata


def _first_line(e: BaseException) -> str:
    """The gist of an exception for a one-line message: its first sentence, without c10's source location."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", text).split(". ", 1)[0][:160]
    # a KeyError's text is the bare key ("3"), an EOFError's often empty
    return f"{type(e).__name__}: {text}" if isinstance(e, (LookupError, EOFError)) and text else text or type(e).__name__


def _pickle_globals(stream: io.BufferedIOBase | mmap.mmap) -> set[tuple[str, str]]:
    """The ``(module, name)`` of every global one pickle names, read from its opcodes (nothing is run).

    ``STACK_GLOBAL`` (protocol 4+) takes both strings from the stack: the last two strings pushed, directly or
    from the memo, stand in for it, which is how pickle writes them.
    """
    found = set()
    recent: list[object] = []  # the values last pushed, strings known, anything else None
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.add((module, name))
        elif op.name == "STACK_GLOBAL":
            if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                found.add((recent[-2], recent[-1]))
            recent.append(None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = recent[-1] if recent else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(arg))
        elif op.name == "POP" and recent:
            recent.pop()
        elif op.stack_after:
            recent.append(arg if isinstance(arg, str) else None)
        del recent[:-2]
    return found


def _refused_by_torch(names: set[tuple[str, str]]) -> list[str]:
    """Which of ``names`` torch's weights-only loader refuses, as torch's own public lister says.

    The lister reads only torch.save's zip layout and protocol-2 opcodes, so the names are written into a
    small such file in memory: torch's allow-list (defaults and ``add_safe_globals``) stays torch's.
    """
    # a name that cannot be written as a GLOBAL line is nothing torch could allow
    odd = {f"{m}.{n}" for m, n in names if "\n" in m + n}
    lines = b"".join(b"c" + f"{m}\n{n}\n".encode("utf-8", "surrogatepass") for m, n in names if "\n" not in m + n)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # stored, not compressed: as torch writes
        archive.writestr("archive/data.pkl", b"\x80\x02" + lines + b".")
        archive.writestr("archive/version", "3\n")
    buffer.seek(0)
    try:
        refused = set(torch.serialization.get_unsafe_globals_in_checkpoint(buffer))
    except (RuntimeError, ValueError, pickle.UnpicklingError) as e:
        log.debug("torch could not list the unsafe globals: %s", e)
        return sorted(odd)
    return sorted(refused | odd)


def _unsafe_globals(path: Path, is_zip: bool) -> list[str]:
    """The globals (``module.name``) in a checkpoint's pickles that torch refuses without running code; empty
    when none can be named (a damaged pickle, or globals built at load time)."""
    if is_zip:
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            # e.g. a plain protocol-4 pickle in the zip: torch's lister knows only the opcodes torch.save writes
            log.debug("%s: torch cannot list the globals itself (%s); reading the opcodes", path, e)
    names: set[tuple[str, str]] = set()
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
                if member is not None:
                    names = _pickle_globals(io.BytesIO(archive.read(member)))
        else:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                # torch's legacy format: magic number, protocol, system info, the object, storage keys, each a
                # pickle, then raw storages; any of the pickles may name globals
                for _ in range(5):
                    names |= _pickle_globals(mapped)
    except (OSError, ValueError, EOFError, struct.error, OverflowError, zipfile.BadZipFile) as e:
        log.debug("%s: stopped reading pickle opcodes: %s", path, e)
    return _refused_by_torch(names) if names else []


def _check_state(path: Path, obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded pickle: string keys, plain CPU tensors whose data the file holds."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    odd = next(((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if odd is not None:
        raise CheckpointError(
            f"{path}: not a checkpoint: its entry {str(odd[0])[:80]!r} is a {type(odd[1]).__name__}"
            f"{'' if isinstance(odd[0], str) else ' (its key is a ' + type(odd[0]).__name__ + ')'}; expected tensors "
            "under string keys"
        )
    storages: dict[int, int] = {}
    for key, t in obj.items():
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise CheckpointError(f"{path}: tensor {key!r} is not a plain CPU tensor ({t.layout}, {t.device})")
        storage = t.untyped_storage()
        # A stride-0 view can claim 10**12 elements of a 4-byte storage; the first cast would allocate them all.
        if t.numel() * t.element_size() > storage.nbytes():
            raise CheckpointError(
                f"{path}: tensor {key!r} of shape {list(t.shape)} claims more elements than its data holds; {_DAMAGED}"
            )
        storages[storage.data_ptr()] = storage.nbytes()
    # Legacy (non-zip) loads grow a storage to fit a damaged shape instead of failing: memory the file never
    # had. A memory-mapped zip storage longer than its record reads on into the next member's bytes.
    held = _stored_bytes(path)
    if sum(storages.values()) > held:
        raise CheckpointError(
            f"{path}: its tensors claim {sum(storages.values())} bytes of data, the file holds {held}; {_DAMAGED}"
        )
    return obj


def _stored_bytes(path: Path) -> int:
    """How many bytes of tensor data the file can hold: its ``<archive>/data/<key>`` records in torch's zip
    format (read from the central directory), else its size."""
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_MAGIC:
            try:
                with zipfile.ZipFile(f) as archive:
                    records = [i for i in archive.infolist() if i.filename.split("/")[-2:-1] == ["data"]]
                    return sum(i.file_size for i in records)
            except (zipfile.BadZipFile, OSError, ValueError) as e:  # torch's reader was less strict
                log.debug("%s: zip directory unreadable to Python (%s)", path, e)
    return path.stat().st_size


def load_pickle(path: Path) -> object:
    """Whatever a pickled file (``.ckpt``, ``.pt``, ``.bin``) holds, loaded with ``weights_only=True``: one that
    needs code is refused by the names of the globals it wanted, and nothing from the file runs. Zip-format
    files stay memory-mapped. Every failure is a one-line ``CheckpointError``."""
    kind = f"{path.suffix} file" if path.suffix else "pickle"
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        # torch warns about what it finds odd in a file (an unusual pickle protocol): several lines on stderr
        # that would break the CLI's one-line error; they are kept for --verbose runs as debug records
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        log.debug("%s: torch refused the pickle: %s", path, e)
        unsafe = _unsafe_globals(path, is_zip)
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to load: its pickle needs code to be executed to load ({', '.join(unsafe)}); "
                "nothing from it was run. If you trust its source, convert it to .safetensors with a tool you trust"
            ) from None
        # torch re-raises its unpickler's error "from None": the specific reason is the context
        reason = _first_line(e.__context__ or e)
        raise CheckpointError(
            f"{path}: not a readable {kind}: torch's weights-only loader refused its pickle ({reason}); {_DAMAGED}"
        ) from None
    # Unpickling untrusted bytes fails in every way torch has (RuntimeError from the zip reader, EOFError,
    # KeyError, AssertionError, MemoryError, ...): each means the same to the user.
    except Exception as e:
        log.debug("%s: torch.load failed", path, exc_info=True)
        raise CheckpointError(f"{path}: not a readable {kind} ({_first_line(e)}); {_DAMAGED}") from None
    for warning in caught:
        log.debug("%s: torch.load: %s", path, warning.message)
    return obj


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a pickled checkpoint (see ``load_pickle``), its ``state_dict`` entry if it has one."""
    return _check_state(path, load_pickle(path))


def file_head(path: Path, size: int = 16) -> bytes:
    """The first ``size`` bytes of a file to be loaded; ``CheckpointError`` if it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty; download or convert it again")
    return head


def looks_like_safetensors(path: Path, head: bytes) -> bool:
    """A ``.safetensors`` name, or the format's header start (8-byte length, then ``{``) under another name."""
    return path.suffix.lower() == ".safetensors" or head[8:9] == b"{"


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if looks_like_safetensors(path, file_head(path)):
        return read_safetensors(path)
    return read_ckpt(path), {}


@dataclass(frozen=True)
class LoadedModel:
    model: StableDiffusion
    config: ModelConfig
    path: Path
    dtype: torch.dtype
    ema: bool
    _hash: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # what sampling calls in place of ``model.unet`` (a compiled or CUDA-graph wrapper); None: the UNet
    unet_runner: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    # a separate VAE file loaded over the checkpoint's (``--vae``): A1111's infotext "VAE" and "VAE hash"
    vae_name: str | None = None
    vae_hash: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's "Model hash": the first 10 hex digits of the file's sha256."""
        if "sha256" not in self._hash:
            self._hash["sha256"] = file_sha256(self.path) if self.path.is_file() else ""
        return self._hash["sha256"][:10]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_model_hash(path: Path) -> str:
    """AUTOMATIC1111's old ``model_hash`` (``modules/sd_models.py``), which sd-webui-controlnet puts after its
    models' names: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits (a file under 1 MiB hashes no bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        digest.update(f.read(0x10000))
    return digest.hexdigest()[:8]


def select_ema(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Replace the UNet's weights by their EMA copies (LDM's ``model_ema.*`` keys)."""
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state]
    if missing:
        raise CheckpointError(f"{path}: has no EMA weights (no {ema_key(missing[0])}); load without --ema")
    state = dict(state)
    for k in unet_keys:
        state[k] = state[ema_key(k)]
    return state


def has_ema(keys: set[str]) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in keys)


def load_state(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[ModelConfig | None, dict[str, torch.Tensor], dict[str, str]]:
    """The single-file-layout state dict of any supported checkpoint, with its stored config if any.

    ``dtype`` casts diffusers folders as they are read (one copy in memory); single files stay mapped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        from sdstudio.models.diffusers_convert import load_diffusers_folder

        config, state = load_diffusers_folder(path, dtype)
        return config, state, {}
    state, metadata = read_state_dict(path)
    return stored_config(path, metadata), state, metadata


def stored_config(path: Path, metadata: Mapping[str, str]) -> ModelConfig | None:
    """The architecture our own saves write into the header (``save_model``), if the file has it."""
    if METADATA_KEY not in metadata:
        return None
    try:
        return ModelConfig.from_json(metadata[METADATA_KEY])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: unreadable '{METADATA_KEY}' in its header ({_first_line(e)}); {_DAMAGED}"
        ) from None


@torch.no_grad()
def looks_like_v_prediction(unet: torch.nn.Module, context_dim: int) -> bool:
    """AUTOMATIC1111's test for SD 2.x v-models, whose weights look like any other SD 2.x: at t=999 on a
    constant input an epsilon model predicts about the input, a v model about its negation."""
    x = torch.full((1, 4, 8, 8), 0.5)
    context = torch.full((1, 2, context_dim), 0.5)
    param = next(unet.parameters())
    out = unet(x.to(param.dtype), torch.tensor([999.0]), context.to(param.dtype)).float()
    return float((out - x).mean()) < -1


def _detect(path: Path, shapes: dict[str, tuple[int, ...]], prediction: str | None = None) -> ModelConfig:
    """``detect_config``, with what damaged shapes make it trip on (a zero width, a missing dimension) said as
    a ``CheckpointError``."""
    try:
        return detect_config(shapes, prediction)
    except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        log.debug("%s: architecture detection failed", path, exc_info=True)
        raise CheckpointError(
            f"{path}: cannot tell the architecture from its weights' shapes ({_first_line(e)}); "
            "the file is damaged, or pass the architecture explicitly"
        ) from None


def _build_on_meta(path: Path, config: ModelConfig) -> StableDiffusion:
    """The model's skeleton, no memory for weights. A config read from a damaged header can hold values no
    network can be built from (a string width, channels that no norm group divides)."""
    try:
        with torch.device("meta"):
            return StableDiffusion(config)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: its architecture {config.name!r} cannot be built ({_first_line(e)}); {_DAMAGED}"
        ) from None


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
    prediction: str | None = None,
    config: ModelConfig | None = None,
) -> LoadedModel:
    """Load a checkpoint into our model without renaming keys; weights land by assignment (no second copy)."""
    path = Path(path)
    stored, state, _ = load_state(path, dtype)
    detected = config is None and stored is None
    config = config or stored or _detect(path, {k: tuple(v.shape) for k, v in state.items()}, prediction)
    if prediction and prediction != config.prediction:
        config = dataclasses.replace(config, prediction=prediction)
    if use_ema:
        state = select_ema(state, path)
    model = _build_on_meta(path, config)
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state and k not in _OPTIONAL_KEYS]
    if missing:
        raise CheckpointError(
            f"{path}: does not match the detected architecture {config.name!r}: missing "
            f"{len(missing)} keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    unexpected = [
        k for k in state if k not in expected and k not in _IGNORED_KEYS and not k.startswith(_IGNORED_PREFIXES)
    ]
    if unexpected:
        log.warning("%s: ignoring %d unexpected keys (%s ...)", path, len(unexpected), unexpected[0])
    wanted = {}
    for k in expected:
        if k in state:
            t = state[k]
            wanted[k] = t.to(dtype) if t.is_floating_point() else t
    try:
        model.load_state_dict(wanted, strict=False, assign=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise CheckpointError(f"{path}: weights do not fit the architecture {config.name!r}: {first}") from None
    for name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:  # an optional key absent from the file
                setattr(module, pname, torch.nn.Parameter(torch.zeros(param.shape, dtype=dtype), requires_grad=False))
    model.eval().requires_grad_(False)
    sd2 = config.text.kind == "open_clip" and not config.is_sdxl
    if detected and prediction is None and sd2 and looks_like_v_prediction(model.unet, config.unet.context_dim):
        log.info("%s: SD 2.x weights behave as v-prediction; sampling with v (override: --prediction)", path)
        config = dataclasses.replace(config, prediction="v", default_size=768)
        model.config = config
    return LoadedModel(model=model, config=config, path=path, dtype=dtype, ema=use_ema)


def save_model(
    model: StableDiffusion,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
    config: ModelConfig | None = None,
) -> Path:
    """Write a single-file ``.safetensors`` in the original SD layout with our config in its header.

    ``extra``: tensors written besides the model's (EMA weights as ``model_ema.*``); ``config``: the header's
    config instead of ``model.config`` (a fine-tune trained for another prediction type)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; pass --overwrite to replace it")
    tensors = {}
    for k, v in {**model.state_dict(), **(extra or {})}.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    header = {METADATA_KEY: (config or model.config).to_json(), **(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def checkpoint_info(path: str | os.PathLike) -> dict:
    """What ``sdstudio checkpoint info`` prints: architecture, prediction, dtypes, parameter counts, EMA."""
    path = Path(path)
    stored, state, _ = load_state(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = stored or _detect(path, shapes)
    text_prefix = SDXL_TEXT_PREFIX if config.is_sdxl else TEXT_PREFIX
    prefixes = {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": text_prefix}
    counts = {
        part: sum(v.numel() for k, v in state.items() if k.startswith(prefix)) for part, prefix in prefixes.items()
    }
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for k, v in state.items() if k.startswith(tuple(prefixes.values()))})
    return {
        "path": str(path),
        "architecture": config.name,
        "config_source": "metadata" if stored else "detected",
        "prediction": config.prediction,
        "inpainting": config.is_inpainting,
        "text_encoder": config.text.kind,
        "dtypes": dtypes,
        "parameters": counts,
        "ema": has_ema(set(state)),
        "config": json.loads(config.to_json()),
    }
