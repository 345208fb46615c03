"""LogBatcher: request records to the store in batches, off the request path, never lost silently.

`submit(row)` is synchronous and O(1): it appends the request's row (a plain tuple, see
record.py) to a bounded in-memory queue and returns. Rows, not LogRecords: a row is one object for
the cycle collector to count where a record is three (itself and its two dicts), and a second of
queued records was what pushed the young generation past its threshold under load (see
serve.GC_YOUNG_THRESHOLD).
One loop flushes a batch when `batch_rows` rows are waiting or `flush_seconds` after the batch's
first row, whichever comes first. A batch the store does not take goes to the on-disk spool at
once, so the queue never stalls behind a dead ClickHouse; while the store is down (or its
`prepare` step, the migrations, has not yet succeeded) batches go straight to the spool, and
`SpoolReplay` (replay.py) sends them to the store again. Delivery is at least once and counts
stay exact: each batch keeps the insert deduplication token it was first sent with, and the
table is a ReplacingMergeTree keyed on request_id. Until its parts merge, a row may exist
twice: count with `FINAL` or `uniqExact(request_id)`, never a bare `count()`.

Drop policy (every dropped row is counted in `stats.rows_dropped` and logged once per episode):
  - queue full: `submit` returns False when `queue_max_rows` rows are waiting (the store and the
    spool both fell behind), or once `close()` has finished;
  - spool full: a batch that would push the spool past `spool_max_bytes` (or that the disk
    refuses) is dropped whole.
A batch the store keeps refusing for its content is moved to `spool/rejected/` and counted in
`rows_rejected` (see replay.py); an operator can move it back to `spool/` to replay it.

Crash window: rows are safe once inserted or once their spool file is fsynced. A kill -9 loses
at most the rows still in memory: the queue plus the batch being written. A batch fills for at
most `flush_seconds`, and its insert gets `insert_patience` (`max(flush_seconds, 1 s)`): an
insert still running then (a hung or overloaded ClickHouse) keeps running, but the batch is
spooled meanwhile with the same token, and later batches go straight to the spool until that
insert settles. So the rows at risk are those of the last `flush_seconds` of traffic when
inserts are quick, and never older than `flush_seconds + insert_patience`.

`close()` drains the queue to the store, or to the spool when the store fails or `timeout` runs
out, then, with time left, replays the spool into the store. The spool a previous run left is
replayed after `start()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ..settings import LogSettings
from .record import Row
from .replay import SpoolReplay, StoreHealth
from .spool import Spool
from .store import LogStore

log = logging.getLogger("edgeproxy.logs")

T = TypeVar("T")

# An insert gets at least this long before its batch is spooled: a short flush interval must
# not spool every batch of an ordinary insert (tens of milliseconds for a few thousand rows).
MIN_INSERT_PATIENCE = 1.0


@dataclass(frozen=True, slots=True)
class LogStats:
    """A snapshot of the batcher's counters, for the metrics module."""

    queue_depth: int
    rows_written: int
    rows_spooled: int
    rows_replayed: int
    rows_dropped: int
    rows_dropped_queue_full: int
    rows_dropped_spool_full: int
    rows_rejected: int
    spool_bytes: int
    flush_seconds_last: float
    failures: int
    store_up: bool


