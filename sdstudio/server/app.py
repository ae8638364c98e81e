"""FastAPI routes: translate HTTP to jobs in the store and back. They own no model state."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdstudio.errors import SdStudioError
from sdstudio.server.a1111 import (
    FieldError,
    ServerLimits,
    decode_image,
    encode_png,
    png_info,
    response,
    to_request,
    with_defaults,
)
from sdstudio.server.jobs import FINAL_STATES, Job, JobStore
from sdstudio.server.worker import Worker

log = logging.getLogger("sdstudio.server")

Payload = Annotated[dict[str, Any], Body()]  # a JSON object; unknown fields are ignored, as A1111 does
NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
V1_WAIT_POLL_S = 0.05


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    data_dir: Path
    lora_dirs: tuple[Path, ...] = ()
    embeddings_dir: Path | None = None
    auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_body_bytes: int = 64 * 1024 * 1024


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sdstudio"


def parse_auth(text: str) -> tuple[tuple[str, str], ...]:
    """``USER:PASS[,USER:PASS...]`` (as A1111's --api-auth)."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise SdStudioError(f"--api-auth: expected USER:PASS[,USER:PASS...] (got {item.strip()!r})")
        pairs.append((user, password))
    return tuple(pairs)


def error_response(status: int, error: str, detail: str, field_name: str | None = None) -> JSONResponse:
    """A1111's error shape."""
    body: dict[str, Any] = {"error": error, "detail": detail, "body": "", "errors": detail}
    if field_name is not None:
        body["field"] = field_name
    return JSONResponse(body, status_code=status)


def _authorized(header: str | None, auth: tuple[tuple[str, str], ...]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return any(
        secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in auth
    )  # fmt: skip


def _images(config: ServerConfig, job: Job) -> list[str]:
    files = (job.result or {}).get("files", [])
    return [encode_png(config.data_dir / "outputs" / job.id / name) for name in files]


def create_app(config: ServerConfig, pipeline_factory: Callable[[], Any]) -> FastAPI:
    """``pipeline_factory`` runs once, on the worker thread, which alone owns the pipeline it returns."""
    store = JobStore(config.data_dir / "jobs.sqlite")
    requeued = store.recover()
    if requeued:
        log.info("%d job(s) left running by a stopped server will run again", requeued)
    worker = Worker(store, pipeline_factory, config.data_dir / "outputs", config.limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(title="sdstudio", description="AUTOMATIC1111-compatible API over a SQLite job queue",
                  lifespan=lifespan)  # fmt: skip
    app.state.store = store
    app.state.worker = worker

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        if config.auth and not _authorized(request.headers.get("authorization"), config.auth):
            resp = error_response(401, "Unauthorized", "Incorrect username or password")
            resp.headers["WWW-Authenticate"] = "Basic"
            return resp
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return error_response(413, "PayloadTooLarge", f"request body over {config.max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError) -> JSONResponse:
        return error_response(422, "FieldError", str(exc), exc.field)

    @app.exception_handler(SdStudioError)
    async def user_error(request: Request, exc: SdStudioError) -> JSONResponse:
        return error_response(422, type(exc).__name__, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "RequestValidationError", str(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, type(exc).__name__, str(exc.detail))

    def submit(kind: str, payload: dict[str, Any]) -> str:
        from sdstudio.pipelines.validate import check_request

        check_request(to_request(kind, payload, config.limits))  # refuse now, not in the worker
        job_id = store.submit(kind, payload)
        worker.notify()
        return job_id

    def wait(job_id: str) -> Job:
        while True:
            job = store.get(job_id)
            if job is not None and job.state in FINAL_STATES:
                return job
            time.sleep(V1_WAIT_POLL_S)

    def v1_generate(kind: str, payload: dict[str, Any]) -> Any:
        job = wait(submit(kind, payload))
        if job.state == "failed":
            return error_response(500, "GenerationError", job.error or "failed")
        result = job.result or {}
        return response(kind, payload, _images(config, job), result.get("seeds", []), result.get("infotexts", []),
                        result.get("subseeds"))  # fmt: skip

    @app.post("/sdapi/v1/txt2img")
    def txt2img(payload: Payload) -> Any:
        return v1_generate("txt2img", payload)

    @app.post("/sdapi/v1/img2img")
    def img2img(payload: Payload) -> Any:
        return v1_generate("img2img", payload)

    @app.post("/sdapi/v1/png-info")
    def pnginfo(payload: Payload) -> Any:
        return png_info(decode_image(payload.get("image"), "image"))

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> Any:
        p = worker.progress()
        done = (p.iteration + (p.step / p.steps if p.steps else 0)) / p.n_iter if p.n_iter else 0.0
        elapsed = time.time() - p.started if p.job_id else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = {
            "skipped": p.skipped,
            "interrupted": p.interrupted,
            "stopping_generation": False,
            "job": p.job_id or "",
            "job_count": p.n_iter if p.job_id else 0,
            "job_timestamp": "",
            "job_no": p.iteration,
            "sampling_step": p.step,
            "sampling_steps": p.steps,
        }
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": None,
                "textinfo": None if p.job_id is None else f"step {p.step}/{p.steps}"}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> Any:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> Any:
        worker.skip()
        return {}

    def model_info() -> dict[str, Any]:
        return {"title": config.model.name, "model_name": config.model.stem, "hash": None, "sha256": None,
                "filename": str(config.model), "config": None}  # fmt: skip

    @app.get("/sdapi/v1/options")
    def get_options() -> Any:
        return {"sd_model_checkpoint": config.model.name, "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                "samples_format": "png"}  # fmt: skip

    @app.post("/sdapi/v1/options")
    def set_options(payload: Payload) -> Any:
        wanted = payload.get("sd_model_checkpoint")
        if wanted not in (None, config.model.name, config.model.stem):
            raise FieldError(
                "sd_model_checkpoint", f"switching models is not supported; loaded: {config.model.name}"
            )
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> Any:
        return [model_info()]

    @app.get("/sdapi/v1/samplers")
    def samplers() -> Any:
        from sdstudio.diffusion.samplers import sampler_names

        return [{"name": n, "aliases": [], "options": {}} for n in sampler_names()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> Any:
        from sdstudio.diffusion.schedulers import SCHEDULERS

        names = ["Automatic", *SCHEDULERS]
        return [
            {"name": n, "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for n in names
        ]

    def network_files(folders: tuple[Path, ...]) -> list[Path]:
        return sorted(
            f for d in folders if d.is_dir() for f in d.rglob("*") if f.suffix.lower() in NETWORK_SUFFIXES
        )

    @app.get("/sdapi/v1/loras")
    def loras() -> Any:
        return [
            {"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}}
            for f in network_files(config.lora_dirs)
        ]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> Any:
        folders = (config.embeddings_dir,) if config.embeddings_dir else ()
        loaded = {f.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                           "vectors": None} for f in network_files(folders)}  # fmt: skip
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> Any:
        return {
            "ckpt": str(config.model),
            "lora_dir": [str(d) for d in config.lora_dirs],
            "embeddings_dir": str(config.embeddings_dir) if config.embeddings_dir else None,
            "data_dir": str(config.data_dir),
            "api_auth": bool(config.auth),
            **{k: v for k, v in asdict(config.limits).items()},
        }

    @app.get("/sdapi/v1/memory")
    def memory() -> Any:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": pages * page - free, "total": pages * page}
        return {"ram": ram, "cuda": {"error": "not reported"}}

    def job_view(job: Job) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": job.id, "kind": job.kind, "state": job.state, "created": job.created, "started": job.started,
            "finished": job.finished, "error": job.error, "position": store.position(job.id),
            "step": 0, "steps": 0,
        }  # fmt: skip
        p = worker.progress()
        if job.state == "running" and p.job_id == job.id:
            view.update(step=p.step, steps=p.steps, iteration=p.iteration, n_iter=p.n_iter)
        if job.state == "done":
            result = job.result or {}
            view.update(images=_images(config, job), infotexts=result.get("infotexts", []),
                        seeds=result.get("seeds", []), warnings=result.get("warnings", []))  # fmt: skip
        return view

    @app.post("/sdapi/v2/jobs")
    def create_job(payload: Payload) -> Any:
        kind = payload.get("kind", "txt2img")
        with_defaults(kind, payload)  # checks kind
        request = {k: v for k, v in payload.items() if k != "kind"}
        job_id = submit(kind, request)
        return {"id": job_id, "state": "pending", "position": store.position(job_id)}

    @app.get("/sdapi/v2/jobs/{job_id}")
    def get_job(job_id: str) -> Any:
        job = store.get(job_id)
        if job is None:
            return error_response(404, "NotFound", f"no job {job_id}")
        return job_view(job)

    @app.delete("/sdapi/v2/jobs/{job_id}")
    def cancel_job(job_id: str) -> Any:
        job = store.get(job_id)
        if job is None:
            return error_response(404, "NotFound", f"no job {job_id}")
        if job.state in FINAL_STATES:
            return error_response(409, "Conflict", f"job {job_id} is already {job.state}")
        worker.cancel(job_id)
        return {"id": job_id, "canceled": True}

    return app
