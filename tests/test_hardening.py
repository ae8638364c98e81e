"""Bad input is refused before any work, in one line, and nothing is written: the cases of issue 20.

Most cases run ``sdstudio generate`` with ``--model`` pointing at a file that is *not* a checkpoint: a
request refused with its own message (not the model file's) was refused before the model loaded."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import main

TOY_PROMPT = "a large red circle in the top left, teal background"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["checkpoint", "random", "--arch", "tiny", "--seed", "3", "-o", str(path)]) == 0
    return path


@pytest.fixture
def not_a_model(tmp_path):
    """A --model that fails to load: an error about anything else proves the model was never read."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    return path


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("sdstudio: error: "), err
    return err[0]


def refused_before_loading(capsys, tmp_path, model, *extra):
    """The error line for ``generate`` with ``extra``; checks it is quick, not about the model, and that
    nothing was written."""
    out = tmp_path / "out" / "o.png"
    start = time.perf_counter()
    line = run_error(capsys, ["generate", "x", "--model", str(model), "-o", str(out), "-q", *extra])
    assert time.perf_counter() - start < 5
    assert "broken.safetensors" not in line, line
    assert not (tmp_path / "out").exists()
    return line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "100000", "--height", "100000"], r"size 100000x100000 is 10000000000 pixels, over the limit of 4194304 .*--max-pixels"),
        (["--width", "100000", "--height", "64"], r"size 100000x64 is 6400000 pixels, over the limit .*--max-pixels"),
        (["--steps", "100000"], r"steps must be a whole number between 1 and 1000 \(got 100000\)"),
        (["--hires-scale", "100"], r"hires scale \(--hires-scale\) must be a finite number between more than 0 and 16"),
        (["--hires-scale", "0"], r"hires scale \(--hires-scale\) must be a finite number between more than 0 and 16"),
        (["--hires-scale", "nan"], r"hires scale .* \(got nan\)"),
        (["--scheduler", "Nope"], r"unknown schedule type 'Nope'; valid names: Automatic, Uniform, Karras"),
        (["--sampler", "DPM++ 2M Nope"], r"unknown sampler 'DPM\+\+ 2M Nope'"),
        (["--cfg", "nan"], r"CFG scale \(--cfg\) must be a finite number between 0 and 100 \(got nan\)"),
        (["--cfg", "inf"], r"CFG scale \(--cfg\) must be a finite number between 0 and 100 \(got inf\)"),
        (["--cfg", "-1"], r"CFG scale \(--cfg\) must be a finite number"),
        (["--eta", "-1"], r"eta must be a finite number between 0 and 1 \(got -1.0\)"),
        (["--eta", "inf"], r"eta must be a finite number between 0 and 1"),
        (["--upscale", "0"], r"--upscale must be a whole number between 1 and 8 \(got 0\)"),
        (["--batch", "0"], r"batch size must be a whole number between 1 and 64"),
        (["--batch", "1000"], r"batch size must be a whole number between 1 and 64 \(got 1000\)"),
        (["--subseed-strength", "nan"], r"variation seed strength \(--subseed-strength\) must be a finite number"),
        (["--tome", "nan"], r"token merging ratio must be between 0 and 0.75"),
        (["--ngms", "inf"], r"NGMS .* must be a finite number >= 0"),
        (["--seed", str(2**40)], r"seed \(-1: random\) must be a whole number between"),
        (["--precision", "fp8"], r"unknown precision 'fp8'; choose one of: auto, fp32, bf16, fp16"),
        (["--device", "tpu"], r"unknown device 'tpu'"),
        (["--hires-scale", "2", "--hires-upscaler", "ESRGAN"], r"unknown hires upscaler 'ESRGAN'; choose one of: Latent"),
        (["--max-pixels", "0"], r"max-pixels must be a whole number >= 1"),
        (["--threads", "0"], r"threads"),
        (["--embeddings", "/nonexistent/folder"], r"embeddings folder does not exist"),
    ],
)
def test_impossible_requests_are_refused_before_the_model_loads(tmp_path, not_a_model, capsys, extra, message):
    line = refused_before_loading(capsys, tmp_path, not_a_model, *extra)
    assert re.search(message, line), line


