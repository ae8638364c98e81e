"""The toyworld's language: the words of its captions, their synonyms and the vocabulary.

Kept apart from ``world.py`` (which draws and parses scenes with numpy) and importing nothing but the
standard library, so the command line can list the embedded model's words in ``--help`` at no cost.
Each phrase maps to one meaning; the first synonym of each list is the canonical word.
"""

from __future__ import annotations

import re

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "tangerine"),
    "white": ("white", "ivory"),
    "black": ("black", "ebony"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "gray": ("gray", "grey"),
    "beige": ("beige", "sand"),
    "teal": ("teal",),
    "sky": ("sky",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
# Position phrases as they follow a preposition ("in the" / "at the" / "on the").
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "top left corner", "upper left corner"),
    "top": ("top", "top side"),
    "top right": ("top right", "upper right", "top right corner", "upper right corner"),
    "left": ("left", "left side"),
    "centre": ("centre", "center", "middle"),
    "right": ("right", "right side"),
    "bottom left": ("bottom left", "lower left", "bottom left corner", "lower left corner"),
    "bottom": ("bottom", "bottom side"),
    "bottom right": ("bottom right", "lower right", "bottom right corner", "lower right corner"),
}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
FILLER_WORDS: frozenset[str] = frozenset(
    {"a", "an", "the", "there", "is", "in", "at", "on", "of", "with", "against", "background",
     "image", "picture", "one", "side", "corner"}
)  # fmt: skip
AND_WORDS: frozenset[str] = frozenset({"and"})

_GROUPS = (COLOUR_WORDS, BACKGROUND_WORDS, SHAPE_WORDS, SIZE_WORDS, POSITION_WORDS, RELATION_WORDS)

# Every word ``parse_caption`` understands.
VOCABULARY: frozenset[str] = (
    frozenset(
        w for group in _GROUPS for phrases in group.values() for phrase in phrases for w in phrase.split()
    )
    | FILLER_WORDS
    | AND_WORDS
)

# Fillers the parser accepts but no caption template writes ("a red circle with ..." is never a
# caption), so the embedded model's text encoder never trained their tokens.
UNCAPTIONED_WORDS: frozenset[str] = frozenset({"one", "with"})

# The words of the captions the embedded model was trained on: what its checkpoint header lists.
CAPTION_VOCABULARY: frozenset[str] = VOCABULARY - UNCAPTIONED_WORDS

# Prompts of the language, for help texts (each parses back with ``world.parse_caption``).
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a small crimson disc in the upper left corner on a teal background",
    "a large yellow star above a blue square",
    "there is a little white cross at the bottom right, sand background",
)


def tokenize(text: str) -> list[str]:
    """Lower-case words; punctuation and hyphens separate words and are dropped."""
    return re.findall(r"[a-z]+", text.lower())


def unknown_words(text: str) -> list[str]:
    """Words of ``text`` outside ``VOCABULARY``, in order, without repeats."""
    seen: dict[str, None] = {}
    for w in tokenize(text):
        if w not in VOCABULARY:
            seen.setdefault(w)
    return list(seen)


def _phrases(table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(phrase for phrases in table.values() for phrase in phrases)


def _words(phrases: tuple[str, ...]) -> list[str]:
    return [w for phrase in phrases for w in phrase.split()]


def word_groups() -> dict[str, tuple[str, ...]]:
    """The caption vocabulary grouped for people: colours, shapes, sizes, positions, relations,
    backgrounds, other words. Synonyms follow their canonical word; positions are the nine canonical
    places then the other words their phrases use; relations are phrases. Every word of
    ``CAPTION_VOCABULARY`` appears, and no other."""
    groups = {
        "colours": _phrases(COLOUR_WORDS),
        "shapes": _phrases(SHAPE_WORDS),
        "sizes": _phrases(SIZE_WORDS),
        "positions": tuple(POSITION_WORDS),
        "relations": _phrases(RELATION_WORDS),
        "backgrounds": _phrases(BACKGROUND_WORDS),
    }
    canonical_places = set(_words(groups["positions"]))
    more_places = [w for w in dict.fromkeys(_words(_phrases(POSITION_WORDS))) if w not in canonical_places]
    groups["positions"] += tuple(more_places)
    # The fillers not listed yet; "the" and "of", also part of relations, are listed again here.
    listed = {w for name, phrases in groups.items() if name != "relations" for w in _words(phrases)}
    groups["other"] = tuple(sorted((FILLER_WORDS | AND_WORDS) & CAPTION_VOCABULARY - listed))
    return groups


def describe_words() -> str:
    """``word_groups`` as text, one group a line ("colours: red, crimson, ..."), for ``--help``."""
    return "\n".join(f"{name}: {', '.join(words)}" for name, words in word_groups().items())
