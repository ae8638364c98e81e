"""Architecture configs of the three networks, presets, and (de)serialisation to checkpoint metadata.

Field names follow the original LDM yaml configs (``model_channels``, ``channel_mult``, ``ch``...) so a
config reads like the ``v1-inference.yaml`` people know.  Detection from a state dict lives in
``sdstudio.models.detect``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Prediction = Literal["epsilon", "v"]
TextEncoderKind = Literal["clip", "open_clip"]
# How text becomes the UNet's conditioning: one text encoder (SD 1.x / 2.x), or SDXL's conditioner (two
# encoders' penultimate layers side by side, and a vector of the pooled text and the image's sizes), or
# the SDXL refiner's (the OpenCLIP bigG encoder alone, and an aesthetic score in the vector).
Conditioner = Literal["text", "sdxl", "sdxl_refiner"]


@dataclass(frozen=True)
class UNetConfig:
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel`` as used by SD 1.x / 2.x."""

    in_channels: int = 4  # 9 for inpainting models (latent 4 + mask 1 + masked-image latent 4)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, ...) at which a SpatialTransformer follows each ResBlock.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8  # used when num_head_channels == -1 (SD 1.x)
    num_head_channels: int = -1  # SD 2.x: 64, with num_heads = -1
    # Transformer blocks per SpatialTransformer: one number, or one per level (SDXL: (0, 2, 10)); the
    # middle block takes the last level's (sgm's ``transformer_depth_middle`` default).
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: proj_in / proj_out are Linear, not 1x1 Conv
    norm_groups: int = 32
    # SDXL's ``num_classes: sequential``: width of the vector ``y`` (pooled text and size embeddings)
    # added to the timestep embedding through ``label_emb``; 0: none (SD 1.x / 2.x).
    adm_in_channels: int = 0

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at ``level`` (0 = full resolution)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[level]

    @property
    def middle_depth(self) -> int:
        return self.depth_at(len(self.channel_mult) - 1)

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention layers at a level with ``channels`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class VAEConfig:
    """``ldm.models.autoencoder.AutoencoderKL`` (``ddconfig`` + ``embed_dim``)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer: HF layout (``clip``, SD 1.x) or OpenCLIP layout (``open_clip``, SD 2.x)."""

    kind: TextEncoderKind = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_positions: int = 77
    mlp_ratio: int = 4
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Which hidden layer feeds the UNet by default, counted as AUTOMATIC1111's "Clip skip":
    # 1 = last layer, 2 = penultimate (SD 2.x always uses the penultimate layer). The final
    # layer norm is applied to whichever layer is taken.
    default_clip_skip: int = 1
    # Token id used to pad a 77-token chunk after EOS: EOS for SD 1.x, 0 ("!") for SD 2.x.
    pad_with_eos: bool = True
    projection_dim: int = 0  # OpenCLIP's text_projection (SD 2.x: unused, kept; SDXL: projects the pooled text)
    # Whether the final LayerNorm follows the layer taken (SD 1.x / 2.x); SDXL feeds the penultimate
    # layer's output as it is (sgm's ``layer: hidden`` / ``penultimate``).
    final_layer_norm: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (DDPM, "scaled linear" betas)."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling option unset gets from this model. Not architecture: two
    checkpoints of one preset may differ here.

    ``ngms``: AUTOMATIC1111's "Negative Guidance minimum sigma" (``s_min_uncond``): at noise levels below
    it a step uses the prompt alone, without the negative prompt and CFG; 0 turns it off (A1111's
    default). ``ngms_all_steps``: every such step, not every other one as in A1111 by default.
    """

    ngms: float = 0.0
    ngms_all_steps: bool = False

    def __post_init__(self) -> None:
        ngms_ok = isinstance(self.ngms, (int, float)) and not isinstance(self.ngms, bool)
        if not ngms_ok or not 0.0 <= self.ngms < math.inf:
            raise ValueError(f"sampling.ngms must be a finite number >= 0 (got {self.ngms!r})")
        if not isinstance(self.ngms_all_steps, bool):
            raise TypeError(f"sampling.ngms_all_steps must be true or false (got {self.ngms_all_steps!r})")

    def overridden(self, ngms: float | None, ngms_all_steps: bool | None) -> SamplingDefaults:
        """These defaults with a request's values in place of those it gives (None: keep the default);
        checked like the defaults themselves."""
        return SamplingDefaults(
            self.ngms if ngms is None else ngms,
            self.ngms_all_steps if ngms_all_steps is None else ngms_all_steps,
        )


# One word of a vocabulary, as prompts are split into words to check them: letters and digits of any script.
WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class TrainedOn:
    """What a model was trained on, as far as its maker states it; empty means unknown (nothing is
    checked). Not architecture: it only feeds warnings about requests outside it
    (``sdstudio.prompt.vocabulary``).

    ``vocabulary``: every word its captions used, lower case, one word each (a model trained on a closed
    language, like the embedded toy model, draws nothing sensible for any other word). ``sizes``: the
    (width, height) in pixels of its training images.
    """

    vocabulary: tuple[str, ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.vocabulary, tuple):
            raise TypeError(f"trained_on.vocabulary must be a list of words (got {self.vocabulary!r})")
        for word in self.vocabulary:
            if not isinstance(word, str) or WORD.fullmatch(word) is None or word != word.lower():
                raise ValueError(f"trained_on.vocabulary: {word!r} is not one lower-case word")
        if not isinstance(self.sizes, tuple):
            raise TypeError(f"trained_on.sizes must be a list of [width, height] (got {self.sizes!r})")
        for size in self.sizes:
            ok = isinstance(size, tuple) and len(size) == 2
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise ValueError(f"trained_on.sizes: {size!r} is not [width, height] in pixels")


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model."""

    name: str = "sd15"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # SDXL's second text encoder (OpenCLIP bigG, ``conditioner.embedders.1``); None for one encoder.
    text2: TextEncoderConfig | None = None
    conditioner: Conditioner = "text"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "epsilon"
    default_size: int = 512
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    trained_on: TrainedOn = field(default_factory=TrainedOn)

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        return self.conditioner != "text"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return config_from_dict(json.loads(text))


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal networks and prediction: name, default size, sampling defaults and training data aside."""
    neutral = {"name": "custom", "default_size": 0, "sampling": SamplingDefaults(), "trained_on": TrainedOn()}
    return dataclasses.replace(a, **neutral) == dataclasses.replace(b, **neutral)


def _tuples(value: Any) -> Any:
    """JSON lists as tuples, nested ones too (``trained_on.sizes`` is a list of pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _build(kind: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{kind.__name__} must be a JSON object (got {data!r})")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    values = {k: _tuples(v) for k, v in data.items()}
    return kind(**values)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    parts = {
        "unet": UNetConfig,
        "vae": VAEConfig,
        "text": TextEncoderConfig,
        "schedule": ScheduleConfig,
        "sampling": SamplingDefaults,
        "trained_on": TrainedOn,
    }
    for key, kind in parts.items():
        if key in data:
            data[key] = _build(kind, data[key])
    if data.get("text2") is not None:
        data["text2"] = _build(TextEncoderConfig, data["text2"])
    return _build(ModelConfig, data)


METADATA_KEY = "sdstudio.config"

SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(
    kind="open_clip",
    width=1024,
    layers=24,
    heads=16,
    activation="gelu",
    default_clip_skip=2,
    pad_with_eos=False,
    projection_dim=1024,
)
SD2_UNET = UNetConfig(
    num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
)

# SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis"),
# as sgm's ``sd_xl_base.yaml`` / ``sd_xl_refiner.yaml`` describe it.
SDXL_CLIP_L = TextEncoderConfig(default_clip_skip=2, final_layer_norm=False)
SDXL_BIG_G = TextEncoderConfig(
    kind="open_clip", width=1280, layers=32, heads=20, activation="gelu", default_clip_skip=2,
    pad_with_eos=False, projection_dim=1280, final_layer_norm=False,
)  # fmt: skip
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
    transformer_depth=(0, 2, 10), context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
)  # fmt: skip
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_heads=-1,
    num_head_channels=64, transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
    adm_in_channels=2560,
)  # fmt: skip
SDXL_VAE = VAEConfig(scale_factor=0.13025)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(name="sd15"),
    "sd15-inpaint": ModelConfig(name="sd15-inpaint", unet=UNetConfig(in_channels=9)),
    "sd2": ModelConfig(name="sd2", unet=SD2_UNET, text=SD2_TEXT),
    "sd2-v": ModelConfig(name="sd2-v", unet=SD2_UNET, text=SD2_TEXT, prediction="v", default_size=768),
    "sd2-inpaint": ModelConfig(
        name="sd2-inpaint", unet=dataclasses.replace(SD2_UNET, in_channels=9), text=SD2_TEXT
    ),
    # Small enough for unit tests in seconds; keeps the real vocabulary so the real tokenizer works.
    "tiny": ModelConfig(
        name="tiny",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2, 1),
            num_heads=2,
            context_dim=32,
            norm_groups=8,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=TextEncoderConfig(width=32, layers=2, heads=2),
        default_size=64,
    ),
    # The embedded default model, trained from scratch on the synthetic toyworld (sdstudio.toyworld):
    # 64x64 images, 8x8x4 latents, a 4-layer CLIP text transformer with the real vocabulary.
    "toyworld": ModelConfig(
        name="toyworld",
        unet=UNetConfig(
            model_channels=64,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(4, 2, 1),
            num_heads=4,
            context_dim=128,
            norm_groups=16,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=16),
        text=TextEncoderConfig(width=128, layers=4, heads=4),
        default_size=64,
        # Its cond and uncond predictions agree on a clean image but for noise, which CFG 7 multiplies:
        # with Euler a that noise drifts small objects' colours. Guidance only above sigma 0.5 (at 20
        # steps the last 4 use the prompt alone, 7 with a Karras schedule) fixes it; see BENCHMARKS.md,
        # "Guidance at low noise".
        sampling=SamplingDefaults(ngms=0.5, ngms_all_steps=True),
    ),
    "tiny-sd2": ModelConfig(
        name="tiny-sd2",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2, 1),
            num_heads=-1,
            num_head_channels=8,
            context_dim=32,
            use_linear_in_transformer=True,
            norm_groups=8,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=TextEncoderConfig(
            kind="open_clip",
            width=32,
            layers=2,
            heads=2,
            activation="gelu",
            default_clip_skip=2,
            pad_with_eos=False,
            projection_dim=32,
        ),
        default_size=64,
    ),
}


PRESETS["sdxl"] = ModelConfig(
    name="sdxl", unet=SDXL_UNET, vae=SDXL_VAE, text=SDXL_CLIP_L, text2=SDXL_BIG_G, conditioner="sdxl",
    default_size=1024,
)  # fmt: skip
PRESETS["sdxl-refiner"] = ModelConfig(
    name="sdxl-refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, text=SDXL_BIG_G, conditioner="sdxl_refiner",
    default_size=1024,
)  # fmt: skip
# SDXL's shape at test size: levels without attention, deeper ones with 1 and 2 blocks, two encoders.
PRESETS["tiny-sdxl"] = ModelConfig(
    name="tiny-sdxl",
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2),
        num_heads=-1, num_head_channels=8, transformer_depth=(0, 1, 2), context_dim=64,
        use_linear_in_transformer=True, norm_groups=8, adm_in_channels=32 + 6 * 256,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scale_factor=0.13025),
    text=TextEncoderConfig(width=32, layers=2, heads=2, default_clip_skip=2, final_layer_norm=False),
    text2=TextEncoderConfig(
        kind="open_clip", width=32, layers=3, heads=2, activation="gelu", default_clip_skip=2,
        pad_with_eos=False, projection_dim=32, final_layer_norm=False,
    ),
    conditioner="sdxl",
    default_size=64,
)  # fmt: skip

PRESETS["tiny-sdxl-refiner"] = ModelConfig(
    name="tiny-sdxl-refiner",
    unet=dataclasses.replace(
        PRESETS["tiny-sdxl"].unet, transformer_depth=1, context_dim=32, adm_in_channels=32 + 5 * 256
    ),
    vae=PRESETS["tiny-sdxl"].vae,
    text=PRESETS["tiny-sdxl"].text2,  # type: ignore[arg-type]
    conditioner="sdxl_refiner",
    default_size=64,
)


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown architecture preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
