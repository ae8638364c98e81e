"""The web UI in a real headless Chromium (Debian's, launched by path), against a live server on 127.0.0.1
with the embedded model. Each test fails on a console error or on a request to any other host, and writes
a screenshot of its screen to build/ui-screenshots/ (not committed) for a reviewer to look at."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdstudio.cli import embedded_model_path
from sdstudio.pipelines.inpaint import blur_mask
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from tests.server.conftest import Running, loader, serve

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = os.environ.get("SDSTUDIO_CHROMIUM", "/usr/bin/chromium")
# the flags a sandboxed, offline CI machine needs: no background requests to Google's hosts
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"
WAIT_MS = 60_000  # the longest any one step may take (a generation on a busy 2-core machine)

if not Path(CHROMIUM).exists():
    if os.environ.get("SDSTUDIO_REQUIRE_BROWSER"):
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    pytest.skip(
        f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def network_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder with one file (kohya metadata, a preview beside it) and one without a preview."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("loras")
    tensors = {
        "lora_unet_x.lora_down.weight": torch.zeros(1, 4),
        "lora_unet_x.lora_up.weight": torch.zeros(4, 1),
    }
    save_file(
        tensors,
        folder / "ringstyle.safetensors",
        metadata={"ss_output_name": "ringstyle", "ss_network_dim": "4"},
    )
    Image.new("RGB", (32, 32), (200, 40, 160)).save(folder / "ringstyle.preview.png")
    save_file(tensors, folder / "plain.safetensors")
    return folder


def ui_config(data_dir: Path, lora_dir: Path | None = None) -> ServerConfig:
    return ServerConfig(
        model=embedded_model_path(),
        data_dir=data_dir,
        lora_dirs=(lora_dir,) if lora_dir else (),
        limits=ServerLimits(max_size=256, default_size=None),
    )


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, embedded_pipeline, network_dirs) -> Iterator[Running]:
    yield from serve(ui_config(tmp_path_factory.mktemp("ui"), network_dirs), loader(embedded_pipeline))


class Page:
    """A browser page on the server that records console errors and every request's address."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 800) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.set_default_timeout(WAIT_MS)
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def check(self) -> None:
        """No console error, and every request went to the server itself (or stayed in the page)."""
        assert not self.errors, self.errors
        foreign = [u for u in self.requests if not u.startswith((self.url + "/", "data:", "blob:"))]
        assert not foreign, foreign
        self.context.close()


@pytest.fixture
def page(browser, ui_server) -> Iterator[Page]:
    p = Page(browser, ui_server.url)
    yield p
    p.check()


