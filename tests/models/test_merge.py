"""``sdstudio checkpoint merge`` / ``convert``: A1111's merge formulas on tiny random checkpoints, format round
trips bit for bit, and a written diffusers folder checked against diffusers' and transformers' own models.

Every equality test has a sibling showing that the check fails on a deliberately wrong result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sdstudio.cli import build_parser, run
from sdstudio.cli_checkpoint import add_checkpoint_commands
from sdstudio.errors import CheckpointError, SdStudioError
from sdstudio.models.configs import METADATA_KEY, PRESETS, ModelConfig
from sdstudio.models.diffusers_convert import load_diffusers_folder
from sdstudio.models.loading import file_sha256, load_model, looks_like_v_prediction, save_model
from sdstudio.models.merge import (
    RECIPE_KEY,
    MergeRecipe,
    _predicts_v,
    convert_checkpoint,
    merge_checkpoints,
    open_source,
)
from sdstudio.models.stablediffusion import UNET_PREFIX, VAE_PREFIX, ema_key, random_model
from tests.reference import randomise_

TINY = PRESETS["tiny"]
UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"


def _write(path: Path, config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    model = random_model(config, seed=seed)
    randomise_(model, seed)  # LDM zero-inits some layers; parity on zeros would prove nothing
    return save_model(model, path, dtype=dtype)


@pytest.fixture(scope="module")
def abc(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("abc")
    return tuple(_write(root / f"{n}.safetensors", TINY, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))


def _read(path: Path) -> dict[str, Tensor]:
    return load_file(path)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _identical(x: dict[str, Tensor], y: dict[str, Tensor]) -> bool:
    """Same keys, and every tensor with the same dtype, shape and bytes."""
    return set(x) == set(y) and all(
        x[k].dtype == y[k].dtype
        and x[k].shape == y[k].shape
        and torch.equal(x[k].reshape(-1).view(torch.uint8), y[k].reshape(-1).view(torch.uint8))
        for k in x
    )


# ------------------------------------------------------------------------------------------ merge formulas


def test_weighted_sum_at_zero_and_one_gives_a_and_b_exactly(abc, tmp_path):
    a, b, _ = abc
    at0 = merge_checkpoints([a, b], tmp_path / "m0.safetensors", alpha=0.0)
    at1 = merge_checkpoints([a, b], tmp_path / "m1.safetensors", alpha=1.0)
    assert at0.merged == len(_read(a)) and at0.kept == 0
    assert _identical(_read(at0.path), _read(a))
    assert _identical(_read(at1.path), _read(b))
    assert not _identical(_read(at1.path), _read(a))  # the check can fail


def test_weighted_sum_and_add_difference_against_references(abc, tmp_path):
    a, b, c = (_read(p) for p in abc)
    m = 0.3
    ws = _read(merge_checkpoints(abc[:2], tmp_path / "ws.safetensors", alpha=m).path)
    ad = _read(merge_checkpoints(abc, tmp_path / "ad.safetensors", alpha=m, method="add-difference").path)
    expected_ws = {k: (1 - m) * a[k] + m * b[k] for k in a}
    expected_ad = {k: a[k] + m * (b[k] - c[k]) for k in a}
    assert _identical(ws, expected_ws)
    assert _identical(ad, expected_ad)
    # wrong references fail: the difference the other way round, the weights swapped
    assert not _identical(ad, {k: a[k] + m * (c[k] - b[k]) for k in a})
    assert not _identical(ws, {k: m * a[k] + (1 - m) * b[k] for k in a})


def test_recipe_and_config_in_the_header(abc, tmp_path):
    a, b, c = abc
    report = merge_checkpoints(
        abc, tmp_path / "r.safetensors", alpha=0.25, method="add-difference", dtype="fp16"
    )
    meta = _metadata(report.path)
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe == {
        "method": "add-difference",
        "alpha": 0.25,
        "models": ["a.safetensors", "b.safetensors", "c.safetensors"],
        "hashes": [file_sha256(p)[:10] for p in (a, b, c)],
        "dtype": "fp16",
        "no_ema": False,
        "bake_vae": None,
        "bake_vae_hash": None,
    }
    assert MergeRecipe.from_json(meta[RECIPE_KEY]) == report.recipe
    assert ModelConfig.from_json(meta[METADATA_KEY]) == TINY
    assert {t.dtype for t in _read(report.path).values()} == {torch.float16}
    assert load_model(report.path).config == TINY


def test_ckpt_inputs_and_output(abc, tmp_path):
    a, b, _ = abc
    a_ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": _read(a), "global_step": 1}, a_ckpt)
    out = merge_checkpoints([a_ckpt, b], tmp_path / "m.ckpt", alpha=1.0).path
    state = torch.load(out, weights_only=True)["state_dict"]
    assert _identical(state, _read(b))


def test_what_a1111_does_not_merge_is_kept_from_a(abc, tmp_path):
    """Keys without ``model`` (the schedule's buffers) and ``position_ids`` (float in some files) stay A's."""
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    paths = []
    for name, source, shift in (("a", abc[0], 0.0), ("b", abc[1], 0.5)):
        extra = {position_ids: torch.arange(77.0)[None] + shift, "alphas_cumprod": torch.rand(1000) + shift}
        save_file({**_read(source), **extra}, tmp_path / f"{name}.safetensors", metadata=_metadata(source))
        paths.append(tmp_path / f"{name}.safetensors")
    report = merge_checkpoints(paths, tmp_path / "m.safetensors", alpha=0.5)
    out, a = _read(report.path), _read(paths[0])
    assert report.kept == 2 and report.merged == len(a) - 2
    assert torch.equal(out[position_ids], a[position_ids]) and torch.equal(
        out["alphas_cumprod"], a["alphas_cumprod"]
    )
    assert not torch.equal(out[UNET_IN], a[UNET_IN])


# ---------------------------------------------------------------------------------------- architectures


def test_mismatched_architectures_refused_naming_the_first_key(abc, tmp_path):
    narrow = dataclasses.replace(TINY, name="custom", unet=dataclasses.replace(TINY.unet, model_channels=16))
    other = _write(tmp_path / "narrow.safetensors", narrow, 4)
    out = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError) as e:
        merge_checkpoints([abc[0], other], out, alpha=0.5)
    message = str(e.value)
    assert "\n" not in message and not out.exists()
    assert "model.diffusion_model.input_blocks.0.0.bias: [32] vs [16]" in message
    sd2 = _write(tmp_path / "sd2.safetensors", PRESETS["tiny-sd2"], 5)
    with pytest.raises(CheckpointError, match=r"cond_stage_model\.model\.ln_final\.bias: absent vs \[32\]"):
        merge_checkpoints([abc[0], sd2], out, alpha=0.5)
    with pytest.raises(CheckpointError, match="different architectures"):  # C is checked against B too
        merge_checkpoints([abc[0], abc[1], other], out, alpha=0.5, method="add-difference")


def test_inpainting_model_a_merges_its_first_four_input_channels(abc, tmp_path):
    inpaint = dataclasses.replace(TINY, name="custom", unet=dataclasses.replace(TINY.unet, in_channels=9))
    a = _write(tmp_path / "inpaint.safetensors", inpaint, 6)
    b = abc[1]
    report = merge_checkpoints([a, b], tmp_path / "m.safetensors", alpha=0.5)
    assert report.inpainting and report.merged == len(_read(a))
    got, wa, wb = (_read(p)[UNET_IN] for p in (report.path, a, b))
    assert got.shape == wa.shape == (32, 9, 3, 3)
    assert torch.equal(got[:, :4], 0.5 * wa[:, :4] + 0.5 * wb)
    assert torch.equal(got[:, 4:], wa[:, 4:])  # mask and masked-image channels stay A's
    with pytest.raises(CheckpointError, match="give the inpainting model first"):
        merge_checkpoints([b, a], tmp_path / "n.safetensors", alpha=0.5)


# ----------------------------------------------------------------------------------------- EMA and dtype


@pytest.fixture(scope="module")
def with_ema(abc, tmp_path_factory) -> Path:
    """Model A plus LDM's EMA copies (``model_ema.*``, its weights + 1) and the EMA's two counters."""
    state = _read(abc[0])
    ema = {ema_key(k): v + 1 for k, v in state.items() if k.startswith(UNET_PREFIX)}
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
    }
    path = tmp_path_factory.mktemp("ema") / "ema.safetensors"
    save_file({**state, **ema, **extra}, path, metadata=_metadata(abc[0]))
    return path


def test_convert_ema_choices(with_ema, abc, tmp_path):
    full, plain = _read(with_ema), _read(abc[0])
    kept = _read(convert_checkpoint(with_ema, tmp_path / "k.safetensors").path)
    dropped = _read(convert_checkpoint(with_ema, tmp_path / "d.safetensors", ema="drop").path)
    used = _read(convert_checkpoint(with_ema, tmp_path / "u.safetensors", ema="use").path)
    assert _identical(kept, full)
    assert _identical(dropped, plain)  # --no-ema: no model_ema.* key, the rest untouched
    assert set(used) == set(plain) and all(
        torch.equal(used[k], plain[k] + 1 if k.startswith(UNET_PREFIX) else plain[k]) for k in plain
    )
    assert not _identical(used, plain)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        convert_checkpoint(abc[0], tmp_path / "none.safetensors", ema="use")


def test_merge_ema_and_no_ema(with_ema, abc, tmp_path, caplog):
    both = _read(merge_checkpoints([with_ema, with_ema], tmp_path / "e.safetensors", alpha=0.5).path)
    assert any(k.startswith("model_ema.") and k != "model_ema.decay" for k in both)
    pruned = merge_checkpoints([with_ema, with_ema], tmp_path / "p.safetensors", alpha=0.5, no_ema=True)
    assert not any(k.startswith("model_ema.") for k in _read(pruned.path)) and pruned.recipe.no_ema
    with caplog.at_level(logging.WARNING):
        mixed = merge_checkpoints([with_ema, abc[1]], tmp_path / "m.safetensors", alpha=0.5)
    assert not any(k.startswith("model_ema.") for k in _read(mixed.path))
    assert "not every input has" in caplog.text


def test_fp16_halves_the_size(abc, tmp_path):
    out = convert_checkpoint(abc[0], tmp_path / "half.safetensors", dtype="fp16").path
    full, half = _read(abc[0]), _read(out)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], full[k].half()) for k in full)
    data = sum(t.numel() * 4 for t in full.values())
    assert abs(out.stat().st_size - abc[0].stat().st_size / 2) < 0.01 * data  # headers aside: half
    merged = merge_checkpoints(abc[:2], tmp_path / "mh.safetensors", alpha=0.5, dtype="fp16").path
    assert abs(merged.stat().st_size - out.stat().st_size) < 0.01 * data


def test_bake_vae(abc, tmp_path):
    vae = {k[len(VAE_PREFIX) :]: v for k, v in _read(abc[2]).items() if k.startswith(VAE_PREFIX)}
    vae_file = tmp_path / "vae-ft.safetensors"
    save_file(vae, vae_file)  # the original VAE releases' layout: LDM keys without prefix
    report = merge_checkpoints(abc[:2], tmp_path / "v.safetensors", alpha=0.5, bake_vae=vae_file)
    out, a, b = _read(report.path), _read(abc[0]), _read(abc[1])
    assert all(torch.equal(out[VAE_PREFIX + k], v) for k, v in vae.items())
    assert torch.equal(out[UNET_IN], 0.5 * a[UNET_IN] + 0.5 * b[UNET_IN])
    assert report.recipe.bake_vae == "vae-ft.safetensors"
    assert report.recipe.bake_vae_hash == file_sha256(vae_file)[:10]
    wrong = {k: v for k, v in vae.items() if not k.startswith("decoder.")}
    save_file(wrong, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not a complete VAE"):
        merge_checkpoints(
            abc[:2], tmp_path / "w.safetensors", alpha=0.5, bake_vae=tmp_path / "partial.safetensors"
        )


# --------------------------------------------------------------------------------------------- outputs


def test_output_checks_before_work(abc, tmp_path):
    a, b, _ = abc
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(SdStudioError, match="already exists; pass --overwrite"):
        merge_checkpoints([a, b], existing, alpha=0.5)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(SdStudioError, match="is also an input"):
        merge_checkpoints([a, b], b, alpha=0.5, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SdStudioError, match="is a file, not a folder"):
        merge_checkpoints([a, b], blocker / "out.safetensors", alpha=0.5)
    with pytest.raises(SdStudioError, match="cannot write .bin files"):
        convert_checkpoint(a, tmp_path / "x.bin")
    merge_checkpoints([a, b], existing, alpha=0.0, overwrite=True)
    assert _identical(_read(existing), _read(a))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


# ------------------------------------------------------------------------------------ diffusers folders


def test_single_file_to_diffusers_and_back_is_bit_identical(abc, tmp_path):
    a = abc[0]
    folder = convert_checkpoint(a, tmp_path / "tiny-diffusers").path
    assert {p.name for p in folder.iterdir()} == {
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "scheduler",
    }
    config, _ = load_diffusers_folder(folder)
    assert config == TINY
    back = convert_checkpoint(folder, tmp_path / "back.safetensors").path
    assert _identical(_read(back), _read(a))
    assert ModelConfig.from_json(_metadata(back)[METADATA_KEY]) == TINY
    # a broken conversion (two same-shaped weights swapped in the folder) no longer round-trips
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(unet_file)
    q, k = (f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{n}.weight" for n in "qk")
    unet[q], unet[k] = unet[k], unet[q]
    save_file(unet, unet_file, metadata={"format": "pt"})
    broken = convert_checkpoint(folder, tmp_path / "broken.safetensors").path
    assert not _identical(_read(broken), _read(a))
    # replacing a diffusers folder (atomically, nothing left beside it); never another kind of folder
    convert_checkpoint(a, folder, overwrite=True)
    assert _identical(_read(convert_checkpoint(folder, tmp_path / "again.safetensors").path), _read(a))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"")
    with pytest.raises(SdStudioError, match="not a diffusers model; refusing to replace it"):
        convert_checkpoint(a, other, overwrite=True)


def test_merge_into_a_diffusers_folder(abc, tmp_path):
    single = merge_checkpoints(abc[:2], tmp_path / "m.safetensors", alpha=0.4).path
    folder = merge_checkpoints(abc[:2], tmp_path / "m-diffusers", alpha=0.4).path
    config, state = load_diffusers_folder(folder)
    assert config == TINY and _identical(state, _read(single))


def test_sd2_folder_drops_what_diffusers_has_no_place_for(tmp_path):
    src = _write(tmp_path / "sd2.safetensors", dataclasses.replace(PRESETS["tiny-sd2"], prediction="v"), 7)
    report = convert_checkpoint(src, tmp_path / "sd2-diffusers", dtype="fp16")
    prefix = "cond_stage_model.model."
    assert sorted(report.dropped) == sorted(
        [prefix + "text_projection", prefix + "logit_scale"]
        + [k for k in _read(src) if k.startswith(prefix + "transformer.resblocks.1.")]
    )
    config, state = load_diffusers_folder(report.path)
    assert config.text.layers == 1 and config.text.default_clip_skip == 1  # the same computation (module doc)
    assert config.prediction == "v"  # through scheduler_config.json's prediction_type
    original = _read(src)
    assert all(torch.equal(v, original[k].half()) for k, v in state.items())
    assert len(state) == len(original) - len(report.dropped)


@torch.no_grad()
def test_written_folder_loads_in_diffusers_with_equal_outputs(abc, tmp_path):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL
    UNet2DConditionModel = pytest.importorskip("diffusers").UNet2DConditionModel
    CLIPTextModel = pytest.importorskip("transformers").CLIPTextModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    folder = convert_checkpoint(abc[0], tmp_path / "d").path
    ours = load_model(abc[0]).model
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([10.0, 700.0])
    want = ours.unet(x, t, context)
    assert (unet(x, t, encoder_hidden_states=context).sample - want).abs().max() <= 1e-5
    assert (vae.decode(x).sample - ours.vae.decode(x)).abs().max() <= 1e-5
    tokens = torch.tensor([[49406, 320, 1125, 539, 49407, 49407]])
    assert (text(tokens).last_hidden_state - ours.text_encoder(tokens, clip_skip=1)).abs().max() <= 1e-5
    pipeline = pytest.importorskip("diffusers").StableDiffusionPipeline.from_pretrained(
        folder, tokenizer=None
    )
    assert pipeline.scheduler.config.prediction_type == "epsilon" and pipeline.unet.config.in_channels == 4
    # the broken variant: q and k of one attention swapped in the folder
    broken = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    attn = broken.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.to_q.weight.data, attn.to_k.weight.data = (
        attn.to_k.weight.data.clone(),
        attn.to_q.weight.data.clone(),
    )
    assert (broken(x, t, encoder_hidden_states=context).sample - want).abs().max() > 1e-3


@torch.no_grad()
def test_sd2_folder_text_encoder_computes_clip_skip_2(tmp_path):
    CLIPTextModel = pytest.importorskip("transformers").CLIPTextModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    src = _write(tmp_path / "sd2.safetensors", PRESETS["tiny-sd2"], 8)
    folder = convert_checkpoint(src, tmp_path / "d").path
    ours = load_model(src).model.text_encoder
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tokens = torch.tensor([[49406, 320, 1125, 49407, 0, 0]])
    got = text(tokens).last_hidden_state
    assert (got - ours(tokens, clip_skip=2)).abs().max() <= 1e-5
    assert (got - ours(tokens, clip_skip=1)).abs().max() > 1e-3


def test_v_prediction_test_on_the_unet_alone(tmp_path):
    """An SD 2.x file without a stored config: its prediction is tested on its UNet as ``load_model`` does.
    The UNet's last layer is set to output a constant: -2x (v-like) or +x (epsilon-like) for x = 0.5."""
    config = PRESETS["tiny-sd2"]
    state = _read(_write(tmp_path / "sd2.safetensors", config, 9))
    for constant, is_v in ((-1.0, True), (0.5, False)):
        path = tmp_path / f"out{constant}.safetensors"
        weight, bias = UNET_PREFIX + "out.2.weight", UNET_PREFIX + "out.2.bias"
        save_file({**state, weight: torch.zeros_like(state[weight]), bias: torch.full((4,), constant)}, path)
        with open_source(path) as source:
            assert source.config is None and _predicts_v(source, config) is is_v
        unet = load_model(path, config=config).model.unet
        assert looks_like_v_prediction(unet, config.unet.context_dim) is is_v


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    """``build_parser()`` with the commands added (a no-op once cli.py calls ``add_checkpoint_commands``)."""
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checkpoint = top.choices["checkpoint"]
    sub = next(a for a in checkpoint._actions if isinstance(a, argparse._SubParsersAction))
    if "merge" not in sub.choices:
        add_checkpoint_commands(sub)
    return parser


def test_cli_merge_and_convert(abc, tmp_path, capsys):
    a, b, c = (str(p) for p in abc)
    out = tmp_path / "cli.safetensors"
    args = ["checkpoint", "merge", a, b, c, "--method", "add-difference", "--alpha", "0.5", "-o", str(out)]
    assert run(_parser().parse_args([*args, "--dtype", "fp16", "--no-ema"])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads(_metadata(out)[RECIPE_KEY])["no_ema"] is True
    assert run(_parser().parse_args(args)) == 2  # exists
    assert (
        capsys.readouterr().err.strip()
        == f"sdstudio: error: {out}: already exists; pass --overwrite to replace it"
    )
    assert (
        run(_parser().parse_args(["checkpoint", "merge", a, b, c, "--alpha", "1", "-o", str(tmp_path / "y")]))
        == 2
    )
    assert "add-difference" in capsys.readouterr().err
    conv = tmp_path / "conv.ckpt"
    assert run(_parser().parse_args(["checkpoint", "convert", a, "-o", str(conv), "--no-ema"])) == 0
    assert _identical(torch.load(conv, weights_only=True)["state_dict"], _read(abc[0]))
    with pytest.raises(SystemExit):
        _parser().parse_args(["checkpoint", "convert", a, "-o", str(conv), "--ema", "--no-ema"])
