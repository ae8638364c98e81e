"""``sdstudio batch``: the file's lines (A1111 txt2img payloads) and their errors, the manifest, resuming, and
images equal to the Python API's, in one process and over local Ray actors.

On the CPU an image depends (in its last bits) on the number of torch threads, so every run here uses one
thread, as each of the Ray test's two actors on two CPUs does."""

import argparse
import json
import os
import random
import re
import socket
import sys
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.batch import (
    MANIFEST_NAME,
    ManifestEntry,
    PipelineSpec,
    cpu_worker_threads,
    parse_batch,
    read_batch,
    read_manifest,
    repair_manifest,
    request_hash,
    run_batch,
)
from sdstudio.cli import embedded_model_path, run
from sdstudio.cli_batch import add_batch_commands
from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.server.a1111 import ServerLimits, to_request
from sdstudio.types import GenerationRequest

TOY = ServerLimits(default_size=None)  # sizes a line leaves out: the embedded model's 64x64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_file(embedded_model_path())  # fp32, as the runs below


@pytest.fixture
def loaded_once(monkeypatch, pipeline):
    """run_batch's model load gives the module's pipeline (the CLI test loads its own)."""
    monkeypatch.setattr(PipelineSpec, "load", lambda self: pipeline)


SPEC = PipelineSpec(embedded_model_path(), precision="fp32")


def batch(argv):
    """The command through a parser of its own (as cli.py's will have it) and cli.run's error handling."""
    parser = argparse.ArgumentParser(prog="sdstudio")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_batch_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["batch", *argv]))


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.info["parameters"]


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))}


def manifest_lines(folder):
    return [json.loads(t) for t in (folder / MANIFEST_NAME).read_text().splitlines()]


# ---- the file


def test_lines_translate_as_the_a1111_api_does():
    second_line = {"prompt": "b", "batch_size": 2, "n_iter": 3, "seed": 10, "negative_prompt": "n",
                   "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    lines = [
        "# comment: skipped, as the blank line",
        "",
        '{"prompt": "a red circle", "seed": 5, "steps": 3, "sampler_name": "Euler a", "cfg_scale": 4}',
        f"  {json.dumps(second_line)}  ",
    ]
    text = "\n".join(lines)
    first, second = parse_batch(text, "p.jsonl", TOY)
    assert (first.number, second.number) == (3, 4)
    assert first.request == GenerationRequest(
        prompt="a red circle", sampler="Euler a", steps=3, cfg_scale=4.0, seed=5, width=None, height=None
    )
    assert first.n_iter == 1 and first.image_count == 1
    assert second.request == to_request("txt2img", second_line, TOY)
    assert second.request.clip_skip == 2 and second.request.steps == 50  # A1111's default steps
    assert second.image_count == 6
    # iterations are numbered as A1111 numbers them: seed + k * batch_size
    assert [r.seed for r in second.requests(random.Random(0))] == [10, 12, 14]
    # sizes left out are A1111's 512 for a model of the user's
    (big,) = parse_batch('{"prompt": "x"}', "p.jsonl", ServerLimits())
    assert (big.request.width, big.request.height) == (512, 512)


def test_random_seeds_leave_room_for_the_last_image():
    (line,) = parse_batch('{"prompt": "x", "seed": -1, "batch_size": 2, "n_iter": 2}', "p", TOY)
    requests = line.requests(random.Random(3))
    base = requests[0].seed
    assert [r.seed for r in requests] == [base, base + 2]
    assert 0 <= base <= 2**32 - 4
    assert line.requests(random.Random(3)) == requests


def test_hash_ignores_key_order_and_spacing_only():
    a = request_hash(json.loads('{"prompt": "a", "seed": 1}'))
    assert a == request_hash(json.loads('{ "seed":1,"prompt":"a" }'))
    assert a != request_hash({"prompt": "a", "seed": 2})
    text = '{"prompt": "a", "seed": 1}\n{"seed": 1, "prompt": "a"}'
    one, two = parse_batch(text, "p", TOY)
    assert one.digest == two.digest == a and len(a) == 16


