"""What the web UI reads besides the generation routes: the history of ended jobs, their image files, the
extra-network cards, and payloads read back from infotexts (the UI's "send to")."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdstudio.server.a1111 import payload_from_infotext
from sdstudio.server.jobs import JobStore

WAIT_S = 60


def run_job(c: httpx.Client, payload: dict) -> dict:
    job_id = c.post("/sdapi/v2/jobs", json=payload).json()["id"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = c.get(f"/sdapi/v2/jobs/{job_id}", params={"preview": False}).json()
        if job["state"] in ("done", "failed", "canceled"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.05)
    raise AssertionError("job did not end")


def pixels(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_history_lists_searches_pages_serves_images_and_deletes(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        tag = f"hist{time.monotonic_ns()}"
        jobs = [run_job(c, {"prompt": f"a red ball {tag} {i}", "steps": 3, "seed": i, "batch_size": 2})
                for i in range(3)]  # fmt: skip
        listed = c.get("/sdapi/v2/history", params={"q": tag.upper()}).json()  # case-insensitive
        assert [j["id"] for j in listed] == [j["id"] for j in reversed(jobs)]  # the last to end first
        first = listed[0]
        assert first["prompt"] == f"a red ball {tag} 2" and first["state"] == "done"
        assert first["images"] == [f"/sdapi/v2/jobs/{first['id']}/images/{i}" for i in range(2)]
        assert first["payloads"][1]["seed"] == 3 and first["payloads"][1]["prompt"] == first["prompt"]
        image = c.get(first["images"][1])
        assert image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).info["parameters"] == first["infotexts"][1]
        # pages: the next page starts after the previous page's last job
        page1 = c.get("/sdapi/v2/history", params={"q": tag, "limit": 2}).json()
        page2 = c.get(
            "/sdapi/v2/history", params={"q": tag, "limit": 2, "before": page1[-1]["finished"]}
        ).json()
        assert [j["id"] for j in page1 + page2] == [j["id"] for j in listed]
        assert c.get("/sdapi/v2/history", params={"limit": 0}).status_code == 422
        assert c.get("/sdapi/v2/history", params={"q": f"{tag}-nothing"}).json() == []
        # images that do not exist: 404, never a path outside the job's folder
        for bad in (f"/sdapi/v2/jobs/{first['id']}/images/2", f"/sdapi/v2/jobs/{first['id']}/images/-1",
                    "/sdapi/v2/jobs/nosuchjob/images/0", f"/sdapi/v2/jobs/{first['id']}/images/..%2F..%2Fjobs.sqlite"):  # fmt: skip
            assert c.get(bad).status_code in (404, 422), bad
        # delete: the row and the files go; a second delete is 404
        deleted = c.delete(f"/sdapi/v2/history/{first['id']}")
        assert deleted.json() == {"id": first["id"], "deleted": True}
        assert not (server.data_dir / "outputs" / first["id"]).exists()
        assert c.get(f"/sdapi/v2/jobs/{first['id']}").status_code == 404
        assert c.delete(f"/sdapi/v2/history/{first['id']}").status_code == 404
        assert [j["id"] for j in c.get("/sdapi/v2/history", params={"q": tag}).json()] == [
            jobs[1]["id"],
            jobs[0]["id"],
        ]


def test_a_job_not_ended_cannot_be_deleted(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        blocker = c.post("/sdapi/v2/jobs", json={"prompt": "a long job", "steps": 200, "n_iter": 30}).json()[
            "id"
        ]
        waiting = c.post("/sdapi/v2/jobs", json={"prompt": "behind it", "steps": 2}).json()["id"]
        try:
            r = c.delete(f"/sdapi/v2/history/{waiting}")
            assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
            assert c.get(f"/sdapi/v2/jobs/{waiting}").json()["state"] == "pending"
        finally:
            c.delete(f"/sdapi/v2/jobs/{waiting}")
            c.delete(f"/sdapi/v2/jobs/{blocker}")
        deadline = time.monotonic() + WAIT_S
        while c.get(f"/sdapi/v2/jobs/{blocker}").json()["state"] != "canceled":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_store_history_and_delete(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.submit("txt2img", {"prompt": p}) for p in ("A Cat", "a dog", "cat and dog")]
    for job_id in ids[:2]:
        store.claim_next("w")
        store.complete(job_id, {"files": []})
    assert [j.id for j in store.history("cat")] == [ids[0]]  # the third is still pending
    assert not store.delete(ids[2])  # not ended
    store.cancel_pending(ids[2])
    assert [j.id for j in store.history("CAT")] == [ids[2], ids[0]]
    assert store.delete(ids[0]) and store.get(ids[0]) is None and not store.delete(ids[0])
    store.close()


# payloads read back from infotexts make the same images: every parameter the infotext records comes back
# (a field the reader missed, a clip skip or a variation seed, changes the image and fails these)
@pytest.mark.parametrize(
    "payload",
    [
        {"prompt": "a red ball, (blue square:1.2)", "negative_prompt": "green", "steps": 5, "seed": 11,
         "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 5.5, "subseed": 99, "subseed_strength": 0.3,
         "override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}},
        {"prompt": "a yellow triangle", "steps": 4, "seed": 5, "sampler_name": "Euler a", "eta": 0.6,
         "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.55,
         "hr_upscaler": "Latent (nearest)", "override_settings": {"s_min_uncond": 0.0}},
    ],
)  # fmt: skip
def test_payload_from_infotext_makes_the_same_image(server, payload) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job = run_job(c, payload)
        again = payload_from_infotext(job["infotexts"][0])
        assert job["payloads"][0] == again
        replay = run_job(c, again)
    assert replay["infotexts"] == job["infotexts"]
    assert np.array_equal(pixels(replay["images"][0]), pixels(job["images"][0]))


def test_inpaint_payload_from_infotext_makes_the_same_image(server) -> None:
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 40))
    b64 = {}
    for name, im in (("init", init), ("mask", mask)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        b64[name] = base64.b64encode(buf.getvalue()).decode()
    payload = {"prompt": "a green ball", "steps": 4, "seed": 8, "denoising_strength": 0.6, "mask_blur": 2,
               "inpainting_fill": 2, "inpaint_full_res": True, "inpaint_full_res_padding": 8, "width": 64, "height": 64}  # fmt: skip
    images = {"init_images": [b64["init"]], "mask": b64["mask"]}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job = run_job(c, {"kind": "img2img", **payload, **images})
        again = payload_from_infotext(job["infotexts"][0])
        assert {k: again[k] for k in payload} == payload
        replay = run_job(c, {"kind": "img2img", **again, **images})
    assert np.array_equal(pixels(replay["images"][0]), pixels(job["images"][0]))


def test_payload_from_an_a1111_infotext() -> None:
    text = ("masterpiece, <lora:x:0.5>\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 7, Seed: 123, Size: 512x768, Model hash: abcdef1234, Model: v1-5, Denoising strength: 0.4, "
            "Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1, Steps2: bad")  # fmt: skip
    assert payload_from_infotext(text) == {
        "prompt": "masterpiece, <lora:x:0.5>", "negative_prompt": "lowres", "steps": 30, "sampler_name": "DPM++ 2M",
        "scheduler": "Karras", "cfg_scale": 7.0, "seed": 123, "width": 512, "height": 768, "denoising_strength": 0.4,
        "hr_scale": 2.0, "hr_upscaler": "Latent", "enable_hr": True, "resize_mode": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "v1-5"},
    }  # fmt: skip
    # a value that does not parse is left out, the rest restored
    assert payload_from_infotext("x\nSteps: many, Sampler: Euler, Seed: 5") == {
        "prompt": "x", "negative_prompt": "", "sampler_name": "Euler", "seed": 5, "resize_mode": 0}  # fmt: skip


def test_network_cards_and_previews(tmp_path, embedded_pipeline) -> None:
    import torch
    from safetensors.torch import save_file

    from sdstudio.cli import embedded_model_path
    from sdstudio.server.app import ServerConfig
    from tests.server.conftest import loader, serve

    loras, hypers, embeds = tmp_path / "loras", tmp_path / "hypernetworks", tmp_path / "embeddings"
    for d in (loras / "sub", hypers, embeds):
        d.mkdir(parents=True)
    t = {"a": torch.zeros(2)}
    save_file(t, loras / "sub" / "style.safetensors", metadata={"ss_output_name": "style_v2", "ss_network_dim": "8",
                                                                 "ss_tag_frequency": "x" * 2000})  # fmt: skip
    Image.new("RGB", (8, 8), (1, 2, 3)).save(loras / "sub" / "style.preview.png")
    save_file(t, loras / "bare.safetensors")
    (loras / "notes.txt").write_text("not a network")
    torch.save({"x": 1}, hypers / "hn.pt")
    Image.new("RGB", (8, 8)).save(hypers / "hn.jpg")
    torch.save({"x": 1}, embeds / "emb.pt")
    config = ServerConfig(model=embedded_model_path(), data_dir=tmp_path / "data", lora_dirs=(loras,),
                          hypernetwork_dirs=(hypers,), embeddings_dir=embeds)  # fmt: skip
    servers = serve(config, loader(embedded_pipeline))
    running = next(servers)
    try:
        with httpx.Client(base_url=running.url, timeout=10) as c:
            cards = c.get("/sdapi/v2/networks").json()
            assert [(x["name"], x["tag"]) for x in cards["lora"]] == [
                ("bare", "<lora:bare:1>"),
                ("style", "<lora:style:1>"),
            ]
            style = cards["lora"][1]
            assert (
                style["metadata"]["ss_network_dim"] == "8"
                and len(style["metadata"]["ss_tag_frequency"]) == 501
            )
            assert cards["lora"][0]["preview"] is None
            preview = c.get(style["preview"])
            assert preview.headers["content-type"] == "image/png" and Image.open(
                io.BytesIO(preview.content)
            ).size == (8, 8)
            assert [(x["name"], x["tag"]) for x in cards["hypernetwork"]] == [("hn", "<hypernet:hn:1>")]
            assert c.get(cards["hypernetwork"][0]["preview"]).headers["content-type"] == "image/jpeg"
            assert [(x["name"], x["tag"]) for x in cards["embedding"]] == [("emb", "emb")]
            for bad in ("/sdapi/v2/networks/lora/bare/preview", "/sdapi/v2/networks/nokind/style/preview",
                        "/sdapi/v2/networks/lora/..%2F..%2Fnotes/preview"):  # fmt: skip
                assert c.get(bad).status_code == 404, bad
            # A1111's listing carries the LoRA's metadata and its alias
            v1 = {x["name"]: x for x in c.get("/sdapi/v1/loras").json()}
            assert v1["style"]["alias"] == "style_v2" and v1["style"]["metadata"]["ss_network_dim"] == "8"
    finally:
        servers.close()
