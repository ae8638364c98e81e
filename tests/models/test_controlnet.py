"""ControlNet against diffusers' ControlNetModel on the same random weights, and loading of the layouts users
have: cldm's single file (``control_model.*`` or unprefixed, .safetensors / .pth), diffusers' folder and
diffusers' keys in one file.

Parity procedure: fan-in-scaled random weights in our (cldm) layout -> diffusers' own single-file converter
(``convert_controlnet_checkpoint``) -> strict load into ``ControlNetModel`` -> same latents, control image,
timesteps, context (and SDXL's vector) -> every residual within 1e-4 (fp32). Random weights because the zero
convolutions would make both sides return zeros.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import UNetConfig, preset
from sdstudio.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    controlnet_from_diffusers,
    controlnet_from_unet,
    detect_controlnet,
    load_controlnet,
)
from sdstudio.models.sdxl import SizeConditioning, size_vector
from tests.reference import (
    controlnet_diffusers_config,
    controlnet_to_diffusers,
    diffusers_controlnet,
    diffusers_unet,
    random_controlnet,
    random_unet,
)

pytest.importorskip("diffusers")
from diffusers import ControlNetModel

ATOL = 1e-4
PREFIX = "control_model."
TINY = preset("tiny").unet
TINY_SD2 = preset("tiny-sd2").unet
TINY_SDXL = preset("tiny-sdxl").unet


@dataclasses.dataclass
class Inputs:
    x: Tensor
    hint: Tensor
    t: Tensor
    context: Tensor
    pooled: Tensor | None = None
    y: Tensor | None = None
    time_ids: Tensor | None = None


def _inputs(unet: UNetConfig, side: int = 8, seed: int = 3) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    inputs = Inputs(
        x=torch.randn(2, unet.in_channels, side, side, generator=gen),
        hint=torch.rand(2, 3, side * 8, side * 8, generator=gen),  # a control image in [0, 1]
        t=torch.tensor([981.0, 20.0]),
        context=torch.randn(2, 77, unet.context_dim, generator=gen),
    )
    if unet.adm_in_channels:
        inputs.pooled = torch.randn(2, unet.adm_in_channels - 6 * 256, generator=gen)
        inputs.y = size_vector(
            inputs.pooled, SizeConditioning(original=(96, 80), target=(64, 72), crop=(8, 4)), False
        )
        inputs.time_ids = torch.tensor([[96.0, 80.0, 8.0, 4.0, 64.0, 72.0]] * 2)  # original, crop, target
    return inputs


def _ours(model: ControlNet, inputs: Inputs) -> list[Tensor]:
    with torch.no_grad():
        return model(inputs.x, inputs.hint, inputs.t, inputs.context, y=inputs.y)


def _added(inputs: Inputs) -> dict[str, Tensor] | None:
    """SDXL's vector as diffusers takes it: the pooled text and the six sizes apart."""
    return None if inputs.y is None else {"text_embeds": inputs.pooled, "time_ids": inputs.time_ids}


def _theirs(model: ControlNetModel, inputs: Inputs) -> list[Tensor]:
    """diffusers' ``down_block_res_samples`` and then its ``mid_block_res_sample``, as ours come."""
    with torch.no_grad():
        out = model(inputs.x, inputs.t, inputs.context, inputs.hint, added_cond_kwargs=_added(inputs))
    return [*out.down_block_res_samples, out.mid_block_res_sample]


def _assert_same(ours: list[Tensor], theirs: list[Tensor], atol: float = 0.0) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, i=i: f"residual {i}: {m}")


@pytest.mark.parametrize("unet", [TINY, TINY_SD2, TINY_SDXL], ids=["sd1", "sd2", "sdxl"])
def test_residuals_equal_diffusers(unet: UNetConfig) -> None:
    model = random_controlnet(unet)
    inputs = _inputs(unet)
    ours = _ours(model, inputs)
    theirs_model = diffusers_controlnet(unet, model.state_dict())
    theirs = _theirs(theirs_model, inputs)
    # one residual per input block (conv_in, each ResBlock, each Downsample), then the middle block's
    assert len(ours) == len(model.input_blocks) + 1
    assert all(r.std() > 0.1 for r in ours)  # real residuals, not zero-initialised ones
    _assert_same(ours, theirs, ATOL)
    # the control image and (SDXL) the vector matter: other ones move the residuals far beyond the tolerance
    changed = dataclasses.replace(inputs, hint=inputs.hint.flip(-1))
    assert (_ours(model, changed)[0] - ours[0]).abs().max() > 100 * ATOL
    if unet.adm_in_channels:
        other = dataclasses.replace(inputs, time_ids=inputs.time_ids + 64)
        assert (_theirs(theirs_model, other)[-1] - theirs[-1]).abs().max() > 100 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", pytest.param("sdxl", marks=pytest.mark.heavy)])
