"""Parity of our CLIP image encoders (and whole CLIP models) with transformers and open_clip.

Random weights (each reference's own default init, LayerNorm scales 1), real widths, heads, patch and
image sizes; fewer layers where a tower is large, as each test says. The references load their state
dicts into our models unchanged: the parity tests also prove that the attribute names are the keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sdstudio.errors import SdStudioError
from sdstudio.models.clip_vision import (
    VISION_PRESETS,
    ClipModel,
    OpenClipModel,
    TransformersClipModel,
    build_clip,
    clip_state,
    detect_clip,
    load_clip,
    preprocess,
)

TOLERANCE = 1e-4  # max abs difference of projected embeddings, fp32
BROKEN = 50 * TOLERANCE  # a broken variant must differ by more than this

# transformers CLIPVisionConfig arguments of the released vision towers (heads: open_clip's head_width).
HF_VISION = {
    "ViT-B-32": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "patch_size": 32,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
    },
    "ViT-L-14": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "ViT-H-14": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "projection_dim": 1024,
        "hidden_act": "gelu",
    },
    "ViT-bigG-14": {
        "hidden_size": 1664,
        "intermediate_size": 8192,
        "num_attention_heads": 16,
        "num_hidden_layers": 48,
        "patch_size": 14,
        "projection_dim": 1280,
        "hidden_act": "gelu",
    },
}
HF_TEXT = {
    "ViT-B-32": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_attention_heads": 8,
        "num_hidden_layers": 12,
    },
    "ViT-L-14": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
    },
    "ViT-H-14": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
    },
    "ViT-bigG-14": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
    },
}


# ---------------------------------------------------------------------------------------------
# open_clip as the reference


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """A stand-in ``torchvision.ops.misc`` while open_clip's model modules import, removed afterwards.

    CI installs open-clip-torch without its dependencies and torchvision is absent: the package's
    ``__init__`` (transforms) cannot import, but its model code needs torchvision only for
    ``FrozenBatchNorm2d`` (ResNet towers, unused here).
    """
    from transformers.utils import is_torchvision_available

    is_torchvision_available()  # cached (False) before the stand-in exists, for every later caller
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _open_clip() -> types.ModuleType:
    """open_clip's ``model`` module (``CLIP``, and ``transformer``, ``tokenizer`` beside it in the package).

    With torchvision installed this is plain ``import open_clip``; without it, the package's model
    modules load under a private name (see ``_without_torchvision``), their code unchanged.
    """
    try:
        return importlib.import_module("open_clip.model")
    except ModuleNotFoundError as e:
        if e.name == "open_clip":
            pytest.skip("open_clip is not installed")
    name = "_open_clip_reference"
    if name not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        assert spec is not None and spec.submodule_search_locations
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
        with _without_torchvision():
            for sub in ("model", "transformer", "tokenizer"):
                importlib.import_module(f"{name}.{sub}")
    return sys.modules[f"{name}.model"]


def _open_clip_vision(name: str, layers: int) -> torch.nn.Module:
    """open_clip's ``VisionTransformer`` of preset ``name`` with ``layers`` layers, its default init."""
    ref = _open_clip()
    transformer = sys.modules[ref.__name__.rsplit(".", 1)[0] + ".transformer"]
    preset = VISION_PRESETS[name]
    act = ref.QuickGELU if preset.activation == "quick_gelu" else torch.nn.GELU
    torch.manual_seed(0)
    return transformer.VisionTransformer(
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        width=preset.width,
        layers=layers,
        heads=preset.heads,
        mlp_ratio=preset.mlp_width / preset.width,
        output_dim=preset.embed_dim,
        act_layer=act,
    ).eval()


def _small_open_clip(quick_gelu: bool) -> torch.nn.Module:
    """A whole open_clip ``CLIP``, small: 2-layer towers, text width 128 (2 heads), vision width 64."""
    ref = _open_clip()
    torch.manual_seed(0)
    model = ref.CLIP(
        embed_dim=48,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 64},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
        quick_gelu=quick_gelu,
    )
    return model.eval()


def _small_transformers_clip() -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 1,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=48,
    )
    return CLIPModel(config).eval()


def _shapes(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in state.items()}


def _ours(state: dict[str, torch.Tensor], activation: str | None = None, prefix: str = "") -> ClipModel:
    """Our model detected from ``state``'s shapes and loaded from it strictly, unrenamed."""
    detected = detect_clip(_shapes(state), activation)  # type: ignore[arg-type]
    assert detected.prefix == prefix
    model = build_clip(detected.config)
    model.load_state_dict(clip_state(state, detected), strict=True)
    return model.eval()


