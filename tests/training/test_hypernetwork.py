"""Hypernetwork training: A1111's layouts, initialisation and file, checked against Sequentials built as
A1111's ``HypernetworkModule`` builds them (``tests.adapters.test_hypernetwork``, written apart from the
code under test); files that the inference loader reads back to the same keys and values; a short run that
lowers the loss and moves nothing but the hypernetwork; a killed run (dropout on) that resumes to the same
weights as an unbroken one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sdstudio.adapters.hypernetwork import HypernetworkUse, load_hypernetwork, prepare_hypernetworks
from sdstudio.errors import SdStudioError
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.models.unet import CrossAttention
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.training.datasets import TEMPLATES
from sdstudio.training.finetune import RunConfig, TrainingData, dataset_config_for, training_denoiser
from sdstudio.training.hypernetwork import (
    HypernetworkTrainConfig,
    TrainableHypernetwork,
    hypernetwork_loss,
    hypernetwork_widths,
    train_hypernetwork,
)
from sdstudio.training.trainer import STATE_FILE
from tests.adapters.loras import loaded, tiny_model
from tests.adapters.test_hypernetwork import a1111_sequential, formula, module_state
from tests.training.test_finetune import write_dataset

# A1111 Hypernetwork.save's fields, in its order
A1111_FIELDS = ["step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                "last_layer_dropout", "optional_info"]  # fmt: skip

# config fields -> the dropout structure A1111 builds the Sequential from
LAYOUTS = {
    "ui-default": ({}, [0, 0, 0]),
    "relu-121": ({"activation_func": "relu"}, [0, 0, 0]),
    "ln-dropout-1221": ({"layer_structure": (1, 2, 2, 1), "activation_func": "leakyrelu", "is_layer_norm": True,
                         "use_dropout": True}, [0, 0.3, 0, 0]),
    "last-dropout-1221": ({"layer_structure": (1, 2, 2, 1), "activation_func": "swish", "use_dropout": True,
                           "dropout_structure": (0, 0.3, 0.3, 0), "activate_output": True}, [0, 0.3, 0.3, 0]),
    "explicit-dropout": ({"layer_structure": (1, 1.5, 0.5, 1), "activation_func": "tanh", "is_layer_norm": True,
                          "use_dropout": True, "dropout_structure": (0, 0.1, 0.2, 0), "activate_output": True},
                         [0, 0.1, 0.2, 0]),
    "prelu-output": ({"activation_func": "prelu", "activate_output": True, "is_layer_norm": True}, [0, 0, 0]),
    "dropout-off": ({"layer_structure": (1, 2, 2, 1), "activation_func": "relu", "use_dropout": False},
                    [0, 0, 0, 0]),
}  # fmt: skip
WIDTHS = (8, 12)


def test_widths_are_the_models_attention_widths():
    assert hypernetwork_widths(PRESETS["sd15"]) == (768, 320, 640, 1280)  # A1111's enable_sizes default
    assert hypernetwork_widths(PRESETS["sd2"]) == (1024, 320, 640, 1280)
    assert hypernetwork_widths(PRESETS["toyworld"]) == (128, 64)  # its text is as wide as a UNet level
    for arch in ("tiny", "tiny-sd2"):
        unet = tiny_model(arch).unet
        seen = {m.to_k.in_features for m in unet.modules() if isinstance(m, CrossAttention)}
        widths = hypernetwork_widths(PRESETS[arch])
        assert set(widths) == seen and widths[0] == unet.config.context_dim


def a1111_init(seq: nn.Sequential, rule: str, activation: str, gen: torch.Generator) -> None:
    """A1111 ``HypernetworkModule.__init__``'s initialisation, for a fresh module."""
    with torch.no_grad():
        for layer in seq:
            if type(layer) is nn.Linear or type(layer) is nn.LayerNorm:
                w, b = layer.weight, layer.bias
                if rule == "Normal" or type(layer) is nn.LayerNorm:
                    nn.init.normal_(w, mean=0.0, std=0.01, generator=gen)
                    nn.init.normal_(b, mean=0.0, std=0, generator=gen)
                elif rule == "XavierUniform":
                    nn.init.xavier_uniform_(w, generator=gen)
                    nn.init.zeros_(b)
                elif rule == "XavierNormal":
                    nn.init.xavier_normal_(w, generator=gen)
                    nn.init.zeros_(b)
                elif rule == "KaimingUniform":
                    nl = "leaky_relu" if activation == "leakyrelu" else "relu"
                    nn.init.kaiming_uniform_(w, nonlinearity=nl, generator=gen)
                    nn.init.zeros_(b)
                elif rule == "KaimingNormal":
                    nl = "leaky_relu" if activation == "leakyrelu" else "relu"
                    nn.init.kaiming_normal_(w, nonlinearity=nl, generator=gen)
                    nn.init.zeros_(b)


