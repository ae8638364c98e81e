"""SDXL diffusers folders <-> the single-file layout.

Loading: tiny SDXL base and refiner folders written by diffusers' own ``save_pretrained`` (its modules filled from
our random weights through diffusers' single-file converters, ``tests.reference``) must load back bit for bit with
the preset's architecture. Saving: our model written as a folder must load in ``StableDiffusionXLPipeline`` /
``StableDiffusionXLImg2ImgPipeline`` and compute what our model computes. The real sizes are checked on the meta
device: the Hub's config files give the presets exactly and every key lands where detection expects it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers
from safetensors.torch import load_file, save_file

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import PRESETS, ModelConfig, same_architecture
from sdstudio.models.detect import detect_config
from sdstudio.models.diffusers_convert import (
    EMBEDDERS_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_to_ldm,
    configs_from_diffusers_folder,
    open_clip_from_hf,
    unet_config_from_diffusers,
    unet_to_ldm,
    vae_to_ldm,
)
from sdstudio.models.diffusers_save import diffusers_layout, folder_configs
from sdstudio.models.loading import load_model, save_model
from sdstudio.models.merge import convert_checkpoint
from sdstudio.models.sdxl import SizeConditioning, size_vector
from sdstudio.models.stablediffusion import StableDiffusion, random_model
from tests.reference import (
    diffusers_unet,
    diffusers_vae,
    randomise_,
    transformers_open_clip,
    transformers_sdxl_text,
)

logging.getLogger("transformers").setLevel(logging.ERROR)
logging.getLogger("diffusers").setLevel(logging.ERROR)

# What the one OpenCLIP key a transformers CLIPTextModelWithProjection has no place for is called, per preset.
LOGIT_SCALE = {
    "tiny-sdxl": f"{EMBEDDERS_PREFIX}1.model.logit_scale",
    "tiny-sdxl-refiner": f"{EMBEDDERS_PREFIX}0.model.logit_scale",
}
PIPELINES = {
    "tiny-sdxl": diffusers.StableDiffusionXLPipeline,
    "tiny-sdxl-refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
}


def _our_model(name: str, seed: int) -> StableDiffusion:
    model = random_model(PRESETS[name])
    randomise_(model, seed)  # LDM zero-inits residual branches: random weights make every comparison count
    return model


def _scheduler() -> diffusers.EulerDiscreteScheduler:
    return diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _write_with_diffusers(root: Path, config: ModelConfig, state: dict[str, Tensor]) -> Path:
    """A diffusers folder of these weights as diffusers itself writes it (tokenizers left out: null)."""
    vae, unet = diffusers_vae(config, state), diffusers_unet(config, state)
    if config.conditioner == "sdxl":
        clip_l, big_g = transformers_sdxl_text(config, state)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=None, tokenizer_2=None,
            unet=unet, scheduler=_scheduler(),
        )  # fmt: skip
    else:
        big_g = transformers_open_clip(config.text, state, f"{EMBEDDERS_PREFIX}0.model.")
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=_scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, StableDiffusion]]:
    """Per preset: a folder written by diffusers, and our model holding the same weights."""
    out = {}
    for seed, name in enumerate(("tiny-sdxl", "tiny-sdxl-refiner"), start=1):
        model = _our_model(name, seed)
        root = tmp_path_factory.mktemp("diffusers") / name
        out[name] = (_write_with_diffusers(root, model.config, model.state_dict()), model)
    return out


def _assert_same_state(expected: dict[str, Tensor], actual: dict[str, Tensor], skip: set[str]) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:4]}, extra {sorted(set(actual) - set(expected))[:4]}"
    )
    for key, want in expected.items():
        if key not in skip:
            assert actual[key].dtype == want.dtype and torch.equal(actual[key], want), key


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_diffusers_written_folder_loads_bit_identical(folders, name: str) -> None:
    root, model = folders[name]
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[name].__name__
    assert (root / "text_encoder").is_dir() == (name == "tiny-sdxl")  # the refiner has bigG alone
    loaded = load_model(root)
    assert loaded.config.name == name and same_architecture(loaded.config, PRESETS[name])
    assert loaded.config.vae.scale_factor == 0.13025
    # diffusers' folders keep every layer of both encoders: the penultimate is taken, no final LayerNorm
    assert loaded.config.text.layers == PRESETS[name].text.layers and not loaded.config.text.final_layer_norm
    # OpenCLIP's logit_scale (unused by SD) has no place in a diffusers folder: it loads as zero
    logit_scale = LOGIT_SCALE[name]
    _assert_same_state(model.state_dict(), loaded.model.state_dict(), skip={logit_scale})
    assert float(loaded.model.state_dict()[logit_scale]) == 0.0


def _hub_style_folder(root: Path, name: str) -> Path:
    """Only the JSON files of stabilityai/stable-diffusion-xl-base-1.0 / -refiner-1.0, as on the Hub."""
    refiner = name == "sdxl-refiner"
    clip_l = {
        "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
        "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
        "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2, "model_type": "clip_text_model",
    }  # fmt: skip
    big_g = {
        **clip_l, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
        "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
    }  # fmt: skip
    unet = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "center_input_sample": False,
        "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": 4, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "upcast_attention": None,
        "use_linear_projection": True,
    }  # fmt: skip
    if refiner:
        unet.update(
            attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4,
        )  # fmt: skip
    else:
        unet.update(
            attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
        )  # fmt: skip
    vae = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
        "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }  # fmt: skip
    scheduler = {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    }  # fmt: skip
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }  # fmt: skip
    files = {
        "model_index.json": index, "unet/config.json": unet, "vae/config.json": vae,
        "text_encoder_2/config.json": big_g, "scheduler/scheduler_config.json": scheduler,
        "tokenizer_2/special_tokens_map.json": {"pad_token": "!"},
    }  # fmt: skip
    if not refiner:
        files["text_encoder/config.json"] = clip_l
        files["tokenizer/special_tokens_map.json"] = {"pad_token": "<|endoftext|>"}
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(data))
    return root


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_hub_configs_give_the_preset_and_every_key_its_place(tmp_path: Path, name: str) -> None:
    """Full size on the meta device: the Hub's configs read as ``detect_config`` reads the single file, and the
    diffusers modules they describe convert to exactly our model's keys and shapes (logit_scale aside)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = _hub_style_folder(tmp_path / name, name)
    with torch.device("meta"):
        ours = StableDiffusion(PRESETS[name])
    want = _meta_shapes(ours)
    config = configs_from_diffusers_folder(root)
    assert config == detect_config(want) == PRESETS[name]

    unet_json = json.loads((root / "unet/config.json").read_text())
    vae_json = json.loads((root / "vae/config.json").read_text())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_json)
        vae = diffusers.AutoencoderKL.from_config(vae_json)
        big_g = CLIPTextModelWithProjection(
            CLIPTextConfig(**json.loads((root / "text_encoder_2/config.json").read_text()))
        )
        clip_l = None if name == "sdxl-refiner" else CLIPTextModel(
            CLIPTextConfig(**json.loads((root / "text_encoder/config.json").read_text()))
        )  # fmt: skip
    got = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict(), unet_json).items()}
    got |= {VAE_PREFIX + k: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict(), vae_json).items()}
    g = "1" if clip_l is not None else "0"
    got |= {
        f"{EMBEDDERS_PREFIX}{g}.{k}": tuple(v.shape) for k, v in open_clip_from_hf(big_g.state_dict()).items()
    }
    if clip_l is not None:
        got |= {
            f"{EMBEDDERS_PREFIX}0.{k}": tuple(v.shape) for k, v in clip_to_ldm(clip_l.state_dict()).items()
        }
    assert got == {k: s for k, s in want.items() if not k.endswith("logit_scale")}


