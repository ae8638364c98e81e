"""Diffusers folders -> single-file layout, checked by converting back with diffusers' own converters.

Every tensor must survive the round trip bit for bit; full-width SD 1.5 / SD 2 key sets and shapes are
checked on the meta device (no memory allocated).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import PRESETS
from sdstudio.models.diffusers_convert import (
    clip_to_ldm,
    configs_from_diffusers_folder,
    load_diffusers_folder,
    open_clip_from_hf,
    text_config_from_diffusers,
    unet_config_from_diffusers,
    unet_to_ldm,
    vae_config_from_diffusers,
    vae_to_ldm,
)

logging.getLogger("transformers").setLevel(logging.ERROR)

# ----------------------------------------------------------------------------------- tiny random models

TINY_UNET = {
    "sample_size": 32,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
# SD 2.x style: linear projections, heads per level chosen for a fixed head size (8 here, 64 in SD 2).
TINY_UNET_SD2 = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=[4, 8])
TINY_VAE = {
    "sample_size": 64,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def _hf_text_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The text encoder's weights in the classic ``text_model.*`` naming (transformers 5 drops the prefix
    for ``CLIPTextModel``), which is what diffusers' converters produce."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def _assert_identical(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, extra {sorted(set(actual) - set(expected))[:5]}"
    )
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key


def _write_folder(
    root: Path,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text: torch.nn.Module,
    prediction: str,
    pad_token: str,
    unet_kwargs: dict | None = None,
    vae_kwargs: dict | None = None,
) -> Path:
    root.mkdir(parents=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", type(text).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    unet.save_pretrained(root / "unet", **(unet_kwargs or {}))
    vae.save_pretrained(root / "vae", **(vae_kwargs or {}))
    text.save_pretrained(root / "text_encoder")
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction
    ).save_pretrained(root / "scheduler")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return root


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """An SD 1.x-style folder equal to the ``tiny`` preset, all safetensors."""
    unet = _seeded(0, lambda: UNet2DConditionModel(**TINY_UNET))
    vae = _seeded(1, lambda: AutoencoderKL(**TINY_VAE))
    text = _seeded(2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    root = _write_folder(
        tmp_path_factory.mktemp("sd1") / "tiny-sd1",
        unet=unet,
        vae=vae,
        text=text,
        prediction="epsilon",
        pad_token="<|endoftext|>",
    )
    return root, unet, vae, text


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """An SD 2.x-style (v-prediction) folder exercising the other file forms: a sharded UNet, an fp16-variant
    VAE and a pickled (``.bin``) text encoder with transformers 4 key names."""
    unet = _seeded(3, lambda: UNet2DConditionModel(**TINY_UNET_SD2))
    vae = _seeded(4, lambda: AutoencoderKL(**TINY_VAE))
    text = _seeded(5, lambda: CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT, hidden_act="gelu"))))
    root = _write_folder(
        tmp_path_factory.mktemp("sd2") / "tiny-sd2-v",
        unet=unet,
        vae=vae.half(),
        text=text,
        prediction="v_prediction",
        pad_token="!",
        unet_kwargs={"max_shard_size": "1MB"},
        vae_kwargs={"variant": "fp16"},
    )
    vae.float()  # weights now hold the fp16-rounded values that the folder stores
    # transformers 5 only writes safetensors: write the pickle by hand, with the keys (text_model.*) and the
    # position_ids buffer that transformers 4 folders on the Hub carry.
    (root / "text_encoder" / "model.safetensors").unlink()
    hub_keys = {**_hf_text_state(text), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save(hub_keys, root / "text_encoder" / "pytorch_model.bin")
    return root, unet, vae, text


# ------------------------------------------------------------------------------------ folder round trips


def test_sd1_folder_round_trips_through_diffusers_converters(sd1):
    root, unet, vae, text = sd1
    _config, state = load_diffusers_folder(root, torch.float32)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in state
    )
    _assert_identical(unet.state_dict(), convert_ldm_unet_checkpoint(state, dict(unet.config)))
    _assert_identical(vae.state_dict(), convert_ldm_vae_checkpoint(state, dict(vae.config)))
    _assert_identical(_hf_text_state(text), convert_ldm_clip_checkpoint(state))
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in state
    # The conversion renames only: the UNet/VAE/text tensors are the ones read from disk, no copies.
    n_weights = len(unet.state_dict()) + len(vae.state_dict()) + len(_hf_text_state(text))
    assert len(state) == n_weights


def test_sd2_folder_round_trips_through_diffusers_converters(sd2):
    root, unet, vae, text = sd2
    config, state = load_diffusers_folder(root)  # dtype None: as stored (the VAE is an fp16 variant)
    assert config.text.kind == "open_clip"
    _assert_identical(unet.state_dict(), convert_ldm_unet_checkpoint(state, dict(unet.config)))
    vae_fp16 = {k: v.half() for k, v in vae.state_dict().items()}
    _assert_identical(vae_fp16, convert_ldm_vae_checkpoint(state, dict(vae.config)))
    _assert_identical(_hf_text_state(text), convert_open_clip_checkpoint(text, state))
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)  # linear


def test_dtype_casts_every_floating_tensor(sd2):
    _, state = load_diffusers_folder(sd2[0], torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    _, stored = load_diffusers_folder(sd2[0], None)
    assert stored["model.diffusion_model.out.2.weight"].dtype == torch.float32
    assert stored["first_stage_model.decoder.conv_out.weight"].dtype == torch.float16


# -------------------------------------------------------------------------------------- configs


def test_sd1_folder_config_is_the_tiny_preset(sd1):
    config = configs_from_diffusers_folder(sd1[0])
    assert config == PRESETS["tiny"]
    assert config.default_size == 32 * 2  # UNet sample_size x VAE downsampling


def test_sd2_folder_config(sd2):
    config = configs_from_diffusers_folder(sd2[0])
    preset = PRESETS["tiny-sd2"]
    # A diffusers text encoder is used at its last layer; CLIPTextModel has no text projection.
    text = dataclasses.replace(preset.text, default_clip_skip=1, projection_dim=0)
    assert config == dataclasses.replace(preset, name="custom", text=text, prediction="v")
    assert config.unet.heads_at(32) == (4, 8) and config.unet.heads_at(64) == (8, 8)
    assert config.text.pad_with_eos is False and config.text.activation == "gelu"


SD15_UNET = {"cross_attention_dim": 768}  # diffusers' defaults are otherwise SD 1.x's
SD2_UNET = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD1_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
SD2_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
}


def test_full_size_configs_match_the_presets():
    # SD 1's attention_head_dim=8 is a head count; SD 2's [5, 10, 20, 20] is 64 channels per head.
    with torch.device("meta"):  # the configs diffusers writes for these models, with all their defaults
        sd15, sd2, inpaint = (
            dict(UNet2DConditionModel(**kwargs).config)
            for kwargs in (SD15_UNET, SD2_UNET, dict(SD15_UNET, in_channels=9))
        )
    assert unet_config_from_diffusers(sd15) == PRESETS["sd15"].unet
    assert unet_config_from_diffusers(sd2) == PRESETS["sd2"].unet
    assert unet_config_from_diffusers(inpaint) == PRESETS["sd15-inpaint"].unet
    assert vae_config_from_diffusers(SD_VAE) == PRESETS["sd15"].vae
    assert text_config_from_diffusers(CLIPTextConfig(**SD1_TEXT).to_dict()) == PRESETS["sd15"].text
    sd2_text = text_config_from_diffusers(CLIPTextConfig(**SD2_TEXT).to_dict(), pad_token="!")
    assert sd2_text == dataclasses.replace(
        PRESETS["sd2"].text, layers=23, default_clip_skip=1, projection_dim=0
    )


# -------------------------------------------------------------------- full-width key sets (meta device)


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_sd15_full_width_key_sets_and_shapes():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
    ldm_unet = unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm_vae = vae_to_ldm(vae.state_dict(), dict(vae.config))
    ldm_text = clip_to_ldm(text.state_dict())
    # Tensor counts of the original v1-5-pruned.safetensors (position_ids aside).
    assert (len(ldm_unet), len(ldm_vae), len(ldm_text)) == (686, 248, 196)
    unet_shapes, vae_shapes = _shapes(ldm_unet), _shapes(ldm_vae)
    for key, shape in {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # no attention at the lowest level: slot 1
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # after a transformer: slot 2
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "time_embed.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }.items():
        assert unet_shapes[key] == shape, key
    for key, shape in {
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.2.conv2.weight": (256, 256, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    }.items():
        assert vae_shapes[key] == shape, key
    assert (
        "encoder.down.3.downsample.conv.weight" not in vae_shapes
        and "decoder.up.0.upsample.conv.weight" not in vae_shapes
    )
    # Back through diffusers: the same keys and shapes.
    full = {"model.diffusion_model." + k: v for k, v in ldm_unet.items()}
    full |= {"first_stage_model." + k: v for k, v in ldm_vae.items()}
    full |= {"cond_stage_model." + k: v for k, v in ldm_text.items()}
    assert _shapes(convert_ldm_unet_checkpoint(full, dict(unet.config))) == _shapes(unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(full, dict(vae.config))) == _shapes(vae.state_dict())
    assert _shapes(convert_ldm_clip_checkpoint(full)) == _shapes(_hf_text_state(text))


def test_sd2_full_width_key_sets_and_shapes():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET)
        text = CLIPTextModel(CLIPTextConfig(**SD2_TEXT))
    ldm_unet = unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm_text = open_clip_from_hf(text.state_dict())
    assert len(ldm_unet) == 686 and len(ldm_text) == 23 * 12 + 4
    assert ldm_unet["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert ldm_unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 1024)
    assert ldm_text["model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    assert ldm_text["model.transformer.resblocks.0.mlp.c_fc.weight"].shape == (4096, 1024)
    assert ldm_text["model.positional_embedding"].shape == (77, 1024)
    full = {"cond_stage_model." + k: v for k, v in ldm_text.items()}
    assert _shapes(convert_open_clip_checkpoint(text, full)) == _shapes(_hf_text_state(text))


# -------------------------------------------------------------------------------- converter details


def test_unet_with_plain_blocks_and_two_layers_round_trips():
    # Mixed levels (DownBlock2D / UpBlock2D) and layers_per_block=2 move the upsampler between slots 1 and 2.
    config = dict(
        TINY_UNET,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet = _seeded(6, lambda: UNet2DConditionModel(**config))
    ldm = unet_to_ldm(unet.state_dict(), dict(unet.config))
    assert "output_blocks.2.1.conv.weight" in ldm and "input_blocks.3.0.op.weight" in ldm
    back = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in ldm.items()}, dict(unet.config)
    )
    _assert_identical(unet.state_dict(), back)
    assert unet_config_from_diffusers(dict(unet.config)).attention_resolutions == (1,)


def test_vae_accepts_pre_0_14_attention_names():
    vae = _seeded(7, lambda: AutoencoderKL(**TINY_VAE))
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for key, value in vae.state_dict().items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    ldm = vae_to_ldm(old, dict(vae.config))
    _assert_identical(vae_to_ldm(vae.state_dict(), dict(vae.config)), ldm)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)


def test_clip_accepts_hub_keys_with_position_ids():
    # Hub folders (transformers 4) store text_model.* keys and the position_ids buffer.
    text = _seeded(8, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    hub = {**_hf_text_state(text), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    _assert_identical(clip_to_ldm(text.state_dict()), clip_to_ldm(hub))
    assert not any("position_ids" in k for k in clip_to_ldm(hub))


def test_open_clip_text_projection_is_transposed():
    text = _seeded(
        9, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**dict(TINY_TEXT, hidden_act="gelu")))
    )
    ldm = open_clip_from_hf(text.state_dict())
    assert torch.equal(ldm["model.text_projection"], text.state_dict()["text_projection.weight"].T)
    full = {"cond_stage_model." + k: v for k, v in ldm.items()}
    # diffusers' converter skips cond_stage_model.model.text_projection (SD 2's pipelines never use it).
    expected = {k: v for k, v in _hf_text_state(text).items() if k != "text_projection.weight"}
    _assert_identical(expected, convert_open_clip_checkpoint(text, full))
    saved = {
        **text.config.to_dict(),
        "architectures": ["CLIPTextModelWithProjection"],
    }  # as save_pretrained writes
    assert text_config_from_diffusers(saved).projection_dim == 32


def test_open_clip_fuses_q_k_v_in_order():
    text = _seeded(10, lambda: CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT, hidden_act="gelu"))))
    state = _hf_text_state(text)
    fused = open_clip_from_hf(state)["model.transformer.resblocks.1.attn.in_proj_bias"]
    prefix = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(fused[:32], state[prefix + "q_proj.bias"])
    assert torch.equal(fused[32:64], state[prefix + "k_proj.bias"])
    assert torch.equal(fused[64:], state[prefix + "v_proj.bias"])


# ------------------------------------------------------------------------------------------- errors


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_model_index_is_named(sd1, tmp_path):
    folder = _copy_folder(sd1[0], tmp_path / "m")
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_index\.json: missing"):
        load_diffusers_folder(folder, torch.float32)


def test_missing_unet_folder_is_named(sd1, tmp_path):
    import shutil

    folder = _copy_folder(sd1[0], tmp_path / "m")
    shutil.rmtree(folder / "unet")
    with pytest.raises(CheckpointError, match=r"missing the unet/ folder"):
        load_diffusers_folder(folder, torch.float32)


def test_missing_weights_file_is_named(sd1, tmp_path):
    folder = _copy_folder(sd1[0], tmp_path / "m")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae: no weights file"):
        load_diffusers_folder(folder, torch.float32)


def test_not_a_folder():
    with pytest.raises(CheckpointError, match="no such folder"):
        load_diffusers_folder("/nonexistent/sd-folder", torch.float32)


class _Payload:
    """Stands for arbitrary code in a pickle."""


def test_bin_that_needs_code_is_refused(sd2, tmp_path):
    folder = _copy_folder(sd2[0], tmp_path / "m")
    torch.save({"w": _Payload()}, folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_diffusers_folder(folder, torch.float32)


def test_unsupported_unet_options_are_refused():
    with pytest.raises(CheckpointError, match=r"class_embed_type='timestep'"):
        unet_config_from_diffusers({**TINY_UNET, "class_embed_type": "timestep"})
    with pytest.raises(CheckpointError, match="do not mirror"):
        unet_config_from_diffusers(
            {
                **TINY_UNET,
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            }
        )


def test_unexpected_weight_is_an_error_not_dropped():
    with pytest.raises(CheckpointError, match="class_embedding"):
        unet_to_ldm({"class_embedding.linear_1.weight": torch.zeros(1)}, {"layers_per_block": 1})


# ------------------------------------------------------------------------------- end to end, our modules


@pytest.mark.parametrize("folder", ["sd1", "sd2"])
def test_loaded_folder_computes_what_diffusers_computes(folder, request):
    """The converted weights in our LDM-named modules against diffusers' own models on the same folder."""
    from sdstudio.models.loading import load_model

    root, unet, vae, text = request.getfixturevalue(folder)
    model = load_model(root).model
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49408, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        # clip_skip 1: diffusers pipelines take the text encoder's last layer.
        torch.testing.assert_close(
            model.cond_stage_model(tokens, clip_skip=1), text(tokens).last_hidden_state
        )
        torch.testing.assert_close(
            model.model.diffusion_model(latents, timesteps, context),
            unet(latents, timesteps, context).sample,
            rtol=1e-4,
            atol=1e-5,
        )
        torch.testing.assert_close(
            model.first_stage_model.decode(latents), vae.decode(latents).sample, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("folder", ["sd1", "sd2"])
def test_folder_and_its_single_file_save_load_identical_weights(folder, request, tmp_path):
    from sdstudio.models.loading import checkpoint_info, load_model, save_model

    root = request.getfixturevalue(folder)[0]
    from_folder = load_model(root)
    path = save_model(from_folder.model, tmp_path / "single.safetensors", dtype=None)
    from_file = load_model(path)
    assert from_file.config == from_folder.config  # carried in the header, v-prediction included
    a, b = from_folder.model.state_dict(), from_file.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint_info(path)["prediction"] == from_folder.config.prediction
