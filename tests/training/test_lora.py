"""LoRA / LoCon training: factors that start at the base model exactly and leave it untouched, training that
lowers the loss through the inference UNet and text encoder with separate UNet / text learning rates, and
kohya files that sdstudio's loader and diffusers' ``load_lora_weights`` read back to the outputs the
training-time forward gave (a wrong alpha or a transposed factor is seen by the same comparisons)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdstudio.adapters import NetworkUse, key_table, load_network, network_from_state_dict, networks_applied
from sdstudio.errors import SdStudioError
from sdstudio.models import prepacked
from sdstudio.models.stablediffusion import StableDiffusion
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.training.lora import (
    LoraTrainConfig,
    TrainableLoRA,
    attached,
    encode_training_captions,
    kohya_metadata,
    lora_loss,
    param_groups,
    save_kohya,
)
from tests.adapters.loras import tiny_model

LORA = LoraTrainConfig(rank=4, alpha=3.0, train_text_encoder=True, unet_lr=1e-3, text_lr=1e-4)
LOCON = LoraTrainConfig(rank=4, alpha=3.0, conv_rank=3, conv_alpha=2.0, train_text_encoder=True)
CAPTIONS = ["a red circle on the left", "a blue square, large, at the bottom right"]


@pytest.fixture(scope="module")
def models() -> dict[str, StableDiffusion]:
    return {arch: tiny_model(arch, seed=5) for arch in ("tiny", "tiny-sd2")}


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def inputs(model: StableDiffusion, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 49408, (2, 77), generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([980.0, 35.0])
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=gen)
    return tokens, x, t, context


def outputs(unet, text_encoder, tokens, x, t, context) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return unet(x, t, context), text_encoder(tokens, 1)


def randomise_factors(lora: TrainableLoRA, seed: int, std: float = 0.3) -> None:
    """Non-zero ``up`` factors (kohya starts them at zero), so that the LoRA changes every output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lora.names():
            up = lora.factors(name).lora_up.weight
            up.copy_(torch.randn(up.shape, generator=gen) * std)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- (1) identity at init, nothing left behind -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])
def test_zero_init_is_the_base_model_and_detaching_leaves_it_bit_identical(models, arch):
    model = models[arch]
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    args = inputs(model)
    plain = outputs(model.unet, model.text_encoder, *args)
    lora = TrainableLoRA(model, LOCON, seed=1)
    assert all(not lora.factors(n).lora_up.weight.any() for n in lora.names())  # kohya's zero up
    with attached(model, lora) as run:
        assert all(not p.requires_grad for p in model.parameters())
        same = outputs(run.unet, run.text_encoder, *args)
        randomise_factors(lora, seed=2)  # the broken variant: a LoRA that is not zero changes both outputs
        changed = outputs(run.unet, run.text_encoder, *args)
    for a, b, c in zip(plain, same, changed):
        assert torch.equal(a, b)
        assert float((a - c).abs().max()) > 1e-2
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert no_hooks(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(model.unet, model.text_encoder, *args)))