def _pixels(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _tokens() -> torch.Tensor:
    """Row 0: EOS then zeros (OpenAI's padding); row 1: EOS padding (SD 1.x's), pooled at the first EOS."""
    tokens = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 49406
    tokens[0, 20], tokens[0, 21:] = 49407, 0
    tokens[1, 9:] = 49407
    return tokens


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Vision towers


# ViT-L/14 with 2 of its 24 layers (the rest of its architecture real) to stay fast.
@pytest.mark.parametrize(("name", "layers"), [("ViT-B-32", 12), ("ViT-L-14", 2)])
def test_vision_parity_with_transformers(name: str, layers: int) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=224, **{**HF_VISION[name], "num_hidden_layers": layers})
    hf = CLIPVisionModelWithProjection(config).eval()
    state = hf.state_dict()
    ours = _ours(state)
    assert isinstance(ours, TransformersClipModel) and ours.config.text is None
    assert ours.config.vision == dataclasses.replace(VISION_PRESETS[name], layers=layers)
    pixels = _pixels(224)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).image_embeds
        diff = _max_diff(ours.image_features(pixels), expected)
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.2e}"
        normalised = _max_diff(ours.encode_images(pixels), F.normalize(expected, dim=-1))
        assert normalised <= TOLERANCE
        # The same weights under the other activation: the comparison above can fail.
        wrong = _ours(state, activation="gelu")
        broken = _max_diff(wrong.image_features(pixels), expected)
        assert broken > BROKEN, f"{name} with gelu: max abs diff only {broken:.2e}"


# ViT-H/14 and ViT-bigG/14 with 2 of their 32 / 48 layers; ViT-B/32 whole.
@pytest.mark.parametrize(("name", "layers"), [("ViT-B-32", 12), ("ViT-H-14", 2), ("ViT-bigG-14", 2)])
def test_vision_parity_with_open_clip(name: str, layers: int) -> None:
    reference = _open_clip_vision(name, layers)
    state = {f"visual.{k}": v for k, v in reference.state_dict().items()}
    ours = _ours(state)
    assert isinstance(ours, OpenClipModel) and ours.config.text is None
    assert ours.config.vision == dataclasses.replace(VISION_PRESETS[name], layers=layers)
    pixels = _pixels(224, batch=1 if name == "ViT-bigG-14" else 2)
    with torch.no_grad():
        expected = reference(pixels)
        diff = _max_diff(ours.image_features(pixels), expected)
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.2e}"
        if name == "ViT-H-14":  # skip the last layer: the comparison above can fail
            del ours.visual.transformer.resblocks[-1]
            broken = _max_diff(ours.image_features(pixels), expected)
            assert broken > BROKEN, f"{name} less a layer: max abs diff only {broken:.2e}"


# ---------------------------------------------------------------------------------------------
# Whole models: text towers and projections


def test_whole_model_parity_with_transformers() -> None:
    hf = _small_transformers_clip()
    ours = _ours(hf.state_dict(), activation="quick_gelu")
    assert isinstance(ours, TransformersClipModel) and ours.config.text is not None
    tokens, pixels = _tokens(), _pixels(32)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=tokens)
        text = getattr(text, "pooler_output", text)  # transformers >= 5 returns the model output
        image = hf.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        assert _max_diff(ours.text_features(tokens), text) <= TOLERANCE
        assert _max_diff(ours.image_features(pixels), image) <= TOLERANCE
        assert torch.equal(ours.logit_scale, hf.logit_scale)
        broken = _max_diff(ours.text_features(tokens.roll(1, dims=1)), text)  # pooled one token off
        assert broken > BROKEN


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_whole_model_parity_with_open_clip(quick_gelu: bool) -> None:
    reference = _small_open_clip(quick_gelu)
    activation = "quick_gelu" if quick_gelu else "gelu"
    ours = _ours(reference.state_dict(), activation=activation)
    assert isinstance(ours, OpenClipModel) and ours.config.text is not None
    tokens, pixels = _tokens(), _pixels(32)
    with torch.no_grad():
        text = reference.encode_text(tokens)
        assert _max_diff(ours.text_features(tokens), text) <= TOLERANCE
        assert _max_diff(ours.image_features(pixels), reference.encode_image(pixels)) <= TOLERANCE
        wrong = _ours(reference.state_dict(), activation="gelu" if quick_gelu else "quick_gelu")
        assert _max_diff(wrong.text_features(tokens), text) > BROKEN


