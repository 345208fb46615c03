"""The cache stage: answer from the bucket when it is full, else forward and keep the answer."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable

from aiohttp import web

from ..exchange import Exchange
from ..options import CachePolicy
from ..pipeline import Handler
from ..pricing import PriceTable
from ..settings import CacheSettings
from ..streaming import send, send_eof, send_whole
from .entry import CachedResponse
from .key import CacheKey, cache_key
from .store import ResponseStore

HEADER = "Helicone-Cache"
_DEFAULT_TYPE = "application/json"


class CacheStage:
    """Helicone's cache semantics, driven by `ex.options.cache` (parsed from headers at intake).

    A bucket of size n fills with n different upstream answers; once full, each request gets
    one of them at random. Only complete 2xx answers the client fully received are stored.
    """

    def __init__(
        self, settings: CacheSettings, store: ResponseStore, prices: PriceTable, *, stall_seconds: float
    ) -> None:
        self._settings = settings
        # A replay, like a relay, drops a client that accepts nothing for this long (timeouts.idle).
        self._stall_seconds = stall_seconds
        self._store = store
        self._prices = prices

    @property
    def store(self) -> ResponseStore:
        return self._store

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        policy = ex.options.cache
        if policy is None:
            return call_next(ex)
        return self._cached(ex, policy, call_next)

    async def _cached(self, ex: Exchange, policy: CachePolicy, call_next: Handler) -> web.StreamResponse:
        key = cache_key(ex, policy, shared=self._settings.shared_namespace)
        bucket = await self._store.read(key, policy.bucket_max_size)
        if bucket.full:
            return await self._replay(ex, random.choice(bucket.entries))
        ex.cache_status = "MISS"
        # The forwarder sends the headers, so they must be in place before it runs.
        ex.response_headers[HEADER] = "MISS"
        response = await call_next(ex)
        asked = self._settings.default_ttl_seconds if policy.ttl_seconds is None else policy.ttl_seconds
        ttl = min(asked, self._settings.max_ttl_seconds)
        if bucket.free_slot is not None and ttl > 0 and _storable(ex):
            # The response is already sent, so this wait costs the client nothing and the next
            # identical request finds the entry. The store bounds it, and a client leaving now
            # does not abort the write (Redis calls are detached, memory writes never wait).
            await self._store.write(key, bucket.free_slot, _entry(ex, key, response), ttl)
        return response

    async def _replay(self, ex: Exchange, entry: CachedResponse) -> web.StreamResponse:
        ex.cache_status = "HIT"
        ex.status = entry.status
        ex.streamed = entry.streamed
        ex.usage = entry.usage()
        if entry.prompt_tokens is not None:
            ex.cost_saved_usd = self._prices.cost_usd(
                entry.model or ex.model, entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens
            )
        for chunk in entry.chunks:
            ex.capture.add(chunk)
        headers = {**ex.response_headers, "Content-Type": entry.content_type, HEADER: "HIT"}
        if not entry.streamed:
            whole = web.Response(status=entry.status, body=entry.body, headers=headers)
            return await send_whole(ex, whole, self._stall_seconds)
        response = web.StreamResponse(status=entry.status, headers=headers)
        await response.prepare(ex.request)
        ex.client_first_byte = time.perf_counter()
        try:
            for chunk in entry.chunks:
                await send(ex, response, chunk, self._stall_seconds)
            await send_eof(ex, response, self._stall_seconds)
        except ConnectionError:
            ex.outcome = "cancelled"
        return response

    async def close(self) -> None:
        await self._store.close()


def _storable(ex: Exchange) -> bool:
    """A complete 2xx the client received in full (not truncated, not broken off, not cancelled)."""
    return (
        200 <= ex.status < 300
        and ex.outcome == "ok"
        and not ex.capture.truncated
        and bool(ex.capture.chunks)
    )


def _entry(ex: Exchange, key: CacheKey, response: web.StreamResponse) -> CachedResponse:
    usage = ex.usage
    return CachedResponse(
        key=key.digest,
        tenant=key.tenant,
        status=ex.status,
        content_type=response.headers.get("Content-Type", _DEFAULT_TYPE),
        streamed=ex.streamed,
        chunks=tuple(ex.capture.chunks),
        model=ex.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_tokens=usage.cached_tokens,
        stored_at=time.time(),
    )
