"""``sdstudio eval images`` on folders of toy-world renders: the same distribution scores near 0, a shifted
one clearly higher; folder reading, prompts, the JSON report and the errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.cli_eval import add_eval_commands, fake_prompts
from sdstudio.errors import SdStudioError
from sdstudio.eval.features import image_files, read_folder
from sdstudio.toyworld.world import render, sample_scene

N = 300  # images per folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers())
    return parser


def run(*argv: str) -> int:
    args = _parser().parse_args(["images", *argv])
    return args.func(args)


def write_renders(folder: Path, seed: int, n: int = N, shift: str | None = None) -> Path:
    """``n`` toy scenes (one or two objects) as PNGs. ``shift``: ``gray`` (every background gray) or
    ``bgr`` (colour channels swapped)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, "train", 1 + i % 2)
        if shift == "gray":
            scene = dataclasses.replace(scene, background="gray")
        image = render(scene)
        if shift == "bgr":
            image = np.ascontiguousarray(image[..., ::-1])
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    return {
        "real": write_renders(root / "real", seed=1),
        "same": write_renders(root / "same", seed=2),
        "gray": write_renders(root / "gray", seed=3, shift="gray"),
        "bgr": write_renders(root / "bgr", seed=4, shift="bgr"),
    }


SUMMARY = re.compile(r"^FID (\S+)  KID (\S+) ± (\S+)  precision (\S+) recall (\S+)$")


