"""The ``sdstudio train lora|hypernetwork|dreambooth|finetune`` commands: each writes the file its method's
users load (checked by loading it where a prompt or ``--model`` uses it), takes its method's options, picks
the learning rate and steps for the model it is given, refuses bad options before any work, and a run killed
with SIGKILL mid-way resumes to the weights of an unbroken run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdstudio.cli import TRAINING_DEFAULTS, main
from sdstudio.models.loading import save_model
from sdstudio.training.trainer import STATE_FILE
from tests.adapters.loras import tiny_model
from tests.training.test_finetune import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_model(tiny_model("tiny", seed=2), tmp_path_factory.mktemp("model") / "tiny.safetensors",
                      dtype=torch.float32)  # fmt: skip


def generate(ckpt: Path, prompt: str, out: Path, *extra: str) -> np.ndarray:
    code = main(["generate", prompt, "--model", str(ckpt), "--steps", "2", "--seed", "1", "-o", str(out), "-q",
                 "--sampler", "Euler", *extra])  # fmt: skip
    assert code == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_train_lora_command_writes_a_kohya_file_that_prompts_load(data, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "lora", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--name", "zqx",
            "--steps", "6", "--lr", "0.05", "--batch", "2", "--rank", "4", "--alpha", "2", "--conv-rank", "2",
            "--train-text-encoder", "--text-lr", "0.01", "--noise-offset", "0.05", "--lr-schedule", "cosine",
            "--precision", "fp32", "--save-every", "3", "--preview-prompt", "a red zqxring", "--preview-steps", "2",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "zqx.safetensors")]
    # at each save: the LoRA so far (kohya's NAME-STEP files) and a preview made with it
    assert sorted(p.name for p in (out / "saves").iterdir()) == [
        "zqx-000003.safetensors",
        "zqx-000006.safetensors",
    ]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["zqx-000003.png", "zqx-000006.png"]
    assert (
        load_file(out / "saves" / "zqx-000006.safetensors").keys()
        == load_file(out / "zqx.safetensors").keys()
    )
    assert "<lora:zqx-000006:1>" in Image.open(out / "previews" / "zqx-000006.png").info["parameters"]
    with safe_open(out / "zqx.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert (
        meta["ss_output_name"] == "zqx"
        and meta["ss_network_dim"] == "4"
        and meta["ss_network_alpha"] == "2.0"
    )
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_unet_lr"] == "0.05" and meta["ss_text_encoder_lr"] == "0.01"
    assert (
        meta["ss_steps"] == "6"
        and meta["ss_batch_size_per_device"] == "2"
        and meta["ss_num_train_images"] == "4"
    )
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_noise_offset"] == "0.05"
    assert json.loads(meta["ss_tag_frequency"]) == {".": {"a red zqxring": 1, "a blue zqxring": 1,
                                                          "a green zqxring": 1, "a yellow zqxring": 1}}  # fmt: skip
    assert any(k.startswith("lora_te_") for k in keys) and any("_resnets_" in k for k in keys)
    settings = json.loads((out / "run.json").read_text())
    assert settings["lora"]["rank"] == 4 and settings["options"]["noise_offset"] == 0.05

    # the file is a LoRA prompts load by its name; it changes the image, and the infotext records it
    plain = generate(ckpt, "a red zqxring", tmp_path / "plain.png")
    with_lora = generate(ckpt, "a red zqxring <lora:zqx:1>", tmp_path / "lora.png", "--lora-dir", str(out))
    assert np.abs(with_lora - plain).mean() > 0.5
    assert "Lora hashes: " in Image.open(tmp_path / "lora.png").info["parameters"]
    assert "warning" not in capsys.readouterr().err.lower()


def test_defaults_follow_the_model_and_bad_options_fail_before_any_work(data, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "lora", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
                 "-q"]) == 0  # fmt: skip
    settings = json.loads((out / "run.json").read_text())
    assert settings["run"]["lr"] == TRAINING_DEFAULTS["lora"]["model"][0] == settings["lora"]["unet_lr"]
    assert settings["lora"]["text_lr"] == settings["run"]["lr"] / 2
    capsys.readouterr()
    # an existing run of other settings is refused, and stays as it was
    before = (out / "lora.safetensors").read_bytes()
    assert main(["train", "lora", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "2",
                 "-q"]) == 2  # fmt: skip
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "lora.safetensors").read_bytes() == before
    bad = [
        (["lora", "--rank", "0"], "LoRA rank 0"),
        (["lora", "--noise-offset", "-1"], "noise offset -1"),
        (["lora", "--grad-accumulation", "0"], "gradient accumulation 0"),
        (["hypernetwork", "--name", "h", "--layer-structure", "1,x,1"], "--layer-structure '1,x,1'"),
        (["hypernetwork", "--name", "h", "--layer-structure", "2,1"], "layer structure [2.0, 1.0]"),
        (["hypernetwork", "--name", "h", "--activation", "nope"], "activation 'nope'"),
        (["dreambooth", "--class-prompt", " "], "needs a class prompt"),
        (["lora", "--class-data", str(tmp_path / "no-reg")], "no such folder of class images"),
        (["lora", "--class-data", str(data), "--num-class-images", "50"], "asked for; give --class-prompt"),
        (["lora", "--embeddings", str(tmp_path / "no-emb")], "no-emb: no such folder of embeddings"),
        (["lora", "--pivotal", "a<b"], "embedding name 'a<b'"),
        (["lora", "--pivotal", "sksdog"], "holds the embedding's name 'sksdog'"),
        (["finetune", "--pivotal", "sksdog"], "holds the embedding's name 'sksdog'"),
        (["dreambooth", "--pivotal-lr", "0"], "pivotal learning rate 0"),
        (["dreambooth", "--instance-prompt", "a photo of a dog", "--pivotal", "sks"],
         "does not hold the pivotal word 'sks'"),
        (["lora", "--prior-target", "base"], "give them with --class-prompt or --class-data"),
        (["dreambooth", "--class-data", str(data), "--num-class-images", "2", "--prior-target", "base",
          "--prediction-target", "v"], "cannot use it"),
        (["finetune", "--ema-decay", "1.5"], "EMA decay 1.5"),
        (["finetune", "--modules", "attn["], "--modules 'attn[': not a regular expression"),
        (["dreambooth", "--modules", "no_such_block"], "no UNet weight of"),
        (["finetune", "--name", "a/b"], "output name 'a/b'"),
    ]
    for args, message in bad:
        fresh = tmp_path / "never"
        code = main(["train", args[0], "--model", str(ckpt), "--data", str(data), "--out", str(fresh), "-q",
                     *args[1:]])  # fmt: skip
        assert code == 2, args
        assert message in capsys.readouterr().err, args
        assert not fresh.exists(), args


def test_train_hypernetwork_command(data, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "hypernetwork", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--name", "zqxh",
            "--steps", "4", "--lr", "0.01", "--layer-structure", "1,1.5,1", "--activation", "relu",
            "--weight-init", "KaimingNormal", "--layer-norm", "--dropout-structure", "0,0.2,0",
            "--template", "style_filewords", "--precision", "fp32", "--save-every", "2", "--preview-prompt",
            "a red zqxring", "--preview-steps", "2", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "zqxh.pt")]
    assert sorted(p.name for p in (out / "saves").iterdir()) == ["zqxh-000002.pt", "zqxh-000004.pt"]
    assert "<hypernet:zqxh-000004:1>" in Image.open(out / "previews" / "zqxh-000004.png").info["parameters"]
    saved = torch.load(out / "zqxh.pt", weights_only=True)
    assert saved["layer_structure"] == [1, 1.5, 1] and saved["activation_func"] == "relu"
    assert saved["is_layer_norm"] is True and saved["dropout_structure"] == [0, 0.2, 0]
    assert saved["step"] == 4 and saved["weight_initialization"] == "KaimingNormal"
    plain = generate(ckpt, "a red zqxring", tmp_path / "plain.png")
    styled = generate(
        ckpt, "a red zqxring <hypernet:zqxh:1>", tmp_path / "h.png", "--hypernetwork-dir", str(out)
    )
    assert np.abs(styled - plain).mean() > 0.5
    assert "Hypernet: zqxh" in Image.open(tmp_path / "h.png").info["parameters"]


def test_train_dreambooth_and_finetune_commands_write_checkpoints(data, ckpt, tmp_path, capsys):
    out = tmp_path / "db"
    argv = ["train", "dreambooth", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--name", "sks",
            "--steps", "3", "--lr", "1e-3", "--instance-prompt", "a photo of sks ring", "--class-prompt",
            "a photo of a ring", "--num-class-images", "2", "--class-steps", "2", "--prior-loss-weight", "0.5",
            "--save-dtype", "fp32", "--precision", "fp32", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "sks.safetensors")]
    assert len(list((out / "class_images").glob("*.png"))) == 2
    settings = json.loads((out / "run.json").read_text())
    assert settings["dreambooth"]["prior"]["prior_loss_weight"] == 0.5
    assert settings["dreambooth"]["instance_prompt"] == "a photo of sks ring"
    trained, base = load_file(out / "sks.safetensors"), load_file(ckpt)
    moved = [
        k for k in base if k.startswith("model.diffusion_model.") and not torch.equal(base[k], trained[k])
    ]
    assert moved and all(torch.equal(base[k], trained[k]) for k in base if k.startswith("first_stage_model."))
    assert generate(out / "sks.safetensors", "a photo of sks ring", tmp_path / "db.png").shape == (64, 64, 3)

    out = tmp_path / "ft"
    argv = ["train", "finetune", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "3",
            "--lr", "1e-3", "--train-text-encoder", "--ema-decay", "0.9", "--ema-warmup", "none",
            "--prediction-target", "v", "--grad-accumulation", "2", "--gradient-checkpointing", "--save-dtype",
            "fp32", "--precision", "fp32", "--save-every", "2", "--preview-prompt", "a red zqxring",
            "--preview-steps", "2", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "finetune-000002.png",
        "finetune-000003.png",
    ]
    assert not (out / "saves").exists()  # a whole model per save would be too big: the state holds it
    trained = load_file(out / "finetune.safetensors")
    ema = {k for k in trained if k.startswith("model_ema.")}
    assert "model_ema.decay" in ema and float(trained["model_ema.decay"]) == pytest.approx(0.9)
    assert any(not torch.equal(base[k], trained[k]) for k in base if k.startswith("cond_stage_model."))
    assert generate(out / "finetune.safetensors", "a red zqxring", tmp_path / "ft.png").shape == (64, 64, 3)


def _command(ckpt: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdstudio.cli", "train", "lora", "--model", str(ckpt), "--data", str(data),
            "--out", str(out), "--steps", "40", "--save-every", "4", "--lr", "0.02", "--rank", "4",
            "--train-text-encoder", "--precision", "fp32", "-q"]  # fmt: skip


@pytest.mark.slow  # two real training processes, one killed: 23 s
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_unbroken_run(data, ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_command(ckpt, data, whole), env=env, check=True, timeout=300)
    broken = tmp_path / "broken"
    process = subprocess.Popen(_command(ckpt, data, broken), env=env)
    state = broken / "state" / STATE_FILE
    try:
        deadline = time.monotonic() + 240
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # a step or so past the first save
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = torch.load(state, weights_only=True)
    assert 0 < saved["step"] < 40, "the kill came after the run had ended: nothing was resumed"
    assert not (broken / "lora.safetensors").exists()
    subprocess.run(_command(ckpt, data, broken), env=env, check=True, timeout=300)
    a, b = load_file(whole / "lora.safetensors"), load_file(broken / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=2e-3)
    # the comparison can fail: the factors moved after the state the resumed run started from
    moved = max((saved["module"][k].half().float() - a[k].float()).abs().max().item() for k in a)
    assert moved > 1e-2


def test_previews_leave_the_model_as_it_was_and_show_the_saved_lora(data, tmp_path):
    """A LoRA preview merges the saved file for one image and takes it out again: after the run the model's
    weights are bit for bit the base's; the step-6 preview is the image the final file gives."""
    from sdstudio.adapters.library import NetworkLibrary
    from sdstudio.engine import Pipeline
    from sdstudio.training.finetune import RunConfig
    from sdstudio.training.lora import LoraRunOptions, LoraTrainConfig, train_lora
    from sdstudio.training.preview import PreviewSettings
    from sdstudio.types import GenerationRequest
    from tests.adapters.loras import loaded

    model = loaded(tiny_model("tiny", seed=2))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    preview = PreviewSettings("a blue zqxring", steps=3, seed=5)
    (path,) = train_lora(model, data, tmp_path / "run", LoraTrainConfig(rank=4, unet_lr=0.05),
                         RunConfig(steps=6, batch_size=2, lr=0.05, save_every=3, bf16=False),
                         LoraRunOptions(name="p", save_dtype="fp32"), preview=preview)  # fmt: skip
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pipeline = Pipeline(model, loras=NetworkLibrary([path.parent]))
    request = GenerationRequest(prompt="a blue zqxring <lora:p:1>", steps=3, seed=5)
    expected = np.asarray(pipeline(request).images[0].image, dtype=np.int16)
    pipeline.networks.restore()
    shown = np.asarray(Image.open(tmp_path / "run" / "previews" / "p-000006.png"), dtype=np.int16)
    early = np.asarray(Image.open(tmp_path / "run" / "previews" / "p-000003.png"), dtype=np.int16)
    assert np.abs(shown - expected).max() <= 1
    assert np.abs(early - expected).mean() > 0.5  # the previews follow the training


def test_an_embedding_no_prompt_names_is_refused_and_dropped_captions_train_nothing(data, ckpt, tmp_path, capsys):
    """Captions without the embedding's name and no [name] template: refused before training, naming the
    fix (it crashed in backward before). With every caption dropped (no prompt names it in any batch) the run
    ends with its file (a zero gradient; it crashed in backward before too)."""
    base = ["train", "embedding", "--model", str(ckpt), "--data", str(data), "--name", "zqxword", "-q"]
    assert main([*base, "--out", str(tmp_path / "a"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "'zqxword', so it would never be trained" in err and "--template subject_filewords" in err
    assert not (tmp_path / "a" / "zqxword.pt").exists()
    out = tmp_path / "b"
    assert main([*base, "--out", str(out), "--steps", "2", "--template", "subject_filewords",
                 "--caption-dropout", "1.0", "--init-text", "red"]) == 0  # fmt: skip
    capsys.readouterr()
    vectors = torch.load(out / "zqxword.pt", weights_only=True)["string_to_param"]["*"]
    assert vectors.shape[0] == 1 and torch.isfinite(vectors).all()
