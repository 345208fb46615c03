"""SpoolReplay: spooled log batches back into the store, oldest first, and the store's health.

The batcher spools a batch the store did not take; this sends it again. It first runs the
store's `prepare` step (the migrations), retried with exponential backoff, since the gateway
starts while ClickHouse is down. Then it sends spooled batches oldest first, each with the
insert deduplication token it was first sent with, and deletes a file only after its insert
succeeded. A batch the store keeps refusing for its content (not for being unreachable) for
`reject_after` seconds and `MIN_REFUSALS` tries, while the store answers pings, moves to
`spool/rejected/`.

`StoreHealth` is what the batcher and the replay share: whether the store is prepared and up,
and the failure count. The first failure marks it down (batches then go straight to the spool),
the first success marks it up again; each change is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError

from .spool import Spool
from .store import LogStore

log = logging.getLogger("edgeproxy.logs")

DiskCall = Callable[..., Awaitable[Any]]

# A refused batch is tried at least this often before it may be rejected.
MIN_REFUSALS = 3


class StoreHealth:
    """Whether the store takes inserts: prepared (migrated) and not down; counts failures."""

    def __init__(self, store: LogStore, spool: Spool, *, prepared: bool) -> None:
        self._store = store
        self._spool = spool
        self.prepared = prepared
        self.down = False
        self.failures = 0

    @property
    def up(self) -> bool:
        return self.prepared and not self.down

    def count_failure(self) -> None:
        """Something in the log pipeline failed without saying the store is down (a bug, a disk, a refusal)."""
        self.failures += 1

    def failed(self, exc: BaseException) -> None:
        """The store failed an operation: count it and mark the store down."""
        self.count_failure()
        if not self.down:
            self.down = True
            log.warning(
                "request log store %s is failing (%s); spooling batches to %s until it takes one again",
                self._store.name,
                exc,
                self._spool.directory,
            )

    def succeeded(self) -> None:
        """The store took something: mark it up."""
        if self.down:
            self.down = False
            log.warning("request log store %s is back; writing directly again", self._store.name)


class SpoolReplay:
    """Replays the spool into the store; `run()` is the background loop, `step()` one pass of it."""

    def __init__(
        self,
        store: LogStore,
        spool: Spool,
        health: StoreHealth,
        disk_call: DiskCall,
        *,
        prepare: Callable[[], Awaitable[object]] | None,
        retry_initial: float,
        retry_max: float,
        reject_after: float,
    ) -> None:
        self._store = store
        self._spool = spool
        self._health = health
        self._disk_call = disk_call
        self._prepare = prepare
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._reject_after = reject_after
        self._spooled = asyncio.Event()
        # (spool file, first refusal, refusals) for the batch the store keeps refusing.
        self._refused: tuple[Path, float, int] | None = None
        self.replayed = 0
        self.rejected = 0

    def wake(self) -> None:
        """A batch was spooled: replay it when the store takes inserts again."""
        self._spooled.set()

    async def run(self) -> None:
        backoff = self._retry_initial
        while True:
            # Cleared before looking, so a batch spooled meanwhile still wakes the next wait.
            self._spooled.clear()
            try:
                landed = await self.step()
            except Exception:
                # A disk error or a bug: the files stay, so try again later rather than stop replaying.
                self._health.count_failure()
                log.exception("request log spool replay failed")
                landed = False
            if landed is None:
                await self._spooled.wait()
            elif landed:
                backoff = self._retry_initial
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max)

    async def step(self) -> bool | None:
        """One pass: True when the store took something, False to back off, None when idle."""
        if not self._health.prepared:
            return await self._prepare_store()
        segments = await self._disk_call(self._spool.segments)
        if segments:
            return await self._replay(segments)
        if self._health.down:
            # Nothing to replay (the spool dropped it): probe the store instead.
            if not await self._store.ping():
                return False
            self._health.succeeded()
            return True
        return None

    async def _prepare_store(self) -> bool:
        assert self._prepare is not None
        try:
            await self._prepare()
        except Exception as exc:  # noqa: BLE001 - retried with backoff; batches spool meanwhile
            self._health.failed(exc)
            return False
        self._health.prepared = True
        self._health.succeeded()
        return True

    async def _replay(self, segments: list[Path]) -> bool:
        """Send spooled batches oldest first; False at the first the store does not take, or if none was free."""
        handled = 0
        for path in segments:
            batch = await self._disk_call(self._spool.read, path)
            if batch is None:
                continue  # another worker's, or gone
            handled += 1
            try:
                if batch.rows:
                    await self._store.insert(batch.rows, batch.token)
            except asyncio.CancelledError:
                raise  # the file stays for the next run; spool.close() frees its lock
            except Exception as exc:  # noqa: BLE001 - the file stays until the store takes it
                if await self._should_reject(path, exc):
                    self._health.count_failure()
                    await self._disk_call(self._spool.reject, batch)
                    self.rejected += len(batch.rows)
                    log.error("request log: store keeps refusing %s (%s); moved to rejected/", path.name, exc)
                    continue
                await self._disk_call(self._spool.release, batch)
                self._health.failed(exc)
                return False
            self._refused = None
            await self._disk_call(self._spool.delete, batch)
            self.replayed += len(batch.rows)
            self._health.succeeded()
        return handled > 0

    async def _should_reject(self, path: Path, exc: Exception) -> bool:
        """True when the store answers yet refused this batch for `reject_after` seconds and a few tries."""
        if isinstance(exc, OperationalError):
            self._refused = None  # unreachable, not refusing
            return False
        now = time.monotonic()
        if self._refused is None or self._refused[0] != path:
            self._refused = (path, now, 0)
        first, count = self._refused[1], self._refused[2] + 1
        self._refused = (path, first, count)
        if count < MIN_REFUSALS or now - first < self._reject_after:
            return False
        if not await self._store.ping():
            return False
        self._refused = None
        return True