def test_same_distribution_near_zero_shifted_clearly_higher(
    toy: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for name in ("same", "gray", "bgr"):
        out = tmp_path / f"{name}.json"
        assert run("--real", str(toy["real"]), "--fake", str(toy[name]), "--kid-subset-size", "150",
                   "--json", str(out)) == 0  # fmt: skip
        line = capsys.readouterr().out.strip()
        assert SUMMARY.match(line), line
        results[name] = json.loads(out.read_text())
    same = results["same"]
    assert (same["n_real"], same["n_fake"], same["features"], same["feature_dim"]) == (N, N, "toyworld", 128)
    assert (same["kid_subsets"], same["kid_subset_size"], same["pr_k"]) == (100, 150, 3)
    # Measured (toy image encoder, 300 vs 300): same distribution FID 10.8, KID -0.008 ± 0.056,
    # precision 0.95 recall 0.92; gray backgrounds FID 61.9, KID 1.10 ± 0.12, recall 0.63; swapped
    # channels FID 58.3, KID 2.08 ± 0.37, recall 0.76. (FID's floor is its bias at 300 images.)
    assert 0 <= same["fid"] < 20
    assert abs(same["kid_mean"]) <= same["kid_std"]
    assert same["precision"] > 0.85 and same["recall"] > 0.85
    for name in ("gray", "bgr"):
        shifted = results[name]
        assert shifted["fid"] > 40 and shifted["fid"] > 4 * same["fid"], name
        assert shifted["kid_mean"] > 3 * shifted["kid_std"] and shifted["kid_mean"] > 10 * same["kid_std"], (
            name
        )
        assert shifted["recall"] < same["recall"] - 0.1, name


def test_json_is_not_overwritten_without_flag(toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("keep")
    argv = ["--real", str(toy["real"]), "--fake", str(toy["same"]), "--metrics", "fid", "--json", str(out)]
    with pytest.raises(SdStudioError, match="already exists; pass --overwrite"):
        run(*argv)
    assert out.read_text() == "keep"
    assert run(*argv, "--overwrite") == 0
    data = json.loads(out.read_text())
    assert data["fid"] > 0 and data["kid_mean"] is None and data["precision"] is None


def test_folder_reading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(folder / "b.png")
    Image.new("L", (5, 5), 200).save(folder / "a.JPG")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "c.webp", lossless=True)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        got = read_folder(folder)
    assert [p.name for p in got.paths] == ["a.JPG", "b.png", "c.webp"]
    assert [p.name for p in got.skipped] == ["broken.png"] and "broken.png: cannot read" in caplog.text
    assert [im.shape for im in got.images] == [(5, 5, 3), (6, 8, 3), (4, 4, 3)]
    assert got.images[0][0, 0].tolist() == [200, 200, 200] and got.images[1][0, 0].tolist() == [10, 20, 30]
    assert got.sizes == {(5, 5), (8, 6), (4, 4)}

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("")
    with pytest.raises(SdStudioError, match="no image files"):
        read_folder(empty)
    (empty / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(SdStudioError, match="none of its 1 image files could be read"):
        read_folder(empty)
    with pytest.raises(SdStudioError, match="no such folder"):
        read_folder(tmp_path / "missing")


def test_mixed_sizes_are_resized_and_said_once(toy: dict[str, Path], tmp_path: Path, caplog) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    for i, path in enumerate(sorted(toy["same"].iterdir())[:20]):
        image = Image.open(path)
        (image.resize((96, 96), Image.LANCZOS) if i % 2 else image).save(fake / path.name)
    with caplog.at_level(logging.INFO):
        assert run("--real", str(toy["real"]), "--fake", str(fake), "--metrics", "fid,precision-recall") == 0
    notes = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    want = "images of 2 size(s) (64x64, 96x96) are resized to 64x64 by PIL Lanczos (the encoder saw 64x64 renders only)"
    assert notes == [want]


def test_kid_subset_size_defaults_to_the_smaller_folder(toy: dict[str, Path], tmp_path: Path, caplog) -> None:
    out = tmp_path / "k.json"
    with caplog.at_level(logging.WARNING):
        run("--real", str(toy["real"]), "--fake", str(toy["same"]), "--metrics", "kid", "--kid-subsets", "5",
            "--json", str(out))  # fmt: skip
    assert json.loads(out.read_text())["kid_subset_size"] == N and "subsets of 300 images" in caplog.text
    with pytest.raises(
        SdStudioError, match="--kid-subset-size 301: needs at least 301 images in each folder"
    ):
        run(
            "--real",
            str(toy["real"]),
            "--fake",
            str(toy["same"]),
            "--metrics",
            "kid",
            "--kid-subset-size",
            "301",
        )


def test_argument_errors(toy: dict[str, Path]) -> None:
    both = ["--real", str(toy["real"]), "--fake", str(toy["same"])]
    with pytest.raises(SdStudioError, match="choose from fid,kid,precision-recall,clip-score"):
        run(*both, "--metrics", "fid,is")
    with pytest.raises(SdStudioError, match="--features inception needs its weights file"):
        run(*both, "--features", "inception")
    with pytest.raises(SdStudioError, match="expected inception FILE, clip FILE or toyworld"):
        run(*both, "--features", "vgg", "x", "y")
    with pytest.raises(SdStudioError, match="clip-score needs a CLIP model: --clip FILE"):
        run(*both, "--metrics", "clip-score")
    with pytest.raises(
        SdStudioError, match=r"needs the prompt of every fake image: 300 of 300 have no \.txt"
    ):
        run(*both, "--metrics", "clip-score", "--clip", "clip.safetensors")


def test_prompts_from_file_or_beside_images(tmp_path: Path) -> None:
    folder = tmp_path / "fake"
    folder.mkdir()
    for name in ("b.png", "a.png", "c.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    (folder / "b.png").write_bytes(b"broken")  # skipped: its prompt line is dropped
    got = read_folder(folder)
    lines = tmp_path / "prompts.txt"
    lines.write_text("first\nsecond\nthird\n\n")
    assert fake_prompts(got.paths, image_files(folder), str(lines)) == ["first", "third"]
    lines.write_text("first\nsecond\n")
    with pytest.raises(SdStudioError, match="2 prompt lines for 3 fake images"):
        fake_prompts(got.paths, image_files(folder), str(lines))
    (folder / "a.txt").write_text("a red circle\n")
    with pytest.raises(SdStudioError, match=r"1 of 2 have no \.txt beside them \(e\.g\. .*c\.txt\)"):
        fake_prompts(got.paths, image_files(folder), None)
    (folder / "c.txt").write_text("a blue star")
    assert fake_prompts(got.paths, image_files(folder), None) == ["a red circle", "a blue star"]


class _FakeClip:
    """Stands in for ``sdstudio.models.clip_vision``'s model: an image embeds as its mean colour, a prompt
    as the colour it names."""

    COLOURS: ClassVar[dict[str, tuple[float, float, float]]] = {
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
    }

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.tensor(np.stack([im.reshape(-1, 3).mean(0) for im in images]), dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.COLOURS[t.split()[-1]] for t in texts])


def test_clip_score_plumbing_with_a_stand_in_model(tmp_path: Path, monkeypatch, capsys) -> None:
    module = types.ModuleType("sdstudio.models.clip_vision")
    module.load_clip = lambda path: _FakeClip()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sdstudio.models.clip_vision", module)
    (tmp_path / "clip.safetensors").write_bytes(b"")
    fake = tmp_path / "fake"
    fake.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(fake / "0.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(fake / "1.png")
    (tmp_path / "prompts.txt").write_text("pure red\npure green\n")
    out = tmp_path / "c.json"
    assert run("--real", str(fake), "--fake", str(fake), "--metrics", "clip-score", "--clip",
               str(tmp_path / "clip.safetensors"), "--prompts", str(tmp_path / "prompts.txt"),
               "--json", str(out)) == 0  # fmt: skip
    # red image vs "red": cos 1 -> 100; blue image vs "green": cos 0 -> 0
    assert capsys.readouterr().out.strip() == "CLIP score 50.00"
    assert json.loads(out.read_text())["clip_score"] == pytest.approx(50.0)


def test_inception_features_through_the_command(tmp_path: Path, caplog, capsys) -> None:
    from sdstudio.eval.features import inception_extractor
    from sdstudio.eval.inception import FidInceptionV3, load_inception

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(FidInceptionV3().state_dict(), weights)  # random (default-initialised) weights
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir()
    fake.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32) if i % 2 else (40, 48), dtype=np.uint8)).convert(
            "RGB"
        ).save(real / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(fake / f"{i}.png")

    # mixed sizes are batched by size, in order: the same features as one image at a time
    images = [*read_folder(real).images, read_folder(fake).images[0]]
    model = load_inception(weights)
    with torch.no_grad():
        one_by_one = torch.cat([model(torch.tensor(im).permute(2, 0, 1)[None]) for im in images])
    np.testing.assert_allclose(
        inception_extractor(weights).encode(images), one_by_one.double().numpy(), atol=1e-5
    )

    out = tmp_path / "i.json"
    with caplog.at_level(logging.WARNING):
        assert run("--real", str(real), "--fake", str(fake), "--features", "inception", str(weights),
                   "--metrics", "kid", "--kid-subset-size", "2", "--json", str(out)) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert (data["features"], data["feature_dim"], data["features_file"]) == ("inception", 2048, str(weights))
    assert data["resize"].startswith(
        "images of 2 size(s) (32x32, 48x40) are resized to 299x299 by TensorFlow 1.x"
    )
    assert caplog.text.count("resized to 299x299") == 1
    assert re.match(r"^KID \S+ ± \S+$", capsys.readouterr().out.strip())


def test_wrong_toy_encoder_file_is_one_line(toy: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "enc.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SdStudioError, match="enc.safetensors: not a toy image encoder") as e:
        run("--real", str(toy["real"]), "--fake", str(toy["same"]), "--features", "toyworld",
            str(tmp_path / "enc.safetensors"))  # fmt: skip
    assert "\n" not in str(e.value)
