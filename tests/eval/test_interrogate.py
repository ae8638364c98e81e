"""The captioner's search and phrase modes on a model whose embeddings are known, and folder captioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.eval.captions import CaptionFolderRequest, caption_folder
from sdstudio.eval.interrogate import (
    PHRASES_DIR,
    Captioner,
    Grammar,
    PhraseList,
    Slot,
    Template,
    joint_groups,
    mirrored,
    pair_group,
    parallel_groups,
    phrase_lists,
    read_phrase_list,
)

WORDS = ("red", "green", "blue", "circle", "square", "star", "left", "right", "top", "and", "a",
         "oil", "painting", "sketch", "photo", "moody", "bright", "dark", "calm", "gray", "sky")  # fmt: skip


class BagOfWords:
    """Texts embed as the normalised sum of their words' (orthonormal) vectors, a word after "and" with
    other vectors than before it (so that which object has which colour counts); image ``k`` (an image
    filled with the value k) embeds as ``targets[k]``'s text: the best caption of image k is known."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self.encoded: list[str] = []

    def _embed(self, text: str) -> torch.Tensor:
        v = torch.zeros(2 * len(WORDS))
        words = text.replace(",", " ").split()
        for i, w in enumerate(words):
            v[WORDS.index(w) + len(WORDS) * ("and" in words[:i])] += 1
        return torch.nn.functional.normalize(v, dim=0)

    def encode_texts(self, texts):
        self.encoded += list(texts)
        return torch.stack([self._embed(t) for t in texts])

    def encode_images(self, images):
        return torch.stack([self._embed(self.targets[int(np.asarray(im)[0, 0, 0])]) for im in images])


def image(k: int) -> np.ndarray:
    return np.full((8, 8, 3), k, np.uint8)


def one_object() -> Template:
    return Template("a {colour} {shape} {position}", (
        Slot("colour", (("red", "R"), ("green", "G"), ("blue", "B"))),
        Slot("shape", (("circle", "c"), ("square", "s"), ("star", "*"))),
        Slot("position", (("left", "l"), ("right", "r"), ("top", "t"))),
    ))  # fmt: skip


def test_exhaustive_template_reads_every_slot() -> None:
    model = BagOfWords(["a blue star top", "a red square left"])
    captioner = Captioner(model, grammar=Grammar((one_object(),)))
    first, second = captioner.caption([image(0), image(1)], "fast")
    assert first.text == "a blue star top" and dict(first.values) == {
        "colour": "B",
        "shape": "*",
        "position": "t",
    }
    assert second.values == {"colour": "R", "shape": "s", "position": "l"}
    assert first.similarity == pytest.approx(1.0)
    # the 27 sentences were encoded once, for both images
    assert (
        len(model.encoded) == len(set(model.encoded))
        and len([t for t in model.encoded if t.startswith("a ")]) == 27
    )


def test_block_search_reads_two_objects() -> None:
    slots = one_object().slots
    second = tuple(Slot(s.name + "2", s.values) for s in slots)
    two = Template("a {colour} {shape} {position} and a {colour2} {shape2} {position2}", (*slots, *second),
                   blocks=(("colour", "shape"), ("position",), ("colour2", "shape2"), ("position2",)))  # fmt: skip
    model = BagOfWords(["a green circle left and a blue square right"])
    caption = Captioner(model, grammar=Grammar((one_object(), two))).caption([image(0)], "classic")[0]
    assert caption.values == {
        "colour": "G",
        "shape": "c",
        "position": "l",
        "colour2": "B",
        "shape2": "s",
        "position2": "r",
    }
    # searched by blocks (and a joint block of both colours and shapes, scored mirrored too): far fewer
    # sentences than the 729 of an exhaustive search
    assert len([t for t in model.encoded if " and " in t]) < 250


def test_parallel_groups_and_mirrored_sentences() -> None:
    slots = one_object().slots
    second = tuple(Slot(s.name + "2", s.values) for s in slots)
    two = Template("a {colour} {shape} {position} and a {colour2} {shape2} {position2}", (*slots, *second),
                   blocks=(("colour", "shape"), ("position",), ("colour2", "shape2"), ("position2",)))  # fmt: skip
    assert parallel_groups(two) == [("colour", "colour2"), ("shape", "shape2"), ("position", "position2")]
    assert pair_group(two) == ("colour", "colour2")  # 9 sentences; ties: the first
    assert joint_groups(two) == [("colour", "colour2"), ("shape", "shape2")]  # 81; with positions 729
    assert mirrored("a red circle left and a blue star right") == "a red circle right and a blue star left"


