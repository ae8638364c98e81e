"""The unchanged `webuiapi` client against the live server: listings, options, progress, interrupt."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from sdstudio.cli import embedded_model_path
from sdstudio.diffusion.samplers import sampler_names
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from tests.server.conftest import Running, loader, serve

webuiapi = pytest.importorskip("webuiapi")

LIMIT_S = 30.0


@pytest.fixture(scope="module")
def networks_server(tmp_path_factory, embedded_pipeline) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("networks")
    loras, embeddings = root / "Lora", root / "embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    for f in (loras / "ball.safetensors", loras / "styles" / "crayon.safetensors", loras / "notes.txt",
              embeddings / "redness.pt", embeddings / "blueish.safetensors"):  # fmt: skip
        f.write_bytes(b"listed by name only")
    config = ServerConfig(model=embedded_model_path(), data_dir=root / "data", lora_dirs=(loras,),
                          embeddings_dir=embeddings, limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    yield from serve(config, loader(embedded_pipeline))


def test_webuiapi_listings(networks_server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=networks_server.port)
    loras = api.get_loras()
    assert [(x["name"], x["alias"]) for x in loras] == [("ball", "ball"), ("crayon", "crayon")]
    assert loras[1]["path"].endswith("styles/crayon.safetensors")
    embeddings = api.get_embeddings()
    assert sorted(embeddings["loaded"]) == ["blueish", "redness"] and embeddings["skipped"] == {}
    samplers = api.get_samplers()
    assert [s["name"] for s in samplers] == list(sampler_names())
    assert {"Euler", "Euler a", "DPM++ 2M"} <= {s["name"] for s in samplers}


def test_webuiapi_set_options_by_title(networks_server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=networks_server.port)
    (title,) = api.util_get_model_names()
    assert title.startswith("toyworld.safetensors [") and len(title.split("[")[1]) == 11  # 10 hex + "]"
    api.set_options({"sd_model_checkpoint": "toyworld"})  # by stem, as A1111 matches it
    assert api.get_options()["sd_model_checkpoint"] == title
    refused = api.set_options({"sd_model_checkpoint": "nope"})  # webuiapi returns the error body
    assert refused["field"] == "sd_model_checkpoint" and "no checkpoint 'nope'" in refused["detail"]
    assert api.util_get_current_model() == title


def test_webuiapi_progress_and_interrupt(server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        job = c.post("/sdapi/v2/jobs", json={"prompt": "a red ball", "seed": 4, "width": 64, "height": 64,
                                             "steps": 400}).json()  # fmt: skip
        deadline = time.monotonic() + LIMIT_S
        for _ in range(3000):
            progress = api.get_progress()
            if progress["state"]["job"] == job["id"] and progress["state"]["sampling_step"] > 0:
                break
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.01)
        assert progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
        assert progress["textinfo"].startswith("step ") and progress["current_image"]
        api.interrupt()
        deadline = time.monotonic() + LIMIT_S
        for _ in range(3000):
            state = c.get(f"/sdapi/v2/jobs/{job['id']}").json()["state"]
            if state != "running":
                break
            assert time.monotonic() < deadline, "interrupt did not stop the job"
            time.sleep(0.01)
        assert state == "canceled"
        assert api.get_progress()["state"]["job"] == ""
