"""Reading LoRA files: diffusers / PEFT names mean what the kohya names mean, alphas from every place a file
keeps them, and every problem a file can have is one clear message naming it (never silence)."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.adapters import KeyTable, key_table, load_network, network_from_state_dict
from sdstudio.errors import CheckpointError
from sdstudio.models.configs import PRESETS
from sdstudio.models.stablediffusion import random_model
from tests.adapters.loras import lora_targets, random_kohya, tiny_model

RANK, ALPHA = 4, 3.0


@dataclasses.dataclass(frozen=True)
class Case:
    table: KeyTable  # of the tiny SD 1 model
    targets: dict  # kohya module name -> (diffusers-layout key, shape)
    kohya: dict  # a random kohya LoRA over every target


@pytest.fixture(scope="module")
def sd1() -> Case:
    model = tiny_model("tiny")
    targets = lora_targets(model.config, model.state_dict())
    return Case(key_table(model), targets, random_kohya(targets, rank=RANK, alpha=ALPHA, seed=1))


def deltas(network) -> dict[str, torch.Tensor]:
    """Target key (and rows) -> the module's delta at multiplier 1."""
    return {(m.target.key, m.target.rows): m.delta() for m in network.modules}


def to_peft(kohya: dict, targets: dict, down: str, up: str, *, alphas: bool) -> dict:
    """The same LoRA under diffusers / PEFT names: ``unet.<diffusers path>`` / ``text_encoder.text_model...``."""
    out = {}
    for name, (key, _) in targets.items():
        module = key.removesuffix(".weight")
        out[f"{module}.{down}"] = kohya[f"{name}.lora_down.weight"]
        out[f"{module}.{up}"] = kohya[f"{name}.lora_up.weight"]
        if alphas:
            out[f"{module}.alpha"] = kohya[f"{name}.alpha"]
    return out


def test_peft_format_equals_kohya(sd1):
    table, targets, kohya = sd1.table, sd1.targets, sd1.kohya
    reference = deltas(network_from_state_dict(kohya, table, name="kohya"))
    assert len(reference) == len(targets)
    # current PEFT names, the adapter config in the header (as diffusers' save_lora_weights writes it)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA,
                                                 "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA})}  # fmt: skip
    peft = network_from_state_dict(
        to_peft(kohya, targets, "lora_A.weight", "lora_B.weight", alphas=False),
        table,
        name="peft",
        metadata=meta,
    )
    # per-module alpha tensors (diffusers' kohya conversions), old LoRACompatibleLinear names
    old = network_from_state_dict(to_peft(kohya, targets, "lora.down.weight", "lora.up.weight", alphas=True),
                                  table, name="old")  # fmt: skip
    for network in (peft, old):
        assert network.warnings == ()
        got = deltas(network)
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(got[key], value), key


def test_peft_alpha_pattern_rslora_and_default_scale(sd1):
    table, targets, kohya = sd1.table, sd1.targets, sd1.kohya
    state = to_peft(kohya, targets, "lora_A.weight", "lora_B.weight", alphas=False)
    ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    config = {"unet.r": RANK, "unet.lora_alpha": 2.0, "unet.use_rslora": True,
              "unet.alpha_pattern": {"down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": 8.0}}  # fmt: skip
    network = network_from_state_dict(
        state, table, name="p", metadata={"lora_adapter_metadata": json.dumps(config)}
    )
    scales = {m.name: m.factors.scale for m in network.modules}
    assert scales[ff] == 8.0 / math.sqrt(RANK)  # the pattern's alpha, rsLoRA's sqrt(r)
    assert scales["unet.conv_in"] == 2.0 / math.sqrt(RANK)
    assert (
        scales["text_encoder.text_model.encoder.layers.0.mlp.fc1"] == 1.0
    )  # no text_encoder config: alpha = r


