"""AUTOMATIC1111's X/Y/Z plot (``scripts/xyz_grid.py``) and prompt matrix (``scripts/prompt_matrix.py``).

Data flow: axis texts (``"Steps=10-30 (+10)"``) -> :class:`Axis` (:func:`parse_axis`) -> :class:`GridSpec`
with the base request -> :class:`GridPlan` (:func:`plan_grid`, :func:`plan_prompt_matrix`: pure, the cells'
requests in generation order) -> :func:`check_plan` (every cell refused before any image is made) ->
:func:`generate_cells` (the ordinary :class:`sdstudio.engine.Pipeline`, one load per checkpoint / VAE) ->
:func:`draw_grid` and :func:`grid_infotext`.

Value syntax, as A1111: comma-separated CSV (``"a, b", c``); on integer axes ``1-5``, ``1-10 (+2)``,
``10-1 (-3)`` and ``1-10 [5]`` (5 values evenly spaced, truncated to integers); on float axes the same
with decimals. ``-1`` on a Seed or Var. seed axis is replaced by a random seed once (:func:`fix_seeds`),
so every cell of that row or column shares it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image, ImageDraw, ImageFont

from sdstudio.errors import SdStudioError
from sdstudio.io.infotext import quote
from sdstudio.prompt.styles import PromptStyle, apply_styles
from sdstudio.types import GenerationRequest

if TYPE_CHECKING:
    from sdstudio.models.loading import LoadedModel
    from sdstudio.pipelines.validate import Limits
    from sdstudio.types import GenerationResult

__all__ = [
    "AXIS_TYPES", "Axis", "AxisType", "Cell", "FileLookup", "GridPlan", "GridSpec", "LabelLine", "ModelFile",
    "apply_axis_value", "check_plan", "check_spec", "draw_grid", "fix_seeds", "generate_cells",
    "grid_infotext",
    "parse_axis", "parse_values", "plan_grid", "plan_prompt_matrix", "split_values",
]  # fmt: skip

log = logging.getLogger(__name__)

MAX_AXIS_VALUES = 1000  # a typo such as "1-100000" is refused instead of queueing days of work
MAX_CELLS = 10000
MAX_SEED = 4294967294  # A1111's random.randrange bound for a fixed "-1" seed
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
SCRIPT_XYZ = "X/Y/Z plot"
SCRIPT_MATRIX = "Prompt matrix"


@dataclass(frozen=True)
class AxisType:
    """An axis kind under A1111's name. ``cost``: how slow a change of its value is (a model load); the
    costliest axis is iterated outermost. ``prefixed``: labels read ``"Steps: 10"``, else the bare value."""

    label: str
    value_type: type  # int, float or str
    cost: float = 0.0
    prefixed: bool = True


AXIS_TYPES: dict[str, AxisType] = {
    t.label: t
    for t in (
        AxisType("Nothing", str, prefixed=False),
        AxisType("Seed", int),
        AxisType("Var. seed", int),
        AxisType("Var. strength", float),
        AxisType("Steps", int),
        AxisType("Hires steps", int),
        AxisType("CFG Scale", float),
        AxisType("Prompt S/R", str, prefixed=False),
        AxisType("Sampler", str, prefixed=False),
        AxisType("Checkpoint name", str, cost=1.0, prefixed=False),
        AxisType("Schedule type", str),
        AxisType("Eta", float),
        AxisType("Clip skip", int),
        AxisType("Denoising", float),
        AxisType("VAE", str, cost=0.7),
    )
}


@dataclass(frozen=True)
class ModelFile:
    """A Checkpoint name or VAE axis value: the name as written (the label) and the file it names; a VAE's
    ``path`` None is the checkpoint's own VAE."""

    name: str
    path: Path | None

    def __str__(self) -> str:
        return self.name


AxisValue = int | float | str | ModelFile


@dataclass(frozen=True)
class Axis:
    """One axis: its type, its values in order and the values text as given (A1111's ``X Values``)."""

    type: AxisType
    values: tuple[AxisValue, ...]
    text: str = ""

    @property
    def is_nothing(self) -> bool:
        return self.type.label == "Nothing"

    def label(self, value: AxisValue) -> str:
        """A1111's label of a value: ``"Steps: 10"``, ``"Euler a"``, a checkpoint's file name, or ``""``."""
        if self.is_nothing:
            return ""
        text = str(round(value, 8)) if isinstance(value, float) else str(value)
        if self.type.label == "Checkpoint name":
            text = Path(text).name
        return f"{self.type.label}: {text}" if self.type.prefixed else text


