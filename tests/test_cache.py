"""Response cache: each header's effect through the gateway, on the memory and the Redis backend."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from edgeproxy.app import CACHE
from edgeproxy.cache.entry import CachedResponse, EntrySerializer
from edgeproxy.cache.key import CacheKey
from edgeproxy.cache.memory import ENTRY_OVERHEAD, BoundedMemoryCache
from edgeproxy.cache.store import open_store
from edgeproxy.settings import CacheSettings

from .conftest import GatewayFactory, wait_until
from .redis_server import SHARED_URL, RedisServer, scrub, unique_prefix

ON = {"Helicone-Cache-Enabled": "true"}


def chat(text: str | None = None, **extra: object) -> dict:
    content = text or f"question {uuid.uuid4().hex}"
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **extra}


async def ask(
    session: aiohttp.ClientSession, url: str, body: dict | bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    merged = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url + "/v1/chat/completions", data=data, headers=merged) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The `[cache]` table for one backend; Redis keys live under a prefix removed afterwards."""
    if request.param == "memory":
        yield '[cache]\nurl = "memory://"\n'
        return
    prefix = unique_prefix("cache")
    yield f'[cache]\nurl = "{SHARED_URL}"\nkey_prefix = "{prefix}"\n'
    await scrub(prefix)


async def test_miss_then_hit_and_no_header_without_opt_in(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    body = chat()
    status, headers, first = await ask(session, gateway.url, body, ON)
    assert (status, headers["Helicone-Cache"]) == (200, "MISS")
    status, headers, second = await ask(session, gateway.url, body, ON)
    assert (status, headers["Helicone-Cache"]) == (200, "HIT")
    assert second == first  # same id and created: replayed, not asked again
    assert headers["Content-Type"].startswith("application/json")
    assert len(mock.requests) == 1
    _, headers, _ = await ask(session, gateway.url, body)
    assert "Helicone-Cache" not in headers and len(mock.requests) == 2


async def test_ttl_from_max_age_expires(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    body, short = chat(), {**ON, "Cache-Control": "max-age=1"}
    assert (await ask(session, gateway.url, body, short))[1]["Helicone-Cache"] == "MISS"
    assert (await ask(session, gateway.url, body, short))[1]["Helicone-Cache"] == "HIT"

    async def expired() -> bool:
        return (await ask(session, gateway.url, body, short))[1]["Helicone-Cache"] == "MISS"

    await wait_until(expired, timeout=4, interval=0.2)


async def test_max_ttl_caps_a_longer_max_age(mock, start_gateway: GatewayFactory, session):
    gateway = await start_gateway('[cache]\nmax_ttl_seconds = 1\n')
    body, long = chat(), {**ON, "Cache-Control": "max-age=3600"}
    assert (await ask(session, gateway.url, body, long))[1]["Helicone-Cache"] == "MISS"
    assert (await ask(session, gateway.url, body, long))[1]["Helicone-Cache"] == "HIT"

    async def expired() -> bool:
        return (await ask(session, gateway.url, body, long))[1]["Helicone-Cache"] == "MISS"

    await wait_until(expired, timeout=4, interval=0.2)


async def test_bucket_fills_with_n_answers_then_serves_them_at_random(
    mock, start_gateway: GatewayFactory, backend, session
):
    gateway = await start_gateway(backend)
    body, bucket = chat(), {**ON, "Helicone-Cache-Bucket-Max-Size": "3"}
    filled = []
    for _ in range(3):
        _, headers, raw = await ask(session, gateway.url, body, bucket)
        assert headers["Helicone-Cache"] == "MISS"
        filled.append(orjson.loads(raw)["id"])
    assert len(set(filled)) == 3  # the mock numbers each answer
    served = set()
    for _ in range(40):
        _, headers, raw = await ask(session, gateway.url, body, bucket)
        assert headers["Helicone-Cache"] == "HIT"
        served.add(orjson.loads(raw)["id"])
    # Each of 3 answers is missed by 40 random draws with probability (2/3)**40, about 1e-7.
    assert served == set(filled)
    assert len(mock.requests) == 3


async def test_seed_separates_and_key_is_canonical(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    body = chat(temperature=0.5)
    seeded = {**ON, "Helicone-Cache-Seed": "a"}
    assert (await ask(session, gateway.url, body, seeded))[1]["Helicone-Cache"] == "MISS"
    assert (await ask(session, gateway.url, body, seeded))[1]["Helicone-Cache"] == "HIT"
    assert (await ask(session, gateway.url, body, {**ON, "Helicone-Cache-Seed": "b"}))[1]["Helicone-Cache"] == "MISS"
    assert (await ask(session, gateway.url, body, ON))[1]["Helicone-Cache"] == "MISS"
    # Same JSON, keys reordered and spaced out: the same question.
    reordered = b'{ "temperature" : 0.5,\n  "messages": %s ,"model":"mock-model" }' % orjson.dumps(body["messages"])
    status, headers, _ = await ask(session, gateway.url, reordered, seeded)
    assert (status, headers["Helicone-Cache"]) == (200, "HIT")
    # A different value is a different question.
    assert (await ask(session, gateway.url, {**body, "temperature": 0.6}, seeded))[1]["Helicone-Cache"] == "MISS"


async def test_streamed_answer_replays_as_the_same_stream(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    body = chat(stream=True)
    slow = {**ON, "X-Mock-Chunks": "8", "X-Mock-Chunk-Gap-Ms": "2"}
    status, headers, original = await ask(session, gateway.url, body, slow)
    assert (status, headers["Helicone-Cache"]) == (200, "MISS")
    assert headers["Content-Type"].startswith("text/event-stream")
    status, headers, replayed = await ask(session, gateway.url, body, slow)
    assert (status, headers["Helicone-Cache"]) == (200, "HIT")
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers.get("Transfer-Encoding") == "chunked"  # streamed, not one buffered body
    assert replayed == original and original.endswith(b"data: [DONE]\n\n")
    assert body["messages"][0]["content"].encode() in replayed
    # The same question without `stream` is another request, answered as JSON.
    _, headers, plain = await ask(session, gateway.url, chat(body["messages"][0]["content"]), ON)
    assert headers["Helicone-Cache"] == "MISS" and orjson.loads(plain)["object"] == "chat.completion"
    assert len(mock.requests) == 2


async def test_explicit_stream_false_is_cached(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    body = chat(stream=False)
    assert (await ask(session, gateway.url, body, ON))[1]["Helicone-Cache"] == "MISS"
    assert (await ask(session, gateway.url, body, ON))[1]["Helicone-Cache"] == "HIT"


@pytest.mark.parametrize("status", ["400", "500", "429"])
async def test_errors_are_not_cached(mock, start_gateway: GatewayFactory, backend, session, status):
    gateway = await start_gateway(backend)
    body, failing = chat(), {**ON, "X-Mock-Status": status}
    for _ in range(2):
        got, headers, _ = await ask(session, gateway.url, body, failing)
        assert (got, headers["Helicone-Cache"]) == (int(status), "MISS")
    assert len(mock.requests) == 2


async def test_tenants_never_share_entries(mock, start_gateway: GatewayFactory, backend, session):
    from edgeproxy.auth import KeyGrant, KeyIssuer
    from edgeproxy.settings import AuthSettings

    secret = "s" * 40
    gateway = await start_gateway(backend + f'[auth]\njwt_secret = "{secret}"\n')
    issuer = KeyIssuer(AuthSettings(jwt_secret=secret))
    keys = [issuer.issue(KeyGrant(app=app))[0] for app in ("app-a", "app-b", "app-a")]
    body = chat()
    seen = []
    for key in keys:
        _, headers, raw = await ask(session, gateway.url, body, {**ON, "Helicone-Auth": f"Bearer {key}"})
        seen.append((headers["Helicone-Cache"], orjson.loads(raw)["id"]))
    # Another app, and another key of the same app, are other tenants: both miss.
    assert [status for status, _ in seen] == ["MISS", "MISS", "MISS"]
    _, headers, raw = await ask(session, gateway.url, body, {**ON, "Helicone-Auth": f"Bearer {keys[1]}"})
    assert headers["Helicone-Cache"] == "HIT" and orjson.loads(raw)["id"] == seen[1][1]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_entry_of_another_tenant_is_discarded_and_counted(kind):
    prefix = unique_prefix("forged")
    url = "memory://" if kind == "memory" else SHARED_URL
    store = open_store(CacheSettings(url=url, key_prefix=prefix))
    try:
        mine = CacheKey("ab" * 20, "app-a/key-1")
        forged = CachedResponse(mine.digest, "app-b/key-2", 200, "application/json", False, (b"{}",), "m")
        assert await store.write(mine, 0, forged, ttl=60)
        bucket = await store.read(mine, 1)
        assert bucket.entries == () and bucket.free_slot == 0 and not bucket.full
        assert store.stats.tenant_mismatches == 1
        assert await store.cache.get(mine.slot(0)) is None  # discarded, not just skipped
        other_key = CachedResponse("cd" * 20, mine.tenant, 200, "application/json", False, (b"{}",), "m")
        assert await store.write(mine, 0, other_key, ttl=60)
        assert (await store.read(mine, 1)).entries == () and store.stats.tenant_mismatches == 2
    finally:
        await store.close()
        await scrub(prefix)


async def test_memory_backend_is_bounded_in_bytes_and_evicts_least_recent():
    serializer = EntrySerializer()
    entry = CachedResponse("k", "t", 200, "application/json", False, (b"x" * 1000,), "m")
    one = len(serializer.dumps(entry)) + ENTRY_OVERHEAD + len("k:0")
    cache = BoundedMemoryCache(max_bytes=one * 3, serializer=serializer)
    for name in ("a", "b", "c"):
        await cache.set(f"{name}:0", entry)
    assert await cache.get("a:0") is not None  # a is now the most recent
    await cache.set("d:0", entry)
    assert cache.size <= cache.max_bytes and cache.evictions == 1
    assert await cache.get("b:0") is None
    assert all([await cache.get(f"{name}:0") for name in ("a", "c", "d")])
    huge = CachedResponse("k", "t", 200, "application/json", False, (b"x" * one * 4,), "m")
    assert await cache.set("huge:0", huge) is False and cache.rejected == 1
    assert cache.size <= cache.max_bytes


def test_entry_round_trips_bytes_split_inside_a_character():
    snowman = "☃".encode()
    entry = CachedResponse(
        "k", "t", 200, "text/event-stream", True, (b"data: " + snowman[:1], snowman[1:] + b"\n\n"), "m", 3, 4, 7, 1, 1.5
    )
    serializer = EntrySerializer()
    assert serializer.loads(serializer.dumps(entry)) == entry
    assert serializer.loads(b"not an entry") is None
    assert serializer.loads(serializer.dumps(entry)[:-1]) is None  # truncated body


async def test_redis_outage_fails_open_and_recovers(mock, start_gateway: GatewayFactory, session, tmp_path: Path):
    server = RedisServer(tmp_path)
    await server.start()
    try:
        gateway = await start_gateway(
            f'[cache]\nurl = "{server.url}"\ntimeout_seconds = 0.2\n'
            f'[ratelimit]\nurl = "{server.url}"\ntimeout_seconds = 0.2\nfail_open = true\n'
        )
        body, limited = chat(), {**ON, "Helicone-RateLimit-Policy": "1000;w=60"}
        assert (await ask(session, gateway.url, body, limited))[1]["Helicone-Cache"] == "MISS"
        assert (await ask(session, gateway.url, body, limited))[1]["Helicone-Cache"] == "HIT"
        await server.stop()
        for _ in range(5):
            status, headers, raw = await ask(session, gateway.url, body, limited)
            assert (status, headers["Helicone-Cache"]) == (200, "MISS")
            assert body["messages"][0]["content"] in orjson.loads(raw)["choices"][0]["message"]["content"]
        await server.start()

        async def cached_again() -> bool:
            return (await ask(session, gateway.url, body, limited))[1]["Helicone-Cache"] == "HIT"

        await wait_until(cached_again, timeout=5, interval=0.2)
        status, headers, _ = await ask(session, gateway.url, body, limited)
        assert int(headers["Helicone-RateLimit-Remaining"]) < 1000
    finally:
        await server.stop()


async def test_forced_tenant_mismatch_through_the_gateway_is_a_counted_miss(mock, start_gateway, session):
    gateway = await start_gateway()
    store = gateway.app[CACHE].store
    body = chat()
    assert (await ask(session, gateway.url, body, ON))[1]["Helicone-Cache"] == "MISS"
    # Rewrite the stored answer as if another tenant had written it under this key.
    (slot,) = list(store.cache._entries)
    serializer = EntrySerializer()
    entry = serializer.loads(await store.cache._get(slot))
    await store.cache._set(slot, serializer.dumps(dataclasses.replace(entry, tenant="someone-else/key")))
    _, headers, _ = await ask(session, gateway.url, body, ON)
    assert headers["Helicone-Cache"] == "MISS" and len(mock.requests) == 2
    async with session.get(gateway.url + "/metrics") as response:
        assert "edgeproxy_cache_tenant_mismatch_total 1.0" in await response.text()
