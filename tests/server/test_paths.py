"""Paths in requests never reach outside the configured folders, and no URL is fetched: names are looked
up among the files the folders hold (checkpoints by title, VAEs, LoRAs), images come as base64 only."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import embedded_model_path
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from tests.server.conftest import Running, loader, serve


@pytest.fixture(scope="module")
def jail(tmp_path_factory, embedded_pipeline) -> Iterator[tuple[Running, object]]:
    root = tmp_path_factory.mktemp("jail")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    outside = root / "outside.safetensors"  # a real checkpoint, one folder above --models-dir
    shutil.copy(embedded_model_path(), outside)
    config = ServerConfig(model=embedded_model_path(), data_dir=root / "data", models_dir=models,
                          lora_dirs=(loras,), limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    for running in serve(config, loader(embedded_pipeline)):
        yield running, outside


BASE = {"prompt": "a red circle", "steps": 2, "seed": 3, "width": 64, "height": 64}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"override_settings": {"sd_model_checkpoint": "../outside.safetensors"}}, "sd_model_checkpoint"),
        ({"override_settings": {"sd_model_checkpoint": "OUTSIDE"}}, "sd_model_checkpoint"),
        ({"override_settings": {"sd_vae": "../outside.safetensors"}}, "sd_vae"),
        ({"override_settings": {"sd_vae": "/etc/passwd"}}, "sd_vae"),
    ],
)
def test_checkpoint_and_vae_paths_outside_the_folders_are_refused(jail, change, field):
    running, outside = jail
    value = next(iter(change["override_settings"].values()))
    if value == "OUTSIDE":
        change = {"override_settings": {"sd_model_checkpoint": str(outside)}}  # an absolute path
    r = httpx.post(f"{running.url}/sdapi/v1/txt2img", json=BASE | change, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json().get("field", "").endswith(field), r.json()


def test_switching_the_default_to_a_path_outside_is_refused(jail):
    running, outside = jail
    for title in (str(outside), "../outside.safetensors", "../outside"):
        r = httpx.post(f"{running.url}/sdapi/v1/options", json={"sd_model_checkpoint": title}, timeout=30)
        assert r.status_code == 422, (title, r.text)
    titles = [m["title"] for m in httpx.get(f"{running.url}/sdapi/v1/sd-models", timeout=30).json()]
    assert not any("outside" in t for t in titles)


def test_a_lora_tag_with_a_path_loads_nothing(jail):
    """``<lora:../evil:1>`` names no file of --lora-dir: skipped as an unknown LoRA (A1111 warns and goes on),
    the image the same as without the tag, the file above the folder never read."""
    running, _ = jail
    (running.data_dir.parent / "evil.safetensors").write_bytes(b"not a lora")

    def pixels(prompt: str) -> np.ndarray:
        r = httpx.post(f"{running.url}/sdapi/v1/txt2img", json=BASE | {"prompt": prompt}, timeout=60)
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))

    np.testing.assert_array_equal(pixels("a red circle <lora:../evil:1>"), pixels("a red circle"))


def test_image_fields_take_base64_only_no_url_is_fetched(jail):
    running, _ = jail
    payload = BASE | {"init_images": [f"{running.url}/sdapi/v1/sd-models"], "denoising_strength": 0.5}
    r = httpx.post(f"{running.url}/sdapi/v1/img2img", json=payload, timeout=60)
    assert r.status_code == 422 and r.json().get("field", "").startswith("init_images"), r.text
    r = httpx.post(f"{running.url}/sdapi/v1/png-info", json={"image": "file:///etc/passwd"}, timeout=30)
    assert r.status_code == 422 and "root:" not in r.text, r.text
