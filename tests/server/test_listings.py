"""The rest of A1111's /sdapi/v1 listings, with v1.10's shapes."""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from sdstudio.pipelines.hires import LATENT_UPSCALERS
from sdstudio.toyworld import world


def test_listings_have_a1111_shapes(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        upscalers = c.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
        assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
        modes = c.get("/sdapi/v1/latent-upscale-modes").json()
        assert modes == [{"name": n} for n in LATENT_UPSCALERS] and modes[0] == {"name": "Latent"}
        assert c.get("/sdapi/v1/sd-vae").json() == []
        assert c.get("/sdapi/v1/hypernetworks").json() == []
        assert c.get("/sdapi/v1/prompt-styles").json() == []
        assert c.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
        assert c.get("/sdapi/v1/script-info").json() == []
        for route in ("refresh-vae", "refresh-loras", "refresh-embeddings", "refresh-checkpoints"):
            r = c.post(f"/sdapi/v1/{route}")
            assert (r.status_code, r.json()) == (200, None), route
        flags = c.get("/sdapi/v1/cmd-flags").json()
        assert flags["ckpt"].endswith("toyworld.safetensors") and flags["ckpt_dir"] is None
        assert flags["api"] is True and flags["cors_allow_origins"] is None and flags["max_size"] == 256
        memory = c.get("/sdapi/v1/memory").json()
        assert memory["ram"]["total"] >= memory["ram"]["free"] > 0
        assert memory["models"]["loaded"][0].startswith("toyworld.safetensors [")


def test_interrogate_captions_with_the_toy_pair(server) -> None:
    """A1111's "Interrogate CLIP": the server's captioner (no --clip: the toy world's pair) reads a render."""
    scene = world.Scene((world.ObjectSpec("star", "red", "large", "left"),), "sky")
    buf = io.BytesIO()
    Image.fromarray(world.render(scene)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/sdapi/v1/interrogate", json={"image": image, "model": "clip"})
        assert r.status_code == 200, r.text
        assert r.json()["caption"].startswith("a large red star on the left on a"), r.json()
        r = c.post("/sdapi/v1/interrogate", json={"image": image, "model": "deepdanbooru"})
        assert (r.status_code, r.json()["field"]) == (422, "model") and "only 'clip'" in r.json()["detail"]
        r = c.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
        assert (r.status_code, r.json()["field"]) == (422, "image")
