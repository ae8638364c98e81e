"""Every module a kohya / LyCORIS LoRA can name lands on the right weight of our model, with the right change.

The expectation comes from diffusers' own single-file converters: the LoRA is built over the diffusers /
transformers module names of our model (``tests/adapters/loras.py``), merged into our LDM-layout model, and
the merged model converted back to diffusers names by diffusers; there, each weight must have moved by
exactly ``m * alpha / r * up @ down`` of the module named after it, and nothing else may have moved. This
covers to_out_0, ff_net_0_proj / ff_net_2, time_emb_proj, conv_shortcut, proj_in / proj_out (1x1 conv on
SD 1, linear on SD 2, with 2-D and 4-D LoRA weights both ways), down / up samplers, conv_in / conv_out,
time_embedding, the mid block, and SD 2's q / k / v rows of OpenCLIP's fused in_proj_weight.
"""

import re

import pytest
import torch

from sdstudio.adapters import NetworkUse, key_table, network_from_state_dict, networks_applied
from sdstudio.models.configs import PRESETS
from sdstudio.models.stablediffusion import StableDiffusion
from tests.adapters.loras import diffusers_layout, kohya_delta, lora_targets, random_kohya, tiny_model

TE, UNET = 0.7, 1.3


@pytest.mark.parametrize(
    ("arch", "proj_4d"),
    [("tiny", False), ("tiny", True), ("tiny-sd2", True), ("tiny-sd2", False)],
    ids=["sd1-2d-proj", "sd1-4d-proj", "sd2-kohya-4d-proj", "sd2-2d-proj"],
)
def test_every_module_lands_on_its_weight(arch, proj_4d):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = lora_targets(model.config, before)
    kinds = {"3x3": 0, "1x1": 0, "linear": 0}
    for _, shape in targets.values():
        kinds["linear" if len(shape) == 2 else "3x3" if shape[2:] == (3, 3) else "1x1"] += 1
    assert all(kinds.values()), kinds  # the fixture covers every kind of layer
    state = random_kohya(targets, rank=3, alpha=2.0, proj_4d=proj_4d)
    network = network_from_state_dict(state, key_table(model), name="all")
    assert network.warnings == ()
    assert len(network.modules) == len(targets)

    with networks_applied(model, [NetworkUse(network, te=TE, unet=UNET)]):
        after = {k: v.clone() for k, v in model.state_dict().items()}
    ours_before = diffusers_layout(model.config, before)
    ours_after = diffusers_layout(model.config, after)
    expected_keys = {key for key, _ in targets.values()}
    for name, (key, shape) in targets.items():
        multiplier = UNET if name.startswith("lora_unet_") else TE
        expected = kohya_delta(state, name, shape, multiplier)
        moved = ours_after[key].double() - ours_before[key].double()
        error = float((moved - expected).abs().max())  # (assert_close costs 10 ms a call)
        assert error < 1e-6 and float(expected.abs().max()) > 1e-3, f"{name} -> {key}: off by {error}"
    for key in ours_before.keys() - expected_keys:
        assert torch.equal(ours_after[key], ours_before[key]), f"{key} changed but no module names it"
    # and the model is back, bit for bit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])
def test_name_forms_agree(arch):
    """LDM-style (``lora_unet_input_blocks_1_1_proj_in``), diffusers / PEFT (``unet.down_blocks...``, also
    without the prefix), old diffusers attention processors and kohya names of one module hit one weight."""
    table = key_table(tiny_model(arch))
    kohya = table.get("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
    assert (
        kohya is not None
        and kohya.key == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    )
    for name in (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0",
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
    ):
        assert table.get(name) == kohya, name
    q = table.get("lora_te_text_model_encoder_layers_1_self_attn_q_proj")
    for name in (
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
        "text_encoder.encoder.layers.1.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.1.self_attn.to_q_lora",
    ):
        assert table.get(name) == q, name
    if arch == "tiny-sd2":
        width = 32
        assert q.key == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
        rows = [table.get(f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj").rows for p in "qkv"]
        assert rows == [(0, width), (width, 2 * width), (2 * width, 3 * width)]
        fc1 = table.get("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer")
        assert (
            fc1.key == "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight" and fc1.rows is None
        )


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_full_width_tables_agree_with_diffusers(arch):
    """sd15 and sd2 at full width (built on the meta device: names and shapes, no weights): every kohya name
    diffusers' converters give a weight lands on that weight. Covers what the tiny presets lack: levels
    without attention (the last down level, diffusers' up_blocks.0, whose upsampler is
    ``output_blocks.2.1.conv``), two ResBlocks per level, SD 2's 1024-wide OpenCLIP text layers."""
    with torch.device("meta"):
        model = StableDiffusion(PRESETS[arch])
    state = model.state_dict()
    table = key_table(model)
    targets = lora_targets(model.config, state)
    by_identity = {id(v): k for k, v in state.items()}  # diffusers' converters move our tensors...
    layout = diffusers_layout(model.config, state)
    width = model.config.text.width
    for name, (key, _) in targets.items():
        target = table.get(name)
        assert target is not None, name
        if id(layout[key]) in by_identity:
            assert (target.key, target.rows) == (by_identity[id(layout[key])], None), name
        else:  # ...except OpenCLIP's q, k, v, which they cut from in_proj_weight's rows in that order
            layer, part = re.fullmatch(
                r"lora_te_text_model_encoder_layers_(\d+)_self_attn_([qkv])_proj", name
            ).groups()
            start = "qkv".index(part) * width
            assert target.key == f"cond_stage_model.model.transformer.resblocks.{layer}.attn.in_proj_weight"
            assert target.rows == (start, start + width), name
    transformer_modules = [n for n in targets if n.startswith("lora_unet_") and "_attentions_" in n]
    text_modules = [n for n in targets if n.startswith("lora_te_")]
    # kohya's default targets: 16 transformers x 12 linears; 6 linears per text layer (SD 2: 23 layers)
    assert (len(transformer_modules), len(text_modules)) == ((192, 72) if arch == "sd15" else (192, 138))
    assert table.get("lora_unet_up_blocks_0_upsamplers_0_conv").key.endswith("output_blocks.2.1.conv.weight")
    assert table.get("lora_unet_up_blocks_1_upsamplers_0_conv").key.endswith("output_blocks.5.2.conv.weight")
