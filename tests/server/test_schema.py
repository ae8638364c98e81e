"""The OpenAPI schema holds: a bounded fuzz finds no 500 and no response outside it; PNGs parse with sd-parsers."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
sd_parsers = pytest.importorskip("sd_parsers")

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# generating routes are left out (a fuzzed body may ask for 10^9 steps), and interrogate (it loads a captioner)
SKIP = {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v2/jobs", "/sdapi/v1/interrogate"}
MAX_EXAMPLES = 40  # in all, over the cheap routes (and at least one each)
TIME_LIMIT_S = 40.0


def test_bounded_fuzz_finds_no_500_and_no_schema_violation(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path not in SKIP]
    assert len(operations) >= 25
    per_operation = max(1, MAX_EXAMPLES // len(operations))
    started = time.monotonic()
    failures = []
    calls = 0
    for operation in operations:
        if time.monotonic() - started > TIME_LIMIT_S:
            break

        @settings(max_examples=per_operation, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def check(case) -> None:
            nonlocal calls
            calls += 1
            case.validate_response(case.call(timeout=10), checks=CHECKS)

        try:
            check()
        except BaseException as e:  # noqa: BLE001 (schemathesis raises a BaseExceptionGroup of failures)
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n".join(failures)
    assert calls >= len(operations)  # every operation was exercised at least once


GENERATING = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v2/jobs")
GENERATING_EXAMPLES = 8  # per route
# every fuzzed body is made cheap: one 64x64 image in 2 steps, whatever else it asks
CHEAP = {"width": 64, "height": 64, "steps": 2, "n_iter": 1, "batch_size": 1, "enable_hr": False}


def tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 20, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_bounded_fuzz_of_the_generating_routes(server) -> None:
    """Fuzzed A1111 fields (seeds, samplers, override_settings, ...) on tiny requests: never a 500."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path in GENERATING]
    assert [op.method for op in operations] == ["post"] * len(GENERATING)
    started = time.monotonic()
    failures = []
    statuses: list[int] = []
    init = tiny_png()
    for operation in operations:

        @settings(max_examples=GENERATING_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def check(case) -> None:
            assert time.monotonic() - started < TIME_LIMIT_S, "fuzz over its time"
            if isinstance(case.body, dict):
                case.body.update(CHEAP)
                if case.operation.path == "/sdapi/v1/img2img":
                    case.body["init_images"] = [init]
            response = case.call(timeout=30)
            statuses.append(response.status_code)
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except BaseException as e:  # noqa: BLE001 (schemathesis raises a BaseExceptionGroup of failures)
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n".join(failures)
    assert 200 in statuses and len(statuses) >= len(operations)


def test_txt2img_pngs_parse_with_sd_parsers(server) -> None:
    payload = {"prompt": "a red ball", "negative_prompt": "a blue cube", "seed": 4242, "steps": 3,
               "sampler_name": "DPM++ 2M", "cfg_scale": 6.5, "width": 64, "height": 64}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    info = sd_parsers.ParserManager().parse(image)
    assert info is not None and info.generator.value == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"cfg_scale": "6.5", "seed": "4242", "steps": "3"}
    assert info.full_prompt == "a red ball" and info.full_negative_prompt == "a blue cube"
    assert sampler.model.name == "toyworld" and len(sampler.model.hash) == 10
    assert info.metadata["Size"] == "64x64"
