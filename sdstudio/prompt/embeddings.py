"""Textual inversion embeddings (Gal et al. 2022) used by name in a prompt, as AUTOMATIC1111 does.

An embedding is a few learned token vectors ``[n_vectors, width]``. Its name (the file's stem) is
tokenized, and wherever that token sequence occurs in a prompt fragment the embedding's vectors take
the place of those tokens (A1111's ``EmbeddingDatabase.find_embedding_at_position``; longest names
are tried first). The vectors then enter the text encoder through ``token_embeds``.

Files understood (A1111's ``create_embedding_from_data``):

* A1111 ``.pt``: ``{"string_to_param": {"*": tensor [n, width]}, "name": ..., "step": ...}``,
  loaded with ``torch.load(weights_only=True)`` only, so a file that needs code to load is refused;
* A1111 ``.safetensors``: one tensor (e.g. ``emb_params``) ``[n, width]``;
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor [width] or [n, width]}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import ModelConfig
from sdstudio.models.tokenizer import CHUNK, ClipTokenizer

log = logging.getLogger(__name__)

__all__ = ["Embedding", "EmbeddingDatabase", "load_embedding", "load_embeddings", "load_embeddings_for"]

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True, eq=False)  # identity equality: chunks holding an embedding are dict keys
class Embedding:
    name: str
    vectors: Tensor  # [n_vectors, width], float32, CPU
    path: Path | None = None
    # SDXL: the vectors of each text encoder in the model's order (``clip_l``, ``clip_g``; the refiner's
    # ``clip_g`` alone), ``vectors`` being the first; () for one text encoder
    per_encoder: tuple[Tensor, ...] = ()

    def vectors_for(self, encoder: int) -> Tensor:
        """The vectors for the model's text encoder number ``encoder``."""
        return self.per_encoder[encoder] if self.per_encoder else self.vectors

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @cached_property
    def short_hash(self) -> str:
        """AUTOMATIC1111's ``TI hashes`` entry: the first 12 hex digits of the file's sha256 ("" without a
        file); read once."""
        if self.path is None:
            return ""
        from sdstudio.models.loading import file_sha256

        try:
            return file_sha256(self.path)[:12]
        except OSError:  # the file went away after loading: no hash rather than no image
            return ""


