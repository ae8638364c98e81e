"""Damaged and hostile checkpoint files: each is refused with one ``CheckpointError`` line naming the file and
the problem, quickly and without a jump in memory; a pickle that needs code is refused by the globals it
names, and nothing from it runs. A mutation that leaves a readable file (a flipped byte in tensor data) loads.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import resource
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdstudio.cli import main
from sdstudio.errors import CheckpointError
from sdstudio.models.configs import METADATA_KEY, preset
from sdstudio.models.loading import LoadedModel, load_model, load_state, save_model
from sdstudio.models.stablediffusion import random_model

SECONDS = 2.0  # per file, on a busy 2-core machine
MEGABYTES = 200  # above the resident size before the load
DAMAGED = "damaged or incomplete"


def _rss_kb() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:  # no procfs: the high-water mark is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@contextmanager
def _bounded() -> Iterator[None]:
    """The block runs in SECONDS and raises the process's peak resident size no higher than MEGABYTES above
    what it holds now (ru_maxrss is a high-water mark: a peak below an earlier one cannot be seen)."""
    allowed_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rss_kb() + MEGABYTES * 1024)
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert peak_kb <= allowed_kb, f"peak resident size rose to {peak_kb // 1024} MiB (allowed {allowed_kb // 1024})"


def _refused(path: Path, *fragments: str, load: Callable = load_state) -> str:
    """The one-line message of the CheckpointError that loading ``path`` raises; it names the file."""
    with _bounded(), pytest.raises(CheckpointError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------- .safetensors

# a: F32 [2, 3] = 0..5, b: F16 [4] = 1, c: I64 [3] = 7, 8, 9, packed in that order
_DATA = (
    torch.arange(6, dtype=torch.float32).numpy().tobytes()
    + torch.ones(4, dtype=torch.float16).numpy().tobytes()
    + torch.tensor([7, 8, 9]).numpy().tobytes()
)


def _header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "I64", "shape": [3], "data_offsets": [32, 56]},
    }


def _safetensors(header: object, data: bytes = _DATA) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_the_unmutated_small_file_is_valid(tmp_path):
    path = _write(tmp_path, "ok.safetensors", _safetensors(_header()))
    reference = load_file(path)  # the safetensors library accepts it too
    _, state, metadata = load_state(path)
    assert metadata == {"format": "pt"}
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert state["c"].tolist() == [7, 8, 9]


def _entry(name: str, **changes: object) -> Callable[[dict], None]:
    def mutate(header: dict) -> None:
        header[name].update(changes)
        header[name] = {k: v for k, v in header[name].items() if v is not None}

    return mutate


def _set(key: str, value: object) -> Callable[[dict], None]:
    def mutate(header: dict) -> None:
        header[key] = value

    return mutate


def _drop(key: str) -> Callable[[dict], None]:
    return lambda header: header.pop(key)


# (mutation of the JSON header, fragment of the message)
HEADER_MUTATIONS = {
    "dtype unknown": (_entry("a", dtype="F17"), "corrupt entry for tensor a (dtype 'F17'; readable: F64, F32"),
    "dtype lowercase": (_entry("a", dtype="f32"), "dtype 'f32'"),
    "dtype a number": (_entry("b", dtype=16), "corrupt entry for tensor b (dtype 16"),
    "dtype missing": (_entry("c", dtype=None), "dtype None"),
    "dtype a list": (_entry("a", dtype=["F32"]), "dtype ['F32']"),
    "shape of 10**12 elements": (_entry("a", shape=[10**6, 10**6]), "needs 4000000000000 bytes, its offsets give 24"),
    "shape of a huge integer": (_entry("a", shape=[10**40]), "its offsets give 24"),
    "shape negative": (_entry("a", shape=[-1, 6]), "shape [-1, 6] is not a list of non-negative integers"),
    "shape floats": (_entry("a", shape=[2.0, 3]), "shape [2.0, 3] is not"),
    "shape booleans": (_entry("a", shape=[True, 3]), "shape [True, 3] is not"),
    "shape a string": (_entry("a", shape="2,3"), "shape 2,3 is not"),
    "shape missing": (_entry("b", shape=None), "shape None is not"),
    "shape does not multiply out": (_entry("a", shape=[2, 4]), "shape [2, 4] of F32 needs 32 bytes, its offsets give 24"),
    "shape too small": (_entry("c", shape=[2]), "needs 16 bytes, its offsets give 24"),
    "offsets past the end": (_entry("c", shape=[1000], data_offsets=[32, 8032]), "run past the end of the data"),
    "offsets far past the end": (_entry("c", shape=[2**58], data_offsets=[32, 32 + 2**61]), "run past the end"),
    "offsets negative": (_entry("a", data_offsets=[-24, 0]), "data offsets [-24, 0] are not [start, end]"),
    "offsets reversed": (_entry("a", data_offsets=[24, 0]), "data offsets [24, 0]"),
    "offsets three": (_entry("a", data_offsets=[0, 24, 48]), "data offsets [0, 24, 48]"),
    "offsets floats": (_entry("a", data_offsets=[0.0, 24.0]), "data offsets [0.0, 24.0]"),
    "offsets missing": (_entry("b", data_offsets=None), "data offsets None"),
    "offsets overlapping": (_entry("b", data_offsets=[16, 24]), "corrupt entry for tensor b (its bytes 16..24 overlap"),
    "offsets leaving a gap": (_drop("b"), "corrupt entry for tensor c (its bytes 32..56 leave a gap"),
    "entry not an object": (_set("a", [0, 24]), "corrupt entry for tensor a (not a JSON object)"),
    "metadata a list": (_set("__metadata__", ["format", "pt"]), "'__metadata__' is not a map of strings"),
    "metadata not strings": (_set("__metadata__", {"format": 1}), "'__metadata__' is not a map of strings"),
    "stored config not JSON": (_set("__metadata__", {METADATA_KEY: "{unet"}), f"unreadable '{METADATA_KEY}'"),
    "stored config a list": (_set("__metadata__", {METADATA_KEY: "[1, 2]"}), f"unreadable '{METADATA_KEY}'"),
    "stored config unknown fields": (
        _set("__metadata__", {METADATA_KEY: '{"unet": {"x": 1}}'}), f"unreadable '{METADATA_KEY}'"),
}


@pytest.mark.parametrize("mutation", HEADER_MUTATIONS.values(), ids=HEADER_MUTATIONS.keys())
def test_malformed_safetensors_headers(tmp_path, mutation):
    mutate, fragment = mutation
    header = _header()
    mutate(header)
    path = _write(tmp_path, "bad.safetensors", _safetensors(header))
    message = _refused(path, fragment)
    assert message.endswith(f"; it is {DAMAGED}: download or convert it again")


def _with_length(length: int) -> Callable[[bytes], bytes]:
    return lambda good: struct.pack("<Q", length % 2**64) + good[8:]


def _header_len(good: bytes) -> int:
    return struct.unpack("<Q", good[:8])[0]


# (mutation of the file's bytes, fragment of the message)
BYTE_MUTATIONS = {
    "four bytes": (lambda good: good[:4], "4 bytes, too short for the 8-byte header length"),
    "only the length": (lambda good: good[:8], f"its header claims {len(json.dumps(_header()))} bytes but the file has 0"),
    "cut in the header": (lambda good: good[:40], "but the file has 32 after the length"),
    "cut after the header": (lambda good: good[: 8 + _header_len(good)], "run past the end of the data, 0 bytes"),
    "cut by one byte": (lambda good: good[:-1], "corrupt entry for tensor c (its bytes 32..56 run past the end"),
    "cut in the data": (lambda good: good[:-40], "corrupt entry for tensor a (its bytes 0..24 run past the end"),
    "extra bytes": (lambda good: good + b"\0" * 8, "its data section has 64 bytes, its tensors cover 56"),
    "length 2**63": (_with_length(2**63), "its header claims 9223372036854775808 bytes"),
    "length 2**64-1 (-1)": (_with_length(-1), "its header claims 18446744073709551615 bytes"),
    "length -8": (_with_length(-8), "its header claims 18446744073709551608 bytes"),
    "length 0": (_with_length(0), "its header is not JSON"),
    "length one short": (lambda good: _with_length(_header_len(good) - 1)(good), "its header is not JSON"),
    "length into the data": (lambda good: _with_length(_header_len(good) + 4)(good), "its header is not JSON"),
    "length past the file": (lambda good: _with_length(len(good))(good), "but the file has"),
    "header not UTF-8": (lambda good: good.replace(b'"F32"', b'"F\xff2"'), "its header is not JSON"),
    "header garbage": (lambda good: good[:8] + b"\x00\x01" * (_header_len(good) // 2) + good[8 + _header_len(good):],
                       "its header is not JSON"),
    "header nested 100000 deep": (lambda good: struct.pack("<Q", 100_000) + b"[" * 100_000, "its header is not JSON"),
    "header a list": (lambda good: _safetensors([1, 2, 3]), "its header is a JSON list, not an object"),
    "header a number": (lambda good: _safetensors(42), "its header is a JSON int, not an object"),
    "header a string": (lambda good: _safetensors("a"), "its header is a JSON str, not an object"),
    "a pickle renamed": (lambda good: b"\x80\x02}q\x00." + b"\0" * 64, "looks like a pickled .ckpt renamed"),
}


@pytest.mark.parametrize("mutation", BYTE_MUTATIONS.values(), ids=BYTE_MUTATIONS.keys())
def test_malformed_safetensors_bytes(tmp_path, mutation):
    mutate, fragment = mutation
    path = _write(tmp_path, "bad.safetensors", mutate(_safetensors(_header())))
    _refused(path, "not a valid .safetensors file: ", fragment)


def test_empty_file(tmp_path):
    for name in ("empty.safetensors", "empty.ckpt"):
        _refused(_write(tmp_path, name, b""), "the file is empty")


def test_misaligned_tensors_still_load(tmp_path):
    """A header whose length leaves the data section at an odd offset: the views cannot be zero-copy, the
    values are still right."""
    text = json.dumps(_header()).encode()
    text += b" " * (len(text) % 2 == 0)  # JSON allows trailing spaces: the data starts at an odd offset
    path = _write(tmp_path, "odd.safetensors", struct.pack("<Q", len(text)) + text + _DATA)
    _, state, _ = load_state(path)
    assert state["a"].flatten().tolist() == [0, 1, 2, 3, 4, 5] and state["c"].tolist() == [7, 8, 9]


# -------------------------------------------------------------------------------------------------- .ckpt

_SMALL = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
# the pickled shape (2, 3) of tensor "a": BININT1 2, BININT1 3, TUPLE2
_SHAPE_2_3 = b"K\x02K\x03\x86"


def _torch_saved(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _rezipped(good: bytes, replace: dict[str, bytes | None]) -> bytes:
    """The zip with members replaced by suffix (None: left out), the rest copied as they are."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            suffix = next((s for s in replace if name.endswith(s)), None)
            if suffix is None:
                target.writestr(name, source.read(name))
            elif replace[suffix] is not None:
                target.writestr(name, replace[suffix])
    return out.getvalue()


