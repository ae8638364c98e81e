"""FastAPI routes: translate HTTP to jobs in the store and back. They own no model state."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdstudio.errors import SdStudioError
from sdstudio.eval.captions import CaptionerSpec, load_captioner
from sdstudio.eval.interrogate import Captioner
from sdstudio.server.a1111 import (
    CONTROLNET_API_VERSION,
    CONTROLNET_FIELD,
    MAX_CONTROL_UNITS,
    FieldError,
    ServerLimits,
    control_models,
    controlnet_detect,
    decode_image,
    encode_png,
    module_list,
    payload_from_infotext,
    png_info,
    refiner_title,
    request_schema,
    response,
    to_request,
    with_defaults,
    without_control_images,
)
from sdstudio.server.grids import AXIS_NAMES, grid_jobs
from sdstudio.server.jobs import FINAL_STATES, Job, JobStore
from sdstudio.server.models import (
    Checkpoint,
    CheckpointRegistry,
    ModelCache,
    UnknownCheckpoint,
    default_budget_bytes,
    find_controlnet,
    list_controlnets,
)
from sdstudio.server.networks import NetworkKind, card_metadata, list_networks
from sdstudio.server.worker import CHECKPOINT_FIELD, Worker, WorkerPool, checkpoint_record

log = logging.getLogger("sdstudio.server")

Payload = Annotated[dict[str, Any], Body()]  # a JSON object; unknown fields are ignored, as A1111 does
V1_WAIT_RECHECK_S = 1.0  # a v1 call wakes when its job ends; this only bounds each wait
EVENTS_POLL_S = 0.05
EVENTS_KEEPALIVE_S = 15.0
HISTORY_MAX_LIMIT = 200
UI_DIR = Path(__file__).parent / "ui"
# the page loads and fetches from this server only: no CDN, no other host, no inline script
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "Cache-Control": "no-cache",
}
EVENT_FIELDS = ("id", "state", "position", "step", "steps", "iteration", "n_iter", "loading")
DETECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "controlnet detect request",
    "properties": {
        "controlnet_module": {"type": "string", "default": "none"},
        "controlnet_input_images": {
            "type": "array",
            "items": {"type": "string", "description": "a base64 image"},
        },
        "controlnet_processor_res": {"type": "integer", "default": -1},
        "controlnet_threshold_a": {"type": "number", "default": -1},
        "controlnet_threshold_b": {"type": "number", "default": -1},
        "controlnet_masks": {"type": "array", "items": {"type": "string", "description": "a base64 mask"}},
        "low_vram": {"type": "boolean", "default": False},
    },
    "additionalProperties": True,
}


@dataclass(frozen=True)
class ServerConfig:
    model: Path  # the default checkpoint (--model, or the embedded model)
    data_dir: Path
    models_dir: Path | None = None  # --models-dir: more checkpoints, switched to by title
    lora_dirs: tuple[Path, ...] = ()
    hypernetwork_dirs: tuple[Path, ...] = ()
    embeddings_dir: Path | None = None
    controlnet_dirs: tuple[Path, ...] = ()  # --controlnet-dir: sd-webui-controlnet's models folders
    cache_budget_bytes: int | None = None  # loaded checkpoints kept in memory; None: half the free RAM
    cors_origins: tuple[str, ...] = ()  # --cors-allow-origins; empty: no CORS headers at all
    auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_body_bytes: int = 64 * 1024 * 1024
    workers: int = 1  # --workers: generation threads sharing the queue, each with its own loaded models
    devices: tuple[str, ...] = ()  # the device of each worker ("cuda:0", ...); empty: the loader's own
    ui: bool = True  # the web UI at / (--no-ui: the API alone)
    # /sdapi/v1/interrogate's captioner (--clip / --blip / --phrases), loaded on its first request
    captioner: CaptionerSpec = field(default_factory=CaptionerSpec)


class ErrorBody(BaseModel):
    """A1111's error shape (``modules/api/api.py`` ``handle_exception``), with the refused field if one."""

    error: str
    detail: str
    body: str
    errors: str
    field: str | None = None


