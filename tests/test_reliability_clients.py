"""Slow and many clients: idle crowds, slowloris heads and bodies, slow readers, readers that never read.

What must hold: thousands of idle keep-alive connections cost little and do not slow anyone
down; a head or body dribbled in is cut off by `server.idle_seconds` / `server.body_seconds`;
a client reading a fast stream slowly holds the gateway's memory flat (backpressure reaches
the upstream); a client that stops reading is dropped after `timeouts.idle`, freeing the
upstream connection. The memory and descriptor figures come from a `python -m edgeproxy serve`
subprocess, sampled from /proc.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.mock_upstream import MockUpstream
from edgeproxy.app import LOG_STORE

from .conftest import GatewayFactory, RunningGateway, wait_until
from .gateway_process import GatewayProcess
from .reliability_tools import fd_count, logged_rows, rss_kib

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
IDLE_CONNECTIONS = 2000


def port_of(gateway: RunningGateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before closing; fails if it is still open after `timeout`."""
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout}s") from None


async def test_slowloris_head_is_closed_after_idle_seconds(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway("[server]\nidle_seconds = 1.0\n")
    port = port_of(gateway)
    # One header byte every 100 ms: the head would take 10 s to arrive.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()

    async def dribble() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(dribble())
    try:
        await closed_within(reader, 3.0)
        assert 0.9 <= time.monotonic() - started < 2.5
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    # A connection that says nothing at all, and one idle after a response, go the same way.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await closed_within(reader, 2.5)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_within(reader, 2.5)
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_slow_body_gets_a_408_after_body_seconds_and_is_logged(
    mock, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway(
        "[server]\nbody_seconds = 1.0\n", {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"}, logs="server"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
    body = orjson.dumps(CHAT)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Helicone-Request-Id: 11111111-2222-4333-8444-555555555555\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
    )
    started = time.monotonic()

    async def dribble() -> None:
        for byte in body[5:]:
            await asyncio.sleep(0.2)
            writer.write(bytes([byte]))

    sender = asyncio.create_task(dribble())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
        assert head.startswith(b"HTTP/1.1 408") and 0.9 <= time.monotonic() - started < 2.0
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert mock.requests == []

    async def row() -> dict | None:
        return (await logged_rows(gateway.app[LOG_STORE])).get("11111111-2222-4333-8444-555555555555")

    logged = await wait_until(row, timeout=10, interval=0.05)
    assert logged["status"] == 408 and "body" in logged["error"]


async def never_read(gateway: RunningGateway, body: bytes, headers: bytes) -> asyncio.StreamWriter:
    """Send one request on a socket that then reads none of the answer."""
    # A small receive buffer, so the stall comes sooner (the gateway's send buffer still fills first).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(gateway)))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (headers, len(body), body)
    )
    await writer.drain()
    return writer


async def dropped_row(gateway: RunningGateway, writer: asyncio.StreamWriter, request_id: str) -> tuple[dict, float]:
    """The request's log row once the gateway gave up on the client, and how long that took."""
    started = time.monotonic()

    async def row() -> dict | None:
        return (await logged_rows(gateway.app[LOG_STORE], "status, outcome, error, cache")).get(request_id)

    try:
        logged = await wait_until(row, timeout=15, interval=0.05)
        return logged, time.monotonic() - started
    finally:
        writer.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_client_that_never_reads_is_dropped_and_frees_the_upstream(
    mock, start_gateway: GatewayFactory, stream: bool
) -> None:
    gateway = await start_gateway(
        "[timeouts]\nidle = 1.0\n", {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"}, logs="server"
    )
    request_id = str(uuid.uuid4())
    # ~9 MB (a stream) or ~5 MB (one JSON body), and a client that reads none of it: its socket
    # buffers fill, then the gateway's writes wait; after `idle` the gateway gives up on it.
    chunks = 60_000 if stream else 800_000
    headers = b"X-Mock-Chunks: %d\r\nHelicone-Request-Id: %s\r\n" % (chunks, request_id.encode())
    writer = await never_read(gateway, orjson.dumps({**CHAT, "stream": stream}), headers)
    logged, dropped = await dropped_row(gateway, writer, request_id)
    assert (logged["status"], logged["outcome"]) == (200, "cancelled")
    assert "stopped reading" in logged["error"]
    if stream:  # the upstream connection was let go, not left pinned behind the stalled client
        await wait_until(lambda: mock.cancellations, timeout=5)
    print(
        f"\nnever-reading client ({'stream' if stream else 'whole body'}) dropped within {dropped:.1f} s (idle 1 s)"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_client_that_never_reads_a_cache_hit_is_dropped(start_gateway: GatewayFactory, stream: bool) -> None:
    # Captures (and so cache entries) up to 4 × body_max_bytes: room for the answers below.
    config = "[timeouts]\nidle = 1.0\n[logs]\nbody_max_bytes = 4000000\n"
    gateway = await start_gateway(config, {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"}, logs="server")
    body = {**CHAT, "stream": stream}
    chunks = 30_000 if stream else 800_000  # ~4.5 MB or ~5 MB: more than the socket buffers hold
    cache = {"Helicone-Cache-Enabled": "true", "X-Mock-Chunks": str(chunks)}
    async with aiohttp.ClientSession() as session:

        async def cached() -> bool:
            async with session.post(gateway.base_url + "/chat/completions", json=body, headers=cache) as r:
                await r.read()
                return r.headers["Helicone-Cache"] == "HIT"

        await wait_until(cached, timeout=10)
    request_id = str(uuid.uuid4())
    headers = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in cache.items())
    writer = await never_read(gateway, orjson.dumps(body), headers + b"Helicone-Request-Id: %s\r\n" % request_id.encode())
    logged, dropped = await dropped_row(gateway, writer, request_id)
    assert (logged["status"], logged["outcome"], logged["cache"]) == (200, "cancelled", "HIT")
    assert "stopped reading" in logged["error"]
    print(f"\nnever-reading client of a cache hit ({'stream' if stream else 'whole body'}) dropped within {dropped:.1f} s")


# --- against a gateway process, measured from /proc ----------------------------------------------


@pytest.fixture
async def process(mock: MockUpstream, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    # The gateway inherits this limit; 2,000 idle clients need as many descriptors on each side.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 3 * IDLE_CONNECTIONS + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    gateway = GatewayProcess(tmp_path / "data", mock.url, env={"EDGEPROXY_LOGS_ENABLED": "false"})
    await gateway.start()
    yield gateway
    await gateway.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def latencies(url: str, count: int) -> list[float]:
    took = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=CHAT) as response:
                await response.read()
                assert response.status == 200
            took.append(time.perf_counter() - started)
    return took


async def test_thousands_of_idle_keepalive_connections_cost_little(process: GatewayProcess) -> None:
    assert process.proc is not None
    pid = process.proc.pid
    before = await latencies(process.url, 200)
    rss_before, fds_before = rss_kib(pid), fd_count(pid)
    gate = asyncio.Semaphore(200)
    idle: list[asyncio.StreamWriter] = []

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
            # One request first, so each is an idle keep-alive connection, not a fresh one.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b'{"status": "ok"}')
            idle.append(writer)

    try:
        await asyncio.gather(*(open_one() for _ in range(IDLE_CONNECTIONS)))
        await wait_until(lambda: fd_count(pid) >= fds_before + IDLE_CONNECTIONS - 20, timeout=10)
        during = await latencies(process.url, 200)
        rss_during = rss_kib(pid)
    finally:
        for writer in idle:
            writer.close()
    per_connection = (rss_during - rss_before) / IDLE_CONNECTIONS
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    p99_during = sorted(during)[int(0.99 * len(during))]
    print(
        f"\n{IDLE_CONNECTIONS} idle connections: +{(rss_during - rss_before) / 1024:.1f} MiB "
        f"({per_connection:.1f} KiB each); p50 {p50_before * 1000:.2f} → {p50_during * 1000:.2f} ms, "
        f"p99 {p99_during * 1000:.2f} ms"
    )
    assert per_connection < 64
    assert p50_during < p50_before * 2 + 0.002 and p99_during < 0.1
    # Closed by the clients: the gateway lets go of every descriptor.
    await wait_until(lambda: fd_count(pid) <= fds_before + 5, timeout=10)


async def test_slow_reader_of_a_fast_stream_holds_memory_flat(
    mock: MockUpstream, process: GatewayProcess
) -> None:
    assert process.proc is not None
    pid = process.proc.pid
    await latencies(process.url, 50)  # warm: pools, imports
    baseline = rss_kib(pid)
    body = {**CHAT, "stream": True}
    # ~30 MB that the mock can send in well under a second; the client reads ~400 KB/s.
    headers = {"X-Mock-Chunks": "200000"}
    peak = baseline
    received = 0
    async with (
        aiohttp.ClientSession(read_bufsize=16384) as session,
        session.post(process.url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = await response.content.read(16384)
            received += len(chunk)
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.04)
        response.close()
    growth_mib = (peak - baseline) / 1024
    print(f"\nslow reader: read {received / 1e6:.1f} MB of ~30 MB in 5 s; gateway RSS +{growth_mib:.1f} MiB")
    assert received < 5_000_000  # the client really was slow
    assert growth_mib < 12  # not the 30 MB an unbounded buffer would hold
    await wait_until(lambda: mock.cancellations, timeout=5)
