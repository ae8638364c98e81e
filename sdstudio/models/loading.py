"""Reading and writing checkpoints: single-file ``.safetensors`` (memory-mapped), ``.ckpt`` (weights only,
never unpickling code) and diffusers folders; EMA selection; dtype on load; atomic single-file saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdstudio.errors import CheckpointError
from sdstudio.io.files import atomic_write
from sdstudio.models.configs import METADATA_KEY, ModelConfig
from sdstudio.models.detect import detect_config
from sdstudio.models.stablediffusion import EMA_PREFIX, UNET_PREFIX, StableDiffusion, ema_key

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Keys real checkpoints carry that are not weights of the three networks.
_IGNORED_PREFIXES = (EMA_PREFIX, "model_ema.", "lora_", "control_model.", "embedding_manager.")
_IGNORED_KEYS = {
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
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
# Present in the model, absent from some real SD 2.x files; unused by Stable Diffusion.
_OPTIONAL_KEYS = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as views of a private memory map of the file (no copy in RAM), and the header metadata."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never changed
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data = torch.frombuffer(mapped, dtype=torch.uint8) if len(mapped) else torch.empty(0, dtype=torch.uint8)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) - base:
                raise ValueError("data offsets outside the file")
            raw = data[base + start : base + end]
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if (base + start) % itemsize:
                raw = raw.clone()  # misaligned for a zero-copy view of this dtype
            tensors[name] = raw.view(dtype).reshape(info["shape"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name} ({e}); the file is damaged") from None
    return tensors, metadata


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, loaded with ``weights_only=True``: any object that needs code is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(f"{path}: not a readable .ckpt file (corrupt pickle)") from None
        raise CheckpointError(
            f"{path}: refusing to load: this pickle needs code to be executed to load ({found.group(1)}). "
            "Convert it to .safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .ckpt file ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors)")
    return obj


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
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
    config = None
    if METADATA_KEY in metadata:
        try:
            config = ModelConfig.from_json(metadata[METADATA_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable '{METADATA_KEY}' in its header ({e})") from None
    return config, state, metadata


@torch.no_grad()
def looks_like_v_prediction(unet: torch.nn.Module, context_dim: int) -> bool:
    """AUTOMATIC1111's test for SD 2.x v-models, whose weights look like any other SD 2.x: at t=999 on a
    constant input an epsilon model predicts about the input, a v model about its negation."""
    x = torch.full((1, 4, 8, 8), 0.5)
    context = torch.full((1, 2, context_dim), 0.5)
    param = next(unet.parameters())
    out = unet(x.to(param.dtype), torch.tensor([999.0]), context.to(param.dtype)).float()
    return float((out - x).mean()) < -1


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
    config = config or stored or detect_config({k: tuple(v.shape) for k, v in state.items()}, prediction)
    if prediction and prediction != config.prediction:
        config = dataclasses.replace(config, prediction=prediction)
    if use_ema:
        state = select_ema(state, path)
    with torch.device("meta"):
        model = StableDiffusion(config)
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
    sd2 = config.text.kind == "open_clip"
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
) -> Path:
    """Write a single-file ``.safetensors`` in the original SD layout with our config in its header."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; pass --overwrite to replace it")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    header = {METADATA_KEY: model.config.to_json(), **(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def checkpoint_info(path: str | os.PathLike) -> dict:
    """What ``sdstudio checkpoint info`` prints: architecture, prediction, dtypes, parameter counts, EMA."""
    path = Path(path)
    stored, state, _ = load_state(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = stored or detect_config(shapes)
    prefixes = {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
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
