"""LogStore: the request table behind clickhouse-connect's sync client, off the event loop.

One class serves both engines: a ClickHouse server over `http(s)://` and embedded chDB
(`chdb:///<data_dir>/clickhouse`), since clickhouse-connect drives both with the same API and
the same SQL. Its async client refuses chDB, so every call runs on a dedicated single-thread
executor: one for writes (inserts, DDL, ping), one for reads, so a slow admin query never delays
a flush. chDB releases the GIL while it works; the event loop keeps its schedule.

Embedded chDB: only one process may open the folder, and one process opens one folder at a time;
a multi-worker gateway must give the embedded log to one process (or use a server).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver import options as client_options
from clickhouse_connect.driver.client import Client

from ..settings import LogSettings
from .engine_threads import EngineThreads
from .record import COLUMNS

T = TypeVar("T")

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# ReplacingMergeTree otherwise runs its merge over each inserted block, to collapse the rows of the
# block that share a sorting key. The key ends in request_id and a batch holds each request once,
# so that pass only copied the rows: it was 13-18% of the store's CPU per row (bench.log_insert,
# 4000-row batches, both engines). A replayed row still collapses when parts merge, as it did.
INSERT_SETTINGS: dict[str, Any] = {"optimize_on_insert": 0}


class LogStore:
    """The request table in one ClickHouse (server or embedded); every method is safe to await on the loop."""

    def __init__(
        self,
        connect: Callable[[], Client],
        *,
        database: str,
        table: str,
        name: str,
        engine_threads: EngineThreads | None = None,
    ) -> None:
        for what, value in (("database", database), ("table", table)):
            if not IDENTIFIER.match(value):
                raise ValueError(f"logs.{what} must be a plain identifier, got {value!r}")
        self.database = database
        self.table = table
        # For messages: the URL without credentials, or the chdb folder.
        self.name = name
        self._connect = connect
        # Embedded only: the engine's threads in this process, lowered after every write.
        self._engine_threads = engine_threads
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edgeproxy-logs-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="edgeproxy-logs-read")
        # Each client is created and used on its own executor's thread only.
        self._write_client: Client | None = None
        self._read_client: Client | None = None
        self._column_types: Sequence[Any] | None = None

    @property
    def qualified(self) -> str:
        """`database.table`, for SQL."""
        return f"{self.database}.{self.table}"

    async def insert(self, rows: Sequence[Sequence[Any]], token: str | None = None) -> None:
        """Insert rows in `COLUMNS` order; a repeated `token` lets the server drop a replayed block."""
        await self._on(self._writer, self._insert, rows, token)

    async def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing useful (DDL, small inserts), on the write thread."""
        await self._on(self._writer, self._command, sql, parameters)

    async def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts. Bind values as `{name:Type}`; DateTime64 values come back as naive UTC datetimes."""
        return await self._on(self._reader, self._query, sql, parameters)

    async def ping(self) -> bool:
        """True when the store answers; never raises."""
        try:
            return await self._on(self._writer, self._ping)
        except Exception:  # noqa: BLE001 - "not answering" is the answer
            return False

    async def close(self) -> None:
        """Close both clients and their threads; waits for calls in flight (bounded by the timeouts)."""
        for executor, role in ((self._writer, "write"), (self._reader, "read")):
            try:
                await self._on(executor, self._close_client, role)
            except RuntimeError:
                pass  # already closed
            executor.shutdown(wait=False)

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # The methods below run on the executors' threads.

    def _writer_client(self) -> Client:
        if self._write_client is None:
            self._write_client = self._connect()
        return self._write_client

    def _insert(self, rows: Sequence[Sequence[Any]], token: str | None) -> None:
        client = self._writer_client()
        if self._column_types is None:
            # Ask the server for the column types once, not on every insert.
            context = client.create_insert_context(self.qualified, column_names=list(COLUMNS))
            self._column_types = context.column_types
        settings = dict(INSERT_SETTINGS)
        if token:
            settings["insert_deduplication_token"] = token
        # clickhouse-connect's insert context refers to itself (it keeps a bound method of its own),
        # so whatever it holds waits for the cycle collector: with the caller's list, a whole batch
        # of rows, every second under load. It gets a copy, emptied once the insert is done.
        batch = list(rows)
        try:
            client.insert(
                self.qualified,
                batch,
                column_names=list(COLUMNS),
                column_types=self._column_types,
                settings=settings,
            )
        finally:
            batch.clear()
            if self._engine_threads is not None:
                self._engine_threads.lower()

    def _command(self, sql: str, parameters: Mapping[str, Any] | None) -> None:
        self._writer_client().command(sql, parameters=dict(parameters) if parameters else None)

    def _query(self, sql: str, parameters: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        if self._read_client is None:
            self._read_client = self._connect()
        result = self._read_client.query(sql, parameters=dict(parameters) if parameters else None)
        return list(result.named_results())

    def _ping(self) -> bool:
        return bool(self._writer_client().ping())

    def _close_client(self, role: str) -> None:
        client = self._write_client if role == "write" else self._read_client
        if client is not None:
            client.close()
        if role == "write":
            self._write_client = None
        else:
            self._read_client = None


def preload_client_modules(*, embedded: bool) -> None:
    """Import now what clickhouse-connect would import on the first insert or connect.

    Its insert path resolves pandas lazily (to recognise a DataFrame), and the chDB backend
    imports chdb on connect: about half a second of CPU under the GIL, which would stall every
    request in flight if it happened while serving. Call once at startup, before traffic.
    """
    _ = client_options.pd  # the module's lazy attribute: resolving it imports pandas, when installed
    if embedded:
        import chdb  # noqa: F401 - imported for its side effect only


def embedded_folder(data_dir: Path) -> Path:
    """Where the embedded chDB store keeps its data: `<data_dir>/clickhouse`."""
    return (data_dir / "clickhouse").resolve()


def open_log_store(settings: LogSettings, data_dir: Path) -> LogStore:
    """A LogStore for `settings.clickhouse_url`, or embedded chDB under `data_dir/clickhouse` when unset.

    Nothing connects here: the first call does, so the gateway starts while ClickHouse is down.
    """
    url = settings.clickhouse_url
    if not url:
        folder = embedded_folder(data_dir)

        def connect_embedded() -> Client:
            folder.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{folder}")

        return LogStore(
            connect_embedded,
            database=settings.database,
            table=settings.table,
            name=f"chdb://{folder}",
            engine_threads=EngineThreads(settings.engine_nice),
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"logs.clickhouse_url must be http(s)://host[:port], got {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (8443 if secure else 8123)
    options: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "username": unquote(parts.username) if parts.username else settings.user,
        "password": unquote(parts.password) if parts.password else settings.password,
        "secure": secure,
        # The sync client keeps whole seconds only (it truncates): round up, never to 0 (= none).
        "connect_timeout": max(1, math.ceil(settings.connect_timeout_seconds)),
        "send_receive_timeout": max(1, math.ceil(settings.timeout_seconds)),
        # A server session serialises its queries and expires; the log needs neither.
        "autogenerate_session_id": False,
        "query_retries": 1,
    }

    def connect_server() -> Client:
        return clickhouse_connect.get_client(**options)

    name = f"{parts.scheme}://{parts.hostname}:{port}"
    return LogStore(connect_server, database=settings.database, table=settings.table, name=name)
