"""CLIP's byte-level BPE tokenizer (the 49,408-token vocabulary of SD 1.x and SD 2.x).

The BPE merges run in ``instant_clip_tokenizer`` (Rust, vocabulary built in). Everything around them
follows OpenAI CLIP's ``SimpleTokenizer``, which that package does not fully reproduce:

* the text is cleaned first: ``ftfy.fix_text``, ``html.unescape`` twice (``&amp;amp;`` -> ``&``),
  whitespace runs collapsed to one space, lowercased;
* the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` encode to BOS / EOS, while
  ``<start_of_text>`` (special to instant-clip-tokenizer) is ordinary text;
* the text is split into words here with CLIP's pattern
  ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
  (matched case-insensitively after lowercasing), and each word is handed to the BPE alone.

Known differences from the reference, all outside real prompts: characters newer than the Unicode
version of Python's ``unicodedata`` are classified by its tables, not by the ``regex`` module's; and an
apostrophe followed by a long s (``'ſ``), one word to the case-insensitive reference, is two here.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Iterable, Iterator

import ftfy
import instant_clip_tokenizer

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
CHUNK = 75  # prompt tokens per 77-token window, between BOS and EOS
VOCAB_SIZE = 49408

_SPECIALS = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# U+0345 (combining ypogegrammeni) case-folds to a letter, so under IGNORECASE neither CLIP's letter
# class nor its "other" class matches it: the reference drops it like whitespace.
_DROPPED = "\u0345"


def clean(text: str) -> str:
    """CLIP's normalisation of a text before splitting: ftfy, html entities, whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' separator, 'P' anything else, as CLIP's pattern classes them."""
    if ch.isspace() or ch == _DROPPED:
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "P"


def split_words(text: str) -> Iterator[str]:
    """The matches of CLIP's word pattern in cleaned ``text``, leftmost-first as the regex finds them."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<":
            special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
            if special is not None:
                yield special
                i += len(special)
                continue
        if ch == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if contraction is not None:
                yield contraction
                i += len(contraction)
                continue
        kind = _kind(ch)
        if kind == " ":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # numbers are single characters; letters and the rest are runs
            while j < n and _kind(text[j]) == kind:
                j += 1
        yield text[i:j]
        i = j


class ClipTokenizer:
    """Text to CLIP token ids and back; ids exclude BOS/EOS, which the conditioning adds per chunk."""

    BOS = BOS
    EOS = EOS
    CHUNK = CHUNK
    vocab_size = VOCAB_SIZE

    def __init__(self) -> None:
        self._bpe = instant_clip_tokenizer.Tokenizer()  # ~40 ms: build once, share freely (read-only)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for word in split_words(clean(text)):
            special = _SPECIALS.get(word)
            if special is not None:
                ids.append(special)
            else:
                # One word of CLIP's pattern is one match of instant's identical pattern, so it is BPE'd whole.
                ids.extend(self._bpe.encode(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text of ``ids``; each word ends in a space, as CLIP's ``</w>`` marks it."""
        names = {v: k for k, v in _SPECIALS.items()}
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if not 0 <= token < VOCAB_SIZE:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {VOCAB_SIZE})")
            if token in names:
                if run:
                    parts.append(self._bpe.decode(run))
                    run = []
                parts.append(names[token])
            else:
                run.append(token)
        if run:
            parts.append(self._bpe.decode(run))
        return "".join(parts)

    def token_for(self, word: str) -> int | None:
        """The id of ``word`` if it encodes to exactly one token (e.g. an initializer for an embedding)."""
        ids = self.encode(word)
        return ids[0] if len(ids) == 1 else None

    def count(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (what a UI shows as "n/75")."""
        return len(self.encode(text))
