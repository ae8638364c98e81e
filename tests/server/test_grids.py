"""X/Y/Z plots over the job API: every cell checked before any is queued, each cell an ordinary job."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from sdstudio.errors import SdStudioError
from sdstudio.server.grids import grid_jobs

WAIT_S = 60


def wait(c: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = c.get(f"/sdapi/v2/jobs/{job_id}", params={"preview": False}).json()
        if job["state"] in ("done", "failed", "canceled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def test_cells_in_queue_order_with_labels_and_one_seed() -> None:
    grid = grid_jobs(
        "txt2img",
        {"prompt": "a red circle", "steps": 5},
        {"x": ("Steps", "2-6 (+2)"), "y": ("Prompt S/R", "red, blue"), "z": ("Sampler", "Euler, DDIM")},
        random.Random(0),
    )
    assert grid.x_labels == ("Steps: 2", "Steps: 4", "Steps: 6") and grid.y_labels == ("red", "blue")
    assert grid.z_labels == ("Euler", "DDIM")
    assert [(c.iz, c.iy, c.ix) for c in grid.cells][:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    last = grid.cells[-1].payload
    assert (last["steps"], last["prompt"], last["sampler_name"]) == (6, "a blue circle", "DDIM")
    assert len({c.payload["seed"] for c in grid.cells}) == 1 and grid.cells[0].payload["seed"] != -1
    assert grid.axes == {"X Type": "Steps", "Y Type": "Prompt S/R", "Z Type": "Sampler", "X Values": "2-6 (+2)",
                         "Y Values": "red, blue", "Z Values": "Euler, DDIM"}  # fmt: skip
    clip = grid_jobs("txt2img", {"prompt": "x", "seed": 3}, {"x": ("Clip skip", "1,2")})
    assert clip.cells[1].payload["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    assert clip.y_labels == ("",) and clip.z_labels == ("",)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"x": ("Steps", "2, x")}, "X axis: Steps axis value 'x'"),
        ({"x": ("Prompt S/R", "green, blue")}, "'green' is not in the prompt"),
        ({"y": ("Colour", "1")}, "Y axis: unknown type 'Colour'"),
        ({"x": ("Steps", "")}, "give its values"),
        ({"x": ("Hires steps", "1,2")}, "turn the hires fix on"),
        ({"x": ("Steps", "1-20"), "y": ("CFG Scale", "1-6")}, "over the server's limit of 100"),
    ],
)
def test_bad_axes_are_refused(axes, message) -> None:
    with pytest.raises(SdStudioError, match=message):
        grid_jobs("txt2img", {"prompt": "a red circle"}, axes)


def test_a_grid_of_jobs_through_the_server(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        base = {"prompt": "a red circle on the left", "steps": 3, "seed": 77}
        r = c.post("/sdapi/v2/grids", json={**base, "x_type": "Steps", "x_values": "2,3",
                                             "y_type": "CFG Scale", "y_values": "3, 7"})  # fmt: skip
        assert r.status_code == 200, r.text
        grid = r.json()
        assert grid["x_labels"] == ["Steps: 2", "Steps: 3"] and grid["y_labels"] == ["CFG Scale: 3.0", "CFG Scale: 7.0"]
        jobs = {(cell["x"], cell["y"]): wait(c, cell["id"]) for cell in grid["cells"]}
        assert all(j["state"] == "done" for j in jobs.values())
        assert "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 77" in jobs[(1, 1)]["infotexts"][0]
        # a cell is the job its payload makes
        plain = wait(c, c.post("/sdapi/v2/jobs", json={**base, "steps": 2, "cfg_scale": 7}).json()["id"])
        assert plain["images"] == jobs[(0, 1)]["images"]
        assert c.get("/sdapi/v2/grids/axes").json()[:3] == ["Nothing", "Seed", "Var. seed"]
        # one bad cell: nothing is queued, the error names the cell
        pending = server.app.state.store.pending_count()
        r = c.post("/sdapi/v2/grids", json={**base, "x_type": "Sampler", "x_values": "Euler, Nosuch"})
        assert r.status_code == 422 and "grid cell Nosuch" in r.json()["detail"], r.json()
        r = c.post("/sdapi/v2/grids", json={**base, "x_type": "Steps", "x_values": "0, 2"})
        assert r.status_code == 422 and "grid cell Steps: 0" in r.json()["detail"], r.json()
        assert server.app.state.store.pending_count() == pending
