"""Upstream faults: each ends in its documented answer within its timeout, and is logged with that status.

The gateway runs with short timeouts (first byte and idle 0.5 s, total 3 s) and logs to a
ClickHouse HTTP endpoint; every case checks the client's answer, how long it took, and the
request's row (status, outcome, error, attempts). Retries and fallbacks themselves are in
test_retries.py; what is here is the failure shapes and their bounds.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from edgeproxy.app import LOG_STORE

from .conftest import GatewayFactory, RunningGateway, wait_until
from .reliability_tools import logged_rows

TIMEOUTS = "[timeouts]\nfirst_byte = 0.5\nidle = 0.5\ntotal = 3.0\n"
ENV = {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"}
STREAM = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "fault"}]}
PLAIN = {"model": "mock-model", "messages": [{"role": "user", "content": "fault"}]}


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def retry(num: int, low_ms: int = 10, high_ms: int = 50) -> dict[str, str]:
    return {
        "Helicone-Retry-Enabled": "true",
        "Helicone-Retry-Num": str(num),
        "Helicone-Retry-Min-Timeout": str(low_ms),
        "Helicone-Retry-Max-Timeout": str(high_ms),
    }


@dataclass
class Answer:
    request_id: str
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float

    def last_event(self) -> dict[str, Any]:
        data = [line[6:] for line in self.body.split(b"\n") if line.startswith(b"data: {")]
        return dict(orjson.loads(data[-1]))


async def ask(
    gateway: RunningGateway, body: dict[str, Any], headers: dict[str, str], path: str = "/v1/chat/completions"
) -> Answer:
    request_id = str(uuid.uuid4())
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.post(
            gateway.url + path, json=body, headers={"Helicone-Request-Id": request_id, **headers}
        ) as response,
    ):
        data = await response.read()
        return Answer(request_id, response.status, data, dict(response.headers), time.monotonic() - started)


async def row_of(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    store = gateway.app[LOG_STORE]

    async def found() -> dict[str, Any] | None:
        rows = await logged_rows(store, "status, outcome, error, attempts, response_body")
        return rows.get(request_id)

    row = await wait_until(found, timeout=10, interval=0.05)
    assert isinstance(row, dict)
    return row


@pytest.fixture
async def faulty(mock, start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(
        TIMEOUTS + f'[targets.down]\nbase_url = "http://127.0.0.1:{dead_port()}"\n', ENV, logs="server"
    )


async def test_refused_connection_is_a_502(faulty: RunningGateway) -> None:
    answer = await ask(faulty, PLAIN, {}, "/down/v1/chat/completions")
    assert answer.status == 502 and orjson.loads(answer.body)["error"]["code"] == "upstream_unreachable"
    assert answer.seconds < 1.0
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["outcome"]) == (502, "upstream_error") and "unreachable" in row["error"]


async def test_reset_mid_stream_ends_with_an_error_event(faulty: RunningGateway) -> None:
    answer = await ask(faulty, STREAM, {"X-Mock-Chunks": "6", "X-Mock-Fail-After": "2"})
    assert answer.status == 200  # the headers went out before the reset
    assert answer.last_event()["error"]["code"] == "upstream_stream_error"
    assert b"echo: fault" in answer.body  # what arrived before the reset was relayed
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["outcome"]) == (200, "upstream_error") and "broke" in row["error"]


async def test_hang_before_the_first_byte_is_a_504_within_first_byte(faulty: RunningGateway) -> None:
    for body in (PLAIN, STREAM):
        answer = await ask(faulty, body, {"X-Mock-Delay-Ms": "10000"})
        assert answer.status == 504 and orjson.loads(answer.body)["error"]["code"] == "upstream_timeout"
        assert 0.5 <= answer.seconds < 1.5
        row = await row_of(faulty, answer.request_id)
        assert (row["status"], row["outcome"]) == (504, "upstream_error")


async def test_hang_between_chunks_ends_with_an_error_event_within_idle(faulty: RunningGateway) -> None:
    answer = await ask(faulty, STREAM, {"X-Mock-Chunks": "6", "X-Mock-Hang-After": "2"})
    assert answer.status == 200
    assert answer.last_event()["error"]["code"] == "upstream_timeout"
    assert 0.5 <= answer.seconds < 1.5
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["outcome"], row["error"]) == (
        200,
        "upstream_error",
        "upstream stream idle timeout",
    )


async def test_a_slow_but_steady_stream_is_not_cut_by_idle(faulty: RunningGateway) -> None:
    # 8 gaps of 0.3 s: 2.4 s in all, more than idle (0.5 s) but each gap within it.
    answer = await ask(faulty, STREAM, {"X-Mock-Chunks": "8", "X-Mock-Chunk-Gap-Ms": "300"})
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["outcome"]) == (200, "ok")


async def test_a_stream_longer_than_total_is_cut_with_an_error_event(faulty: RunningGateway) -> None:
    answer = await ask(faulty, STREAM, {"X-Mock-Chunks": "40", "X-Mock-Chunk-Gap-Ms": "200"})
    assert answer.status == 200 and answer.last_event()["error"]["code"] == "upstream_timeout"
    assert 3.0 <= answer.seconds < 4.0
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["outcome"]) == (200, "upstream_error")


async def test_garbage_is_relayed_as_is_and_logged(mock, faulty: RunningGateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mock.url + "/v1/chat/completions", json=STREAM, headers={"X-Mock-Garbage": "1"}
        ) as direct,
    ):
        want = await direct.read()
    answer = await ask(faulty, STREAM, {"X-Mock-Garbage": "1"})
    # The head event carries the mock's own id and time; the garbage after it must arrive byte for byte.
    garbage = want[want.index(b'data: {"id": "mock-garbage"') :]
    assert answer.status == 200 and answer.body.endswith(garbage) and answer.body.startswith(b"data: {")
    row = await row_of(faulty, answer.request_id)
    assert row["status"] == 200 and row["response_body"]
    answer = await ask(faulty, PLAIN, {"X-Mock-Garbage": "1"})
    assert answer.status == 200 and answer.body.startswith(b'{"id": "mock-garbage"')
    row = await row_of(faulty, answer.request_id)
    assert row["status"] == 200 and row["response_body"].startswith('{"id": "mock-garbage"')
    assert (await ask(faulty, PLAIN, {})).status == 200  # and the gateway carries on


async def test_429_storm_is_bounded_and_ends_with_the_429(mock, faulty: RunningGateway) -> None:
    storm = {"X-Mock-Status": "429", "X-Mock-Retry-After": "0.2"}
    answer = await ask(faulty, PLAIN, {**storm, **retry(3)})
    assert answer.status == 429 and answer.headers.get("Retry-After") == "0.2"
    assert len(mock.requests) == 4  # the first attempt and three retries, no more
    gaps = [b.received - a.received for a, b in zip(mock.requests, mock.requests[1:])]
    assert all(gap >= 0.2 for gap in gaps), gaps  # Retry-After honoured each time
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["attempts"]) == (429, 4)


async def test_429_whose_retry_after_passes_the_total_timeout_is_relayed_at_once(
    mock, faulty: RunningGateway
) -> None:
    # Waiting 60 s would pass the 3 s total: the gateway gives the client the provider's answer now.
    answer = await ask(faulty, PLAIN, {"X-Mock-Status": "429", "X-Mock-Retry-After": "60", **retry(5)})
    assert answer.status == 429 and answer.headers.get("Retry-After") == "60"
    assert answer.seconds < 1.0 and len(mock.requests) == 1
    row = await row_of(faulty, answer.request_id)
    assert (row["status"], row["attempts"]) == (429, 1)


async def test_retries_stop_at_the_total_timeout(mock, faulty: RunningGateway) -> None:
    # Each retry waits about 1 s (the mock says so); the 3 s total leaves room for three attempts.
    answer = await ask(faulty, PLAIN, {"X-Mock-Status": "503", "X-Mock-Retry-After": "1", **retry(10)})
    assert answer.status == 503 and answer.seconds < 3.5
    assert 2 <= len(mock.requests) <= 3
    row = await row_of(faulty, answer.request_id)
    assert row["status"] == 503 and row["attempts"] == len(mock.requests)


async def test_concurrent_faults_leave_the_gateway_healthy(mock, faulty: RunningGateway) -> None:
    faults: list[Callable[[], Awaitable[Answer]]] = [
        lambda: ask(faulty, STREAM, {"X-Mock-Fail-After": "1"}),
        lambda: ask(faulty, STREAM, {"X-Mock-Hang-After": "1"}),
        lambda: ask(faulty, PLAIN, {"X-Mock-Delay-Ms": "5000"}),
        lambda: ask(faulty, STREAM, {"X-Mock-Garbage": "1"}),
        lambda: ask(faulty, PLAIN, {}, "/down/v1/chat/completions"),
        lambda: ask(faulty, PLAIN, {"X-Mock-Status": "500"}),
    ]
    answers = await asyncio.gather(*(fault() for fault in faults * 10))
    assert max(a.seconds for a in answers) < 2.0
    assert sorted({a.status for a in answers}) == [200, 500, 502, 504]

    async def all_logged() -> dict[str, Any]:
        rows = await logged_rows(faulty.app[LOG_STORE])
        return rows if all(a.request_id in rows for a in answers) else {}

    rows = await wait_until(all_logged, timeout=10, interval=0.05)
    assert {a.request_id: a.status for a in answers} == {
        a.request_id: rows[a.request_id]["status"] for a in answers
    }
    assert (await ask(faulty, PLAIN, {})).status == 200
