"""The BLIP captioner against transformers' own captioning path (processor, ``generate``, ``decode``) on a
tiny random BLIP written to a folder as Salesforce/blip-image-captioning-base is laid out; and the
refusals of folders that are not BLIP captioning weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.eval.blip import BlipCaptioner, load_blip

transformers = pytest.importorskip("transformers")

SIZE = 32
WORDS = ["a", "picture", "photo", "of", "on", "in", "with", "red", "blue", "green", "big", "small"]
NOUNS = ["cat", "dog", "sky", "grass", "tree", "car", "house", "man", "woman"]
# BLIP's tokenizer is BERT's (bert-base-uncased) with "[DEC]" added as its bos token: generate() puts it in
# place of the prompt's [CLS], and decode(skip_special_tokens=True) drops it only because it is special.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *NOUNS, "[DEC]"]
STD = 0.2  # at BLIP's 0.02 a tiny random model writes the same caption for every image
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt in transformers 4 and 5 (5's BertTokenizer ignores a vocab_file argument)
    tokenizer = transformers.BertTokenizer.from_pretrained(folder, bos_token="[DEC]")
    # transformers 5's BlipImageProcessor needs torchvision; its PIL twin is the same processing
    image_processor = getattr(transformers, "BlipImageProcessorPil", transformers.BlipImageProcessor)
    processor = transformers.BlipProcessor(image_processor(size={"height": SIZE, "width": SIZE}), tokenizer)
    processor.save_pretrained(folder)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    assert ids == {"bos_token_id": len(VOCAB) - 1, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3}
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "initializer_range": STD,
    }
    config = transformers.BlipConfig(
        text_config={
            **tiny,
            **ids,
            "vocab_size": len(VOCAB),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
        },
        vision_config={**tiny, "image_size": SIZE, "patch_size": 16},
        initializer_range=STD,
    )
    torch.manual_seed(0)
    transformers.BlipForConditionalGeneration(config).save_pretrained(folder)
    return folder


def _images(seed: int) -> list[np.ndarray]:
    """Three unlike uint8 RGB images of odd sizes: noise, a horizontal ramp, a two-colour split."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (48, 1, 3))
    split = np.zeros((20, 30, 3), np.uint8)
    split[:, :15] = rng.integers(0, 256, 3, dtype=np.uint8)
    split[:, 15:] = rng.integers(0, 256, 3, dtype=np.uint8)
    return [noise, ramp, split]


def _reference(folder: Path, images: list[np.ndarray], prompt: str | None) -> tuple[list[str], torch.Tensor]:
    """transformers' own path: the processor on the whole batch, generate, decode."""
    model = transformers.BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder)
    pil = [Image.fromarray(a) for a in images]
    text = None if prompt is None else [prompt] * len(pil)
    inputs = processor(images=pil, text=text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=3, do_sample=False)
    return [processor.decode(row, skip_special_tokens=True).strip() for row in ids], ids


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_captions_match_transformers(blip_dir: Path, prompt: str | None) -> None:
    images = _images(0)
    blip = load_blip(blip_dir, max_new_tokens=MAX_NEW_TOKENS, num_beams=3, prompt=prompt, batch_size=2)
    assert isinstance(blip, BlipCaptioner)
    captions = blip(images)
    want, ids = _reference(blip_dir, images, prompt)
    assert captions == want
    assert all(c and c == c.strip() for c in captions)
    assert len(set(captions)) > 1, "the tiny model must caption unlike images differently"
    if prompt is not None:
        assert all(c.startswith(prompt + " ") for c in captions)
    # the check can fail: other images give other captions
    other, other_ids = _reference(blip_dir, _images(1)[::-1], prompt)
    assert other != captions
    assert ids.shape != other_ids.shape or not torch.equal(ids, other_ids)


def test_captions_are_deterministic_and_batch_free(blip_dir: Path) -> None:
    images = _images(2)
    blip = load_blip(blip_dir, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    first = blip(images)
    assert blip(images) == first
    blip.batch_size = 1
    assert blip(images) == first
    assert blip([]) == []
    with pytest.raises(SdStudioError, match="uint8 HxWx3"):
        blip([images[0].astype(np.float32)])


def test_reads_the_hub_layout(tmp_path: Path, blip_dir: Path) -> None:
    """The Hub's BLIP folders predate transformers 5's processor_config.json: the image processor is in
    preprocessor_config.json, and a tokenizer built from vocab.txt reads the same."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in blip_dir.iterdir():
        if f.name not in ("processor_config.json", "tokenizer.json"):
            (legacy / f.name).write_bytes(f.read_bytes())
    processor = blip_dir / "processor_config.json"
    if processor.exists():
        image = json.loads(processor.read_text(encoding="utf-8"))["image_processor"]
        image["processor_class"] = "BlipProcessor"
        (legacy / "preprocessor_config.json").write_text(json.dumps(image), encoding="utf-8")
    images = _images(3)
    want = load_blip(blip_dir, max_new_tokens=MAX_NEW_TOKENS)(images)
    assert load_blip(legacy, max_new_tokens=MAX_NEW_TOKENS)(images) == want


def test_refuses_what_is_not_blip_captioning(tmp_path: Path, blip_dir: Path) -> None:
    with pytest.raises(SdStudioError, match="a missing path"):
        load_blip(tmp_path / "nowhere")
    with pytest.raises(SdStudioError, match="must be a folder.*a file"):
        load_blip(blip_dir / "model.safetensors")
    with pytest.raises(SdStudioError, match="no config.json"):
        load_blip(tmp_path)

    clip = tmp_path / "clip"
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    transformers.CLIPConfig(
        text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 16}
    ).save_pretrained(clip)
    with pytest.raises(SdStudioError, match=r"holds a clip model, not BLIP: expected model_type 'blip'"):
        load_blip(clip)

    vqa = tmp_path / "vqa"
    config = transformers.BlipConfig.from_pretrained(blip_dir)
    config.architectures = ["BlipForQuestionAnswering"]
    config.save_pretrained(vqa)
    with pytest.raises(SdStudioError, match="BlipForQuestionAnswering, not a captioning model"):
        load_blip(vqa)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "processor_config.json"):
        if (blip_dir / name).exists():
            (broken / name).write_bytes((blip_dir / name).read_bytes())
    with pytest.raises(SdStudioError, match="cannot load BLIP weights") as no_weights:
        load_blip(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SdStudioError, match="cannot load BLIP weights") as garbled:
        load_blip(broken)
    assert "\n" not in str(no_weights.value) + str(garbled.value)
    # a checkpoint without its text decoder (as BLIP's retrieval weights): refused, not filled in at random
    state = safetensors.torch.load_file(blip_dir / "model.safetensors")
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    assert 0 < len(vision) < len(state)
    safetensors.torch.save_file(vision, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SdStudioError, match=r"lack \d+ tensors \(as text_decoder\."):
        load_blip(broken)


def test_without_transformers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SdStudioError, match=r"need transformers: pip install 'sdstudio\[caption\]'"):
        load_blip(tmp_path)
