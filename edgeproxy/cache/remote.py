"""Shared-infrastructure plumbing for the cache and the rate limiter: Redis pools and fault handling.

Cancellation (the March 2023 ChatGPT leak, redis-py #2624, CVE-2023-28858/28859). redis-py 8
disconnects a connection when any BaseException, CancelledError included, interrupts
`send_packed_command` or `read_response`, and the pool re-checks a connection for unread
bytes before handing it out, so a cancelled read no longer leaks its reply. Cancelling pooled
calls still breaks the pool in two other ways, both seen in `tests/test_tenant_isolation.py`
on Python 3.11: a waiter of `BlockingConnectionPool` cancelled just after being notified
swallows the wake-up (asyncio.Condition, fixed only in 3.13), so others wait out the pool
timeout beside a free connection; and a cancel landing in `pool.release()` can stop the
connection from ever returning. So no pooled call is ever cancelled here: `Detached` runs
each in a task of its own and bounds only the caller's wait; the call itself ends by its
reply or by redis-py's socket timeout, which closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("edgeproxy.remote")

T = TypeVar("T")
# What a shared backend raises when it is down, slow or confused; callers fail open (or closed) on it.
BACKEND_ERRORS = (RedisError, OSError, TimeoutError)


class RedisCounters(Protocol):
    """The part of `Metrics` that counts shared-backend failures."""

    def redis_failed(self, component: str) -> None: ...


def connection_kwargs(url: str, timeout: float) -> dict[str, Any]:
    """Connection settings for `url` with every wait (connect, read, pool) bounded by `timeout`."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    # A connection pooled before Redis restarted fails on its first use ("closed by server"):
    # retried once on a new connection, it is not mistaken for Redis being down (which would
    # bypass the cache and rate limits for a cooldown, again for each stale connection met).
    kwargs.update(retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return kwargs


def open_redis(url: str, timeout: float, max_connections: int) -> aioredis.Redis:
    """A client on a bounded pool (a call waits up to `timeout` for a free connection, then fails)."""
    pool = BlockingConnectionPool(
        max_connections=max_connections, timeout=timeout, **connection_kwargs(url, timeout)
    )
    return aioredis.Redis(connection_pool=pool)


class Detached:
    """Runs each Redis call in its own task, which no caller can cancel; callers wait up to `timeout`.

    >>> calls = Detached(0.25)
    >>> value = await calls(client.get(key))  # TimeoutError after 0.25 s; the GET still completes
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        # asyncio keeps only weak references to tasks: these keep abandoned calls alive to the end.
        self._running: set[asyncio.Future[Any]] = set()

    async def __call__(self, call: Awaitable[T]) -> T:
        task = asyncio.ensure_future(call)
        self._running.add(task)
        task.add_done_callback(self._finished)
        async with asyncio.timeout(self._timeout):
            return await asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # a caller that gave up does not want it; don't log it as unretrieved

    async def drain(self) -> None:
        """Wait for abandoned calls before the client is closed under them.

        Each ends within about four timeouts: pool wait, connect, write and read are each bounded.
        """
        if self._running:
            await asyncio.wait(set(self._running), timeout=4 * self._timeout)


class FaultGate:
    """One shared backend's health: failures are counted, warned about sparingly, then skipped a while.

    After a failure the backend is bypassed for `cooldown` seconds, so a slow or dead Redis
    costs one timeout per cooldown rather than one per request. The warning names how many
    failures happened since the last one, at most once per `warn_every` seconds.

    >>> gate = FaultGate("cache")
    >>> if gate.open(): ...  # call Redis; then gate.succeeded() or gate.failed(exc)
    """

    def __init__(
        self,
        component: str,
        *,
        cooldown: float = 1.0,
        warn_every: float = 30.0,
        counters: RedisCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.failures = 0
        self.skipped = 0
        self._cooldown = cooldown
        self._warn_every = warn_every
        self._counters = counters
        self._clock = clock
        self._closed_until = 0.0
        self._warned_at: float | None = None
        self._unreported = 0

    def open(self) -> bool:
        """Whether the backend may be called now (False while cooling down after a failure)."""
        if self._clock() >= self._closed_until:
            return True
        self.skipped += 1
        return False

    def succeeded(self) -> None:
        if self._closed_until:
            self._closed_until = 0.0
            log.warning("%s: Redis answers again", self.component)

    def failed(self, exc: BaseException) -> None:
        now = self._clock()
        self.failures += 1
        self._unreported += 1
        self._closed_until = now + self._cooldown
        if self._counters is not None:
            self._counters.redis_failed(self.component)
        if self._warned_at is None or now - self._warned_at >= self._warn_every:
            log.warning(
                "%s: Redis failed %d time(s) since the last warning (latest: %s: %s); bypassing it for %.1fs",
                self.component,
                self._unreported,
                type(exc).__name__,
                exc,
                self._cooldown,
            )
            self._warned_at = now
            self._unreported = 0


class RedisUnavailable(Exception):
    """A guarded Redis call did not answer in time, failed, or its backend is cooling down."""


class GuardedRedis:
    """Detached calls behind a FaultGate: the one way the cache, limits, budgets and revocations call Redis.

    >>> guarded = GuardedRedis("budget", timeout=0.25)
    >>> value = await guarded(lambda: client.get(key))  # RedisUnavailable instead of a hang
    """

    def __init__(self, component: str, timeout: float, counters: RedisCounters | None = None) -> None:
        self.calls = Detached(timeout)
        self.gate = FaultGate(component, counters=counters)

    async def __call__(self, call: Callable[[], Awaitable[T]]) -> T:
        # A factory, not an awaitable: while cooling down, no coroutine is created only to be dropped.
        if not self.gate.open():
            raise RedisUnavailable("Redis is cooling down after a failure")
        try:
            result = await self.calls(call())
        except BACKEND_ERRORS as exc:
            self.gate.failed(exc)
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self.gate.succeeded()
        return result
