"""The threads that run pipelines: each takes jobs from the store, loads their checkpoint into its own cache
if need be, runs them, writes their PNGs. ``--workers N`` runs N of them (one per GPU) on the one queue."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from sdstudio.errors import SdStudioError
from sdstudio.io.images import save_png
from sdstudio.server.a1111 import FieldError, ServerLimits, to_request, with_defaults
from sdstudio.server.jobs import Job, JobStore
from sdstudio.server.models import Checkpoint, CheckpointRegistry, ModelCache, cache_key

log = logging.getLogger("sdstudio.server")


class _Stopped(Exception):
    """Raised from the sampler callback to stop the running job (interrupt / cancel)."""


@dataclass(frozen=True)
class Progress:
    """A snapshot of the running job; ``step`` / ``steps`` count that job's own sampling steps."""

    job_id: str | None = None
    claimed: float = 0.0  # when the worker took the job: the oldest running job is the one v1 reports
    step: int = 0
    steps: int = 0
    iteration: int = 0
    n_iter: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    loading: str | None = None  # the title of the checkpoint being loaded, if one is
    # the latest step's x0 estimate [1, C, h, w] (CPU) and what turns it into a picture: the preview decoder
    latents: Any = field(default=None, compare=False, repr=False)
    previewer: Any = field(default=None, compare=False, repr=False)
    preview_scale: int = 1

    def preview(self) -> Image.Image | None:
        """The running job's current image from the cheap preview decoder (no VAE call), at image size."""
        if self.latents is None or self.previewer is None:
            return None
        return self.previewer(self.latents, upscale=self.preview_scale)[0]


# the checkpoint a job runs with, resolved when it was submitted; kept in its stored request
CHECKPOINT_FIELD = "_sdstudio_checkpoint"


def checkpoint_record(checkpoint: Checkpoint, vae: Checkpoint | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "path": str(checkpoint.path),
        "name": checkpoint.name,
        "sha256": checkpoint.sha256,
    }
    if vae is not None:
        record["vae"] = checkpoint_record(vae)
    return record


def checkpoint_from_record(record: Any) -> Checkpoint | None:
    if not isinstance(record, dict) or "path" not in record:
        return None
    return Checkpoint(
        Path(record["path"]), str(record.get("name") or Path(record["path"]).name), record.get("sha256")
    )