@pytest.mark.parametrize(
    "rule", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"]
)
def test_initialisation_is_a1111s(rule):
    config = HypernetworkTrainConfig("net", (1, 2, 1), "leakyrelu", rule, is_layer_norm=True)
    network = TrainableHypernetwork.create(config, (48, 12), seed=4)
    gen, shuffle = torch.Generator().manual_seed(4), torch.Generator().manual_seed(99)
    for width, (k, v) in network.modules_by_width().items():
        for module in (k, v):
            seq = a1111_sequential(width, [1, 2, 1], "leakyrelu", True, False, [0, 0, 0], shuffle)
            a1111_init(seq, rule, "leakyrelu", gen)
            ours = module.state_dict()
            assert list(ours) == list(module_state(seq))
            assert all(torch.equal(ours[key], value) for key, value in module_state(seq).items())
    first = network.modules_by_width()[48][0].linear
    assert torch.equal(first[0].bias, torch.zeros(96)) and torch.equal(first[2].bias, torch.zeros(96))
    assert (
        abs(float(first[2].weight.detach().std()) - 0.01) < 0.004
    )  # LayerNorms: N(0, 0.01) whatever the rule
    expected_std = {"Normal": 0.01, "XavierUniform": math.sqrt(2 / 144), "XavierNormal": math.sqrt(2 / 144),
                    "KaimingUniform": math.sqrt(2 / 48), "KaimingNormal": math.sqrt(2 / 48)}[rule]  # fmt: skip
    assert abs(float(first[0].weight.detach().std()) / expected_std - 1) < 0.1
    # the comparison above can fail: another seed draws other weights
    other = TrainableHypernetwork.create(config, (48, 12), seed=5).modules_by_width()[48][0].linear
    assert not torch.equal(other[0].weight, first[0].weight)