def test_pickle_and_safetensors_files_read_alike(sd1, tmp_path):
    table, targets, kohya = sd1.table, sd1.targets, sd1.kohya
    save_file(kohya, tmp_path / "style.safetensors", metadata={"ss_output_name": "style"})
    torch.save(kohya, tmp_path / "style.pt")
    a = load_network(tmp_path / "style.safetensors", table)
    b = load_network(tmp_path / "style.pt", table)
    assert a.name == "style" and a.metadata["ss_output_name"] == "style" and a.kinds == {"lora": len(targets)}
    da, db = deltas(a), deltas(b)
    assert all(torch.equal(da[k], db[k]) for k in da)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused_naming_the_file(sd1, tmp_path, bad):
    table, kohya = sd1.table, sd1.kohya
    state = dict(kohya)
    key = next(k for k in state if k.endswith("lora_up.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = bad
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as error:
        load_network(path, table)
    message = str(error.value)
    assert str(path) in message and key in message and "NaN or infinite" in message and "\n" not in message


def test_damaged_file_is_one_line(sd1, tmp_path):
    table, kohya = sd1.table, sd1.kohya
    path = tmp_path / "cut.safetensors"
    save_file(kohya, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as error:
        load_network(path, table)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unmatched_unsupported_and_unknown_keys_warn(sd1, caplog):
    table, targets, kohya = sd1.table, sd1.targets, sd1.kohya
    state = dict(kohya)
    for i in range(5):  # modules the model does not have
        state[f"lora_unet_down_blocks_7_attentions_{i}_proj_in.lora_down.weight"] = torch.zeros(RANK, 32)
        state[f"lora_unet_down_blocks_7_attentions_{i}_proj_in.lora_up.weight"] = torch.zeros(32, RANK)
    dora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state[f"{dora}.dora_scale"] = torch.ones(32, 1, 1, 1)
    state["some_trainer_step"] = torch.tensor(3)
    with caplog.at_level("WARNING", logger="sdstudio.adapters"):
        network = network_from_state_dict(state, table, name="mixed.safetensors")
    warnings = network.warnings
    assert len(warnings) == 3 and all(w.startswith("mixed.safetensors: ") for w in warnings)
    assert f"5 of {len(targets) + 5} module names match nothing" in warnings[0]
    assert "lora_unet_down_blocks_7_attentions_0_proj_in" in warnings[0] and ", ..." in warnings[0]
    assert "1 modules skipped, unsupported DoRA" in warnings[1] and dora in warnings[1]
    assert "1 keys of no known LoRA format" in warnings[2] and "some_trainer_step" in warnings[2]
    assert len(network.modules) == len(targets) - 1
    assert [r.getMessage() for r in caplog.records] == list(warnings)


def test_nothing_matches(sd1):
    table = sd1.table
    state = {
        "lora_unet_foo.lora_down.weight": torch.zeros(2, 3),
        "lora_unet_foo.lora_up.weight": torch.zeros(3, 2),
    }
    network = network_from_state_dict(state, table, name="other.safetensors")
    assert network.modules == ()
    assert network.warnings == (
        (
            f"other.safetensors: none of its 1 module names matches anything in this {table.architecture} model: "
            "made for another architecture? (e.g. lora_unet_foo)"
        ),
    )


def test_lora_for_another_architecture_warns(sd1):
    """A LoRA made for a wider SD 2-style model (text width and cross-attention context 64, 3 text layers)
    on the SD 1-style tiny model: what does not fit is skipped and named, with what the file says it is for."""
    table = sd1.table
    sd2 = PRESETS["tiny-sd2"]
    wide = dataclasses.replace(
        sd2,
        unet=dataclasses.replace(sd2.unet, context_dim=64),
        text=dataclasses.replace(sd2.text, width=64, layers=3, projection_dim=64),
    )
    other = random_model(wide)
    state = random_kohya(lora_targets(wide, other.state_dict()), proj_4d=True)
    meta = {"ss_v2": "True", "modelspec.architecture": "stable-diffusion-v2-512/lora"}
    network = network_from_state_dict(state, table, name="sd2.safetensors", metadata=meta)
    misfit, unmatched = network.warnings
    # 2 shared text layers x 6 linears and each transformer's attn2 to_k / to_v (7 transformers) do not fit
    assert misfit.startswith(f"sd2.safetensors: {12 + 14} of ") and "made for another architecture?" in misfit
    assert "the file says modelspec.architecture=stable-diffusion-v2-512/lora, ss_v2=True" in misfit
    assert "[32, 64] vs [32, 32]" in misfit or "[64, 64] vs [32, 32]" in misfit
    assert unmatched.startswith("sd2.safetensors: 6 of ")  # the third text layer
    assert all(m.target.part == "unet" for m in network.modules)