class Worker:
    """Loads checkpoints into ``cache`` and runs jobs, on its own thread; nothing else runs the pipelines of
    its cache (each worker has its own cache, so no pipeline is ever run by two threads at once).

    When idle it loads the registry's default checkpoint if asked to (:meth:`preload`: at start, after a
    switch), so that a switch is paid before the next request and never by the HTTP routes."""

    def __init__(
        self,
        store: JobStore,
        registry: CheckpointRegistry,
        cache: ModelCache,
        outputs: Path,
        limits: ServerLimits,
        poll_s: float = 0.2,
        name: str = "worker-0",
    ) -> None:
        self.name = name
        self.store = store
        self.registry = registry
        self.cache = cache
        self.outputs = Path(outputs)
        self.limits = limits
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = Progress()
        self._preload = threading.Event()
        self._previewers: dict[str, tuple[Any, int]] = {}  # cache key -> (preview decoder, scale)
        self._thread = threading.Thread(target=self._run, name=f"sdstudio-{name}", daemon=True)

    def start(self) -> None:
        self._preload.set()
        self._thread.start()

    def preload(self) -> None:
        """Load the default checkpoint when next idle."""
        self._preload.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        self.join(timeout)

    def request_stop(self) -> None:
        self._stop.set()  # a job stopped by this stays 'running' in the store: the next start reruns it
        self._wake.set()

    def join(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
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
        while not self._stop.is_set():
            job = self.store.claim_next(self.name)
            if job is not None:
                self._run_job(job)
            elif self._preload.is_set():
                self._preload.clear()
                checkpoint, vae = self.registry.default, self.registry.default_vae
                self._set(loading=checkpoint.title)
                try:
                    self.cache.get(checkpoint, vae)
                except Exception:
                    log.exception("loading %s failed", checkpoint.title)
                finally:
                    self._set(loading=None)
            else:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def _run_job(self, job: Job) -> None:
        record = job.request.get(CHECKPOINT_FIELD)
        checkpoint = checkpoint_from_record(record)
        refiner = None
        if checkpoint is None:  # a job stored before checkpoints were recorded
            checkpoint, vae = self.registry.default, self.registry.default_vae
        else:
            vae = checkpoint_from_record(record.get("vae"))
            refiner = checkpoint_from_record(record.get("refiner"))  # SDXL's, loaded beside it
        with self._lock:
            now = time.time()
            # the claim's time as the store wrote it inside the claim's transaction: claims are ordered there,
            # while two workers may reach this line in either order
            claimed = job.started if job.started is not None else now
            self._progress = Progress(job_id=job.id, claimed=claimed, started=now, loading=checkpoint.title)
        try:
            pipeline = self.cache.get(checkpoint, vae, refiner)
        except Exception as e:
            log.exception("loading %s failed", checkpoint.title)
            self._end(partial(self.store.fail, job.id, f"model load failed: {checkpoint.title}: {e}"))
            return
        previewer, scale = self._previewer(cache_key(checkpoint, vae), pipeline)
        self._set(previewer=previewer, preview_scale=scale)
        self._generate(pipeline, job)

    def _previewer(self, key: str, pipeline: Any) -> tuple[Any, int]:
        """The pipeline's preview decoder, made once per loaded checkpoint (None for a pipeline without a
        model, as a test's stub)."""
        if key not in self._previewers:
            model = getattr(pipeline, "model", None)
            if model is None or not hasattr(model, "config"):
                return None, 1
            from sdstudio.pipelines.preview import previewer_for

            try:
                self._previewers[key] = (previewer_for(model), model.config.vae.downsample)
            except Exception:  # a preview is a nicety: the job runs without one
                log.exception("no preview decoder for %s", key)
                return None, 1
        return self._previewers[key]

    def _generate(self, pipeline: Any, job: Job) -> None:
        payload = job.request
        p = with_defaults(job.kind, payload)
        n_iter = max(1, int(p["n_iter"]))
        seed = int(p["seed"])
        if seed == -1:
            seed = secrets.randbelow(2**32)  # not the global `random`: no shared state to disturb
        out_dir = self.outputs / job.id
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        seeds: list[int] = []
        subseeds: list[int] = []
        infotexts: list[str] = []
        warnings: list[str] = []
        self._set(n_iter=n_iter, loading=None, started=time.time())
        end: Callable[[], object] | None = None  # the job's final state, written by _end
        try:
            for k in range(n_iter):
                request = to_request(job.kind, payload, self.limits, seed=seed + k * int(p["batch_size"]))
                self._set(iteration=k, step=0, steps=request.steps, skipped=False, latents=None)
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
                end = partial(self.store.mark_canceled, job.id)
        except (SdStudioError, FieldError) as e:
            end = partial(self.store.fail, job.id, str(e))
        except Exception as e:
            log.exception("job %s failed", job.id)
            end = partial(self.store.fail, job.id, f"{type(e).__name__}: {e}")
        else:
            result_json = {"files": files, "seeds": seeds, "subseeds": subseeds, "infotexts": infotexts,
                           "warnings": warnings}  # fmt: skip
            end = partial(self.store.complete, job.id, result_json)
        finally:
            self._end(end)

    def _end(self, write: Callable[[], object] | None) -> None:
        """A job's end: its final state written to the store (``write``; None: none, a stopping worker leaves
        it running for the next start) and the progress cleared, both under the lock that readers of the
        progress take, so that one who sees the job ended in the store never sees it still running here."""
        with self._lock:
            try:
                if write is not None:
                    write()
            finally:
                self._progress = Progress()

    def _callback(self, step: Any) -> None:
        latents = step.denoised[:1].detach().to("cpu", copy=True)
        self._set(step=step.i + 1, steps=step.total, latents=latents)
        progress = self.progress()
        if progress.interrupted or progress.skipped or self._stop.is_set():
            raise _Stopped


class WorkerPool:
    """``--workers N``: N :class:`Worker` threads taking jobs from one store in submission order (the store's
    claim is atomic, so none runs a job another took). Seen from the routes it is one worker: v1's progress,
    interrupt and skip act on the oldest running job (A1111 has one); the v2 job routes act on their job."""

    def __init__(self, workers: list[Worker]) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = tuple(workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers:
            w.request_stop()  # all at once: each stops at its running job's next step
        for w in self.workers:
            w.join(timeout)

    def notify(self) -> None:
        for w in self.workers:
            w.notify()

    def preload(self) -> None:
        for w in self.workers:
            w.preload()

    def running(self) -> list[Progress]:
        """The running jobs' progress, oldest claim first."""
        return sorted((p for p in (w.progress() for w in self.workers) if p.job_id), key=lambda p: p.claimed)

    def progress(self) -> Progress:
        """The oldest running job's (an empty Progress when none runs), as v1's /progress reports it."""
        running = self.running()
        if running:
            return running[0]
        loading = next((p.loading for p in (w.progress() for w in self.workers) if p.loading), None)
        return Progress(loading=loading)

    def progress_of(self, job_id: str) -> Progress | None:
        for w in self.workers:
            p = w.progress()
            if p.job_id == job_id:
                return p
        return None

    def _oldest_worker(self) -> Worker | None:
        busy = [(w.progress(), w) for w in self.workers]
        busy = [(p, w) for p, w in busy if p.job_id]
        return min(busy, key=lambda pw: pw[0].claimed)[1] if busy else None

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop ``job_id`` (None: the oldest running job, the one v1 shows); True if one was stopped."""
        if job_id is None:
            oldest = self._oldest_worker()
            return oldest.interrupt() if oldest is not None else False
        return any(w.interrupt(job_id) for w in self.workers)

    def skip(self) -> None:
        oldest = self._oldest_worker()
        if oldest is not None:
            oldest.skip()

    def cancel(self, job_id: str) -> bool:
        return self.workers[0].store.cancel_pending(job_id) or self.interrupt(job_id)