def test_bad_lines_refuse_the_whole_file_naming_each():
    lines = [
        '{"prompt": "fine"}',
        '{"prompt": "unclosed"',
        "# a comment is fine",
        '["a list"]',
        '{"prompt": "x", "steps": "many"}',
        '{"prompt": "x", "init_images": ["aGk="]}',
        '{"prompt": "x", "n_iter": 0}',
        '{"prompt": "x", "sampler_name": "Nope"}',
        '{"prompt": "x", "width": 99999}',
    ]
    text = "\n".join(lines)
    with pytest.raises(SdStudioError) as e:
        parse_batch(text, "p.jsonl", TOY)
    message = str(e.value)
    assert message.startswith("p.jsonl: 7 bad lines, nothing generated: line 2: not valid JSON (")
    parts = re.split(r"; (?=line \d+: )", message)
    assert [p.split(":")[0] for p in parts[1:]] == [f"line {n}" for n in (4, 5, 6, 7, 8, 9)]
    assert (
        parts[1] == 'line 4: expected a JSON object of txt2img fields, such as {"prompt": "a cat", "seed": 1}'
    )
    assert parts[2] == "line 5: steps: expected int (got 'many')"
    assert parts[3].startswith("line 6: init_images: img2img fields are not supported")
    assert parts[4] == "line 7: n_iter: expected an integer of at least 1 (got 0)"
    assert "Nope" in parts[5]
    assert parts[6] == "line 9: width: 99999 exceeds the server's --max-size 2048"
    with pytest.raises(SdStudioError, match=r"p: no requests \(every line is blank or a # comment\)"):
        parse_batch("# only\n\n", "p", TOY)


