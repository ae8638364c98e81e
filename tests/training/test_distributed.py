"""Data-parallel training under torchrun: two CPU processes (gloo) at batch 2 each train the weights one
process trains at batch 4 (textual inversion, and DreamBooth with prior preservation, offset noise and an
EMA), with a short last batch split unevenly in every epoch; rank 0 alone writes the files (the other rank's
node-local folder gets none) and every rank returns the same paths; a node-local run folder cannot be
resumed, and ranks with other settings are refused, on every rank alike. In one process: a rank's draws are
its rows of one process's draws, and the rows' weights make the ranks' mean loss the global batch's."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel
from sdstudio.prompt.embeddings import load_embedding
from sdstudio.training.distributed import ALONE, Rows, Shard, current_shard, is_main, shard_from_env
from sdstudio.training.dreambooth import DreamBoothConfig, PriorPreservation, train_dreambooth
from sdstudio.training.embedding import EmbeddingTrainConfig
from sdstudio.training.finetune import (
    RunConfig,
    TrainingData,
    dataset_config_for,
    train_embedding,
    training_denoiser,
)
from sdstudio.training.trainer import LOG_FILE, STATE_FILE, read_log
from tests.adapters.loras import loaded, tiny_model
from tests.training.test_finetune import write_dataset

ROOT = Path(__file__).resolve().parents[2]
NAME = "zqxring"
EMBEDDING = EmbeddingTrainConfig(NAME, vectors=2, init_text="circle")
IMAGES = 7
STEPS = 4  # two epochs of 7 images at a global batch of 4: batches of 4 and 3, the short one split 2 + 1


def run_config(batch: int, steps: int = STEPS) -> RunConfig:
    return RunConfig(steps=steps, batch_size=batch, lr=2e-2, save_every=100, bf16=False)


# DreamBooth with prior preservation, offset noise and an EMA: two data sources' rows in every loss
DREAMBOOTH = DreamBoothConfig(
    prior=PriorPreservation("a photo of a ring", num_class_images=3, prior_loss_weight=0.5),
    noise_offset=0.1, ema_decay=0.9, save_dtype="fp32",
)  # fmt: skip


def dreambooth_run(batch: int) -> RunConfig:
    return RunConfig(steps=2, batch_size=batch, lr=1e-4, bf16=False, save_every=100)


def class_images(
    model: LoadedModel, prior: PriorPreservation, first: int, count: int
) -> list[tuple[Image.Image, int]]:
    """Stand-in class images (no sampling): a colour per seed."""
    return [(Image.new("RGB", (64, 64), (60 * ((first + i) % 4), 90, 200)), first + i) for i in range(count)]


# What each of the two ranks runs; it writes what it saw to report<rank>.json.
SCRIPT = """
import json, os, sys
from pathlib import Path

from sdstudio.errors import SdStudioError
from sdstudio.training.distributed import is_main, leave, shard_from_env
from sdstudio.training.dreambooth import train_dreambooth
from sdstudio.training.finetune import train_embedding
from tests.adapters.loras import loaded, tiny_model
from tests.training.test_distributed import DREAMBOOTH, EMBEDDING, class_images, dreambooth_run, run_config

data, tmp = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
shard = shard_from_env("cpu")
report = {"shard": [shard.rank, shard.world], "main": is_main()}


def refused(call):
    try:
        call()
    except SdStudioError as e:
        return str(e)
    return None


model = loaded(tiny_model("tiny", seed=2))
run = run_config(2)
report["shared"] = [str(p) for p in train_embedding(model, data, tmp / "shared", EMBEDDING, run)]
fresh = loaded(tiny_model("tiny", seed=2))  # DreamBooth trains its model in place
paths = train_dreambooth(fresh, data, tmp / "dreambooth", DREAMBOOTH, dreambooth_run(2),
                         make_class_images=class_images)
report["dreambooth"] = [str(p) for p in paths]
os.chdir(tmp / f"node{rank}")  # as if each rank's node had its own disk: a relative run folder
report["local"] = [str(p) for p in train_embedding(model, data, "run", EMBEDDING, run)]
report["resume"] = refused(lambda: train_embedding(model, data, "run", EMBEDDING, run))
other = run_config(2 + rank)
report["settings"] = refused(lambda: train_embedding(model, data, tmp / "other", EMBEDDING, other))
(tmp / f"report{rank}.json").write_text(json.dumps(report))
leave(0)  # as the sdstudio command ends a rank
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = write_dataset(tmp_path_factory.mktemp("data"), n=IMAGES)
    (folder / "broken.png").unlink()
    return folder


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two gloo processes under torchrun (on 127.0.0.1, a free port): (their folder, each rank's report)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    for rank in (0, 1):
        (tmp / f"node{rank}").mkdir()
    script = tmp / "ranks.py"
    script.write_text(SCRIPT)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(data), str(tmp)]  # fmt: skip
    done = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp, [json.loads((tmp / f"report{r}.json").read_text()) for r in (0, 1)]


