"""sd-webui-controlnet's API (alwayson_scripts units, /controlnet/*) and SDXL's refiner fields, live."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.control.preprocess import PREPROCESSORS, preprocess
from sdstudio.engine import Pipeline
from sdstudio.io.infotext import parse_infotext
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from sdstudio.types import ControlSpec, GenerationRequest, InitImage
from tests.server.conftest import Running, serve
from tests.server.test_api import b64png, decode

LIMIT_S = 60.0
TINY = {"width": 64, "height": 64, "steps": 3, "sampler_name": "Euler", "seed": 5, "prompt": "a red square"}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def old_a1111_hash(path: Path) -> str:
    """A1111's ``model_hash``, written out here: sha256 of bytes [1 MiB, 1 MiB + 64 KiB), 8 hex digits."""
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def photo() -> Image.Image:
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:40, 8:30] = (200, 60, 60)
    picture[44:60, 36:60] = (40, 180, 220)
    return Image.fromarray(picture)


def loader():
    def load(path: Path, vae: Path | None = None, refiner: Path | None = None) -> Pipeline:
        return Pipeline.from_file(path, vae=vae, refiner=refiner)

    return load


@pytest.fixture(scope="module")
def control_files(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from sdstudio.models.configs import PRESETS
    from sdstudio.models.loading import save_model
    from sdstudio.models.stablediffusion import random_model
    from tests.reference import random_controlnet, randomise_

    folder = tmp_path_factory.mktemp("control-serve")
    # a VAE of four levels: ControlNets read their image at 8x the latents' size
    config = dataclasses.replace(
        PRESETS["tiny"], vae=dataclasses.replace(PRESETS["tiny"].vae, ch_mult=(1, 1, 2, 2))
    )
    model = random_model(config)
    randomise_(model, seed=1)
    save_model(model, folder / "base.safetensors", dtype=torch.float32)
    nets = folder / "nets"
    (nets / "sub").mkdir(parents=True)
    state = random_controlnet(config.unet, seed=2).state_dict()
    save_file(
        {"control_model." + k: v.contiguous() for k, v in state.items()}, str(nets / "edges.safetensors")
    )
    # listed only: over 1 MiB, so that A1111's old hash reads real bytes
    (nets / "sub" / "big.pth").write_bytes(np.random.default_rng(0).bytes(0x120000))
    (nets / "notes.txt").write_text("not a ControlNet")
    return folder


@pytest.fixture(scope="module")
def control_server(tmp_path_factory, control_files) -> Iterator[Running]:
    config = ServerConfig(model=control_files / "base.safetensors", data_dir=tmp_path_factory.mktemp("cn-data"),
                          controlnet_dirs=(control_files / "nets",),
                          limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    yield from serve(config, loader())


@pytest.fixture(scope="module")
def control_pipeline(control_files) -> Pipeline:
    return Pipeline.from_file(control_files / "base.safetensors")


def edges_title(control_files: Path) -> str:
    return f"edges [{old_a1111_hash(control_files / 'nets' / 'edges.safetensors')}]"


def unit(control_files: Path, **fields) -> dict:
    return {"enabled": True, "image": b64png(photo()), "module": "canny", "model": edges_title(control_files),
            "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.9, "control_mode": 1, "resize_mode": 1,
            "threshold_a": 50, "threshold_b": 150, "processor_res": 512, "pixel_perfect": False, "mask": None,
            **fields}  # fmt: skip


def post(running: Running, route: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{running.url}{route}", json=payload, timeout=LIMIT_S)


def generated(running: Running, route: str, payload: dict) -> tuple[Image.Image, dict[str, str]]:
    r = post(running, route, payload)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    return image, parse_infotext(image.info["parameters"])[2]


def test_txt2img_controlnet_unit_equals_the_engines_control_spec(
    control_server, control_files, control_pipeline
):
    plain, plain_params = generated(control_server, "/sdapi/v1/txt2img", TINY)
    assert not any(k.startswith("ControlNet") for k in plain_params)
    payload = {**TINY, "alwayson_scripts": {"controlnet": {"args": [unit(control_files)]}}}
    controlled, params = generated(control_server, "/sdapi/v1/txt2img", payload)
    assert np.abs(pixels(controlled) - pixels(plain)).mean() > 1
    entry = params["ControlNet 0"]
    for part in ("Module: canny", "Model: edges [", "Weight: 0.8", "Resize Mode: Crop and Resize",
                 "Threshold A: 50", "Threshold B: 150", "Guidance Start: 0", "Guidance End: 0.9",
                 "Control Mode: My prompt is more important"):  # fmt: skip
        assert part in entry, entry
    # the unit is the ControlSpec the engine takes, the file the one the title names
    spec = ControlSpec(model=str(control_files / "nets" / "edges.safetensors"), image=photo(), preprocessor="canny",
                       weight=0.8, start=0.0, end=0.9, mode="My prompt is more important",
                       resize_mode="Crop and Resize", threshold_a=50, threshold_b=150)  # fmt: skip
    request = GenerationRequest(prompt="a red square", seed=5, steps=3, sampler="Euler", width=64, height=64,
                                controls=(spec,))  # fmt: skip
    reference = control_pipeline(request).images[0]
    assert np.array_equal(pixels(controlled), pixels(reference.image))
    assert reference.infotext == controlled.info["parameters"]


def test_disabled_units_are_skipped_and_names_are_the_extensions(control_server, control_files):
    plain, _ = generated(control_server, "/sdapi/v1/txt2img", TINY)
    off = {
        **TINY,
        "alwayson_scripts": {"ControlNet": {"args": [unit(control_files, enabled=False, model="nope")]}},
    }
    image, params = generated(control_server, "/sdapi/v1/txt2img", off)
    assert np.array_equal(pixels(image), pixels(plain)) and "ControlNet 0" not in params
    # the model by name without its hash, or with another install's hash; input_image and guidance (the
    # extension's older keys); the modes by their names
    first = unit(control_files)
    older = unit(control_files, model="edges [d14c016b]", control_mode="My prompt is more important",
                 resize_mode="Crop and Resize", guidance_end=None)  # fmt: skip
    older["input_image"], older["guidance"] = older.pop("image"), 0.9
    by_name = unit(control_files, model="Edges")
    images = [generated(control_server, "/sdapi/v1/txt2img",
                        {**TINY, "alwayson_scripts": {"controlnet": {"args": [None, u]}}})[0]
              for u in (first, older, by_name)]  # fmt: skip
    assert np.array_equal(pixels(images[0]), pixels(images[1]))
    assert np.array_equal(pixels(images[0]), pixels(images[2]))


def test_img2img_unit_without_image_uses_the_init_image(control_server, control_files, control_pipeline):
    init = photo()
    base = {**TINY, "init_images": [b64png(init)], "denoising_strength": 0.6}
    own = unit(control_files, image=None, module="none", threshold_a=-1, threshold_b=-1)
    explicit = unit(control_files, image=b64png(init), module="none")  # "none" takes no thresholds: ignored
    a, params = generated(
        control_server, "/sdapi/v1/img2img", {**base, "alwayson_scripts": {"controlnet": {"args": [own]}}}
    )
    b, _ = generated(
        control_server,
        "/sdapi/v1/img2img",
        {**base, "alwayson_scripts": {"controlnet": {"args": [explicit]}}},
    )
    assert np.array_equal(pixels(a), pixels(b)) and "Module: none" in params["ControlNet 0"]
    spec = ControlSpec(model=str(control_files / "nets" / "edges.safetensors"), weight=0.8, end=0.9,
                       mode="My prompt is more important")  # fmt: skip
    request = GenerationRequest(prompt="a red square", seed=5, steps=3, sampler="Euler", width=64, height=64,
                                init=InitImage(init, strength=0.6), controls=(spec,))  # fmt: skip
    assert np.array_equal(pixels(a), pixels(control_pipeline(request).images[0].image))


def test_controlnet_routes_answer_as_the_extension(control_server, control_files):
    with httpx.Client(base_url=control_server.url, timeout=LIMIT_S) as c:
        assert c.get("/controlnet/version").json() == {"version": 2}
        assert c.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
        big = control_files / "nets" / "sub" / "big.pth"
        assert c.get("/controlnet/model_list").json() == {
            "model_list": [f"big [{old_a1111_hash(big)}]", edges_title(control_files)]
        }
        modules = c.get("/controlnet/module_list").json()
        assert modules["module_list"] == list(PREPROCESSORS) and "canny" in modules["module_list"]
        sliders = modules["module_detail"]["canny"]["sliders"]
        assert [(s["name"], s["value"], s["min"], s["max"]) for s in sliders] == [
            ("low_threshold", 100, 0, 255), ("high_threshold", 200, 0, 255)]  # fmt: skip
        labels = c.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
        assert labels == [p.label for p in PREPROCESSORS.values()] and "inpaint_global_harmonious" in labels
        image = photo()
        detect = {"controlnet_module": "canny", "controlnet_input_images": [b64png(image)] * 2,
                  "controlnet_processor_res": 512, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}  # fmt: skip
        r = c.post("/controlnet/detect", json=detect)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["info"] == "Success" and len(body["images"]) == 2
        want = pixels(preprocess("canny", image, low_threshold=50, high_threshold=150).image)
        assert want.max() == 255 and all(np.array_equal(pixels(decode(b)), want) for b in body["images"])
        # -1: the preprocessor's defaults; an inpaint module takes one mask per image
        detect.update(
            controlnet_input_images=[b64png(image)], controlnet_threshold_a=-1, controlnet_threshold_b=-1
        )
        r = c.post("/controlnet/detect", json=detect)
        assert np.array_equal(pixels(decode(r.json()["images"][0])), pixels(preprocess("canny", image).image))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        detect.update(controlnet_module="inpaint_global_harmonious", controlnet_masks=[b64png(mask)])
        r = c.post("/controlnet/detect", json=detect)
        assert r.status_code == 200, r.text
        assert np.array_equal(
            pixels(decode(r.json()["images"][0])), pixels(preprocess("inpaint", image, mask=mask).image)
        )


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"controlnet_module": "depth_midas"},
            "controlnet_module",
            "unknown ControlNet preprocessor 'depth_midas'",
        ),
        (
            {"controlnet_module": "canny", "controlnet_input_images": []},
            "controlnet_input_images",
            "no image selected",
        ),
        ({"controlnet_module": "canny", "controlnet_threshold_a": 300}, "controlnet_threshold_a", "0..255"),
        ({"controlnet_module": "inpaint"}, "controlnet_masks", "one base64 mask per image"),
        ({"controlnet_input_images": ["not base64!"]}, "controlnet_input_images[0]", "invalid base64"),
    ],
)
def test_detect_refuses_bad_input(control_server, body, field, message):
    body = {"controlnet_input_images": [b64png(photo())], **body}
    r = post(control_server, "/controlnet/detect", body)
    assert r.status_code == 422 and r.json()["field"] == field and message in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"module": "depth_midas"}, ".module", "unknown ControlNet preprocessor 'depth_midas'"),
        ({"model": "nosuch [12345678]"}, ".model", "no ControlNet model 'nosuch [12345678]'; known: big ["),
        ({"model": "None"}, ".model", "an enabled unit needs a ControlNet model"),
        ({"control_mode": "Prompt first"}, ".control_mode", "unknown control mode 'Prompt first'"),
        ({"control_mode": 3}, ".control_mode", "unknown control mode 3"),
        ({"resize_mode": "Stretch"}, ".resize_mode", "unknown control resize mode 'Stretch'"),
        ({"image": "data:image/png;base64,????"}, ".image", "invalid base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, ".image", "not a readable image"),
        ({"image": None}, ".image", "needs an image"),
        ({"weight": 2.5}, ".weight", "expected a number in 0..2 (got 2.5)"),
        ({"weight": "1"}, ".weight", "expected a number in 0..2"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, ".guidance_start", "after guidance_end 0.2"),
        ({"threshold_a": 300}, ".threshold_a", "low_threshold must be in 0..255, got 300"),
        ({"threshold_b": 1.5}, ".threshold_b", "high_threshold must be an integer"),
        ({"module": "inpaint_only"}, ".module", "needs img2img's inpainting mask"),
        ({"mask": "WHITE"}, ".mask", "a unit's own mask is not supported"),
    ],
)
def test_bad_units_are_422_and_nothing_is_queued(control_server, control_files, change, field, message):
    if change.get("mask") == "WHITE":
        change = {"mask": b64png(Image.new("L", (64, 64), 255))}
    store = control_server.app.state.store
    before = len(store.history(limit=200))
    payload = {
        **TINY,
        "alwayson_scripts": {
            "controlnet": {"args": [unit(control_files, enabled=False), unit(control_files, **change)]}
        },
    }
    for route in ("/sdapi/v1/txt2img", "/sdapi/v2/jobs"):
        r = post(control_server, route, payload)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "alwayson_scripts.controlnet.args[1]" + field and message in body["detail"], (
            body
        )
    assert store.pending_count() == 0 and len(store.history(limit=200)) == before


