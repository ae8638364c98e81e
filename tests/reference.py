"""Reference implementations holding our weights: diffusers / transformers models built from a
single-file state dict through diffusers' own converters. Test-only; nothing here is ours to trust."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdstudio.models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig


def randomise_(model: nn.Module, seed: int) -> None:
    """Fan-in-scaled uniform weights (std 1 / sqrt(fan_in)), so activations stay O(1) through every
    residual branch; uniform rather than Gaussian because it is twice as fast to draw for 860M weights.

    LDM zero-inits each residual branch's last layer, which would make parity comparisons vacuous.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # conv / linear
                bound = (3.0 / p[0].numel()) ** 0.5
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):  # norm scale
                p.uniform_(0.8, 1.2, generator=gen)
            else:  # biases
                p.uniform_(-0.2, 0.2, generator=gen)


def random_unet(config: UNetConfig, seed: int = 0) -> nn.Module:
    """A fp32 CPU UNet with :func:`randomise_` weights, built on ``meta`` first to skip the default init."""
    from sdstudio.models.unet import UNetModel

    with torch.device("meta"):
        model = UNetModel(config)
    model.to_empty(device="cpu")
    randomise_(model, seed)
    return model.eval()


def cfg_inputs(
    config: UNetConfig,
    side: int,
    dtype: torch.dtype = torch.float32,
    timesteps: tuple[float, float] = (500.0, 500.0),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of one CFG-batched UNet call: latents [2, in_channels, side, side], timesteps [2] and a
    random text context [2, 77, context_dim] (latents and context in ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, side, side, generator=gen).to(dtype)
    context = torch.randn(2, 77, config.context_dim, generator=gen).to(dtype)
    return x, torch.tensor(timesteps), context


def write_random_checkpoint(arch: str, path: str | Path, seed: int = 0) -> Path:
    """A single-file fp32 checkpoint of preset ``arch`` with :func:`randomise_` weights, for benchmarks.

    With LDM's own init the UNet predicts ~0, the latents of a 20-step run go to inf/NaN, and timings or
    precision comparisons on them say nothing; fan-in-scaled weights keep every activation O(1)."""
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model

    model = random_model(PRESETS[arch], seed=seed)
    randomise_(model, seed=seed)
    return save_model(model, path, dtype=torch.float32)


def ldm_yaml(unet: UNetConfig, vae: VAEConfig) -> dict[str, Any]:
    """An original LDM yaml (as a dict) describing these networks, for diffusers' config readers."""
    params: dict[str, Any] = {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": list(unet.channel_mult),
        "num_res_blocks": unet.num_res_blocks,
        "attention_resolutions": list(unet.attention_resolutions),
        "transformer_depth": unet.transformer_depth,
        "context_dim": unet.context_dim,
        "use_linear_in_transformer": unet.use_linear_in_transformer,
    }
    if unet.adm_in_channels:  # SDXL
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = unet.adm_in_channels
    if unet.num_head_channels == -1:  # the real yamls name exactly one of these
        params["num_heads"] = unet.num_heads
    else:
        params["num_head_channels"] = unet.num_head_channels
    ddconfig = {
        "double_z": True,
        "z_channels": vae.z_channels,
        "resolution": 256,
        "in_channels": vae.in_channels,
        "out_ch": vae.out_ch,
        "ch": vae.ch,
        "ch_mult": list(vae.ch_mult),
        "num_res_blocks": vae.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return {
        "model": {
            "params": {
                "scale_factor": vae.scale_factor,
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }


def diffusers_unet(config: ModelConfig, state: dict[str, torch.Tensor]):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dconfig = create_unet_diffusers_config_from_ldm(ldm_yaml(config.unet, config.vae), {}, image_size=512)
    dconfig["norm_num_groups"] = config.unet.norm_groups  # LDM hard-codes 32; our tiny presets do not
    if config.unet.adm_in_channels:  # diffusers tells SDXL by its context width (2048 / 1280); tiny ones too
        dconfig.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dconfig)
    result = unet.load_state_dict(convert_ldm_unet_checkpoint(state, dconfig), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return unet.eval()


def diffusers_vae(config: ModelConfig, state: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dconfig = create_vae_diffusers_config_from_ldm(ldm_yaml(config.unet, config.vae), {}, image_size=512)
    dconfig["norm_num_groups"] = config.vae.norm_groups
    dconfig["scaling_factor"] = config.vae.scale_factor
    with torch.device("meta"):
        vae = AutoencoderKL(**dconfig)
    result = vae.load_state_dict(convert_ldm_vae_checkpoint(state, dconfig), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return vae.eval()


def hf_text_config(text: TextEncoderConfig, **extra: Any):
    """transformers' CLIPTextConfig of one of our text encoder configs."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.width,
        intermediate_size=text.width * text.mlp_ratio,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        max_position_embeddings=text.max_positions,
        hidden_act=text.activation,
        **extra,
    )


def transformers_clip(config: ModelConfig, state: dict[str, torch.Tensor]):
    """SD 1.x text encoder as transformers' CLIPTextModel."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    text = config.text
    assert text.kind == "clip"
    hf = hf_text_config(text)
    model = CLIPTextModel(hf)
    converted = convert_ldm_clip_checkpoint(state)
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    if not hasattr(model, "text_model"):  # transformers >= 5 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and all("position_ids" in k for k in result.missing_keys), result
    return model.eval()


def transformers_open_clip(text: TextEncoderConfig, state: dict[str, torch.Tensor], prefix: str):
    """An OpenCLIP text tower (SDXL's bigG) as transformers' CLIPTextModelWithProjection, through diffusers'
    single-file converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    assert text.kind == "open_clip"
    hf = hf_text_config(text, projection_dim=text.projection_dim)
    model = CLIPTextModelWithProjection(hf)
    converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and all("position_ids" in k for k in result.missing_keys), result
    return model.eval()


def transformers_sdxl_text(config: ModelConfig, state: dict[str, torch.Tensor]):
    """SDXL's two text encoders as transformers models: (CLIPTextModel, CLIPTextModelWithProjection)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    text = config.text
    hf = hf_text_config(text)
    clip_l = CLIPTextModel(hf)
    converted = convert_ldm_clip_checkpoint(state)  # strips conditioner.embedders.0.transformer.
    converted = {k: v for k, v in converted.items() if k.startswith("text_model.") and "position_ids" not in k}
    if not hasattr(clip_l, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    result = clip_l.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and all("position_ids" in k for k in result.missing_keys), result
    assert config.text2 is not None
    big_g = transformers_open_clip(config.text2, state, "conditioner.embedders.1.model.")
    return clip_l.eval(), big_g


def diffusers_sdxl_pipeline(config: ModelConfig, state: dict[str, torch.Tensor], scheduler):
    """diffusers' StableDiffusionXLPipeline on these weights (no tokenizers: callers pass embeddings);
    returns (pipeline, CLIP-L, bigG) with the transformers text encoders."""
    import diffusers

    clip_l, big_g = transformers_sdxl_text(config, state)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers_vae(config, state),
        text_encoder=clip_l,
        text_encoder_2=big_g,
        tokenizer=None,
        tokenizer_2=None,
        unet=diffusers_unet(config, state),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, clip_l, big_g


def random_controlnet(unet: UNetConfig, seed: int = 0) -> nn.Module:
    """Our ControlNet for ``unet`` with :func:`randomise_` weights (its zero convs would make parity vacuous)."""
    from sdstudio.models.controlnet import ControlNet, ControlNetConfig

    with torch.device("meta"):
        model = ControlNet(ControlNetConfig(unet=unet))
    model.to_empty(device="cpu")
    randomise_(model, seed)
    return model.eval().requires_grad_(False)


def controlnet_diffusers_config(unet: UNetConfig) -> dict[str, Any]:
    """What ``create_controlnet_diffusers_config_from_ldm`` builds (diffusers 0.42 calls its UNet helper without
    the checkpoint argument and fails, so its key selection is repeated here), plus what LDM hard-codes and our
    tiny presets do not (norm groups) and diffusers tells SDXL by (context 2048 / 1280)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from sdstudio.models.configs import preset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dunet = create_unet_diffusers_config_from_ldm(ldm_yaml(unet, preset("tiny").vae), {}, image_size=512)
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")  # fmt: skip
    config = {"conditioning_channels": 3, **{k: dunet[k] for k in keys}}
    config["norm_num_groups"] = unet.norm_groups
    if unet.adm_in_channels:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    return config


def controlnet_to_diffusers(state: dict[str, torch.Tensor], dconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' converter; it leaves SDXL's label_emb out, mapped here by its own table's names."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint({"control_model." + k: v for k, v in state.items()}, dconfig)
    for i, j in ((1, 0), (2, 2)):
        for param in ("weight", "bias"):
            if f"label_emb.0.{j}.{param}" in state:
                converted[f"add_embedding.linear_{i}.{param}"] = state[f"label_emb.0.{j}.{param}"]
    return converted


def diffusers_controlnet(unet: UNetConfig, state: dict[str, torch.Tensor]):
    """diffusers' ControlNetModel holding our ControlNet's weights (``state`` without ``control_model.``)."""
    from diffusers import ControlNetModel

    dconfig = controlnet_diffusers_config(unet)
    with torch.device("meta"):
        model = ControlNetModel(**dconfig)
    result = model.load_state_dict(controlnet_to_diffusers(state, dconfig), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def diffusers_pipeline(config: ModelConfig, state: dict[str, torch.Tensor], scheduler):
    """diffusers' StableDiffusionPipeline on these weights (no tokenizer: callers pass prompt embeddings),
    with ``scheduler``; returns (pipeline, its transformers text encoder)."""
    import diffusers

    clip = transformers_clip(config, state)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(config, state),
        text_encoder=clip,
        tokenizer=None,
        unet=diffusers_unet(config, state),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, clip


def a1111_scheduler(name: str):
    """diffusers' scheduler configured as AUTOMATIC1111 runs SD 1.x: ``"euler"`` or ``"ddim"``."""
    import diffusers

    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**common, timestep_spacing="leading")
    if name == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    raise ValueError(f"unknown scheduler {name!r}")


class DiffusersTxt2Img:
    """diffusers' StableDiffusionPipeline on a checkpoint file's weights, for the benchmarks: Euler (A1111's
    setup), prompt and negative tokenized by our CLIP tokenizer and encoded by transformers' CLIP each call,
    as the pipeline would."""

    def __init__(self, path: str | Path, prompt: str, negative: str, device: str = "cpu", dtype=torch.float32):
        from sdstudio.models.loading import load_model
        from sdstudio.models.tokenizer import ClipTokenizer
        from sdstudio.prompt.conditioning import chunk_tokens

        loaded = load_model(path, dtype=torch.float32)
        config = loaded.config
        pipe, clip = diffusers_pipeline(config, loaded.model.state_dict(), a1111_scheduler("euler"))
        del loaded
        self.pipe, self.clip = pipe.to(device, dtype), clip.to(device, dtype)
        tokenizer = ClipTokenizer()
        ids = [chunk_tokens(tokenizer.encode(t), config.text)[0] for t in (prompt, negative)]
        self.ids = torch.tensor(ids, device=device)

    def __call__(self, size: int, batch: int, steps: int, seed: int, on_step=None) -> list:
        """PIL images; ``on_step(latents)`` after every step."""

        def callback(pipe, i, t, kwargs):
            if on_step is not None:
                on_step(kwargs["latents"])
            return kwargs

        with torch.inference_mode():
            embeds = self.clip(self.ids).last_hidden_state
            return self.pipe(
                prompt_embeds=embeds[:1].expand(batch, -1, -1),
                negative_prompt_embeds=embeds[1:].expand(batch, -1, -1),
                num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), output_type="pil", callback_on_step_end=callback,
            ).images  # fmt: skip
