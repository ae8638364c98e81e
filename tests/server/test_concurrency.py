"""8 clients at once, each with its own settings: each gets its own images, seeds and progress, equal to
the same requests run one by one through the Python API."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from sdstudio.types import GenerationRequest
from tests.server.test_events import LIMIT_S, read_events

CLIENTS = [
    # (prompt, seed, sampler, steps, cfg)
    ("a red ball", 11, "Euler", 2, 5.0),
    ("a blue cube", 12, "Euler a", 3, 7.0),
    ("a green star on the left", 13, "DPM++ 2M", 4, 6.0),
    ("a yellow triangle", 14, "Heun", 2, 4.0),
    ("a purple circle at the top", 15, "DDIM", 3, 7.5),
    ("a white square", 16, "LMS", 3, 3.0),
    ("an orange diamond", 17, "UniPC", 3, 8.0),
    ("a black cross below a red disc", 18, "DPM++ 2S a", 2, 5.5),
]


def test_eight_concurrent_clients_get_their_own_results(server, embedded_pipeline) -> None:
    results: dict[int, dict] = {}
    events: dict[int, list] = {i: [] for i in range(len(CLIENTS))}
    barrier = threading.Barrier(len(CLIENTS), timeout=LIMIT_S)

    def client(i: int) -> None:
        prompt, seed, sampler, steps, cfg = CLIENTS[i]
        payload = {"prompt": prompt, "seed": seed, "sampler_name": sampler, "steps": steps, "cfg_scale": cfg,
                   "width": 64, "height": 64}  # fmt: skip
        barrier.wait()  # all eight submit at once
        job = httpx.post(f"{server.url}/sdapi/v2/jobs", json=payload, timeout=LIMIT_S).json()
        results[i] = {"id": job["id"]}
        read_events(server.url, job["id"], events[i])

    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        for future in [pool.submit(client, i) for i in range(len(CLIENTS))]:
            future.result(timeout=LIMIT_S)  # a client's failure fails the test here
    assert len({r["id"] for r in results.values()}) == len(CLIENTS)

    for i, (prompt, seed, sampler, steps, cfg) in enumerate(CLIENTS):
        *progress, (name, final) = events[i]
        assert name == "done" and final["id"] == results[i]["id"], (i, name, final.get("error"))
        assert final["seeds"] == [seed]
        assert all(d["id"] == results[i]["id"] for _, d in progress)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(final["images"][0]))).convert("RGB"))
        request = GenerationRequest(prompt=prompt, seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg,
                                    width=64, height=64)  # fmt: skip
        totals: set[int] = set()
        want = embedded_pipeline(request, lambda step, into=totals: into.add(step.total)).images[0]
        seen = {d["steps"] for _, d in progress if d["steps"]}
        assert seen <= totals | {steps}, (i, seen, totals)  # its own steps only (DDIM counts one more)
        assert np.array_equal(got, np.asarray(want.image.convert("RGB"))), (i, sampler)
        assert final["infotexts"][0] == want.infotext
