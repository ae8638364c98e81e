"""Checkpoints the server knows (``--model`` and ``--models-dir``) and the cache of loaded ones.

The registry lists checkpoints with AUTOMATIC1111's titles (``name.safetensors [shorthash]``) and holds the
default one; the cache of loaded pipelines is keyed by file hash (two copies of one file load once) and
kept under a memory budget, evicting the least recently used. Only the worker thread loads into the cache;
the HTTP routes read the registry, whose lock is held only for dictionary work, never for a load or a hash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstudio.models.loading import file_sha256, legacy_model_hash

log = logging.getLogger("sdstudio.server")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")  # A1111 finds these beside checkpoints
VAE_FOLDER = "VAE"  # and any weights file in <models-dir>/VAE (its models/VAE)
VAE_FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
NO_VAE = ("Automatic", "None", "")  # sd_vae values meaning the checkpoint's own VAE
DEFAULT_BUDGET_FRACTION = 0.5  # of the RAM available at start-up


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file or diffusers folder, as A1111's ``CheckpointInfo``."""

    path: Path
    name: str  # relative to the models folder, with its suffix ("sub/model.safetensors")
    sha256: str | None  # None for a diffusers folder

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    @property
    def model_name(self) -> str:
        stem = self.name
        for suffix in CHECKPOINT_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def key(self) -> str:
        """The cache key: the file's hash, so that copies of one file share a load."""
        return self.sha256 or f"folder:{self.path.resolve()}"

    def api_item(self) -> dict[str, Any]:
        """A1111's ``SDModelItem``."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash,
                "sha256": self.sha256, "filename": str(self.path), "config": None}  # fmt: skip


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def find_checkpoints(folder: Path, top: bool = True) -> list[Path]:
    """Checkpoint files and diffusers folders under ``folder`` (not descending into a diffusers folder,
    nor into the top folder's ``VAE``)."""
    found: list[Path] = []
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if top and entry.name == VAE_FOLDER:
                continue
            found += [entry] if is_diffusers_folder(entry) else find_checkpoints(entry, top=False)
        elif entry.suffix.lower() in CHECKPOINT_SUFFIXES and not entry.name.lower().endswith(VAE_SUFFIXES):
            found.append(entry)
    return found


def find_vaes(folder: Path | None) -> list[Path]:
    """``*.vae.safetensors`` (.pt, .ckpt) files anywhere under ``folder``, any weights in ``folder/VAE``."""
    if folder is None or not folder.is_dir():
        return []
    named = {f for f in folder.rglob("*") if f.is_file() and f.name.lower().endswith(VAE_SUFFIXES)}
    vae_folder = folder / VAE_FOLDER
    if vae_folder.is_dir():
        named |= {f for f in vae_folder.rglob("*") if f.is_file() and f.suffix.lower() in VAE_FILE_SUFFIXES}
    return sorted(named)


class UnknownCheckpoint(LookupError):
    """A title no known checkpoint answers to; the message names the known titles."""


class CheckpointRegistry:
    """The known checkpoints and the default one. Thread-safe; hashing happens outside the lock."""

    def __init__(self, model: Path, models_dir: Path | None = None, hash_cache: Path | None = None) -> None:
        """``hash_cache``: a JSON file keeping the files' sha256 across restarts (a big checkpoint takes
        seconds to hash), as A1111's ``cache.json``."""
        self.model = Path(model)
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = self._read_hash_cache()  # "path|size|mtime_ns" -> sha256
        self._checkpoints: tuple[Checkpoint, ...] = ()
        self._default: Checkpoint | None = None
        self._default_vae: Checkpoint | None = None
        self.refresh()

    def _read_hash_cache(self) -> dict[str, str]:
        if self.hash_cache is None or not self.hash_cache.is_file():
            return {}
        try:
            data = json.loads(self.hash_cache.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable, hashing again (%s)", self.hash_cache, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _write_hash_cache(self) -> None:
        if self.hash_cache is None:
            return
        with self._lock:
            text = json.dumps(self._hashes, indent=1, sort_keys=True)
        tmp = self.hash_cache.with_name(self.hash_cache.name + ".tmp")
        try:
            self.hash_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(self.hash_cache)
        except OSError as e:
            log.warning("%s: cannot keep checkpoint hashes (%s)", self.hash_cache, e)

    def _sha256(self, path: Path) -> str | None:
        if path.is_dir():
            return None
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._hashes[key] = known
            self._write_hash_cache()
        return known

    def _scan(self) -> list[Checkpoint]:
        found: list[Checkpoint] = []
        seen: set[Path] = set()
        for path in find_checkpoints(self.models_dir) if self.models_dir else []:
            name = path.relative_to(self.models_dir).as_posix()  # type: ignore[arg-type]
            try:
                found.append(Checkpoint(path, name, self._sha256(path)))
            except OSError as e:  # removed or unreadable since the folder was listed: not offered
                log.warning("%s: left out of the checkpoints (%s)", path, e.strerror or e)
                continue
            seen.add(path.resolve())
        if self.model.resolve() not in seen:
            found.insert(0, Checkpoint(self.model, self.model.name, self._sha256(self.model)))
        return found

    def refresh(self) -> None:
        """Rescan ``--models-dir`` (A1111's refresh-checkpoints); the default stays if its file does."""
        found = tuple(self._scan())
        with self._lock:
            old = self._default
            self._checkpoints = found
            keep = old is not None and any(c.path == old.path for c in found)
            if not keep:
                self._default = next(c for c in found if c.path.resolve() == self.model.resolve())

    def list(self) -> tuple[Checkpoint, ...]:
        with self._lock:
            return self._checkpoints

    @property
    def default(self) -> Checkpoint:
        with self._lock:
            assert self._default is not None
            return self._default

    def find(self, title: str) -> Checkpoint:
        """By title, by name without the hash, by file stem, or by hash (as A1111's ``get_closet_checkpoint_match``)."""
        wanted = str(title).strip()
        checkpoints = self.list()
        for match in (
            lambda c: c.title == wanted,
            lambda c: c.name == wanted,
            lambda c: wanted in (c.shorthash, c.sha256) and c.sha256 is not None,
            lambda c: c.model_name == wanted or c.path.stem == wanted,
            lambda c: c.name == wanted.split(" [", 1)[0],
            # the infotext's "Refiner: name [hash]" (A1111's short title)
            lambda c: c.shorthash is not None and wanted == f"{c.path.stem} [{c.shorthash}]",
        ):
            hits = [c for c in checkpoints if match(c)]
            if hits:
                return hits[0]
        known = ", ".join(c.title for c in checkpoints)
        raise UnknownCheckpoint(f"no checkpoint {wanted!r}; known: {known}")

    def set_default(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            self._default = checkpoint

    def vaes(self) -> list[Checkpoint]:
        """The VAE files of ``--models-dir``, named by file name as A1111's sd_vae option names them."""
        return [Checkpoint(f, f.name, None) for f in find_vaes(self.models_dir)]

    def find_vae(self, name: str) -> Checkpoint | None:
        """None for the checkpoint's own VAE ("Automatic", "None"); the VAE hashed, for its cache key."""
        if name in NO_VAE:
            return None
        for vae in self.vaes():
            if name in (vae.name, vae.path.stem, str(vae.path)):
                return Checkpoint(vae.path, vae.name, self._sha256(vae.path))
        known = ", ".join([*NO_VAE[:2], *(v.name for v in self.vaes())])
        raise UnknownCheckpoint(f"no VAE {name!r}; known: {known}")

    @property
    def default_vae(self) -> Checkpoint | None:
        with self._lock:
            return self._default_vae

    def set_default_vae(self, vae: Checkpoint | None) -> None:
        with self._lock:
            self._default_vae = vae


# as sd-webui-controlnet's models folder holds them
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
_HASH_SUFFIX = re.compile(r"^(.*?)\s*\[[0-9A-Fa-f]{6,64}\]$")  # "control_v11p_sd15_canny [d14c016b]"


@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet file of ``--controlnet-dir``, named as sd-webui-controlnet's ``/controlnet/model_list``."""

    path: Path
    hash: str  # legacy_model_hash

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def list_controlnets(folders: tuple[Path, ...]) -> list[ControlNetFile]:
    """Every ControlNet file under ``folders`` (subfolders included), by file name as the extension sorts
    them; read on each call, so a file added while the server runs is listed."""
    found_files = {
        f for d in folders if d.is_dir() for f in d.rglob("*") if f.suffix.lower() in CONTROLNET_SUFFIXES
    }
    files = sorted((f for f in found_files if f.is_file()), key=lambda f: (f.name, str(f)))
    found = []
    for f in files:
        try:
            found.append(ControlNetFile(f, legacy_model_hash(f)))
        except OSError as e:  # removed or unreadable since the folder was listed: not offered
            log.warning("%s: left out of the ControlNets (%s)", f, e.strerror or e)
    return found


def controlnet_name(title: str) -> str:
    """A unit's ``model`` without the extension's `` [hash]``."""
    match = _HASH_SUFFIX.match(title.strip())
    return match.group(1) if match else title.strip()


def find_controlnet(folders: tuple[Path, ...], wanted: str) -> ControlNetFile:
    """By title (``name [hash]``), else by name without the hash (a hash from another install still finds
    the file), else by name in any case (the extension lowers names). A name two files share is refused."""
    files = list_controlnets(folders)
    exact = [f for f in files if f.title == wanted.strip()]
    if exact:
        return exact[0]
    name = controlnet_name(wanted)
    for same in (lambda f: f.name == name, lambda f: f.name.lower() == name.lower()):
        hits = [f for f in files if same(f)]
        if len(hits) > 1:
            paths = ", ".join(str(f.path) for f in hits)
            raise UnknownCheckpoint(f"ControlNet model {name!r} is ambiguous: {paths}; name one by its title")
        if hits:
            return hits[0]
    if not folders:
        raise UnknownCheckpoint(f"no ControlNet model {wanted!r}: the server has no --controlnet-dir")
    known = ", ".join(f.title for f in files) or "none"
    raise UnknownCheckpoint(f"no ControlNet model {wanted!r}; known: {known}")


def default_budget_bytes() -> int:
    """A share of the RAM available now: what the cache of loaded checkpoints may hold."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 << 30
    return int(available * DEFAULT_BUDGET_FRACTION)


def pipeline_bytes(pipeline: Any) -> int:
    """The bytes of a loaded pipeline's weights, its refiner's included (0 when it has none we can see, as a
    stub in tests)."""
    total = 0
    for loaded in (getattr(pipeline, "model", None), getattr(pipeline, "refiner", None)):
        module = getattr(loaded, "model", None)
        if module is not None and hasattr(module, "parameters"):
            total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return total


def estimate_bytes(checkpoint: Checkpoint, refiner: Checkpoint | None = None) -> int:
    """Before a load: the file's size (a folder's files' sizes), close to its weights' size in memory."""
    if refiner is not None:
        return estimate_bytes(checkpoint) + estimate_bytes(refiner)
    path = checkpoint.path
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


@dataclass(frozen=True)
class CacheEntry:
    checkpoint: Checkpoint
    vae: Checkpoint | None
    pipeline: Any
    nbytes: int
    refiner: Checkpoint | None = None


def cache_key(checkpoint: Checkpoint, vae: Checkpoint | None, refiner: Checkpoint | None = None) -> str:
    key = checkpoint.key if vae is None else f"{checkpoint.key}+vae:{vae.key}"
    return key if refiner is None else f"{key}+refiner:{refiner.key}"


class ModelCache:
    """Loaded pipelines keyed by checkpoint and VAE hashes, least recently used first, under ``budget`` bytes.

    ``load(path, vae_path_or_None)`` returns a Pipeline; it runs on the caller's thread (the worker's). The
    most recently used entry is never evicted, so one checkpoint larger than the budget still loads. A VAE
    is copied into the weights it is loaded with, so a checkpoint with another VAE is its own entry; so is a
    checkpoint with an SDXL refiner beside it (``load(path, vae, refiner=refiner_path)``: the refiner is part
    of the pipeline, and ``load`` is only given ``refiner`` when there is one).
    """

    def __init__(self, load: Callable[..., Any], budget: int,
                 measure: Callable[[Any], int] = pipeline_bytes) -> None:  # fmt: skip
        self._load = load
        self.budget = budget
        self._measure = measure
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, checkpoint: Checkpoint, vae: Checkpoint | None = None, refiner: Checkpoint | None = None
    ) -> Any:
        key = cache_key(checkpoint, vae, refiner)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry.pipeline
        self._evict(keep=estimate_bytes(checkpoint, refiner))
        log.info("loading %s%s%s", checkpoint.title, f" with VAE {vae.name}" if vae else "",
                 f" with refiner {refiner.title}" if refiner else "")  # fmt: skip
        vae_path = vae.path if vae else None
        if refiner is None:
            pipeline = self._load(checkpoint.path, vae_path)
        else:
            pipeline = self._load(checkpoint.path, vae_path, refiner=refiner.path)
        entry = CacheEntry(checkpoint, vae, pipeline, self._measure(pipeline), refiner)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
        self._evict(keep=0, protect=key)
        return pipeline

    def _evict(self, keep: int, protect: str | None = None) -> None:
        with self._lock:
            while self._entries:
                total = sum(e.nbytes for e in self._entries.values())
                oldest = next(iter(self._entries))
                if total + keep <= self.budget or oldest == protect:
                    return
                gone = self._entries.pop(oldest)
                log.info("unloading %s (cache over %d bytes)", gone.checkpoint.title, self.budget)

    def loaded(self) -> list[Checkpoint]:
        """Least recently used first."""
        with self._lock:
            return [e.checkpoint for e in self._entries.values()]

    def contains(
        self, checkpoint: Checkpoint, vae: Checkpoint | None = None, refiner: Checkpoint | None = None
    ) -> bool:
        with self._lock:
            return cache_key(checkpoint, vae, refiner) in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())
