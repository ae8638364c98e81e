"""The hashes AUTOMATIC1111 writes for networks into its infotext (``Lora hashes: "name: 0123456789ab"``).

A1111 (``extensions-builtin/Lora/network.py`` ``NetworkOnDisk.read_hash``, ``modules/hashes.py``): the
header's ``sshs_model_hash`` when the file has one (kohya writes it), else for ``.safetensors`` the
"addnet" hash, sha256 of the bytes after the header (so that editing the metadata keeps the hash; kohya
``library/train_util.py`` ``addnet_hash_safetensors``, which computes ``sshs_model_hash`` the same way),
and for any other file sha256 of the whole file. The infotext shows its first 12 hex digits.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from sdstudio.errors import CheckpointError

__all__ = ["addnet_hash", "network_hash", "short_hash"]

_CHUNK = 1 << 20


def _sha256(f: BinaryIO) -> str:
    """sha256 of the rest of ``f`` from where it stands."""
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash(path: Path) -> str:
    """sha256 of a ``.safetensors`` file's tensor data: everything after the 8-byte length and the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(
                    f"{path}: not a valid .safetensors file: shorter than its header length"
                )
            (length,) = struct.unpack("<Q", head)
            f.seek(8 + length)
            return _sha256(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def network_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """The full sha256 hex digest A1111 identifies the network file by (see the module docstring)."""
    path = Path(path)
    stored = (metadata or {}).get("sshs_model_hash")
    if stored:
        return stored.lower()
    if path.suffix == ".safetensors":
        return addnet_hash(path)
    try:
        with open(path, "rb") as f:
            return _sha256(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def short_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """The 12 hex digits of ``Lora hashes``."""
    return network_hash(path, metadata)[:12]