def test_bad_file_refused_before_any_work(tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', "{oops", '{"steps": 0}'])
    out = tmp_path / "out"
    assert batch([str(prompts), "--outdir", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"sdstudio: error: {prompts}: 2 bad lines, nothing generated: line 2: not valid JSON"
    )
    assert "; line 3: steps: must be at least 1 (got 0)" in err[0]
    assert not out.exists()


def test_unknown_fields_are_ignored_with_a_warning(caplog):
    text = '{"prompt": "a", "styles": [], "override_settings": {"sd_model_checkpoint": "m"}}'
    with caplog.at_level("WARNING"):
        (line,) = parse_batch(text, "p.jsonl", TOY)
    assert line.request.prompt == "a"
    assert [r.getMessage() for r in caplog.records] == [
        "p.jsonl line 1: ignored fields txt2img does not use: styles, override_settings.sd_model_checkpoint"
    ]


def test_command_errors(tmp_path, capsys, monkeypatch):
    prompts = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}'])
    out = tmp_path / "out"
    assert batch([str(prompts), "--outdir", str(out), "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert batch([str(prompts), "--outdir", str(out), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sdstudio: error: --ray needs Ray, which is not installed: pip install 'sdstudio[ray]'"
    # with Ray but no GPU, a local run needs --workers: said before Ray starts
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batch([str(prompts), "--outdir", str(out), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "sdstudio: error: --ray: this machine has no CUDA GPU; pass --workers N to run N CPU workers"
    )
    assert batch([str(tmp_path / "none.jsonl"), "--outdir", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"sdstudio: error: {tmp_path / 'none.jsonl'}: no such batch file"
    )
    assert not out.exists()


# ---- the manifest


def test_manifest_keeps_the_latest_entry_and_cuts_an_unfinished_one(tmp_path):
    path = tmp_path / MANIFEST_NAME
    old = ManifestEntry(1, "aaaa", ("00001-00.png",), (5,), 1.0)
    new = ManifestEntry(1, "bbbb", ("00001-00.png", "00001-01.png"), (6, 7), 2.5, ("w",))
    other = ManifestEntry(2, "cccc", ("00002-00.png",), (9,), 0.5)
    path.write_text(
        old.to_json() + "\n" + '{"not": "an entry"}\n' + new.to_json() + "\n" + other.to_json()[:20]
    )
    repair_manifest(path)
    assert path.read_text().endswith(new.to_json() + "\n")
    assert read_manifest(path) == {1: new}
    assert json.loads(new.to_json()) == {
        "line": 1, "hash": "bbbb", "files": ["00001-00.png", "00001-01.png"], "seed": 6, "seeds": [6, 7],
        "seconds": 2.5, "warnings": ["w"], "worker": "",
    }  # fmt: skip


def test_cpu_workers_share_out_the_cluster():
    assert cpu_worker_threads([2], 2) == 1
    assert cpu_worker_threads([16], 3) == 5
    assert cpu_worker_threads([8, 8], 1) == 8  # at most one node's
    with pytest.raises(
        SdStudioError, match="--workers 3: the Ray cluster has 2 CPUs, room for 2 CPU workers"
    ):
        cpu_worker_threads([2], 3)


# ---- generating and resuming


def test_command_writes_the_python_apis_images_and_resumes(tmp_path, pipeline, capsys):
    payloads = [
        {"prompt": "a red circle", "seed": 5, "steps": 2},
        {"prompt": "a blue square", "seed": 7, "steps": 2, "batch_size": 2, "sampler_name": "Euler a"},
    ]
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps(payloads[0]), "", json.dumps(payloads[1])])
    out = tmp_path / "out"
    argv = [str(prompts), "--outdir", str(out), "--precision", "fp32", "-q"]
    assert batch(argv) == 0
    names = ["00001-00.png", "00003-00.png", "00003-01.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == [*names, MANIFEST_NAME]
    expected = [*pipeline(to_request("txt2img", payloads[0], TOY)).images,
                *pipeline(to_request("txt2img", payloads[1], TOY)).images]  # fmt: skip
    for name, image in zip(names, expected):
        array, infotext = pixels(out / name)
        assert np.array_equal(array, np.asarray(image.image)), name
        assert infotext == image.infotext
    entries = manifest_lines(out)
    assert [(e["line"], e["hash"], e["files"], e["seeds"]) for e in entries] == [
        (1, request_hash(payloads[0]), names[:1], [5]),
        (3, request_hash(payloads[1]), names[1:], [7, 8]),
    ]
    assert all(e["seconds"] > 0 for e in entries)
    # a rerun skips both lines: nothing written, nothing appended, nothing printed
    before = mtimes(out)
    assert batch(argv) == 0
    assert capsys.readouterr().out == ""
    assert mtimes(out) == before
    assert manifest_lines(out) == entries


def test_killed_run_finishes_the_rest_exactly_once(tmp_path, loaded_once):
    lines = read_batch(write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "a red circle", "seed": 1, "steps": 2}),
        json.dumps({"prompt": "a green ring", "seed": 2, "steps": 2}),
        json.dumps({"prompt": "a blue square", "seed": 3, "steps": 2}),
    ]), TOY)  # fmt: skip
    out = tmp_path / "out"
    full = run_batch(lines, out, SPEC)
    assert [e.line for e in full.finished] == [1, 2, 3] and not full.skipped and not full.failed
    reference = {name: pixels(out / name)[0] for name in mtimes(out)}
    # killed while appending line 2's entry: its image on disk, its entry half written; line 3 never ran
    entries = (out / MANIFEST_NAME).read_text().splitlines()
    (out / MANIFEST_NAME).write_text(entries[0] + "\n" + entries[1][:30])
    (out / "00003-00.png").unlink()
    kept = mtimes(out)["00001-00.png"]
    done = []
    again = run_batch(lines, out, SPEC, on_line=lambda n, result: done.append((n, result.files)))
    assert done == [(2, ("00002-00.png",)), (3, ("00003-00.png",))]
    assert again.skipped == (1,) and not again.failed
    assert [e["line"] for e in manifest_lines(out)] == [1, 2, 3]
    assert manifest_lines(out)[0] == json.loads(entries[0])
    assert mtimes(out)["00001-00.png"] == kept
    assert {name: pixels(out / name)[0] for name in mtimes(out)}.keys() == reference.keys()
    for name, array in reference.items():
        assert np.array_equal(pixels(out / name)[0], array), name


