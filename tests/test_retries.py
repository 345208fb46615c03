"""Retries with backoff, Retry-After, no retry once bytes reached the client, and fallbacks to other targets."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from bench.mock_upstream import MockUpstream

from .conftest import GatewayFactory
from .redis_server import free_port


def retry(num: int, low_ms: int = 10, high_ms: int = 40) -> dict[str, str]:
    return {
        "Helicone-Retry-Enabled": "true",
        "Helicone-Retry-Num": str(num),
        "Helicone-Retry-Min-Timeout": str(low_ms),
        "Helicone-Retry-Max-Timeout": str(high_ms),
    }


def failing_first(count: int, status: int = 500) -> dict[str, str]:
    return {"X-Mock-Fail-First": str(count), "X-Mock-Fail-Key": uuid.uuid4().hex, "X-Mock-Status": str(status)}


async def ask(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    body = body or {"model": "mock-model", "messages": [{"role": "user", "content": "nonce-" + uuid.uuid4().hex}]}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture
async def backup() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as upstream:
        yield upstream


async def test_fail_first_succeeds_after_backoff(mock, gateway, session):
    status, _, raw = await ask(session, gateway.url, {**retry(3), **failing_first(2)})
    assert status == 200 and "nonce-" in orjson.loads(raw)["choices"][0]["message"]["content"]
    assert len(mock.requests) == 3
    gaps = [later.received - earlier.received for earlier, later in zip(mock.requests, mock.requests[1:])]
    # Attempt n waits between min and min(max, min * 2**n): 10 ms, then 10–20 ms.
    assert all(gap >= 0.009 for gap in gaps), gaps


async def test_without_retry_headers_a_failure_is_final(mock, gateway, session):
    status, _, _ = await ask(session, gateway.url, failing_first(1))
    assert status == 500 and len(mock.requests) == 1


async def test_retries_run_out_and_the_last_answer_is_relayed(mock, gateway, session):
    status, _, raw = await ask(session, gateway.url, {**retry(2), **failing_first(10, 503)})
    assert status == 503 and orjson.loads(raw)["error"]["message"] == "mock: injected status 503"
    assert len(mock.requests) == 3


async def test_retry_after_is_honoured(mock, gateway, session):
    headers = {**retry(2, 10, 20), **failing_first(1, 429), "X-Mock-Retry-After": "1"}
    status, _, _ = await ask(session, gateway.url, headers)
    assert status == 200 and len(mock.requests) == 2
    assert mock.requests[1].received - mock.requests[0].received >= 1.0


async def test_no_retry_after_the_first_byte(mock, gateway, session):
    body = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "nonce-midstream"}]}
    headers = {**retry(3), "X-Mock-Chunks": "6", "X-Mock-Fail-After": "2"}
    status, _, raw = await ask(session, gateway.url, headers, body)
    assert status == 200  # the headers had gone out before the stream broke
    assert b"nonce-midstream" in raw and b"upstream_stream_error" in raw
    assert len(mock.requests) == 1


async def test_fallback_to_a_second_target(mock, backup, start_gateway: GatewayFactory, session):
    gateway = await start_gateway(f'[targets.backup]\nbase_url = "{backup.url}"\n')
    body = {"model": "mock-error-503", "messages": [{"role": "user", "content": "nonce-fallback"}]}
    fallbacks = {"Helicone-Fallbacks": orjson.dumps([{"target": "backup", "model": "mock-model"}]).decode()}
    status, _, raw = await ask(session, gateway.url, {**retry(1), **fallbacks}, body)
    assert status == 200
    answer = orjson.loads(raw)
    assert answer["model"] == "mock-model" and "nonce-fallback" in answer["choices"][0]["message"]["content"]
    # Retries on the primary first, then the backup once, with the model swapped in.
    assert len(mock.requests) == 2 and len(backup.requests) == 1
    assert backup.requests[0].json()["model"] == "mock-model"


async def test_fallback_when_the_primary_is_unreachable(mock, backup, start_gateway: GatewayFactory, session):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = await start_gateway(f'[targets.backup]\nbase_url = "{backup.url}"\n', upstream=dead)
    started = time.monotonic()
    status, _, _ = await ask(session, gateway.url, {"Helicone-Fallbacks": '["backup"]'})
    assert status == 200 and len(backup.requests) == 1
    assert time.monotonic() - started < 2
    status, _, raw = await ask(session, gateway.url, {})
    assert status == 502 and orjson.loads(raw)["error"]["code"] == "upstream_unreachable"
