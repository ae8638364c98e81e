"""A real uvicorn server on a free loopback port, in a thread, with the embedded model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sdstudio.cli import embedded_model_path
from sdstudio.engine import Pipeline
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig, create_app

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Running:
    url: str
    port: int
    data_dir: Path
    app: object


@pytest.fixture(scope="session")
def embedded_pipeline() -> Pipeline:
    path = embedded_model_path()
    if path is None:
        pytest.skip("embedded model not shipped")
    return Pipeline.from_file(path)


def loader(embedded_pipeline: Pipeline):
    """The shared embedded pipeline for the embedded model, a fresh load for anything else."""
    embedded = embedded_model_path()

    def load(path: Path, vae: Path | None = None) -> Pipeline:
        if Path(path) == embedded and vae is None:
            return embedded_pipeline
        return Pipeline.from_file(path, vae=vae)

    return load


def serve(config: ServerConfig, load) -> Iterator[Running]:
    port = free_port()
    app = create_app(config, load)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", port, config.data_dir, app)
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_pipeline: Pipeline) -> Iterator[Running]:
    config = ServerConfig(
        model=embedded_model_path(),
        data_dir=tmp_path_factory.mktemp("serve"),
        limits=ServerLimits(max_size=256, default_size=None),
    )
    yield from serve(config, loader(embedded_pipeline))


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory, embedded_pipeline: Pipeline) -> Iterator[Running]:
    config = ServerConfig(
        model=embedded_model_path(),
        data_dir=tmp_path_factory.mktemp("serve-auth"),
        auth=(("alice", "s3cret"),),
        limits=ServerLimits(max_size=256, default_size=None),
    )
    yield from serve(config, loader(embedded_pipeline))
