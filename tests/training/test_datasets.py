"""Training datasets: kohya / AUTOMATIC1111 / diffusers layouts, kohya's buckets, augmentations, captions,
bad files, and the on-disk latent cache (a tiny random VAE)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.io.images import from_pil
from sdstudio.models.configs import PRESETS
from sdstudio.models.stablediffusion import random_model
from sdstudio.pipelines.vae_tiling import encode_mean
from sdstudio.training.datasets import (
    TEMPLATES,
    DatasetConfig,
    LatentCache,
    Placement,
    View,
    assign_buckets,
    batches,
    bucket_resolutions,
    caption_for,
    choose_view,
    filename_words,
    load_sample,
    load_template,
    render_view,
    sample_rng,
    scan_dataset,
    select_bucket,
    vae_hash,
)

SMALL = DatasetConfig(resolution=128, bucket_min=64, bucket_max=256)  # buckets 64x192 .. 256x64


def image(path: Path, width: int = 64, height: int = 64, seed: int = 0, fmt: str | None = None) -> Path:
    """A random RGB image file (its content depends on ``seed``)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def by_name(dataset):
    return {item.name: item for item in dataset.items}


# ------------------------------------------------------------------------------------------------ layouts


def test_kohya_repeat_folders_captions_and_class_tokens(tmp_path):
    dog = tmp_path / "10_sks dog"
    image(dog / "a.png", seed=1)
    text(dog / "a.txt", "sks dog, sitting, grass\nsecond line is ignored as kohya does\n")
    image(dog / "b.png", seed=2)  # no caption file: the folder's name is its caption
    image(tmp_path / "2_cat" / "c.jpg", seed=3)
    text(tmp_path / "2_cat" / "c.caption", "a cat")
    image(tmp_path / "2_cat" / "d.png", seed=4)
    text(tmp_path / "2_cat" / "d.txt", "from the txt")
    text(tmp_path / "2_cat" / "d.caption", "from the caption")  # .txt is tried first
    image(tmp_path / "0_none" / "e.png", seed=5)
    image(tmp_path / "notes" / "f.png", seed=6)
    image(tmp_path / "root.png", seed=7)
    text(tmp_path / "root.txt", "a root image")
    text(tmp_path / "README.md", "not an image: passed over quietly")
    (tmp_path / ".latents").mkdir()
    image(tmp_path / ".latents" / "hidden.png")  # hidden folders (a latent cache) are not scanned

    ds = scan_dataset(tmp_path, DatasetConfig(repeats=3))
    items = by_name(ds)
    assert list(items) == ["10_sks dog/a.png", "10_sks dog/b.png", "2_cat/c.jpg", "2_cat/d.png", "root.png"]
    assert items["10_sks dog/a.png"].captions == ("sks dog, sitting, grass",)
    assert items["10_sks dog/a.png"].caption_source == "file"
    assert items["10_sks dog/b.png"].captions == ("sks dog",)
    assert items["10_sks dog/b.png"].caption_source == "folder"
    assert items["2_cat/c.jpg"].captions == ("a cat",)
    assert items["2_cat/d.png"].captions == ("from the txt",)
    assert [items[n].repeats for n in items] == [10, 10, 2, 2, 3]
    assert ds.num_samples == 27
    assert ds.warnings == (
        "0_none/: 0 repeats: the folder is left out",
        "notes/: folder left out: name it N_name to train on it N times per epoch",
    )
    assert all(item.size == (64, 64) and item.bucket == (512, 512) for item in ds.items)
    assert items["10_sks dog/a.png"].resized == (512, 512)  # upscaled to the bucket, as kohya does


def test_caption_extension_choice(tmp_path):
    image(tmp_path / "a.png", seed=1)
    text(tmp_path / "a.txt", "txt caption")
    text(tmp_path / "a.caption", "caption caption")
    image(tmp_path / "b.png", seed=2)
    text(tmp_path / "b.txt", "only a txt")
    ds = scan_dataset(tmp_path, DatasetConfig(caption_extensions=(".caption",)))
    assert [(i.name, i.captions) for i in ds.items] == [("a.png", ("caption caption",))]
    assert ds.warnings == (
        "b.png: no caption (looked for b.caption); add one, or set missing captions to empty or filename",
    )


