"""AUTOMATIC1111 webui prompt syntax: schedules, alternation, attention weights, AND, extra networks.

A prompt pasted from AUTOMATIC1111 (A1111) must mean exactly the same thing here, quirks included,
so every function below reproduces the observable results of the corresponding A1111 function
(``modules/prompt_parser.py`` and ``modules/extra_networks.py``, webui 1.6 - 1.10):

* :func:`extract_extra_networks` - ``extra_networks.parse_prompt``: ``<lora:name:0.8>`` tags are cut
  out of the prompt before anything else is parsed.
* :func:`split_and` - ``get_multicond_prompt_list``: ``a AND b :1.2`` composable sub-prompts.
* :func:`schedules` - ``get_learned_conditioning_prompt_schedules``: prompt editing
  ``[from:to:when]`` and alternation ``[a|b]``. A1111 uses a lark grammar; this is a hand-written
  single-pass parser for the same language. Where the grammar does not parse, A1111 uses the whole
  prompt as literal text, and so does this.
* :func:`parse_prompt_attention` - ``(x)``, ``[x]``, ``(x:1.3)``, escapes and ``BREAK``; A1111 applies
  it to each scheduled text when it tokenizes.

:func:`parse` runs them in A1111's order and returns one frozen :class:`ParsedPrompt`;
:func:`to_json_dict` is the JSON contract other tools read.

Where A1111 itself raises (an attention weight such as ``(x:1.2.3)``, an editing step that overflows
to infinity) there is no behaviour to copy; this module never raises and documents its choice there.
A1111's lark grammar is ambiguous when a valid ``[from:to:when]`` or ``[a|b]`` at the top level is
directly followed by a stray bracket or colon (``[a:b:3]:``): lark then picks the literal or the
edited reading depending on the process's string-hash seed. This module always takes the edited
reading, which is what every unambiguous case does.

Steps: ``steps`` is the sampler's total step count as A1111 passes it (``firstpass_steps``). For the
hires-fix second pass A1111 calls the same function with ``hires_steps`` (the second pass's total
steps): integer ``when`` values then count from the end of the first pass (``when - steps``), and
fractional ones (those with a ``.``) span both passes (``(when - 1.0) * hires_steps``), so ``0.5``
switches within the first pass only and ``1.5`` half-way through the second.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "ExtraNetworkTag",
    "ParsedPrompt",
    "ScheduleEntry",
    "ScheduledPrompt",
    "SubPrompt",
    "extract_extra_networks",
    "parse",
    "parse_prompt_attention",
    "schedules",
    "split_and",
    "to_json_dict",
]


# ---------------------------------------------------------------------------------------------
# Public result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledPrompt:
    """The text used for every sampling step up to and including ``end_at_step``."""

    end_at_step: int
    text: str


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<kind:arg1:arg2:...>`` tag; ``args`` are the raw strings split on ``:``."""

    kind: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class ScheduleEntry:
    """A :class:`ScheduledPrompt` with its text split into ``(fragment, attention weight)`` runs."""

    end_at_step: int
    text: str
    attention: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class SubPrompt:
    """One composable (``AND``) part of a prompt: its text, its weight and its schedule."""

    text: str
    weight: float
    schedule: tuple[ScheduleEntry, ...]


@dataclass(frozen=True)
class ParsedPrompt:
    """Everything the conditioning stage needs from a prompt string.

    ``hires`` is the same prompt scheduled for the hires-fix second pass (its own step count), or
    ``None`` when no second pass was asked for; its own ``hires`` is always ``None``.
    """

    prompt_after_extra_networks: str
    extra_networks: tuple[ExtraNetworkTag, ...]
    subprompts: tuple[SubPrompt, ...]
    hires: ParsedPrompt | None = None


# ---------------------------------------------------------------------------------------------
# Extra networks: <kind:args>
# ---------------------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Cut ``<kind:arg:...>`` tags out of ``prompt``; returns the rest and the tags in prompt order.

    The text around a tag is left exactly as it was (no whitespace or comma clean-up), as in A1111.
    A1111 groups the tags by kind in a dict; grouping this list by ``kind`` gives the same thing.
    """
    tags: list[ExtraNetworkTag] = []

    def cut(match: re.Match[str]) -> str:
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), tags


# ---------------------------------------------------------------------------------------------
# Composable prompts: AND
# ---------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
# A trailing ":weight"; the text keeps everything before the whitespace that precedes the colon.
_AND_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")
_TRAILING_SPACE = re.compile(r"\s*\Z")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word ``AND``; each part may end in ``:weight`` (default 1.0).

    Trailing whitespace is dropped from each part, leading whitespace is kept, and a weight is only
    recognised at the very end of a part (``(a:1.2)`` is attention syntax, not a part weight).
    """
    parts: list[tuple[str, float]] = []
    for part in _AND.split(prompt):
        match = _AND_WEIGHT.search(part)
        if match is not None:
            parts.append((part[: match.start()], float(match.group(1))))
        else:
            parts.append((part[: _TRAILING_SPACE.search(part).start()], 1.0))  # type: ignore[union-attr]
    return parts


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: [from:to:when], [a|b]
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``; ``when`` is the number's text."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when: str


