"""--models-dir: checkpoints listed with A1111's titles, switched by title, per request, loaded in the worker."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import embedded_model_path
from sdstudio.engine import Pipeline
from sdstudio.models.loading import file_sha256
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from sdstudio.server.models import Checkpoint, CheckpointRegistry, ModelCache, UnknownCheckpoint
from sdstudio.types import GenerationRequest
from tests.server.conftest import loader, serve

TINY = {"width": 64, "height": 64, "steps": 2, "sampler_name": "Euler"}
LIMIT_S = 30.0


def variant_checkpoint(path: Path) -> Path:
    """The embedded model with its UNet's last bias shifted: a second checkpoint whose images differ."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(embedded_model_path()), "pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 0.3
    save_file(state, str(path), metadata=metadata)
    return path


def variant_vae(path: Path) -> Path:
    """The embedded model's VAE alone (LDM keys), its decoder's last bias shifted: images come out brighter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = "first_stage_model."
    with safe_open(str(embedded_model_path()), "pt") as f:
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.2
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    variant_checkpoint(folder / "other.safetensors")
    (folder / "sub").mkdir()
    shutil.copy(embedded_model_path(), folder / "sub" / "copy.safetensors")  # same bytes: same cache entry
    (folder / "look.vae.safetensors").write_bytes(b"not a checkpoint")  # a VAE, not listed as a checkpoint
    (folder / "VAE").mkdir()
    variant_vae(folder / "VAE" / "bright.safetensors")
    (folder / "notes.txt").write_text("ignored")
    return folder


@pytest.fixture(scope="module")
def models_server(tmp_path_factory, models_dir, embedded_pipeline):
    config = ServerConfig(
        model=embedded_model_path(),
        data_dir=tmp_path_factory.mktemp("serve-models"),
        models_dir=models_dir,
        limits=ServerLimits(max_size=256, default_size=None),
    )
    yield from serve(config, loader(embedded_pipeline))


def title(path: Path, name: str) -> str:
    return f"{name} [{file_sha256(path)[:10]}]"


def image_of(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB"))


def reference(pipeline: Pipeline, prompt: str, seed: int) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, seed=seed, sampler="Euler", steps=2, width=64, height=64)
    return np.asarray(pipeline(request).images[0].image.convert("RGB"))


# -- the registry and the cache, without HTTP


def test_registry_titles_and_lookup(models_dir) -> None:
    registry = CheckpointRegistry(embedded_model_path(), models_dir)
    other = models_dir / "other.safetensors"
    titles = [c.title for c in registry.list()]
    assert titles == [
        title(embedded_model_path(), "toyworld.safetensors"),
        title(other, "other.safetensors"),
        title(models_dir / "sub" / "copy.safetensors", "sub/copy.safetensors"),
    ]
    found = registry.find(titles[1])
    assert found.path == other and found.sha256 == file_sha256(other) and found.shorthash == found.sha256[:10]
    assert registry.find("other.safetensors") == found  # the name without the hash
    assert registry.find("other") == found  # the stem
    assert registry.find(found.shorthash) == found
    assert registry.find(titles[2]).key == registry.find(titles[0]).key  # same bytes, same cache key
    assert found.api_item() == {"title": titles[1], "model_name": "other", "hash": found.shorthash,
                                "sha256": found.sha256, "filename": str(other), "config": None}  # fmt: skip
    with pytest.raises(UnknownCheckpoint, match=r"no checkpoint 'nope'.*known: toyworld\.safetensors \["):
        registry.find("nope")


def test_registry_keeps_hashes_across_restarts(tmp_path, models_dir, monkeypatch) -> None:
    cache = tmp_path / "hashes.json"
    first = CheckpointRegistry(embedded_model_path(), models_dir, cache)
    kept = json.loads(cache.read_text())
    other = models_dir / "other.safetensors"
    st = other.stat()
    assert kept[f"{other.resolve()}|{st.st_size}|{st.st_mtime_ns}"] == file_sha256(other)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr("sdstudio.server.models.file_sha256", no_hashing)
    again = CheckpointRegistry(embedded_model_path(), models_dir, cache)
    assert [c.title for c in again.list()] == [c.title for c in first.list()]


def test_registry_finds_diffusers_folders(tmp_path) -> None:
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "pipe" / "unet").mkdir()
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    registry = CheckpointRegistry(embedded_model_path(), tmp_path)
    folder = registry.find("pipe")
    assert folder.path == tmp_path / "pipe" and folder.sha256 is None and folder.title == "pipe"
    assert len(registry.list()) == 2  # the embedded model and the folder, not the folder's inner file


def test_cache_evicts_least_recently_used_over_budget(tmp_path) -> None:
    loads: list[str] = []

    def load(path: Path, vae: Path | None) -> str:
        loads.append(path.name)
        return f"pipeline:{path.name}"

    checkpoints = {n: Checkpoint(tmp_path / n, n, n * 8) for n in ("a", "b", "c")}
    cache = ModelCache(load, budget=250, measure=lambda pipeline: 100)
    assert cache.get(checkpoints["a"]) == "pipeline:a"
    assert cache.get(checkpoints["b"]) == "pipeline:b"
    assert cache.get(checkpoints["a"]) == "pipeline:a"  # cached; now the most recently used
    assert cache.get(checkpoints["c"]) == "pipeline:c"  # over 250 bytes: b, the least recently used, goes
    assert [c.name for c in cache.loaded()] == ["a", "c"]
    assert cache.nbytes() == 200
    cache.get(checkpoints["b"])
    assert loads == ["a", "b", "c", "b"]
    assert [c.name for c in cache.loaded()] == ["c", "b"]
    small = ModelCache(load, budget=50, measure=lambda pipeline: 100)
    small.get(checkpoints["a"])  # larger than the budget on its own: still loads, and stays
    assert [c.name for c in small.loaded()] == ["a"]


# -- over HTTP


def test_sd_models_and_vaes(models_server, models_dir) -> None:
    with httpx.Client(base_url=models_server.url, timeout=10) as c:
        models = c.get("/sdapi/v1/sd-models").json()
        other = next(m for m in models if m["model_name"] == "other")
        sha = file_sha256(models_dir / "other.safetensors")
        assert other == {"title": f"other.safetensors [{sha[:10]}]", "model_name": "other", "hash": sha[:10],
                         "sha256": sha, "filename": str(models_dir / "other.safetensors"), "config": None}  # fmt: skip
        assert [m["model_name"] for m in models] == ["toyworld", "other", "sub_copy"]
        assert c.get("/sdapi/v1/sd-vae").json() == [
            {"model_name": "bright.safetensors", "filename": str(models_dir / "VAE" / "bright.safetensors")},
            {"model_name": "look.vae.safetensors", "filename": str(models_dir / "look.vae.safetensors")},
        ]


def test_unknown_checkpoint_is_a_clear_422(models_server) -> None:
    with httpx.Client(base_url=models_server.url, timeout=10) as c:
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors"})
        assert r.status_code == 422
        body = r.json()
        assert body["field"] == "sd_model_checkpoint" and set(body) >= {"error", "detail", "body", "errors"}
        assert "missing.safetensors" in body["detail"] and "other.safetensors [" in body["detail"]
        r = c.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", **TINY, "override_settings": {"sd_model_checkpoint": "zz"}},
        )
        assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_model_checkpoint"


def test_override_is_per_request_and_switch_is_global(models_server, models_dir, embedded_pipeline) -> None:
    other_pipeline = Pipeline.from_file(models_dir / "other.safetensors")
    want_other = reference(other_pipeline, "a red ball", 21)
    want_default = reference(embedded_pipeline, "a red ball", 21)
    assert not np.array_equal(want_other, want_default)
    payload = {"prompt": "a red ball", "seed": 21, **TINY}
    with httpx.Client(base_url=models_server.url, timeout=60) as c:
        default_title = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        r = c.post(
            "/sdapi/v1/txt2img", json={**payload, "override_settings": {"sd_model_checkpoint": "other"}}
        )
        assert r.status_code == 200, r.text
        assert np.array_equal(image_of(r.json()), want_other)
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == default_title  # unchanged
        assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=payload).json()), want_default)

        try:
            assert (
                c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}).status_code
                == 200
            )
            options = c.get("/sdapi/v1/options").json()
            sha = file_sha256(models_dir / "other.safetensors")
            assert options["sd_model_checkpoint"] == f"other.safetensors [{sha[:10]}]"
            assert options["sd_checkpoint_hash"] == sha
            assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=payload).json()), want_other)
            # a request naming the old default still gets it
            back = {**payload, "override_settings": {"sd_model_checkpoint": default_title}}
            assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=back).json()), want_default)
            infotext = json.loads(c.post("/sdapi/v1/txt2img", json=payload).json()["info"])["infotexts"][0]
            assert f"Model hash: {sha[:10]}, Model: other" in infotext
        finally:
            c.post("/sdapi/v1/options", json={"sd_model_checkpoint": default_title})
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == default_title


def test_refresh_unload_reload(models_server, models_dir) -> None:
    with httpx.Client(base_url=models_server.url, timeout=10) as c:
        shutil.copy(models_dir / "other.safetensors", models_dir / "late.safetensors")
        try:
            assert "late" not in [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
            assert c.post("/sdapi/v1/refresh-checkpoints").json() is None
            assert "late" in [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
        finally:
            (models_dir / "late.safetensors").unlink()
            c.post("/sdapi/v1/refresh-checkpoints")
        assert c.post("/sdapi/v1/unload-checkpoint").json() == {}
        assert c.get("/sdapi/v1/memory").json()["models"]["loaded"] == []
        assert c.post("/sdapi/v1/reload-checkpoint").json() == {}
        default = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        deadline = time.monotonic() + LIMIT_S
        for _ in range(3000):
            loaded = c.get("/sdapi/v1/memory").json()["models"]
            if loaded["loaded"] == [default]:
                break
            assert time.monotonic() < deadline, "reload never happened"
            time.sleep(0.02)
        assert loaded["bytes"] > 1_000_000 and loaded["budget"] > 0


def test_a_slow_load_never_blocks_progress_models_or_options(tmp_path, models_dir, embedded_pipeline) -> None:
    """The switch is loaded by the worker: while it loads, the read-only routes answer at once."""
    release = threading.Event()
    entered = threading.Event()
    embedded = embedded_model_path()

    def load(path: Path, vae: Path | None) -> Pipeline:
        if Path(path) == embedded:
            return embedded_pipeline
        entered.set()
        assert release.wait(LIMIT_S), "never released"
        return Pipeline.from_file(path)

    config = ServerConfig(model=embedded, data_dir=tmp_path / "data", models_dir=models_dir,
                          limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    for running in serve(config, load):
        with httpx.Client(base_url=running.url, timeout=10) as c:
            started = time.monotonic()
            assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
            job = c.post("/sdapi/v2/jobs", json={"prompt": "a red ball", "seed": 4, **TINY}).json()
            assert entered.wait(LIMIT_S)
            try:
                for _ in range(5):
                    t0 = time.monotonic()
                    progress = c.get("/sdapi/v1/progress").json()
                    assert c.get("/sdapi/v1/sd-models").status_code == 200
                    assert (
                        c.get("/sdapi/v1/options")
                        .json()["sd_model_checkpoint"]
                        .startswith("other.safetensors [")
                    )
                    assert time.monotonic() - t0 < 2.0
                assert progress["textinfo"].startswith("Loading other.safetensors [")
                assert c.get(f"/sdapi/v2/jobs/{job['id']}").json()["state"] in ("pending", "running")
            finally:
                release.set()
            deadline = time.monotonic() + LIMIT_S
            for _ in range(3000):
                state = c.get(f"/sdapi/v2/jobs/{job['id']}").json()
                if state["state"] in ("done", "failed", "canceled"):
                    break
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert state["state"] == "done", state
            assert (
                "Model hash: " + file_sha256(models_dir / "other.safetensors")[:10] in state["infotexts"][0]
            )
            assert time.monotonic() - started < LIMIT_S


def test_vae_per_request_and_as_the_default(models_server, models_dir, embedded_pipeline) -> None:
    vae = models_dir / "VAE" / "bright.safetensors"
    want_vae = reference(Pipeline.from_file(embedded_model_path(), vae=vae), "a red ball", 5)
    want_default = reference(embedded_pipeline, "a red ball", 5)
    assert want_vae.mean() > want_default.mean() + 5  # the shifted decoder bias brightens every pixel
    payload = {"prompt": "a red ball", "seed": 5, **TINY}
    with httpx.Client(base_url=models_server.url, timeout=60) as c:
        r = c.post(
            "/sdapi/v1/txt2img", json={**payload, "override_settings": {"sd_vae": "bright.safetensors"}}
        )
        assert r.status_code == 200, r.text
        assert np.array_equal(image_of(r.json()), want_vae)
        assert "VAE: bright" in json.loads(r.json()["info"])["infotexts"][0]
        assert c.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
        assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=payload).json()), want_default)
        try:
            assert c.post("/sdapi/v1/options", json={"sd_vae": "bright.safetensors"}).status_code == 200
            assert c.get("/sdapi/v1/options").json()["sd_vae"] == "bright.safetensors"
            assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=payload).json()), want_vae)
        finally:
            c.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
        assert np.array_equal(image_of(c.post("/sdapi/v1/txt2img", json=payload).json()), want_default)
        r = c.post("/sdapi/v1/options", json={"sd_vae": "nope.pt", "sd_model_checkpoint": "other"})
        assert (
            r.status_code == 422
            and r.json()["field"] == "sd_vae"
            and "bright.safetensors" in r.json()["detail"]
        )
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("toyworld")  # nothing set


def test_webuiapi_switches_model_by_title(models_server, models_dir) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=models_server.port, sampler="Euler")
    titles = api.util_get_model_names()
    other = title(models_dir / "other.safetensors", "other.safetensors")
    assert other in titles and len(titles) == 3
    default = api.util_get_current_model()
    want = reference(Pipeline.from_file(models_dir / "other.safetensors"), "a red ball", 8)
    try:
        api.util_set_model(other, find_closest=False)
        assert api.util_get_current_model() == other
        result = api.txt2img(prompt="a red ball", seed=8, steps=2, width=64, height=64, eta=None)
        assert np.array_equal(np.asarray(result.images[0].convert("RGB")), want)
    finally:
        api.util_set_model(default, find_closest=False)
    assert api.util_get_current_model() == default