def test_hires_size_over_the_cap_is_refused_once_the_size_is_known(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "o.png"
    argv = ["generate", "x", "--model", str(tiny_ckpt), "--width", "512", "--height", "512", "--hires-scale", "8",
            "-o", str(out), "-q"]  # fmt: skip
    line = run_error(capsys, argv)
    assert "hires size 4096x4096 is 16777216 pixels, over the limit of 4194304" in line and "--max-pixels" in line
    assert not out.exists()
    # the cap is the operator's to raise; then the (tiny) request runs
    argv = ["generate", "x", "--model", str(tiny_ckpt), "--width", "64", "--height", "64", "--hires-scale", "2",
            "--steps", "1", "--max-pixels", "16384", "-o", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(out).size == (128, 128)
    line = run_error(capsys, [*argv[:-3], "--max-pixels", "16383", "-o", str(tmp_path / "p.png"), "-q"])
    assert "hires size 128x128 is 16384 pixels, over the limit of 16383" in line


@pytest.mark.parametrize("case", ["file-in-the-way", "folder-as-file", "no-permission", "outdir-is-file"])
def test_unwritable_outputs_are_found_before_generating(tmp_path, not_a_model, capsys, case):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file where a folder is needed")
    (tmp_path / "adir.png").mkdir()
    if case == "no-permission" and os.access("/sys", os.W_OK) and not os.path.exists("/sys/kernel"):
        pytest.skip("/sys is writable here")
    target = {
        "file-in-the-way": ["-o", str(blocker / "sub" / "o.png")],
        "folder-as-file": ["-o", str(tmp_path / "adir.png")],
        "no-permission": ["-o", "/sys/sdstudio-test.png"],
        "outdir-is-file": ["--outdir", str(blocker)],
    }[case]
    line = run_error(capsys, ["generate", "x", "--model", str(not_a_model), "-q", *target])
    assert "broken.safetensors" not in line, line  # refused before the model was read
    expected = {
        "file-in-the-way": f"{blocker}: is a file, not a folder; cannot write the output image",
        "folder-as-file": f"{tmp_path / 'adir.png'}: is a folder; give a file name",
        "no-permission": "/sys: cannot write the output image /sys/sdstudio-test.png there (Permission denied)",
        "outdir-is-file": f"{blocker}: exists and is not a folder; pass another --outdir",
    }[case]
    assert expected in line, line
    assert ".tmp" not in line and "File exists" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "blocker.txt", "broken.safetensors"]
    assert not list((tmp_path / "adir.png").iterdir())


def test_replaying_an_inpainting_png_asks_for_its_mask(tmp_path, tiny_ckpt, capsys):
    init = tmp_path / "init.png"
    Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    made = tmp_path / "inpainted.png"
    assert main(["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--seed", "1", "--init-image", str(init),
                 "--mask", str(mask), "-o", str(made), "-q"]) == 0  # fmt: skip
    replay = ["generate", "--from-png", str(made), "--model", str(tiny_ckpt), "-q"]
    line = run_error(capsys, [*replay, "--init-image", str(init), "-o", str(tmp_path / "r.png")])
    assert "inpainted.png was made by inpainting" in line and "pass its mask with --mask" in line
    line = run_error(capsys, [*replay, "-o", str(tmp_path / "r.png")])
    assert "pass --init-image and --mask" in line
    assert not (tmp_path / "r.png").exists()
    assert main([*replay, "--init-image", str(init), "--mask", str(mask), "-o", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").tobytes() == Image.open(made).tobytes()
    # outpainting without a mask replays without one
    wide = tmp_path / "wide.png"
    assert main(["generate", "x", "--model", str(tiny_ckpt), "--steps", "2", "--seed", "1", "--init-image", str(init),
                 "--outpaint", "left:8", "-o", str(wide), "-q"]) == 0  # fmt: skip
    again = tmp_path / "wide-again.png"
    assert main(["generate", "--from-png", str(wide), "--model", str(tiny_ckpt), "--init-image", str(init),
                 "-o", str(again), "-q"]) == 0  # fmt: skip
    assert Image.open(again).tobytes() == Image.open(wide).tobytes()


def _closed_stdout(argv):
    """Run ``sdstudio ARGV`` with its stdout's reader gone before it writes (as ``| head`` leaves it)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sdstudio.cli", *argv], stdout=write, stderr=subprocess.PIPE, timeout=120, check=False
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr.decode()


def test_a_closed_stdout_ends_quietly_with_status_0():
    code, err = _closed_stdout(["prompt", "a (red:1.2) circle, [teal:grey:5] background"])
    assert (code, err) == (0, "")


def test_generate_writes_every_image_before_printing_their_names(tmp_path, tiny_ckpt):
    code, err = _closed_stdout(["generate", "x", "--model", str(tiny_ckpt), "--steps", "1", "--seed", "4",
                                "--batch", "3", "--outdir", str(tmp_path), "-q"])  # fmt: skip
    assert (code, err) == (0, "")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-4.png", "00001-5.png", "00002-6.png"]


def test_generate_help_lists_every_word_the_embedded_model_learned(capsys):
    from sdstudio.cli import embedded_model_path
    from sdstudio.models.loading import load_state

    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"[a-z]+", text.split("The embedded model")[1].split("Examples:")[0]))
    stored, _, _ = load_state(embedded_model_path())
    assert stored is not None and stored.trained_on.sizes == ((64, 64),)
    assert set(stored.trained_on.vocabulary) <= listed
    assert "hexagon" not in listed and "pink" not in listed


def test_inductor_cache_is_this_test_runs_own():
    """A run killed mid-compile must not leave a broken cache entry for the next run (a 0-byte .so once
    failed every later run): torch.compile writes under this session's temporary folder."""
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir().startswith(os.path.join(tempfile.gettempdir(), "sdstudio-tests-"))


def test_the_embedded_model_warns_about_words_and_sizes_it_never_learned():
    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import Pipeline
    from sdstudio.types import GenerationRequest, Hires

    pipe = Pipeline.from_file(embedded_model_path())
    quiet = pipe(GenerationRequest(TOY_PROMPT, steps=1, seed=1)).warnings
    assert not [w for w in quiet if "trained" in w]
    warned = pipe(GenerationRequest("a photo of a cat, (pink:1.2) hexagon", steps=1, seed=1, width=128)).warnings
    assert (
        "the model was trained on a fixed vocabulary; unknown words: photo, cat, pink, hexagon "
        "(see `sdstudio generate --help` for its words)"
    ) in warned
    assert "the model was trained at 64x64 only; at 128x64 it may repeat or break objects" in warned
    hires = pipe(GenerationRequest(TOY_PROMPT, steps=1, seed=1, hires=Hires(scale=2.0, steps=1))).warnings
    assert "the model was trained at 64x64 only; the hires fix pass at 128x128 may repeat or break objects" in hires


def test_a_request_that_cannot_fit_in_memory_is_refused_quickly(tmp_path, tiny_ckpt, capsys):
    """With the pixel cap raised, the memory estimate refuses what would have been OOM-killed."""
    out = tmp_path / "o.png"
    start = time.perf_counter()
    line = run_error(capsys, ["generate", "x", "--model", str(tiny_ckpt), "--width", "100000", "--height", "100000",
                              "--max-pixels", str(10**10), "-o", str(out), "-q"])  # fmt: skip
    assert time.perf_counter() - start < 10
    assert re.search(r"this request needs about [\d.]+ GiB, [\d.]+ GiB available; try ", line), line
    assert not out.exists()