def vectors(path: Path | str, width: int = 32) -> torch.Tensor:
    """The vectors of an embedding file for the tiny model's text encoder (width 32)."""
    return load_embedding(Path(path), width).vectors


@pytest.mark.slow  # the torchrun fixture: two processes, about 25 s
def test_two_processes_train_the_weights_of_one_at_the_global_batch(two_ranks, data, tmp_path):
    tmp, reports = two_ranks
    assert [r["shard"] for r in reports] == [[0, 2], [1, 2]] and [r["main"] for r in reports] == [True, False]
    model = loaded(tiny_model("tiny", seed=2))
    (alone, _) = train_embedding(model, data, tmp_path / "alone", EMBEDDING, run_config(4))
    (half, _) = train_embedding(model, data, tmp_path / "half", EMBEDDING, run_config(2))
    both = vectors(tmp / "shared" / f"{NAME}.pt")
    assert both.shape == (2, model.config.text.width)
    torch.testing.assert_close(both, vectors(alone), rtol=0, atol=1e-5)
    # the comparison can fail: one process at the per-rank batch (no gradient averaging) trains other weights
    assert (both - vectors(half)).abs().max() > 1e-3
    # the logged loss is the ranks' mean: the global batch's loss
    logged = [r["loss"] for r in read_log(tmp / "shared" / "state" / LOG_FILE)]
    expected = [r["loss"] for r in read_log(tmp_path / "alone" / "state" / LOG_FILE)]
    assert len(logged) == STEPS  # each step once: one rank wrote the log
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_two_processes_train_dreambooth_with_prior_preservation_as_one(two_ranks, data, tmp_path):
    tmp, (zero, one) = two_ranks
    assert zero["dreambooth"] == one["dreambooth"] == [str(tmp / "dreambooth" / "dreambooth.safetensors")]
    assert len(list((tmp / "dreambooth" / "class_images").glob("*.png"))) == 3  # made once, by rank 0
    model = loaded(tiny_model("tiny", seed=2))
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    (alone,) = train_dreambooth(model, data, tmp_path / "alone", DREAMBOOTH, dreambooth_run(4),
                                make_class_images=class_images)  # fmt: skip
    both, expected = load_file(zero["dreambooth"][0]), load_file(alone)
    assert both.keys() == expected.keys() and any(k.startswith("model_ema.") for k in both)
    assert max(float((both[k] - expected[k]).abs().max()) for k in both) < 1e-5  # the EMA keys too
    # the comparison can fail: the UNet moved (Adam: about the learning rate, 1e-4, per step)
    assert max(float((both[k] - start[k]).abs().max()) for k in start if k in both) > 1e-4


@pytest.mark.slow
def test_only_rank_0_writes_and_every_rank_returns_the_paths(two_ranks):
    tmp, (zero, one) = two_ranks
    assert (
        zero["shared"]
        == one["shared"]
        == [str(tmp / "shared" / f"{NAME}{s}") for s in (".pt", ".safetensors")]
    )
    assert zero["local"] == one["local"] == [f"run/{NAME}.pt", f"run/{NAME}.safetensors"]

    def files(node: str) -> set[str]:
        run = tmp / node / "run"
        return {
            p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "latents" not in p.parts
        }

    assert files("node0") == {"run.json", f"{NAME}.pt", f"{NAME}.safetensors", f"state/{STATE_FILE}",
                              f"state/{LOG_FILE}", "state/loss.png", f"saves/{NAME}-{STEPS:06d}.pt"}  # fmt: skip
    # rank 1's node: its latent cache (each rank encodes its own rows) and no other file
    assert files("node1") == set() and any((tmp / "node1" / "run" / "latents").rglob("*.safetensors"))
    assert all(not p.name.endswith(".tmp") for p in (tmp / "shared").rglob("*"))  # every write completed
    # a node-local state cannot be resumed; ranks with other settings are refused; both ranks alike
    assert zero["resume"] == one["resume"] and "rank 1 of 2 has other training state" in zero["resume"]
    assert "filesystem every node sees" in zero["resume"]
    assert (
        zero["settings"] == one["settings"]
        and "rank 1 of 2 has other settings than rank 0" in zero["settings"]
    )


# ------------------------------------------------------------------------------------------ in one process


