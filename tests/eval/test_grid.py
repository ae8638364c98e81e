"""X/Y/Z plot and prompt matrix: value syntax, the plan's cells and order, and grids drawn from the ordinary
generation path (each cell equals a plain `generate` of its request), with A1111's grid infotext."""

import argparse
import dataclasses
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.cli import embedded_model_path, main, run
from sdstudio.cli_grid import add_grid_commands
from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.eval.grid import (
    FileLookup,
    GridSpec,
    check_plan,
    check_spec,
    fix_seeds,
    generate_cells,
    matrix_prompts,
    parse_axis,
    plan_grid,
    plan_prompt_matrix,
    split_values,
)
from sdstudio.io.infotext import parse_infotext
from sdstudio.prompt.styles import PromptStyle
from sdstudio.types import GenerationRequest, InitImage

TOY = ["--steps", "4", "--device", "cpu", "--precision", "fp32", "-q"]
FAST = [*TOY, "--steps", "2"]  # the 3x3 grid and its 9 reference images: 2 steps each


@pytest.fixture(autouse=True)
def one_thread():
    """The toy model's 64x64 images are fastest on one thread, and stay so when other processes keep the
    cores busy (two threads then wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def grid_main(argv):
    """`sdstudio grid ...` through the CLI's error handling, with only the grid command wired."""
    parser = argparse.ArgumentParser(prog="sdstudio")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_grid_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def grid_error(capsys, argv):
    code = grid_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdstudio: error: "), err
    return err[0]


def test_split_values_is_csv():
    assert split_values('"a, b", c') == ["a, b", "c"]
    assert split_values('c, "a, b" ,d') == ["c", "a, b", "d"]
    assert split_values("Euler a,DPM++ 2M") == ["Euler a", "DPM++ 2M"]


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("Steps=1-5", (1, 2, 3, 4, 5)),
        ("Steps=1-10 (+2)", (1, 3, 5, 7, 9)),
        ("Steps=10-1 (-3)", (10, 7, 4, 1)),
        ("Steps=1-10 [5]", (1, 3, 5, 7, 10)),  # evenly spaced, truncated as A1111's int(linspace)
        ("Steps=5, 8-10, 20", (5, 8, 9, 10, 20)),
        ("steps = 3-1", (3, 2, 1)),
        ("Seed=-1, -5--3", (-1, -5, -4, -3)),
        ("CFG Scale=1-3 (+0.5)", (1.0, 1.5, 2.0, 2.5, 3.0)),
        ("CFG Scale=0-1 (+0.25)", (0.0, 0.25, 0.5, 0.75, 1.0)),
        ("CFG Scale=0-1 (+0.1)", tuple(round(i / 10, 8) for i in range(11))),  # no float overshoot to 1.1
        ("CFG Scale=2-4 [3], 7.5", (2.0, 3.0, 4.0, 7.5)),
        ("Denoising=0.2, .5", (0.2, 0.5)),
        ("Sampler=Euler a, DPM++ 2M, DDIM", ("Euler a", "DPM++ 2M", "DDIM")),
        ('Prompt S/R=red, "red, big", 1-3', ("red", "red, big", "1-3")),  # strings are never ranges
        ("Nothing", ("",)),
    ],
)
def test_value_syntax(spec, values):
    axis = parse_axis(spec)
    assert axis.values == values
    assert all(type(v) is type(values[0]) for v in axis.values)
    assert axis.text == spec.partition("=")[2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Bogus=1", "unknown axis type 'Bogus'; choose one of: Nothing, Seed, "),
        ("Steps", "axis 'Steps' is not TYPE=VALUES"),
        ("Steps=1-x", "Steps axis value '1-x': '1-x' is not a whole number or a range"),
        ("Steps=1.5", "Steps axis value '1.5': '1.5' is not a whole number"),
        ("CFG Scale=high", "CFG Scale axis value 'high': 'high' is not a number"),
        ("Steps=1,,2", "Steps axis value '': empty value"),
        (
            "Steps=1-10 (-2)",
            r"Steps axis value '1-10 \(-2\)': range '1-10 \(-2\)': a step of -2 never goes from 1 to 10",
        ),
        ("Steps=1-10 (0)", "has a step of 0"),
        ("Steps=1-10 [0]", "has no values"),
        ("Steps=1-5000", "gives 5000 values, over the limit of 1000"),
        (
            "Checkpoint name=nope",
            "Checkpoint name axis value 'nope': unknown checkpoint 'nope': no such file",
        ),
        ("VAE=nope", "VAE axis value 'nope': unknown VAE 'nope'"),
    ],
)
def test_value_syntax_errors(spec, message):
    with pytest.raises(SdStudioError, match=message):
        parse_axis(spec)