def test_diffusers_metadata_jsonl(tmp_path):
    image(tmp_path / "train" / "0001.png", seed=1)
    image(tmp_path / "b.png", seed=2)
    image(tmp_path / "c.png", seed=3)
    text(tmp_path / "c.txt", "c from its caption file")  # not in the metadata: its caption file is used
    rows = [
        {"file_name": "train/0001.png", "text": "a red square", "other": 1},
        {"file_name": "b.png", "text": ["first caption", "second caption"]},
        "{not json",
        {"file_name": "missing.png", "text": "gone"},
        {"text": "no file name"},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    text(tmp_path / "metadata.jsonl", "\n".join(lines) + "\n")
    ds = scan_dataset(tmp_path)
    items = by_name(ds)
    assert list(items) == ["b.png", "c.png", "train/0001.png"]
    assert items["train/0001.png"].captions == ("a red square",)
    assert items["train/0001.png"].caption_source == "metadata"
    assert items["b.png"].captions == ("first caption", "second caption")
    assert items["c.png"].captions == ("c from its caption file",)
    assert ds.warnings == (
        "metadata.jsonl line 3: not JSON (Expecting property name enclosed in double quotes); the row is left out",
        "metadata.jsonl line 5: no file_name; the row is left out",
        "missing.png: listed in the metadata but no such file",
    )  # train/ is not reported as a left-out folder: the metadata names its images
    # several captions: one is drawn per sample
    drawn = Counter(caption_for(items["b.png"], sample_rng(0, 0, i), ds.config) for i in range(200))
    assert set(drawn) == {"first caption", "second caption"} and min(drawn.values()) > 60

    # another text column, and metadata.csv
    (tmp_path / "metadata.jsonl").unlink()
    text(tmp_path / "metadata.csv", 'file_name,caption\nb.png,"csv, caption"\n')
    ds = scan_dataset(tmp_path, DatasetConfig(caption_column="caption", missing_caption="empty"))
    assert {i.name: i.captions for i in ds.items} == {
        "b.png": ("csv, caption",),
        "c.png": ("c from its caption file",),
    }
    assert ds.warnings == ("train/: folder left out: name it N_name to train on it N times per epoch",)


def test_templates_name_and_filewords(tmp_path):
    image(tmp_path / "00012-a red fox.png", seed=1)
    image(tmp_path / "7-blue_bird.png", seed=2)
    text(tmp_path / "7-blue_bird.txt", "blue bird, branch")
    config = DatasetConfig(
        template=("a photo of [name], [filewords]",), name="sks", missing_caption="filename"
    )
    ds = scan_dataset(tmp_path, config)
    fox, bird = ds.items
    assert fox.captions == ("a red fox",) and fox.caption_source == "filename"
    assert caption_for(fox, random.Random(0), config) == "a photo of sks, a red fox"
    assert caption_for(bird, random.Random(0), config) == "a photo of sks, blue bird, branch"
    assert filename_words("00012-a red fox", r"[a-z]+", "_") == "a_red_fox"
    assert filename_words("-3-x 1") == "x 1"

    # a template file, one prompt per line (blank lines dropped); the line is drawn per sample
    path = text(tmp_path / "tpl.txt", "art by [name]\n\n[filewords], by [name]\n")
    assert load_template(path) == ("art by [name]", "[filewords], by [name]")
    config = DatasetConfig(template=load_template(path), name="sks")
    outputs = [caption_for(bird, sample_rng(5, 0, i), config) for i in range(6, 12)]
    # the line is random.choice's: sample_rng(5, 0, i).randrange(2) is 1, 1, 0, 0, 0, 1 here
    assert outputs == [
        "blue bird, branch, by sks",
        "blue bird, branch, by sks",
        "art by sks",
        "art by sks",
        "art by sks",
        "blue bird, branch, by sks",
    ]
    assert load_template("subject_filewords") == TEMPLATES["subject_filewords"]
    assert all("[name]" in line and "[filewords]" in line for line in TEMPLATES["style_filewords"])

    # no [filewords]: captions are not needed, an image without one is kept
    image(tmp_path / "sub" / "nocap.png")
    ds = scan_dataset(tmp_path / "sub", DatasetConfig(template=TEMPLATES["subject"], name="sks"))
    assert ds.items[0].caption_source == "none" and not ds.skipped
    with pytest.raises(SdStudioError, match=r"uses \[name\]"):
        DatasetConfig(template=TEMPLATES["subject"])
    with pytest.raises(SdStudioError, match="no such template file"):
        load_template(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------------ buckets

# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: max area 512 * 512; width w ->
# height min(1024, floor(262144 / w / 64) * 64), kept when >= 256, and both orientations.
KOHYA_512 = (
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
)  # fmt: skip


def brute_force_buckets(resolution, min_size, max_size, step, min_filter=True):
    """Every multiple-of-``step`` width, with the tallest multiple-of-``step`` height within the area."""
    width, height = resolution
    area = width * height
    side = max(s for s in range(step, 4 * max_size, step) if s * s <= area)
    out = {(side, side)}
    for w in range(min_size, max_size + 1, step):
        h = max(h for h in range(0, max_size + 1, step) if w * h <= area)
        if h >= min_size or not min_filter:
            out |= {(w, h), (h, w)}
    return tuple(sorted(out))


def test_bucket_resolutions_match_kohya():
    assert bucket_resolutions(512) == KOHYA_512
    assert {(512, 512), (576, 448), (448, 576), (640, 384)} <= set(KOHYA_512)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in KOHYA_512)
    cases = [
        ((r, r) if isinstance(r, int) else r, lo, hi, step)
        for r in (512, 768, 1024, 600, (512, 768), (1000, 700))
        for lo, hi, step in ((256, 1024, 64), (128, 2048, 64), (320, 1536, 32), (256, 1024, 128))
        if hi >= max(r if isinstance(r, tuple) else (r,))
    ]
    for case in cases:
        assert bucket_resolutions(*case) == brute_force_buckets(*case), case
    # the comparison can fail: without kohya's min-size filter the list differs
    assert bucket_resolutions((512, 512), 320, 1024, 64) != brute_force_buckets(
        (512, 512), 320, 1024, 64, False
    )


def test_select_bucket_values():
    # 1000 x 750 (4:3) at 512: nearest aspect 576x448 (1.286); height fits: 448 / 750
    assert select_bucket((1000, 750), KOHYA_512) == Placement((576, 448), (597, 448))
    assert select_bucket((750, 1000), KOHYA_512) == Placement((448, 576), (448, 597))
    assert select_bucket((576, 448), KOHYA_512) == Placement((576, 448), (576, 448))  # exact size kept
    assert select_bucket((64, 64), KOHYA_512) == Placement((512, 512), (512, 512))  # upscaled
    small = bucket_resolutions(128, 64, 256, 64)
    assert small == ((64, 192), (64, 256), (128, 128), (192, 64), (256, 64))
    assert select_bucket((300, 100), small) == Placement((192, 64), (192, 64))
    # 2:1 is as far from 1:1 as from 3:1; the first in order wins, as numpy's argmin in kohya
    assert select_bucket((200, 100), small) == Placement((128, 128), (256, 128))
    # kohya's --bucket_no_upscale: a small image keeps its size, cropped down to multiples of the step
    ds_config = DatasetConfig(bucket_no_upscale=True)
    assert assign_buckets([(300, 200), (2000, 1000), (40, 40)], ds_config) == [
        Placement((256, 192), (300, 200)),
        Placement((640, 320), (640, 320)),  # 2:1 shrunk to area 512^2: 724 x 362, rounded to 640 x 320
        None,
    ]
    # no buckets: everything covers the resolution and is cropped
    assert assign_buckets([(200, 100)], DatasetConfig(resolution=64, buckets=False)) == [
        Placement((64, 64), (128, 64))
    ]


# ------------------------------------------------------------------------------------------------ crops


def halves(path: Path, width: int, height: int) -> Path:
    """Left half black, right half white, a red first row: flips and crops show in the pixels."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, width // 2 :] = 255
    arr[0] = (255, 0, 0)
    Image.fromarray(arr).save(path)
    return path


def test_crop_and_flip_values(tmp_path):
    halves(tmp_path / "wide.png", 200, 100)
    text(tmp_path / "wide.txt", "x")
    (item,) = scan_dataset(tmp_path, SMALL).items
    assert (item.bucket, item.resized) == ((128, 128), (256, 128))

    pixels, view = load_sample(item, random.Random(0), SMALL)
    assert view.crop == (64, 0) and not view.flip  # centre: (256 - 128) // 2
    resized = Image.open(item.path).convert("RGB").resize((256, 128), Image.LANCZOS)
    expected = from_pil(resized.crop((64, 0, 192, 128)))[0]
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32
    assert torch.equal(pixels, expected)
    assert not torch.equal(pixels, from_pil(resized.crop((63, 0, 191, 128)))[0])  # one pixel off shows
    assert pixels.min() == -1 and pixels.max() == 1

    flip = DatasetConfig(resolution=128, bucket_min=64, bucket_max=256, flip=True)
    views = [choose_view(item, sample_rng(0, 0, i), flip) for i in range(400)]
    assert 160 < sum(v.flip for v in views) < 240
    flipped = next(v for v in views if v.flip)
    assert torch.equal(render_view(item, flipped), pixels.flip(-1))

    rand = DatasetConfig(resolution=128, bucket_min=64, bucket_max=256, crop="random")
    crops = [choose_view(item, sample_rng(3, 1, i), rand).crop for i in range(200)]
    assert crops[:4] == [(78, 0), (63, 0), (40, 0), (87, 0)]  # randint(0, 128) of each seeded generator
    assert crops == [choose_view(item, sample_rng(3, 1, i), rand).crop for i in range(200)]
    assert {c[1] for c in crops} == {0} and min(c[0] for c in crops) >= 0 and max(c[0] for c in crops) <= 128
    assert len({c[0] for c in crops}) > 50
    left = crops[0][0]
    random_pixels = render_view(item, choose_view(item, sample_rng(3, 1, 0), rand))
    assert torch.equal(random_pixels, from_pil(resized.crop((left, 0, left + 128, 128)))[0])

    # an odd excess: 210 x 100 goes to 192 x 64 (aspect 3 is nearer than 1), scaled to 192 x 91; the 27
    # extra rows are trimmed 13 above and 14 below, as kohya's excess // 2
    (tmp_path / "odd").mkdir()
    halves(tmp_path / "odd" / "odd.png", 210, 100)
    text(tmp_path / "odd" / "odd.txt", "x")
    (odd,) = scan_dataset(tmp_path / "odd", SMALL).items
    pixels, view = load_sample(odd, random.Random(0), SMALL)
    assert (view.bucket, view.resized, view.crop) == ((192, 64), (192, 91), (0, 13))
    resized = Image.open(odd.path).convert("RGB").resize((192, 91), Image.LANCZOS)
    assert torch.equal(pixels, from_pil(resized.crop((0, 13, 192, 77)))[0])


def test_exif_orientation_swaps_the_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 80 x 40 shows as 40 x 80
    Image.new("RGB", (80, 40), (10, 20, 30)).save(tmp_path / "r.jpg", exif=exif)
    text(tmp_path / "r.txt", "x")
    (item,) = scan_dataset(tmp_path, SMALL).items
    assert item.size == (40, 80) and item.bucket == (64, 192)
    assert render_view(item, choose_view(item, random.Random(0), SMALL)).shape == (3, 192, 64)


# ------------------------------------------------------------------------------------------------ captions


def captioned(caption: str, tmp_path: Path):
    image(tmp_path / "a.png")
    text(tmp_path / "a.txt", caption)
    return scan_dataset(tmp_path).items[0]


def test_tag_shuffle_keep_and_dropout(tmp_path):
    item = captioned("sks, red hat, blue coat, smiling, outdoors", tmp_path)
    config = DatasetConfig(shuffle_tags=True, keep_tokens=1)
    outputs = [caption_for(item, sample_rng(1, 0, i), config) for i in range(3)]
    assert outputs == [
        "sks, smiling, red hat, blue coat, outdoors",
        "sks, smiling, blue coat, outdoors, red hat",
        "sks, outdoors, red hat, blue coat, smiling",
    ]
    many = [caption_for(item, sample_rng(2, 0, i), config).split(", ") for i in range(300)]
    assert all(tags[0] == "sks" for tags in many)  # the kept tag stays first
    assert all(sorted(tags) == sorted(item.captions[0].split(", ")) for tags in many)
    assert len({tuple(t) for t in many}) == 24  # the other 4 tags take all 4! orders
    # the check can fail: without keep_tokens the first tag moves
    unkept = DatasetConfig(shuffle_tags=True)
    assert any(caption_for(item, sample_rng(2, 0, i), unkept).split(", ")[0] != "sks" for i in range(20))

    drop = DatasetConfig(tag_dropout_rate=0.5, keep_tokens=2)
    outputs = [caption_for(item, sample_rng(4, 0, i), drop) for i in range(3)]
    # draws per later tag (dropped below 0.5): .692 .483 .482 | .850 .168 .344 | .134 .322 .558
    assert outputs == ["sks, red hat, blue coat", "sks, red hat, blue coat", "sks, red hat, outdoors"]
    kept = [caption_for(item, sample_rng(4, 0, i), drop) for i in range(300)]
    assert all(c.startswith("sks, red hat") for c in kept)
    assert 0.4 < np.mean([c.count(",") - 1 for c in kept]) / 3 < 0.6  # each other tag kept half the time


def test_caption_dropout(tmp_path):
    item = captioned("a, b, c", tmp_path)
    assert caption_for(item, random.Random(0), DatasetConfig()) == "a, b, c"  # untouched: no tag processing
    config = DatasetConfig(caption_dropout_rate=0.25, shuffle_tags=True)
    outputs = [caption_for(item, sample_rng(0, 0, i), config) for i in range(6)]
    # first draws .174 .325 .953 .905 .607 .083: the first and last fall below 0.25
    assert outputs == ["", "c, a, b", "b, c, a", "a, c, b", "b, a, c", ""]
    rate = np.mean([caption_for(item, sample_rng(9, 0, i), config) == "" for i in range(2000)])
    assert 0.22 < rate < 0.28
    templated = DatasetConfig(caption_dropout_rate=1.0, template=("[filewords] by [name]",), name="x")
    assert caption_for(item, random.Random(0), templated) == ""  # the whole prompt goes, template too


# ------------------------------------------------------------------------------------------------ batches


def test_batches_one_bucket_each_and_reproducible(tmp_path):
    for i, (w, h) in enumerate([(64, 64), (64, 64), (64, 64), (200, 70), (200, 70), (70, 200)]):
        image(tmp_path / "3_thing" / f"{i}.png", w, h, seed=i)
    image(tmp_path / "solo.png", 64, 64, seed=9)
    text(tmp_path / "solo.txt", "solo")
    ds = scan_dataset(tmp_path, SMALL)
    assert ds.bucket_counts() == {(64, 192): 3, (128, 128): 10, (192, 64): 6}
    epoch = batches(ds, 4, seed=7, epoch=0)
    assert all(len({ds.items[i].bucket for i in b.items}) == 1 for b in epoch)
    assert all(ds.items[b.items[0]].bucket == b.bucket for b in epoch)
    assert sorted(len(b.items) for b in epoch) == [2, 2, 3, 4, 4, 4]  # 10 = 4 + 4 + 2, 6 = 4 + 2, 3
    counts = Counter(i for b in epoch for i in b.items)
    assert counts == {i: item.repeats for i, item in enumerate(ds.items)}
    assert batches(ds, 4, seed=7, epoch=0) == epoch
    assert batches(ds, 4, seed=7, epoch=1) != epoch
    assert batches(ds, 4, seed=8, epoch=0) != epoch
    with pytest.raises(SdStudioError, match="batch size"):
        batches(ds, 0, 0, 0)


# ------------------------------------------------------------------------------------------------ bad files


def test_bad_files_are_named_and_skipped(tmp_path):
    image(tmp_path / "good.png", seed=1)
    text(tmp_path / "good.txt", "good")
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    data = image(tmp_path / "src.png", 64, 64, seed=2).read_bytes()
    (tmp_path / "src.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    jpeg = image(tmp_path / "j.jpg", 64, 64, seed=3).read_bytes()
    (tmp_path / "j.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    image(tmp_path / "anim.gif", fmt="GIF")
    image(tmp_path / "nocaption.png", seed=4)
    image(tmp_path / "blank.png", seed=5)
    text(tmp_path / "blank.txt", "\n  \n")
    image(tmp_path / "latin1.png", seed=6)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name in ("noise", "truncated", "empty", "anim"):  # captioned: skipped for the image itself
        text(tmp_path / f"{name}.txt", "a caption")

    ds = scan_dataset(tmp_path)
    assert [i.name for i in ds.items] == ["good.png"]
    reasons = {s.name: s.reason for s in ds.skipped}
    assert set(reasons) == {
        "anim.gif", "blank.png", "empty.png", "latin1.png", "nocaption.png", "noise.png", "truncated.jpg",
        "truncated.png",
    }  # fmt: skip
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["noise.png"].startswith("not an image Pillow can read")
    assert reasons["truncated.png"].startswith("corrupt or truncated image")
    assert reasons["truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["anim.gif"] == "unsupported image format .gif; convert it to PNG, JPEG, WebP or BMP"
    assert reasons["nocaption.png"].startswith("no caption (looked for nocaption.txt, nocaption.caption)")
    assert reasons["blank.png"] == "its caption file blank.txt is empty"
    assert reasons["latin1.png"] == "its caption file is not UTF-8 text; save it as UTF-8"

    # without verification a truncated file passes the scan (only its header is read)
    names = [i.name for i in scan_dataset(tmp_path, DatasetConfig(verify=False)).items]
    assert "truncated.png" in names

    # nothing usable: one clear error at the end, not halfway
    (tmp_path / "good.png").unlink()
    with pytest.raises(SdStudioError, match=r"no usable images \(8 files left out; first: "):
        scan_dataset(tmp_path)
    with pytest.raises(SdStudioError, match="no such dataset folder"):
        scan_dataset(tmp_path / "missing")


def test_config_errors_are_one_line():
    for kwargs, pattern in [
        ({"bucket_step": 60}, "multiple of 8"),
        ({"bucket_min": 300}, "multiples of the step"),
        ({"resolution": 2048}, "max >= the resolution"),
        ({"crop": "middle"}, "choose center or random"),
        ({"caption_dropout_rate": 1.5}, "between 0 and 1"),
        ({"caption_extensions": ("txt",)}, "start with a dot"),
        ({"filename_regex": "("}, "not a valid regular expression"),
    ]:
        with pytest.raises(SdStudioError, match=pattern) as info:
            DatasetConfig(**kwargs)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ latents


@pytest.fixture(scope="module")
def vaes():
    return random_model(PRESETS["tiny"], seed=0).vae, random_model(PRESETS["tiny"], seed=1).vae


class EncoderCalls:
    """Counts encoder forward calls with a hook (no patching)."""

    def __init__(self, vae):
        self.calls = 0
        self.handle = vae.encoder.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.calls += 1


def epoch_latents(ds, cache, vae, flip_config=None):
    config = flip_config or ds.config
    out = {}
    for b, batch in enumerate(batches(ds, 2, seed=0, epoch=0)):
        items = [ds.items[i] for i in batch.items]
        views = [choose_view(item, sample_rng(0, 0, b, s), config) for s, item in enumerate(items)]
        post = cache.latents(items, views, vae)
        for item, view, mean in zip(items, views, post.mean):
            out[(item.name, view)] = mean
    return out


def test_latent_cache_hits_misses_and_damage(tmp_path, vaes):
    vae, other = vaes
    data = tmp_path / "data"
    for i, (w, h) in enumerate([(64, 64), (48, 64), (64, 24)]):
        image(data / f"{i}.png", w, h, seed=i)
        text(data / f"{i}.txt", f"image {i}")
    config = DatasetConfig(resolution=64, bucket_min=32, bucket_max=128, bucket_step=32)
    ds = scan_dataset(data, config)
    assert [i.bucket for i in ds.items] == [(64, 64), (64, 64), (96, 32)]
    folder = tmp_path / "cache"
    key = vae_hash(vae)
    assert key == vae_hash(vae) and key != vae_hash(other)

    calls = EncoderCalls(vae)
    first = LatentCache(folder, key)
    run1 = epoch_latents(ds, first, vae)
    assert (first.misses, first.hits, calls.calls) == (3, 0, 2)  # two batches: one per bucket
    assert not list(folder.rglob("*.tmp"))  # atomic writes leave no temp files

    # the cached posterior is the VAE's, as generation encodes images (untiled posterior mean)
    item = ds.items[2]
    view = choose_view(item, random.Random(0), config)
    mean = encode_mean(vae, render_view(item, view)[None], tiled=False)
    assert mean.shape == (1, 4, 16, 48)
    assert torch.equal(run1[(item.name, view)], mean[0])
    flipped = View(view.bucket, view.resized, view.crop, True)
    assert not torch.allclose(encode_mean(vae, render_view(item, flipped)[None], tiled=False), mean)

    # a second run (a new cache object on the same folder) encodes nothing and gets the same latents
    calls.calls = 0
    second = LatentCache(folder, key)
    run2 = epoch_latents(ds, second, vae)
    assert (second.misses, second.hits, calls.calls) == (0, 3, 0)
    assert all(torch.equal(run1[k], run2[k]) for k in run1)

    # another VAE misses everything
    other_cache = LatentCache(folder, vae_hash(other))
    epoch_latents(ds, other_cache, other)
    assert (other_cache.misses, other_cache.hits) == (3, 0)

    # flips are other latents, cached apart
    flip = DatasetConfig(resolution=64, bucket_min=32, bucket_max=128, bucket_step=32, flip=True)
    flips = LatentCache(folder, key)
    epoch_latents(ds, flips, vae, flip)
    assert flips.misses == 1 and flips.hits == 2  # seed 0 flips one of the three samples

    # a changed image misses; the stale scan refuses to render it
    image(data / "1.png", 48, 64, seed=42)
    with pytest.raises(SdStudioError, match="changed since the dataset was scanned"):
        render_view(ds.items[1], choose_view(ds.items[1], random.Random(0), config))
    rescanned = scan_dataset(data, config)
    again = LatentCache(folder, key)
    epoch_latents(rescanned, again, vae)
    assert (again.misses, again.hits) == (1, 2)

    # a damaged file is reported, encoded again and rewritten
    item = rescanned.items[0]
    view = choose_view(item, random.Random(0), config)
    path = again.path(item.sha256, view)
    good = path.read_bytes()
    for damage in (good[: len(good) // 2], b"garbage", good.replace(b"image", b"imagE", 1)):
        path.write_bytes(damage)
        fixed = LatentCache(folder, key)
        calls.calls = 0
        post = fixed.latents([item], [view], vae)
        assert (fixed.misses, fixed.damaged, calls.calls) == (1, 1, 1)
        torch.testing.assert_close(post.mean, run1[(item.name, view)][None], rtol=0, atol=1e-5)  # batch of 1
        assert LatentCache(folder, key).load(item.sha256, view, 2) is not None
    calls.handle.remove()
