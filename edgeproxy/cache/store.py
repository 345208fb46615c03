"""The response store: buckets of up to n answers per key on an aiocache backend, failing open.

A bucket is n slots, `<digest>:0` … `<digest>:n-1`, read in one `multi_get` (one MGET on
Redis); each slot has its own TTL. Every entry names the key and tenant it was written for,
and a read that finds anything else (a bug, a key collision, a connection that returned
another caller's reply) discards it and counts it: defence in depth for tenant isolation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from aiocache import RedisCache
from aiocache.base import BaseCache
from redis.asyncio.connection import BlockingConnectionPool

from ..settings import CacheSettings
from .entry import CachedResponse, EntrySerializer
from .key import CacheKey
from .memory import BoundedMemoryCache
from .remote import BACKEND_ERRORS, Detached, FaultGate, RedisCounters, connection_kwargs

log = logging.getLogger("edgeproxy.cache")

T = TypeVar("T")


class CacheCounters(RedisCounters, Protocol):
    """The part of `Metrics` the cache reports to."""

    def cache_failed(self) -> None: ...

    def cache_tenant_mismatched(self) -> None: ...


@dataclass(slots=True)
class CacheStats:
    """Cumulative counts, for tests and the admin view."""

    reads: int = 0
    writes: int = 0
    failures: int = 0
    tenant_mismatches: int = 0


@dataclass(frozen=True, slots=True)
class Bucket:
    entries: tuple[CachedResponse, ...]
    free_slot: int | None  # the first empty slot; None when the bucket is full

    @property
    def full(self) -> bool:
        return self.free_slot is None and bool(self.entries)


class ResponseStore:
    """Reads and writes buckets; a failing backend reads as empty and writes nothing, never raises."""

    def __init__(
        self,
        cache: BaseCache,
        gate: FaultGate,
        counters: CacheCounters | None = None,
        calls: Detached | None = None,
    ) -> None:
        self.cache = cache
        self.gate = gate
        self.stats = CacheStats()
        self._counters = counters
        # Redis calls are detached (see remote.py); the memory backend never waits, so needs none.
        self._calls = calls

    async def _call(self, call: Awaitable[T]) -> T:
        return await (self._calls(call) if self._calls is not None else call)

    async def read(self, key: CacheKey, size: int) -> Bucket:
        self.stats.reads += 1
        slots = [key.slot(i) for i in range(size)]
        if not self.gate.open():
            return Bucket((), 0)
        try:
            found = await self._call(self.cache.multi_get(slots))
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            return Bucket((), 0)
        self.gate.succeeded()
        entries: list[CachedResponse] = []
        free: int | None = None
        for index, entry in enumerate(found):
            if entry is not None and (entry.key != key.digest or entry.tenant != key.tenant):
                await self._discard(slots[index], entry, key)
                entry = None
            if entry is None:
                free = index if free is None else free
            else:
                entries.append(entry)
        return Bucket(tuple(entries), free)

    async def write(self, key: CacheKey, slot: int, entry: CachedResponse, ttl: int) -> bool:
        if not self.gate.open():
            return False
        try:
            # A float TTL makes aiocache send PSETEX (its int path uses SETEX, deprecated in redis-py).
            await self._call(self.cache.set(key.slot(slot), entry, ttl=float(ttl)))
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            return False
        self.gate.succeeded()
        self.stats.writes += 1
        return True

    async def close(self) -> None:
        if self._calls is not None:
            await self._calls.drain()
        try:
            if isinstance(self.cache, RedisCache):
                await self.cache.client.aclose()  # aiocache's close() calls redis-py's deprecated close()
            else:
                await self.cache.close()
        except BACKEND_ERRORS as exc:
            log.warning("closing the cache backend failed: %s: %s", type(exc).__name__, exc)

    async def _discard(self, slot: str, entry: CachedResponse, key: CacheKey) -> None:
        self.stats.tenant_mismatches += 1
        if self._counters is not None:
            self._counters.cache_tenant_mismatched()
        # Never log the tenants themselves at warning level: they identify customers.
        log.warning("cache entry at %s was written for another key or tenant; discarded", slot)
        try:
            await self._call(self.cache.delete(slot))
        except BACKEND_ERRORS as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.stats.failures += 1
        if self._counters is not None:
            self._counters.cache_failed()
        self.gate.failed(exc)


def open_store(settings: CacheSettings, counters: CacheCounters | None = None) -> ResponseStore:
    """The configured backend: a byte-bounded LRU in this process, or Redis shared by a fleet."""
    namespace = settings.key_prefix + "cache:"
    gate = FaultGate("cache", counters=counters)
    if settings.url.startswith("memory://"):
        memory = BoundedMemoryCache(settings.max_bytes, serializer=EntrySerializer(), namespace=namespace)
        return ResponseStore(memory, gate, counters)
    kwargs = connection_kwargs(settings.url, settings.timeout_seconds)
    redis = RedisCache(
        serializer=EntrySerializer(),
        namespace=namespace.rstrip(":"),  # RedisCache adds the ':' itself
        timeout=None,  # aiocache's timeout cancels the call; Detached bounds the wait instead
        endpoint=kwargs.pop("host", "127.0.0.1"),
        port=kwargs.pop("port", 6379),
        db=kwargs.pop("db", 0),
        password=kwargs.pop("password", None),
        pool_max_size=settings.max_connections,
        create_connection_timeout=kwargs.pop("socket_connect_timeout"),
        connection_pool_class=BlockingConnectionPool,
        connection_pool_kwargs={**kwargs, "timeout": settings.timeout_seconds},
    )
    return ResponseStore(redis, gate, counters, Detached(settings.timeout_seconds))
