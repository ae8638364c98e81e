"""The extra-network files in the configured folders, as the listings and the UI's cards show them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdstudio.adapters.library import header_metadata

NetworkKind = Literal["lora", "embedding", "hypernetwork"]
NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# A1111's preview files beside a network: NAME.png, NAME.preview.png, and the same in other formats
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA_VALUE_CHARS = 500  # long values (ss_tag_frequency, ss_dataset_dirs) are cut for the cards


@dataclass(frozen=True)
class NetworkEntry:
    kind: NetworkKind
    name: str  # the file's stem: what a prompt tag names
    path: Path
    preview: Path | None

    def metadata(self) -> dict[str, str]:
        """A ``.safetensors`` file's ``__metadata__`` (kohya's ``ss_*``); {} for other files."""
        return header_metadata(self.path) if self.path.suffix.lower() == ".safetensors" else {}

    def tag(self) -> str:
        """What a click on its card puts into the prompt."""
        if self.kind == "lora":
            return f"<lora:{self.name}:1>"
        if self.kind == "hypernetwork":
            return f"<hypernet:{self.name}:1>"
        return self.name


def preview_of(path: Path) -> Path | None:
    for stem in (path.stem, f"{path.stem}.preview"):
        for suffix in PREVIEW_SUFFIXES:
            candidate = path.with_name(stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def network_files(folders: tuple[Path, ...], suffixes: tuple[str, ...] = NETWORK_SUFFIXES) -> list[Path]:
    return sorted(
        f for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
    )


def list_networks(kind: NetworkKind, folders: tuple[Path, ...]) -> list[NetworkEntry]:
    """Every network file of ``kind`` under ``folders`` (read on each call: no refresh needed)."""
    suffixes = (".pt",) if kind == "hypernetwork" else NETWORK_SUFFIXES
    return [NetworkEntry(kind, f.stem, f, preview_of(f)) for f in network_files(folders, suffixes)]


def card_metadata(entry: NetworkEntry) -> dict[str, str]:
    return {k: v if len(v) <= METADATA_VALUE_CHARS else v[:METADATA_VALUE_CHARS] + "…"
            for k, v in entry.metadata().items()}  # fmt: skip