@dataclass(frozen=True)
class EmbeddingDatabase:
    """Embeddings by name, indexed by the token ids of their names; build with :meth:`build`.

    ``skipped`` maps the names of files that failed to load (only kept when the caller asked to skip
    bad files) to the reason; ``warnings`` says what was skipped, for the generation result.
    """

    embeddings: Mapping[str, Embedding]
    # first token id of a name -> ((name's token ids, embedding), ...), longest first
    by_first_token: Mapping[int, tuple[tuple[tuple[int, ...], Embedding], ...]]
    skipped: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        embeddings: Iterable[Embedding],
        tokenizer: ClipTokenizer,
        skipped: Mapping[str, str] | None = None,
        warnings: Sequence[str] = (),
    ) -> EmbeddingDatabase:
        by_name: dict[str, Embedding] = {}
        notes = list(warnings)
        index: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in embeddings:
            if embedding.name in by_name:
                notes.append(
                    f"embedding {embedding.name!r}: {embedding.path} ignored, {by_name[embedding.name].path} has the same name"
                )
                continue
            ids = tuple(tokenizer.encode(embedding.name))
            if not ids:
                notes.append(f"embedding {embedding.name!r}: the name has no tokens, so no prompt can use it")
                continue
            by_name[embedding.name] = embedding
            index.setdefault(ids[0], []).append((ids, embedding))
        lookup = {
            first: tuple(sorted(v, key=lambda e: len(e[0]), reverse=True)) for first, v in index.items()
        }
        return cls(by_name, lookup, dict(skipped or {}), tuple(notes))

    def match(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at ``tokens[position]``, and that token count."""
        for ids, embedding in self.by_first_token.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def used_in(self, tokenizer: ClipTokenizer, texts: Iterable[str]) -> list[Embedding]:
        """The embeddings that ``texts`` (prompt fragments) use, in order of first use, as the prompt's
        tokens find them."""
        used: dict[str, Embedding] = {}
        for text in texts:
            tokens = tokenizer.encode(text)
            position = 0
            while position < len(tokens):
                found = self.match(tokens, position)
                if found is None:
                    position += 1
                    continue
                used.setdefault(found[0].name, found[0])
                position += found[1]
        return list(used.values())

    def skipped_names_in(self, text: str) -> list[str]:
        """Names of skipped (bad) embedding files that ``text`` uses as words; they stay plain text."""
        return [
            name
            for name in self.skipped
            if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None
        ]


def _read(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise SdStudioError(
                f"{path}: not a valid .safetensors embedding ({str(e).splitlines()[0][:160]})"
            ) from None
    from sdstudio.models.loading import load_pickle

    return load_pickle(path)  # a pickle that needs code is refused by name, one line for every failure


def _vectors(path: Path, data: object) -> Tensor:
    """The one tensor of an embedding file's contents, per A1111's formats."""
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise SdStudioError(f"{path}: 'string_to_param' must hold exactly one tensor")
        tensor = next(iter(params.values()))
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        raise SdStudioError(
            f"{path}: an SDXL embedding (clip_g/clip_l), and this model is not SDXL (an embedding made for another "
            "model family)"
        )
    elif isinstance(data, dict) and len(data) == 1:
        tensor = next(iter(data.values()))
    else:
        raise SdStudioError(
            f"{path}: not an embedding (expected A1111's string_to_param, or a file with exactly one tensor)"
        )
    if not isinstance(tensor, Tensor):
        raise SdStudioError(f"{path}: the embedding's value is not a tensor")
    return tensor


SDXL_ENCODERS = {"sdxl": ("clip_l", "clip_g"), "sdxl_refiner": ("clip_g",)}


def _sdxl_embedding(path: Path, widths: Sequence[int], keys: Sequence[str], name: str | None) -> Embedding:
    """An SDXL embedding file: one tensor per text encoder, ``clip_l`` [n, 768] and ``clip_g`` [n, 1280]."""
    data = _read(path)
    if not isinstance(data, dict) or not all(k in data for k in ("clip_l", "clip_g")):
        raise SdStudioError(
            f"{path}: not an SDXL embedding (SDXL's hold 'clip_l' and 'clip_g' tensors; an SD 1.x / 2.x embedding "
            "does not fit an SDXL model)"
        )
    tensors = [_checked(path, data[key], width, key) for key, width in zip(keys, widths)]
    if len({t.shape[0] for t in tensors}) != 1:
        raise SdStudioError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    return Embedding(name or path.stem, tensors[0], path, tuple(tensors))


def _checked(path: Path, tensor: object, width: int, part: str = "") -> Tensor:
    """``tensor`` as [n_vectors, width] float32, or ``SdStudioError`` naming what is wrong with it."""
    where = f" ({part})" if part else ""
    if not isinstance(tensor, Tensor):
        raise SdStudioError(f"{path}: the embedding's value{where} is not a tensor")
    tensor = tensor.detach()
    if tensor.ndim == 1:  # diffusers stores a single vector as [width]
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise SdStudioError(
            f"{path}: embedding tensor{where} has shape {tuple(tensor.shape)}; expected [vectors, {width}]"
        )
    if tensor.shape[1] != width:
        raise SdStudioError(
            f"{path}: embedding vectors{where} are {tensor.shape[1]} wide, this model's text encoder expects {width} "
            "(an embedding made for another model family)"
        )
    if tensor.shape[0] > CHUNK:
        raise SdStudioError(f"{path}: {tensor.shape[0]} vectors do not fit in one {CHUNK}-token chunk")
    if not torch.isfinite(tensor).all():
        raise SdStudioError(f"{path}: embedding contains NaN or infinite values")
    return tensor.to(torch.float32).contiguous()


def load_embedding(
    path: str | Path, width: int, name: str | None = None, *, widths: Sequence[int] = (), conditioner: str = "text"
) -> Embedding:
    """One embedding file for a text encoder of ``width``; ``SdStudioError`` naming the file if unusable.

    SDXL (``conditioner`` "sdxl" / "sdxl_refiner", ``widths`` its encoders' widths): AUTOMATIC1111's SDXL
    files, a ``clip_l`` and a ``clip_g`` tensor."""
    path = Path(path)
    if conditioner in SDXL_ENCODERS:
        return _sdxl_embedding(path, widths or (width,), SDXL_ENCODERS[conditioner], name)
    tensor = _checked(path, _vectors(path, _read(path)), width)
    return Embedding(name or path.stem, tensor, path)


def load_embeddings(
    folder: str | Path,
    width: int,
    tokenizer: ClipTokenizer,
    *,
    skip_bad: bool = False,
    widths: Sequence[int] = (),
    conditioner: str = "text",
) -> EmbeddingDatabase:
    """Every embedding file under ``folder`` (recursively; name = file stem), for a text encoder of ``width``.

    A bad file raises ``SdStudioError`` unless ``skip_bad``: then it is left out, logged, and named in
    the database's ``skipped`` and ``warnings``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SdStudioError(f"{folder}: embeddings folder does not exist or is not a folder")
    loaded: list[Embedding] = []
    skipped: dict[str, str] = {}
    notes: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
        try:
            loaded.append(load_embedding(path, width, widths=widths, conditioner=conditioner))
        except SdStudioError as e:
            if not skip_bad:
                raise
            log.warning("skipping embedding: %s", e)
            skipped[path.stem] = str(e)
            notes.append(f"embedding skipped: {e}")
    log.info("loaded %d embeddings from %s", len(loaded), folder)
    return EmbeddingDatabase.build(loaded, tokenizer, skipped, notes)


def load_embeddings_for(
    folder: str | Path, config: ModelConfig, tokenizer: ClipTokenizer, *, skip_bad: bool = False
) -> EmbeddingDatabase:
    """:func:`load_embeddings` for the text encoder(s) of a model with ``config`` (SDXL's two included)."""
    widths = tuple(c.width for c in (config.text, config.text2) if c is not None)
    return load_embeddings(
        folder, config.text.width, tokenizer, skip_bad=skip_bad, widths=widths, conditioner=config.conditioner
    )