def test_prepacked_inference_is_unchanged_after_training(tokenizer):
    """bf16 weights, channels-last latents: the oneDNN-packed path before, during (layers whose input needs
    no gradient) and after a few training steps, with the same bits."""
    model = tiny_model("tiny", seed=6, dtype=torch.bfloat16)
    _, x, t, context = inputs(model)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = model.unet(x, t, context)
    lora = TrainableLoRA(model, LOCON, seed=1)
    optimizer = torch.optim.AdamW(param_groups(lora), weight_decay=0.0)
    with attached(model, lora) as run:
        for step in range(2):
            context_train = encode_training_captions(run, tokenizer, CAPTIONS)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lora_loss(
                    run, torch.randn(2, 4, 8, 8), context_train, torch.Generator().manual_seed(step)
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert any(lora.factors(n).lora_up.weight.any() for n in lora.names())  # it trained
    packed = model.unet.input_blocks[0][0]._packed  # conv_in: packed by the first inference call
    with torch.inference_mode():
        after = model.unet(x, t, context)
    # packed where oneDNN has bf16 kernels (AVX-512 BF16 / AMX); elsewhere the layers run plain
    assert (packed.entry is not None) == prepacked._mkldnn_bf16() and model.unet.input_blocks[0][0]._packed is packed
    assert torch.equal(before, after) and no_hooks(model)


# --- (2) training ------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_changes_only_the_factors(models, tokenizer):
    model = models["tiny"]
    before = snapshot(model)
    lora = TrainableLoRA(model, LORA, seed=3)
    groups = param_groups(lora)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3), ("text_encoder", 1e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(lora.parameters())) == 2 * len(lora.targets)
    initial = {k: v.clone() for k, v in lora.state_dict().items()}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    losses = []
    with attached(model, lora) as run:
        for step in range(30):
            context = encode_training_captions(run, tokenizer, CAPTIONS)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs every method
                loss = lora_loss(run, latents, context, torch.Generator().manual_seed(0), snr_gamma=5.0)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:  # every factor is in the graph: each up gets a gradient (down's is 0 while up is)
                assert all(float(lora.factors(n).lora_up.weight.grad.abs().sum()) > 0 for n in lora.names())
            optimizer.step()
            if step == 0:  # Adam's first step moves each factor by its group's lr (times sign)
                moved = {
                    part: max(
                        float(
                            (lora.factors(n).lora_up.weight.detach() - initial[f"{n}.lora_up.weight"])
                            .abs()
                            .max()
                        )
                        for n in lora.names(part)
                    )
                    for part in ("unet", "te")
                }
                assert moved["unet"] == pytest.approx(1e-3, rel=0.05)
                assert moved["te"] == pytest.approx(1e-4, rel=0.05)
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights are untouched
    state = lora.state_dict()
    assert all(torch.equal(state[k], initial[k]) for k in state if k.endswith(".alpha"))


