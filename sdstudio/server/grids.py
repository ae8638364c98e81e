"""X/Y/Z plots over the job API: a payload and up to three axes (A1111's types and value syntax, read by
:mod:`sdstudio.eval.grid`) -> one payload per cell, each then an ordinary job of the queue."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sdstudio.errors import SdStudioError
from sdstudio.eval.grid import AXIS_TYPES, Axis, parse_values, split_values

MAX_GRID_CELLS = 100  # a grid from the server is that many jobs at most
# axis type -> the payload field it sets ("override_settings.X": a setting)
PAYLOAD_FIELDS: dict[str, str] = {
    "Seed": "seed", "Var. seed": "subseed", "Var. strength": "subseed_strength", "Steps": "steps",
    "Hires steps": "hr_second_pass_steps", "CFG Scale": "cfg_scale", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "Eta": "eta", "Denoising": "denoising_strength",
    "Clip skip": "override_settings.CLIP_stop_at_last_layers",
    "Checkpoint name": "override_settings.sd_model_checkpoint", "VAE": "override_settings.sd_vae",
}  # fmt: skip
AXIS_NAMES = ("Nothing", *PAYLOAD_FIELDS, "Prompt S/R")
# the server's models are named by title, not by file: these axes take the names as they are
_NAMED_AXES = ("Checkpoint name", "VAE")


@dataclass(frozen=True)
class GridCell:
    ix: int
    iy: int
    iz: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class GridJobs:
    cells: tuple[GridCell, ...]  # z, then y, then x: the order the queue runs them
    x_labels: tuple[str, ...]
    y_labels: tuple[str, ...]
    z_labels: tuple[str, ...]
    axes: dict[str, str]  # A1111's "X Type", "X Values", ...


def parse_grid_axis(name: str, text: Any, letter: str) -> Axis:
    """One axis of the request (``x_type`` / ``x_values``); errors name the axis."""
    if name in (None, "", "Nothing"):
        return parse_values("Nothing", "")
    if name not in AXIS_NAMES:
        raise SdStudioError(f"{letter} axis: unknown type {name!r}; known: {', '.join(AXIS_NAMES)}")
    if not isinstance(text, str) or not text.strip():
        raise SdStudioError(f"{letter} axis ({name}): give its values, such as 1-5 or a, b, c")
    try:
        if name in _NAMED_AXES:
            values = tuple(v.strip() for v in split_values(text))
            if not all(values):
                raise SdStudioError("empty value")
            return Axis(AXIS_TYPES[name], values, text)
        return parse_values(name, text)
    except SdStudioError as e:
        raise SdStudioError(f"{letter} axis: {e}") from None


def _set(payload: dict[str, Any], field: str, value: Any) -> None:
    if field.startswith("override_settings."):
        overrides = dict(payload.get("override_settings") or {})
        overrides[field.split(".", 1)[1]] = value
        payload["override_settings"] = overrides
    else:
        payload[field] = value


def grid_jobs(
    kind: str, payload: dict[str, Any], axes: dict[str, tuple[Any, Any]], rng: random.Random | None = None
) -> GridJobs:
    """The cell payloads of a grid: ``axes`` maps "x" / "y" / "z" to (type, values text). A seed of -1 (the
    payload's, or a Seed axis value) is drawn once, so cells differ only by their axes, as in A1111."""
    rng = rng or random.Random()
    parsed = {letter: parse_grid_axis(*axes.get(letter, ("Nothing", "")), letter.upper()) for letter in "xyz"}
    base = dict(payload)
    if int(base.get("seed", -1) if base.get("seed") is not None else -1) == -1:
        base["seed"] = rng.randrange(2**32)
    for letter, axis in parsed.items():
        label = axis.type.label
        if label == "Prompt S/R":
            first = str(axis.values[0])
            if first not in str(base.get("prompt", "")) and first not in str(base.get("negative_prompt", "")):
                raise SdStudioError(f"{letter.upper()} axis (Prompt S/R): {first!r} is not in the prompt")
        if label == "Hires steps" and not (kind == "txt2img" and base.get("enable_hr")):
            raise SdStudioError(f"{letter.upper()} axis (Hires steps): turn the hires fix on")
        if label == "Denoising" and kind == "txt2img" and not base.get("enable_hr"):
            raise SdStudioError(f"{letter.upper()} axis (Denoising): for img2img or with the hires fix on")
        if label in ("Seed", "Var. seed"):
            parsed[letter] = Axis(axis.type, tuple(rng.randrange(2**32) if v == -1 else v for v in axis.values),
                                  axis.text)  # fmt: skip
    x, y, z = parsed["x"], parsed["y"], parsed["z"]
    count = len(x.values) * len(y.values) * len(z.values)
    if count > MAX_GRID_CELLS:
        raise SdStudioError(f"the grid has {count} cells, over the server's limit of {MAX_GRID_CELLS}")

    def apply(cell: dict[str, Any], axis: Axis, value: Any) -> None:
        label = axis.type.label
        if label == "Nothing":
            return
        if label == "Prompt S/R":
            first = str(axis.values[0])
            for field in ("prompt", "negative_prompt"):
                cell[field] = str(cell.get(field) or "").replace(first, str(value))
            return
        _set(cell, PAYLOAD_FIELDS[label], value)

    cells = []
    for iz, vz in enumerate(z.values):
        for iy, vy in enumerate(y.values):
            for ix, vx in enumerate(x.values):
                cell = dict(base)
                for axis, value in ((z, vz), (y, vy), (x, vx)):
                    apply(cell, axis, value)
                cells.append(GridCell(ix, iy, iz, cell))
    names = {f"{a.upper()} Type": parsed[a].type.label for a in "xyz" if not parsed[a].is_nothing}
    names.update({f"{a.upper()} Values": parsed[a].text for a in "xyz" if not parsed[a].is_nothing})

    def labels(axis: Axis) -> tuple[str, ...]:
        return tuple(axis.label(v) for v in axis.values)

    return GridJobs(tuple(cells), labels(x), labels(y), labels(z), names)