def test_unit_payload_shape_errors(control_server, control_files):
    args = "alwayson_scripts.controlnet.args"
    for scripts, field in (({"controlnet": {"args": "x"}}, args), ({"controlnet": {"args": [3]}}, f"{args}[0]"),
                           ([1], "alwayson_scripts"), ({"controlnet": {"args": [unit(control_files)] * 9}}, args)):  # fmt: skip
        r = post(control_server, "/sdapi/v1/txt2img", {**TINY, "alwayson_scripts": scripts})
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_webuiapi_controlnet_unit_and_routes(control_server, control_files):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=control_server.port, sampler="Euler")
    title = edges_title(control_files)
    assert api.controlnet_version() == 2 and title in api.controlnet_model_list()
    assert api.controlnet_module_list() == list(PREPROCESSORS)
    # webuiapi's detect sends controlnet_images as data URLs
    detected = api.controlnet_detect([photo()], module="canny", threshold_a=60, threshold_b=120)
    want = preprocess("canny", photo(), low_threshold=60, high_threshold=120).image
    assert np.array_equal(pixels(decode(detected.json["images"][0])), pixels(want))
    cn = webuiapi.ControlNetUnit(image=photo(), module="canny", model=title, weight=0.7, control_mode=2,
                                 guidance_end=0.8)  # fmt: skip
    # alwayson_scripts given: webuiapi's default dict is shared between calls, and it would keep the unit
    result = api.txt2img(prompt="a red square", seed=5, steps=3, width=64, height=64, eta=None,
                         controlnet_units=[cn], alwayson_scripts={})  # fmt: skip
    params = parse_infotext(result.images[0].info["parameters"])[2]
    entry = params["ControlNet 0"]
    for part in ("Module: canny", "Weight: 0.7", "Resize Mode: Resize and Fill", "Threshold A: 64", "Threshold B: 64",
                 "Guidance End: 0.8", "Control Mode: ControlNet is more important"):  # fmt: skip
        assert part in entry, entry
    # the same unit as a plain payload (webuiapi's defaults written out) gives the same image
    raw = unit(control_files, weight=0.7, control_mode=2, guidance_end=0.8, resize_mode="Resize and Fill",
               threshold_a=64, threshold_b=64)  # fmt: skip
    payload = {**TINY, "scheduler": "automatic", "alwayson_scripts": {"controlnet": {"args": [raw]}}}
    image, _ = generated(control_server, "/sdapi/v1/txt2img", payload)
    assert np.array_equal(pixels(result.images[0]), pixels(image))


