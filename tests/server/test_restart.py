"""kill -9 a server with queued jobs; a restart on the same data dir finishes each exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sdstudio.server.jobs import JobStore
from tests.server.conftest import free_port

LIMIT_S = 60.0
TINY = {"width": 64, "height": 64}


def start(data_dir, port: int) -> subprocess.Popen:
    code = "import sys; from sdstudio.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--max-size", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores shared with pytest: spinning threads thrash
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + LIMIT_S
    for _ in range(6000):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    raise AssertionError("poll count exhausted")


def wait_final(url: str, ids: list[str]) -> list[dict]:
    deadline = time.monotonic() + LIMIT_S
    for _ in range(6000):
        views = [httpx.get(f"{url}/sdapi/v2/jobs/{j}", timeout=10).json() for j in ids]
        if all(v["state"] in ("done", "failed", "canceled") for v in views):
            return views
        assert time.monotonic() < deadline, [v["state"] for v in views]
        time.sleep(0.1)
    raise AssertionError("poll count exhausted")


@pytest.mark.slow  # two server processes, one killed: about 20 s
def test_kill_9_and_restart_runs_each_job_once(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port)
    try:
        first = httpx.post(
            f"{url}/sdapi/v2/jobs", json={"prompt": "c", "seed": 9, "steps": 2, **TINY}
        ).json()["id"]
        (finished,) = wait_final(url, [first])
        assert finished["state"] == "done"
        long = httpx.post(
            f"{url}/sdapi/v2/jobs", json={"prompt": "a", "seed": 1, "steps": 80, **TINY}
        ).json()["id"]
        # five jobs queued behind the running one when the server dies
        short = [
            httpx.post(f"{url}/sdapi/v2/jobs", json={"prompt": "b", "seed": s, "steps": 2, **TINY}).json()[
                "id"
            ]
            for s in (2, 3, 4, 5, 6)
        ]
        deadline = time.monotonic() + LIMIT_S
        for _ in range(6000):
            if httpx.get(f"{url}/sdapi/v2/jobs/{long}").json()["step"] > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [httpx.get(f"{url}/sdapi/v2/jobs/{j}").json()["state"] for j in short] == ["pending"] * 5
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    proc = start(tmp_path, port)
    try:
        views = wait_final(url, [long, *short])
        assert [v["state"] for v in views] == ["done"] * 6
        assert [v["seeds"] for v in views] == [[1], [2], [3], [4], [5], [6]]
        again = httpx.get(f"{url}/sdapi/v2/jobs/{first}").json()  # finished before the kill: kept as it was
        assert again["state"] == "done" and again["images"] == finished["images"]
    finally:
        proc.terminate()
        proc.wait(30)

    store = JobStore(tmp_path / "jobs.sqlite")
    assert [store.get(j).attempts for j in (first, long, *short)] == [1, 2, 1, 1, 1, 1, 1]
    for job in (first, long, *short):
        assert len(list((tmp_path / "outputs" / job).iterdir())) == 1  # no duplicate outputs, no temp files
    store.close()
