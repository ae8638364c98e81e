"""Warnings for a request outside what its model was trained on (``ModelConfig.trained_on``).

A model trained on a closed language at one size, like the embedded toy model, gives an empty or random
image for a word it never saw ("a pink hexagon") and repeated objects at another size (``--width 128``,
the hires fix), without any error. What it was trained on comes from its config (the checkpoint's
header), never from the toy world itself, so any model file can carry it; a model that does not state
it gets no warnings.

The words checked are exactly those the text encoder gets: the parsed prompt's attention fragments at
every scheduled step of both passes, so ``(word:1.2)``, ``[a:b:5]``, ``[a|b]``, ``AND``, ``BREAK`` and
``<lora:...>`` tags are syntax, not words. Case and punctuation do not count: the tokenizer lower-cases
and the model's captions may use punctuation freely. Names of loaded textual inversion embeddings are
left out (their vectors replace the name's tokens).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

from sdstudio.models.configs import WORD, ModelConfig, TrainedOn
from sdstudio.prompt.parser import ParsedPrompt

__all__ = ["prompt_words", "trained_on_warnings", "untrained_words"]

_HELP = "see `sdstudio generate --help` for its words"


def _texts(parsed: ParsedPrompt) -> Iterator[str]:
    """The text fragments the text encoder gets, in prompt order: every sub-prompt, every scheduled
    step, then the hires pass; ``BREAK`` markers (negative weight) left out."""
    for part in (parsed, parsed.hires):
        if part is None:
            continue
        for sub in part.subprompts:
            for entry in sub.schedule:
                for fragment, weight in entry.attention:
                    if not (fragment == "BREAK" and weight < 0):
                        yield fragment


def _names_pattern(names: Collection[str]) -> re.Pattern[str] | None:
    """Any of ``names`` as a whole word, any case, longest first (as the embeddings match)."""
    names = sorted((name for name in names if name), key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def prompt_words(parsed: ParsedPrompt, embedding_names: Collection[str] = ()) -> list[str]:
    """The lower-case words ``parsed`` gives the text encoder, each once, in the order the prompt writes
    them (not the order of the steps that use them: ``[orange|magenta] star, cat`` gives magenta
    before cat), ``embedding_names`` left out. A word is a run of letters and digits of any script ("4k",
    "café"); punctuation, spaces and ``_`` separate words."""
    names = _names_pattern(embedding_names)
    words: dict[str, None] = {}
    for text in dict.fromkeys(_texts(parsed)):  # an alternation repeats its texts at every step
        text = names.sub(" ", text) if names is not None else text
        words.update(dict.fromkeys(WORD.findall(text.lower())))
    written: dict[str, int] = {}
    for word in WORD.findall(parsed.prompt_after_extra_networks.lower()):
        written.setdefault(word, len(written))
    # sorted() is stable: words the text does not spell as such ("x[a|b]" gives "xa", "xb") come last,
    # in the order of the steps that use them.
    return sorted(words, key=lambda w: written.get(w, len(written)))


def untrained_words(
    trained_on: TrainedOn, parsed: ParsedPrompt, embedding_names: Collection[str] = ()
) -> list[str]:
    """Words of ``parsed`` outside ``trained_on.vocabulary`` in order, each once; none when the
    vocabulary is not stated."""
    if not trained_on.vocabulary:
        return []
    vocabulary = frozenset(trained_on.vocabulary)
    return [w for w in prompt_words(parsed, embedding_names) if w not in vocabulary]


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def trained_on_warnings(
    config: ModelConfig,
    prompt: ParsedPrompt,
    negative: ParsedPrompt,
    size: tuple[int, int],
    hires_size: tuple[int, int] | None = None,
    embedding_names: Collection[str] = (),
) -> list[str]:
    """What a request asks of ``config``'s model that it was not trained on: unknown words of the prompt,
    unknown words of the negative prompt, a first pass at ``size`` (width, height) or a hires-fix pass at
    ``hires_size`` outside its training sizes. Empty when the model states nothing.

    ``prompt`` and ``negative`` are parsed for the request's steps (and hires steps), as generation
    parses them: which words of ``[a:b:N]`` are ever used depends on the step count. The negative prompt
    is checked too, in a warning of its own: it takes the place of the empty prompt the model learned
    as "no caption", and guidance pushes each step away from it, so words it never saw there push the
    image in an arbitrary direction.
    """
    trained = config.trained_on
    warnings = []
    for parsed, where in ((prompt, ""), (negative, " in the negative prompt")):
        unknown = untrained_words(trained, parsed, embedding_names)
        if unknown:
            warnings.append(
                f"the model was trained on a fixed vocabulary; unknown words{where}: {', '.join(unknown)} ({_HELP})"
            )
    if trained.sizes:
        sizes = ", ".join(_size(s) for s in trained.sizes)
        if tuple(size) not in trained.sizes:
            warnings.append(
                f"the model was trained at {sizes} only; at {_size(size)} it may repeat or break objects"
            )
        if hires_size is not None and tuple(hires_size) not in trained.sizes:
            warnings.append(
                f"the model was trained at {sizes} only; the hires fix pass at {_size(hires_size)} may repeat "
                "or break objects"
            )
    return warnings
