"""The request body limit: from Content-Length, and by counting a chunked body's bytes as they arrive."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sdstudio.cli import embedded_model_path
from sdstudio.server.a1111 import ServerLimits
from sdstudio.server.app import ServerConfig
from tests.server.conftest import Running, loader, serve

LIMIT = 4096


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, embedded_pipeline) -> Iterator[Running]:
    config = ServerConfig(model=embedded_model_path(), data_dir=tmp_path_factory.mktemp("limits"),
                          limits=ServerLimits(max_size=256, default_size=None), max_body_bytes=LIMIT)  # fmt: skip
    yield from serve(config, loader(embedded_pipeline))


def chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    """A JSON body of ``total`` bytes in ``size``-byte pieces: httpx sends it chunked, without Content-Length."""
    body = b'{"image": "' + b"A" * (total - 14) + b'"}'
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_chunked_body_over_the_limit_is_refused(small_server) -> None:
    sent: list[int] = []

    def counted() -> Iterator[bytes]:
        for piece in chunks(20 * LIMIT):
            sent.append(len(piece))
            yield piece

    with httpx.Client(base_url=small_server.url, timeout=10) as c:
        r = c.post("/sdapi/v1/png-info", content=counted(), headers={"Content-Type": "application/json"})
        assert (
            "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        )
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == f"request body over {LIMIT} bytes"
        # under the limit, a chunked body is read as any other (an unreadable image: 422, not 413)
        r = c.post(
            "/sdapi/v1/png-info", content=chunks(LIMIT // 2), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["field"] == "image"
        # and the header check still answers before the body
        r = c.post(
            "/sdapi/v1/png-info", content=b"x" * (LIMIT + 1), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