@dataclass(frozen=True)
class _Alternation:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` is used at each step."""

    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Edit | _Alternation

# lark's common.SIGNED_NUMBER as the dynamic Earley lexer matches it: one regex match, first
# alternative that succeeds (not the longest), ASCII digits only.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
_ONLY_SPACE = re.compile(r"\s*\Z")


class _Frame:
    """An open ``(`` or ``[`` whose group is still being read (parser-internal, mutable)."""

    __slots__ = ("last_segment_start", "opener", "segments", "separators")

    def __init__(self, opener: str, position: int) -> None:
        self.opener = opener
        self.segments: list[list[_Node]] = [[]]
        self.separators: list[str] = []
        self.last_segment_start = position + 1


def _when_token(text: str) -> str | None:
    """The NUMBER token of ``[...:when]`` if ``text`` (between the last ``:`` and ``]``) is one."""
    position = _SPACE.match(text).end()  # type: ignore[union-attr]
    number = _NUMBER.match(text, position)
    if number is None or _ONLY_SPACE.match(text, number.end()) is None:
        return None
    return number.group(0)


def _close_square(frame: _Frame, prompt: str, close: int) -> list[_Node] | None:
    """The nodes of the ``[...]`` group ending at ``close``, or None where it is no valid group."""
    if not frame.separators:
        return ["[", *frame.segments[0], "]"]
    if frame.separators[0] == "|":  # separators are never mixed: a mix invalidates the frame early
        return [_Alternation(tuple(tuple(segment) for segment in frame.segments))]
    when = _when_token(prompt[frame.last_segment_start : close])
    if when is None:
        return None
    before = tuple(frame.segments[0]) if len(frame.segments) == 3 else None
    return [_Edit(before, tuple(frame.segments[-2]), when)]


def _parse_schedule_tree(prompt: str) -> tuple[_Node, ...] | None:
    """Parse the editing/alternation grammar; None where A1111's grammar rejects the prompt.

    The grammar: at the top level, text, groups, and stray ``[ ] ( ) :`` characters; inside a group
    only text and well-formed groups: ``(p)``, ``(p:p)``, ``[p]``, ``[p:N]``, ``[p:p:N]``,
    ``[p|p?|...]``. A ``|`` outside an alternation, a ``\\`` at the end or before a newline make the
    whole prompt fail. A group that cannot close validly poisons every group that contains it, so
    one left-to-right pass with a stack decides every group; poisoned groups turn back into
    top-level text with their openers and colons as stray characters. Iterative, so nesting depth
    is unbounded.
    """
    top: list[_Node] = []
    stack: list[_Frame] = []

    def sink() -> list[_Node]:
        return stack[-1].segments[-1] if stack else top

    def poison_open_groups() -> bool:
        """Turn every open group back into top-level text; False if a ``|`` lands at the top."""
        for frame in stack:
            top.append(frame.opener)
            for index, segment in enumerate(frame.segments):
                top.extend(segment)
                if index < len(frame.separators):
                    if frame.separators[index] == "|":
                        return False
                    top.append(":")
        stack.clear()
        return True

    length = len(prompt)
    i = 0
    while i < length:
        char = prompt[i]
        if char == "\\":
            if i + 1 < length and prompt[i + 1] != "\n":
                sink().append(prompt[i : i + 2])
                i += 2
                continue
            return None
        if char in "([":
            stack.append(_Frame(char, i))
        elif char == ")":
            if stack and stack[-1].opener == "(":
                frame = stack.pop()
                nodes: list[_Node] = ["(", *frame.segments[0]]
                if frame.separators:
                    nodes += [":", *frame.segments[1]]
                nodes.append(")")
                sink().extend(nodes)
            else:
                if not poison_open_groups():
                    return None
                top.append(char)
        elif char == "]":
            closed = _close_square(stack[-1], prompt, i) if stack and stack[-1].opener == "[" else None
            if closed is not None:
                stack.pop()
                sink().extend(closed)
            else:
                if not poison_open_groups():
                    return None
                top.append(char)
        elif char == ":":
            frame_or_none = stack[-1] if stack else None
            if frame_or_none is None:
                top.append(char)
            elif (frame_or_none.opener == "(" and frame_or_none.separators) or (
                frame_or_none.opener == "["
                and ("|" in frame_or_none.separators or len(frame_or_none.separators) == 2)
            ):
                if not poison_open_groups():
                    return None
                top.append(char)
            else:
                frame_or_none.separators.append(char)
                frame_or_none.segments.append([])
                frame_or_none.last_segment_start = i + 1
        elif char == "|":
            if not stack or stack[-1].opener == "(" or ":" in stack[-1].separators:
                return None  # the poisoned groups would leave this "|" at the top level
            stack[-1].separators.append(char)
            stack[-1].segments.append([])
        else:
            sink().append(char)
        i += 1
    if not poison_open_groups():
        return None
    return tuple(top)


def _resolve_when(token: str, steps: int, int_offset: int, float_offset: float) -> int:
    """A1111's step for ``when``: a number with a ``.`` is a fraction of ``steps``, else a step."""
    value = float(token)
    value = (value - float_offset) * steps if "." in token else value - int_offset
    if math.isnan(value):  # inf * 0 steps; A1111 raises here
        value = 0.0
    # A1111 raises OverflowError on int(inf); clamping keeps the evident meaning.
    value = max(-sys.float_info.max, min(sys.float_info.max, value))
    return min(steps, int(value))


def _walk(nodes: tuple[_Node, ...]) -> list[_Node]:
    """Every node, including those in inactive branches (A1111's visitor sees them all)."""
    found: list[_Node] = []
    pending: list[tuple[_Node, ...]] = [nodes]
    while pending:
        for node in pending.pop():
            found.append(node)
            if isinstance(node, _Edit):
                pending.append(node.after)
                if node.before is not None:
                    pending.append(node.before)
            elif isinstance(node, _Alternation):
                pending.extend(node.options)
    return found


def _render(nodes: tuple[_Node, ...], step: int, when: dict[int, int]) -> str:
    """The prompt text in effect at ``step``; ``when`` maps ``id(edit)`` to its resolved step."""
    out: list[str] = []
    pending = [iter(nodes)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
        elif isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or ()) if step <= when[id(node)] else node.after
            pending.append(iter(chosen))
        else:
            pending.append(iter(node.options[(step - 1) % len(node.options)]))
    return "".join(out)


def schedules(prompt: str, steps: int, hires_steps: int | None = None) -> list[ScheduledPrompt]:
    """The texts ``prompt`` switches between, as A1111's ``get_learned_conditioning_prompt_schedules``.

    ``when`` < 1 written with a ``.`` is a fraction of the steps (truncated with ``int``), otherwise a
    step number; results are capped at ``steps`` and values below 1 never switch. Alternation adds
    every step. With ``hires_steps`` the schedule is the hires-fix second pass's (see module doc).
    Text that is not valid editing syntax stays literal; an unparsable prompt is one literal entry.
    """
    if hires_steps is None:
        int_offset, float_offset, total = 0, 0.0, steps
    else:
        int_offset, float_offset, total = steps, 1.0, hires_steps
    tree = _parse_schedule_tree(prompt)
    if tree is None:
        logger.debug("prompt editing syntax does not parse; using the prompt literally: %r", prompt)
        return [ScheduledPrompt(total, prompt)]
    boundaries = {total}
    when: dict[int, int] = {}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when[id(node)] = step = _resolve_when(node.when, total, int_offset, float_offset)
            if step >= 1:
                boundaries.add(step)
        elif isinstance(node, _Alternation):
            boundaries.update(range(1, total + 1))
    return [ScheduledPrompt(step, _render(tree, step, when)) for step in sorted(boundaries)]


# ---------------------------------------------------------------------------------------------
# Attention: (x) (x:1.3) [x] \( BREAK
# ---------------------------------------------------------------------------------------------

# Tried in this order at each position; together they cover every character.
_ATTENTION_TOKEN = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]|\\)         # \( \) \[ \] \\ give the character; a lone \ gives nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # closes a round bracket with an explicit weight
    | (?P<close>[)\]])
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by 1/1.1; dividing by 1.1 differs in the last bit


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` runs exactly as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w``; multipliers are applied in the
    order brackets close, then unclosed ``(`` (outermost first), then unclosed ``[``, so the floats
    match A1111 bit for bit. Unmatched closers are text. ``BREAK`` becomes ``("BREAK", -1.0)`` (and
    inside brackets gets multiplied like any fragment, as in A1111). Adjacent runs with equal
    weights merge; an empty prompt gives ``[("", 1.0)]``.

    A1111 raises ValueError on a weight that is not a float (``(x:1.2.3)``); here the colon and the
    number are kept as text and the ``)`` closes the bracket with the usual 1.1.
    """
    fragments: list[list] = []  # [text, weight] pairs, mutated in place like A1111's
    round_opens: list[int] = []
    square_opens: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    def add_text(chunk: str) -> None:
        for index, part in enumerate(_BREAK.split(chunk)):
            if index > 0:
                fragments.append(["BREAK", -1.0])
            fragments.append([part, 1.0])

    for token in _ATTENTION_TOKEN.finditer(text):
        chunk = token.group(0)
        weight_text = token.group("weight")
        if token.group("escape") is not None:
            fragments.append([chunk[1:], 1.0])
        elif token.group("open") is not None:
            (round_opens if chunk == "(" else square_opens).append(len(fragments))
        elif weight_text is not None and round_opens:
            try:
                weight = float(weight_text)
            except ValueError:
                logger.debug("attention weight %r is not a number; kept as text", weight_text)
                add_text(chunk[:-1])
                multiply_from(round_opens.pop(), _ROUND_MULTIPLIER)
            else:
                multiply_from(round_opens.pop(), weight)
        elif chunk == ")" and round_opens:
            multiply_from(round_opens.pop(), _ROUND_MULTIPLIER)
        elif chunk == "]" and square_opens:
            multiply_from(square_opens.pop(), _SQUARE_MULTIPLIER)
        else:
            add_text(chunk)

    for start in round_opens:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in square_opens:
        multiply_from(start, _SQUARE_MULTIPLIER)

    if not fragments:
        return [("", 1.0)]
    merged: list[tuple[str, float]] = []
    for fragment_text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment_text, merged[-1][1])
        else:
            merged.append((fragment_text, float(weight)))
    return merged


# ---------------------------------------------------------------------------------------------
# The entry point and its JSON contract
# ---------------------------------------------------------------------------------------------


def _subprompts(parts: list[tuple[str, float]], steps: int, hires_steps: int | None) -> tuple[SubPrompt, ...]:
    return tuple(
        SubPrompt(
            text,
            weight,
            tuple(
                ScheduleEntry(entry.end_at_step, entry.text, tuple(parse_prompt_attention(entry.text)))
                for entry in schedules(text, steps, hires_steps)
            ),
        )
        for text, weight in parts
    )


def parse(
    prompt: str, steps: int, hires_steps: int | None = None, *, composable: bool = True
) -> ParsedPrompt:
    """Parse an A1111 prompt for ``steps`` sampling steps (and a hires-fix pass of ``hires_steps``).

    Order as in A1111: extra-network tags are cut out first, then the rest is split on ``AND``
    (``composable=False`` skips that, as A1111 does for negative prompts), then each part is
    scheduled and each scheduled text split into attention runs. Never raises on any string.
    """
    rest, tags = extract_extra_networks(prompt)
    parts = split_and(rest) if composable else [(rest, 1.0)]
    hires = None
    if hires_steps is not None:
        hires = ParsedPrompt(rest, tuple(tags), _subprompts(parts, steps, hires_steps))
    return ParsedPrompt(rest, tuple(tags), _subprompts(parts, steps, None), hires)


def to_json_dict(parsed: ParsedPrompt) -> dict:
    """The JSON contract: serialise ``parsed`` (or ``parsed.hires``) to plain lists and dicts.

    ``{"prompt_after_extra_networks": str, "extra_networks": [[kind, [arg, ...]], ...],
    "subprompts": [{"text": str, "weight": float, "schedule": [{"end_at_step": int, "text": str,
    "attention": [[fragment, weight], ...]}, ...]}, ...]}``
    """
    return {
        "prompt_after_extra_networks": parsed.prompt_after_extra_networks,
        "extra_networks": [[tag.kind, list(tag.args)] for tag in parsed.extra_networks],
        "subprompts": [
            {
                "text": sub.text,
                "weight": sub.weight,
                "schedule": [
                    {
                        "end_at_step": entry.end_at_step,
                        "text": entry.text,
                        "attention": [[fragment, weight] for fragment, weight in entry.attention],
                    }
                    for entry in sub.schedule
                ],
            }
            for sub in parsed.subprompts
        ],
    }
