"""Spend caps: periods, both ledgers, and refusals through the gateway with a movable clock."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from redis import asyncio as aioredis

from edgeproxy.app import BUDGETS, LEDGER
from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.budget import REMAINING_HEADER, MemoryLedger, RedisLedger, SpendLedger, Window
from edgeproxy.settings import AuthSettings, RateLimitSettings

from .conftest import GatewayFactory, RunningGateway, wait_until
from .gateway_process import GatewayProcess

SECRET = "budget-secret-" + "b" * 60
ENV = {"EDGEPROXY_JWT_SECRET": SECRET}
REDIS_URL = "redis://127.0.0.1:6379/0"
# The mock answers 5 completion tokens by default: at $200k per million output tokens, $1.00 a request.
# With max_tokens 5 a request also reserves exactly $1.00 (input is free), so headers are round.
PRICES = '[prices."budget-model"]\ninput = 0.0\noutput = 200000.0\n'
CHAT = {"model": "budget-model", "messages": [{"role": "user", "content": "spend"}], "max_tokens": 5}


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "period, now, start, end",
    [
        ("day", "2025-03-15T13:45:00", "2025-03-15T00:00:00", "2025-03-16T00:00:00"),
        ("day", "2025-03-15T00:00:00", "2025-03-15T00:00:00", "2025-03-16T00:00:00"),
        ("week", "2025-03-15T13:45:00", "2025-03-10T00:00:00", "2025-03-17T00:00:00"),  # Saturday → Monday
        ("week", "2025-03-10T00:00:01", "2025-03-10T00:00:00", "2025-03-17T00:00:00"),
        ("month", "2025-12-31T23:59:59", "2025-12-01T00:00:00", "2026-01-01T00:00:00"),
        ("month", "2024-02-29T12:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
    ],
)
def test_window_containing(period: str, now: str, start: str, end: str) -> None:
    window = Window.containing(period, ts(now))
    assert (window.start, window.end) == (ts(start), ts(end))
    assert window.reset_at() == end + "Z"


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[SpendLedger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    prefix = f"test-{uuid.uuid4().hex}:"
    redis_ledger = RedisLedger.open(RateLimitSettings(url=REDIS_URL, key_prefix=prefix))
    yield redis_ledger
    await redis_ledger.close()
    async with aioredis.from_url(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)


async def test_ledger_sums_per_scope_and_window(ledger: SpendLedger) -> None:
    # Periods around the real date: Redis expires a key at once when its period is long past.
    this_month = Window.containing("month", time.time())
    next_month = Window.containing("month", this_month.end + 1)
    assert await ledger.spent("key:a", this_month) == 0.0
    assert await ledger.add("key:a", this_month, 0.25) == pytest.approx(0.25)
    assert await ledger.add("key:a", this_month, 1.5) == pytest.approx(1.75)
    await ledger.add("key:b", this_month, 9.0)
    await ledger.add("key:a", next_month, 0.5)
    assert await ledger.spent("key:a", this_month) == pytest.approx(1.75)
    assert await ledger.spent("key:a", next_month) == pytest.approx(0.5)


async def test_redis_ledger_keys_expire_after_their_period() -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    ledger = RedisLedger.open(RateLimitSettings(url=REDIS_URL, key_prefix=prefix))
    window = Window.containing("day", time.time())
    await ledger.add("app:x", window, 1.0)
    await ledger.close()
    async with aioredis.from_url(REDIS_URL) as client:
        key = f"{prefix}spend:app:x:{window.start}"
        assert await client.expiretime(key) == window.end + RedisLedger.GRACE_SECONDS
        await client.delete(key)


def key(grant: KeyGrant) -> dict[str, str]:
    return issued(grant)[0]


def issued(grant: KeyGrant) -> tuple[dict[str, str], str]:
    token, key_id = KeyIssuer(AuthSettings(jwt_secret=SECRET)).issue(grant)
    return {"Helicone-Auth": f"Bearer {token}"}, key_id


async def post(gateway: RunningGateway, headers: dict[str, str], **extra: object) -> tuple[int, dict, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/chat/completions", json={**CHAT, **extra}, headers=headers) as r,
    ):
        raw = await r.read()
        return r.status, dict(r.headers), {} if extra.get("stream") else orjson.loads(raw)


@pytest.mark.parametrize("store", ["memory://", REDIS_URL])
async def test_key_budget_refuses_when_spent_and_a_new_period_admits(
    mock, start_gateway: GatewayFactory, store: str
) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    config = f'{PRICES}[ratelimit]\nurl = "{store}"\nkey_prefix = "{prefix}"\n'
    gateway = await start_gateway(config, ENV)
    today = Window.containing("day", time.time())
    now = [today.start + 10 * 3600.0]  # 10:00 UTC today (Redis keys must expire in the real future)
    gateway.app[BUDGETS].clock = lambda: now[0]
    headers, key_id = issued(KeyGrant(app="shop", budget_usd=2.0, budget_period="day"))
    window = Window.containing("day", now[0])
    ledger = gateway.app[LEDGER]

    # The remaining budget is what is left once this request's reservation is taken.
    status, seen, _ = await post(gateway, headers)
    assert (status, seen[REMAINING_HEADER]) == (200, "1.000000")
    key_scope = f"key:{key_id}"
    await wait_until(lambda: _spent(ledger, key_scope, window, 1.0))
    status, seen, _ = await post(gateway, headers, stream=True)  # a stream is charged from its usage event
    assert (status, seen[REMAINING_HEADER]) == (200, "0.000000")
    await wait_until(lambda: _spent(ledger, key_scope, window, 2.0))

    status, seen, body = await post(gateway, headers)
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        429,
        "budget_exceeded",
        "insufficient_quota",
    )
    assert f"resets at {today.reset_at()}" in body["error"]["message"]
    assert seen[REMAINING_HEADER] == "0.000000" and seen["x-should-retry"] == "false"
    assert int(seen["Retry-After"]) == 14 * 3600
    assert len(mock.requests) == 2

    now[0] += 86400  # the next day
    status, seen, _ = await post(gateway, headers)
    assert (status, seen[REMAINING_HEADER]) == (200, "1.000000")
    if store != "memory://":
        async with aioredis.from_url(REDIS_URL) as client:
            await client.delete(*[k async for k in client.scan_iter(match=prefix + "*")])


async def test_app_budget_is_shared_by_the_apps_keys(mock, start_gateway: GatewayFactory) -> None:
    config = PRICES + '[apps.shop]\nbudget_usd = 2.5\nbudget_period = "week"\n'
    gateway = await start_gateway(config, ENV)
    first, second = key(KeyGrant(app="shop")), key(KeyGrant(app="shop"))
    ledger = gateway.app[LEDGER]
    window = Window.containing("week", time.time())
    assert (await post(gateway, first))[0] == 200
    await wait_until(lambda: _spent(ledger, "app:shop", window, 1.0))
    status, seen, _ = await post(gateway, second)
    assert (status, seen[REMAINING_HEADER]) == (200, "0.500000")
    await wait_until(lambda: _spent(ledger, "app:shop", window, 2.0))
    status, _, body = await post(gateway, first)
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")
    assert "app 'shop'" in body["error"]["message"] and "per week" in body["error"]["message"]
    # Another app, and anonymous requests, have no cap here.
    assert (await post(gateway, key(KeyGrant(app="other"))))[0] == 200
    assert (await post(gateway, {}))[0] == 200


async def test_unreachable_budget_store_fails_open_or_closed(mock, start_gateway: GatewayFactory) -> None:
    dead = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    headers = key(KeyGrant(app="shop", budget_usd=1.0))
    admitting = await start_gateway(f'{PRICES}[ratelimit]\nurl = "{dead}"\n', ENV)
    assert (await post(admitting, headers))[0] == 200
    refusing = await start_gateway(f'{PRICES}[ratelimit]\nurl = "{dead}"\nfail_open = false\n', ENV)
    status, _, body = await post(refusing, headers)
    assert (status, body["error"]["code"]) == (503, "budget_unavailable")


async def _spent(ledger: SpendLedger, scope: str, window: Window, want: float) -> bool:
    return abs(await ledger.spent(scope, window) - want) < 1e-9


async def burst(urls: list[str], headers: dict[str, str], count: int) -> list[int]:
    """`count` requests at once, spread over the gateways, answered or refused."""
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            body = {**CHAT, "messages": [{"role": "user", "content": f"spend {i}"}]}
            async with session.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


# $1.00 a request against a $10 budget: 200 at once must not buy an eleventh answer.
@pytest.mark.parametrize("store", ["memory://", REDIS_URL])
async def test_concurrent_burst_cannot_overspend_in_one_process(mock, start_gateway: GatewayFactory, store: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    config = f'[ratelimit]\nurl = "{store}"\nkey_prefix = "{prefix}"\ntimeout_seconds = 2.0\n{PRICES}'
    gateway = await start_gateway(config, ENV)
    headers, key_id = issued(KeyGrant(app="shop", budget_usd=10.0, budget_period="day"))
    statuses = await burst([gateway.url], headers, 200)
    assert statuses.count(200) == len(mock.requests) <= 10
    assert statuses.count(429) >= 190
    window = Window.containing("day", time.time())
    await wait_until(lambda: _spent(gateway.app[LEDGER], f"key:{key_id}", window, float(len(mock.requests))))


async def test_concurrent_burst_cannot_overspend_across_two_processes(mock, tmp_path) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    config = tmp_path / "budget.toml"
    config.write_text(
        f'[ratelimit]\nurl = "{REDIS_URL}"\nkey_prefix = "{prefix}"\ntimeout_seconds = 2.0\n'
        f"[logs]\nenabled = false\n{PRICES}"
    )
    env = {**ENV, "EDGEPROXY_CONFIG": str(config)}
    gateways = [GatewayProcess(tmp_path / f"g{i}", mock.url, env=env) for i in range(2)]
    try:
        await asyncio.gather(*(g.start() for g in gateways))
        headers, _ = issued(KeyGrant(app="shop", budget_usd=10.0, budget_period="day"))
        statuses = await burst([g.url for g in gateways], headers, 200)
    finally:
        await asyncio.gather(*(g.stop() for g in gateways))
    assert statuses.count(200) == len(mock.requests) <= 10
    assert 1 <= statuses.count(200) and statuses.count(429) >= 190
