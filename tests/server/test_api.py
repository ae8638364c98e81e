"""The A1111 API and the job API, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import embedded_model_path
from sdstudio.models.loading import file_sha256
from sdstudio.types import GenerationRequest, InitImage, Inpaint

webuiapi = pytest.importorskip("webuiapi")

TINY = {"width": 64, "height": 64, "steps": 3}
POLL_LIMIT_S = 30.0


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def poll(client: httpx.Client, job_id: str, states: set[str]) -> dict:
    deadline = time.monotonic() + POLL_LIMIT_S
    for _ in range(3000):
        job = client.get(f"/sdapi/v2/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['state']}"
        time.sleep(0.02)
    raise AssertionError("poll count exhausted")


def test_txt2img_webuiapi_matches_python_api(server, embedded_pipeline) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a")
    args = dict(prompt="a red ball", seed=1234, cfg_scale=5.0, **TINY)
    first = api.txt2img(**args)
    second = api.txt2img(**args)
    assert len(first.images) == 1
    text = first.images[0].info["parameters"]
    assert "a red ball" in text and "Seed: 1234" in text
    assert first.info["all_seeds"] == [1234]
    a, b = np.asarray(first.images[0].convert("RGB")), np.asarray(second.images[0].convert("RGB"))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    # webuiapi sends eta=1.0, A1111's default for ancestral samplers
    request = GenerationRequest(prompt="a red ball", seed=1234, cfg_scale=5.0, sampler="Euler a", eta=1.0,
                                width=64, height=64, steps=3)  # fmt: skip
    reference = embedded_pipeline(request).images[0]
    assert np.array_equal(a, np.asarray(reference.image.convert("RGB")))
    assert reference.infotext == text


def test_img2img_with_mask(server, embedded_pipeline) -> None:
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    payload = {"init_images": [b64png(init)], "mask": b64png(mask), "prompt": "a blue ball", "seed": 7,
               "denoising_strength": 0.8, "sampler_name": "Euler", "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False, **TINY}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(decode(r.json()["images"][0]).convert("RGB"))
    request = GenerationRequest(
        prompt="a blue ball", seed=7, sampler="Euler", steps=3, width=64, height=64,
        init=InitImage(init, strength=0.8), inpaint=Inpaint(mask=mask, blur=2, masked_content="original", only_masked=False),
    )  # fmt: skip
    want = np.asarray(embedded_pipeline(request).images[0].image.convert("RGB"))
    assert np.array_equal(got, want)
    assert np.array_equal(got[0, 0], [200, 30, 30])  # outside the mask: kept


def test_png_info_round_trip(server) -> None:
    r = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a green cube", "seed": 99, **TINY}, timeout=60
    )
    image = r.json()["images"][0]
    info = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": image}, timeout=10).json()
    assert info["parameters"]["Prompt"] == "a green cube"
    assert info["parameters"]["Seed"] == "99"
    assert info["parameters"]["Steps"] == "3"
    assert info["info"] == decode(image).info["parameters"]


def test_listing_shapes(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        title = f"toyworld.safetensors [{file_sha256(embedded_model_path())[:10]}]"
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == title
        samplers = c.get("/sdapi/v1/samplers").json()
        assert {"Euler a", "Euler"} <= {s["name"] for s in samplers}
        models = c.get("/sdapi/v1/sd-models").json()
        assert [m["title"] for m in models] == [title]
        assert c.get("/sdapi/v1/loras").json() == []
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
        assert "Karras" in [s["label"] for s in c.get("/sdapi/v1/schedulers").json()]
        progress = c.get("/sdapi/v1/progress").json()
        assert set(progress["state"]) >= {
            "job",
            "job_count",
            "sampling_step",
            "sampling_steps",
            "interrupted",
        }
        assert c.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
        assert (
            c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}).status_code == 422
        )


def test_v2_job_submit_poll_done_and_cancel_pending(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        slow = c.post("/sdapi/v2/jobs", json={"kind": "txt2img", "prompt": "a red ball", "seed": 1, **TINY,
                                              "steps": 12, "n_iter": 2}).json()  # fmt: skip
        queued = c.post(
            "/sdapi/v2/jobs", json={"kind": "txt2img", "prompt": "a red ball", "seed": 2, **TINY}
        ).json()
        assert queued["state"] == "pending"
        assert c.delete(f"/sdapi/v2/jobs/{queued['id']}").json()["canceled"] is True
        done = poll(c, slow["id"], {"done", "failed"})
        assert done["state"] == "done", done
        assert done["seeds"] == [1, 2]
        assert len(done["images"]) == 2 and "Seed: 2" in done["infotexts"][1]
        assert decode(done["images"][0]).size == (64, 64)
        canceled = c.get(f"/sdapi/v2/jobs/{queued['id']}").json()
        assert canceled["state"] == "canceled" and canceled["started"] is None
        assert not (server.data_dir / "outputs" / queued["id"]).exists()
        assert c.get("/sdapi/v2/jobs/nope").status_code == 404


def test_errors_name_the_field(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/sdapi/v1/png-info", json={"image": "not base64!!"})
        assert r.status_code == 422 and r.json()["field"] == "image"
        r = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"hello").decode()})
        assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 4096, "height": 64, "steps": 2})
        assert r.status_code == 422 and r.json()["field"] == "width"
        r = c.post("/sdapi/v1/img2img", json={"init_images": ["@@"], **TINY})
        assert r.status_code == 422 and r.json()["field"] == "init_images[0]"
        r = c.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", **TINY, "override_settings": {"CLIP_stop_at_last_layers": "two"}},
        )
        assert r.status_code == 422 and r.json()["field"] == "CLIP_stop_at_last_layers"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "No Such", **TINY})
        assert r.status_code == 422 and set(r.json()) >= {"error", "detail", "body", "errors"}


def test_basic_auth(auth_server) -> None:
    url = f"{auth_server.url}/sdapi/v1/options"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, auth=("alice", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{auth_server.url}/docs", timeout=10).status_code == 401
    assert httpx.get(url, auth=("alice", "s3cret"), timeout=10).status_code == 200


def test_body_limit(server) -> None:
    # a raw request declaring 65 MiB: refused from the header, before the body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /sdapi/v1/png-info HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {65 * 1024 * 1024}\r\n\r\n".encode()
        )
        status_line = s.recv(1024).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413"


def test_progress_and_cancel_running_job(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        job = c.post("/sdapi/v2/jobs", json={"prompt": "a red ball", "seed": 3, **TINY, "steps": 400}).json()
        deadline = time.monotonic() + POLL_LIMIT_S
        for _ in range(3000):
            progress = c.get("/sdapi/v1/progress").json()
            if progress["state"]["job"] == job["id"] and progress["state"]["sampling_step"] > 0:
                break
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.01)
        assert progress["state"]["sampling_steps"] == 400
        assert 0 < progress["progress"] < 1
        # the preview decoder's picture of the latest x0 estimate, at the image's size
        preview = decode(progress["current_image"])
        assert preview.size == (64, 64) and preview.mode == "RGB"
        assert len(np.unique(np.asarray(preview).reshape(-1, 3), axis=0)) > 1  # a picture, not a flat fill
        assert (
            c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        )
        running = c.get(f"/sdapi/v2/jobs/{job['id']}").json()
        assert running["state"] == "running" and running["steps"] == 400
        assert decode(running["preview"]).size == (64, 64)
        assert c.delete(f"/sdapi/v2/jobs/{job['id']}").json()["canceled"] is True
        assert poll(c, job["id"], {"canceled", "done", "failed"})["state"] == "canceled"
        assert c.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_image_bomb_is_refused(server) -> None:
    bomb = Image.new("1", (10_000, 10_000))  # 100 Mpx, over PIL's decompression-bomb limit; a tiny PNG
    r = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": b64png(bomb)}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "image"
    assert "too large" in r.json()["detail"]


def test_v1_hires_and_n_iter(server) -> None:
    payload = {"prompt": "a red ball", "seed": 10, "batch_size": 2, "n_iter": 2, "enable_hr": True, "hr_scale": 1.5,
               "denoising_strength": 0.5, "hr_second_pass_steps": 2, **TINY}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [decode(i).size for i in body["images"]] == [(96, 96)] * 4
    info = json.loads(body["info"])
    assert info["all_seeds"] == [10, 11, 12, 13]
    assert "Hires upscale: 1.5" in info["infotexts"][0]
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["steps"] == 3


def wait_for_step(c: httpx.Client, iteration: int) -> dict:
    deadline = time.monotonic() + POLL_LIMIT_S
    for _ in range(3000):
        state = c.get("/sdapi/v1/progress").json()["state"]
        if state["job"] and state["job_no"] == iteration and state["sampling_step"] > 0:
            return state
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    raise AssertionError("poll count exhausted")


def test_v1_skip_then_interrupt(server) -> None:
    payload = {"prompt": "a red ball", "seed": 5, "n_iter": 3, **TINY, "steps": 400}
    with httpx.Client(base_url=server.url, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.post, "/sdapi/v1/txt2img", json=payload)
        assert wait_for_step(c, 0)["job_count"] == 3
        c.post("/sdapi/v1/skip")
        wait_for_step(c, 1)  # the skip ended the first iteration only
        c.post("/sdapi/v1/interrupt")
        r = pending.result(timeout=POLL_LIMIT_S)
    assert r.status_code == 200
    assert r.json()["images"] == []
