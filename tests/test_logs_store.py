"""LogStore and migrations against both engines: embedded chDB and a ClickHouse HTTP server.

The server is the chDB-backed double in tests/clickhouse_server.py, or the real server named by
CLICKHOUSE_URL. Embedded stores share one folder per module (a process hosts one chDB folder at
a time) with a database per test; each test closes its store so other modules can open theirs.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import importlib
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from edgeproxy.logs.migrate import (
    KEPT_LOCAL,
    PROMPT_CLEANUP,
    VERTICAL_MERGES,
    WIDE_MERGES,
    cluster_ddl,
    migrate,
    migrate_sync,
)
from edgeproxy.logs.record import COLUMNS, LogRecord
from edgeproxy.logs.store import LogStore, open_log_store
from edgeproxy.settings import LogSettings, ServerSettings, Settings
from tests.conftest import wait_until

# The module, not the function `edgeproxy.logs` exports under the same name.
migrate_module = importlib.import_module("edgeproxy.logs.migrate")


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(params=["embedded", "server"])
async def store(request: pytest.FixtureRequest, embedded_dir: Path) -> AsyncIterator[LogStore]:
    url = request.getfixturevalue("clickhouse_url") if request.param == "server" else None
    settings = LogSettings(clickhouse_url=url, database=f"t_{uuid.uuid4().hex[:12]}")
    store = open_log_store(settings, embedded_dir)
    try:
        yield store
    finally:
        try:
            await store.command(f"DROP DATABASE IF EXISTS {store.database}")
        finally:
            await store.close()


def full_record(**overrides: object) -> LogRecord:
    record = LogRecord(
        request_id=str(uuid.uuid4()),
        started_at=1_767_225_600.123,  # 2026-01-01T00:00:00.123Z
        latency_ms=812.5,
        ttfb_ms=120.25,
        upstream_ms=790.0,
        gateway_ms=2.5,
        status=200,
        method="POST",
        path="/v1/chat/completions",
        target="openai",
        model="gpt-4o-mini",
        user_id="user-7",
        app_id="app-1",
        key_id="key-3",
        properties={"env": "prod", "ünï": "cödé 😀"},
        session_id="s-1",
        session_path="/a/b",
        session_name="Chat",
        params={"temperature": 0.2, "max_tokens": 64, "stream": True, "tools": ["search"]},
        request_body='{"messages":[{"role":"user","content":"héllo"}]}',
        request_truncated=False,
        response_body="x" * 100,
        response_truncated=True,
        prompt_tokens=12,
        completion_tokens=30,
        total_tokens=42,
        cost_usd=0.000123,
        cost_saved_usd=None,
        reserved_usd=0.01,
        cache="MISS",
        attempts=2,
        answered_by="openai-eu",
        error="",
        outcome="ok",
    )
    for name, value in overrides.items():
        setattr(record, name, value)
    return record


async def test_migrate_is_idempotent(store: LogStore) -> None:
    assert await migrate(store, ttl_days=0) == ["0001_requests"]
    assert await migrate(store, ttl_days=0) == []
    rows = await store.query(
        f"SELECT table_name, name FROM {store.database}.schema_migrations FINAL ORDER BY name"
    )
    assert rows == [{"table_name": "requests", "name": "0001_requests"}]
    columns = await store.query(
        "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String} ORDER BY position",
        {"d": store.database, "t": store.table},
    )
    assert [c["name"] for c in columns] == list(COLUMNS)


async def _engine_full(store: LogStore) -> str:
    rows = await store.query(
        "SELECT engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
        {"d": store.database, "t": store.table},
    )
    return str(rows[0]["engine_full"])


@pytest.mark.parametrize(
    ("label", "settings"),
    [
        # A horizontal merge of the wide table held ~200 MB at once inside the embedded gateway.
        ("vertical merges", VERTICAL_MERGES),
        # Merged-away parts held memory for up to 5 minutes under ClickHouse's cleanup backoff.
        ("prompt cleanup", PROMPT_CLEANUP),
        # Merges of ~5 parts at a time took twice the CPU per row, on the gateway's cores when embedded.
        ("wide merges", WIDE_MERGES),
    ],
    ids=["vertical-merges", "prompt-cleanup", "wide-merges"],
)
async def test_table_settings_new_or_upgraded(store: LogStore, label: str, settings: str) -> None:
    names = [setting.split(" = ")[0] for setting in settings.split(", ")]
    await migrate(store, ttl_days=0)
    for setting in settings.split(", "):
        assert setting in await _engine_full(store)
    # A table created before the settings existed is brought up to date, once.
    await store.command(f"ALTER TABLE {store.qualified} RESET SETTING {', '.join(names)}")
    engine_full = await _engine_full(store)
    assert not any(name in engine_full for name in names)
    assert await migrate(store) == [label]
    for setting in settings.split(", "):
        assert setting in await _engine_full(store)
    assert await migrate(store) == []


async def test_settings_the_server_lacks_are_left_out(store: LogStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server older than a setting (merge_selector_base came with ClickHouse 24.11) would refuse
    # the CREATE and every later start: the table is made without it instead.
    unknown = ("a setting from the future", "no_such_merge_tree_setting = 1")
    monkeypatch.setattr(migrate_module, "KEPT_LOCAL", (*KEPT_LOCAL, unknown))
    assert await migrate(store, ttl_days=0) == ["0001_requests"]
    engine_full = await _engine_full(store)
    assert "no_such_merge_tree_setting" not in engine_full
    assert all(setting in engine_full for _, settings in KEPT_LOCAL for setting in settings.split(", "))
    assert await migrate(store, ttl_days=0) == []


async def test_merged_away_parts_are_deleted_within_seconds(store: LogStore) -> None:
    await migrate(store)
    for _ in range(3):
        await store.insert([full_record(request_id=str(uuid.uuid4())).to_row()], uuid.uuid4().hex)
    # A server first keeps outdated parts for old_parts_lifetime (chDB: 0); this measures the cadence alone.
    await store.command(f"ALTER TABLE {store.qualified} MODIFY SETTING old_parts_lifetime = 0")
    await store.command(f"OPTIMIZE TABLE {store.qualified} FINAL")
    parts = (
        "SELECT countIf(active) AS live, countIf(NOT active) AS outdated FROM system.parts "
        "WHERE database = {d:String} AND table = {t:String}"
    )
    binds = {"d": store.database, "t": store.table}
    assert (await store.query(parts, binds))[0]["outdated"] >= 3
    deadline = time.monotonic() + 15  # the cleanup runs every 5 s; ClickHouse's default waits 30-40 s at first
    while (await store.query(parts, binds))[0]["outdated"] > 0:
        assert time.monotonic() < deadline, "outdated parts were not deleted within 15 s"
        await asyncio.sleep(0.25)
    assert (await store.query(parts, binds))[0]["live"] == 1


def test_migrate_command_on_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings(server=ServerSettings(data_dir=str(tmp_path)))
    assert migrate_sync(settings) == ["0001_requests"]
    assert migrate_sync(settings) == []
    assert (tmp_path / "clickhouse").is_dir()


async def test_record_round_trips_every_field(store: LogStore) -> None:
    await migrate(store)
    priced, unpriced = full_record(), full_record(cost_usd=None, request_body=None, ttfb_ms=None)
    await store.insert([priced.to_row(), unpriced.to_row()])
    rows = await store.query(
        f"SELECT * FROM {store.qualified} FINAL WHERE request_id = {{id:UUID}}", {"id": priced.request_id}
    )
    [row] = rows
    for name in COLUMNS:
        expected = getattr(priced, name)
        got = row[name]
        if name == "request_id":
            assert str(got) == expected
        elif name == "started_at":
            assert got == datetime.datetime(2026, 1, 1, 0, 0, 0, 123000)
        elif name == "params":
            assert got == '{"temperature":0.2,"max_tokens":64,"stream":true,"tools":["search"]}'
        elif isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-6), name
        else:
            assert got == expected, name
    [other] = await store.query(
        f"SELECT cost_usd, request_body, ttfb_ms, isNull(cost_usd) AS unknown FROM {store.qualified} "
        "WHERE request_id = {id:UUID}",
        {"id": unpriced.request_id},
    )
    # Unknown cost stays NULL: sums skip it instead of counting it as $0.
    assert other == {"cost_usd": None, "request_body": None, "ttfb_ms": None, "unknown": 1}


class Properties(dict[str, str]):
    """A Map value that a weak reference can watch (a plain dict cannot be weakly referenced)."""


async def test_inserted_rows_are_freed_without_the_cycle_collector(store: LogStore) -> None:
    await migrate(store)
    watched = Properties(team="a")
    alive = weakref.ref(watched)
    rows = [full_record(properties=watched).to_row()] + [full_record().to_row() for _ in range(99)]
    del watched
    gc.disable()
    try:
        await store.insert(rows)
        del rows
        # Freed by reference counting alone. A batch held in a reference cycle waits for the
        # collector's next pass, and under load such batches were what set the collector off.
        # The executor's work item holds the call's arguments until its thread moves on, a moment
        # after the await returns; with the collector off, only reference counting can free them.
        await wait_until(lambda: alive() is None, timeout=1.0, interval=0.001)
    finally:
        gc.enable()


async def test_a_batch_of_many_blocks_lands_whole(store: LogStore) -> None:
    await migrate(store)
    # clickhouse-connect sends an insert as Native blocks of ~2 MB, each compressed on its own:
    # 10 000 rows with 1 KB bodies make five blocks. A server that reads only the first frame of
    # the body (lz4's one-shot decoder) kept ~2000 of them and answered 200.
    rows = [full_record(response_body="y" * 1000).to_row() for _ in range(10_000)]
    await store.insert(rows)
    [counts] = await store.query(f"SELECT count() AS n, uniqExact(request_id) AS ids FROM {store.qualified}")
    assert counts == {"n": 10_000, "ids": 10_000}


async def test_query_binds_parameters(store: LogStore) -> None:
    await migrate(store)
    records = [full_record(app_id=f"app-{n % 3}", cost_usd=n * 0.5) for n in range(9)]
    await store.insert([r.to_row() for r in records])
    rows = await store.query(
        f"SELECT app_id, uniqExact(request_id) AS requests, sum(cost_usd) AS cost FROM {store.qualified} FINAL "
        "WHERE app_id != {skip:String} AND started_at >= {since:DateTime64(3)} GROUP BY app_id ORDER BY app_id",
        {"skip": "app-2", "since": "2025-12-31 00:00:00"},
    )
    assert rows == [
        {"app_id": "app-0", "requests": 3, "cost": pytest.approx(0.0 + 1.5 + 3.0)},
        {"app_id": "app-1", "requests": 3, "cost": pytest.approx(0.5 + 2.0 + 3.5)},
    ]


async def test_replays_never_double_count(store: LogStore) -> None:
    await migrate(store)
    rows = [full_record().to_row() for _ in range(5)]
    await store.insert(rows, token="batch-1")
    await store.insert(rows, token="batch-1")  # the same batch replayed: dropped by its token
    [plain] = await store.query(f"SELECT count() AS n FROM {store.qualified}")
    assert plain["n"] == 5
    await store.insert(rows, token="batch-2")  # replayed under another token: collapsed by request_id
    [counts] = await store.query(
        f"SELECT count() AS final, (SELECT uniqExact(request_id) FROM {store.qualified}) AS unique "
        f"FROM {store.qualified} FINAL"
    )
    assert counts == {"final": 5, "unique": 5}


async def test_a_block_is_not_collapsed_at_insert_but_counts_once(store: LogStore) -> None:
    await migrate(store)
    row = full_record().to_row()
    # The insert skips ReplacingMergeTree's collapse within the block (optimize_on_insert = 0):
    # a batch holds each request once, so that pass only cost CPU. A repeat, as a replay brings,
    # lands as stored and is counted once by FINAL and uniqExact, as across batches.
    await store.insert([row, row])
    [counts] = await store.query(
        f"SELECT count() AS stored, uniqExact(request_id) AS unique, "
        f"(SELECT count() FROM {store.qualified} FINAL) AS final FROM {store.qualified}"
    )
    assert counts == {"stored": 2, "unique": 1, "final": 1}


async def test_ttl_follows_settings(store: LogStore) -> None:
    await migrate(store, ttl_days=0)
    assert " TTL " not in await _engine_full(store)
    assert await migrate(store, ttl_days=30) == ["ttl=30d"]
    assert "TTL toDateTime(started_at) + toIntervalDay(30)" in await _engine_full(store)
    assert await migrate(store, ttl_days=30) == []
    assert await migrate(store) == []  # None leaves it as it is
    assert await migrate(store, ttl_days=0) == ["ttl=off"]
    assert " TTL " not in await _engine_full(store)


async def test_cluster_ddl_parses_and_names_replicated_engines(store: LogStore) -> None:
    sql = cluster_ddl(LogSettings(database="edge", table="reqs", ttl_days=90), "main")
    statements = [s.strip() for s in sql.split(";\n\n") if s.strip()]
    statements = ["\n".join(l for l in s.splitlines() if not l.startswith("--")) for s in statements]
    assert len(statements) == 4
    for statement in statements:
        assert "ON CLUSTER main" in statement
        # The server's own parser accepts each statement, without executing it.
        [parsed] = await store.query("SELECT formatQuery({sql:String}) AS sql", {"sql": statement})
        assert parsed["sql"].startswith("CREATE ")
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/edge/reqs_local', '{replica}')" in sql
    assert "ENGINE = Distributed(main, edge, reqs_local, cityHash64(request_id))" in sql
    assert "TTL toDateTime(started_at) + INTERVAL 90 DAY" in sql
    with pytest.raises(ValueError, match="cluster"):
        cluster_ddl(LogSettings(), "main; DROP TABLE x")


async def test_ping(store: LogStore) -> None:
    assert await store.ping()


async def test_dead_server_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = LogSettings(clickhouse_url=f"http://127.0.0.1:{port}", connect_timeout_seconds=1)
    store = open_log_store(settings, tmp_path)
    started = time.monotonic()
    try:
        assert not await store.ping()
        with pytest.raises(OperationalError):
            await store.insert([full_record().to_row()])
    finally:
        await store.close()
    assert time.monotonic() - started < 3.0


async def test_hung_server_times_out(tmp_path: Path) -> None:
    # Accepts connections, never answers: only the send/receive timeout ends the call.
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = LogSettings(clickhouse_url=f"http://127.0.0.1:{port}", timeout_seconds=1)
    store = open_log_store(settings, tmp_path)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError):
            await store.insert([full_record().to_row()])
    finally:
        await store.close()
        server.close()
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://host", "http"), ("http://", "http"), ("clickhouse.example:8123", "http")],
)
def test_open_log_store_refuses_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_log_store(LogSettings(clickhouse_url=url), tmp_path)


@pytest.mark.parametrize("field", ["database", "table"])
def test_open_log_store_refuses_non_identifiers(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        open_log_store(LogSettings(**{field: "x; DROP TABLE y"}), tmp_path)  # type: ignore[arg-type]


def test_open_log_store_picks_the_engine(tmp_path: Path) -> None:
    assert open_log_store(LogSettings(), tmp_path).name == f"chdb://{(tmp_path / 'clickhouse').resolve()}"
    server = open_log_store(LogSettings(clickhouse_url="https://u:p@ch.internal"), tmp_path)
    assert server.name == "https://ch.internal:8443"
    assert server.qualified == "edgeproxy.requests"


@pytest.mark.parametrize("embedded", [True, False])
def test_preload_imports_what_the_first_insert_would_import_while_serving(embedded: bool):
    # In a fresh interpreter: this one has long imported everything.
    script = (
        "import sys\n"
        "from edgeproxy.logs.store import preload_client_modules\n"
        f"preload_client_modules(embedded={embedded})\n"
        "print('pandas' in sys.modules, 'chdb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", str(embedded)]
