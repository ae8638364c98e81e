"""Fine-tuning runs from a folder of captioned images: the data the methods share (batches, captions,
cached latents), run folders that resume or refuse, and a killed textual-inversion run that resumes to the
same vectors as an unbroken one; the command's files load where prompts use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel, save_model
from sdstudio.prompt.embeddings import load_embedding
from sdstudio.training.datasets import batches
from sdstudio.training.embedding import EmbeddingTrainConfig
from sdstudio.training.finetune import RunConfig, TrainingData, dataset_config_for, train_embedding
from tests.adapters.loras import loaded, tiny_model


def write_dataset(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow"]
    for i in range(n):
        image = Image.new("RGB", (64, 64), "white")
        x = 8 + 10 * i
        ImageDraw.Draw(image).ellipse((x, 16, x + 28, 44), outline=colours[i % 4], width=6)
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {colours[i % 4]} zqxring")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def model() -> LoadedModel:
    return loaded(tiny_model("tiny", seed=2))


def test_training_data_is_seeded_and_cached(data, model, tmp_path, caplog):
    config = dataset_config_for(model)
    assert (config.resolution, config.bucket_min, config.bucket_max, config.bucket_step) == (64, 64, 128, 64)
    source = TrainingData.open(data, config, model, tmp_path / "latents", batch_size=2, seed=3)
    assert "broken.png" in " ".join(source.dataset.warnings)
    assert source.batches_per_epoch == len(batches(source.dataset, 2, 3, 0)) == 2
    first = [source.batch(step, torch.Generator().manual_seed(step)) for step in range(4)]
    assert source.cache.misses == 4 and source.cache.hits == 4  # epoch 2 reads what epoch 1 encoded
    latents, captions = first[0]
    assert latents.shape == (2, 4, 32, 32) and all(c.endswith("zqxring") for c in captions)
    again = TrainingData.open(data, config, model, tmp_path / "latents", batch_size=2, seed=3)
    replay = [again.batch(step, torch.Generator().manual_seed(step)) for step in range(4)]
    assert again.cache.misses == 0
    for (a, ca), (b, cb) in zip(first, replay):
        assert torch.equal(a, b) and ca == cb


class Stop(Exception):
    pass


def test_embedding_run_resumes_after_a_kill_to_the_same_vectors(data, model, tmp_path):
    config = EmbeddingTrainConfig("zqxring", vectors=2, init_text="circle")
    run = RunConfig(steps=8, batch_size=2, lr=2e-2, save_every=3, bf16=False)
    paths = train_embedding(model, data, tmp_path / "whole", config, run)
    whole = load_embedding(paths[0], model.config.text.width)

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise Stop  # as kill -9 after step 5: the state on disk is the one of step 3

    with pytest.raises(Stop):
        train_embedding(model, data, tmp_path / "broken", config, run, progress=kill)
    assert not (tmp_path / "broken" / "zqxring.pt").exists()
    resumed = train_embedding(model, data, tmp_path / "broken", config, run)
    vectors = load_embedding(resumed[0], model.config.text.width).vectors
    assert torch.allclose(vectors, whole.vectors, atol=1e-6), float((vectors - whole.vectors).abs().max())
    assert not torch.equal(vectors, load_embedding(paths[1], model.config.text.width).vectors * 0)
    assert torch.equal(
        load_embedding(paths[1], model.config.text.width).vectors, whole.vectors
    )  # .safetensors

    other = RunConfig(steps=9, batch_size=2, lr=2e-2, save_every=3, bf16=False)
    with pytest.raises(SdStudioError, match="earlier run with other settings; pass --overwrite"):
        train_embedding(model, data, tmp_path / "whole", config, other)
    train_embedding(model, data, tmp_path / "whole", config, other, overwrite=True)


def test_train_embedding_command(data, tmp_path, capsys):
    from sdstudio.cli import main

    model = tiny_model("tiny", seed=2)
    ckpt = save_model(model, tmp_path / "tiny.safetensors", dtype=torch.float32)
    out = tmp_path / "run"
    argv = ["train", "embedding", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--name", "zqxring",
            "--steps", "4", "--lr", "0.02", "--batch", "2", "--save-every", "2", "--preview-prompt", "a zqxring",
            "--preview-steps", "2", "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "zqxring.pt"), str(out / "zqxring.safetensors")]
    # the copies at each save (A1111's NAME-STEP.pt) and previews that use the word as it is learnt so far
    assert sorted(p.name for p in (out / "saves").iterdir()) == ["zqxring-000002.pt", "zqxring-000004.pt"]
    assert "TI hashes: \"zqxring: " in Image.open(out / "previews" / "zqxring-000002.png").info["parameters"]
    (tmp_path / "emb").mkdir()
    (out / "zqxring.pt").rename(tmp_path / "emb" / "zqxring.pt")
    image = tmp_path / "with.png"
    code = main(["generate", "a zqxring", "--model", str(ckpt), "--embeddings", str(tmp_path / "emb"), "--steps", "2",
                 "--seed", "1", "-o", str(image), "-q"])  # fmt: skip
    assert code == 0 and np.asarray(Image.open(image)).shape == (64, 64, 3)
    assert "TI hashes" in Image.open(image).info["parameters"]
    assert (
        main(["train", "embedding", "--data", str(tmp_path / "none"), "--out", str(out), "--name", "x"]) == 2
    )
    assert "no such folder (--data)" in capsys.readouterr().err
