"""Network files found by name in folders, as AUTOMATIC1111 finds ``<lora:NAME:...>`` in ``models/Lora``.

A1111 (``extensions-builtin/Lora/networks.py`` ``list_available_networks``): every ``.safetensors``,
``.pt`` and ``.ckpt`` under the folder, subfolders included, is known by its file stem and, where its
header has one, by kohya's ``ss_output_name`` (the name it was trained under) as an alias; a name two
files share is ambiguous and refused rather than guessed. A name that is not found is reported with the
names that exist, closest first.

The folders are scanned when the library is made and again when a name is missing (a file added while a
server runs is found on the next request).
"""

from __future__ import annotations

import difflib
import json
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

__all__ = ["NetworkFile", "NetworkLibrary", "NetworkNotFound", "closest_names", "header_metadata"]

SUFFIXES = (".safetensors", ".pt", ".ckpt")
_HEADER_LIMIT = 100_000_000  # as the checkpoint loader: a longer header is not a safetensors file


class NetworkNotFound(SdStudioError):
    """A name that no file in the folders has."""


@dataclass(frozen=True)
class NetworkFile:
    """One file of a folder: its stem, and kohya's ``ss_output_name`` when it differs from the stem."""

    name: str
    path: Path
    alias: str | None = None


def header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` header (only the header is read); {} for other files and
    for damaged ones (which fail with the loader's message when used)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return {}
            (length,) = struct.unpack("<Q", head)
            if length > _HEADER_LIMIT:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}


def _output_name(path: Path) -> str | None:
    """kohya's ``ss_output_name`` where it differs from the file's stem, or None."""
    alias = header_metadata(path).get("ss_output_name")
    return alias if alias and alias != path.stem else None


def closest_names(name: str, names: Iterable[str], limit: int = 8) -> list[str]:
    """``names`` ordered by how close they are to ``name`` (difflib's ratio, case-insensitive), the closest
    ``limit`` of them."""
    key = name.lower()
    ranked = sorted(set(names), key=lambda n: (-difflib.SequenceMatcher(None, key, n.lower()).ratio(), n))
    return ranked[:limit]


class NetworkLibrary:
    """The network files of some folders (``--lora-dir``, ``--hypernetwork-dir``), by name.

    ``kind`` names the files in messages ("LoRA", "hypernetwork"); ``flag`` is the option that adds folders.
    """

    def __init__(
        self, folders: Sequence[str | Path] = (), *, kind: str = "LoRA", flag: str = "--lora-dir",
        suffixes: Sequence[str] = SUFFIXES,
    ) -> None:  # fmt: skip
        self.folders = tuple(Path(f) for f in folders)
        self.kind, self.flag, self.suffixes = kind, flag, tuple(suffixes)
        for folder in self.folders:
            if not folder.is_dir():
                raise SdStudioError(f"{folder}: {kind} folder does not exist or is not a folder ({flag})")
        self._by_name: dict[str, NetworkFile] = {}
        self._ambiguous: dict[str, list[Path]] = {}
        self.rescan()

    def rescan(self) -> None:
        """Read the folders again."""
        files: list[NetworkFile] = []
        for folder in self.folders:
            found = (p for p in folder.rglob("*") if p.suffix.lower() in self.suffixes and p.is_file())
            files += [NetworkFile(p.stem, p, _output_name(p)) for p in sorted(found)]
        by_name: dict[str, list[NetworkFile]] = {}
        for file in files:
            by_name.setdefault(file.name, []).append(file)
        # an alias never hides a stem, and names only one file
        aliases: dict[str, list[NetworkFile]] = {}
        for file in files:
            if file.alias and file.alias not in by_name:
                aliases.setdefault(file.alias, []).append(file)
        self._by_name, self._ambiguous = {}, {}
        for name, same in (*by_name.items(), *aliases.items()):
            if len(same) == 1:
                self._by_name[name] = same[0]
            else:
                self._ambiguous[name] = [f.path for f in same]
        log.info("%d %s files in %s", len(files), self.kind, ", ".join(map(str, self.folders)) or "no folder")

    @property
    def names(self) -> list[str]:
        """Every name a tag may use (stems and aliases), sorted."""
        return sorted(self._by_name)

    def get(self, name: str) -> NetworkFile | None:
        return self._by_name.get(name)

    def find(self, name: str) -> NetworkFile:
        """The file named ``name``; ``NetworkNotFound`` says which names exist, closest first."""
        found = self._by_name.get(name)
        if found is None and name not in self._ambiguous:
            self.rescan()
            found = self._by_name.get(name)
        if found is not None:
            return found
        if name in self._ambiguous:
            paths = ", ".join(map(str, self._ambiguous[name]))
            raise NetworkNotFound(
                f"{self.kind} {name!r} is ambiguous: {paths} all have that name; rename one"
            )
        if not self.folders:
            raise NetworkNotFound(
                f"{self.kind} {name!r} not found: no {self.kind} folder given ({self.flag} DIR)"
            )
        where = ", ".join(map(str, self.folders))
        if not self._by_name:
            raise NetworkNotFound(f"{self.kind} {name!r} not found: {where} holds no {self.kind} files")
        known = closest_names(name, self._by_name)
        more = len(self._by_name) - len(known)
        listed = ", ".join(known) + (f" (and {more} more)" if more > 0 else "")
        raise NetworkNotFound(f"{self.kind} {name!r} not found in {where}; closest names: {listed}")