def test_residuals_equal_diffusers_full_width(name: str) -> None:
    """The real sizes (control_v11p_sd15_*, SDXL's full ControlNets) with SD's 8 / 64-channel heads."""
    unet = preset(name).unet
    try:
        model = random_controlnet(unet)
        inputs = _inputs(unet, side=8)
        ours = _ours(model, inputs)
        theirs = _theirs(diffusers_controlnet(unet, model.state_dict()), inputs)
        assert all(r.std() > 0.1 for r in ours)
        _assert_same(ours, theirs, ATOL * max(float(r.abs().max()) for r in theirs))
    finally:
        gc.collect()  # 1.4 / 5 GB of weights; other test processes share this machine


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_controlled_unet_equals_diffusers(name: str) -> None:
    """Our residuals through ``UNetModel.forward(control=...)`` equal diffusers' UNet given diffusers' residuals
    (``down_block_additional_residuals``, ``mid_block_additional_residual``): they are added where they must be."""
    config = preset(name)
    unet = random_unet(config.unet, seed=1)
    model = random_controlnet(config.unet)
    inputs = _inputs(config.unet)
    residuals = _ours(model, inputs)
    theirs_unet = diffusers_unet(
        config, {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    )
    theirs = _theirs(diffusers_controlnet(config.unet, model.state_dict()), inputs)
    with torch.no_grad():
        ours = unet(inputs.x, inputs.t, inputs.context, y=inputs.y, control=residuals)
        plain = unet(inputs.x, inputs.t, inputs.context, y=inputs.y)
        expected = theirs_unet(
            inputs.x, inputs.t, inputs.context, added_cond_kwargs=_added(inputs),
            down_block_additional_residuals=theirs[:-1], mid_block_additional_residual=theirs[-1],
        ).sample  # fmt: skip
    assert (ours - plain).abs().max() > 100 * ATOL  # the control changes the prediction
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL * float(expected.abs().max()))


def test_global_average_pooling_equals_diffusers() -> None:
    model = random_controlnet(TINY)
    pooled = ControlNet(dataclasses.replace(model.config, global_average_pooling=True))
    pooled.load_state_dict(model.state_dict())
    inputs = _inputs(TINY)
    ours = _ours(pooled.eval(), inputs)
    theirs = diffusers_controlnet(TINY, model.state_dict())
    theirs.register_to_config(global_pool_conditions=True)
    assert all(r.shape[-2:] == (1, 1) for r in ours)
    _assert_same(ours, _theirs(theirs, inputs), ATOL)


def test_forward_refuses_wrong_inputs() -> None:
    model = random_controlnet(TINY)
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match=r"control image must be \[1 or 1, 3, 64, 64\]"):
        model(x, torch.zeros(1, 3, 32, 32), t, context)
    with pytest.raises(ValueError, match="takes no vector"):
        model(x, torch.zeros(1, 3, 64, 64), t, context, y=torch.zeros(1, 7))
    with pytest.raises(ValueError, match="needs y"):
        random_controlnet(TINY_SDXL)(x, torch.zeros(1, 3, 64, 64), t, torch.zeros(1, 77, 64))


def test_a_new_controlnet_copies_the_unet_encoder_and_adds_nothing() -> None:
    unet = random_unet(TINY_SDXL)
    model = controlnet_from_unet(unet)
    theirs = unet.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block.")):
            assert torch.equal(value, theirs[key]), key
    inputs = _inputs(TINY_SDXL)
    residuals = _ours(model, inputs)
    assert len(residuals) == len(model.input_blocks) + 1 and all(not r.any() for r in residuals)


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl", "tiny-sdxl"])
def test_detected_config_equals_the_built_one(name: str) -> None:
    unet = preset(name).unet
    if name == "tiny-sdxl":  # what shapes cannot tell: SD's 64-channel heads and 32 groups
        unet = dataclasses.replace(unet, num_head_channels=64, norm_groups=32)
    config = ControlNetConfig(unet=dataclasses.replace(unet, out_channels=unet.in_channels))
    with torch.device("meta"):
        model = ControlNet(config)
    assert detect_controlnet({k: tuple(v.shape) for k, v in model.state_dict().items()}) == config


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_diffusers_keys_convert_back_to_ours(name: str) -> None:
    """Our layout -> diffusers' converter -> ``controlnet_from_diffusers``: every tensor back under its key."""
    unet = preset(name).unet
    with torch.device("meta"):
        state = ControlNet(ControlNetConfig(unet=unet)).state_dict()
    back = controlnet_from_diffusers(controlnet_to_diffusers(state, controlnet_diffusers_config(unet)))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


# ------------------------------------------------------------------------------------------------- loading


def _save_single_files(model: ControlNet, folder: Path) -> dict[str, Path]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {
        "prefixed.safetensors": {PREFIX + k: v for k, v in state.items()},
        "unprefixed.safetensors": state,
        "prefixed.pth": {PREFIX + k: v for k, v in state.items()},
        # a whole ControlLDM checkpoint: the SD model beside the ControlNet, its keys ignored
        "controlldm.ckpt": {"state_dict": {**{PREFIX + k: v for k, v in state.items()}, "model.diffusion_model.out.2.bias": torch.zeros(4)}},
    }  # fmt: skip
    paths = {}
    for name, content in files.items():
        paths[name] = folder / name
        if name.endswith(".safetensors"):
            save_file(content, paths[name])
        else:
            torch.save(content, paths[name])
    return paths