def test_checkpoint_and_vae_lookup(tmp_path):
    for name in ("alpha-v1.safetensors", "beta.ckpt", "notes.txt", "vae-ft-mse.pt"):
        (tmp_path / name).write_bytes(b"")
    files = FileLookup((tmp_path,), (tmp_path,))
    axis = parse_axis(f"Checkpoint name=alpha, beta.ckpt, {tmp_path / 'beta.ckpt'}", files)
    assert [v.path for v in axis.values] == [
        tmp_path / n for n in ("alpha-v1.safetensors", "beta.ckpt", "beta.ckpt")
    ]
    assert [axis.label(v) for v in axis.values] == [
        "alpha",
        "beta.ckpt",
        "beta.ckpt",
    ]  # A1111: file name only
    vae = parse_axis("VAE=None, Automatic, ft-mse", files)
    assert [v.path for v in vae.values] == [None, None, tmp_path / "vae-ft-mse.pt"]
    with pytest.raises(
        SdStudioError, match=r"unknown checkpoint 'notes'.*there: alpha-v1.safetensors, beta.ckpt"
    ):
        parse_axis("Checkpoint name=notes", files)
    (tmp_path / "alpha-v2.safetensors").write_bytes(b"")
    with pytest.raises(SdStudioError, match="matches several files"):
        parse_axis("Checkpoint name=alpha", files)


def test_fix_seeds_resolves_minus_one_once():
    spec = GridSpec(GenerationRequest("a"), x=parse_axis("Seed=-1, 5, -1"), y=parse_axis("Steps=1,2"))
    fixed = fix_seeds(spec, random.Random(0))
    a, five, b = fixed.x.values
    assert five == 5 and a != -1 and b != -1 and a != b
    assert fixed.request.seed not in (-1, a, b) and fixed.request.subseed != -1
    assert fixed.y == spec.y
    plan = plan_grid(fixed)
    assert [c.request.seed for c in plan.in_grid_order()] == [a, 5, b, a, 5, b]  # shared down each column
    assert ("Fixed X Values", f"{a}, 5, {b}") in plan.extra


def test_plan_order_values_and_infotext_fields():
    base = GenerationRequest("a red circle", negative_prompt="red noise", steps=4, seed=1)
    spec = GridSpec(
        base, x=parse_axis("Steps=2,3"), y=parse_axis("Prompt S/R=red,blue"), z=parse_axis("CFG Scale=5,7")
    )
    plan = plan_grid(spec)
    assert (plan.columns, plan.rows, plan.grids) == (2, 2, 2)
    # generation order: z outermost, then y, then x (A1111's order when no axis costs more)
    assert [(c.iz, c.iy, c.ix) for c in plan.cells] == [
        (z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)
    ]
    cells = plan.in_grid_order()
    assert [plan.position(c) for c in cells] == list(range(8))
    assert [(c.request.steps, c.request.prompt, c.request.cfg_scale) for c in cells[:4]] == [
        (2, "a red circle", 5.0), (3, "a red circle", 5.0),
        (2, "a blue circle", 5.0), (3, "a blue circle", 5.0),
    ]  # fmt: skip
    assert cells[3].request.negative_prompt == "blue noise"  # A1111 replaces in both prompts
    assert cells[7].request == dataclasses.replace(base, steps=3, prompt="a blue circle",
                                                   negative_prompt="blue noise", cfg_scale=7.0)  # fmt: skip
    assert [lab[0].text for lab in plan.x_labels] == ["Steps: 2", "Steps: 3"]
    assert [lab[0].text for lab in plan.y_labels] == ["red", "blue"]
    assert [lab[0].text for lab in plan.z_labels] == ["CFG Scale: 5.0", "CFG Scale: 7.0"]
    assert dict(plan.extra) == {
        "Script": "X/Y/Z plot", "X Type": "Steps", "X Values": "2,3", "Y Type": "Prompt S/R",
        "Y Values": "red,blue", "Z Type": "CFG Scale", "Z Values": "5,7",
    }  # fmt: skip


