"""LogBatcher against both engines: flush triggers, drops, outages, spool replay, close and restart.

Outages are real: the server double is killed and restarted on the same port and folder; the
embedded table is detached and attached again. Counts use FINAL and uniqExact(request_id), as the
log's readers must.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.logs.batcher import LogBatcher
from edgeproxy.logs.migrate import migrate
from edgeproxy.logs.record import LogRecord, Row
from edgeproxy.logs.spool import Spool
from edgeproxy.logs.store import LogStore, open_log_store
from edgeproxy.settings import LogSettings
from tests.clickhouse_server import ClickHouseServer, clickhouse_url
from tests.conftest import wait_until

FAST = {"retry_initial": 0.05, "retry_max": 0.2}


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse-double"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(params=["embedded", "server"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, request: pytest.FixtureRequest, embedded_dir: Path) -> AsyncIterator[LogStore]:
    url = None
    if kind == "server":
        # An outage test needs a server it may stop: always the double, even with CLICKHOUSE_URL.
        stoppable = "outage" in request.fixturenames
        url = (not stoppable and clickhouse_url()) or request.getfixturevalue("double").url
    store = await _migrated(
        LogSettings(clickhouse_url=url, database=f"t_{uuid.uuid4().hex[:12]}"), embedded_dir
    )
    try:
        yield store
    finally:
        await store.command(f"DROP DATABASE IF EXISTS {store.database}")
        await store.close()


async def _migrated(settings: LogSettings, data_dir: Path) -> LogStore:
    store = open_log_store(settings, data_dir)
    await migrate(store, ttl_days=0)
    return store


@pytest.fixture
async def batchers(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LogBatcher]]]:
    """Start batchers over `tmp_path/spool`; each is closed at the end if the test did not."""
    started: list[LogBatcher] = []

    async def start(store: LogStore, spool_max_bytes: int = 10_000_000, **options: Any) -> LogBatcher:
        knobs = {
            k: options.pop(k)
            for k in list(options)
            if k in ("prepare", "retry_initial", "retry_max", "reject_after")
        }
        settings = LogSettings(spool_max_bytes=spool_max_bytes, **options)
        batcher = LogBatcher(store, Spool(tmp_path / "spool", spool_max_bytes), settings, **knobs)
        await batcher.start()
        started.append(batcher)
        return batcher

    yield start
    for batcher in started:
        await batcher.close(timeout=2.0)


def record(**fields: Any) -> LogRecord:
    fields.setdefault("request_id", str(uuid.uuid4()))
    fields.setdefault("started_at", time.time())
    fields.setdefault("app_id", "app")
    fields.setdefault("properties", {"n": "1"})
    return LogRecord(**fields)


def row(**fields: Any) -> Row:
    return record(**fields).to_row()


async def test_a_queued_request_is_one_object_for_the_collector(
    batchers: Callable[..., Awaitable[LogBatcher]], dead_store: LogStore
) -> None:
    # The young generation is collected when the count of allocated containers passes a
    # threshold (serve.GC_YOUNG_THRESHOLD): what the queue holds for a second counts toward it.
    batcher = await batchers(dead_store, flush_seconds=60.0, batch_rows=100_000)
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(1000):
            assert batcher.submit(row(properties={}))
        held = gc.get_count()[0] - before
    finally:
        gc.enable()
    # A row each; a record and its two dicts would be 3000. The slack is for the store's threads,
    # which allocate meanwhile (retrying a store that is down).
    assert 1000 <= held < 1500
    assert batcher.stats.queue_depth == 1000


async def landed(store: LogStore) -> set[str]:
    """Request ids in the table, asserting none is counted twice once collapsed."""
    rows = await store.query(f"SELECT toString(request_id) AS id FROM {store.qualified} FINAL")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    return set(ids)


@pytest.fixture
def dead_store(tmp_path: Path) -> Iterator[LogStore]:
    """A server store at a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield open_log_store(
        LogSettings(clickhouse_url=f"http://127.0.0.1:{port}", connect_timeout_seconds=1), tmp_path
    )


async def test_flushes_by_size(store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]]) -> None:
    batcher = await batchers(store, batch_rows=50, flush_seconds=30.0)
    records = [record() for _ in range(120)]
    assert all(batcher.submit(r.to_row()) for r in records)
    await wait_until(lambda: batcher.stats.rows_written == 100)
    # The rest waits for a full batch or the 30 s deadline, not flushed early.
    assert batcher.stats.queue_depth == 20
    assert len(await landed(store)) == 100


