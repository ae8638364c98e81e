"""Requests and results: frozen dataclasses that can be logged, replayed and written into metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img request; every option has a name, a type and a default."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed, resolved by the pipeline and reported in the result
    width: int | None = None  # None: the model's default size
    height: int | None = None
    batch_size: int = 1
    clip_skip: int | None = None  # None: the model's default (1 for SD 1.x, 2 for SD 2.x)
    eta: float | None = None  # None: the sampler's default


@dataclass(frozen=True)
class CondSchedule:
    """Which conditioning each sampling step uses: entry k (row ``index[k]`` of a stack of
    conditionings) is in force through step ``end_at_step[k]``.

    Steps are counted from 0, as AUTOMATIC1111's ``reconstruct_cond_batch`` counts them, so
    ``[a:b:10]`` at 20 steps uses ``a`` for steps 0..10 and ``b`` for 11..19, exactly as there.
    """

    end_at_step: tuple[int, ...]
    index: tuple[int, ...]

    def at(self, step: int) -> int:
        for end, row in zip(self.end_at_step, self.index):
            if step <= end:
                return row
        return self.index[-1]


@dataclass(frozen=True)
class WeightedCond:
    """One composable (``AND``) sub-prompt: its weight and its schedule."""

    weight: float
    schedule: CondSchedule


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest
    images: tuple[GeneratedImage, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(i.seed for i in self.images)