def test_encode_texts_tokenises_as_open_clip() -> None:
    """Strings through our tokenizer (BOS, 75 tokens at most, EOS, zeros) equal open_clip's path."""
    reference = _small_open_clip(quick_gelu=False)
    tokenizer = sys.modules[reference.__module__.rsplit(".", 1)[0] + ".tokenizer"].SimpleTokenizer()
    ours = _ours(reference.state_dict(), activation="gelu")
    texts = ["a photo of a cat", "A RED cube, on a table!", "word " * 100]
    expected_tokens = tokenizer(texts)
    assert torch.equal(ours.tokenize(texts), expected_tokens)
    with torch.no_grad():
        expected = reference.encode_text(expected_tokens, normalize=True)
    got = ours.encode_texts(texts, batch_size=2)
    assert _max_diff(got, expected) <= TOLERANCE
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _clip_image_processor() -> object:
    """transformers' PIL-based ``CLIPImageProcessor`` (v5 names it ``CLIPImageProcessorPil``; the default
    class there needs torchvision and resizes with torch's bicubic instead)."""
    try:
        from transformers import CLIPImageProcessorPil as processor
    except ImportError:
        from transformers import CLIPImageProcessor as processor
    return processor(do_resize=True, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def test_preprocess_equals_clip_image_processor() -> None:
    rng = np.random.default_rng(0)
    # landscape, portrait with an odd crop margin, and one upscaled from below 224
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((300, 451, 3), (451, 301, 3), (150, 97, 3))
    ]
    expected = _clip_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    got = preprocess(images, 224)
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
    # The same PIL bicubic resize and crop; what is left is float rounding of the normalisation.
    diff = _max_diff(got, expected)
    assert diff <= 1e-6, f"max abs diff {diff:.2e}"
    with pytest.raises(ValueError, match="uint8"):
        preprocess([images[0].astype(np.float32)], 224)


def test_encode_images_from_arrays_batches_and_normalises() -> None:
    hf = _small_transformers_clip()
    ours = _ours(hf.state_dict())
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    whole = ours.encode_images(images)
    one_by_one = ours.encode_images(images, batch_size=1)
    assert whole.shape == (3, 48)
    assert _max_diff(whole, one_by_one) <= 1e-6
    assert _max_diff(whole, ours.encode_images(preprocess(images, 32))) == 0
    assert torch.allclose(whole.norm(dim=-1), torch.ones(3))
    assert ours.encode_images([]).shape == (0, 48)


# ---------------------------------------------------------------------------------------------
# Detection and loading


def _meta_reference_shapes(name: str, layout: str) -> dict[str, tuple[int, ...]]:
    """Key shapes of the whole released model ``name`` as its reference builds it (on the meta device)."""
    with torch.device("meta"):
        if layout == "transformers":
            vision = {k: v for k, v in HF_VISION[name].items() if k != "projection_dim"}
            config = CLIPConfig(
                text_config=HF_TEXT[name],
                vision_config=vision,
                projection_dim=HF_VISION[name]["projection_dim"],
            )
            return _shapes(CLIPModel(config).state_dict())
        ref = _open_clip()
        preset = VISION_PRESETS[name]
        text = HF_TEXT[name]
        model = ref.CLIP(
            embed_dim=preset.embed_dim,
            vision_cfg={
                "image_size": 224,
                "patch_size": preset.patch_size,
                "width": preset.width,
                "layers": preset.layers,
                "head_width": preset.width // preset.heads,
                "mlp_ratio": preset.mlp_width / preset.width,
            },
            text_cfg={
                "width": text["hidden_size"],
                "heads": text["num_attention_heads"],
                "layers": text["num_hidden_layers"],
            },
        )
        return _shapes(model.state_dict())


@pytest.mark.parametrize("layout", ["transformers", "open_clip"])
@pytest.mark.parametrize("name", list(VISION_PRESETS))
def test_detects_each_released_architecture(name: str, layout: str) -> None:
    shapes = _meta_reference_shapes(name, layout)
    detected = detect_clip(shapes)
    config = detected.config
    assert detected.prefix == "" and config.layout == layout
    assert config.vision == VISION_PRESETS[name]  # activation included: the preset's default
    text = HF_TEXT[name]
    assert config.text is not None
    assert (config.text.width, config.text.layers, config.text.heads) == (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["num_attention_heads"],
    )
    assert config.text.projection_dim == config.vision.embed_dim
    assert config.text.activation == config.vision.activation
    assert detect_clip(shapes, activation="gelu").config.vision.activation == "gelu"
    # Our model of the detected config has exactly the reference's keys and shapes.
    with torch.device("meta"):
        ours = build_clip(config)
    assert _shapes(ours.state_dict()) == shapes


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", "conditioner.embedders.1.model.", "model."])
def test_detects_a_prefixed_whole_file(prefix: str) -> None:
    shapes = _shapes(_small_transformers_clip().state_dict(), prefix)
    shapes[f"{prefix}text_model.embeddings.position_ids"] = (1, 77)  # older exports carry it
    shapes["model.diffusion_model.out.2.weight"] = (4, 320, 3, 3)  # the rest of a checkpoint, ignored
    detected = detect_clip(shapes)
    assert detected.prefix == prefix and detected.config.layout == "transformers"
    assert detected.config.text is not None and detected.config.text.width == 128
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with torch.device("meta"):
        expected = build_clip(detected.config).state_dict()
    assert _shapes(clip_state(state, detected)) == _shapes(expected)