NOTHING = Axis(AXIS_TYPES["Nothing"], ("",))


@dataclass(frozen=True)
class FileLookup:
    """Where Checkpoint name and VAE values are looked up (``--models-dir``, ``--vae-dir``), besides paths."""

    checkpoint_dirs: tuple[Path, ...] = ()
    vae_dirs: tuple[Path, ...] = ()


def _axis_type(name: str) -> AxisType:
    folded = {label.casefold(): t for label, t in AXIS_TYPES.items()}
    key = " ".join(name.split()).casefold()
    if key not in folded:
        raise SdStudioError(f"unknown axis type {name.strip()!r}; choose one of: {', '.join(AXIS_TYPES)}")
    return folded[key]


def split_values(text: str) -> list[str]:
    """A1111's comma-separated values: CSV (``"a, b"`` keeps its comma), each value stripped."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as e:
        raise SdStudioError(f"cannot read the values {text!r} as comma-separated values ({e})") from None
    return [value.strip() for value in itertools.chain.from_iterable(rows)]


_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]?\d+)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*")
_FLOAT_STEP = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*({_FLOAT})\s*\))?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*\]\s*")


def _number(text: str, kind: type) -> int | float:
    return kind(text.replace(" ", ""))


def _check_count(text: str, count: int) -> None:
    if count < 1:
        raise SdStudioError(f"range {text!r} has no values")
    if count > MAX_AXIS_VALUES:
        raise SdStudioError(
            f"range {text!r} gives {count} values, over the limit of {MAX_AXIS_VALUES} per axis"
        )


def _expand_range(text: str, kind: type) -> list[int] | list[float] | None:
    """The values of a range (``1-5``, ``1-10 (+2)``, ``10-1 (-3)``, ``1-10 [5]``), or None if ``text`` is
    not one. Both ends are included when the step reaches them; a range without a step counts by 1 (down
    by 1 when it falls)."""
    step_re, count_re = (_INT_STEP, _INT_COUNT) if kind is int else (_FLOAT_STEP, _FLOAT_COUNT)
    if m := count_re.fullmatch(text):
        start, end, count = _number(m[1], kind), _number(m[2], kind), int(m[3])
        _check_count(text, count)
        if count == 1:
            return [start]  # type: ignore[list-item]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        # A1111 truncates numpy's linspace to integers
        return [int(v) for v in values] if kind is int else [round(v, 8) for v in values]  # type: ignore[return-value]
    if m := step_re.fullmatch(text):
        start, end = _number(m[1], kind), _number(m[2], kind)
        step = _number(m[3], kind) if m[3] is not None else (1 if end >= start else -1)
        if step == 0:
            raise SdStudioError(f"range {text!r} has a step of 0")
        if (end - start) * step < 0:
            raise SdStudioError(f"range {text!r}: a step of {step} never goes from {start} to {end}")
        count = math.floor((end - start) / step + 1e-9) + 1
        _check_count(text, count)
        if kind is int:
            return list(range(int(start), int(end) + (1 if step > 0 else -1), int(step)))
        return [round(start + i * step, 8) for i in range(count)]
    return None


def _resolve_file(text: str, dirs: Sequence[Path], suffixes: tuple[str, ...], what: str, flag: str) -> Path:
    """A file named by path, or by file name / stem / unique part of a name under ``dirs``."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    candidates = [
        p for d in dirs for p in sorted(d.rglob("*"))
        if (p.is_file() and p.suffix.lower() in suffixes) or (p / "model_index.json").is_file()
    ]  # fmt: skip
    key = text.casefold()
    exact = [p for p in candidates if key in (p.name.casefold(), p.stem.casefold())]
    for found in (exact, [] if exact else [p for p in candidates if key in p.name.casefold()]):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:8])
            raise SdStudioError(f"{what} {text!r} matches several files ({names}); give more of its name")
    where = f" in {', '.join(str(d) for d in dirs)}" if dirs else f" (no {flag} given to look it up in)"
    known = f"; there: {', '.join(p.name for p in candidates[:10])}" if candidates else ""
    raise SdStudioError(f"unknown {what} {text!r}: no such file{where}{known}")


