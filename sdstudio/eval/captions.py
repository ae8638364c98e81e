"""Captioning a folder (``sdstudio caption``) and loading the captioner it and ``/sdapi/v1/interrogate`` use.

``load_captioner``: with a CLIP file, that CLIP ranks the phrase lists (the built-in mediums, movements
and flavours, and the user's own); without one, the toy world's CLIP pair ranks the world's sentences
(``toyworld.clip_pair.caption_grammar``). BLIP weights, when given, write the base caption.

``caption_folder`` writes ``<stem>.txt`` beside each image (kohya / AUTOMATIC1111's layout), one file at
a time and atomically, so a run cut off leaves every caption it wrote whole; an existing caption is
kept unless ``overwrite`` (replace it) or ``append_tags`` (add the new caption's comma-separated parts
that it lacks) is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdstudio.errors import SdStudioError
from sdstudio.eval.features import read_image
from sdstudio.eval.interrogate import MODES, Captioner, phrase_lists
from sdstudio.io.files import write_text_atomic
from sdstudio.training.datasets import IMAGE_EXTENSIONS  # kohya's image types, as training reads them


@dataclass(frozen=True)
class CaptionerSpec:
    """What captions: ``clip`` a CLIP file (None: the toy world's pair, with ``toy_model`` /
    ``toy_pair`` for other files than the shipped ones); ``blip`` a BLIP folder; ``phrases``: phrase-list
    files or folders; ``builtin_phrases``: the built-in lists too (None: with a CLIP file only, as the
    toy pair knows no words of them)."""

    clip: str | None = None
    blip: str | None = None
    phrases: tuple[str, ...] = ()
    builtin_phrases: bool | None = None
    toy_model: str | None = None
    toy_pair: str | None = None


@dataclass(frozen=True)
class CaptionFolderRequest:
    folder: str
    mode: str = "best"
    overwrite: bool = False
    append_tags: bool = False
    extension: str = ".txt"
    batch_size: int = 16
    prefix: str = ""  # put before every caption written, as it is ("sks, ": kohya's trigger word)
    postfix: str = ""  # put after it
    # (word, replacement) pairs applied to each new caption, whole words only: the captioner's name for
    # what the folder shows replaced by the user's own ("purple" -> "pink"), as kohya's find-and-replace
    replace: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SdStudioError(f"--mode {self.mode!r}: choose {', '.join(MODES)}")
        if self.overwrite and self.append_tags:
            raise SdStudioError(
                "--overwrite and --append-tags: choose one (replace captions, or add to them)"
            )
        if not self.extension.startswith(".") or len(self.extension) < 2 or "/" in self.extension:
            raise SdStudioError(f"--caption-extension {self.extension!r}: a file extension such as .txt")
        if self.batch_size < 1:
            raise SdStudioError(f"--batch-size {self.batch_size}: must be at least 1")
        for name, text in (("--prefix", self.prefix), ("--postfix", self.postfix)):
            if "\n" in text or "\r" in text:
                raise SdStudioError(f"{name} {text!r}: a caption is one line; give text without line breaks")
        for old, new in self.replace:
            if not old.strip() or any(c in old + new for c in "\r\n"):
                raise SdStudioError(
                    f"--replace {old}={new}: give OLD=NEW, OLD a word or phrase of the captions, on one line"
                )

    def edit(self, text: str, existing: str | None = None) -> str:
        """A caption as written: the new caption's replacements (whole words, case-sensitive), merged into
        ``existing`` with ``append_tags``, then the prefix (unless the caption starts with it already) and
        the postfix (likewise at its end): a trigger word stays first, as kohya's keep_tokens needs it."""
        for old, new in self.replace:
            start = r"(?<!\w)" if re.match(r"\w", old) else ""  # whole words; punctuation as it is
            end = r"(?!\w)" if re.search(r"\w$", old) else ""
            text = re.sub(start + re.escape(old) + end, lambda _, new=new: new, text)
        if existing is not None:
            text = _merge_tags(existing, text)
        if self.prefix and not text.startswith(self.prefix):
            text = self.prefix + text
        if self.postfix and not text.endswith(self.postfix):
            text = text + self.postfix
        return text


