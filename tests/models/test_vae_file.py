"""Separate VAE files: every layout loads into a tiny model's VAE and then decodes as a reference does.

References: for the LDM layouts (bare keys, ``first_stage_model.``, a full checkpoint, ``.ckpt`` with
``state_dict`` + ``loss.*`` + ``model_ema.*``, ``.pt``), a fresh ``AutoencoderKL`` that loads the source
weights with a strict ``load_state_dict`` must decode bit for bit the same; for the diffusers layout
(single file, VAE folder, pipeline folder, pre-0.14 attention names), diffusers' own ``AutoencoderKL``
with random weights in its own layout decodes the same latents within 1e-5 (fp32), so the key conversion
is checked against an independent model, not against itself. Broken variants (swapped attention
projections, a key the converter drops) must fail. Bad files raise one line and leave the model's VAE
bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from sdstudio.errors import CheckpointError
from sdstudio.models import vae_file
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel, save_model
from sdstudio.models.stablediffusion import VAE_PREFIX, random_model
from sdstudio.models.vae import AutoencoderKL
from sdstudio.models.vae_file import load_vae_into, read_vae_file, vae_short_hash
from tests.adapters.loras import loaded, tiny_model
from tests.models.test_vae import diffusers_config, random_vae
from tests.reference import randomise_

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

CONFIG = PRESETS["tiny"].vae
ATOL = 1e-5


# --- helpers ----------------------------------------------------------------------------------------


def target() -> LoadedModel:
    return loaded(tiny_model("tiny", seed=3))


def latents() -> Tensor:
    return torch.randn(2, CONFIG.embed_dim, 8, 8, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def decode(vae: torch.nn.Module, z: Tensor) -> Tensor:
    return vae.decode(z) if isinstance(vae, AutoencoderKL) else vae.decode(z).sample


def snapshot(model: LoadedModel) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.model.vae.state_dict().items()}


def assert_untouched(model: LoadedModel, before: dict[str, Tensor]) -> None:
    after = model.model.vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def ldm_state(seed: int = 11) -> dict[str, Tensor]:
    """A random VAE's weights in the original layout, without prefix."""
    return {k: v.contiguous() for k, v in random_vae(CONFIG, seed).state_dict().items()}


def strict_reference(state: dict[str, Tensor]) -> AutoencoderKL:
    with torch.device("meta"):
        ref = AutoencoderKL(CONFIG)
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.eval()


def diffusers_vae(seed: int = 21, scaling_factor: float | None = None) -> DiffusersAutoencoderKL:
    """diffusers' own AutoencoderKL for the tiny VAE config, random weights in its own layout."""
    dconfig = diffusers_config(CONFIG)
    if scaling_factor is not None:
        dconfig["scaling_factor"] = scaling_factor
    model = DiffusersAutoencoderKL(**dconfig)
    randomise_(model, seed)
    return model.eval()


def assert_loads_as(path: Path, reference: torch.nn.Module, exact: bool) -> None:
    model = target()
    z = latents()
    before = decode(model.model.vae, z)
    info = load_vae_into(model, path)
    ours, theirs = decode(model.model.vae, z), decode(reference, z)
    assert (before - theirs).abs().max() > 0.1, "the model already decoded like the reference: vacuous test"
    if exact:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0.0, atol=ATOL)
    assert info.path == path and info.name == path.name
    assert info.short_hash == vae_short_hash(path) and len(info.short_hash) == 10


# --- LDM layouts ------------------------------------------------------------------------------------


def write_ldm(folder: Path, layout: str, state: dict[str, Tensor]) -> Path:
    if layout == "ldm.safetensors":
        path = folder / "vae-ft-mse-840000-ema-pruned.safetensors"
        save_file(state, path)
    elif layout == "prefixed.safetensors":
        path = folder / "prefixed.vae.safetensors"
        save_file({VAE_PREFIX + k: v for k, v in state.items()}, path)
    elif layout == "state_dict.ckpt":
        # as stabilityai's .ckpt: the training loss's weights and the EMA bookkeeping beside the VAE's
        extra = {
            "loss.logvar": torch.zeros(()),
            "loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4),
            "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
        }
        path = folder / "vae-ft-mse-840000-ema-pruned.ckpt"
        torch.save({"state_dict": {**state, **extra}, "global_step": 840000}, path)
    else:
        path = folder / "bare.vae.pt"
        torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", ["ldm.safetensors", "prefixed.safetensors", "state_dict.ckpt", "bare.pt"])
def test_ldm_layouts_load_exactly(tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    state = ldm_state()
    path = write_ldm(tmp_path, layout, state)
    with caplog.at_level(logging.WARNING, logger="sdstudio.models.vae_file"):
        assert_loads_as(path, strict_reference(state), exact=True)
    assert not caplog.records  # loss.* and model_ema.* are expected there, not news
    read = read_vae_file(path, CONFIG)
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())


