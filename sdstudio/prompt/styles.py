"""AUTOMATIC1111's prompt styles (``modules/styles.py``): named prompt / negative prompt pairs kept in a
``styles.csv`` (columns ``name,prompt,negative_prompt``, quoted CSV) and merged into a request's prompts.

A style's text with a ``{prompt}`` placeholder has the prompt put in its place; one without is appended
after the prompt with ``", "`` (an empty prompt or style adds no separator). Styles apply in the order
given, each to the result of the one before, as A1111 applies them.
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdstudio.errors import SdStudioError

__all__ = ["PromptStyle", "apply_styles", "find_styles", "load_styles", "merge_prompt"]

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class PromptStyle:
    """One row of ``styles.csv``."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def load_styles(path: str | os.PathLike) -> dict[str, PromptStyle]:
    """The styles of a ``styles.csv`` by name, in file order.

    As A1111: UTF-8 with or without a byte-order mark, spaces after separators skipped, rows without a name
    or whose name starts with ``#`` left out, the old ``name,text`` layout read as ``name,prompt``; a later
    row of the same name replaces an earlier one."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or ()]
    except FileNotFoundError:
        raise SdStudioError(f"{path}: no such styles file (--styles)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SdStudioError(f"{path}: cannot read the styles file ({type(e).__name__}: {e})") from None
    if columns and "name" not in columns:
        raise SdStudioError(f"{path}: a styles file needs a 'name' column (name,prompt,negative_prompt)")
    styles: dict[str, PromptStyle] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name or name.startswith("#"):
            continue
        prompt = row.get("prompt") if "prompt" in row else row.get("text")
        styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    return styles


def find_styles(
    library: Mapping[str, PromptStyle], names: Iterable[str], source: str = ""
) -> tuple[PromptStyle, ...]:
    """The styles ``names`` asks for, in that order; an unknown name raises ``SdStudioError`` listing the
    closest names the library has (``source``: where the library came from, for the message)."""
    found = []
    for name in names:
        if name in library:
            found.append(library[name])
            continue
        folded = {n.casefold(): n for n in library}
        close = difflib.get_close_matches(name.casefold(), list(folded), n=3, cutoff=0.5)
        where = f" in {source}" if source else ""
        hint = f"; did you mean {', '.join(repr(folded[c]) for c in close)}?" if close else ""
        known = (
            f" (it has {len(library)}: {', '.join(list(library)[:10])}{', ...' if len(library) > 10 else ''})"
        )
        raise SdStudioError(f"unknown style {name!r}{where}{hint}{known if not close else ''}")
    return tuple(found)


def merge_prompt(style_text: str, prompt: str) -> str:
    """``style_text`` with ``prompt`` in place of ``{prompt}``, or ``prompt, style_text``."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative: str, styles: Sequence[PromptStyle]) -> tuple[str, str]:
    """(prompt, negative prompt) with each style merged in, in order."""
    for style in styles:
        prompt = merge_prompt(style.prompt, prompt)
        negative = merge_prompt(style.negative_prompt, negative)
    return prompt, negative
