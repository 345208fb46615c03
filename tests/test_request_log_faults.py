"""The request log under faults: ClickHouse down or hung mid-run, the gateway stopped or killed under load.

What must hold: requests never wait for the log; no row is counted twice; nothing a client got an
answer for is lost, except on kill -9 the rows still in memory, at most the last
`flush_seconds` of traffic (the window the README documents).
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from pathlib import Path

import aiohttp
import clickhouse_connect
import orjson
import pytest

from bench.mock_upstream import MockUpstream
from edgeproxy.app import LOG_BATCHER, LOG_STORE
from edgeproxy.logs.batcher import MIN_INSERT_PATIENCE

from .clickhouse_server import ClickHouseServer
from .conftest import GatewayFactory, wait_until
from .gateway_process import GatewayProcess, Load, rows_in_folder

CHAT = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]})
FLUSH_SECONDS = 0.5
# The documented kill -9 window (a batch filling, and one given its insert patience), plus
# scheduling slack on a loaded 2-core machine: rows answered before it must survive.
WINDOW = FLUSH_SECONDS + MIN_INSERT_PATIENCE + 0.5


async def timed(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    """Seconds each of `count` sequential chat requests took, start to last byte."""
    took = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(f"{url}/chat/completions", data=CHAT, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            assert r.status == 200
        took.append(time.perf_counter() - started)
    return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
async def test_clickhouse_outage_costs_no_latency_and_loses_nothing(
    outage: str, double: ClickHouseServer, start_gateway: GatewayFactory
) -> None:
    env = {
        "EDGEPROXY_LOGS_CLICKHOUSE_URL": double.url,
        "EDGEPROXY_LOGS_DATABASE": f"t_{uuid.uuid4().hex[:12]}",
        "EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05",
        "EDGEPROXY_LOGS_CONNECT_TIMEOUT_SECONDS": "1",
        "EDGEPROXY_LOGS_TIMEOUT_SECONDS": "1",
    }
    gateway = await start_gateway(logs="server", env=env)
    batcher, store = gateway.app[LOG_BATCHER], gateway.app[LOG_STORE]
    async with aiohttp.ClientSession() as session:
        await timed(session, gateway.base_url, 50)  # warm up: pools, migrations
        await wait_until(lambda: batcher.stats.rows_written + batcher.stats.rows_replayed >= 50, timeout=10)
        up = await timed(session, gateway.base_url, 300)
        spooled = batcher.stats.rows_spooled  # the first batches wait in the spool for the migrations
        # A stopped server refuses connections; a frozen one accepts them and never answers.
        await asyncio.to_thread(double.stop if outage == "stopped" else double.pause)
        down = await timed(session, gateway.base_url, 300)
        await wait_until(lambda: batcher.stats.rows_spooled > spooled, timeout=10)
        # Still down: the requests of this phase, too, went straight through.
        down += await timed(session, gateway.base_url, 100)
    await asyncio.to_thread(double.start if outage == "stopped" else double.resume)
    total = 50 + 300 + 300 + 100

    async def landed() -> bool:
        rows = await store.query(f"SELECT uniqExact(request_id) AS n FROM {store.qualified}")
        return rows[0]["n"] == total

    await wait_until(landed, timeout=20, interval=0.1)
    await wait_until(lambda: batcher.stats.store_up and batcher.spool.segments() == [], timeout=10)
    counts = await store.query(
        f"SELECT (SELECT count() FROM {store.qualified}) AS stored, "
        f"(SELECT count() FROM {store.qualified} FINAL) AS final"
    )
    # Not even a duplicate waiting for a merge: a replayed batch keeps its insert token.
    assert counts[0] == {"stored": total, "final": total}
    assert batcher.stats.rows_dropped == 0
    p50_up, p50_down = statistics.median(up), statistics.median(down)
    print(
        f"\n{outage}: p50 up {p50_up * 1000:.2f} ms, down {p50_down * 1000:.2f} ms; "
        f"p99 up {percentile(up, 0.99) * 1000:.2f} ms, down {percentile(down, 0.99) * 1000:.2f} ms; "
        f"{batcher.stats.rows_spooled} rows spooled, {batcher.stats.rows_replayed} replayed"
    )
    assert p50_down <= p50_up * 1.5 + 0.0005, (p50_up, p50_down)
    # A request that waited on the dead store would take its timeout (1 s).
    assert max(down) < 1.0


async def test_sigterm_under_load_loses_nothing(mock: MockUpstream, tmp_path: Path) -> None:
    data = tmp_path / "data"
    gateway = GatewayProcess(data, mock.url)
    try:
        await gateway.start()
        load = Load(gateway.url)
        load.start()
        await load.until_answered(300)
        gateway.signal(signal.SIGTERM)
        # The load keeps coming while the gateway drains and exits.
        assert await gateway.wait() == 0, gateway.output()
        await load.stop()
        # The next start replays any spool the last one left (a clean stop leaves none).
        await gateway.start()
        assert await gateway.stop() == 0, gateway.output()
    finally:
        await gateway.kill()
    counts = await rows_in_folder(data / "clickhouse")
    missing = set(load.answered) - set(counts)
    assert not missing, f"{len(missing)} of {len(load.answered)} answered requests are not in the log"
    assert set(counts.values()) == {1}
    assert list((data / "spool").glob("*.jsonl")) == []
    print(f"\nSIGTERM: {len(load.answered)} answered, {len(counts)} rows, {load.failed} requests refused")


@pytest.mark.parametrize(
    "store",
    [
        "embedded",
        # The server variants run an outage phase first; make reliability runs them.
        pytest.param("server-stopped", marks=pytest.mark.slow),
        pytest.param("server-frozen", marks=pytest.mark.slow),
    ],
)
async def test_kill_9_loses_at_most_the_last_flush_window(
    store: str, mock: MockUpstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    env = {"EDGEPROXY_LOGS_FLUSH_SECONDS": str(FLUSH_SECONDS)}
    double: ClickHouseServer | None = None
    if store != "embedded":
        double = request.getfixturevalue("double")
        env |= {"EDGEPROXY_LOGS_CLICKHOUSE_URL": double.url, "EDGEPROXY_LOGS_CONNECT_TIMEOUT_SECONDS": "1"}
    gateway = GatewayProcess(data, mock.url, env=env)
    try:
        await gateway.start()
        load = Load(gateway.url)
        load.start()
        await load.until_answered(300)
        if double is not None:
            # The store goes away (refusing, or hung): batches must reach the spool all the same.
            await asyncio.to_thread(double.stop if store == "server-stopped" else double.pause)
        # Long enough that requests answered before the window are at stake too.
        await load.run_for(WINDOW + 1.0)
        killed_at = time.monotonic()
        gateway.signal(signal.SIGKILL)
        await gateway.wait()
        await load.stop()
        spooled = list((data / "spool").glob("*.jsonl"))
        if double is not None:
            assert spooled, "batches spooled while the store was down survive the kill"
            await asyncio.to_thread(double.start if store == "server-stopped" else double.resume)
        await gateway.start()
        assert await gateway.stop() == 0, gateway.output()
    finally:
        await gateway.kill()
    assert list((data / "spool").glob("*.jsonl")) == [], "the restart replayed the spool"
    counts = await (rows_in_server(double) if double is not None else rows_in_folder(data / "clickhouse"))
    assert set(counts.values()) <= {1}, "a replayed batch was stored twice"
    safe = [i for i, t in load.answered.items() if t < killed_at - WINDOW]
    assert len(safe) > 300, "the load ran long enough to put rows outside the window at stake"
    lost = sorted(killed_at - t for i, t in load.answered.items() if i not in counts)
    assert not lost or lost[-1] < WINDOW, f"{len(lost)} rows lost, oldest answered {lost[-1]:.2f}s before the kill"
    print(
        f"\nkill -9 ({store}): {len(load.answered)} answered, {len(spooled)} spool files at the kill, "
        f"{len(lost)} lost (oldest {max(lost, default=0):.2f}s before the kill; "
        f"{len(load.answered) - len(safe)} answered in the last {WINDOW:.1f}s)"
    )


async def rows_in_server(double: ClickHouseServer) -> dict[str, int]:
    """Request id → stored copies (no FINAL: a duplicate shows) in the double's default log table."""

    def read() -> dict[str, int]:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=double.port, autogenerate_session_id=False)
        try:
            rows = client.query("SELECT toString(request_id), count() FROM edgeproxy.requests GROUP BY 1")
            return dict(rows.result_rows)
        finally:
            client.close()

    return await asyncio.to_thread(read)
