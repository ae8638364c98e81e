"""--workers N: N generation threads on one SQLite queue, each job claimed once, in submission order."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import build_parser, embedded_model_path
from sdstudio.engine import Pipeline
from sdstudio.errors import SdStudioError
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig, config_from_args, worker_devices
from sdstudio.server.jobs import JobStore
from sdstudio.server.worker import Worker
from sdstudio.types import GenerationRequest
from tests.server.conftest import serve

LIMIT_S = 60.0


@pytest.mark.parametrize(
    ("workers", "gpus", "want"),
    [
        (None, 0, (1, ("cpu",))),
        (2, 0, (2, ("cpu", "cpu"))),
        (None, 2, (2, ("cuda:0", "cuda:1"))),
        (3, 2, (3, ("cuda:0", "cuda:1", "cuda:0"))),
        (1, 4, (1, ("cuda:0",))),
    ],
)
def test_worker_devices(workers, gpus, want) -> None:
    assert worker_devices(workers, gpus) == want


def test_workers_below_one_are_refused(tmp_path) -> None:
    with pytest.raises(SdStudioError, match="--workers must be at least 1 \\(got 0\\)"):
        worker_devices(0, 0)
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--workers", "-1"])
    with pytest.raises(SdStudioError, match="--workers must be at least 1 \\(got -1\\)"):
        config_from_args(args, embedded_model_path())
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--workers", "2"])
    config, _ = config_from_args(args, embedded_model_path())
    assert config.workers == 2 and len(config.devices) == 2


def test_claims_from_many_threads_take_each_job_once_in_order(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.submit("txt2img", {"seed": i}) for i in range(40)]
    taken: dict[str, list[str]] = {f"w{k}": [] for k in range(4)}
    start = threading.Barrier(4, timeout=LIMIT_S)

    def claim(name: str) -> None:
        start.wait()
        for _ in range(len(ids) + 1):  # bounded: at most every job, then the None
            job = store.claim_next(name)
            if job is None:
                return
            taken[name].append(job.id)

    threads = [threading.Thread(target=claim, args=(name,)) for name in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LIMIT_S)
    claimed = [j for got in taken.values() for j in got]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    order = {j: i for i, j in enumerate(ids)}
    for name, got in taken.items():
        assert [order[j] for j in got] == sorted(order[j] for j in got)  # each thread takes them oldest first
        assert all(store.get(j).worker == name and store.get(j).attempts == 1 for j in got)
    store.close()


def test_a_reader_who_sees_a_job_ended_does_not_see_it_running(tmp_path) -> None:
    """A worker writes a job's end to the store and clears its progress under the lock that readers of the
    progress take: a reader woken by the end (``store.wait``, as the interrupt test's client is) reads no
    progress of that job, even while the store's write has not yet returned to the worker."""

    class LateStore(JobStore):
        def _notify_ended(self) -> None:
            super()._notify_ended()
            time.sleep(0.3)  # the waiters are awake; the worker is still inside the store's write

    store = LateStore(tmp_path / "jobs.sqlite")
    store.submit("txt2img", {})
    job = store.claim_next("worker-0")
    worker = Worker(store, None, None, tmp_path, ServerLimits())  # type: ignore[arg-type]  # no model needed
    worker._set(job_id=job.id, claimed=job.started)
    seen = {}

    def read() -> None:
        seen["job"] = store.wait(job.id, timeout=LIMIT_S)
        seen["progress"] = worker.progress()

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.1)  # the reader waits for the end
    worker._end(lambda: store.complete(job.id, {"files": []}))
    reader.join(LIMIT_S)
    assert seen["job"].state == "done"
    assert seen["progress"].job_id is None
    store.close()


