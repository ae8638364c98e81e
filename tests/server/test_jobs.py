"""The SQLite job store: states, order, restart recovery."""

from __future__ import annotations

from sdstudio.server.jobs import JobStore


def test_claim_order_and_states(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    a = store.submit("txt2img", {"prompt": "a"})
    b = store.submit("txt2img", {"prompt": "b"})
    assert (store.position(a), store.position(b)) == (0, 1)
    job = store.claim_next()
    assert job.id == a and job.state == "running" and job.attempts == 1
    assert store.position(b) == 0
    assert store.cancel_pending(a) is False  # running: not cancelable as pending
    assert store.complete(a, {"files": ["x.png"]})
    assert store.get(a).state == "done" and store.get(a).result == {"files": ["x.png"]}
    assert store.cancel_pending(b)
    assert store.claim_next() is None


def test_restart_reruns_a_running_job_once(tmp_path) -> None:
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    a = store.submit("txt2img", {"prompt": "a"})
    done = store.submit("txt2img", {"prompt": "done"})
    assert store.claim_next().id == a
    store.close()  # the server dies with `a` running

    store = JobStore(path)
    assert store.recover() == 1
    assert store.get(a).state == "pending"
    assert store.claim_next().id == a  # second attempt
    store.close()  # dies again

    store = JobStore(path)
    assert store.recover() == 0
    assert store.get(a).state == "failed"
    assert store.claim_next().id == done
    assert store.complete(done, {"files": []})
    assert store.get(done).state == "done"


def test_wait_wakes_when_the_job_ends_not_on_a_poll(tmp_path) -> None:
    import threading
    import time

    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.submit("txt2img", {"prompt": "a"})
    store.claim_next("worker-0")
    ended_at: list[float] = []

    def finish() -> None:
        time.sleep(0.2)
        ended_at.append(time.monotonic())
        store.complete(job_id, {"files": []})

    threading.Thread(target=finish).start()
    job = store.wait(job_id, timeout=10, recheck_s=5.0)  # a poll would answer ~5 s late
    woke = time.monotonic()
    assert job is not None and job.state == "done" and job.worker == "worker-0"
    assert woke - ended_at[0] < 1.0
    other = store.submit("txt2img", {"prompt": "b"})
    t = time.monotonic()
    assert store.wait(other, timeout=0.1, recheck_s=5.0) is None  # still pending at the timeout
    assert 0.09 < time.monotonic() - t < 1.0
    assert store.wait("no-such-job", timeout=1) is None
    store.close()
