"""AUTOMATIC1111's "infotext": the generation parameters as text, stored in a PNG's ``parameters`` chunk.

Format::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: name

Values containing ``,``, ``:`` or ``"`` or a newline are written as JSON strings, as that tool does.
"""

from __future__ import annotations

import json
import re

from sdstudio.types import Outpaint

_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: object) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5" (AUTOMATIC1111 writes CFG scale this way)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def format_infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    """``params`` in the order they should appear; ``None`` values are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params as strings): the inverse of ``format_infotext``."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: the whole text is the prompt
        lines.append(last)
        last = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), params


SIDES = ("left", "right", "up", "down")


def format_outpaint(outpaint: Outpaint) -> str:
    """``Outpaint(left=64, up=32)`` -> ``"left:64,up:32"`` (sdstudio's own key; A1111 records none)."""
    return ",".join(f"{side}:{getattr(outpaint, side)}" for side in SIDES if getattr(outpaint, side))


def parse_outpaint(text: str) -> Outpaint:
    """``"left,right:64"``, ``"left:64,up:32"`` or ``"up,down:16,left:8"``: each ``:PIXELS`` applies to
    the sides named since the previous one. Raises ``ValueError`` naming the problem."""
    pixels: dict[str, int] = {}
    pending: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        side, _, amount = part.partition(":")
        side = side.strip().lower()
        if side not in SIDES:
            raise ValueError(f"outpaint side {side!r} is not one of {', '.join(SIDES)} (format: left,right:64)")
        pending.append(side)
        if amount:
            try:
                value = int(amount)
            except ValueError:
                raise ValueError(f"outpaint pixels {amount!r} are not a whole number (format: left,right:64)") from None
            if value < 0:
                raise ValueError(f"outpaint pixels must be >= 0 (got {value})")
            pixels.update(dict.fromkeys(pending, value))
            pending = []
    if pending:
        raise ValueError(f"outpaint {text!r} gives no pixel count for {', '.join(pending)} (format: left,right:64)")
    return Outpaint(**pixels)