def test_text_encoder_frozen_and_lrs_apart(models, tokenizer):
    """UNet only (kohya's ``--network_train_unet_only``): no text modules, a context without gradient; and
    a text learning rate of 0 leaves the text factors where they started while the UNet's move."""
    model = models["tiny"]
    unet_only = TrainableLoRA(model, LoraTrainConfig(rank=2), seed=0)
    assert unet_only.names("te") == [] and [g["name"] for g in param_groups(unet_only)] == ["unet"]
    with attached(model, unet_only) as run:
        assert not encode_training_captions(run, tokenizer, CAPTIONS).requires_grad
    config = LoraTrainConfig(rank=2, train_text_encoder=True, unet_lr=1e-3, text_lr=0.0)
    lora = TrainableLoRA(model, config, seed=0)
    initial = {k: v.clone() for k, v in lora.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(lora))
    with attached(model, lora) as run:
        for step in range(2):
            context = encode_training_captions(run, tokenizer, CAPTIONS)
            assert context.requires_grad
            loss = lora_loss(run, torch.randn(2, 4, 8, 8), context, torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    state = lora.state_dict()
    text = [k for k in state if k.startswith("lora_te_")]
    unet = [k for k in state if k.startswith("lora_unet_") and k.endswith("up.weight")]
    assert text and all(torch.equal(state[k], initial[k]) for k in text)
    assert all(not torch.equal(state[k], initial[k]) for k in unet)


def test_loss_noise_offset_and_checks(models):
    model = models["tiny"]
    lora = TrainableLoRA(model, LoraTrainConfig(rank=2), seed=0)
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with attached(model, lora) as run:
        plain = lora_loss(run, latents, context, torch.Generator().manual_seed(1))
        again = lora_loss(run, latents, context, torch.Generator().manual_seed(1))
        offset = lora_loss(run, latents, context, torch.Generator().manual_seed(1), noise_offset=0.5)
        with pytest.raises(ValueError, match="2 contexts for 1 latents"):
            lora_loss(run, latents, context.expand(2, -1, -1), torch.Generator())
        with pytest.raises(SdStudioError, match="already attached"), attached(model, lora):
            pass  # branches added twice would double the LoRA
        assert torch.equal(plain, lora_loss(run, latents, context, torch.Generator().manual_seed(1)))
    assert no_hooks(model)
    assert torch.equal(plain, again) and not torch.equal(plain, offset)
    with pytest.raises(SdStudioError, match="made for"), attached(models["tiny-sd2"], lora):
        pass
    for bad in ({"rank": 0}, {"conv_alpha": 2.0}, {"alpha": -1.0}, {"unet_lr": float("nan")}):
        with pytest.raises(SdStudioError):
            LoraTrainConfig(**bad)


# --- (3) the file: sdstudio's loader and merge ---------------------------------------------------------------


def trained_file(model: StableDiffusion, config: LoraTrainConfig, folder: Path) -> tuple[TrainableLoRA, Path]:
    lora = TrainableLoRA(model, config, seed=4)
    randomise_factors(lora, seed=8)
    path = save_kohya(
        lora, folder / "concept.safetensors", {"ss_steps": 30, "ss_seed": 4}, dtype=torch.float32
    )
    return lora, path


def variant(state: dict[str, torch.Tensor], how: str, name: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if how == "alpha":  # alpha / rank off by 1.25 on one module
        state[f"{name}.alpha"] = state[f"{name}.alpha"] * 1.25
    elif how == "transposed":  # a square module's factors swapped and transposed: delta^T, same shapes
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = (
            up.T.contiguous(),
            down.T.contiguous(),
        )
    return state


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])
@pytest.mark.parametrize("config", [LORA, LOCON], ids=["lora", "locon"])
def test_file_loads_and_merges_to_the_training_forward(models, tmp_path, arch, config):
    model = models[arch]
    lora, path = trained_file(model, config, tmp_path)
    table = key_table(model)
    network = load_network(path, table)
    assert network.warnings == ()
    assert sorted(m.name for m in network.modules) == sorted(lora.names())
    if config.conv_rank:  # LoCon: the 3x3 convolutions are in the file with their kernels, at conv_rank
        conv = [m for m in network.modules if len(m.target.shape) == 4 and m.target.shape[2:] == (3, 3)]
        assert conv and all(tuple(m.factors.down.shape[0::2]) == (3, 3) for m in conv)
    args = inputs(model, seed=1)
    with attached(model, lora) as run:
        training = outputs(run.unet, run.text_encoder, *args)
    plain = outputs(model.unet, model.text_encoder, *args)
    state = load_file(path)
    one = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    for how in ("exact", "alpha", "transposed"):
        broken = network_from_state_dict(variant(state, how, one), table, name=how)
        assert broken.warnings == ()  # loads cleanly: only the outputs can tell
        with networks_applied(model, [NetworkUse(broken, te=1.0, unet=1.0)]):
            merged = outputs(model.unet, model.text_encoder, *args)
        for part, ours, theirs, base in zip(("unet", "text"), training, merged, plain):
            error = float((ours - theirs).abs().max())
            if how == "exact" or part == "text":  # the broken module is in the UNet
                assert error < 2e-5 * float(ours.abs().max()), (part, error)
                assert float((ours - base).abs().max()) > 1e-2  # the LoRA changes the output: the test sees
            else:
                assert error > 1e-3, (how, error)