def _text_only_shapes() -> dict[str, tuple[int, ...]]:
    state = _small_transformers_clip().state_dict()
    return {k: v for k, v in _shapes(state).items() if not k.startswith(("vision_model.", "visual_"))}


@pytest.mark.parametrize(
    ("shapes", "found"),
    [
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "first_stage_model.x": (1,)},
            "a UNet",
        ),
        (_text_only_shapes(), "a CLIP text encoder without a vision tower"),
        ({"foo.bar": (3,), "baz": (2, 2)}, "2 tensors under baz, foo"),
        ({"visual.conv1.weight": (32, 3, 3, 3), "visual.layer1.0.conv1.weight": (64, 32, 1, 1)}, "ResNet"),
        ({}, "no tensors"),
        (
            {
                "visual.conv1.weight": (768, 3, 14, 14),
                "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
                "visual.attn_pool.query": (256, 512),
            },
            "attentional pooling (CoCa)",
        ),
    ],
    ids=["unet", "text-only", "garbage", "resnet", "empty", "coca"],
)
def test_refuses_what_is_not_a_clip_vit(shapes: dict[str, tuple[int, ...]], found: str) -> None:
    with pytest.raises(SdStudioError) as info:
        detect_clip(shapes)
    message = str(info.value)
    assert "\n" not in message and message.startswith("not a CLIP ViT image encoder: found ")
    assert found in message


def test_load_clip_from_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf = _small_transformers_clip()
    whole = tmp_path / "clip.safetensors"
    save_file({k: v.half() for k, v in hf.state_dict().items()}, whole)  # fp16 on disk, fp32 loaded
    model = load_clip(whole, activation="quick_gelu")
    assert isinstance(model, TransformersClipModel) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    pixels = _pixels(32)
    with torch.no_grad():
        hf.half().float()  # the weights the file holds
        image = hf.get_image_features(pixel_values=pixels)
        image = F.normalize(getattr(image, "pooler_output", image), dim=-1)
        text = hf.get_text_features(input_ids=model.tokenize(["a cat"]))
        text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
    assert _max_diff(model.encode_images(pixels), image) <= TOLERANCE
    assert _max_diff(model.encode_texts(["a cat"]), text) <= TOLERANCE

    # open_clip layout under a prefix, as a pickled weights-only .pt
    reference = _small_open_clip(quick_gelu=False)
    pt = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}}, pt)
    model = load_clip(pt)
    assert isinstance(model, OpenClipModel) and model.config.vision.activation == "quick_gelu"  # no preset
    with torch.no_grad():
        expected = reference.encode_image(pixels, normalize=True)
    assert _max_diff(load_clip(pt, activation="gelu").encode_images(pixels), expected) <= TOLERANCE

    # vision only (.bin): images yes, texts refused
    vision_only = tmp_path / "vision.bin"
    state = {k: v for k, v in hf.state_dict().items() if k.startswith(("vision_model.", "visual_"))}
    torch.save(state, vision_only)
    model = load_clip(vision_only)
    assert _max_diff(model.encode_images(pixels), image) <= TOLERANCE
    with pytest.raises(SdStudioError, match="no text encoder"):
        model.encode_texts(["a cat"])

    # a file of something else names itself and what it holds
    other = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, other)
    with pytest.raises(SdStudioError, match=r"unet\.safetensors: not a CLIP ViT image encoder: found a UNet"):
        load_clip(other)


def test_towers_of_different_embeddings_are_refused() -> None:
    shapes = _shapes(_small_transformers_clip().state_dict())
    shapes["text_projection.weight"] = (32, 128)  # the image projection gives 48
    with pytest.raises(
        SdStudioError, match="text projection gives 32 dimensions and its image projection 48"
    ):
        detect_clip(shapes)
    config = detect_clip(_shapes(_small_transformers_clip().state_dict())).config
    assert config.text is not None
    with pytest.raises(ValueError, match="projection_dim"):
        build_clip(dataclasses.replace(config, text=dataclasses.replace(config.text, projection_dim=7)))