def _convert(axis_type: AxisType, text: str, files: FileLookup) -> AxisValue:
    kind = axis_type.value_type
    if axis_type.label == "Checkpoint name":
        if not text:
            raise SdStudioError("empty checkpoint name")
        return ModelFile(
            text,
            _resolve_file(text, files.checkpoint_dirs, CHECKPOINT_SUFFIXES, "checkpoint", "--models-dir"),
        )
    if axis_type.label == "VAE":
        if text.casefold() in ("none", "automatic", "auto"):
            return ModelFile(text, None)
        return ModelFile(text, _resolve_file(text, files.vae_dirs, VAE_SUFFIXES, "VAE", "--vae-dir"))
    if kind is str:
        return text
    try:
        return _number(text, kind)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise SdStudioError(f"{text!r} is not {noun} or a range such as 1-10 (+2) or 1-10 [5]") from None


def parse_values(axis_type: AxisType | str, text: str, files: FileLookup = FileLookup()) -> Axis:
    """The axis of type ``axis_type`` with the values ``text`` gives; ``SdStudioError`` naming the axis and
    the value that cannot be read."""
    axis_type = _axis_type(axis_type) if isinstance(axis_type, str) else axis_type
    if axis_type.label == "Nothing":
        return Axis(axis_type, ("",), text)
    values: list[AxisValue] = []
    for item in split_values(text):
        try:
            if not item and axis_type.label != "Prompt S/R":
                raise SdStudioError("empty value (two commas in a row, or a comma at the end?)")
            expanded = (
                _expand_range(item, axis_type.value_type) if axis_type.value_type in (int, float) else None
            )
            values.extend(expanded if expanded is not None else [_convert(axis_type, item, files)])
        except SdStudioError as e:
            raise SdStudioError(f"{axis_type.label} axis value {item!r}: {e}") from None
    if not values:
        raise SdStudioError(f"{axis_type.label} axis has no values")
    if len(values) > MAX_AXIS_VALUES:
        raise SdStudioError(
            f"{axis_type.label} axis has {len(values)} values, over the limit of {MAX_AXIS_VALUES}"
        )
    return Axis(axis_type, tuple(values), text)


def parse_axis(spec: str, files: FileLookup = FileLookup()) -> Axis:
    """``"TYPE=VALUES"`` (``"Steps=10,20"``, ``"Sampler=Euler a, DDIM"``; ``"Nothing"`` alone) -> Axis."""
    name, sep, text = spec.partition("=")
    if not sep and _axis_type(name).label != "Nothing":
        raise SdStudioError(f"axis {spec!r} is not TYPE=VALUES, such as 'Steps=10,20,30'")
    return parse_values(name, text, files)


@dataclass(frozen=True)
class GridSpec:
    """What a grid asks for: the base request, three axes (:data:`NOTHING` where unused), the base
    checkpoint and VAE (None: the checkpoint's own) and the styles applied to every cell's prompts."""

    request: GenerationRequest
    x: Axis = NOTHING
    y: Axis = NOTHING
    z: Axis = NOTHING
    checkpoint: Path | None = None
    vae: Path | None = None
    styles: tuple[PromptStyle, ...] = ()


def fix_seeds(spec: GridSpec, rng: random.Random | None = None) -> GridSpec:
    """A1111's ``fix_seed``: the base seed and variation seed, and every ``-1`` of a Seed or Var. seed axis,
    replaced by a random seed once, so that cells share them."""
    rng = rng or random.Random()

    def fix(seed: int) -> int:
        return rng.randrange(MAX_SEED) if seed == -1 else seed

    request = dataclasses.replace(
        spec.request, seed=fix(spec.request.seed), subseed=fix(spec.request.subseed)
    )
    axes = {}
    for name in ("x", "y", "z"):
        axis: Axis = getattr(spec, name)
        if axis.type.label in ("Seed", "Var. seed"):
            axis = dataclasses.replace(axis, values=tuple(fix(v) for v in axis.values))  # type: ignore[arg-type]
        axes[name] = axis
    return dataclasses.replace(spec, request=request, **axes)


@dataclass(frozen=True)
class LabelLine:
    """A line of a grid label; an inactive one (a prompt matrix part left out) is grey and struck through."""

    text: str
    active: bool = True