def test_depths_and_heads_from_diffusers_configs() -> None:
    """transformer_layers_per_block per level (levels without attention ignored, the middle block the last
    level's) and heads as detect.py counts them, for diffusers' own conversion of our SDXL yamls too."""
    import warnings

    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from tests.reference import ldm_yaml

    converted = {}
    for name in ("sdxl", "sdxl-refiner", "tiny-sdxl", "tiny-sdxl-refiner"):
        preset = PRESETS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dconfig = create_unet_diffusers_config_from_ldm(
                ldm_yaml(preset.unet, preset.vae), {}, image_size=512
            )
        dconfig.update(norm_num_groups=preset.unet.norm_groups)
        # diffusers tells SDXL by its context width (2048 / 1280); the tiny ones as tests.reference does
        dconfig.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
        assert unet_config_from_diffusers(dconfig) == preset.unet, name
        converted[name] = dconfig
    assert converted["sdxl"]["transformer_layers_per_block"] == [0, 2, 10]
    # the Hub writes 1 for SDXL's first level, which has no attention: still our (0, 2, 10)
    hub = {**converted["sdxl"], "transformer_layers_per_block": [1, 2, 10]}
    assert unet_config_from_diffusers(hub).transformer_depth == (0, 2, 10)
    # one depth everywhere reads as one number (the refiner's 4), and a ragged list is refused
    assert converted["sdxl-refiner"]["transformer_layers_per_block"] == 4
    with pytest.raises(CheckpointError, match="transformer_layers_per_block"):
        unet_config_from_diffusers({**converted["sdxl"], "transformer_layers_per_block": [1, 2]})