def test_checkpoint_axis_is_outermost_and_styles_apply_last(tmp_path):
    for name in ("one.safetensors", "two.safetensors"):
        (tmp_path / name).write_bytes(b"")
    files = FileLookup((tmp_path,))
    spec = GridSpec(
        GenerationRequest("a cat"), x=parse_axis("Checkpoint name=one,two", files),
        y=parse_axis("Steps=1,2,3"),
        styles=(PromptStyle("s", "{prompt}, red"),),
    )  # fmt: skip
    plan = plan_grid(spec)
    assert [c.checkpoint.name for c in plan.cells] == ["one.safetensors"] * 3 + ["two.safetensors"] * 3
    assert {c.request.prompt for c in plan.cells} == {"a cat, red"}
    assert [c.request.steps for c in plan.cells] == [1, 2, 3, 1, 2, 3]


def test_generate_cells_loads_each_checkpoint_once(tmp_path):
    for name in ("one.safetensors", "two.safetensors"):
        (tmp_path / name).write_bytes(b"")
    files = FileLookup((tmp_path,))
    spec = GridSpec(
        GenerationRequest("a"), x=parse_axis("Steps=1,2,3"), y=parse_axis("Checkpoint name=two,one", files),
        vae=tmp_path / "base-vae.pt",
    )  # fmt: skip
    plan = plan_grid(spec)
    loads, made = [], []

    def load(checkpoint, vae):
        loads.append((checkpoint.name, vae.name))
        return lambda request, limits: (
            made.append((checkpoint.name, request.steps)) or f"{checkpoint.stem}-{request.steps}"
        )

    results = generate_cells(plan, load)
    assert loads == [("two.safetensors", "base-vae.pt"), ("one.safetensors", "base-vae.pt")]
    assert made == [("two.safetensors", s) for s in (1, 2, 3)] + [("one.safetensors", s) for s in (1, 2, 3)]
    assert [results[i] for i in range(6)] == ["two-1", "two-2", "two-3", "one-1", "one-2", "one-3"]


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"x": "Steps=4, 0"}, r"X axis \(Steps\) value '0': steps must be a whole number between 1 and 1000"),
        ({"y": "Sampler=Euler, Nope"}, r"Y axis \(Sampler\) value 'Nope': unknown sampler 'Nope'"),
        (
            {"z": "Prompt S/R=dog, cat"},
            r"Z axis \(Prompt S/R\) value 'dog': Prompt S/R: 'dog' is not in the prompt",
        ),
        ({"x": "Denoising=0.5"}, "the Denoising axis needs an init image"),
        ({"x": "Hires steps=5"}, "the Hires steps axis needs the hires fix"),
        ({"x": "Schedule type=Karras, Sideways"}, "value 'Sideways': unknown schedule type 'Sideways'"),
        ({"x": "Eta=0.5"}, "sampler 'Euler' does not use eta"),
    ],
)
def test_bad_axis_values_are_refused_by_name(axes, message):
    spec = GridSpec(
        GenerationRequest("a circle", sampler="Euler"), **{k: parse_axis(v) for k, v in axes.items()}
    )
    with pytest.raises(SdStudioError, match=message):
        check_spec(spec)
        check_plan(plan_grid(spec))