def test_serve_config_takes_controlnet_folders(tmp_path, control_files):
    from sdstudio.cli import build_parser, embedded_model_path
    from sdstudio.errors import SdStudioError
    from sdstudio.server.app import config_from_args

    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert config_from_args(args, embedded_model_path())[0].controlnet_dirs == ()
    args.controlnet_dir = [str(control_files / "nets")]  # --controlnet-dir DIR, repeatable
    assert config_from_args(args, embedded_model_path())[0].controlnet_dirs == (control_files / "nets",)
    args.controlnet_dir = [str(tmp_path / "missing")]
    with pytest.raises(SdStudioError, match="missing: folder does not exist"):
        config_from_args(args, embedded_model_path())


# ---------------------------------------------------------------------------------------------------
# SDXL's refiner


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory) -> Path:
    from tests.reference import write_random_checkpoint

    folder = tmp_path_factory.mktemp("sdxl-serve")
    # fan-in-scaled weights: LDM's zero-initialised outputs would make every image alike
    write_random_checkpoint("tiny-sdxl", folder / "xlbase.safetensors", seed=3)
    write_random_checkpoint("tiny-sdxl-refiner", folder / "xlrefiner.safetensors", seed=4)
    return folder


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory, sdxl_files) -> Iterator[Running]:
    config = ServerConfig(model=sdxl_files / "xlbase.safetensors", models_dir=sdxl_files,
                          data_dir=tmp_path_factory.mktemp("sdxl-data"),
                          limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    yield from serve(config, loader())


XL = {"prompt": "a cat", "seed": 9, "steps": 4, "sampler_name": "DDIM", "width": 64, "height": 64}


def test_refiner_from_the_payload(sdxl_server, sdxl_files):
    refiner = sdxl_files / "xlrefiner.safetensors"
    titles = [m["title"] for m in httpx.get(f"{sdxl_server.url}/sdapi/v1/sd-models", timeout=10).json()]
    title = next(t for t in titles if t.startswith("xlrefiner.safetensors ["))
    plain, plain_params = generated(sdxl_server, "/sdapi/v1/txt2img", XL)
    assert "Refiner" not in plain_params
    for none in ("None", ""):
        same, _ = generated(
            sdxl_server, "/sdapi/v1/txt2img", {**XL, "refiner_checkpoint": none, "refiner_switch_at": 0.5}
        )
        assert np.array_equal(pixels(same), pixels(plain))
    refined, params = generated(
        sdxl_server, "/sdapi/v1/txt2img", {**XL, "refiner_checkpoint": title, "refiner_switch_at": 0.5}
    )
    assert params["Refiner"].startswith("xlrefiner [") and params["Refiner switch at"] == "0.5"
    assert np.abs(pixels(refined) - pixels(plain)).mean() > 1
    # the engine with the same refiner loaded beside the base gives the same pixels
    pipeline = Pipeline.from_file(sdxl_files / "xlbase.safetensors", refiner=refiner)
    request = GenerationRequest(
        prompt="a cat", seed=9, steps=4, sampler="DDIM", width=64, height=64, refiner_switch_at=0.5
    )
    reference = pipeline(request).images[0]
    assert (
        np.array_equal(pixels(refined), pixels(reference.image))
        and reference.infotext == refined.info["parameters"]
    )
    # by stem, through the job API; no switch given: A1111's UI default 0.8
    with httpx.Client(base_url=sdxl_server.url, timeout=LIMIT_S) as c:
        job_id = c.post("/sdapi/v2/jobs", json={**XL, "refiner_checkpoint": "xlrefiner"}).json()["id"]
        deadline = time.monotonic() + LIMIT_S
        for _ in range(3000):
            job = c.get(f"/sdapi/v2/jobs/{job_id}").json()
            if job["state"] not in ("pending", "running"):
                break
            assert time.monotonic() < deadline, "job did not end"
            time.sleep(0.02)
        assert job["state"] == "done", job
        job_params = parse_infotext(job["infotexts"][0])[2]
        assert job_params["Refiner switch at"] == "0.8" and job_params["Refiner"] == params["Refiner"]
        # the infotext's "Refiner: xlrefiner [hash]" and switch come back as payload fields that refine again
        again = job["payloads"][0]
        assert again["refiner_checkpoint"] == params["Refiner"] and again["refiner_switch_at"] == 0.8
        image, _ = generated(sdxl_server, "/sdapi/v1/txt2img", again)
        assert np.array_equal(pixels(image), pixels(decode(job["images"][0])))
        loaded = c.get("/sdapi/v1/memory").json()["models"]["loaded"]
        assert sum(t.startswith("xlbase.safetensors") for t in loaded) == 2  # with and without its refiner


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"refiner_checkpoint": "nope"}, "refiner_checkpoint", "no checkpoint 'nope'; known: "),
        ({"refiner_checkpoint": 3}, "refiner_checkpoint", "expected a checkpoint title"),
        (
            {"refiner_checkpoint": "xlrefiner", "refiner_switch_at": 1.5},
            "refiner_switch_at",
            "must be in 0..1",
        ),
        (
            {"refiner_checkpoint": "xlrefiner", "refiner_switch_at": "late"},
            "refiner_switch_at",
            "expected float",
        ),
    ],
)
def test_bad_refiner_fields_are_422(sdxl_server, fields, field, message):
    store = sdxl_server.app.state.store
    before = len(store.history(limit=200))
    r = post(sdxl_server, "/sdapi/v1/txt2img", {**XL, **fields})
    assert r.status_code == 422 and r.json()["field"] == field and message in r.json()["detail"], r.text
    assert store.pending_count() == 0 and len(store.history(limit=200)) == before
