import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import CheckpointError
from sdstudio.models.configs import PRESETS, ModelConfig
from sdstudio.models.detect import detect_config
from sdstudio.models.loading import checkpoint_info, load_model, read_safetensors, save_model
from sdstudio.models.stablediffusion import StableDiffusion, ema_key, random_model


def meta_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = StableDiffusion(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd2", "sd2-inpaint"])
def test_detect_full_presets_from_shapes(name):
    assert detect_config(meta_shapes(PRESETS[name])) == PRESETS[name]


def test_detect_v_prediction_when_told():
    assert detect_config(meta_shapes(PRESETS["sd2-v"]), prediction="v") == PRESETS["sd2-v"]


def test_detect_small_custom_architecture():
    config = detect_config(meta_shapes(PRESETS["tiny"]))
    tiny = PRESETS["tiny"]
    assert config.name == "custom"  # heads and norm groups cannot be read off the weights
    assert (config.unet.model_channels, config.unet.channel_mult, config.unet.num_res_blocks) == (32, (1, 2), 1)
    assert config.unet.attention_resolutions == tiny.unet.attention_resolutions
    assert config.unet.context_dim == 32 and not config.unet.use_linear_in_transformer
    assert config.vae == dataclasses.replace(tiny.vae, norm_groups=32)
    assert (config.text.kind, config.text.width, config.text.layers) == ("clip", 32, 2)


def test_detect_names_missing_parts():
    shapes = {k: v for k, v in meta_shapes(PRESETS["tiny"]).items() if not k.startswith("model.")}
    with pytest.raises(CheckpointError, match="no UNet.*model.diffusion_model.input_blocks.0.0.weight"):
        detect_config(shapes)


@pytest.fixture(scope="module")
def tiny_model() -> StableDiffusion:
    return random_model(PRESETS["tiny"], seed=1)


def test_save_load_round_trip_keeps_config_and_weights(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors", dtype=torch.float32)
    loaded = load_model(path)
    assert loaded.config == PRESETS["tiny"]
    reference = tiny_model.state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert len(loaded.short_hash) == 10


def test_load_converts_dtype(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny16.safetensors", dtype=torch.float16)
    loaded = load_model(path, dtype=torch.bfloat16)
    weight = loaded.model.unet.input_blocks[0][0].weight
    assert weight.dtype == torch.bfloat16
    expected = tiny_model.unet.input_blocks[0][0].weight.half().bfloat16()
    assert torch.equal(weight, expected)


def test_safetensors_are_memory_mapped_not_copied(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors", dtype=torch.float32)
    tensors, metadata = read_safetensors(path)
    assert "sdstudio.config" in metadata
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1  # every tensor is a view of the one file mapping
    loaded = load_model(path)
    weight = loaded.model.unet.input_blocks[0][0].weight
    assert weight.untyped_storage().nbytes() == path.stat().st_size  # the weight lives in the mapping


def test_ckpt_loads_weights_only(tmp_path, tiny_model):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "global_step": 5}, path)
    loaded = load_model(path, config=PRESETS["tiny"])
    assert torch.equal(loaded.model.vae.decoder.conv_out.weight, tiny_model.vae.decoder.conv_out.weight)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_ckpt_needing_code_is_refused_and_never_run(tmp_path, tiny_model):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="needs code"):
        load_model(path)
    assert not marker.exists()


def test_ema_weights_selectable(tmp_path, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for k in list(state):
        if k.startswith("model.diffusion_model."):
            state[ema_key(k)] = state[k] + 1
    path = tmp_path / "ema.safetensors"
    save_file(state, path)
    plain = load_model(path, config=PRESETS["tiny"])
    ema = load_model(path, config=PRESETS["tiny"], use_ema=True)
    w = "input_blocks.0.0.weight"
    assert torch.equal(ema.model.unet.state_dict()[w], plain.model.unet.state_dict()[w] + 1)
    assert checkpoint_info(path)["ema"] is True
    no_ema = save_model(tiny_model, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model(no_ema, use_ema=True)


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a valid .safetensors"):
        load_model(text)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable .ckpt"):
        load_model(junk)
    only_vae = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, only_vae)
    with pytest.raises(CheckpointError, match="no UNet"):
        load_model(only_vae)


def test_missing_keys_are_named(tmp_path, tiny_model):
    state = {k: v for k, v in tiny_model.state_dict().items() if "middle_block.1" not in k}
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match="missing .* keys .*middle_block.1"):
        load_model(path, config=PRESETS["tiny"])


def test_checkpoint_info_fields(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors")
    info = checkpoint_info(path)
    counts = tiny_model.parameter_counts()
    assert info["architecture"] == "tiny"
    assert info["config_source"] == "metadata"
    assert info["prediction"] == "epsilon"
    assert info["dtypes"] == ["float16"]
    assert info["parameters"] == counts
    assert info["ema"] is False


class _ConstantUNet(torch.nn.Module):
    """Returns ``x + offset``: an epsilon model predicts about the input at t=999, a v model its negation."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def forward(self, x, t, context):
        assert t.tolist() == [999.0] and context.shape == (1, 2, 16)
        return x + self.offset


def test_v_prediction_probe():
    from sdstudio.models.loading import looks_like_v_prediction

    assert looks_like_v_prediction(_ConstantUNet(-1.5), 16) is True
    assert looks_like_v_prediction(_ConstantUNet(0.1), 16) is False


def test_corrupt_header_entries_are_named(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1000]}}).encode()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt entry for tensor w"):
        load_model(path)


def test_bad_metadata_config_is_named(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors", metadata={"sdstudio.config": '{"unet": {"x": 1}}'})
    with pytest.raises(CheckpointError, match="unreadable 'sdstudio.config'"):
        load_model(path)


@pytest.mark.parametrize(
    "sampling", ['{"ngms": "0.5"}', '{"ngms": -1}', '{"ngms_all_steps": "false"}', '{"ngms": true}']
)
def test_bad_sampling_defaults_in_a_header_are_named(tmp_path, tiny_model, sampling):
    import json

    config = json.loads(tiny_model.config.to_json())
    config["sampling"].update(json.loads(sampling))
    path = save_model(tiny_model, tmp_path / "m.safetensors", metadata={"sdstudio.config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="unreadable 'sdstudio.config'.*sampling.ngms"):
        load_model(path)


def test_saved_files_get_the_usual_permissions(tmp_path, tiny_model):
    import os

    umask = os.umask(0o022)
    try:
        path = save_model(tiny_model, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