async def test_flushes_by_time(store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]]) -> None:
    batcher = await batchers(store, batch_rows=1000, flush_seconds=0.3)
    started = time.monotonic()
    records = [record() for _ in range(3)]
    for r in records:
        batcher.submit(r.to_row())
    await wait_until(lambda: batcher.stats.rows_written == 3, timeout=5.0)
    assert time.monotonic() - started >= 0.25
    assert await landed(store) == {r.request_id for r in records}


async def test_close_drains_the_queue(
    store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]]
) -> None:
    batcher = await batchers(store, batch_rows=1000, flush_seconds=60.0)
    records = [record() for _ in range(30)]
    for r in records:
        batcher.submit(r.to_row())
    await batcher.close(timeout=5.0)
    assert batcher.stats.rows_written == 30
    assert await landed(store) == {r.request_id for r in records}
    assert batcher.spool.segments() == []
    assert not batcher.submit(row())  # closed: refused and counted
    assert batcher.stats.rows_dropped == 1


async def test_submit_never_blocks_on_a_hung_store(
    tmp_path: Path, batchers: Callable[..., Awaitable[LogBatcher]]
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = open_log_store(
        LogSettings(clickhouse_url=f"http://127.0.0.1:{port}", timeout_seconds=1), tmp_path
    )
    try:
        batcher = await batchers(store, batch_rows=10, flush_seconds=0.01, queue_max_rows=100)
        started = time.perf_counter()
        accepted = [batcher.submit(row()) for _ in range(1000)]
        assert time.perf_counter() - started < 0.5
        assert accepted.count(True) == 100
        assert batcher.stats.rows_dropped == batcher.stats.rows_dropped_queue_full == 900
        # The loop keeps its schedule while the flush waits on the hung server.
        lag = 0.0
        for _ in range(20):
            tick = time.perf_counter()
            await asyncio.sleep(0.01)
            lag = max(lag, time.perf_counter() - tick - 0.01)
        assert lag < 0.25  # a blocked loop would show the 1 s insert
        # At the deadline close() spools what the store did not take; nothing is lost.
        await batcher.close(timeout=0.3)
        stats = batcher.stats
        assert stats.rows_written == 0
        assert stats.rows_spooled == 100
    finally:
        await store.close()
        server.close()


async def test_spool_budget_drops_are_counted(
    dead_store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]], caplog: pytest.LogCaptureFixture
) -> None:
    batcher = await batchers(dead_store, spool_max_bytes=3000, batch_rows=5, flush_seconds=0.01, **FAST)
    with caplog.at_level(logging.WARNING, logger="edgeproxy.logs"):
        for _ in range(60):
            batcher.submit(row())
        await wait_until(lambda: batcher.stats.rows_spooled + batcher.stats.rows_dropped == 60)
    stats = batcher.stats
    assert stats.rows_spooled > 0
    assert stats.rows_dropped == stats.rows_dropped_spool_full > 0
    assert stats.spool_bytes <= 3000
    assert not stats.store_up
    ours = [r.getMessage() for r in caplog.records if r.name == "edgeproxy.logs"]
    # Once per episode, not once per dropped batch.
    assert sum("spool is full" in m for m in ours) == 1
    assert sum("is failing" in m for m in ours) == 1
    await dead_store.close()


Outage = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


@pytest.fixture
async def outage(kind: str, store: LogStore, request: pytest.FixtureRequest) -> AsyncIterator[Outage]:
    """(begin, end) of a store outage: the server killed and restarted, or the table detached."""
    if kind == "server":
        double: ClickHouseServer = request.getfixturevalue("double")

        async def kill() -> None:
            await asyncio.to_thread(double.stop, kill=True)

        async def restart() -> None:
            await asyncio.to_thread(double.start)

        yield kill, restart
        if not double.ping():  # the test failed mid-outage: later tests need the server
            await restart()
        return

    async def detach() -> None:
        await store.command(f"DETACH TABLE {store.qualified}")

    async def attach() -> None:
        await store.command(f"ATTACH TABLE IF NOT EXISTS {store.qualified}")

    yield detach, attach
    await attach()