@pytest.mark.parametrize("unet", [TINY, TINY_SDXL], ids=["sd1", "sdxl"])
def test_every_layout_loads_to_the_same_residuals(unet: UNetConfig, tmp_path: Path) -> None:
    model = random_controlnet(unet)
    inputs = _inputs(unet)
    expected = _ours(model, inputs)
    paths = _save_single_files(model, tmp_path)
    diffusers_model = diffusers_controlnet(unet, model.state_dict())
    diffusers_model.save_pretrained(tmp_path / "diffusers")
    paths["diffusers folder"] = tmp_path / "diffusers"
    save_file(
        {k: v.contiguous() for k, v in diffusers_model.state_dict().items()},
        tmp_path / "diffusers_keys.safetensors",
    )
    paths["diffusers keys"] = tmp_path / "diffusers_keys.safetensors"
    for name, path in paths.items():
        loaded, config = load_controlnet(path, base=unet)
        assert config == model.config, name
        _assert_same(_ours(loaded, inputs), expected)
    # a diffusers folder says its heads and groups itself
    loaded, config = load_controlnet(tmp_path / "diffusers")
    assert config.unet == dataclasses.replace(unet, out_channels=unet.in_channels)
    _assert_same(_ours(loaded, inputs), expected)


def test_loads_in_half_precision(tmp_path: Path) -> None:
    model = random_controlnet(TINY)
    path = _save_single_files(model, tmp_path)["prefixed.safetensors"]
    loaded, _ = load_controlnet(path, base=TINY, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    inputs = _inputs(TINY)
    half, full = _ours(loaded, inputs), _ours(model, inputs)
    assert half[-1].dtype == torch.bfloat16
    err = (half[-1].float() - full[-1]).abs().max() / full[-1].abs().max()
    assert err < 0.05


def _write(path: Path, state: dict[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_refuses_what_is_not_a_fittingrandom_controlnet(tmp_path: Path) -> None:
    state = {PREFIX + k: v for k, v in random_controlnet(TINY).state_dict().items()}
    # a hint encoder with one layer left out: a gap at its index, or the last conv moved into it
    gap = {k: v for k, v in state.items() if not k.startswith(PREFIX + "input_hint_block.12.")}
    with pytest.raises(CheckpointError, match=r"input_hint_block\.\[0, 2, 4, 6, 8, 10, 14\]"):
        load_controlnet(_write(tmp_path / "gap.safetensors", gap))
    moved = {k.replace("input_hint_block.14.", "input_hint_block.12."): v for k, v in gap.items()}
    with pytest.raises(CheckpointError, match="not a ControlNet's"):
        load_controlnet(_write(tmp_path / "moved.safetensors", moved))
    # a level's pair of convs left out: the next conv takes the wrong width
    pair = {
        k: v
        for k, v in state.items()
        if not k.startswith((PREFIX + "input_hint_block.10.", PREFIX + "input_hint_block.12."))
    }
    pair = {k.replace("input_hint_block.14.", "input_hint_block.10."): v for k, v in pair.items()}  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"input_hint_block\.10 takes 256 channels but input_hint_block\.8 gives 96"
    ):
        load_controlnet(_write(tmp_path / "pair.safetensors", pair))
    # a zero conv of the wrong width
    wrong = dict(state)
    wrong[PREFIX + "zero_convs.1.0.weight"] = torch.zeros(32, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"weights do not fit a ControlNet: .*zero_convs\.1\.0\.weight"):
        load_controlnet(_write(tmp_path / "wrong.safetensors", wrong))
    # a ControlNet without its middle zero conv
    short = {k: v for k, v in state.items() if "middle_block_out" not in k}
    with pytest.raises(CheckpointError, match="not a ControlNet .missing middle_block_out.0.weight"):
        load_controlnet(_write(tmp_path / "short.safetensors", short))
    # a Stable Diffusion UNet is not a ControlNet
    unet = {"model.diffusion_model." + k: v for k, v in random_unet(TINY).state_dict().items()}
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(_write(tmp_path / "unet.safetensors", unet))
    # an SDXL ControlNet on an SD 1.x model
    sdxl = _write(tmp_path / "sdxl.safetensors", random_controlnet(TINY_SDXL).state_dict())
    with pytest.raises(
        CheckpointError, match=r"does not fit the model: it is for a UNet with SDXL, .* vector y 1568"
    ):
        load_controlnet(sdxl, base=TINY)
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "absent.safetensors")


def test_refuses_unsupported_diffusers_configs(tmp_path: Path) -> None:
    model = diffusers_controlnet(TINY, random_controlnet(TINY).state_dict())
    model.register_to_config(controlnet_conditioning_channel_order="bgr")
    model.save_pretrained(tmp_path / "bgr")
    with pytest.raises(CheckpointError, match="controlnet_conditioning_channel_order='bgr' is not supported"):
        load_controlnet(tmp_path / "bgr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_controlnet(tmp_path / "empty")