@dataclass(frozen=True)
class CaptionFolderResult:
    written: tuple[str, ...]  # caption files written (new, replaced or appended to)
    kept: tuple[str, ...]  # images whose caption existed and was left as it was
    unreadable: tuple[str, ...]  # images that could not be read, skipped

    def summary(self) -> str:
        parts = [f"captioned {len(self.written)} images"]
        if self.kept:
            parts.append(
                f"{len(self.kept)} kept their caption (--overwrite replaces, --append-tags adds to it)"
            )
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable, skipped: {', '.join(self.unreadable)}")
        return "; ".join(parts)


def load_captioner(spec: CaptionerSpec = CaptionerSpec()) -> Captioner:
    """The captioner ``spec`` describes (see ``CaptionerSpec``); every file checked before any image is read."""
    from sdstudio.models.tokenizer import ClipTokenizer

    blip = None
    if spec.blip is not None:
        from sdstudio.eval.blip import load_blip

        blip = load_blip(spec.blip)
    if spec.clip is None:
        from sdstudio.toyworld.clip_pair import caption_grammar, load_toy_clip

        model = load_toy_clip(spec.toy_model, spec.toy_pair)
        grammar = caption_grammar()
        builtin = bool(spec.builtin_phrases)
    else:
        from sdstudio.eval.features import load_clip_model

        model = load_clip_model(spec.clip)
        if not getattr(model, "has_text", False):
            raise SdStudioError(
                f"{spec.clip}: a vision-only CLIP file; captions need its text tower too (a whole CLIP file)"
            )
        grammar = None
        builtin = spec.builtin_phrases is not False
    lists = phrase_lists(spec.phrases, builtin=builtin) if spec.phrases or builtin else ()
    tokenizer = ClipTokenizer()
    return Captioner(model, grammar=grammar, lists=lists, blip=blip,
                     count_tokens=lambda text: len(tokenizer.encode(text)))  # fmt: skip


def _merge_tags(old: str, new: str) -> str:
    """``old`` followed by the comma-separated parts of ``new`` that ``old`` lacks (compared case-blind)."""
    have = {t.strip().lower() for t in old.split(",")}
    extra = [t.strip() for t in new.split(",") if t.strip() and t.strip().lower() not in have]
    return ", ".join([old.strip().rstrip(","), *extra]) if old.strip() else new


def caption_folder(
    request: CaptionFolderRequest,
    captioner: Captioner,
    progress: Callable[[int, int], None] | None = None,
) -> CaptionFolderResult:
    """Caption the images directly in ``request.folder`` (sorted by name); ``progress(done, total)``."""
    folder = Path(request.folder)
    if not folder.is_dir():
        raise SdStudioError(f"{folder}: no such folder")
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))  # fmt: skip
    if not images:
        raise SdStudioError(f"{folder}: no images to caption ({', '.join(IMAGE_EXTENSIONS)})")
    written: list[str] = []
    kept: list[str] = []
    unreadable: list[str] = []
    todo: list[Path] = []
    for path in images:
        if path.with_suffix(request.extension).exists() and not (request.overwrite or request.append_tags):
            kept.append(path.name)
        else:
            todo.append(path)
    done = len(kept)
    if progress:
        progress(done, len(images))
    for i in range(0, len(todo), request.batch_size):
        batch: list[tuple[Path, np.ndarray]] = []
        for path in todo[i : i + request.batch_size]:
            image = read_image(path)
            if image is None:
                unreadable.append(path.name)
            else:
                batch.append((path, image))
        captions = captioner.caption([im for _, im in batch], request.mode) if batch else []
        for (path, _), caption in zip(batch, captions, strict=True):
            target = path.with_suffix(request.extension)
            existing = None
            if request.append_tags and target.exists():
                existing = target.read_text(encoding="utf-8", errors="replace").strip()
            write_text_atomic(target, request.edit(caption.text, existing) + "\n")
            written.append(target.name)
        done += len(todo[i : i + request.batch_size])
        if progress:
            progress(done, len(images))
    return CaptionFolderResult(tuple(written), tuple(kept), tuple(unreadable))
