"""ControlNet training: a ControlNet made from the UNet's encoder adds nothing until trained; training moves
only the ControlNet (the base model bit for bit as it was); the written file is the original single-file
layout that ``load_controlnet`` reads back to the trained module's residuals; a killed run resumes to the
weights of an unbroken one; folders without control images, images without theirs and control images of
another size are refused by name before any work. The toy world's control data: masks, edges, the kohya
folder and the held-out scenes."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdstudio.diffusion.samplers import sample_euler
from sdstudio.diffusion.schedulers import uniform
from sdstudio.errors import SdStudioError
from sdstudio.models.controlnet import load_controlnet
from sdstudio.models.loading import LoadedModel, save_model
from sdstudio.toyworld import control_data as cd
from sdstudio.toyworld.world import CELL, HELDOUT_PAIRS, POSITIONS, SIZE_PIXELS, Scene, parse_caption, render
from sdstudio.training.controlnet import (
    ControlNetRunOptions,
    controlnet_for,
    controlnet_loss,
    hint_widths,
    save_controlnet,
    train_controlnet,
)
from sdstudio.training.finetune import RunConfig, training_denoiser
from tests.adapters.loras import loaded, tiny_model

RUN = RunConfig(steps=4, batch_size=2, lr=1e-3, save_every=2, bf16=False)
FP32 = ControlNetRunOptions(save_dtype="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return cd.write_control_dataset("mask", 6, tmp_path_factory.mktemp("control") / "data", seed=1)


def fresh() -> LoadedModel:
    return loaded(tiny_model("tiny", seed=4))


def inputs(model: LoadedModel, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    size = 64 // model.config.vae.downsample
    x = torch.randn(batch, 4, size, size, generator=gen)
    t = torch.tensor([900.0, 40.0][:batch])
    context = torch.randn(batch, 77, model.config.unet.context_dim, generator=gen)
    hint = (torch.rand(batch, 3, 64, 64, generator=gen) > 0.7).float()
    return x, t, context, hint


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the network at step 0 -----------------------------------------------------------------------------


@pytest.mark.parametrize("hint_init", ["zero", "random"])
def test_a_new_controlnet_copies_the_encoder_and_leaves_the_image_unchanged(hint_init):
    model = fresh()
    unet = model.model.unet
    rng = torch.get_rng_state()
    controlnet = controlnet_for(unet, model.config.vae.downsample, hint_init=hint_init, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the seed decides, not (and nothing of) the global RNG
    last = controlnet.input_hint_block[-1].weight
    assert (last.abs().max() > 0) == (hint_init == "random")  # the zero convs alone keep the output at zero
    again = controlnet_for(unet, model.config.vae.downsample, hint_init=hint_init, seed=7).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in controlnet.state_dict().items())
    other = controlnet_for(unet, model.config.vae.downsample, hint_init=hint_init, seed=8)
    assert not torch.equal(other.input_hint_block[0].weight, controlnet.input_hint_block[0].weight)
    assert controlnet.config.hint_block_channels == (16, 32) and controlnet.config.hint_downsample == 2
    ours, theirs = controlnet.state_dict(), unet.state_dict()
    copied = [k for k in ours if k.startswith(("time_embed.", "input_blocks.", "middle_block."))]
    assert len(copied) > 20 and all(torch.equal(ours[k], theirs[k]) for k in copied)
    x, t, context, hint = inputs(model)
    with torch.no_grad():
        residuals = controlnet(x, hint, t, context)
    assert len(residuals) == len(controlnet.zero_convs) + 1 and all(not r.any() for r in residuals)

    # a whole (short) sampling pass with the control gives the image without it, bit for bit
    denoiser = training_denoiser(model)
    sigmas = uniform(denoiser.schedule, 4)
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * sigmas[0]

    def with_control(x_: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return denoiser(x_, s, context, control=lambda a, b, c, y: controlnet(a, hint, b, c, y))

    with torch.no_grad():
        plain = sample_euler(lambda x_, s: denoiser(x_, s, context), noise, sigmas)
        controlled = sample_euler(with_control, noise, sigmas)
        image = model.model.vae.decode(controlled / model.config.vae.scale_factor)
    assert torch.equal(plain, controlled)
    assert image.shape == (2, 3, 64, 64)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = controlnet_loss(denoiser, controlnet, x, context, hint, gen_a)
    assert torch.equal(loss, denoiser.training_loss(x, context, gen_b).mean())


def test_hint_encoder_levels_follow_the_vae():
    assert hint_widths(8) == (16, 32, 96, 256) and hint_widths(4) == (16, 32, 96) and hint_widths(1) == (16,)
    for bad in (3, 16, 0):
        with pytest.raises(SdStudioError, match="power of two up to 8"):
            hint_widths(bad)


# --- training and the file ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[LoadedModel, dict, Path, dict]:
    model = fresh()
    before = snapshot(model.model)
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    out = tmp_path_factory.mktemp("run")
    (path,) = train_controlnet(model, data, out / "run", RUN, FP32)
    return model, before, path, flags


def test_training_changes_only_the_controlnet_and_lowers_nothing_of_the_model(trained):
    model, before, path, flags = trained
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == flags
    state = load_file(path)
    zero = [k for k in state if k.startswith("control_model.zero_convs.")]
    assert zero and any(state[k].abs().max() > 0 for k in zero)  # the zero convolutions moved
    log = [json.loads(line) for line in (path.parent / "state" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (path.parent / "saves").iterdir()) == [
        "controlnet-000002.safetensors", "controlnet-000004.safetensors"
    ]  # fmt: skip


def test_file_loads_back_to_the_trained_residuals(trained, tmp_path):
    model, _, path, _ = trained
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["sdstudio.training"])
    assert all(k.startswith("control_model.") for k in keys)
    assert meta["method"] == "controlnet" and meta["steps"] == 4 and meta["images"] == 6
    net, config = load_controlnet(path, base=model.config.unet)
    assert config.hint_block_channels == (16, 32) and config.hint_channels == 3
    x, t, context, hint = inputs(model, seed=5)
    with torch.no_grad():
        reference = net(x, hint, t, context)
    assert any(r.abs().max() > 1e-4 for r in reference)  # trained: it adds something now

    # the trained module (the state the loop saved) against the file: fp32 exactly, fp16 within its rounding
    module = controlnet_for(model.model.unet, 2)
    module.load_state_dict(torch.load(path.parent / "state" / "train_state.pt", weights_only=True)["module"])
    with torch.no_grad():
        trained_residuals = module(x, hint, t, context)
    for a, b in zip(reference, trained_residuals):
        assert torch.equal(a, b)
    half = save_controlnet(module, tmp_path / "half.safetensors")
    assert load_file(half)["control_model.zero_convs.0.0.weight"].dtype == torch.float16
    net16, _ = load_controlnet(half, base=model.config.unet)
    with torch.no_grad():
        for a, b in zip(net16(x, hint, t, context), trained_residuals):
            assert torch.allclose(a, b, atol=2e-3 * (1 + float(b.abs().max()))), float((a - b).abs().max())
    with pytest.raises(SdStudioError, match="already exists"):
        save_controlnet(module, half)


class Stop(Exception):
    pass


def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_one(data, trained, tmp_path):
    _, _, whole, _ = trained

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise Stop  # as kill -9 after step 3: the state on disk is the one of step 2

    with pytest.raises(Stop):
        train_controlnet(fresh(), data, tmp_path / "broken", RUN, FP32, progress=kill)
    assert not (tmp_path / "broken" / "controlnet.safetensors").exists()
    (resumed,) = train_controlnet(fresh(), data, tmp_path / "broken", RUN, FP32)
    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst

    other = RunConfig(steps=5, batch_size=2, lr=1e-3, save_every=2, bf16=False)
    with pytest.raises(SdStudioError, match="earlier run with other settings; pass --overwrite"):
        train_controlnet(fresh(), data, tmp_path / "broken", other, FP32)


# --- bad input, refused before any work ---------------------------------------------------------------


def copy_dataset(source: Path, target: Path) -> Path:
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def refused(data: Path, out: Path, match: str, **kwargs: object) -> None:
    with pytest.raises(SdStudioError, match=match):
        train_controlnet(fresh(), data, out, RUN, FP32, **kwargs)  # type: ignore[arg-type]
    assert not out.exists(), "the run folder was made before the data was checked"


def test_folders_without_control_images_are_refused(data, tmp_path):
    plain = tmp_path / "plain"  # a LoRA folder: images and captions, nothing else
    copy_dataset(data / "images", plain)
    refused(plain, tmp_path / "out", r"plain: no control images: expected images/NAME.png \+ NAME.txt and "
            r"conditioning/NAME.png")  # fmt: skip
    only_images = copy_dataset(data / "images", tmp_path / "half" / "images").parent
    refused(only_images, tmp_path / "out", "half: has no conditioning/ folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(plain, tmp_path / "out", "empty: no control images", conditioning=empty)
    refused(plain, tmp_path / "out", "nowhere: no such folder of control images", conditioning=tmp_path / "nowhere")


def test_missing_unreadable_and_other_size_control_images_are_named(data, tmp_path):
    broken = copy_dataset(data, tmp_path / "broken")
    (broken / "conditioning" / "0002.png").unlink()
    refused(broken, tmp_path / "out", r"1 images have no control image of the same name .*\(0002.png\)")
    copy_dataset(data, broken)
    Image.new("RGB", (32, 32)).save(broken / "conditioning" / "0003.png")
    refused(broken, tmp_path / "out", re.escape("(conditioning/0003.png is 32x32, its image 0003.png 64x64): make "
                                                "each control image at its image's size"))
    copy_dataset(data, broken)
    (broken / "conditioning" / "0004.png").write_bytes(b"not a png")
    refused(broken, tmp_path / "out", "1 control images are unusable .*conditioning/0004.png cannot be read as an image")


def test_control_images_in_another_folder_and_format(data, tmp_path):
    """kohya's conditioning_data_dir beside any image folder; a control image's extension may differ."""
    images = copy_dataset(data / "images", tmp_path / "imgs")
    control = tmp_path / "hints"
    control.mkdir()
    for path in (data / "conditioning").iterdir():
        Image.open(path).save(control / f"{path.stem}.webp", lossless=True)
    (path,) = train_controlnet(fresh(), images, tmp_path / "run", RunConfig(steps=1, batch_size=2, bf16=False),
                               conditioning=control)  # fmt: skip
    assert path.is_file() and load_file(path)["control_model.zero_convs.0.0.weight"].dtype == torch.float16


# --- the command -------------------------------------------------------------------------------------------


def test_command_trains_and_refuses_before_loading(data, tmp_path, capsys):
    from sdstudio.cli_control import add_train_controlnet_parser

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    train_sub = sub.add_parser("train").add_subparsers(dest="train_command")
    add_train_controlnet_parser(train_sub)
    ckpt = save_model(tiny_model("tiny", seed=4), tmp_path / "tiny.safetensors", dtype=torch.float32)
    out = tmp_path / "run"
    argv = ["train", "controlnet", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch", "2", "--lr", "1e-3", "--precision", "fp32", "-q"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "controlnet.safetensors")
    net, _ = load_controlnet(out / "controlnet.safetensors")
    assert net.config.hint_downsample == 2
    run = json.loads((out / "run.json").read_text())
    assert run["run"]["batch_size"] == 2 and run["run"]["lr"] == 1e-3 and run["options"]["save_dtype"] == "fp16"
    bad = parser.parse_args(["train", "controlnet", "--model", str(tmp_path / "missing.safetensors"), "--data",
                             str(data / "images"), "--out", str(tmp_path / "o2")])  # fmt: skip
    with pytest.raises(SdStudioError, match="images: no control images"):
        bad.func(bad)  # the data is checked before the (missing) model is looked at


# --- the toy world's control data ------------------------------------------------------------------------


def test_control_images_are_the_silhouettes_and_their_outlines():
    (sample,) = cd.control_samples(1, "mask", seed=2)
    obj = sample.scene.objects[0]
    mask = sample.control[..., 0]
    assert (sample.control == mask[..., None]).all() and mask.dtype == np.uint8
    cx, cy = obj.centre
    assert mask[int(cy), int(cx)] == 255 and mask[0, 0] == 0 and mask[63, 63] == 0
    assert np.array_equal(sample.image, render(sample.scene))
    edges = cd.control_image(sample.scene, "edges")[..., 0]
    assert set(np.unique(edges)) == {0, 255} and edges[int(cy), int(cx)] == 0  # the inside is not an edge
    solid = mask >= 128
    assert ((edges == 255) <= solid).all() and 0 < (edges == 255).sum() < solid.sum()
    with pytest.raises(SdStudioError, match="control kind 'depth'"):
        cd.control_image(sample.scene, "depth")  # type: ignore[arg-type]


def test_training_samples_never_show_what_the_heldout_scenes_do():
    samples = cd.control_samples(200, "mask", seed=0, two_objects=0.3)
    objects = [o for s in samples for o in s.scene.objects]
    assert {o.colour for o in objects} == set(cd.TRAIN_COLOURS)
    assert all((o.colour, o.shape) not in HELDOUT_PAIRS for o in objects)
    assert 40 < sum(len(s.scene.objects) == 2 for s in samples) < 80
    captions = [parse_caption(s.caption) for s in samples]
    assert all(d is not None and all(o.size is None for o in d.objects) for d in captions)  # no sizes
    singles = [d for d, s in zip(captions, samples) if len(s.scene.objects) == 1]
    assert singles and all(d is not None and d.objects[0].position is None for d in singles)  # nor places
    offsets = [(o.centre[0] - (c + 0.5) * CELL, o.centre[1] - (r + 0.5) * CELL)
               for s in samples if len(s.scene.objects) == 1
               for o in s.scene.objects for r, c in [divmod(POSITIONS.index(o.position), 3)]]  # fmt: skip
    assert max(max(abs(dx), abs(dy)) for dx, dy in offsets) <= cd.JITTER < cd.OFF_GRID
    assert max(abs(dx) for dx, _ in offsets) > 5  # wider than the world's jitter
    lone = [s.scene.objects[0] for s in samples if len(s.scene.objects) == 1]
    assert all(cd.bbox(cd.silhouette(Scene((o,), "gray")) >= 0.5)[0] > 0 for o in lone)  # inside the canvas
    centres = (np.arange(3) + 0.5) * CELL
    heldout = cd.heldout_scenes(100, seed=0)
    for scene in heldout:
        (obj,) = scene.objects
        x, y = obj.centre
        assert min(abs(centres - x)) >= cd.OFF_GRID or min(abs(centres - y)) >= cd.OFF_GRID
        assert cd.HELDOUT_EXTENTS[0] <= obj.extent <= cd.HELDOUT_EXTENTS[1]
        assert obj.colour in cd.HELDOUT_COLOURS
        box = cd.bbox(cd.silhouette(scene) >= 0.5)
        assert box is not None and box[0] > 0 and box[1] > 0 and box[2] < 64 and box[3] < 64
    assert len({o.extent for s in heldout for o in s.objects}) == 100
    assert SIZE_PIXELS["small"] * 1.05 < cd.HELDOUT_EXTENTS[0] and cd.HELDOUT_EXTENTS[1] < SIZE_PIXELS["large"] * 0.95
    assert [s.objects for s in cd.heldout_scenes(3, seed=0)] == [s.objects for s in heldout[:3]]


def test_dataset_folder_is_kohyas_subset_with_diffusers_columns(data, tmp_path):
    images = sorted(p.name for p in (data / "images").iterdir())
    assert images == [f"{i:04d}.{ext}" for i in range(6) for ext in ("png", "txt")]
    assert sorted(p.name for p in (data / "conditioning").iterdir()) == [f"{i:04d}.png" for i in range(6)]
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    samples = cd.control_samples(6, "mask", seed=1)
    for i, (row, sample) in enumerate(zip(rows, samples)):
        assert row == {"image": f"images/{i:04d}.png", "conditioning_image": f"conditioning/{i:04d}.png",
                       "text": sample.caption}  # fmt: skip
        assert (data / "images" / f"{i:04d}.txt").read_text() == sample.caption + "\n"
        assert np.array_equal(np.asarray(Image.open(data / row["conditioning_image"])), sample.control)
        assert np.array_equal(np.asarray(Image.open(data / row["image"])), sample.image)
    with pytest.raises(SdStudioError, match="not empty"):
        cd.write_control_dataset("edges", 2, data)
    again = copy_dataset(data, tmp_path / "again")
    (again / "notes.md").write_text("mine")
    cd.write_control_dataset("edges", 2, again, overwrite=True)
    assert sorted(p.name for p in (again / "conditioning").iterdir()) == ["0000.png", "0001.png"]
    assert (again / "notes.md").read_text() == "mine"


def test_placement_reads_where_the_object_is_drawn():
    """The benchmark's criterion on renders: a held-out scene's own render is placed and as asked; the object
    moved by half a cell, drawn at the world's large size instead, recoloured, or absent is not (or not as
    asked)."""
    scenes = cd.heldout_scenes(40, seed=3)
    assert all(cd.placement(render(s), s) == cd.Placement(True, True, cd.placement(render(s), s).iou, 1)
               for s in scenes)  # fmt: skip
    assert min(cd.placement(render(s), s).iou for s in scenes) > 0.75
    moved = [
        Scene((replace(s.objects[0], dx=s.objects[0].dx + (11 if s.objects[0].centre[0] < 32 else -11)),),
              s.background)
        for s in scenes
    ]  # fmt: skip
    assert not any(cd.placement(render(m), s).placed for m, s in zip(moved, scenes))
    large = [Scene((replace(s.objects[0], size="large", scale=1.45),), s.background) for s in scenes]
    assert sum(cd.placement(render(b), s).placed for b, s in zip(large, scenes)) < 10  # 25 px, not 12-15
    other = [Scene((replace(s.objects[0], colour="red"),), s.background) for s in scenes]
    assert all(cd.placement(render(o), s).placed and not cd.placement(render(o), s).as_asked
               for o, s in zip(other, scenes))  # fmt: skip
    empty = cd.placement(render(Scene((), scenes[0].background)), scenes[0])
    assert empty == cd.Placement(False, False, 0.0, 0)