def test_full_checkpoint_is_a_vae_source(tmp_path: Path) -> None:
    source = tiny_model("tiny", seed=5)
    path = save_model(source, tmp_path / "other-model.safetensors", dtype=torch.float32)
    assert_loads_as(path, source.vae, exact=True)
    assert load_vae_into(target(), path).layout == "checkpoint"


def test_half_file_into_fp32_model_and_dtype_device_format_kept(tmp_path: Path) -> None:
    state = ldm_state()
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in state.items()}, path)
    assert read_vae_file(path, CONFIG)["decoder.conv_out.weight"].dtype == torch.float16  # as stored

    model = loaded(tiny_model("tiny", seed=3, dtype=torch.bfloat16), dtype=torch.bfloat16)
    model.model.vae.to(memory_format=torch.channels_last)
    weight = model.model.vae.decoder.conv_in.weight
    pointer = weight.data_ptr()
    load_vae_into(model, path)
    assert weight is model.model.vae.decoder.conv_in.weight and weight.data_ptr() == pointer
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight, state["decoder.conv_in.weight"].half().to(torch.bfloat16))


# --- diffusers layouts ------------------------------------------------------------------------------

_OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def old_attention_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for new, old in _OLD_NAMES.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["single file", "old attention names", "vae folder", "pipeline folder"])
def test_diffusers_layouts_match_diffusers(tmp_path: Path, layout: str) -> None:
    reference = diffusers_vae()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if layout == "single file":
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file(state, path)
    elif layout == "old attention names":
        path = tmp_path / "old.safetensors"
        old = old_attention_names(state)
        assert old.keys() != state.keys()
        save_file(old, path)
    elif layout == "vae folder":
        path = tmp_path / "my-vae"
        reference.save_pretrained(path)
    else:
        path = tmp_path / "pipeline"
        reference.save_pretrained(path / "vae")
        (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_loads_as(path, reference, exact=False)
    if path.is_dir():
        weights = next(path.rglob("diffusion_pytorch_model.safetensors"))
        assert vae_short_hash(path) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def test_swapped_attention_projections_fail_parity(tmp_path: Path) -> None:
    """The broken variant: a file whose decoder's q and k projections trade places loads (same shapes)
    but no longer decodes as the reference, so the parity above is checked by values, not only shapes."""
    reference = diffusers_vae()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    q, k = "decoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.attentions.0.to_k.weight"
    state[q], state[k] = state[k], state[q]
    path = tmp_path / "swapped.safetensors"
    save_file(state, path)
    model = target()
    load_vae_into(model, path)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            decode(model.model.vae, latents()), decode(reference, latents()), rtol=0, atol=ATOL
        )


def test_a_key_the_converter_drops_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken variant of the conversion: a converter that leaves one weight out is caught by the
    completeness check, and nothing is written."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_vae().state_dict().items()}, path)
    convert = vae_file.vae_to_ldm

    def dropping(state, config):
        out = convert(state, config)
        del out["decoder.up.1.upsample.conv.weight"]
        return out

    monkeypatch.setattr(vae_file, "vae_to_ldm", dropping)
    model = target()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing 1 of .*decoder\.up\.1\.upsample\.conv\.weight"):
        load_vae_into(model, path)
    assert_untouched(model, before)


