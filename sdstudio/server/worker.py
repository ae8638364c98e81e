"""The one thread that owns the Pipeline: takes jobs from the store, runs them, writes their PNGs."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdstudio.errors import SdStudioError
from sdstudio.io.images import save_png
from sdstudio.server.a1111 import FieldError, ServerLimits, to_request, with_defaults
from sdstudio.server.jobs import Job, JobStore

log = logging.getLogger("sdstudio.server")


class _Stopped(Exception):
    """Raised from the sampler callback to stop the running job (interrupt / cancel)."""


@dataclass(frozen=True)
class Progress:
    """A snapshot of the running job; ``step`` / ``steps`` count that job's own sampling steps."""

    job_id: str | None = None
    step: int = 0
    steps: int = 0
    iteration: int = 0
    n_iter: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False


class Worker:
    """``pipeline_factory`` is called once, on the worker thread; nothing else touches the pipeline."""

    def __init__(
        self,
        store: JobStore,
        pipeline_factory: Callable[[], Any],
        outputs: Path,
        limits: ServerLimits,
        poll_s: float = 0.2,
    ) -> None:
        self.store = store
        self.factory = pipeline_factory
        self.outputs = Path(outputs)
        self.limits = limits
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = Progress()
        self._thread = threading.Thread(target=self._run, name="sdstudio-worker", daemon=True)
        self.load_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()  # a job stopped by this stays 'running' in the store: the next start reruns it
        self._wake.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        self._wake.set()

    def progress(self) -> Progress:
        with self._lock:
            return self._progress

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running job (``job_id``: only if it is that one); True if one was stopped."""
        with self._lock:
            current = self._progress.job_id
            if current is None or (job_id is not None and job_id != current):
                return False
            self._progress = replace(self._progress, interrupted=True)
            return True

    def skip(self) -> None:
        with self._lock:
            if self._progress.job_id is not None:
                self._progress = replace(self._progress, skipped=True)

    def cancel(self, job_id: str) -> bool:
        return self.store.cancel_pending(job_id) or self.interrupt(job_id)

    def _run(self) -> None:
        try:
            pipeline = self.factory()
        except Exception as e:
            log.exception("model load failed")
            self.load_error = f"model load failed: {e}"
            pipeline = None
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            if pipeline is None:
                self.store.fail(job.id, self.load_error or "no model")
                continue
            self._run_job(pipeline, job)

    def _run_job(self, pipeline: Any, job: Job) -> None:
        payload = job.request
        p = with_defaults(job.kind, payload)
        n_iter = max(1, int(p["n_iter"]))
        seed = int(p["seed"])
        if seed == -1:
            seed = random.randrange(2**32)
        out_dir = self.outputs / job.id
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        seeds: list[int] = []
        subseeds: list[int] = []
        infotexts: list[str] = []
        warnings: list[str] = []
        with self._lock:
            self._progress = Progress(job_id=job.id, n_iter=n_iter, started=time.time())
        try:
            for k in range(n_iter):
                request = to_request(job.kind, payload, self.limits, seed=seed + k * int(p["batch_size"]))
                self._set(iteration=k, step=0, steps=request.steps, skipped=False)
                try:
                    result = pipeline(request, self._callback)
                except _Stopped:
                    if self.progress().interrupted or self._stop.is_set():
                        raise
                    continue  # skipped: go on with the next iteration
                warnings += result.warnings
                for image in result.images:
                    name = f"{len(files):05d}-{image.seed}.png"
                    save_png(image.image, out_dir / name, image.infotext, overwrite=True)
                    files.append(name)
                    seeds.append(image.seed)
                    subseeds.append(image.subseed if image.subseed is not None else request.subseed)
                    infotexts.append(image.infotext)
        except _Stopped:
            if not self._stop.is_set():
                self.store.mark_canceled(job.id)
        except (SdStudioError, FieldError) as e:
            self.store.fail(job.id, str(e))
        except Exception as e:
            log.exception("job %s failed", job.id)
            self.store.fail(job.id, f"{type(e).__name__}: {e}")
        else:
            result_json = {"files": files, "seeds": seeds, "subseeds": subseeds, "infotexts": infotexts,
                           "warnings": warnings}  # fmt: skip
            self.store.complete(job.id, result_json)
        finally:
            with self._lock:
                self._progress = Progress()

    def _callback(self, step: Any) -> None:
        self._set(step=step.i + 1, steps=step.total)
        progress = self.progress()
        if progress.interrupted or progress.skipped or self._stop.is_set():
            raise _Stopped