def test_rows_split_a_global_batch_and_weigh_a_short_one():
    assert Shard(1, 2).rows(4) == Rows(4, (2, 3), (1.0, 1.0))
    assert Shard(0, 3).rows(6).index == (0, 1) and not Shard(2, 3).rows(6).weighted
    assert Shard(0, 2).rows(3) == Rows(3, (0, 1), (4 / 3,) * 2) and Shard(1, 2).rows(3) == Rows(
        3, (2,), (2 / 3,)
    )
    assert Shard(0, 2).rows(1) == Rows(1, (0,), (2.0,))
    assert Shard(1, 2).rows(1) == Rows(1, (0,), (0.0,))  # no row left: row 0 at weight 0
    assert ALONE.rows(3) == Rows.whole(3) and ALONE.main and not ALONE.distributed
    for total, world in ((7, 3), (2, 4), (8, 4)):
        parts = [Shard(r, world).rows(total) for r in range(world)]
        counted = sorted(i for p in parts for i, w in zip(p.index, p.weight) if w)
        assert counted == list(range(total))  # every row once, at a positive weight
        # each rank's mean of weighted ones, averaged over the ranks, is 1: the global mean of ones
        assert sum(sum(p.weight) / len(p.index) for p in parts) / world == pytest.approx(1.0)
    with pytest.raises(SdStudioError, match="rank 2 of 2"):
        Shard(2, 2)


def test_training_loss_of_a_rank_is_its_rows_of_the_global_draw():
    model = loaded(tiny_model("tiny", seed=2))
    denoiser = training_denoiser(model)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone_gen = torch.Generator().manual_seed(5)
        alone = denoiser.training_loss(x0, context, alone_gen, noise_offset=0.1, snr_gamma=5.0)  # [3]
        means = []
        for rank in (0, 1):
            rows = Shard(rank, 2).rows(3)
            index = list(rows.index)
            gen = torch.Generator().manual_seed(5)
            part = denoiser.training_loss(
                x0[index], context[index], gen, noise_offset=0.1, snr_gamma=5.0, rows=rows
            )
            torch.testing.assert_close(part, alone[index] * torch.tensor(rows.weight), rtol=1e-5, atol=1e-6)
            assert torch.equal(gen.get_state(), alone_gen.get_state())  # drew what one process drew
            means.append(part.mean())
        torch.testing.assert_close(sum(means) / 2, alone.mean(), rtol=1e-5, atol=0)
        # per-rank draws (each rank drawing for its own rows only) would give other losses
        own = denoiser.training_loss(x0[1:], context[1:], torch.Generator().manual_seed(5), noise_offset=0.1)
        assert not torch.allclose(own, alone[1:], rtol=1e-3)
    with pytest.raises(ValueError, match="3 rows given for a shard of 1"):
        denoiser.training_loss(x0, context, torch.Generator(), rows=Shard(1, 2).rows(3))


def test_training_data_of_a_rank_is_its_rows_of_the_global_batch(data, tmp_path):
    model: LoadedModel = loaded(tiny_model("tiny", seed=2))
    alone = TrainingData.open(data, dataset_config_for(model), model, tmp_path / "latents", 4, 0)
    ranks = [dataclasses.replace(alone, shard=Shard(r, 2), _epochs={}) for r in (0, 1)]
    weights = []
    for step in range(4):  # two epochs of a batch of 4 and one of 3
        gen = torch.Generator().manual_seed(step)
        latents, captions = alone.batch(step, gen)
        for source in ranks:
            rows = source.rows(step)
            rank_gen = torch.Generator().manual_seed(step)
            part, part_captions = source.batch(step, rank_gen)
            assert torch.equal(part, latents[list(rows.index)])
            assert part_captions == [captions[i] for i in rows.index]
            assert torch.equal(rank_gen.get_state(), gen.get_state())  # drew the global batch's noise
        weights.append(tuple(source.rows(step).weight for source in ranks))
    assert sorted(weights) == [((1.0, 1.0), (1.0, 1.0))] * 2 + [((4 / 3, 4 / 3), (2 / 3,))] * 2


def test_the_environment_decides_the_shard(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert shard_from_env("cpu") == ALONE and current_shard() == ALONE and is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SdStudioError, match="RANK is None: start distributed runs with torchrun"):
        shard_from_env("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_shard() == Shard(1, 2) and not is_main()
    with pytest.raises(SdStudioError, match="MASTER_ADDR is not set"):
        shard_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(SdStudioError, match="CPUs \\(gloo\\) or CUDA GPUs \\(NCCL\\), not on meta"):
        shard_from_env("meta")
    if torch.cuda.device_count() < 2:
        with pytest.raises(SdStudioError, match="LOCAL_RANK 1, but this machine has"):
            shard_from_env("cuda")