def randomised(config: HypernetworkTrainConfig, widths=WIDTHS, seed: int = 1) -> TrainableHypernetwork:
    """Weights at std 0.5 (effects well above rounding), PReLU slopes included."""
    network = TrainableHypernetwork.create(config, widths, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return network.eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_save_with_a1111_indices_and_load_to_the_same_kv(tmp_path, layout):
    fields, dropout = LAYOUTS[layout]
    config = HypernetworkTrainConfig("style net", **fields)
    network = randomised(config)
    assert list(config.dropouts) == dropout
    path = network.save_a1111(
        tmp_path / "net.pt", step=12, checkpoint_hash="a1b2c3d4e5", checkpoint_name="base"
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert [k for k in raw if type(k) is not int] == A1111_FIELDS and [k for k in raw if type(k) is int] == [
        8,
        12,
    ]
    assert raw["layer_structure"] == [float(v) for v in config.layer_structure]
    assert (raw["name"], raw["step"], raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == ("style net", 12,
                                                                                         "a1b2c3d4e5", "base")  # fmt: skip
    assert raw["dropout_structure"] == dropout and raw["last_layer_dropout"] == (dropout[-2] != 0)
    assert raw["activation_func"] == config.activation_func and raw["weight_initialization"] == "Normal"

    loaded_net = load_hypernetwork(path)
    assert loaded_net.widths == WIDTHS and list(loaded_net.dropout_structure) == dropout
    assert loaded_net.warnings == ()
    file_stack = prepare_hypernetworks([HypernetworkUse(loaded_net, 0.6)], "cpu", torch.float32)
    gen = torch.Generator().manual_seed(2)
    for width in WIDTHS:
        k_seq, v_seq = (a1111_sequential(width, list(config.layer_structure), config.activation_func,
                                         config.is_layer_norm, config.activate_output, dropout, gen)
                        for _ in range(2))  # fmt: skip
        # A1111's own Sequentials take the saved state dicts as they are (strict: same indices, same shapes)
        k_seq.load_state_dict({key[len("linear.") :]: value for key, value in raw[width][0].items()})
        v_seq.load_state_dict({key[len("linear.") :]: value for key, value in raw[width][1].items()})
        x = torch.randn(2, 5, width, generator=gen)
        with torch.no_grad():
            ours_k, ours_v = network.stack(0.6).kv(x)
            expected = formula(k_seq, x, 0.6), formula(v_seq, x, 0.6)
        file_k, file_v = file_stack.kv(x)
        for got in ((ours_k, ours_v), (file_k, file_v)):
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
        # the comparison can fail: keys and values differ, and the multiplier counts
        assert (ours_k - expected[1]).abs().max() > 0.1
        with torch.no_grad():
            assert (network.stack(0.3).kv(x)[0] - expected[0]).abs().max() > 0.1
    x_other = torch.ones(1, 2, 5)
    assert network.stack().kv(x_other) == (x_other, x_other)  # a width it has no modules for


def test_dropout_acts_in_training_only():
    config = HypernetworkTrainConfig(
        "d", (1, 2, 2, 1), "relu", use_dropout=True, dropout_structure=(0, 0.5, 0.5, 0)
    )
    network = randomised(config, widths=(16,))
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        evals = [network.stack().kv(x)[0] for _ in range(2)]
        network.train()
        trains = [network.stack().kv(x)[0] for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    assert (trains[0] - trains[1]).abs().max() > 0.1 and (trains[0] - evals[0]).abs().max() > 0.1
    assert network.random and not randomised(HypernetworkTrainConfig("n", activation_func="relu")).random


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "a<b>"}, "letters, digits, spaces and ._- only"),
        ({"layer_structure": (2, 1)}, "start and end with 1"),
        ({"activation_func": "bogus"}, "not one sdstudio can apply; choose linear, celu"),
        ({"activation_func": "softmax"}, "'softmax': not one sdstudio can apply"),
        ({"weight_initialization": "Uniform"}, "choose Normal, XavierUniform"),
        ({"dropout_structure": (0, 0.3, 0)}, "without use_dropout"),
        (
            {"use_dropout": True, "dropout_structure": (0, 0.3)},
            "one probability .* per layer structure entry",
        ),
        ({"use_dropout": True, "dropout_structure": (0, 1.0, 0)}, "one probability"),
        ({"widths": (768, 768)}, "distinct positive context widths"),
    ],
)
def test_bad_settings_are_one_line_errors(fields, message):
    with pytest.raises(SdStudioError, match=message) as info:
        HypernetworkTrainConfig(**{"name": "net", **fields})
    assert "\n" not in str(info.value)


def test_too_narrow_a_layer_is_refused():
    with pytest.raises(SdStudioError, match="gives width 2 a layer of 0 features"):
        TrainableHypernetwork.create(HypernetworkTrainConfig("n", (1, 0.25, 1)), (2,))


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def model() -> LoadedModel:
    return loaded(tiny_model("tiny", seed=2))


def fixed_loss(model: LoadedModel, stack, latents, context, seed: int = 0) -> float:
    """The denoising loss with ``stack`` at 16 fixed timesteps and noises."""
    denoiser = training_denoiser(model)
    gen = torch.Generator().manual_seed(seed)
    sigmas = denoiser.schedule.sigmas[torch.linspace(50, 950, 16).long()]
    latents = latents.repeat(8, 1, 1, 1)[:16]
    context = context.repeat(8, 1, 1)[:16]
    noise = torch.randn(latents.shape, generator=gen)
    with torch.no_grad():
        return float(
            dataclasses.replace(denoiser, hypernetworks=stack).loss(latents, noise, sigmas, context).mean()
        )