def test_changed_line_is_generated_again(tmp_path, loaded_once, pipeline):
    prompts = tmp_path / "p.jsonl"
    first = {"prompt": "a red circle", "seed": 1, "steps": 2}
    second = {"prompt": "a blue square", "seed": 2, "steps": 2, "batch_size": 2}
    out = tmp_path / "out"
    run_batch(read_batch(write_lines(prompts, [json.dumps(first), json.dumps(second)]), TOY), out, SPEC)
    before = mtimes(out)
    assert list(before) == ["00001-00.png", "00002-00.png", "00002-01.png"]
    changed = {"prompt": "a blue square", "seed": 9, "steps": 2}  # one image now, another seed
    # key order is not a change: line 1 is rewritten with its keys reversed
    reordered = json.dumps(dict(reversed(list(first.items()))))
    report = run_batch(read_batch(write_lines(prompts, [reordered, json.dumps(changed)]), TOY), out, SPEC)
    assert [e.line for e in report.finished] == [2] and report.skipped == (1,)
    after = mtimes(out)
    assert list(after) == ["00001-00.png", "00002-00.png"]  # 00002-01.png of the old line is gone
    assert after["00001-00.png"] == before["00001-00.png"]
    (image,) = pipeline(to_request("txt2img", changed, TOY)).images
    assert np.array_equal(pixels(out / "00002-00.png")[0], np.asarray(image.image))
    latest = read_manifest(out / MANIFEST_NAME)
    assert latest[2].digest == request_hash(changed) and latest[2].seeds == (9,)
    assert len(manifest_lines(out)) == 3


def test_failed_line_does_not_stop_the_others(tmp_path, monkeypatch, pipeline):
    def failing_on_boom(request, callback=None, *, limits):
        if "boom" in request.prompt:
            raise SdStudioError("boom: out of luck")
        return pipeline(request, callback, limits=limits)

    monkeypatch.setattr(PipelineSpec, "load", lambda self: failing_on_boom)
    prompts = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "a boom", "seed": 1, "steps": 2}),
        json.dumps({"prompt": "a red circle <lora:missing:1>", "seed": 2, "steps": 2}),
    ])  # fmt: skip
    out = tmp_path / "out"
    report = run_batch(read_batch(prompts, TOY), out, SPEC)
    assert [e.line for e in report.finished] == [2]
    assert report.failed == ((1, "boom: out of luck"),)
    # a network it cannot find is a warning (as in `generate`), kept in the manifest
    ((entry),) = manifest_lines(out)
    assert entry["line"] == 2 and len(entry["warnings"]) == 1 and "missing" in entry["warnings"][0]
    # the rerun retries the failed line only
    monkeypatch.setattr(PipelineSpec, "load", lambda self: pipeline)
    again = run_batch(read_batch(prompts, TOY), out, SPEC)
    assert [e.line for e in again.finished] == [1] and again.skipped == (2,) and not again.failed


# ---- Ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a throwaway cluster
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.mark.slow  # a local Ray cluster and two worker processes: about 18 s
def test_two_ray_workers_give_the_single_process_images(tmp_path, local_ray, loaded_once, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "a red circle", "seed": 11, "steps": 2}),
        json.dumps({"prompt": "a green ring", "seed": 12, "steps": 2, "batch_size": 2}),
        json.dumps({"prompt": "a blue square", "seed": 13, "steps": 2}),
    ])  # fmt: skip
    single, spread = tmp_path / "single", tmp_path / "ray"
    run_batch(read_batch(prompts, TOY), single, SPEC)
    # the command, on the Ray this test started (it uses a Ray already running in the process, and leaves it)
    argv = [str(prompts), "--outdir", str(spread), "--ray", "--workers", "2", "--precision", "fp32", "-q"]
    codes = []
    worker = threading.Thread(target=lambda: codes.append(batch(argv)), daemon=True)
    worker.start()
    worker.join(timeout=90)  # bounded: a Ray that never places the actors fails the test instead of hanging
    assert not worker.is_alive(), "the Ray run took more than 90 s"
    assert codes == [0], capsys.readouterr().err
    names = ["00001-00.png", "00002-00.png", "00002-01.png", "00003-00.png"]
    assert sorted(capsys.readouterr().out.split()) == [str(spread / n) for n in names]
    assert list(mtimes(spread)) == names
    for name in names:
        (a, a_info), (b, b_info) = pixels(spread / name), pixels(single / name)
        assert np.array_equal(a, b) and a_info == b_info, name
    ray_entries = {e["line"]: e for e in manifest_lines(spread)}
    # two actors, each its own process, made the lines; this process only wrote them
    workers = {e["worker"] for e in ray_entries.values()}
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers
    for entry in manifest_lines(single):
        assert {**ray_entries[entry["line"]], "seconds": 0, "worker": ""} == {
            **entry,
            "seconds": 0,
            "worker": "",
        }