def test_an_old_store_gets_the_worker_column(tmp_path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, "
        "state TEXT NOT NULL, request TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, "
        "error TEXT, result TEXT, attempts INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO jobs (id, kind, state, request, created) VALUES ('old', 'txt2img', 'pending', '{}', 1)"
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.get("old").worker is None
    assert store.claim_next("worker-1").worker == "worker-1"
    store.close()


def test_two_workers_share_the_queue(tmp_path, embedded_pipeline) -> None:
    def load(path: Path, vae: Path | None = None) -> Pipeline:
        return Pipeline.from_file(path, vae=vae)  # a pipeline per worker: none is run by two threads

    config = ServerConfig(model=embedded_model_path(), data_dir=tmp_path, workers=2,
                          limits=ServerLimits(max_size=256, default_size=None))  # fmt: skip
    for running in serve(config, load):
        caches = running.app.state.caches
        assert len(caches) == 2
        deadline = time.monotonic() + LIMIT_S
        for _ in range(3000):  # both workers preload the default model at start
            if all(c.loaded() for c in caches):
                break
            assert time.monotonic() < deadline, "workers did not load the model"
            time.sleep(0.02)
        assert caches[0].get(caches[0].loaded()[0]) is not caches[1].get(caches[1].loaded()[0])

        seeds = [21, 22, 23, 24]
        payload = {"prompt": "a red ball", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                   "cfg_scale": 7.0}  # fmt: skip
        with httpx.Client(base_url=running.url, timeout=LIMIT_S) as c:
            ids = [c.post("/sdapi/v2/jobs", json={**payload, "seed": s}).json()["id"] for s in seeds]
            store: JobStore = running.app.state.store
            jobs = [store.wait(j, timeout=LIMIT_S) for j in ids]
            views = [c.get(f"/sdapi/v2/jobs/{j}").json() for j in ids]

            # a long job on each worker: v1 reports and interrupts the older one; v2 acts on its own job
            older, newer = [c.post("/sdapi/v2/jobs", json={**payload, "seed": s, "steps": 400}).json()["id"]
                            for s in (31, 32)]  # fmt: skip
            deadline = time.monotonic() + LIMIT_S
            for _ in range(3000):
                if all(c.get(f"/sdapi/v2/jobs/{j}").json()["step"] > 0 for j in (older, newer)):
                    break
                assert time.monotonic() < deadline, "the two long jobs did not both start"
                time.sleep(0.02)
            state = c.get("/sdapi/v1/progress").json()["state"]
            assert state["job"] == older and state["sampling_steps"] == 400
            c.post("/sdapi/v1/interrupt")
            assert store.wait(older, timeout=LIMIT_S).state == "canceled"
            assert c.get(f"/sdapi/v2/jobs/{newer}").json()["state"] == "running"
            assert c.get("/sdapi/v1/progress").json()["state"]["job"] == newer
            assert c.delete(f"/sdapi/v2/jobs/{newer}").json()["canceled"] is True
            assert store.wait(newer, timeout=LIMIT_S).state == "canceled"
            assert {store.get(j).worker for j in (older, newer)} == {"worker-0", "worker-1"}
    assert [j.state for j in jobs] == ["done"] * 4, [j.error for j in jobs]
    assert [j.attempts for j in jobs] == [1] * 4
    assert {j.worker for j in jobs} == {"worker-0", "worker-1"}, [j.worker for j in jobs]
    assert [j.started for j in jobs] == sorted(j.started for j in jobs)  # claimed in submission order
    for job_id, view, seed in zip(ids, views, seeds):
        assert len(list((tmp_path / "outputs" / job_id).iterdir())) == 1
        assert view["seeds"] == [seed] and view["worker"] in ("worker-0", "worker-1")
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(view["images"][0]))).convert("RGB"))
        want = embedded_pipeline(
            GenerationRequest(
                prompt="a red ball", seed=seed, steps=2, width=64, height=64, sampler="Euler", cfg_scale=7.0
            )
        ).images[0]
        assert np.array_equal(got, np.asarray(want.image.convert("RGB"))), seed
        assert view["infotexts"] == [want.infotext]
