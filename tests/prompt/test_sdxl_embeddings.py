"""SDXL textual inversion: AUTOMATIC1111's SDXL embedding files (``clip_l`` and ``clip_g`` tensors) splice
each encoder's own vectors into its tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import PRESETS
from sdstudio.models.sdxl import SizeConditioning
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import encode_conditioning
from sdstudio.prompt.embeddings import load_embeddings_for
from sdstudio.prompt.parser import parse
from tests.reference import randomise_


def _cond(model, tokenizer, prompt, embeddings=None):
    size = SizeConditioning.of_image(64, 64)
    with torch.no_grad():
        return encode_conditioning(
            model.text_encoder, tokenizer, model.config.text, parse(prompt, 20), parse("", 20, composable=False), 2,
            embeddings, size=size,
        )  # fmt: skip


def test_sdxl_embedding_splices_each_encoders_vectors(tmp_path) -> None:
    model = random_model(PRESETS["tiny-sdxl"])
    randomise_(model, seed=2)
    tokenizer = ClipTokenizer()
    word = tokenizer.encode("cat")
    assert len(word) == 1
    clip_l, clip_g = model.text_encoder.encoders
    vectors = {
        "clip_l": clip_l.token_embedding.weight[word].detach().clone(),
        "clip_g": clip_g.token_embedding.weight[word].detach().clone(),
    }
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file(vectors, str(folder / "zqxfeline.safetensors"))
    embeddings = load_embeddings_for(folder, model.config, tokenizer)
    ours = _cond(model, tokenizer, "a photo of zqxfeline", embeddings)
    plain = _cond(model, tokenizer, "a photo of cat")
    # each encoder got its own vectors: the same hidden states (both halves) and pooled text as the word
    torch.testing.assert_close(ours.tensors[0], plain.tensors[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.vectors, plain.vectors, rtol=0, atol=1e-6)
    # swapped files (clip_l's vectors for bigG) give another conditioning
    save_file({"clip_l": vectors["clip_g"], "clip_g": vectors["clip_l"]}, str(folder / "zqxfeline.safetensors"))
    swapped = _cond(model, tokenizer, "a photo of zqxfeline", load_embeddings_for(folder, model.config, tokenizer))
    assert (swapped.tensors[0] - plain.tensors[0]).abs().max() > 1e-2


def test_embedding_of_another_family_is_refused(tmp_path) -> None:
    tokenizer = ClipTokenizer()
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": torch.zeros(1, 32)}, str(folder / "sd1.safetensors"))
    with pytest.raises(SdStudioError, match="not an SDXL embedding"):
        load_embeddings_for(folder, PRESETS["tiny-sdxl"], tokenizer)
    (folder / "sd1.safetensors").unlink()
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(folder / "xl.safetensors"))
    with pytest.raises(SdStudioError, match="an SDXL embedding"):
        load_embeddings_for(folder, PRESETS["tiny"], tokenizer)
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 16)}, str(folder / "xl.safetensors"))
    with pytest.raises(SdStudioError, match=r"\(clip_g\) are 16 wide"):
        load_embeddings_for(folder, PRESETS["tiny-sdxl"], tokenizer)
