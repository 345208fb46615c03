"""Revoked gateway keys: a file under data_dir for one machine, Redis for a fleet.

Every process that verifies keys consults the same list; `edgeproxy keys revoke` adds to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from redis import asyncio as aioredis

from .cache.remote import GuardedRedis, RedisCounters, RedisUnavailable, open_redis
from .settings import Settings, SettingsError

log = logging.getLogger("edgeproxy.auth")

Clock = Callable[[], float]


class RevocationList(Protocol):
    """Revoked key ids, shared by every process that verifies keys."""

    async def is_revoked(self, key_id: str) -> bool: ...

    async def revoke(self, key_id: str) -> None: ...

    async def close(self) -> None: ...


class FileRevocations:
    """Key ids, one a line, in a file under data_dir; re-read only when its mtime or size changes.

    Staleness is bounded by `recheck_seconds`: one stat() per interval, not per request.
    """

    def __init__(self, path: Path, recheck_seconds: float = 0.5, clock: Clock = time.monotonic) -> None:
        self.path = path
        self._recheck = recheck_seconds
        self._clock = clock
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._ids: frozenset[str] = frozenset()

    async def is_revoked(self, key_id: str) -> bool:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._recheck
            self._refresh()
        return key_id in self._ids

    def _refresh(self) -> None:
        # Small file, read only when it changed: cheaper inline than a thread hop per check.
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self._stamp:
                lines = self.path.read_text().splitlines()
                self._ids = frozenset(
                    line.strip() for line in lines if line.strip() and not line.startswith("#")
                )
                self._stamp = stamp
        except FileNotFoundError:
            self._ids, self._stamp = frozenset(), None
        except OSError as exc:
            log.warning(
                "cannot read revocation list %s (%s); keeping the last one read", self.path, exc.strerror
            )

    async def revoke(self, key_id: str) -> None:
        await asyncio.to_thread(self._append, key_id)

    def _append(self, key_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One short O_APPEND write per revocation: concurrent writers do not interleave lines.
        with open(self.path, "a") as file:
            file.write(key_id + "\n")

    async def close(self) -> None:
        return None


class RedisRevocations:
    """One Redis key per revoked id; lookups bounded by a timeout and cached briefly.

    A revoked id stays cached for good (revocation is final); a clean one for `cache_seconds`.
    When Redis cannot answer in time the key is admitted: a Redis outage must not stop the
    gateway, and ids already seen revoked stay refused. Calls go through the project's
    `GuardedRedis` (see cache/remote.py for why no pooled call is cancelled).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        timeout: float,
        counters: RedisCounters | None = None,
        cache_seconds: float = 2.0,
        max_cached: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = prefix + "revoked:"
        self._guarded = GuardedRedis("revocation", timeout, counters)
        self._cache_seconds = cache_seconds
        self._max_cached = max_cached
        self._clock = clock
        self._cache: dict[str, tuple[bool, float]] = {}

    async def is_revoked(self, key_id: str) -> bool:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and (cached[0] or cached[1] > now):
            return cached[0]
        try:
            revoked = bool(await self._guarded(lambda: self._client.exists(self._prefix + key_id)))
        except RedisUnavailable:
            return cached is not None and cached[0]
        if len(self._cache) >= self._max_cached:
            del self._cache[next(iter(self._cache))]
        self._cache[key_id] = (revoked, now + self._cache_seconds)
        return revoked

    async def revoke(self, key_id: str) -> None:
        await self._guarded.calls(self._client.set(self._prefix + key_id, str(int(time.time()))))

    async def close(self) -> None:
        await self._guarded.calls.drain()
        await self._client.aclose(close_connection_pool=True)


def open_revocations(settings: Settings, counters: RedisCounters | None = None) -> RevocationList:
    """The revocation list `auth.revocation` names: `file` (under data_dir) or a `redis://` URL.

    Redis lookups use the rate limiter's timeout, pool size and key prefix.
    """
    where, limits = settings.auth.revocation, settings.ratelimit
    if where == "file":
        return FileRevocations(settings.data_dir / "revoked_keys")
    if where.startswith(("redis://", "rediss://")):
        client = open_redis(where, limits.timeout_seconds, limits.max_connections)
        return RedisRevocations(
            client, prefix=limits.key_prefix, timeout=limits.timeout_seconds, counters=counters
        )
    raise SettingsError(f"auth.revocation must be 'file' or a redis:// URL, got {where!r}")