# documented on every route, so that the OpenAPI schema describes the errors the server does send
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in ((401, "missing or wrong --api-auth credentials"), (404, "no such job"),
                       (409, "the job has already ended"), (413, "request body too large"),
                       (422, "a refused field or payload"), (500, "generation failed"),
                       (501, "not implemented yet"))
}  # fmt: skip


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


def config_from_args(
    args: argparse.Namespace, embedded_model: Path | None
) -> tuple[ServerConfig, Callable[..., Any]]:
    """``sdstudio serve``'s flags -> its config and the function that loads a checkpoint (with a VAE file, or
    None for its own; ``refiner=``: an SDXL refiner file loaded beside it); ``embedded_model``: the default
    checkpoint when ``--model`` names none."""
    from sdstudio.engine import Pipeline

    model = Path(args.model) if args.model else embedded_model
    if model is None or not model.exists():
        raise SdStudioError(f"{args.model}: no such file or folder (--model)")
    lora_dirs = tuple(Path(d) for d in args.lora_dir or ())
    hypernetwork_dirs = tuple(Path(d) for d in args.hypernetwork_dir or ())
    controlnet_dirs = tuple(Path(d) for d in getattr(args, "controlnet_dir", None) or ())
    folders = [*lora_dirs, *hypernetwork_dirs, *controlnet_dirs,
               *(Path(p) for p in (args.embeddings, args.models_dir) if p)]  # fmt: skip
    for folder in folders:
        if not folder.is_dir():
            raise SdStudioError(f"{folder}: folder does not exist or is not a folder")
    if args.model_cache_mb is not None and args.model_cache_mb <= 0:
        raise SdStudioError(f"--model-cache-mb must be positive (got {args.model_cache_mb})")
    workers, devices = worker_devices(getattr(args, "workers", None))
    auth = parse_auth(args.api_auth) if args.api_auth else ()
    if not auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-auth: anyone who can reach it can use it", args.host)
    config = ServerConfig(
        model=model,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        models_dir=Path(args.models_dir) if args.models_dir else None,
        lora_dirs=lora_dirs,
        hypernetwork_dirs=hypernetwork_dirs,
        embeddings_dir=Path(args.embeddings) if args.embeddings else None,
        controlnet_dirs=controlnet_dirs,
        auth=auth,
        limits=ServerLimits(max_size=args.max_size, default_size=None if args.model is None else 512),
        cache_budget_bytes=None if args.model_cache_mb is None else args.model_cache_mb << 20,
        cors_origins=tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()),
        workers=workers,
        devices=devices,
        ui=not getattr(args, "no_ui", False),
        captioner=captioner_spec(args),
    )

    def load(path: Path, vae: Path | None, device: str = "cpu", refiner: Path | None = None) -> Pipeline:
        # ControlNets come as files the server resolved in --controlnet-dir (a1111.CONTROLNET_FIELD)
        return Pipeline.from_file(path, vae=vae, lora_dirs=lora_dirs, hypernetwork_dirs=hypernetwork_dirs,
                                  embeddings_dir=config.embeddings_dir, device=device, refiner=refiner,
                                  controlnet_dirs=controlnet_dirs)  # fmt: skip

    return config, load


def captioner_spec(args: argparse.Namespace) -> CaptionerSpec:
    """``--clip FILE``, ``--blip DIR``, ``--phrases PATH``: checked to exist now, loaded on the first interrogate."""
    clip, blip = getattr(args, "clip", None), getattr(args, "blip", None)
    phrases = tuple(getattr(args, "phrases", None) or ())
    if clip is not None and not Path(clip).is_file():
        raise SdStudioError(f"{clip}: no such CLIP file (--clip)")
    if blip is not None and not Path(blip).is_dir():
        raise SdStudioError(f"{blip}: no such BLIP folder (--blip)")
    for p in phrases:
        if not Path(p).exists():
            raise SdStudioError(f"{p}: no such phrase list file or folder (--phrases)")
    return CaptionerSpec(clip=clip, blip=blip, phrases=phrases)