def test_module_filters_choose_modules(models, tmp_path):
    """--modules / --skip-modules: regular expressions searched in the kohya names of the modules kohya would
    train (LoCon's convolutions and text only when asked for), written to the metadata."""
    model = models["tiny"]
    every = TrainableLoRA(model, LoraTrainConfig(rank=2, conv_rank=2), seed=0).names()
    kv = TrainableLoRA(model, LoraTrainConfig(rank=2, modules=("attn2_to_[kv]$",)), seed=0)
    assert kv.names() and sorted(kv.names()) == sorted(n for n in every if n.endswith(("attn2_to_k", "attn2_to_v")))
    config = LoraTrainConfig(rank=2, conv_rank=2, modules=("attn", "resnets"), skip_modules=("ff_",))
    chosen = TrainableLoRA(model, config, seed=0).names()
    assert sorted(chosen) == sorted(n for n in every if ("attn" in n or "resnets" in n) and "ff_" not in n)
    assert any("resnets" in n for n in chosen) and not any("ff_net" in n for n in chosen)
    # the patterns never add what kohya leaves out: no text modules without train_text_encoder
    assert TrainableLoRA(model, LoraTrainConfig(rank=2, modules=("attn",)), seed=0).names("te") == []
    meta = kohya_metadata(kv, "kv")
    assert json.loads(meta["ss_network_args"]) == {}
    assert json.loads(meta["ss_sdstudio_module_filter"]) == {"modules": ["attn2_to_[kv]$"], "skip_modules": []}
    # LoCon asked for, every convolution filtered out: no conv_dim in kohya's network args
    no_conv = TrainableLoRA(model, LoraTrainConfig(rank=2, conv_rank=2, skip_modules=("resnets", "samplers")), seed=0)
    assert not any("resnets" in n for n in no_conv.names())
    assert json.loads(kohya_metadata(no_conv, "x")["ss_network_args"]) == {}
    assert "ss_sdstudio_module_filter" not in kohya_metadata(TrainableLoRA(model, LORA, seed=0), "x")
    with pytest.raises(SdStudioError, match="leave no LoRA target"):
        TrainableLoRA(model, LoraTrainConfig(rank=2, modules=("nothing_is_called_this",)), seed=0)
    with pytest.raises(SdStudioError, match=r"--modules 'attn\[': not a regular expression"):
        LoraTrainConfig(modules=("attn[",))


def test_file_metadata_and_hash(models, tmp_path):
    model = models["tiny"]
    lora, path = trained_file(model, LOCON, tmp_path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "3.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "2.0"}
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_output_name"]) == (
        "False",
        "sd_v1",
        "concept",
    )
    assert meta["ss_steps"] == "30" and float(meta["ss_training_started_at"]) > 1.6e9
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + length :]).hexdigest()
    state = load_file(path)
    assert state.keys() == lora.state_dict().keys()
    assert (
        state["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight"].ndim
        == 2
    )
    assert state["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 4  # SD 1: a 1x1 conv
    fp16 = save_kohya(lora, tmp_path / "half.safetensors")
    assert load_file(fp16)["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16
    assert load_network(fp16, key_table(model)).warnings == ()
    with pytest.raises(SdStudioError, match="already exists"):
        save_kohya(lora, fp16)
    with pytest.raises(SdStudioError, match="ends in .safetensors"):
        save_kohya(lora, tmp_path / "lora.pt")


# --- (4), (5) diffusers reads the file, LoRA and LoCon -----------------------------------------------------


@pytest.mark.parametrize("config", [LORA, LOCON], ids=["lora", "locon"])
def test_diffusers_loads_the_file_to_the_same_outputs(models, tmp_path, config):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.reference import a1111_scheduler, diffusers_pipeline

    model = models["tiny"]
    lora, path = trained_file(model, config, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe, clip = diffusers_pipeline(model.config, state, a1111_scheduler("ddim"))
    pipe.load_lora_weights(str(path), adapter_name="concept")
    wrapped = {
        part: sum(1 for m in module.modules() if "concept" in getattr(m, "lora_A", {}))
        for part, module in (("unet", pipe.unet), ("te", clip))
    }
    assert wrapped == {"unet": len(lora.names("unet")), "te": len(lora.names("te"))}  # every module
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    tokens, x, t, context = inputs(model, seed=2)
    with attached(model, lora) as run:
        ours = outputs(run.unet, run.text_encoder, tokens, x, t, context)
    plain = outputs(model.unet, model.text_encoder, tokens, x, t, context)
    with torch.no_grad():
        theirs = (pipe.unet(x, t, encoder_hidden_states=context).sample, clip(tokens).last_hidden_state)
    for a, b, base in zip(ours, theirs, plain):
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) < 2e-5 * scale
        assert float((a - base).abs().max()) > 1e-2  # the LoRA changes the output: the comparison sees it