class LogBatcher:
    """Batches log rows into a LogStore, spilling to a Spool when the store fails.

    Call `submit` from the event loop's thread only. Usage::

        store = open_log_store(s, data_dir)
        spool = Spool(data_dir / "spool", s.spool_max_bytes)
        batcher = LogBatcher(store, spool, s, prepare=lambda: migrate(store, ttl_days=s.ttl_days))
        await batcher.start()       # returns at once, even while ClickHouse is down
        batcher.submit(row)         # per request, in the pipeline's `finally`
        await batcher.close(timeout=5.0)
        await store.close()
    """

    def __init__(
        self,
        store: LogStore,
        spool: Spool,
        settings: LogSettings,
        *,
        prepare: Callable[[], Awaitable[object]] | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        reject_after: float = 60.0,
        insert_patience: float | None = None,
        on_flush: Callable[[float], None] | None = None,
    ) -> None:
        self._on_flush = on_flush
        self.store = store
        self.spool = spool
        # Spool files are written and read on their own thread, never behind a hung insert.
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="edgeproxy-logs-spool")
        self._health = StoreHealth(store, spool, prepared=prepare is None)
        # `prepare` (the migrations) is run, and retried, by the replay before any insert: the
        # gateway starts while ClickHouse is down, and batches spool until the table exists.
        self._replay = SpoolReplay(
            store,
            spool,
            self._health,
            self._disk_call,
            prepare=prepare,
            retry_initial=retry_initial,
            retry_max=retry_max,
            reject_after=reject_after,
        )
        self._batch_rows = max(1, settings.batch_rows)
        self._flush_seconds = settings.flush_seconds
        self._max_rows = settings.queue_max_rows
        self._patience = (
            max(settings.flush_seconds, MIN_INSERT_PATIENCE) if insert_patience is None else insert_patience
        )
        # An insert that outlived its patience and still runs; batches spool until it settles.
        self._slow: asyncio.Future[None] | None = None
        self._rows: deque[Row] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._accepting = True
        self._closing = False
        self._closed = False
        self._flush_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._inflight: tuple[str, list[Row]] | None = None
        self._warned_queue = False
        self._warned_spool = False
        self._written = 0
        self._spooled_rows = 0
        self._dropped_queue = 0
        self._dropped_spool = 0
        self._flush_last = 0.0

    @property
    def stats(self) -> LogStats:
        return LogStats(
            queue_depth=len(self._rows),
            rows_written=self._written,
            rows_spooled=self._spooled_rows,
            rows_replayed=self._replay.replayed,
            rows_dropped=self._dropped_queue + self._dropped_spool,
            rows_dropped_queue_full=self._dropped_queue,
            rows_dropped_spool_full=self._dropped_spool,
            rows_rejected=self._replay.rejected,
            spool_bytes=self.spool.used_bytes,
            flush_seconds_last=self._flush_last,
            failures=self._health.failures,
            store_up=self._health.up,
        )

    def submit(self, row: Row) -> bool:
        """Queue a row (`COLUMNS` order) for the log; False (counted, never raised) when the queue is full or closed."""
        rows = self._rows
        if len(rows) >= self._max_rows or not self._accepting:
            self._dropped_queue += 1
            if not self._warned_queue:
                self._warned_queue = True
                log.warning("request log queue is full (%d rows): dropping records", len(rows))
            return False
        rows.append(row)
        if len(rows) == 1:
            self._arrived.set()
        if len(rows) >= self._batch_rows:
            self._full.set()
        return True

    async def start(self) -> None:
        """Start flushing, and replay any spool a previous run left behind."""
        await self._disk_call(self.spool.recover)
        self._flush_task = asyncio.create_task(self._flush_loop(), name="edgeproxy-logs-flush")
        self._replay_task = asyncio.create_task(self._replay.run(), name="edgeproxy-logs-replay")

    async def close(self, timeout: float = 10.0) -> None:
        """Drain the queue into the store (or the spool) and stop; spools what is left at `timeout`."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        self._arrived.set()
        self._full.set()
        # Replays resume at the next start; stopping them frees the store for the drain.
        await _cancel(self._replay_task)
        if self._flush_task is not None:
            await asyncio.wait({self._flush_task}, timeout=max(0.0, deadline - loop.time()))
            if not self._flush_task.done():
                await _cancel(self._flush_task)
        self._accepting = False
        leftover: list[tuple[str, list[Row]]] = []
        if self._inflight is not None:
            # Maybe half sent: the spool copy keeps its token, so the server drops a duplicate.
            leftover.append(self._inflight)
            self._inflight = None
        while self._rows:
            leftover.append((uuid.uuid4().hex, self._take()))
        for token, rows in leftover:
            await self._to_spool(token, rows)
        await self._land_spool(deadline)
        await self._disk_call(self.spool.close)
        self._disk.shutdown(wait=False)

    async def _land_spool(self, deadline: float) -> None:
        """With time left, migrate if need be and replay the spool: a clean stop leaves nothing for the next start."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            try:
                # Cancelled at the deadline: the spooled batch stays and keeps its token for the next start.
                landed = await asyncio.wait_for(self._replay.step(), remaining)
            except Exception:  # noqa: BLE001 - the deadline or a failing disk: the files wait for the next start
                return
            if not landed:
                return  # the spool is empty (None) or the store did not take a batch (False)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._rows:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = loop.time() + self._flush_seconds
            while len(self._rows) < self._batch_rows and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), remaining)
                except TimeoutError:
                    break
            try:
                await self._write(self._take())
            except Exception:
                # A bug, not the store (its failures are handled below): keep flushing the rest.
                self._health.count_failure()
                log.exception("request log flush failed")

    def _take(self) -> list[Row]:
        rows = self._rows
        batch = [rows.popleft() for _ in range(min(self._batch_rows, len(rows)))]
        if len(rows) < self._max_rows // 2:
            self._warned_queue = False
        return batch

    async def _write(self, rows: list[Row]) -> None:
        started = time.perf_counter()
        token = uuid.uuid4().hex
        # Left set if this task is cancelled, so close() spools the batch rather than losing it.
        self._inflight = (token, rows)
        written = False
        if self._health.up and self._slow is None:
            written = await self._insert_patiently(token, rows)
        if written:
            self._written += len(rows)
        else:
            await self._to_spool(token, rows)
        self._inflight = None
        self._flush_last = time.perf_counter() - started
        if self._on_flush is not None:
            self._on_flush(self._flush_last)

    async def _insert_patiently(self, token: str, rows: list[Row]) -> bool:
        """True once the store took the batch; False when it failed or still runs after `insert_patience`.

        A slow insert is left running, not cancelled (its thread could not be stopped anyway): the
        caller spools the batch with the same token, so whichever copy lands second is dropped by
        the server's deduplication, and no row waits in memory behind a hung ClickHouse.
        """
        insert = asyncio.ensure_future(self.store.insert(rows, token))
        try:
            done, _ = await asyncio.wait({insert}, timeout=self._patience)
        except asyncio.CancelledError:
            insert.cancel()
            raise
        if not done:
            self._slow = insert
            insert.add_done_callback(self._slow_settled)
            log.warning(
                "request log insert into %s is taking over %.1f s: spooling batches until it settles",
                self.store.name,
                self._patience,
            )
            return False
        failure = insert.exception()
        if failure is None:
            return True
        self._health.failed(failure)
        return False

    def _slow_settled(self, insert: asyncio.Future[None]) -> None:
        # Its rows are counted once, as spooled and then replayed (the replay of the copy is the
        # one the server deduplicates when this insert landed).
        self._slow = None
        if insert.cancelled():
            return
        failure = insert.exception()
        if failure is not None:
            self._health.failed(failure)

    async def _to_spool(self, token: str, rows: list[Row]) -> None:
        try:
            kept = await self._disk_call(self.spool.write, token, rows)
        except Exception as exc:  # noqa: BLE001 - a failing disk drops the batch, counted below
            kept = False
            log.error("request log spool write failed: %s", exc)
        if kept:
            self._spooled_rows += len(rows)
            self._warned_spool = False
            self._replay.wake()
            return
        self._dropped_spool += len(rows)
        if not self._warned_spool:
            self._warned_spool = True
            log.warning(
                "request log spool is full (%d of %d bytes) or failing: dropping batches",
                self.spool.used_bytes,
                self.spool.max_bytes,
            )

    async def _disk_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