def worker_devices(workers: int | None, gpus: int | None = None) -> tuple[int, tuple[str, ...]]:
    """``--workers``: how many, and each one's device. With GPUs, one worker per GPU by default and worker
    ``i`` on ``cuda:(i mod GPUs)``; on a CPU one worker by default (more share the cores: each is slower)."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers is not None and workers < 1:
        raise SdStudioError(f"--workers must be at least 1 (got {workers})")
    if gpus:
        n = workers or gpus
        return n, tuple(f"cuda:{i % gpus}" for i in range(n))
    return workers or 1, ("cpu",) * (workers or 1)


class Guard:
    """Every request: HTTP Basic auth when ``auth`` is set (401), and a body over ``max_bytes`` refused with
    413, from its Content-Length before it is read, or, for a body without one (chunked), by counting the
    bytes as they arrive. Plain ASGI, not ``BaseHTTPMiddleware``: that one reads the body in a task group,
    which would wrap the 413 raised here in an ExceptionGroup that FastAPI answers with 400."""

    def __init__(self, app: ASGIApp, auth: tuple[tuple[str, str], ...], max_bytes: int) -> None:
        self.app = app
        self.auth = auth
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.auth and not _authorized(headers.get("authorization"), self.auth):
            resp = error_response(401, "Unauthorized", "Incorrect username or password")
            resp.headers["WWW-Authenticate"] = "Basic"
            await resp(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            resp = error_response(413, "PayloadTooLarge", f"request body over {self.max_bytes} bytes")
            await resp(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # raised inside the route's body read: FastAPI passes it on to the error handler
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` documenting a route's JSON body (the route itself takes any object)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


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


def create_app(config: ServerConfig, load: Callable[..., Any]) -> FastAPI:
    """``load(path, vae)`` returns the Pipeline of a checkpoint, with a VAE file (or None: its own), and
    ``load(path, vae, refiner=path)`` one with an SDXL refiner beside it; it runs on the worker thread only,
    which alone runs the pipelines it returns (kept in a :class:`ModelCache`)."""
    store = JobStore(config.data_dir / "jobs.sqlite")
    requeued = store.recover()
    if requeued:
        log.info("%d job(s) left running by a stopped server will run again", requeued)
    registry = CheckpointRegistry(config.model, config.models_dir, config.data_dir / "checkpoint_hashes.json")
    budget = config.cache_budget_bytes if config.cache_budget_bytes is not None else default_budget_bytes()
    if config.workers < 1:
        raise SdStudioError(f"--workers must be at least 1 (got {config.workers})")
    devices = config.devices or (None,) * config.workers
    # one cache per worker, its share of the budget: a pipeline is only ever run by the worker that loaded it
    caches = tuple(
        ModelCache(load if device is None else functools.partial(load, device=device), budget // config.workers)
        for device in devices
    )  # fmt: skip
    worker = WorkerPool([
        Worker(store, registry, cache, config.data_dir / "outputs", config.limits, name=f"worker-{i}")
        for i, cache in enumerate(caches)
    ])  # fmt: skip
    if config.workers > 1:
        log.info(
            "%d workers on %s", config.workers, ", ".join(str(d or "the loader's device") for d in devices)
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(title="sdstudio", description="AUTOMATIC1111-compatible API over a SQLite job queue",
                  lifespan=lifespan, responses=ERROR_RESPONSES)  # fmt: skip
    app.state.store = store
    app.state.worker = worker
    app.state.registry = registry
    app.state.cache = caches[0]
    app.state.caches = caches

    app.add_middleware(Guard, auth=config.auth, max_bytes=config.max_body_bytes)

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

    def find_checkpoint(title: Any, field_name: str) -> Checkpoint:
        if not isinstance(title, str) or not title:
            raise FieldError(field_name, f"expected a checkpoint title (got {title!r})")
        try:
            return registry.find(title)
        except UnknownCheckpoint as e:
            raise FieldError(field_name, str(e)) from None

    def find_vae(name: Any, field_name: str) -> Checkpoint | None:
        if not isinstance(name, str):
            raise FieldError(field_name, f"expected a VAE name, Automatic or None (got {name!r})")
        try:
            return registry.find_vae(name)
        except UnknownCheckpoint as e:
            raise FieldError(field_name, str(e)) from None

    def find_controlnets(payload: dict[str, Any]) -> list[str]:
        """The file of each enabled ControlNet unit, found in --controlnet-dir by the extension's title."""
        paths = []
        for field_name, title in control_models(payload):
            try:
                paths.append(str(find_controlnet(config.controlnet_dirs, title).path))
            except UnknownCheckpoint as e:
                raise FieldError(field_name, str(e)) from None
        return paths

    def checked(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload as the store keeps it, with its checkpoint, refiner and ControlNet files fixed;
        refused now, not in the worker."""
        from sdstudio.pipelines.validate import check_request

        # the private fields are the server's own: never taken from a client
        payload = {k: v for k, v in payload.items() if k not in (CHECKPOINT_FIELD, CONTROLNET_FIELD)}
        check_request(to_request(kind, payload, config.limits))
        wanted_refiner = refiner_title(payload)
        refiner = None if wanted_refiner is None else find_checkpoint(wanted_refiner, "refiner_checkpoint")
        controlnets = find_controlnets(payload)
        overrides = payload.get("override_settings")
        overrides = overrides if isinstance(overrides, dict) else {}
        wanted = overrides.get("sd_model_checkpoint")
        checkpoint = (
            registry.default if wanted is None
            else find_checkpoint(wanted, "override_settings.sd_model_checkpoint")
        )  # fmt: skip
        wanted_vae = overrides.get("sd_vae")
        vae = registry.default_vae if wanted_vae is None else find_vae(wanted_vae, "override_settings.sd_vae")
        record = checkpoint_record(checkpoint, vae)
        if refiner is not None:  # loaded beside the checkpoint, one pipeline (the worker's cache key has it)
            record["refiner"] = checkpoint_record(refiner)
        # the checkpoint is fixed now: a later switch of the default does not change a queued job's
        return {
            **payload,
            CHECKPOINT_FIELD: record,
            **({CONTROLNET_FIELD: controlnets} if controlnets else {}),
        }

    def submit(kind: str, payload: dict[str, Any]) -> str:
        job_id = store.submit(kind, checked(kind, payload))
        worker.notify()
        return job_id

    def wait(job_id: str) -> Job:
        job = store.wait(job_id, recheck_s=V1_WAIT_RECHECK_S)
        assert job is not None  # jobs are never deleted
        return job

    def v1_generate(kind: str, payload: dict[str, Any]) -> Any:
        job = wait(submit(kind, payload))
        if job.state == "failed":
            return error_response(500, "GenerationError", job.error or "failed")
        result = job.result or {}
        return response(kind, payload, _images(config, job), result.get("seeds", []), result.get("infotexts", []),
                        result.get("subseeds"))  # fmt: skip

    @app.post("/sdapi/v1/txt2img", openapi_extra=body_schema(request_schema("txt2img")))
    def txt2img(payload: Payload) -> Any:
        return v1_generate("txt2img", payload)

    @app.post("/sdapi/v1/img2img", openapi_extra=body_schema(request_schema("img2img")))
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
        if p.loading is not None:
            textinfo = f"Loading {p.loading}"
        else:
            textinfo = None if p.job_id is None else f"step {p.step}/{p.steps}"
        preview = None if skip_current_image else p.preview()
        return {"progress": done, "eta_relative": eta, "state": state, "textinfo": textinfo,
                "current_image": None if preview is None else encode_png(preview)}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> Any:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> Any:
        worker.skip()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options() -> Any:
        current, vae = registry.default, registry.default_vae
        return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256,
                "sd_vae": vae.name if vae else "Automatic", "CLIP_stop_at_last_layers": 1,
                "eta_noise_seed_delta": 0, "samples_format": "png"}  # fmt: skip

    @app.post("/sdapi/v1/options")
    def set_options(payload: Payload) -> Any:
        """Switches the default checkpoint at once; the worker loads it when idle (this never waits)."""
        wanted, wanted_vae = payload.get("sd_model_checkpoint"), payload.get("sd_vae")
        checkpoint = None if wanted is None else find_checkpoint(wanted, "sd_model_checkpoint")
        # both are checked before either is set
        vae = None if wanted_vae is None else find_vae(wanted_vae, "sd_vae")
        if checkpoint is not None:
            registry.set_default(checkpoint)
            log.info("default checkpoint: %s", checkpoint.title)
        if wanted_vae is not None:
            registry.set_default_vae(vae)
            log.info("default VAE: %s", vae.name if vae else "the checkpoint's own")
        if checkpoint is not None or wanted_vae is not None:
            worker.preload()
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> Any:
        return [c.api_item() for c in registry.list()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> Any:
        registry.refresh()
        return None

    @app.post("/sdapi/v1/unload-checkpoint")
    def unload_checkpoint() -> Any:
        for cache in caches:
            cache.clear()  # a running job keeps its own reference until it ends
        return {}

    @app.post("/sdapi/v1/reload-checkpoint")
    def reload_checkpoint() -> Any:
        worker.preload()
        return {}

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

    network_folders: dict[NetworkKind, tuple[Path, ...]] = {
        "lora": config.lora_dirs,
        "embedding": (config.embeddings_dir,) if config.embeddings_dir else (),
        "hypernetwork": config.hypernetwork_dirs,
    }

    @app.get("/sdapi/v1/loras")
    def loras() -> Any:
        return [
            {"name": e.name, "alias": e.metadata().get("ss_output_name", e.name), "path": str(e.path),
             "metadata": e.metadata()}
            for e in list_networks("lora", config.lora_dirs)
        ]  # fmt: skip

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> Any:
        loaded = {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                           "vectors": None} for e in list_networks("embedding", network_folders["embedding"])}  # fmt: skip
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> Any:
        return {
            "ckpt": str(config.model),
            "ckpt_dir": str(config.models_dir) if config.models_dir else None,
            "lora_dir": [str(d) for d in config.lora_dirs],
            "hypernetwork_dir": [str(d) for d in config.hypernetwork_dirs],
            "embeddings_dir": str(config.embeddings_dir) if config.embeddings_dir else None,
            "controlnet_dir": [str(d) for d in config.controlnet_dirs],
            "data_dir": str(config.data_dir),
            "api": True,
            "api_auth": bool(config.auth),
            "cors_allow_origins": ",".join(config.cors_origins) or None,
            **{k: v for k, v in asdict(config.limits).items()},
        }

    @app.get("/sdapi/v1/memory")
    def memory() -> Any:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": pages * page - free, "total": pages * page}
        models = {
            "loaded": [c.title for cache in caches for c in cache.loaded()],
            "bytes": sum(cache.nbytes() for cache in caches),
            "budget": sum(cache.budget for cache in caches),
        }
        return {"ram": ram, "cuda": {"error": "not reported"}, "models": models}

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> Any:
        from sdstudio.pipelines.hires import PIXEL_UPSCALERS

        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n in ("None", *PIXEL_UPSCALERS)]  # fmt: skip

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> Any:
        from sdstudio.pipelines.hires import LATENT_UPSCALERS

        return [{"name": n} for n in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> Any:
        return [{"model_name": v.name, "filename": str(v.path)} for v in registry.vaes()]

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks() -> Any:
        return [
            {"name": e.name, "path": str(e.path)}
            for e in list_networks("hypernetwork", config.hypernetwork_dirs)
        ]

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles() -> Any:
        return []

    @app.get("/sdapi/v1/scripts")
    def scripts() -> Any:
        # with ControlNet folders, the extension's script, as A1111 lists its alwayson scripts by name
        names = ["controlnet"] if config.controlnet_dirs else []
        return {"txt2img": names, "img2img": list(names)}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> Any:
        return []

    # the listings read their folders on every call, so a refresh has nothing to do (A1111 answers null);
    # a loaded model keeps the embeddings it was loaded with until it is loaded again (unload-checkpoint)
    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae() -> Any:
        return None

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> Any:
        return None

    @app.post("/sdapi/v1/refresh-embeddings")
    def refresh_embeddings() -> Any:
        return None

    captioner_lock = threading.Lock()  # one caption at a time: the captioner's text cache is shared
    captioners: dict[str, Captioner] = {}

    @app.post("/sdapi/v1/interrogate")
    def interrogate(payload: Payload) -> Any:
        """AUTOMATIC1111's "Interrogate CLIP": ``{"caption": ...}`` by sdstudio's captioner (``best`` mode)."""
        model = payload.get("model", "clip")
        if model != "clip":
            raise FieldError("model", f"{model!r}: only 'clip' (BLIP + CLIP-ranked phrases) is available")
        image = decode_image(payload.get("image"), "image").convert("RGB")
        with captioner_lock:
            if "clip" not in captioners:
                captioners["clip"] = load_captioner(config.captioner)
            caption = captioners["clip"].caption([np.asarray(image)], "best")[0]
        return {"caption": caption.text}

    # sd-webui-controlnet's own routes (scripts/api.py), as its clients call them
    @app.get("/controlnet/version")
    def controlnet_version() -> Any:
        return {"version": CONTROLNET_API_VERSION}

    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True) -> Any:
        """The ControlNet files of --controlnet-dir as ``name [hash]`` (read on every call: ``update`` is moot)."""
        return {"model_list": [f.title for f in list_controlnets(config.controlnet_dirs)]}

    @app.get("/controlnet/module_list")
    def controlnet_module_list(alias_names: bool = False) -> Any:
        return module_list(alias_names)

    @app.get("/controlnet/settings")
    def controlnet_settings() -> Any:
        return {"control_net_unit_count": MAX_CONTROL_UNITS}

    @app.post("/controlnet/detect", openapi_extra=body_schema(DETECT_SCHEMA))
    def controlnet_detect_route(payload: Payload) -> Any:
        """A preprocessor's output for each image (numpy work on this thread: no model is involved)."""
        return controlnet_detect(payload)

    def job_view(job: Job, preview: bool = False) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": job.id, "kind": job.kind, "state": job.state, "created": job.created, "started": job.started,
            "finished": job.finished, "error": job.error, "position": store.position(job.id),
            "step": 0, "steps": 0, "worker": job.worker,
        }  # fmt: skip
        p = worker.progress_of(job.id) if job.state == "running" else None
        if p is not None:
            view.update(step=p.step, steps=p.steps, iteration=p.iteration, n_iter=p.n_iter, loading=p.loading)
            image = p.preview() if preview else None
            if image is not None:
                view["preview"] = encode_png(image)
        if job.state == "done":
            result = job.result or {}
            infotexts = result.get("infotexts", [])
            view.update(images=_images(config, job), infotexts=infotexts, seeds=result.get("seeds", []),
                        warnings=result.get("warnings", []),
                        payloads=[payload_from_infotext(text) for text in infotexts])  # fmt: skip
        return view

    job_schema = request_schema("txt2img")
    job_schema["properties"] = {**request_schema("img2img")["properties"], **job_schema["properties"],
                                "kind": {"type": "string", "enum": ["txt2img", "img2img"], "default": "txt2img"}}  # fmt: skip

    @app.post("/sdapi/v2/jobs", openapi_extra=body_schema(job_schema))
    def create_job(payload: Payload) -> Any:
        kind = payload.get("kind", "txt2img")
        with_defaults(kind, payload)  # checks kind
        request = {k: v for k, v in payload.items() if k != "kind"}
        job_id = submit(kind, request)
        return {"id": job_id, "state": "pending", "position": store.position(job_id)}

    @app.get("/sdapi/v2/jobs/{job_id}")
    def get_job(job_id: str, preview: bool = True) -> Any:
        """The job; while it runs, ``preview``: its current image from the preview decoder (base64 PNG)."""
        job = store.get(job_id)
        if job is None:
            return error_response(404, "NotFound", f"no job {job_id}")
        return job_view(job, preview)

    @app.delete("/sdapi/v2/jobs/{job_id}")
    def cancel_job(job_id: str) -> Any:
        job = store.get(job_id)
        if job is None:
            return error_response(404, "NotFound", f"no job {job_id}")
        if job.state in FINAL_STATES:
            return error_response(409, "Conflict", f"job {job_id} is already {job.state}")
        worker.cancel(job_id)
        return {"id": job_id, "canceled": True}

    @app.post("/sdapi/v2/grids")
    def create_grid(payload: Payload) -> Any:
        """An X/Y/Z plot: the payload of ``kind`` (txt2img / img2img) with ``x_type`` / ``x_values`` (and y, z)
        as A1111's axis types and value syntax. Every cell is checked before any is queued; each is then a
        job of its own (``cells``: their ids and places), with the labels to draw the grid."""
        kind = payload.get("kind", "txt2img")
        with_defaults(kind, payload)  # checks kind
        base = {k: v for k, v in payload.items() if k != "kind" and not k.startswith(("x_", "y_", "z_"))}
        axes = {a: (payload.get(f"{a}_type"), payload.get(f"{a}_values")) for a in "xyz"}
        grid = grid_jobs(kind, base, axes)
        records = []
        for cell in grid.cells:
            try:
                records.append(checked(kind, cell.payload))
            except (FieldError, SdStudioError) as e:
                where = ", ".join(label for label in (grid.x_labels[cell.ix], grid.y_labels[cell.iy],
                                                      grid.z_labels[cell.iz]) if label)  # fmt: skip
                raise SdStudioError(f"grid cell {where or 'x=0'}: {e}") from None
        cells = [{"id": store.submit(kind, record), "x": c.ix, "y": c.iy, "z": c.iz}
                 for c, record in zip(grid.cells, records)]  # fmt: skip
        worker.notify()
        return {"cells": cells, "x_labels": grid.x_labels, "y_labels": grid.y_labels,
                "z_labels": grid.z_labels, "axes": grid.axes}  # fmt: skip

    @app.get("/sdapi/v2/grids/axes")
    def grid_axes() -> Any:
        """The axis types a grid takes."""
        return list(AXIS_NAMES)

    def history_view(job: Job) -> dict[str, Any]:
        """An ended job as the history lists it: its request without the images it was given, links to its
        images, and each image's infotext with the payload that makes it again."""
        request = {k: v for k, v in without_control_images(job.request).items()
                   if k not in ("init_images", "mask", CHECKPOINT_FIELD, CONTROLNET_FIELD)}  # fmt: skip
        result = job.result or {}
        infotexts = result.get("infotexts", [])
        return {
            "id": job.id, "kind": job.kind, "state": job.state, "created": job.created, "finished": job.finished,
            "error": job.error, "prompt": str(request.get("prompt") or ""), "request": request,
            "images": [f"/sdapi/v2/jobs/{job.id}/images/{i}" for i in range(len(result.get("files", [])))],
            "infotexts": infotexts, "seeds": result.get("seeds", []),
            "payloads": [payload_from_infotext(text) for text in infotexts],
        }  # fmt: skip

    @app.get("/sdapi/v2/history")
    def history(q: str = "", limit: int = 50, before: float | None = None) -> Any:
        """Ended jobs, the last to end first; ``q``: a part of the prompt; ``before``: the ``finished`` time of
        the previous page's last job."""
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise FieldError("limit", f"must be 1..{HISTORY_MAX_LIMIT} (got {limit})")
        return [history_view(job) for job in store.history(q, limit, before)]

    @app.delete("/sdapi/v2/history/{job_id}")
    def delete_history(job_id: str) -> Any:
        """Removes an ended job and its image files (a job still pending or running: cancel it first)."""
        job = store.get(job_id)
        if job is None:
            return error_response(404, "NotFound", f"no job {job_id}")
        if job.state not in FINAL_STATES or not store.delete(job.id):
            return error_response(409, "Conflict", f"job {job_id} has not ended: cancel it first")
        shutil.rmtree(config.data_dir / "outputs" / job.id, ignore_errors=True)
        return {"id": job.id, "deleted": True}

    @app.get("/sdapi/v2/jobs/{job_id}/images/{index}", response_class=FileResponse)
    def job_image(job_id: str, index: int) -> Any:
        """Image ``index`` of a finished job, as the PNG file written (its infotext in it)."""
        job = store.get(job_id)
        files = (job.result or {}).get("files", []) if job is not None else []
        if job is None or not 0 <= index < len(files):
            return error_response(404, "NotFound", f"no image {index} of job {job_id}")
        path = config.data_dir / "outputs" / job.id / files[index]
        if not path.is_file():
            return error_response(404, "NotFound", f"the image file of job {job_id} is gone")
        return FileResponse(path, media_type="image/png", filename=f"{job.id[:8]}-{files[index]}",
                            content_disposition_type="inline")  # fmt: skip

    @app.get("/sdapi/v2/networks")
    def networks() -> Any:
        """LoRAs, embeddings and hypernetworks in the configured folders, as the UI's cards show them."""
        return {
            kind: [
                {"name": e.name, "tag": e.tag(), "metadata": card_metadata(e),
                 "preview": f"/sdapi/v2/networks/{kind}/{e.name}/preview" if e.preview else None}
                for e in list_networks(kind, folders)
            ]
            for kind, folders in network_folders.items()
        }  # fmt: skip

    @app.get("/sdapi/v2/networks/{kind}/{name}/preview", response_class=FileResponse)
    def network_preview(kind: str, name: str) -> Any:
        """The preview image beside a network's file (NAME.png, NAME.preview.png, .jpg, .webp)."""
        folders = network_folders.get(kind)  # type: ignore[call-overload]
        entry = next((e for e in list_networks(kind, folders) if e.name == name), None) if folders else None  # type: ignore[arg-type]
        if entry is None or entry.preview is None:
            return error_response(404, "NotFound", f"no preview for {kind} {name!r}")
        return FileResponse(entry.preview)

    def job_event(job_id: str) -> tuple[str, dict[str, Any]] | None:
        """The job's event now (None once it is gone); SQLite work, so run off the event loop."""
        job = store.get(job_id)
        if job is None:
            return None
        if job.state in FINAL_STATES:
            return job.state, job_view(job)
        view = {k: v for k, v in job_view(job).items() if k in EVENT_FIELDS}
        return "progress", view

    @app.get("/sdapi/v2/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Any:
        """Server-sent events: ``progress`` whenever the job's state, place or step changes, then one
        ``done`` / ``failed`` / ``canceled`` event with the job as GET /sdapi/v2/jobs/{id} gives it."""
        if store.get(job_id) is None:
            return error_response(404, "NotFound", f"no job {job_id}")

        async def stream() -> AsyncIterator[str]:
            last: Any = None
            quiet_since = time.monotonic()
            while True:
                event = await asyncio.to_thread(job_event, job_id)
                if event is None:
                    return
                name, data = event
                if data != last:
                    last = data
                    quiet_since = time.monotonic()
                    yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
                elif time.monotonic() - quiet_since > EVENTS_KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                if name != "progress" or await request.is_disconnected():
                    return
                await asyncio.sleep(EVENTS_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    if config.ui:

        @app.get("/", include_in_schema=False)
        def index() -> Any:
            return FileResponse(UI_DIR / "index.html", headers=UI_HEADERS)

        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    if config.cors_origins:
        # added last, so outermost: a preflight is answered before the auth check
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)  # fmt: skip

    return app