def test_blocks_must_cover_each_slot_once() -> None:
    slots = one_object().slots
    with pytest.raises(ValueError, match="blocks"):
        Template("a {colour} {shape} {position}", slots, blocks=(("colour",), ("shape",)))


LISTS = (
    PhraseList("mediums", ("oil painting", "sketch", "photo")),
    PhraseList("flavors", ("moody", "bright", "dark", "calm")),
)


def test_classic_takes_the_best_of_each_list_and_three_flavours() -> None:
    model = BagOfWords(["sketch, moody, calm, dark"])
    caption = Captioner(model, lists=LISTS).caption([image(0)], "classic")[0]
    assert caption.phrases[0].phrase == "sketch"
    assert {p.phrase for p in caption.phrases[1:]} == {"moody", "calm", "dark"}
    assert caption.text.startswith("sketch, ")


def test_best_chains_phrases_while_they_raise_the_similarity() -> None:
    model = BagOfWords(["photo, bright"])
    captioner = Captioner(model, lists=LISTS)
    caption = captioner.caption([image(0)], "best")[0]
    # the lists' phrases are kept for the next image; the chain's whole captions are not
    assert set(captioner._embeddings) == {p for lst in LISTS for p in lst.phrases}
    assert sorted(p.phrase for p in caption.phrases) == ["bright", "photo"]
    assert caption.similarity == pytest.approx(1.0)
    # a broken chain that took every phrase would lower the similarity: the stop matters
    assert len(caption.phrases) == 2


def test_fast_fills_the_token_budget_in_similarity_order() -> None:
    model = BagOfWords(["dark, dark, moody"])
    lists = (PhraseList("flavors", ("dark", "moody", "calm", "bright")),)
    captioner = Captioner(model, lists=lists, count_tokens=lambda text: 40 * len(text.split(",")))
    caption = captioner.caption([image(0)], "fast")[0]
    assert [p.phrase for p in caption.phrases] == ["dark"]  # a second phrase makes 80 tokens > 75
    wide = Captioner(model, lists=lists, count_tokens=lambda text: len(text.split(",")))
    assert [p.phrase for p in wide.caption([image(0)], "fast")[0].phrases][:2] == ["dark", "moody"]


def test_a_captioner_needs_something_to_caption_with_and_a_known_mode() -> None:
    with pytest.raises(SdStudioError, match="needs BLIP weights, a grammar or phrase lists"):
        Captioner(BagOfWords([]))
    with pytest.raises(SdStudioError, match="caption mode 'slow'"):
        Captioner(BagOfWords(["photo"]), lists=LISTS).caption([image(0)], "slow")  # type: ignore[arg-type]


def test_blip_writes_the_base_caption() -> None:
    model = BagOfWords(["a red circle, photo"])
    captioner = Captioner(model, lists=LISTS, blip=lambda images: ["  a red circle "] * len(images))
    caption = captioner.caption([image(0)], "classic")[0]
    assert caption.base == "a red circle" and caption.text.startswith("a red circle, photo")