async def test_outage_spools_then_every_row_lands_once(
    store: LogStore,
    outage: Outage,
    batchers: Callable[..., Awaitable[LogBatcher]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    begin, end = outage
    batcher = await batchers(store, batch_rows=20, flush_seconds=0.05, **FAST)
    sent: list[str] = []

    async def send(n: int) -> None:
        for _ in range(n):
            r = record()
            assert batcher.submit(r.to_row())
            sent.append(r.request_id)
            await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="edgeproxy.logs"):
        await send(50)
        await wait_until(lambda: batcher.stats.rows_written == 50)
        await begin()
        await send(100)
        await wait_until(lambda: batcher.stats.rows_spooled == 100 and not batcher.stats.store_up)
        assert batcher.stats.queue_depth == 0  # the queue never waits for the store
        await end()
        await send(50)
        await wait_until(lambda: batcher.stats.store_up and not batcher.spool.segments(), timeout=10.0)
        await wait_until(lambda: batcher.stats.rows_written + batcher.stats.rows_replayed == 200)
    assert await landed(store) == set(sent)
    stats = batcher.stats
    # Rows sent after the outage may still be spooled until a replay notices the store is back.
    assert stats.rows_replayed == stats.rows_spooled >= 100
    assert stats.rows_dropped == 0
    assert stats.failures >= 1
    messages = [r.getMessage() for r in caplog.records if r.name == "edgeproxy.logs"]
    assert sum("is failing" in m for m in messages) == 1
    assert sum("is back" in m for m in messages) == 1


async def test_restart_replays_the_spool_a_previous_run_left(
    store: LogStore, dead_store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]]
) -> None:
    # First run: the store is unreachable, so close() leaves every row in the spool.
    first = await batchers(dead_store, batch_rows=10, flush_seconds=60.0, **FAST)
    records = [record() for _ in range(25)]
    for r in records:
        first.submit(r.to_row())
    await first.close(timeout=2.0)
    await dead_store.close()
    assert first.stats.rows_spooled == 25
    spooled = first.spool.segments()
    assert len(spooled) == 3
    # A kill -9 mid-write leaves a cut .tmp: header, one whole row, half a row.
    cut = [record(), record()]
    tmp = first.spool.directory / "99999999999999999999-1-000000.tmp"
    whole = Spool(first.spool.directory / "scratch", 1_000_000)
    whole.write("cut-token", [r.to_row() for r in cut])
    data = whole.segments()[0].read_bytes()
    tmp.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 20])

    second = await batchers(store, **FAST)
    await wait_until(lambda: not second.spool.segments() and second.stats.rows_replayed == 26, timeout=10.0)
    assert await landed(store) == {r.request_id for r in records} | {cut[0].request_id}
    assert not list(second.spool.directory.glob("*.tmp"))


async def test_a_batch_the_store_refuses_is_rejected_not_blocking(
    store: LogStore, batchers: Callable[..., Awaitable[LogBatcher]]
) -> None:
    batcher = await batchers(store, batch_rows=1, flush_seconds=0.01, reject_after=0.2, **FAST)
    batcher.submit(row(request_id="not-a-uuid"))
    good = [record() for _ in range(5)]
    for r in good:
        batcher.submit(r.to_row())
    await wait_until(lambda: batcher.stats.rows_rejected == 1 and batcher.stats.store_up, timeout=10.0)
    await wait_until(lambda: batcher.stats.rows_written + batcher.stats.rows_replayed == 5)
    assert await landed(store) == {r.request_id for r in good}
    assert len(list(batcher.spool.rejected_dir.iterdir())) == 1


async def test_starts_while_clickhouse_is_down_and_migrates_when_it_is_back(
    double: ClickHouseServer, tmp_path: Path, batchers: Callable[..., Awaitable[LogBatcher]]
) -> None:
    await asyncio.to_thread(double.stop, kill=True)
    settings = LogSettings(clickhouse_url=double.url, database=f"t_{uuid.uuid4().hex[:12]}")
    store = open_log_store(settings, tmp_path)
    try:
        batcher = await batchers(
            store, batch_rows=5, flush_seconds=0.01, prepare=lambda: migrate(store, ttl_days=0), **FAST
        )
        records = [record() for _ in range(12)]
        for r in records:
            batcher.submit(r.to_row())
        await wait_until(lambda: batcher.stats.rows_spooled == 12)
        assert not batcher.stats.store_up
    finally:
        await asyncio.to_thread(double.start)
    try:
        await wait_until(lambda: batcher.stats.rows_replayed == 12 and batcher.stats.store_up, timeout=10.0)
        assert await landed(store) == {r.request_id for r in records}
        await batcher.close()
    finally:
        await store.command(f"DROP DATABASE IF EXISTS {store.database}")
        await store.close()