def panel(page, kind: str):
    return page.locator(f"#panel-{kind}")


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/sdapi/v2/jobs/{job_id}", params={"preview": False}).json()
        if job["state"] in ("done", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def test_generate_from_the_prompt_box(page: Page, ui_server: Running) -> None:
    p = page.page
    tab = panel(p, "txt2img")
    tab.get_by_label("Prompt", exact=True).fill("a red ball on the left")
    tab.get_by_label("Sampling steps").fill("6")
    tab.get_by_label("Seed", exact=True).fill("321")
    tab.get_by_label("Batch size").fill("2")
    tab.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard shortcut
    images = tab.locator(".gallery img")
    images.nth(1).wait_for()
    loaded = p.wait_for_function(
        "() => [...document.querySelectorAll('#panel-txt2img .gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded
    text = tab.locator(".infotext").inner_text()
    assert text.startswith("a red ball on the left") and "Steps: 6" in text and "Seed: 321" in text
    # the page shows what the server made: the shown PNG is the job's file, infotext included
    src = images.first.get_attribute("src")
    png = Image.open(io.BytesIO(httpx.get(ui_server.url + src).content))
    assert png.info["parameters"] == text
    assert tab.locator(".queue li").first.inner_text().startswith("Done")
    # "reuse last seed" takes the selected image's seed; "random" sets -1
    images.nth(1).click()
    tab.get_by_role("button", name="Reuse last seed").click()
    assert tab.get_by_label("Seed", exact=True).input_value() == "322"
    tab.get_by_role("button", name="Random seed").click()
    assert tab.get_by_label("Seed", exact=True).input_value() == "-1"
    page.shot("txt2img")


def test_cancel_a_running_job_and_see_the_queue(page: Page, ui_server: Running) -> None:
    p = page.page
    tab = panel(p, "txt2img")
    tab.get_by_label("Prompt", exact=True).fill("a blue square")
    tab.get_by_label("Sampling steps").fill("150")
    tab.get_by_label("Batch count").fill("40")  # minutes of work: it is canceled long before
    tab.get_by_role("button", name="Generate").click()
    first = tab.locator(".queue li").first
    first.locator(".state", has_text="Step").wait_for()  # running, with its step
    tab.get_by_role("button", name="Generate").click()  # a second job waits behind it
    second = tab.locator(".queue li").first
    second.locator(".state", has_text="Queued").wait_for()
    assert "next" in second.locator(".state").inner_text()
    p.wait_for_selector("#panel-txt2img img.live:not([hidden])")  # the running job's preview image
    page.shot("txt2img-queue")
    second.get_by_role("button", name="Cancel").click()
    second.locator(".state", has_text="Canceled").wait_for()
    running = tab.locator(".queue li").nth(1)
    running.get_by_role("button", name="Cancel").click()
    running.locator(".state", has_text="Canceled").wait_for()
    ids = [li.get_attribute("data-id") for li in tab.locator(".queue li").all()]
    states = [httpx.get(f"{ui_server.url}/sdapi/v2/jobs/{i}").json()["state"] for i in ids]
    assert states == ["canceled", "canceled"]


def _source_image(size: int = 64) -> Image.Image:
    """A picture with detail everywhere, so that any changed pixel shows."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_paint_a_mask_and_inpaint_keeps_the_unmasked_pixels(
    page: Page, ui_server: Running, tmp_path: Path
) -> None:
    p = page.page
    p.get_by_role("tab", name="img2img").click()
    tab = panel(p, "img2img")
    source = _source_image()
    source.save(tmp_path / "source.png")
    tab.get_by_label("Source image", exact=True).set_input_files(str(tmp_path / "source.png"))
    expect(tab.get_by_label("Width", exact=True)).to_have_value("64")  # generates at the image's own size
    tab.get_by_label("Prompt", exact=True).fill("a green ball")
    tab.get_by_label("Sampling steps").fill("6")
    tab.get_by_label("Masked content").select_option(label="latent noise")
    tab.get_by_label("Inpaint area").select_option(label="Whole picture")
    tab.get_by_label("Brush size").evaluate("el => { el.value = 120; }")
    # paint a stroke over the middle of the picture, erase a dot of it again, invert twice (no change)
    mask = tab.get_by_label("Mask: drag to paint")
    box = mask.bounding_box()
    y = box["y"] + box["height"] * 0.5
    p.mouse.move(box["x"] + box["width"] * 0.3, y)
    p.mouse.down()
    p.mouse.move(box["x"] + box["width"] * 0.7, y, steps=8)
    p.mouse.up()
    tab.get_by_label("Erase").check()
    p.mouse.click(box["x"] + box["width"] * 0.3, y)
    tab.get_by_role("button", name="Invert mask").click()
    tab.get_by_role("button", name="Invert mask").click()
    with p.expect_request(lambda r: r.url.endswith("/sdapi/v2/jobs") and r.method == "POST") as sent:
        tab.get_by_role("button", name="Generate").click()
    payload = json.loads(sent.value.post_data)
    tab.locator(".gallery img").first.wait_for()
    sent_mask = np.array(Image.open(io.BytesIO(base64.b64decode(payload["mask"]))).convert("L"))
    sent_init = np.array(Image.open(io.BytesIO(base64.b64decode(payload["init_images"][0]))).convert("RGB"))
    assert np.array_equal(sent_init, np.array(source))  # the canvas sent the picture unchanged
    assert 0.05 < (sent_mask > 0).mean() < 0.5  # the stroke, a band across the middle
    assert sent_mask[32, int(64 * 0.3)] == 0 and sent_mask[32, 32] == 255  # the erased dot; the stroke
    src = tab.locator(".gallery img").first.get_attribute("src")
    result = np.array(Image.open(io.BytesIO(httpx.get(ui_server.url + src).content)).convert("RGB"))
    # pixels the mask blurred by the mask blur (4) leaves at 0 are the source's, bit for bit; masked ones changed
    near = np.array(blur_mask(Image.fromarray(sent_mask), 4)) > 0
    assert (~near).mean() > 0.4
    assert np.array_equal(result[~near], np.array(source)[~near])
    assert np.abs(result[sent_mask == 255].astype(int) - np.array(source)[sent_mask == 255]).mean() > 10
    page.shot("img2img-inpaint")
    # outpainting: extending the canvas masks the new border and generates at the new size
    tab.get_by_label("Extend by, pixels").fill("32")
    tab.get_by_role("button", name="Extend right").click()
    expect(tab.get_by_label("Width", exact=True)).to_have_value("96")
    border = mask.evaluate("c => c.getContext('2d').getImageData(80, 10, 1, 1).data[3]")
    assert border == 255


def _a1111_png(path: Path) -> str:
    """A PNG as AUTOMATIC1111 writes one: its parameters in a 'parameters' text chunk."""
    text = ("a photo of a ring, <lora:ringstyle:0.8>\nNegative prompt: blurry\nSteps: 23, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 6.5, Seed: 4242, Size: 64x64, Model hash: 0123456789, "
            "Model: someone-elses-model, Clip skip: 2, Version: v1.10.1")  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (10, 120, 30)).save(path, pnginfo=info)
    return text


def test_drop_a_png_and_send_its_parameters(page: Page, tmp_path: Path) -> None:
    p = page.page
    text = _a1111_png(tmp_path / "a1111.png")
    p.get_by_role("tab", name="PNG Info").click()
    data = base64.b64encode((tmp_path / "a1111.png").read_bytes()).decode()
    dropped = p.evaluate_handle(
        """(b64) => { const dt = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], "a1111.png", { type: "image/png" })); return dt; }""",
        data,
    )
    p.dispatch_event("#pnginfo-drop", "drop", {"dataTransfer": dropped})
    p.locator("#pnginfo-text", has_text="Steps: 23").wait_for()
    assert p.locator("#pnginfo-text").inner_text() == text
    assert p.locator("#pnginfo-table").get_by_role("row", name="Schedule type Karras").count() == 1
    page.shot("pnginfo")
    p.get_by_role("button", name="Send to txt2img").click()
    tab = panel(p, "txt2img")
    assert tab.is_visible()
    assert tab.get_by_label("Prompt", exact=True).input_value() == "a photo of a ring, <lora:ringstyle:0.8>"
    assert tab.get_by_label("Negative prompt").input_value() == "blurry"
    assert tab.get_by_label("Sampling steps").input_value() == "23"
    assert tab.get_by_label("Sampling method").input_value() == "DPM++ 2M"
    assert tab.get_by_label("Schedule type").input_value() == "Karras"
    assert tab.get_by_label("CFG scale").input_value() == "6.5"
    assert tab.get_by_label("Seed", exact=True).input_value() == "4242"
    assert tab.get_by_label("Clip skip").input_value() == "2"
    assert (
        tab.get_by_label("Width", exact=True).input_value(),
        tab.get_by_label("Height", exact=True).input_value(),
    ) == ("64", "64")
    # the model it names is not on this server: said, not silently dropped
    assert "someone-elses-model" in p.locator("#notice").inner_text()


def test_a_lora_card_inserts_its_tag(page: Page) -> None:
    p = page.page
    tab = panel(p, "txt2img")
    prompt = tab.get_by_label("Prompt", exact=True)
    prompt.fill("a ring")
    tab.locator("summary", has_text="Extra networks").click()
    card = tab.get_by_role("button", name="Insert <lora:ringstyle:1>")
    card.wait_for()
    p.wait_for_function(
        "() => { const i = document.querySelector('#panel-txt2img .card img'); return i && i.complete && i.naturalWidth === 32; }"
    )
    assert tab.get_by_role("button", name="Insert <lora:plain:1>").locator(".placeholder").count() == 1
    card.click()
    assert prompt.input_value() == "a ring, <lora:ringstyle:1>"
    page.shot("extra-networks")


def test_xyz_plot_fills_a_labelled_grid(page: Page) -> None:
    p = page.page
    tab = panel(p, "txt2img")
    tab.get_by_label("Prompt", exact=True).fill("a red circle")
    tab.get_by_label("Seed", exact=True).fill("5")
    tab.locator("summary", has_text="X/Y/Z plot").click()
    tab.get_by_label("X type").select_option("Steps")
    tab.get_by_label("X values").fill("2-4 (+2)")
    tab.get_by_label("Y type").select_option("Prompt S/R")
    tab.get_by_label("Y values").fill("red, blue")
    tab.get_by_role("button", name="Generate grid").click()
    grid = tab.locator("table.xyz")
    grid.locator("img").nth(3).wait_for()
    p.wait_for_function(
        "() => [...document.querySelectorAll('#panel-txt2img table.xyz img')].every(i => i.naturalWidth > 0)"
    )
    assert grid.locator("thead th").all_inner_texts() == ["Steps: 2", "Steps: 4"]
    assert grid.locator("tbody th").all_inner_texts() == ["red", "blue"]
    assert "a blue circle\nSteps: 4" in grid.get_by_role("img", name="Grid cell Steps: 4, blue").get_attribute("title")
    page.shot("txt2img-xyz")
    # a refused value: said, and nothing queued
    tab.get_by_label("X values").fill("2, 0")
    tab.get_by_role("button", name="Generate grid").click()
    p.locator("#notice", has_text="grid cell Steps: 0").wait_for()
    assert tab.locator(".queue li").count() == 4
    # the browser logs the refusal's 422 as a failed request: that one line, and nothing else
    assert all("status of 422" in e for e in page.errors) and len(page.errors) == 1, page.errors
    page.errors.clear()


def test_narrow_width_and_every_control_labelled(browser, ui_server: Running) -> None:
    page = Page(browser, ui_server.url, width=390, height=844)
    p = page.page
    for name in ("txt2img", "img2img", "History", "PNG Info"):
        p.get_by_role("tab", name=name).click()
        # nothing wider than the phone's screen; every control has a name a screen reader reads
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        unlabelled = p.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                 .filter((el) => el.offsetParent !== null || el.type === 'file')
                 .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                                 && !(el.tagName === 'BUTTON' && el.textContent.trim()))
                 .map((el) => el.outerHTML.slice(0, 80))"""
        )
        assert not unlabelled, unlabelled
        page.shot(f"narrow-{name.replace(' ', '').lower()}")
    page.check()