# ---------------------------------------------------------------------------------------------- broken ones


def _broken_copy(folders, tmp_path: Path, name: str = "tiny-sdxl") -> Path:
    return Path(shutil.copytree(folders[name][0], tmp_path / "broken"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_text_encoder_2_folder_is_named(folders, tmp_path: Path) -> None:
    root = _broken_copy(folders, tmp_path)
    shutil.rmtree(root / "text_encoder_2")
    with pytest.raises(
        CheckpointError, match=r"missing the text_encoder_2/ folder of a diffusers SDXL model"
    ):
        load_model(root)


def test_unlisted_text_encoder_2_is_named(folders, tmp_path: Path) -> None:
    root = _broken_copy(folders, tmp_path)
    _edit_json(root / "model_index.json", text_encoder_2=[None, None])
    with pytest.raises(CheckpointError, match=r"StableDiffusionXLPipeline lists no text_encoder_2"):
        load_model(root)


def test_missing_clip_l_folder_of_a_base_is_named(folders, tmp_path: Path) -> None:
    root = _broken_copy(folders, tmp_path)
    shutil.rmtree(root / "text_encoder")
    with pytest.raises(CheckpointError, match=r"missing the text_encoder/ folder of a diffusers SDXL model"):
        load_model(root)


def test_text_encoder_2_without_projection_is_refused(folders, tmp_path: Path) -> None:
    root = _broken_copy(folders, tmp_path, "tiny-sdxl-refiner")
    _edit_json(root / "text_encoder_2/config.json", architectures=["CLIPTextModel"])
    with pytest.raises(CheckpointError, match=r"text_encoder_2 must be a CLIPTextModelWithProjection"):
        load_model(root)
    _edit_json(root / "text_encoder_2/config.json", architectures=["CLIPTextModelWithProjection"])
    weights = root / "text_encoder_2/model.safetensors"
    state = load_file(weights)
    del state["text_projection.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"text_encoder_2: no text_projection\.weight"):
        load_model(root)


def test_vector_width_that_does_not_fit_the_encoders_is_refused(folders, tmp_path: Path) -> None:
    root = _broken_copy(folders, tmp_path)
    _edit_json(root / "unet/config.json", projection_class_embeddings_input_dim=32 + 5 * 256)
    with pytest.raises(
        CheckpointError, match=r"is 1312; SDXL's pooled text \(32\) and 6 size values make 1568"
    ):
        load_model(root)
    _edit_json(root / "unet/config.json", projection_class_embeddings_input_dim=1568, cross_attention_dim=32)
    with pytest.raises(
        CheckpointError, match=r"cross_attention_dim 32 is not the text encoders' widths together \(64\)"
    ):
        load_model(root)


# ------------------------------------------------------------------------------------------------- saving


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_saved_folder_runs_in_diffusers_as_ours(tmp_path: Path, name: str) -> None:
    """Our model -> single file -> ``convert_checkpoint`` -> diffusers' SDXL pipeline class: its UNet, text
    encoders and VAE compute what ours do, and the folder loads back into ours bit for bit."""
    model = _our_model(name, seed=5)
    config = model.config
    refiner = config.conditioner == "sdxl_refiner"
    file = save_model(model, tmp_path / "model.safetensors", dtype=torch.float32)
    report = convert_checkpoint(file, tmp_path / "folder")
    assert report.dropped == (LOGIT_SCALE[name],)
    pipe = PIPELINES[name].from_pretrained(tmp_path / "folder")
    assert (pipe.text_encoder is None) == refiner and pipe.vae.config.scaling_factor == 0.13025

    gen = torch.Generator().manual_seed(0)
    body = torch.randint(1, 49000, (2, 12), generator=gen)
    framed = torch.cat([torch.full((2, 1), 49406), body, torch.full((2, 1), 49407)], dim=1)
    ids_l = torch.cat([framed, torch.full((2, 63), 49407)], dim=1)  # CLIP-L pads with EOS
    ids_g = torch.cat([framed, torch.zeros(2, 63, dtype=torch.long)], dim=1)  # bigG with "!"
    hidden, pooled = model.text_encoder.encode([ids_g] if refiner else [ids_l, ids_g], 2)
    encoders = [pipe.text_encoder_2] if refiner else [pipe.text_encoder, pipe.text_encoder_2]
    outputs = [
        enc(ids, output_hidden_states=True)
        for enc, ids in zip(encoders, [ids_g] if refiner else [ids_l, ids_g])
    ]
    for ours_hidden, out in zip(hidden, outputs):
        torch.testing.assert_close(ours_hidden, out.hidden_states[-2], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        pooled, outputs[-1].text_embeds, rtol=0, atol=1e-5
    )  # the transposed projection

    context = torch.cat(hidden, dim=-1)  # [2, 77, context_dim]
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([981.0, 20.0])
    size = SizeConditioning(original=(96, 80), target=(64, 72), crop=(8, 4), aesthetic=5.5)
    time_ids = torch.tensor(
        [[96.0, 80.0, 8.0, 4.0, 5.5] if refiner else [96.0, 80.0, 8.0, 4.0, 64.0, 72.0]] * 2
    )
    ours = model.unet(x, t, context, y=size_vector(pooled, size, refiner))
    theirs = pipe.unet(
        x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    torch.testing.assert_close(model.vae.decode(z), pipe.vae.decode(z).sample, rtol=0, atol=1e-4)

    back = load_model(tmp_path / "folder")
    assert back.config == config  # the preset, default size included (the UNet's sample_size)
    _assert_same_state(model.state_dict(), back.model.state_dict(), skip={LOGIT_SCALE[name]})


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_layout_fits_diffusers_modules(name: str) -> None:
    """Full size on the meta device: the folder we would write holds exactly the keys and shapes of the modules
    its config files describe, and those configs read back as the preset."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = PRESETS[name]
    with torch.device("meta"):
        ours = StableDiffusion(config)
    layout = diffusers_layout(config, _meta_shapes(ours))
    assert set(layout.dropped) == {k for k in _meta_shapes(ours) if k.endswith("logit_scale")}
    written: dict[str, dict[str, tuple[int, ...]]] = {}
    for pieces in layout.placements.values():
        for p in pieces:
            written.setdefault(p.component, {})[p.key] = p.shape
    files = folder_configs(config, layout.text_layers, torch.float32)
    with torch.device("meta"):
        modules = {
            "unet": diffusers.UNet2DConditionModel.from_config(files["unet/config.json"]),
            "vae": diffusers.AutoencoderKL.from_config(files["vae/config.json"]),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**files["text_encoder_2/config.json"])
            ),
        }
        if name == "sdxl":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**files["text_encoder/config.json"]))
    assert set(written) == set(modules)
    for component, module in modules.items():
        shapes = _meta_shapes(module)
        if component.startswith("text_encoder"):  # transformers >= 5 drops CLIPTextModel's text_model. prefix
            shapes = {
                k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: s
                for k, s in shapes.items()
            }
        assert written[component] == shapes, component
    assert files["model_index.json"]["_class_name"] == PIPELINES[f"tiny-{name}"].__name__
