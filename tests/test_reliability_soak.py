"""Soak and process lifecycle: minutes of mixed load on a gateway process; SIGTERM and kill -9 mid-stream.

The soak runs `python -m edgeproxy serve` (one worker, logging to a ClickHouse HTTP endpoint)
in front of the mock provider in a process of its own, at high concurrency, with a mix of
streamed, plain, cached, rate-limited, upstream-error and broken-stream requests. It samples
the gateway's RSS and open descriptors from /proc each second and asserts: no outcome but the
intended one per kind; first-minute and last-minute memory and descriptors level; every
request logged exactly once. The lifecycle tests check that SIGTERM drains a stream that
began before it, and that kill -9 leaves a gateway that restarts and serves.
Row counts across SIGTERM and kill -9 are test_request_log_faults.py's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .gateway_process import GatewayProcess, Load
from .reliability_tools import MixedLoad, MockProcess, Sampler, clickhouse_rows, median_rss

SOAK_SECONDS = float(os.environ.get("EDGEPROXY_SOAK_SECONDS", "150"))
SOAK_CONCURRENCY = 128
STREAM = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": "drain me"}]}


@pytest.fixture
async def mock_process() -> AsyncIterator[MockProcess]:
    mock = MockProcess()
    await mock.start()
    yield mock
    await mock.stop()


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 180)
async def test_soak_mixed_load_memory_and_descriptors_flat_every_request_logged_once(
    mock_process: MockProcess, tmp_path: Path, clickhouse_url: str
) -> None:
    database = f"soak_{uuid.uuid4().hex[:10]}"
    env = {
        "EDGEPROXY_LOGS_CLICKHOUSE_URL": clickhouse_url,
        "EDGEPROXY_LOGS_DATABASE": database,
        "EDGEPROXY_LOGS_FLUSH_SECONDS": "0.5",
    }
    gateway = GatewayProcess(tmp_path / "data", mock_process.url, env=env)
    await gateway.start()
    assert gateway.proc is not None
    sampler = Sampler(gateway.proc.pid, interval=1.0)
    load = MixedLoad(gateway.url, concurrency=SOAK_CONCURRENCY, duration=SOAK_SECONDS)
    try:
        sampler.start()
        started = time.monotonic()
        await load.run()
        elapsed = time.monotonic() - started
        await sampler.stop()
        assert await gateway.stop() == 0, gateway.output()
    finally:
        await sampler.stop()
        await gateway.kill()

    counts = load.counts()
    served = len(load.sent)
    assert not load.errors, f"{len(load.errors)} unintended outcomes, e.g. {load.errors[:5]}"
    assert all(counts[kind] > 100 for kind in load.weights), counts
    minute = min(60.0, SOAK_SECONDS / 3)
    first = sampler.window(minute / 2, minute)  # past start-up: pools, imports, caches warm
    last = sampler.window(elapsed - minute / 2, elapsed)
    drift_mib = (median_rss(last) - median_rss(first)) / 1024
    fds_first, fds_last = max(s[2] for s in first), max(s[2] for s in last)
    stored, distinct, ids = await asyncio.to_thread(clickhouse_rows, clickhouse_url, database)
    missing = set(load.sent) - ids
    p99 = {k: sorted(v)[int(0.99 * len(v))] * 1000 for k, v in load.latencies.items() if v}
    print(
        f"\nsoak: {served} requests in {elapsed:.0f} s ({served / elapsed:.0f}/s) at concurrency "
        f"{SOAK_CONCURRENCY}: {dict(counts)}\n"
        f"  RSS peak {sampler.peak_rss_kib / 1024:.1f} MiB, median first minute {median_rss(first) / 1024:.1f} MiB, "
        f"last minute {median_rss(last) / 1024:.1f} MiB (drift {drift_mib:+.1f} MiB); fds {fds_first} → {fds_last}\n"
        f"  p99 ms by kind: { {k: round(v, 1) for k, v in p99.items()} }\n"
        f"  log: {stored} rows, {distinct} distinct, {len(missing)} of {served} requests missing"
    )
    assert drift_mib < 8, drift_mib
    assert fds_last <= fds_first + 10
    assert not missing and stored == distinct == served


@pytest.mark.slow
async def test_sigterm_drains_a_stream_that_began_before_it(
    mock_process: MockProcess, tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        tmp_path / "data", mock_process.url, env={"EDGEPROXY_SERVER_DRAIN_SECONDS": "10"}
    )
    await gateway.start()
    # 30 chunks 100 ms apart: about 3 s of stream, most of it after the SIGTERM, under load.
    headers = {"X-Mock-Chunks": "30", "X-Mock-Chunk-Gap-Ms": "100"}
    load = Load(gateway.url, concurrency=16)
    load.start()
    try:
        await load.until_answered(300)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gateway.url + "/v1/chat/completions", json=STREAM, headers=headers
            ) as response:
                assert response.status == 200
                first = await response.content.readany()
                assert first
                signalled = time.monotonic()
                gateway.signal(signal.SIGTERM)
                # New connections are refused while the old stream carries on.
                await asyncio.sleep(0.3)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(gateway.url + "/healthz")
                rest = await response.read()
            finished = time.monotonic() - signalled
            assert (first + rest).endswith(b"data: [DONE]\n\n")
            assert (first + rest).count(b'"content":') >= 30
        assert await gateway.wait(15) == 0, gateway.output()
        await load.stop()
        print(
            f"\nSIGTERM under load ({len(load.answered)} answered, {load.failed} refused once it stopped listening): "
            f"the stream finished {finished:.1f} s after the signal, then the gateway exited 0"
        )
    finally:
        await load.stop()
        await gateway.kill()


@pytest.mark.slow
async def test_sigterm_cuts_a_stream_longer_than_drain_seconds(
    mock_process: MockProcess, tmp_path: Path
) -> None:
    gateway = GatewayProcess(tmp_path / "data", mock_process.url, env={"EDGEPROXY_SERVER_DRAIN_SECONDS": "1"})
    await gateway.start()
    headers = {"X-Mock-Chunks": "100", "X-Mock-Chunk-Gap-Ms": "100"}  # 10 s of stream
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(gateway.url + "/v1/chat/completions", json=STREAM, headers=headers) as response,
        ):
            await response.content.readany()
            signalled = time.monotonic()
            gateway.signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert await gateway.wait(10) == 0, gateway.output()
        assert time.monotonic() - signalled < 4
    finally:
        await gateway.kill()


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_serves(mock_process: MockProcess, tmp_path: Path) -> None:
    data = tmp_path / "data"
    gateway = GatewayProcess(data, mock_process.url, env={"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.2"})
    await gateway.start()
    headers = {"X-Mock-Chunks": "100", "X-Mock-Chunk-Gap-Ms": "50"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            streams = [
                await session.post(gateway.url + "/v1/chat/completions", json=STREAM, headers=headers)
                for _ in range(20)
            ]
            for response in streams:
                assert await response.content.readany()
            gateway.signal(signal.SIGKILL)
            await gateway.wait(10)
            for response in streams:  # each client sees its stream break, none hangs
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        await gateway.start()  # same data folder: the embedded store and spool are reopened
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.post(
                    gateway.url + "/v1/chat/completions", json={**STREAM, "stream": False}
                ) as response:
                    assert response.status == 200 and b"drain me" in await response.read()
        assert await gateway.stop() == 0, gateway.output()
    finally:
        await gateway.kill()
    assert not list((data / "spool").glob("*.tmp"))