Label = tuple[LabelLine, ...]


@dataclass(frozen=True)
class Cell:
    """One image of the grid: its place (column ``ix``, row ``iy``, sub-grid ``iz``), its request and the
    files it is made with (``vae`` None: the checkpoint's own; ``checkpoint`` None: the default model)."""

    ix: int
    iy: int
    iz: int
    request: GenerationRequest
    checkpoint: Path | None = None
    vae: Path | None = None
    values: tuple[str, ...] = ()  # the axis labels it stands for, for messages


@dataclass(frozen=True)
class GridPlan:
    """The cells in generation order (the costliest axis outermost), the labels, and the fields the grid's
    infotext adds to the first cell's."""

    cells: tuple[Cell, ...]
    columns: int
    rows: int
    grids: int
    x_labels: tuple[Label, ...]
    y_labels: tuple[Label, ...]
    z_labels: tuple[Label, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def position(self, cell: Cell) -> int:
        """The cell's index in grid order: columns, then rows, then sub-grids (A1111's order)."""
        return cell.ix + cell.iy * self.columns + cell.iz * self.columns * self.rows

    def in_grid_order(self) -> list[Cell]:
        return sorted(self.cells, key=self.position)


def apply_axis_value(
    axis: Axis, value: AxisValue, request: GenerationRequest, files: tuple[Path | None, Path | None]
) -> tuple[GenerationRequest, tuple[Path | None, Path | None]]:
    """``request`` and (checkpoint, VAE) with one axis value applied; ``SdStudioError`` where the value does
    not fit the request (Prompt S/R text not in the prompt, Denoising without an init image, ...)."""
    label = axis.type.label
    replace = dataclasses.replace
    if label == "Nothing":
        return request, files
    if label == "Prompt S/R":
        search = str(axis.values[0])
        if search not in request.prompt and search not in request.negative_prompt:
            raise SdStudioError(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")
        prompt = request.prompt.replace(search, str(value))
        return replace(
            request, prompt=prompt, negative_prompt=request.negative_prompt.replace(search, str(value))
        ), files
    if label == "Checkpoint name":
        assert isinstance(value, ModelFile)
        return request, (value.path, files[1])
    if label == "VAE":
        assert isinstance(value, ModelFile)
        automatic = value.name.casefold() in ("automatic", "auto")
        return request, (files[0], files[1] if automatic else value.path)
    if label == "Denoising":
        if request.init is not None:
            return replace(request, init=replace(request.init, strength=value)), files
        if request.hires is not None:
            return replace(request, hires=replace(request.hires, strength=value)), files
        raise SdStudioError("the Denoising axis needs an init image (--init-image) or the hires fix")
    if label == "Hires steps":
        if request.hires is None:
            raise SdStudioError("the Hires steps axis needs the hires fix (--hires-scale)")
        return replace(request, hires=replace(request.hires, steps=value)), files
    field = {
        "Seed": "seed", "Var. seed": "subseed", "Var. strength": "subseed_strength", "Steps": "steps",
        "CFG Scale": "cfg_scale", "Sampler": "sampler", "Schedule type": "scheduler", "Eta": "eta",
        "Clip skip": "clip_skip",
    }[label]  # fmt: skip
    return replace(request, **{field: value}), files


def _axis_order(spec: GridSpec) -> list[str]:
    """Axis names from outermost to innermost loop: by cost, else z, y, x as A1111."""
    return sorted(("z", "y", "x"), key=lambda name: -getattr(spec, name).type.cost)


def plan_grid(spec: GridSpec) -> GridPlan:
    """The cells of an X/Y/Z plot: a pure function of ``spec`` (fix ``-1`` seeds first, :func:`fix_seeds`).

    Each cell applies the x, then y, then z value to the base request, then the styles. Refuses
    (``SdStudioError`` naming the axis and value) a value that does not fit the request."""
    axes = {"x": spec.x, "y": spec.y, "z": spec.z}
    base = (spec.checkpoint, spec.vae)
    # each value applied alone first, so that a bad one is named by itself
    for name, axis in axes.items():
        for value in axis.values:
            try:
                apply_axis_value(axis, value, spec.request, base)
            except SdStudioError as e:
                raise SdStudioError(
                    f"{name.upper()} axis ({axis.type.label}) value {str(value)!r}: {e}"
                ) from None
    count = len(spec.x.values) * len(spec.y.values) * len(spec.z.values)
    if count > MAX_CELLS:
        raise SdStudioError(
            f"the grid would have {count} images, over the limit of {MAX_CELLS}; use fewer values"
        )
    order = _axis_order(spec)
    cells = []
    for indexes in itertools.product(*(range(len(axes[name].values)) for name in order)):
        at = dict(zip(order, indexes))
        request, files = spec.request, base
        for name in ("x", "y", "z"):
            axis = axes[name]
            request, files = apply_axis_value(axis, axis.values[at[name]], request, files)
        prompt, negative = apply_styles(request.prompt, request.negative_prompt, spec.styles)
        request = dataclasses.replace(request, prompt=prompt, negative_prompt=negative)
        values = tuple(
            axes[n].label(axes[n].values[at[n]]) for n in ("x", "y", "z") if not axes[n].is_nothing
        )
        cells.append(Cell(at["x"], at["y"], at["z"], request, files[0], files[1], values))
    extra: list[tuple[str, str]] = [("Script", SCRIPT_XYZ)]
    for name, axis in axes.items():
        if axis.is_nothing:
            continue
        extra += [(f"{name.upper()} Type", axis.type.label), (f"{name.upper()} Values", axis.text)]
        if axis.type.label in ("Seed", "Var. seed"):
            extra.append((f"Fixed {name.upper()} Values", ", ".join(str(v) for v in axis.values)))

    def labels(axis: Axis) -> tuple[Label, ...]:
        return tuple((LabelLine(axis.label(v)),) for v in axis.values)

    return GridPlan(
        tuple(cells), len(spec.x.values), len(spec.y.values), len(spec.z.values),
        labels(spec.x), labels(spec.y), () if spec.z.is_nothing else labels(spec.z), tuple(extra),
    )  # fmt: skip


def matrix_prompts(prompt: str, delimiter: str = ", ") -> list[str]:
    """A1111's prompt matrix: ``"a|b|c"`` -> the 2^(n-1) prompts with the first part and each subset of the
    others; combination ``k`` has part ``i + 1`` where bit ``i`` of ``k`` is set."""
    parts = prompt.split("|")
    optional = parts[1:]
    prompts = []
    for k in range(1 << len(optional)):
        chosen = [text.strip().strip(",") for i, text in enumerate(optional) if k & (1 << i)]
        prompts.append(delimiter.join([parts[0].strip(), *chosen]))
    return prompts


def plan_prompt_matrix(
    request: GenerationRequest,
    styles: tuple[PromptStyle, ...] = (),
    checkpoint: Path | None = None,
    vae: Path | None = None,
) -> GridPlan:
    """The prompt matrix of ``request.prompt`` (``"base|opt1|opt2"``): one cell per combination, all with the
    request's seed; the first half of the optional parts varies along the columns, the rest along the rows,
    each label listing the parts, those left out struck through."""
    parts = request.prompt.split("|")
    if len(parts) < 2:
        raise SdStudioError("a prompt matrix needs optional parts after '|', such as 'a cat|red|in snow'")
    optional = [p.strip().strip(",") for p in parts[1:]]
    if len(optional) > 10:
        raise SdStudioError(
            f"a prompt matrix of {len(optional)} optional parts makes {2 ** len(optional)} images; "
            "at most 10 parts"
        )
    across = math.ceil(len(optional) / 2)
    columns, rows = 1 << across, 1 << (len(optional) - across)
    cells = []
    for k, prompt in enumerate(matrix_prompts(request.prompt)):
        prompt, negative = apply_styles(prompt, request.negative_prompt, styles)
        cell_request = dataclasses.replace(request, prompt=prompt, negative_prompt=negative)
        cells.append(Cell(k % columns, k // columns, 0, cell_request, checkpoint, vae, (prompt,)))

    def labels(names: list[str], count: int) -> tuple[Label, ...]:
        return tuple(
            tuple(LabelLine(n, bool(k & (1 << i))) for i, n in enumerate(names)) for k in range(count)
        )

    x_labels, y_labels = labels(optional[:across], columns), labels(optional[across:], rows)
    extra = (("Script", SCRIPT_MATRIX), ("Prompt matrix", request.prompt))
    return GridPlan(
        tuple(cells), columns, rows, 1, x_labels, y_labels if optional[across:] else (), (), extra
    )


def check_spec(spec: GridSpec, limits: Limits | None = None) -> None:
    """Refuse, before any work, a base request no model could run, then each axis value that does not fit
    it: ``SdStudioError`` naming the axis and the value (``X axis (Steps) value '0': steps must be ...``)."""
    from sdstudio.pipelines.validate import DEFAULT_LIMITS, check_request

    limits = limits or DEFAULT_LIMITS
    check_request(spec.request, limits)
    for name in ("x", "y", "z"):
        axis: Axis = getattr(spec, name)
        for value in axis.values:
            try:
                request, _ = apply_axis_value(axis, value, spec.request, (spec.checkpoint, spec.vae))
                check_request(request, limits)
            except SdStudioError as e:
                raise SdStudioError(
                    f"{name.upper()} axis ({axis.type.label}) value {str(value)!r}: {e}"
                ) from None


def check_plan(plan: GridPlan, limits: Limits | None = None) -> None:
    """Refuse, before any image is made, a cell no model could run (``SdStudioError`` naming the cell's axis
    values and the field)."""
    from sdstudio.pipelines.validate import DEFAULT_LIMITS, check_request

    for cell in plan.cells:
        try:
            check_request(cell.request, limits or DEFAULT_LIMITS)
        except SdStudioError as e:
            where = " / ".join(v for v in cell.values if v) or "the base request"
            raise SdStudioError(f"grid cell {where}: {e}") from None


class Generator(Protocol):
    """What ``load`` returns: a :class:`sdstudio.engine.Pipeline`, or anything called the same way."""

    def __call__(self, request: GenerationRequest, *, limits: Limits = ...) -> GenerationResult: ...


def generate_cells(
    plan: GridPlan,
    load: Callable[[Path | None, Path | None], Generator],
    limits: Limits | None = None,
    on_cell: Callable[[Cell, GenerationResult], None] | None = None,
) -> dict[int, GenerationResult]:
    """Every cell's result by grid position, made in plan order; ``load(checkpoint, vae)`` is called once
    per run of cells that share them (the costliest axis is outermost, so once per checkpoint). The cells
    of a run are checked against its model (``sampling.plan``) before the run's first image."""
    from sdstudio.pipelines.validate import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    results: dict[int, GenerationResult] = {}
    groups = itertools.groupby(plan.cells, key=lambda c: (c.checkpoint, c.vae))
    for (checkpoint, vae), group in groups:
        cells = list(group)
        pipeline = load(checkpoint, vae)
        model = getattr(pipeline, "model", None)
        if model is not None:  # what only the model can check (clip skip, sizes): before its first image
            _check_cells_against(model, cells, limits)
        for cell in cells:
            result = pipeline(cell.request, limits=limits)
            results[plan.position(cell)] = result
            if on_cell is not None:
                on_cell(cell, result)
        del pipeline, model  # the next checkpoint loads without this one beside it
    return results


def _check_cells_against(model: LoadedModel, cells: Sequence[Cell], limits: Limits) -> None:
    from sdstudio.pipelines.sampling import plan as plan_request

    for cell in cells:
        try:
            plan_request(model, cell.request, limits)
        except SdStudioError as e:
            where = " / ".join(v for v in cell.values if v) or "the base request"
            raise SdStudioError(f"grid cell {where}: {e}") from None


def grid_infotext(first_cell_infotext: str, plan: GridPlan) -> str:
    """The grid's infotext: the first cell's, with A1111's ``Script``, ``X Type``, ``X Values``, ... added."""
    extra = ", ".join(f"{key}: {quote(value)}" for key, value in plan.extra)
    return f"{first_cell_infotext.rstrip()}, {extra}" if extra else first_cell_infotext


def default_cell_scale(width: int, height: int, minimum: int = 256) -> int:
    """The nearest-neighbour enlargement that makes a cell at least ``minimum`` pixels on its short side."""
    return max(1, math.ceil(minimum / max(1, min(width, height))))


COLOR_ACTIVE = (0, 0, 0)
COLOR_INACTIVE = (153, 153, 153)
BACKGROUND = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float
) -> str:
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= width or not lines[-1]:
            lines[-1] = line
        else:
            lines.append(word)
    return "\n".join(lines)


def _annotate(
    cells: list[Image.Image],
    columns: int,
    rows: int,
    top: Sequence[Label],
    left: Sequence[Label],
    margin: int,
) -> Image.Image:
    """Cells (row-major, one size) in a grid with ``margin`` pixels between them, the ``top`` labels above the
    columns and the ``left`` labels before the rows (as A1111's ``draw_grid_annotations``)."""
    width, height = cells[0].size
    fontsize = max(8, (width + height) // 25)
    spacing = fontsize // 2
    font = _font(fontsize)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def layout(labels: Sequence[Label], wrap_width: float) -> list[list[tuple[str, bool, tuple[int, int]]]]:
        out = []
        for label in labels:
            lines = []
            for line in label:
                text = _wrap(probe, line.text, font, wrap_width)
                box = probe.multiline_textbbox((0, 0), text, font=font) if text else (0, 0, 0, 0)
                lines.append((text, line.active, (box[2] - box[0], box[3] - box[1])))
            out.append(lines)
        return out

    def block_height(lines: list[tuple[str, bool, tuple[int, int]]]) -> int:
        return sum(size[1] for _, _, size in lines) + spacing * max(0, len(lines) - 1)

    pad_left = width * 3 // 4 if left else 0
    top_lines, left_lines = layout(top, width), layout(left, pad_left or width)
    top_heights = [block_height(lines) for lines in top_lines]
    pad_top = max(top_heights) + spacing * 2 if top_heights and max(top_heights) > 0 else 0
    out = Image.new(
        "RGB",
        (pad_left + columns * width + margin * (columns - 1), pad_top + rows * height + margin * (rows - 1)),
        BACKGROUND,
    )  # fmt: skip
    for i, cell in enumerate(cells):
        out.paste(
            cell, (pad_left + (i % columns) * (width + margin), pad_top + (i // columns) * (height + margin))
        )
    draw = ImageDraw.Draw(out)

    def draw_block(x: float, y: float, lines: list[tuple[str, bool, tuple[int, int]]]) -> None:
        for text, active, (w, h) in lines:
            color = COLOR_ACTIVE if active else COLOR_INACTIVE
            draw.multiline_text((x, y + h / 2), text, font=font, fill=color, anchor="mm", align="center")
            if not active:  # struck through, as A1111 draws a left-out prompt matrix part
                draw.line(
                    (x - w / 2, y + h / 2, x + w / 2, y + h / 2), fill=color, width=max(1, fontsize // 8)
                )
            y += h + spacing

    for col, lines in enumerate(top_lines):
        draw_block(pad_left + col * (width + margin) + width / 2, pad_top / 2 - top_heights[col] / 2, lines)
    for row, lines in enumerate(left_lines):
        y = pad_top + row * (height + margin) + height / 2 - block_height(lines) / 2
        draw_block(pad_left / 2, y, lines)
    return out


def draw_grid(
    plan: GridPlan, images: dict[int, Image.Image], *, labels: bool = True, margin: int = 0, scale: int = 1
) -> Image.Image:
    """The grid image: each sub-grid (one per z value) with its x labels on top and y labels on the left,
    sub-grids side by side under their z labels, as A1111 lays out an X/Y/Z plot. Cells are enlarged
    ``scale`` times (nearest neighbour) and centred in the largest cell's size."""
    width = max(im.width for im in images.values()) * scale
    height = max(im.height for im in images.values()) * scale
    per_grid = plan.columns * plan.rows
    subgrids = []
    for iz in range(plan.grids):
        cells = []
        for position in range(iz * per_grid, (iz + 1) * per_grid):
            im = images[position]
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im
            if im.size != (width, height):
                canvas = Image.new("RGB", (width, height), BACKGROUND)
                canvas.paste(im, ((width - im.width) // 2, (height - im.height) // 2))
                im = canvas
            cells.append(im.convert("RGB"))
        top = plan.x_labels if labels and any(line.text for lab in plan.x_labels for line in lab) else ()
        left = plan.y_labels if labels and any(line.text for lab in plan.y_labels for line in lab) else ()
        subgrids.append(_annotate(cells, plan.columns, plan.rows, top, left, margin))
    titles = plan.z_labels if labels else ()
    if len(subgrids) == 1 and not titles:
        return subgrids[0]
    # A1111 sizes the z titles' font for the sub-grids, as here
    return _annotate(subgrids, len(subgrids), 1, titles, (), margin)
