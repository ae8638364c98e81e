"""Parity of our CLIP text encoders with transformers' ``CLIPTextModel``.

Our weights (original single-file layout) go through diffusers' own single-file converters into a
``CLIPTextModel``; both run the same random tokens and must agree on every "Clip skip" layer.
"""

from __future__ import annotations

import gc
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from sdstudio.models.clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, build_text_encoder
from sdstudio.models.configs import SD1_TEXT, TextEncoderConfig, preset

TOLERANCE = 1e-4  # max abs difference, fp32


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with seeded noise scaled so activations stay O(1) through the layers."""
    generator = torch.Generator().manual_seed(seed)
    width = model.config.width
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if re.search(r"(layer_norm\d?|ln_\d|ln_final)\.weight$", name):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("logit_scale"):
                param.copy_(noise.abs())
            else:
                param.copy_(noise * width**-0.5)


def _tokens(config: TextEncoderConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 49406, (batch, config.max_positions), generator=generator)
    tokens[:, 0] = 49406  # BOS
    tokens[:, 20] = 49407  # EOS, then padding
    return tokens


def _hf_config(config: TextEncoderConfig, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.width * config.mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
    )


def _to_transformers(ours: torch.nn.Module) -> CLIPTextModel:
    """Our state dict, as a single-file checkpoint, converted by diffusers and loaded into transformers."""
    config = ours.config
    checkpoint = {f"cond_stage_model.{k}": v for k, v in ours.state_dict().items()}
    if config.kind == "clip":
        converted = convert_ldm_clip_checkpoint(checkpoint)
    else:
        # The converter reads only ``.config.hidden_size`` of the model it is given.
        stand_in = SimpleNamespace(config=CLIPTextConfig(hidden_size=config.width))
        converted = convert_open_clip_checkpoint(stand_in, checkpoint)
        projection = converted.pop("text_projection.weight", None)
        if projection is not None:  # CLIPTextModel has no projection; check the transpose and drop it
            torch.testing.assert_close(projection, ours.model.text_projection.T, rtol=0, atol=0)
    layer_ids = {int(m.group(1)) for k in converted if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    with torch.device("meta"):  # skips transformers' weight init; every parameter is assigned below
        hf = CLIPTextModel(_hf_config(config, max(layer_ids) + 1))
    if not hasattr(hf, "text_model"):
        # transformers >= 5 flattened CLIPTextModel; its from_pretrained strips this prefix on load.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    hf.load_state_dict(converted, strict=True, assign=True)
    assert not any(p.is_meta for p in hf.parameters())
    return hf.eval()


def _random_encoder(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_text_encoder(preset(name).text)
    model.to_empty(device="cpu")
    _randomise(model, seed=1)
    return model.eval()


def _check_parity(name: str, full: bool) -> None:
    """Every clip_skip (``full``) or the two named cases: the last converted layer and the one before."""
    ours = _random_encoder(name)
    config = ours.config
    hf = _to_transformers(ours)
    hf_layers = hf.config.num_hidden_layers  # SD 2.x: diffusers drops the last of 24 layers
    top_skip = config.layers - hf_layers + 1
    tokens = _tokens(config)
    with torch.no_grad():
        # position_ids passed because the meta-built model's non-persistent buffer holds no values.
        ref = hf(
            input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], output_hidden_states=True
        )
        # hidden_states[j] is the output of layer j (1-based), before the final LayerNorm.
        assert len(ref.hidden_states) == hf_layers + 1
        final_ln = getattr(hf, "text_model", hf).final_layer_norm
        skips = range(top_skip, config.layers + 1) if full else (top_skip, top_skip + 1)
        for clip_skip in skips:
            layer = config.layers - clip_skip + 1
            out = ours(tokens, clip_skip=clip_skip)
            assert out.shape == (tokens.shape[0], config.max_positions, config.width)
            if clip_skip == top_skip:
                expected = ref.last_hidden_state
            elif clip_skip == top_skip + 1:
                expected = final_ln(ref.hidden_states[-2])
            else:
                expected = final_ln(ref.hidden_states[layer])
            diff = (out - expected).abs().max().item()
            assert diff <= TOLERANCE, f"{name} clip_skip={clip_skip}: max abs diff {diff:.2e}"
    del ours, hf, ref
    gc.collect()


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_parity_with_transformers_tiny(name: str) -> None:
    _check_parity(name, full=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_parity_with_transformers_full_width(name: str) -> None:
    # sd15: clip_skip 1 and 2. sd2: diffusers drops layer 24, so clip_skip 2 (SD 2.x's default) and 3.
    _check_parity(name, full=False)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_token_embeds_equal_to_lookup_give_identical_output(name: str) -> None:
    config = preset(name).text
    model = build_text_encoder(config).eval()
    tokens = _tokens(config)
    with torch.no_grad():
        embeds = model.token_embedding(tokens)  # [batch, tokens, width]
        for clip_skip in (1, 2):
            assert torch.equal(model(tokens, clip_skip, token_embeds=embeds), model(tokens, clip_skip))
        changed = embeds.clone()
        changed[:, 5] += 1.0
        out = model(tokens, 1, token_embeds=changed)
        base = model(tokens, 1)
        # Causal: positions before the change are untouched, the changed one and later ones move.
        assert torch.equal(out[:, :5], base[:, :5])
        assert (out[:, 5:] - base[:, 5:]).abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_runs_in_the_weights_dtype(name: str) -> None:
    config = preset(name).text
    model = build_text_encoder(config).eval()
    tokens = _tokens(config)
    with torch.no_grad():
        full = model(tokens, 1)
        model.to(torch.bfloat16)
        half = model(tokens, 1, token_embeds=model.token_embedding(tokens).float())
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=0.1)


def test_clip_skip_out_of_range_is_rejected() -> None:
    model = build_text_encoder(preset("tiny").text)
    tokens = _tokens(model.config)
    for clip_skip in (0, model.config.layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            model(tokens, clip_skip)


def test_state_dict_keys_match_real_checkpoints() -> None:
    with torch.device("meta"):
        sd1 = build_text_encoder(preset("sd15").text)
        sd2 = build_text_encoder(preset("sd2").text)
    assert isinstance(sd1, FrozenCLIPEmbedder) and isinstance(sd2, FrozenOpenCLIPEmbedder)
    keys1 = {f"cond_stage_model.{k}": v.shape for k, v in sd1.state_dict().items()}
    keys2 = {f"cond_stage_model.{k}": v.shape for k, v in sd2.state_dict().items()}
    # Shapes of keys in the released v1-5-pruned and v2-1_768-ema-pruned checkpoints.
    real1 = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.bias": (768,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.layer_norm1.weight": (768,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,),
    }
    real2 = {
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_bias": (3072,),
        "cond_stage_model.model.transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
        "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": (1024,),
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight": (1024, 4096),
        "cond_stage_model.model.ln_final.weight": (1024,),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    }
    for real, ours in ((real1, keys1), (real2, keys2)):
        for key, shape in real.items():
            assert key in ours, key
            assert tuple(ours[key]) == shape, key
    # 12 layers x 16 tensors + 4; 24 layers x 12 tensors + 6. No position_ids buffer.
    assert len(keys1) == 196 and len(keys2) == 294
    assert not any("position_ids" in k for k in keys1)


def test_sd1_parameter_count_equals_clip_vit_l14_text() -> None:
    with torch.device("meta"):
        ours = build_text_encoder(SD1_TEXT)
        reference = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
        )
    count = sum(p.numel() for p in ours.parameters())
    assert count == 123_060_480
    assert count == sum(p.numel() for p in reference.parameters())


def test_build_rejects_a_mismatched_kind() -> None:
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(preset("tiny-sd2").text)
    with pytest.raises(ValueError):
        FrozenOpenCLIPEmbedder(preset("tiny").text)
