"""Requests and results: frozen dataclasses that can be logged, replayed and written into metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

ResizeMode = Literal["just resize", "crop and resize", "resize and fill"]
MaskedContent = Literal["fill", "original", "latent noise", "latent nothing"]

RESIZE_MODES: tuple[ResizeMode, ...] = ("just resize", "crop and resize", "resize and fill")
MASKED_CONTENTS: tuple[MaskedContent, ...] = ("fill", "original", "latent noise", "latent nothing")


@dataclass(frozen=True)
class Outpaint:
    """Pixels added to each side of the init image's canvas; the added area is repainted."""

    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0

    @property
    def any(self) -> bool:
        return any((self.left, self.right, self.up, self.down))


@dataclass(frozen=True)
class InitImage:
    """img2img: start from ``image`` noised to ``strength``'s noise level instead of pure noise."""

    image: Image.Image
    strength: float = 0.75  # AUTOMATIC1111's "Denoising strength": 0 keeps the image, 1 ignores it
    resize_mode: ResizeMode = "just resize"


@dataclass(frozen=True)
class Inpaint:
    """Repaint where ``mask`` is white (and, with ``outpaint``, the added border); keep the rest."""

    mask: Image.Image | None = None  # None: only the outpaint border is repainted
    blur: int = 4  # Gaussian blur radius of the mask, pixels
    only_masked: bool = False  # AUTOMATIC1111's "Inpaint area: Only masked"
    only_masked_padding: int = 32  # pixels around the mask's bounding box ("Masked area padding")
    masked_content: MaskedContent = "original"
    outpaint: Outpaint = field(default_factory=Outpaint)


@dataclass(frozen=True)
class Hires:
    """AUTOMATIC1111's hires fix: upscale the first pass and denoise it again (img2img) at the larger size."""

    scale: float = 2.0
    steps: int = 0  # 0: as many as the first pass
    strength: float = 0.7
    upscaler: str = "Latent"


ControlModeName = Literal["Balanced", "My prompt is more important", "ControlNet is more important"]
ControlResize = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]
CONTROL_RESIZE_MODES: tuple[ControlResize, ...] = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES: tuple[ControlModeName, ...] = ("Balanced", "My prompt is more important", "ControlNet is more important")


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet unit, as AUTOMATIC1111's sd-webui-controlnet extension has them.

    ``model``: a ControlNet file's stem in the pipeline's ControlNet folders (``--controlnet-dir``), or a
    path (file or diffusers folder). ``image``: the control image (None: the request's init image);
    ``preprocessor``: what makes the control map from it ("none": the image is the map; see
    ``sdstudio.control.preprocess``), with ``threshold_a`` / ``threshold_b`` as the extension names its two
    preprocessor parameters (None: the preprocessor's defaults). ``start`` / ``end``: the share of the
    steps during which it acts ("Guidance Start / End"); ``mode``: "Control Mode"; ``resize_mode``: how the
    control image is fitted to the image size.
    """

    model: str
    image: Image.Image | None = None
    preprocessor: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlModeName = "Balanced"
    resize_mode: ControlResize = "Crop and Resize"
    threshold_a: float | None = None
    threshold_b: float | None = None


NetworkKind = Literal["lora", "hypernet"]
NETWORK_KINDS: tuple[NetworkKind, ...] = ("lora", "hypernet")


@dataclass(frozen=True)
class NetworkSpec:
    """A LoRA / LyCORIS network or a hypernetwork to apply, as data: what a ``<lora:name:te:unet>`` or
    ``<hypernet:name:multiplier>`` tag in the prompt says, for callers that would rather not write tags.

    ``name``: as the tag writes it, looked up in the folders the pipeline was given (file stem or kohya's
    ``ss_output_name``); ``path``: a file to use instead of a lookup (its stem names it in the infotext).
    ``unet``: None for the same as ``te`` (A1111's rule); a hypernetwork has one multiplier, ``te``.
    """

    name: str
    te: float = 1.0
    unet: float | None = None
    kind: NetworkKind = "lora"
    path: str | None = None

    @property
    def unet_multiplier(self) -> float:
        return self.te if self.unet is None else self.unet

    def tag(self) -> str:
        """The prompt tag that asks for the same thing (written into the infotext, so a PNG replays it)."""
        name = Path(self.path).stem if self.path else self.name
        if self.kind == "hypernet":
            return f"<hypernet:{name}:{self.te:g}>"
        if self.unet is None or self.unet == self.te:
            return f"<lora:{name}:{self.te:g}>"
        return f"<lora:{name}:{self.te:g}:{self.unet:g}>"


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img / img2img / inpaint request; every option has a name, a type and a default."""

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
    ensd: int = 0  # eta noise seed delta: sampler noise after the first draw comes from seed + ensd
    subseed: int = -1  # variation seed (-1: random); used only when subseed_strength > 0
    subseed_strength: float = 0.0  # 0: no variation; 1: the variation seed's noise alone
    # ToMe: share of the full-resolution tokens merged before self-attention (0: exact; at most 0.75).
    # Faster at large sizes, and the image changes: see BENCHMARKS.md for by how much.
    token_merging_ratio: float = 0.0
    # AUTOMATIC1111's "Negative Guidance minimum sigma": below this noise level a step uses the prompt
    # alone (no negative prompt, no CFG); 0 turns it off. None: the model's default (off, but for the
    # embedded toy model). ``ngms_all_steps``: every such step, not every other one as A1111 does.
    ngms: float | None = None
    ngms_all_steps: bool | None = None
    init: InitImage | None = None
    inpaint: Inpaint | None = None  # needs ``init``
    hires: Hires | None = None  # txt2img only
    vae_tiling: bool | None = None  # None: tile the VAE above a size (see pipelines.vae_tiling)
    # Networks applied besides those the prompt's <lora:...> / <hypernet:...> tags ask for.
    networks: tuple[NetworkSpec, ...] = ()
    # SDXL's refiner (A1111's "Refiner switch at"): the share of the noise schedule after which the
    # refiner loaded beside the model (``--refiner FILE``) takes over; None: no refiner.
    refiner_switch_at: float | None = None
    controls: tuple[ControlSpec, ...] = ()  # ControlNet units, summed


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
    subseed: int | None = None  # the variation seed, when one was used


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest
    images: tuple[GeneratedImage, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(i.seed for i in self.images)
