"""Textual inversion: A1111's starting vectors, training that changes only the vectors and lowers the loss,
and files that sdstudio, A1111's format and diffusers' ``load_textual_inversion`` read back to the same
text-encoder output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embedding
from sdstudio.training.embedding import (
    EmbeddingTrainConfig,
    TrainableEmbedding,
    embedding_loss,
    initial_vectors,
    save_embedding,
)
from sdstudio.training.trainer import TrainConfig, train
from tests.adapters.loras import tiny_model

NAME = "zqxring"


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny", seed=7)


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def test_initial_vectors_follow_a1111(model, tokenizer):
    table = model.text_encoder.token_embedding
    ids = tokenizer.encode("red circle")
    assert len(ids) == 2
    vectors = initial_vectors(table, tokenizer, "red circle", 3)
    weight = table.weight.detach().float()
    # vector i takes token i * tokens // n: 0, 0, 1
    assert torch.equal(vectors, torch.stack([weight[ids[0]], weight[ids[0]], weight[ids[1]]]))
    assert torch.equal(initial_vectors(table, tokenizer, "red circle", 1), weight[ids[:1]])
    assert torch.equal(initial_vectors(table, tokenizer, "", 2), torch.zeros(2, weight.shape[1]))
    with pytest.raises(SdStudioError, match="between 1 and 75"):
        EmbeddingTrainConfig(NAME, vectors=0)
    with pytest.raises(SdStudioError, match="without <>"):
        EmbeddingTrainConfig("a:b")


def loss_at(embedding, model, tokenizer, latents, captions, seed=0) -> float:
    denoiser = Denoiser(
        model.unet, DiscreteSchedule.from_config(model.config.schedule), model.config.prediction
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        losses = [
            float(
                embedding_loss(
                    embedding,
                    denoiser,
                    model.text_encoder,
                    tokenizer,
                    model.config.text,
                    1,
                    latents,
                    captions,
                    gen,
                )
            )
            for _ in range(8)
        ]
    return sum(losses) / len(losses)


def test_training_moves_only_the_vectors_and_lowers_the_loss(model, tokenizer, tmp_path):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = EmbeddingTrainConfig(NAME, vectors=2, init_text="circle")
    embedding = TrainableEmbedding.create(config, model.text_encoder.token_embedding, tokenizer)
    start = embedding.vectors.detach().clone()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)  # the "concept": two fixed latents
    captions = [f"a photo of {NAME}", f"{NAME}, red"]
    denoiser = Denoiser(
        model.unet, DiscreteSchedule.from_config(model.config.schedule), model.config.prediction
    )
    initial = loss_at(embedding, model, tokenizer, latents, captions)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        return embedding_loss(embedding, denoiser, model.text_encoder, tokenizer, model.config.text, 1,
                              latents, captions, generator)  # fmt: skip

    cfg = TrainConfig(steps=60, lr=5e-2, warmup=5, bf16=False, weight_decay=0.0, checkpoint_every=1000)
    train(embedding, loss_fn, cfg, tmp_path / "run", parameters=[embedding.vectors])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is frozen
    assert not torch.equal(embedding.vectors.detach(), start)
    assert loss_at(embedding, model, tokenizer, latents, captions) < 0.9 * initial


def hf_tokenizer(folder: Path):
    """transformers' CLIPTokenizer with OpenAI's vocabulary, built from open_clip's BPE file (offline)."""
    import importlib.util

    from transformers import CLIPTokenizer

    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # transformers < 5
        from transformers.models.clip.tokenization_clip import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.origin is not None
    with gzip.open(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz") as f:
        lines = f.read().decode().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = (
        vocab
        + [v + "</w>" for v in vocab]
        + ["".join(m) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_read_back_in_sdstudio_and_diffusers(model, tokenizer, tmp_path, suffix):
    pytest.importorskip("diffusers")
    from tests.reference import a1111_scheduler, diffusers_pipeline

    width = model.config.text.width
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(4))
    path = save_embedding(vectors, tmp_path / f"{NAME}{suffix}", name=NAME, step=12)
    with pytest.raises(SdStudioError, match="already exists"):
        save_embedding(vectors, path)
    loaded = load_embedding(path, width)
    assert loaded.name == NAME and torch.equal(loaded.vectors, vectors)
    if suffix == ".pt":
        data = torch.load(path, weights_only=True)
        assert data["string_to_token"] == {"*": 265} and data["name"] == NAME and data["step"] == 12

    # diffusers adds the embedding to transformers' tokenizer and text encoder: same hidden states as ours
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe, clip = diffusers_pipeline(model.config, state, a1111_scheduler("ddim"))
    hf = hf_tokenizer(tmp_path)
    pipe.load_textual_inversion(str(path), token=NAME, tokenizer=hf, text_encoder=clip)
    text = f"a photo of {NAME} on grass"
    converted = pipe.maybe_convert_prompt(text, hf)  # "zqxring" -> "zqxring zqxring_1 zqxring_2"
    ids = hf(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = clip(ids).last_hidden_state
        db = EmbeddingDatabase.build([loaded], tokenizer)
        ours = encode_captions(model.text_encoder, tokenizer, model.config.text, [text], 1, db)
        plain = encode_captions(model.text_encoder, tokenizer, model.config.text, [text], 1)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((plain - theirs).abs().max()) > 1e-2  # the vectors matter: the comparison can fail