def _pickle_in_zip(payload: bytes) -> bytes:
    return _rezipped(_torch_saved(_SMALL), {"data.pkl": payload})


def _data_pkl(good: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def _zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out.getvalue()


def _shape_enlarged(good: bytes) -> bytes:
    """Tensor "a" of shape (2, 2**27) on its 6-element storage; (2, 255) in a zip, whose layout must not move."""
    assert good.count(_SHAPE_2_3) == 1
    if good.startswith(b"PK"):
        return good.replace(_SHAPE_2_3, b"K\x02K\xff\x86")
    return good.replace(_SHAPE_2_3, b"K\x02J" + struct.pack("<i", 2**27) + b"\x86")


def test_the_unmutated_small_ckpts_load(tmp_path):
    for name, content in [("zip.ckpt", _torch_saved(_SMALL)), ("legacy.ckpt", _torch_saved(_SMALL, legacy=True))]:
        _, state, _ = load_state(_write(tmp_path, name, content))
        assert state.keys() == _SMALL.keys() and all(torch.equal(state[k], _SMALL[k]) for k in _SMALL)


CKPT_MUTATIONS = {
    "zip cut to 100 bytes": (lambda: _torch_saved(_SMALL)[:100],
                             "(PytorchStreamReader failed reading zip archive: failed finding central directory)"),
    "zip cut in half": (lambda: (z := _torch_saved(_SMALL))[: len(z) // 2], "not a readable .ckpt file"),
    "zip cut by one byte": (lambda: _torch_saved(_SMALL)[:-1], "not a readable .ckpt file"),
    "zip without its end record": (lambda: _torch_saved(_SMALL)[:-22], "not a readable .ckpt file"),
    "zip without data.pkl": (lambda: _rezipped(_torch_saved(_SMALL), {"data.pkl": None}), "data.pkl"),
    "zip without a storage": (lambda: _rezipped(_torch_saved(_SMALL), {"data/0": None}), "not a readable .ckpt"),
    "zip with a storage record too short": (lambda: _rezipped(_torch_saved(_SMALL), {"data/0": b"\0" * 4}),
                                            "its tensors claim 32 bytes of data, the file holds 12"),
    "zip of something else": (lambda: _zip_of({"notes.txt": b"hello"}),
                              "not a readable .ckpt file (file in archive is not in a subdirectory: notes.txt)"),
    "zip data.pkl garbage": (lambda: _pickle_in_zip(b"\x00\x01garbage"), "weights-only loader refused its pickle"),
    "zip data.pkl cut": (lambda: _pickle_in_zip((p := _data_pkl(_torch_saved(_SMALL)))[: len(p) // 2]),
                         "not a readable .ckpt file"),
    "zip holding a list": (lambda: _torch_saved([torch.ones(2)]), "not a checkpoint: it holds a list"),
    "zip with integer keys": (lambda: _torch_saved({1: torch.ones(2)}), "its entry '1' is a Tensor (its key is a int)"),
    "zip with a string value": (lambda: _torch_saved({"w": "x"}), "its entry 'w' is a str; expected tensors"),
    "zip with a shape too large": (lambda: _shape_enlarged(_torch_saved(_SMALL)),
                                   "not a readable .ckpt file (Trying to resize storage that is not resizable)"),
    "zip with a stride-0 view of 10**12 elements": (
        lambda: _torch_saved({"w": torch.zeros(1).expand(10**12)}), "claims more elements than its data holds"),
    "legacy cut to 10 bytes": (lambda: _torch_saved(_SMALL, legacy=True)[:10], "not a readable .ckpt"),
    "legacy cut in half": (lambda: (z := _torch_saved(_SMALL, legacy=True))[: len(z) // 2], "not a readable .ckpt"),
    "legacy cut by one byte": (lambda: _torch_saved(_SMALL, legacy=True)[:-1], "not a readable .ckpt"),
    "legacy with a shape too large": (lambda: _shape_enlarged(_torch_saved(_SMALL, legacy=True)),
                                      "not a readable .ckpt"),
    # torch's magic number 0x1950a86a20f9469cfc6c, pickled as LONG1, with its low byte changed
    "legacy wrong magic number": (lambda: _torch_saved(_SMALL, legacy=True).replace(b"\x8a\x0al", b"\x8a\x0am", 1),
                                  "(Invalid magic number; corrupt file?)"),
    "garbage": (lambda: b"\x00\x01garbage" * 100, "weights-only loader refused its pickle"),
}


@pytest.mark.parametrize("mutation", CKPT_MUTATIONS.values(), ids=CKPT_MUTATIONS.keys())
def test_malformed_ckpts(tmp_path, mutation):
    make, fragment = mutation
    path = _write(tmp_path, "bad.ckpt", make())
    message = _refused(path, fragment)
    assert "needs code" not in message


# ------------------------------------------------------------------------------------- pickles needing code


class _RunsCommand:
    """Unpickling this runs a shell command (``os.system``): what a hostile .ckpt does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_files(marker: Path) -> dict[str, bytes]:
    payload = {"state_dict": _SMALL, "x": _RunsCommand(f"touch {marker}")}
    # plain pickle writes tensors through another global (torch.storage._load_from_bytes): none here
    plain = {"x": _RunsCommand(f"touch {marker}")}
    return {
        "torch.save, zip": _torch_saved(payload),
        "torch.save, legacy": _torch_saved(payload, legacy=True),
        # protocol 4+: STACK_GLOBAL, which torch's own lister cannot read
        "plain pickle in torch's zip": _pickle_in_zip(pickle.dumps(plain, protocol=4)),
        "plain pickle, protocol 2": pickle.dumps(plain, protocol=2),
        "plain pickle, protocol 5": pickle.dumps(plain, protocol=5),
    }


@pytest.mark.skipif(sys.platform == "win32", reason="the payload is a POSIX shell command")
@pytest.mark.parametrize("kind", list(_evil_files(Path("x"))))
def test_pickle_calling_os_system_is_refused_by_name_and_never_runs(tmp_path, kind):
    marker = tmp_path / "code-ran"
    path = _write(tmp_path, "evil.ckpt", _evil_files(marker)[kind])
    message = _refused(path, "refusing to load: its pickle needs code to be executed to load (", "nothing from it was run")
    assert f"({os.system.__module__}.system)" in message  # posix.system: where os.system lives
    assert not marker.exists()


def test_several_unsafe_globals_are_all_named(tmp_path):
    payload = {"a": _RunsCommand("true"), "b": pickle.PickleError("x"), "w": torch.ones(2)}
    path = _write(tmp_path, "evil.ckpt", _torch_saved(payload))
    # torch names the exception by its public module
    _refused(path, f"(pickle.PickleError, {os.system.__module__}.system)")


# --------------------------------------------------------------------------------------------- random fuzz


# Bytes that keep a JSON header or a pickle's text parseable more often than random ones: digits, signs,
# brackets, quotes, pickle's small-int and tuple opcodes
_STRUCTURAL = b'0123456789-+.eE[]{}",: KJM\x85\x86\x87'


def _mutations(good: bytes, count: int, seed: int, hot: int) -> Iterator[tuple[str, bytes]]:
    """``count`` damaged copies: one to eight bytes set to random or structural values (half of the copies
    within the first ``hot`` bytes, where the structure is), or every fourth copy cut at a random length."""
    rng = random.Random(seed)
    for i in range(count):
        data = bytearray(good)
        if i % 4 == 3:
            cut = rng.randrange(len(good))
            yield f"cut at {cut}", bytes(data[:cut])
            continue
        span = hot if i % 2 == 0 else len(good)
        places = sorted(rng.randrange(span) for _ in range(rng.randint(1, 8)))
        for place in places:
            data[place] = rng.choice(_STRUCTURAL) if rng.random() < 0.5 else rng.randrange(256)
        yield f"bytes {places} set", bytes(data)


def _loads_or_refused(path: Path) -> None:
    """A mutated file either loads, every tensor readable, or is refused with a CheckpointError line."""
    with _bounded():
        try:
            _, state, _ = load_state(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
            return
        total = sum(t.numel() * t.element_size() for t in state.values())
        assert total <= path.stat().st_size
        for t in state.values():
            t.double().sum()  # every element is there to read


@pytest.mark.parametrize(
    ("kind", "content", "hot"),
    [
        ("safetensors", _safetensors(_header()), 8 + len(json.dumps(_header()))),
        ("zip.ckpt", _torch_saved(_SMALL), 400),  # data.pkl comes first in torch's zip
        ("legacy.ckpt", _torch_saved(_SMALL, legacy=True), 400),
    ],
)
def test_random_damage_to_small_files(tmp_path, kind, content, hot):
    for i, (what, damaged) in enumerate(_mutations(content, 200, seed=20, hot=hot)):
        path = _write(tmp_path, f"{i}.{kind}", damaged)
        try:
            _loads_or_refused(path)
        except AssertionError as e:
            raise AssertionError(f"{kind} with {what}: {e}") from None


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as .safetensors (its config in the header) and as a zip .ckpt (architecture detected)."""
    folder = tmp_path_factory.mktemp("fuzz")
    model = random_model(preset("tiny"), seed=4)
    # fp32: no cast on load, so each load_model below stays quick
    ckpt = folder / "tiny.ckpt"
    torch.save(model.state_dict(), ckpt)
    return {"safetensors": save_model(model, folder / "tiny.safetensors", dtype=torch.float32), "ckpt": ckpt}


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_random_damage_to_a_real_checkpoint_through_load_model(tmp_path, tiny_files, kind):
    good = tiny_files[kind].read_bytes()
    # where the structure is: the JSON header; data.pkl, the zip's first member
    hot = 8 + struct.unpack("<Q", good[:8])[0] if kind == "safetensors" else 100 + len(_data_pkl(good))
    loaded = refused = 0
    for i, (what, damaged) in enumerate(_mutations(good, 12, seed=7, hot=hot)):
        path = _write(tmp_path, f"{i}.{kind}", damaged)
        with _bounded():
            try:
                model = load_model(path)
            except CheckpointError as e:
                assert "\n" not in str(e) and str(e).startswith(f"{path}: "), (what, str(e))
                refused += 1
                continue
        assert isinstance(model, LoadedModel), what
        loaded += 1
        path.unlink()
    assert refused >= 3 and loaded >= 1  # the cuts are refused (and most header flips), data flips load


def test_stored_config_that_cannot_be_built(tmp_path):
    model = random_model(preset("tiny"), seed=4)
    config = json.loads(model.config.to_json())
    config["unet"]["model_channels"] = "thirty-two"
    path = save_model(model, tmp_path / "bad.safetensors", metadata={METADATA_KEY: json.dumps(config)})
    _refused(path, "its architecture 'tiny' cannot be built", DAMAGED, load=load_model)


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        ("cut.safetensors", lambda marker: _safetensors(_header())[:-1], "not a valid .safetensors file"),
        ("huge.safetensors", lambda marker: _with_length(2**63)(_safetensors(_header())), "header claims"),
        ("cut.ckpt", lambda marker: _torch_saved(_SMALL)[:-1], "not a readable .ckpt file"),
        ("evil.ckpt", lambda marker: _evil_files(marker)["torch.save, zip"], "needs code"),
        ("evil4.ckpt", lambda marker: _evil_files(marker)["plain pickle in torch's zip"], "system"),
    ],
)
def test_cli_reports_one_line_and_exits_2(tmp_path, capsys, name, make, fragment):
    marker = tmp_path / "code-ran"
    path = _write(tmp_path, name, make(marker))
    out = tmp_path / "x.png"
    assert main(["generate", "x", "--model", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdstudio: error: {path}: ") and fragment in err[0], err
    assert not out.exists() and not marker.exists()