def test_other_scaling_factor_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An SDXL-like VAE (0.13025): loads, as A1111 lets it, and warns; the model's factor is kept."""
    reference = diffusers_vae(scaling_factor=0.13025)
    reference.save_pretrained(tmp_path / "sdxl-vae")
    model = target()
    with caplog.at_level(logging.WARNING, logger="sdstudio.models.vae_file"):
        info = load_vae_into(model, tmp_path / "sdxl-vae")
    assert info.scale_factor == 0.13025 and model.config.vae.scale_factor == 0.18215
    assert any("0.13025" in r.getMessage() and "0.18215" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdstudio.models.vae_file"):
        load_vae_into(model, write_ldm(tmp_path, "ldm.safetensors", ldm_state()))
    assert not caplog.records


# --- bad inputs: one line, model untouched ----------------------------------------------------------


def kohya_lora(path: Path) -> Path:
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        path,
    )
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_file(tmp_path: Path, kind: str) -> Path:
    state = ldm_state()
    if kind == "other architecture":
        path = tmp_path / "toyworld.vae.safetensors"
        other = {k: v.contiguous() for k, v in random_vae(PRESETS["toyworld"].vae).state_dict().items()}
        save_file(other, path)
    elif kind == "lora":
        path = kohya_lora(tmp_path / "style.safetensors")
    elif kind == "checkpoint without vae":
        path = tmp_path / "unet-only.safetensors"
        full = random_model(PRESETS["tiny"]).state_dict()
        save_file({k: v for k, v in full.items() if not k.startswith(VAE_PREFIX)}, path)
    elif kind == "truncated safetensors":
        whole = write_ldm(tmp_path, "ldm.safetensors", state).read_bytes()
        path = tmp_path / "cut.safetensors"
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "truncated ckpt":
        whole = write_ldm(tmp_path, "state_dict.ckpt", state).read_bytes()
        path = tmp_path / "cut.ckpt"
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "pickle needing code":
        path = tmp_path / "evil.vae.pt"
        torch.save({"state_dict": state, "x": _Payload(tmp_path / "code-ran")}, path)
    elif kind == "nan":
        state["decoder.mid.attn_1.v.weight"][0, 0, 0, 0] = float("nan")
        path = write_ldm(tmp_path, "ldm.safetensors", state)
    elif kind == "missing key":
        del state["post_quant_conv.bias"]
        path = write_ldm(tmp_path, "bare.pt", state)
    elif kind == "extra key":
        state["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
        path = write_ldm(tmp_path, "ldm.safetensors", state)
    elif kind == "integer weights":
        state["quant_conv.bias"] = torch.zeros(8, dtype=torch.int64)
        path = write_ldm(tmp_path, "ldm.safetensors", state)
    elif kind == "other norm groups":
        path = tmp_path / "groups"
        dconfig = diffusers_config(CONFIG)
        dconfig["norm_num_groups"] = 4  # same shapes, another network
        DiffusersAutoencoderKL(**dconfig).save_pretrained(path)
    elif kind == "unet folder":
        path = tmp_path / "unet"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    elif kind == "empty folder":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = tmp_path / "nothing.safetensors"
    return path


BAD = {
    "other architecture": r"a VAE of another architecture: \S+ is \[",
    "lora": r"not a VAE: a LoRA",
    "checkpoint without vae": r"not a VAE: a Stable Diffusion checkpoint without VAE weights",
    "truncated safetensors": r"not a valid \.safetensors file",
    "truncated ckpt": r"not a readable \.ckpt",
    "pickle needing code": r"needs code to be executed",
    "nan": r"weight decoder\.mid\.attn_1\.v\.weight holds NaN",
    "missing key": r"not a complete VAE: missing 1 of .*post_quant_conv\.bias",
    "extra key": r"1 weights this model's VAE does not have \(encoder\.down\.0\.attn\.0\.q\.weight\)",
    "integer weights": r"quant_conv\.bias is torch\.int64, not floating point",
    "other norm groups": r"its config has norm_groups=4, this model's VAE 8",
    "unet folder": r"a diffusers UNet2DConditionModel, not an AutoencoderKL",
    "empty folder": r"not a diffusers VAE or pipeline folder",
    "no such file": r"no such file",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_raise_one_line_and_leave_the_model(tmp_path: Path, kind: str) -> None:
    path = bad_file(tmp_path, kind)
    model = target()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as raised:
        load_vae_into(model, path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert raised.match(BAD[kind])
    assert_untouched(model, before)
    assert not (tmp_path / "code-ran").exists()


def test_other_architecture_names_the_first_differing_shapes(tmp_path: Path) -> None:
    path = bad_file(tmp_path, "other architecture")
    with pytest.raises(CheckpointError) as raised:
        read_vae_file(path, CONFIG)
    # toyworld's VAE (ch_mult 1, 2, 2, 4) has tiny's (1, 2) levels' shapes, then a wider middle
    assert str(raised.value) == (
        f"{path}: a VAE of another architecture: encoder.mid.block_1.norm1.weight is [128] in the file, "
        "[64] in this model's VAE; use a VAE made for this model"
    )


def test_values_beyond_the_model_dtype_are_refused(tmp_path: Path) -> None:
    state = ldm_state()
    state["decoder.conv_out.bias"][0] = 1e6  # finite in fp32, infinite in fp16
    path = write_ldm(tmp_path, "ldm.safetensors", state)
    model = loaded(tiny_model("tiny", seed=3, dtype=torch.float16), dtype=torch.float16)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias holds values beyond float16's range"):
        load_vae_into(model, path)
    assert_untouched(model, before)
    load_vae_into(loaded(tiny_model("tiny", seed=3)), path)  # fp32 holds it


def test_name_and_hash_are_a1111s(tmp_path: Path) -> None:
    """A1111 writes ``VAE: <base name with extension>`` and ``VAE hash: <sha256[:10]>`` of the file."""
    path = write_ldm(tmp_path, "ldm.safetensors", ldm_state())
    info = load_vae_into(target(), path)
    assert info.name == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert info.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert info.layout == "ldm" and info.scale_factor is None