def test_history_restores_parameters_after_a_restart(browser, tmp_path: Path, embedded_pipeline) -> None:
    data_dir = tmp_path / "data"
    payload = {"prompt": "a yellow triangle", "steps": 7, "cfg_scale": 5.5, "seed": 1234, "sampler_name": "DPM++ 2M",
               "scheduler": "Karras", "batch_size": 1}  # fmt: skip
    servers = serve(ui_config(data_dir), loader(embedded_pipeline))
    first = next(servers)
    for prompt in (payload["prompt"], "a purple circle"):
        job = httpx.post(f"{first.url}/sdapi/v2/jobs", json={**payload, "prompt": prompt}).json()
        assert wait_job(first.url, job["id"])["state"] == "done"
    servers.close()  # the server stops; its store stays

    again = serve(ui_config(data_dir), loader(embedded_pipeline))
    running = next(again)
    try:
        page = Page(browser, running.url)
        p = page.page
        p.get_by_role("tab", name="History").click()
        items = p.locator("#history-list li.history-item")
        items.nth(1).wait_for()
        assert items.count() == 2
        p.get_by_label("Search prompts").fill("yellow")
        p.wait_for_function("() => document.querySelectorAll('#history-list li.history-item').length === 1")
        item = items.first
        assert item.locator(".prompt").inner_text() == "a yellow triangle"
        p.wait_for_function(
            "() => { const i = document.querySelector('#history-list img'); return i && i.naturalWidth > 0; }"
        )
        href = item.get_by_role("link", name="Download").get_attribute("href")
        assert Image.open(io.BytesIO(httpx.get(running.url + href).content)).size == (64, 64)
        page.shot("history")
        item.get_by_role("button", name="Send to txt2img").click()
        tab = panel(p, "txt2img")
        assert tab.get_by_label("Prompt", exact=True).input_value() == "a yellow triangle"
        assert tab.get_by_label("Sampling steps").input_value() == "7"
        assert tab.get_by_label("CFG scale").input_value() == "5.5"
        assert tab.get_by_label("Seed", exact=True).input_value() == "1234"
        assert tab.get_by_label("Sampling method").input_value() == "DPM++ 2M"
        assert tab.get_by_label("Schedule type").input_value() == "Karras"
        # delete: gone from the page, the store and the disk
        p.get_by_role("tab", name="History").click()
        p.get_by_label("Search prompts").fill("purple")
        p.wait_for_function(
            "() => (document.querySelector('#history-list .prompt') || {}).textContent === 'a purple circle'"
        )
        job_id = items.first.get_attribute("data-id")
        items.first.get_by_role("button", name="Delete").click()
        items.first.wait_for(state="detached")
        assert httpx.get(f"{running.url}/sdapi/v2/jobs/{job_id}").status_code == 404
        assert not (data_dir / "outputs" / job_id).exists()
        page.check()
    finally:
        again.close()


def test_no_ui_serves_the_api_alone(tmp_path: Path, embedded_pipeline) -> None:
    from dataclasses import replace

    servers = serve(replace(ui_config(tmp_path), ui=False), loader(embedded_pipeline))
    running = next(servers)
    try:
        assert httpx.get(running.url + "/").status_code == 404
        assert httpx.get(running.url + "/ui/app.js").status_code == 404
        assert httpx.get(running.url + "/sdapi/v1/samplers").status_code == 200
    finally:
        servers.close()
    servers = serve(ui_config(tmp_path), loader(embedded_pipeline))
    running = next(servers)
    try:
        index = httpx.get(running.url + "/")
        assert index.status_code == 200 and "default-src 'self'" in index.headers["content-security-policy"]
        script = httpx.get(running.url + "/ui/app.js").headers["content-type"]
        assert script.startswith(("text/javascript", "application/javascript"))  # module scripts need one
    finally:
        servers.close()
    shutil.rmtree(tmp_path, ignore_errors=True)
