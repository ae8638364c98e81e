"""Server-sent events per job, and CORS (off unless asked for)."""

from __future__ import annotations

import json
import threading
import time

import httpx

from sdstudio.cli import embedded_model_path
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from tests.server.conftest import loader, serve

LIMIT_S = 60.0
MAX_LINES = 20_000


def read_events(url: str, job_id: str, out: list[tuple[str, dict]]) -> None:
    """Every event of one job's stream, until it ends (bounded in lines and time)."""
    deadline = time.monotonic() + LIMIT_S
    name = None
    with httpx.stream("GET", f"{url}/sdapi/v2/jobs/{job_id}/events", timeout=LIMIT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for n, line in enumerate(r.iter_lines()):
            assert n < MAX_LINES and time.monotonic() < deadline, "stream did not end"
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))


def test_each_stream_reports_only_its_own_job(server) -> None:
    tiny = {"width": 64, "height": 64, "sampler_name": "Euler"}
    with httpx.Client(base_url=server.url, timeout=10) as c:
        first = c.post("/sdapi/v2/jobs", json={"prompt": "a red ball", "seed": 1, "steps": 60, **tiny}).json()
        events: dict[str, list] = {first["id"]: []}
        threads = [threading.Thread(target=read_events, args=(server.url, first["id"], events[first["id"]]))]
        threads[0].start()
        second = c.post(
            "/sdapi/v2/jobs", json={"prompt": "a blue cube", "seed": 2, "steps": 7, **tiny}
        ).json()
        events[second["id"]] = []
        threads.append(
            threading.Thread(target=read_events, args=(server.url, second["id"], events[second["id"]]))
        )
        threads[1].start()
        for t in threads:
            t.join(LIMIT_S)
            assert not t.is_alive()
    for job, total, seed in ((first, 60, 1), (second, 7, 2)):
        stream = events[job["id"]]
        *progress, (last_name, last) = stream
        assert last_name == "done" and last["state"] == "done" and last["seeds"] == [seed]
        assert len(last["images"]) == 1 and f"Seed: {seed}" in last["infotexts"][0]
        assert progress and all(name == "progress" and data["id"] == job["id"] for name, data in progress)
        running = [d for _, d in progress if d["state"] == "running" and d["steps"]]
        assert all(d["steps"] == total for d in running)  # never the other job's steps
        steps = [d["step"] for d in running]
        assert steps == sorted(steps) and all(0 <= s <= total for s in steps) and steps[-1] > 0
    running_first = [d for _, d in events[first["id"]][:-1] if d["state"] == "running" and d["steps"]]
    assert len(running_first) >= 2  # a 60-step job is seen stepping
    # the second job waited behind the first: its stream began with its place in the queue
    assert events[second["id"]][0][1]["state"] == "pending" and events[second["id"]][0][1]["position"] == 0


def test_events_of_an_unknown_job_are_404(server) -> None:
    r = httpx.get(f"{server.url}/sdapi/v2/jobs/nope/events", timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "NotFound"


def test_cors_is_off_by_default(server) -> None:
    r = httpx.get(f"{server.url}/sdapi/v1/options", headers={"Origin": "http://example.com"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = httpx.options(f"{server.url}/sdapi/v1/txt2img", timeout=10,
                              headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_given_origins(tmp_path, embedded_pipeline) -> None:
    config = ServerConfig(model=embedded_model_path(), data_dir=tmp_path, auth=(("alice", "pw"),),
                          cors_origins=("http://example.com", "http://other.org"),
                          limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    for running in serve(config, loader(embedded_pipeline)):
        url = f"{running.url}/sdapi/v1/options"
        preflight = httpx.options(url, timeout=10, headers={
            "Origin": "http://other.org", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})  # fmt: skip
        assert preflight.status_code == 200  # answered before the auth check
        assert preflight.headers["access-control-allow-origin"] == "http://other.org"
        r = httpx.get(url, auth=("alice", "pw"), headers={"Origin": "http://example.com"}, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.com"
        r = httpx.get(url, auth=("alice", "pw"), headers={"Origin": "http://evil.test"}, timeout=10)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        flags = httpx.get(f"{running.url}/sdapi/v1/cmd-flags", auth=("alice", "pw"), timeout=10).json()
        assert flags["cors_allow_origins"] == "http://example.com,http://other.org"