def test_denoising_axis_sets_init_strength():
    init = InitImage(Image.new("RGB", (64, 64)), 0.75)
    spec = GridSpec(GenerationRequest("a", init=init), x=parse_axis("Denoising=0.25-0.75 [3]"))
    check_spec(spec)
    assert [c.request.init.strength for c in plan_grid(spec).cells] == [0.25, 0.5, 0.75]


def test_prompt_matrix_plan():
    assert matrix_prompts("a cat|red|in snow") == [
        "a cat",
        "a cat, red",
        "a cat, in snow",
        "a cat, red, in snow",
    ]
    plan = plan_prompt_matrix(GenerationRequest("a cat | red | big, | in snow", seed=3))
    assert (plan.columns, plan.rows, len(plan.cells)) == (4, 2, 8)  # first half of the parts across
    prompts = [c.request.prompt for c in plan.in_grid_order()]
    assert prompts[:4] == ["a cat", "a cat, red", "a cat, big", "a cat, red, big"]
    assert prompts[7] == "a cat, red, big, in snow"
    assert {c.request.seed for c in plan.cells} == {3}
    assert [[(line.text, line.active) for line in lab] for lab in plan.x_labels][1] == [
        ("red", True),
        ("big", False),
    ]
    assert [[(line.text, line.active) for line in lab] for lab in plan.y_labels] == [
        [("in snow", False)],
        [("in snow", True)],
    ]
    with pytest.raises(SdStudioError, match="needs optional parts after '|'"):
        plan_prompt_matrix(GenerationRequest("a cat"))