def test_a_short_run_lowers_the_loss_and_moves_only_the_hypernetwork(data, model, tmp_path):
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    config = HypernetworkTrainConfig("zqx")  # A1111 UI defaults: 1, 2, 1, linear, Normal
    run = RunConfig(steps=16, batch_size=2, lr=1e-2, save_every=100, bf16=False)
    (path,) = train_hypernetwork(model, data, tmp_path / "run", config, run)
    assert path == tmp_path / "run" / "zqx.pt"
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())  # the model is frozen
    trained = load_hypernetwork(path)
    assert trained.widths == (32, 64) and trained.step == 16 and trained.sd_checkpoint_name == "tiny"
    start = TrainableHypernetwork.create(config, (32, 64), seed=run.seed).eval()

    source = TrainingData.open(data, dataset_config_for(model), model, tmp_path / "latents", 2, 0)
    latents, captions = source.batch(0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = encode_captions(
            model.model.text_encoder,
            ClipTokenizer(),
            model.config.text,
            captions,
            model.config.text.default_clip_skip,
        )
    initial = fixed_loss(model, start.stack(), latents, context)
    plain = fixed_loss(model, None, latents, context)
    final = fixed_loss(
        model, prepare_hypernetworks([HypernetworkUse(trained)], "cpu", torch.float32), latents, context
    )
    assert abs(initial - plain) < 0.001 * plain  # A1111's initialisation starts near the base model
    assert final < 0.85 * initial, (plain, initial, final)


class Stop(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(data, model, tmp_path):
    # dropout on: the resumed steps must draw the masks the unbroken run drew
    config = HypernetworkTrainConfig(
        "zqx", (1, 2, 1), "relu", use_dropout=True, dropout_structure=(0, 0.3, 0)
    )
    run = RunConfig(steps=8, batch_size=2, lr=1e-3, save_every=3, bf16=False)
    options = {"template": TEMPLATES["style_filewords"]}
    (whole_path,) = train_hypernetwork(model, data, tmp_path / "whole", config, run, options)
    settings = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert settings["dataset"]["name"] == "zqx" and "art by [name]" in settings["dataset"]["template"][0]

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise Stop  # as kill -9 after step 5: the state on disk is the one of step 3

    with pytest.raises(Stop):
        train_hypernetwork(model, data, tmp_path / "broken", config, run, options, progress=kill)
    assert not (tmp_path / "broken" / "zqx.pt").exists()
    at_3 = torch.load(tmp_path / "broken" / "state" / STATE_FILE, weights_only=True)
    assert at_3["step"] == 3
    (resumed_path,) = train_hypernetwork(model, data, tmp_path / "broken", config, run, options)
    whole = torch.load(whole_path, weights_only=True)
    resumed = torch.load(resumed_path, weights_only=True)
    for width in (32, 64):
        for i in (0, 1):
            for key, value in whole[width][i].items():
                torch.testing.assert_close(resumed[width][i][key], value, rtol=0, atol=1e-6)
                # the comparison can fail: the weights moved after step 3
                assert (at_3["module"][f"pairs.{width}.{i}.{key}"] - value).abs().max() > 1e-5

    with pytest.raises(SdStudioError, match="earlier run with other settings; pass --overwrite"):
        train_hypernetwork(model, data, tmp_path / "whole", config, RunConfig(steps=9, bf16=False), options)


def test_training_losses_with_dropout_replay_from_the_generator_alone():
    """The masks come from the step's generator: the same generator state gives the same loss, another one
    another loss, and torch's global generator is left as it was."""
    model = loaded(tiny_model("tiny", seed=2))
    config = HypernetworkTrainConfig("d", (1, 2, 1), "relu", use_dropout=True, dropout_structure=(0, 0.5, 0))
    network = randomised(config, widths=(32, 64)).train()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    args = (network, training_denoiser(model), model.model.text_encoder, ClipTokenizer(), model.config.text, 1,
            latents, ["a red zqx"])  # fmt: skip
    state = torch.get_rng_state()
    with torch.no_grad():
        losses = [float(hypernetwork_loss(*args, torch.Generator().manual_seed(s))) for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)
    assert losses[0] == losses[1] and losses[0] != losses[2]
    # with the network in eval mode the same draws of timestep and noise give another loss: dropout counted
    network.eval()
    with torch.no_grad():
        assert float(hypernetwork_loss(*args, torch.Generator().manual_seed(7))) != losses[0]