def test_phrase_lists(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("# my words\nglowing\n\nglowing\n  neon  \n", encoding="utf-8")
    assert read_phrase_list(tmp_path / "mine.txt") == PhraseList("mine", ("glowing", "neon"))
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(SdStudioError, match="holds no phrases"):
        read_phrase_list(tmp_path / "empty.txt")
    (tmp_path / "empty.txt").unlink()
    builtin = {lst.name: lst for lst in phrase_lists()}
    assert set(builtin) == {"mediums", "movements", "flavors"} and all(
        len(x.phrases) >= 50 for x in builtin.values()
    )
    (tmp_path / "mediums.txt").write_text("clay\n", encoding="utf-8")
    lists = {lst.name: lst for lst in phrase_lists([tmp_path])}
    assert lists["mediums"].phrases == ("clay",) and lists["mine"].phrases == ("glowing", "neon")
    assert lists["flavors"] == builtin["flavors"]
    assert [lst.name for lst in phrase_lists([tmp_path / "mine.txt"], builtin=False)] == ["mine"]
    with pytest.raises(SdStudioError, match="no such phrase list"):
        phrase_lists([tmp_path / "missing"])
    assert PHRASES_DIR.is_dir()


# -- folders ----------------------------------------------------------------------------------------


def folder_captioner() -> Captioner:
    return Captioner(BagOfWords(["a red circle left", "a blue star top"]), grammar=Grammar((one_object(),)))


def write_images(folder, values) -> None:
    folder.mkdir(exist_ok=True)
    for name, k in values.items():
        Image.fromarray(image(k)).save(folder / name)


def test_caption_folder_writes_keeps_replaces_and_appends(tmp_path) -> None:
    write_images(tmp_path, {"a.png": 0, "b.png": 1, "c.jpg": 0})
    (tmp_path / "c.txt").write_text("my own caption, blue star", encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    result = caption_folder(CaptionFolderRequest(str(tmp_path), mode="fast"), folder_captioner())
    assert (tmp_path / "a.txt").read_text() == "a red circle left\n"
    assert (tmp_path / "b.txt").read_text() == "a blue star top\n"
    assert (tmp_path / "c.txt").read_text() == "my own caption, blue star"  # kept
    assert (
        result.written == ("a.txt", "b.txt")
        and result.kept == ("c.jpg",)
        and result.unreadable == ("broken.png",)
    )
    assert "broken.png" in result.summary() and "--overwrite" in result.summary()

    caption_folder(CaptionFolderRequest(str(tmp_path), mode="fast", append_tags=True), folder_captioner())
    assert (tmp_path / "c.txt").read_text() == "my own caption, blue star, a red circle left\n"
    assert (tmp_path / "a.txt").read_text() == "a red circle left\n"  # nothing new to add
    caption_folder(CaptionFolderRequest(str(tmp_path), mode="fast", overwrite=True), folder_captioner())
    assert (tmp_path / "c.txt").read_text() == "a red circle left\n"
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "broken.txt").exists()
    # a trigger word before, a tag after each caption (kohya's prefix and postfix)
    request = CaptionFolderRequest(str(tmp_path), mode="fast", overwrite=True, prefix="sks, ", postfix=", photo")
    caption_folder(request, folder_captioner())
    assert (tmp_path / "b.txt").read_text() == "sks, a blue star top, photo\n"
    # the captioner's word replaced by the user's, whole words only
    request = CaptionFolderRequest(str(tmp_path), mode="fast", overwrite=True, replace=(("blue", "pink"), ("a", "the")))
    caption_folder(request, folder_captioner())
    assert (tmp_path / "b.txt").read_text() == "the pink star top\n"
    # NEW as it is (no regex escapes), punctuation replaced as it is; the trigger stays first when appending
    request = CaptionFolderRequest(str(tmp_path), mode="fast", overwrite=True, replace=(("blue", r"\1 b\\"), (" top", ",")))
    caption_folder(request, folder_captioner())
    assert (tmp_path / "b.txt").read_text() == "a \\1 b\\\\ star,\n"
    (tmp_path / "b.txt").write_text("sks, my words", encoding="utf-8")
    request = CaptionFolderRequest(str(tmp_path), mode="fast", append_tags=True, prefix="sks, ")
    caption_folder(request, folder_captioner())
    assert (tmp_path / "b.txt").read_text() == "sks, my words, a blue star top\n"
    (tmp_path / "b.txt").write_text("my words", encoding="utf-8")
    caption_folder(request, folder_captioner())
    assert (tmp_path / "b.txt").read_text() == "sks, my words, a blue star top\n"


def test_caption_folder_bad_input(tmp_path) -> None:
    with pytest.raises(SdStudioError, match="no images to caption"):
        caption_folder(CaptionFolderRequest(str(tmp_path)), folder_captioner())
    with pytest.raises(SdStudioError, match="no such folder"):
        caption_folder(CaptionFolderRequest(str(tmp_path / "nope")), folder_captioner())
    with pytest.raises(SdStudioError, match="choose one"):
        CaptionFolderRequest(str(tmp_path), overwrite=True, append_tags=True)
    with pytest.raises(SdStudioError, match="--caption-extension"):
        CaptionFolderRequest(str(tmp_path), extension="txt")
    with pytest.raises(SdStudioError, match="--mode"):
        CaptionFolderRequest(str(tmp_path), mode="quick")
    with pytest.raises(SdStudioError, match="--prefix .*one line"):
        CaptionFolderRequest(str(tmp_path), prefix="sks\n")
    with pytest.raises(SdStudioError, match="--replace"):
        CaptionFolderRequest(str(tmp_path), replace=((" ", "pink"),))