def test_grid_cells_are_plain_generations(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["grid", "a red circle", "--x", "Seed=11,12,13", "--y", "CFG Scale=3,5.5,7", "--sampler", "Euler",
            "-o", str(out), *FAST]  # fmt: skip
    assert grid_main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        grid, text = im.convert("RGB"), im.info["parameters"]
    prompt, _, params = parse_infotext(text)
    assert prompt == "a red circle" and params["Seed"] == "11" and params["CFG scale"] == "3"
    assert (params["Script"], params["X Type"], params["X Values"]) == ("X/Y/Z plot", "Seed", "11,12,13")
    assert (params["Y Type"], params["Y Values"]) == ("CFG Scale", "3,5.5,7")
    assert params["Fixed X Values"] == "11, 12, 13" and "Z Type" not in params
    assert params["Grid cell scale"] == "4"
    # 64x64 cells enlarged 4x, under a label strip and beside one; the strips hold drawn text
    cell, arr = 256, np.asarray(grid, dtype=np.int16)
    pad_left, pad_top = grid.width - 3 * cell, grid.height - 3 * cell
    assert pad_left == cell * 3 // 4 and 0 < pad_top < cell
    assert len(np.unique(arr[:pad_top, pad_left:].reshape(-1, 3), axis=0)) > 2
    assert len(np.unique(arr[pad_top:, :pad_left].reshape(-1, 3), axis=0)) > 2
    pipeline = Pipeline.from_file(embedded_model_path())
    cells = sorted((tmp_path / "grid-cells").glob("*.png"))
    assert [p.name for p in cells] == [f"{i:04d}.png" for i in range(9)]
    for i, path in enumerate(cells):
        seed, cfg = (11, 12, 13)[i % 3], (3.0, 5.5, 7.0)[i // 3]
        request = GenerationRequest("a red circle", sampler="Euler", steps=2, seed=seed, cfg_scale=cfg)
        expected = pipeline(request).images[0]
        with Image.open(path) as im:
            assert im.info["parameters"] == expected.infotext
            pixels = im.convert("RGB")
        assert pixels.tobytes() == expected.image.tobytes()
        # the grid holds the cell, enlarged 4x (nearest neighbour)
        x, y = pad_left + (i % 3) * cell, pad_top + (i // 3) * cell
        assert (
            grid.crop((x, y, x + cell, y + cell)).tobytes()
            == pixels.resize((cell, cell), Image.NEAREST).tobytes()
        )
    # and `sdstudio generate` makes the same first cell
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red circle", "--sampler", "Euler", "--seed", "11", "--cfg", "3",
                 "-o", str(plain),
                 *FAST]) == 0  # fmt: skip
    assert Image.open(plain).tobytes() == Image.open(cells[0]).tobytes()
    # the files exist now: refused without --overwrite
    assert "already exists; pass --overwrite" in grid_error(capsys, argv)


def test_z_axis_sub_grids_side_by_side_without_labels(tmp_path):
    out = tmp_path / "z.png"
    argv = ["grid", "a blue square", "--x", "Steps=2,3", "--z", "Seed=1,2", "--no-labels",
            "--cell-scale", "1",
            "--margin", "2", "-o", str(out), *TOY]  # fmt: skip
    assert grid_main(argv) == 0
    with Image.open(out) as im:
        _, _, params = parse_infotext(im.info["parameters"])
        assert im.size == (2 * (64 * 2 + 2) + 2, 64)  # two 2x1 sub-grids, 2 px margins, no label strips
        assert (
            im.crop((0, 0, 64, 64)).tobytes()
            == Image.open(tmp_path / "z-cells" / "0000.png").convert("RGB").tobytes()
        )
    assert (params["Z Type"], params["Z Values"], params["Fixed Z Values"]) == ("Seed", "1,2", "1, 2")
    assert "Y Type" not in params and "Grid cell scale" not in params
    assert len(list((tmp_path / "z-cells").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--x", "Prompt S/R=dog,cat"],
            r"X axis \(Prompt S/R\) value 'dog': Prompt S/R: 'dog' is not in the prompt",
        ),
        (["--x", "Steps=4,0"], r"X axis \(Steps\) value '0': steps must be a whole number"),
        (["--y", "Sampler=Euler,Nope"], r"Y axis \(Sampler\) value 'Nope': unknown sampler 'Nope'"),
        (["--x", "Checkpoint name=missing"], "Checkpoint name axis value 'missing': unknown checkpoint"),
        (["--x", "Steps=1-"], "Steps axis value '1-'"),
        # checked against the loaded model, before its first image
        (["--x", "Clip skip=1,9"], "grid cell Clip skip: 9: clip skip must be between 1 and 4"),
        (
            ["--x", "Steps=1-20 [200]", "--y", "Seed=1-100"],
            "the grid would have 20000 images, over the limit",
        ),
        (["--x", "Seed=1", "--prompt-matrix"], "--prompt-matrix makes its own axes"),
        ([], "no axis given"),
        (["--x", "Seed=1", "--style", "a"], "--style needs --styles FILE"),
    ],
)
def test_bad_grids_are_refused_before_any_file(tmp_path, capsys, extra, message):
    err = grid_error(capsys, ["grid", "a red circle", *extra, "-o", str(tmp_path / "g.png"), *TOY])
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_prompt_matrix_and_styles(tmp_path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\n"Big","{prompt}, big","small"\n')
    out = tmp_path / "m.png"
    argv = ["grid", "a circle|red|outlined", "--prompt-matrix", "--seed", "5", "--styles", str(styles),
            "--style", "Big", "-o", str(out), *TOY]  # fmt: skip
    assert grid_main(argv) == 0
    texts = [Image.open(p).info["parameters"] for p in sorted((tmp_path / "m-cells").glob("*.png"))]
    parsed = [parse_infotext(t) for t in texts]
    assert [p[0] for p in parsed] == ["a circle, big", "a circle, red, big", "a circle, outlined, big",
                                      "a circle, red, outlined, big"]  # fmt: skip
    assert {p[1] for p in parsed} == {"small"} and {p[2]["Seed"] for p in parsed} == {"5"}
    with Image.open(out) as im:
        _, _, params = parse_infotext(im.info["parameters"])
        assert im.size == (2 * 256 + 256 * 3 // 4, im.height) and 2 * 256 < im.height < 3 * 256
    assert params["Script"] == "Prompt matrix" and params["Prompt matrix"] == "a circle|red|outlined"
