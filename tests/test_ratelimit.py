"""Rate limits: headers, sliding windows, every policy source enforced, spend caps, shared exact counters."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.ratelimit.redis_windows import RedisWindows
from edgeproxy.ratelimit.windows import Charge, MemoryWindows, Windows
from edgeproxy.settings import AuthSettings, RateLimitSettings

from .conftest import GatewayFactory, wait_until
from .redis_server import SHARED_URL, RedisServer, free_port, scrub, unique_prefix

SECRET = "r" * 40
# One cent per token, in and out, so spend is easy to count.
PRICEY = '[prices."mock-pricey"]\ninput = 10000.0\noutput = 10000.0\n'


def chat(model: str = "mock-model", text: str = "a b c") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


async def ask(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/v1/chat/completions", json=body or chat(), headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield '[ratelimit]\nurl = "memory://"\n'
        return
    prefix = unique_prefix("rl")
    yield f'[ratelimit]\nurl = "{SHARED_URL}"\nkey_prefix = "{prefix}"\n'
    await scrub(prefix)


async def test_headers_count_down_then_429_in_the_provider_shape(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    policy = {"Helicone-RateLimit-Policy": "3;w=60"}
    for left in (2, 1, 0):
        status, headers, _ = await ask(session, gateway.url, policy)
        assert status == 200
        assert headers["Helicone-RateLimit-Limit"] == "3"
        assert headers["Helicone-RateLimit-Remaining"] == str(left)
        assert headers["Helicone-RateLimit-Policy"] == "3;w=60;u=request;s=global"
    status, headers, raw = await ask(session, gateway.url, policy)
    assert status == 429
    assert 55 <= int(headers["Retry-After"]) <= 60
    assert headers["Helicone-RateLimit-Remaining"] == "0"
    error = orjson.loads(raw)["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert len(mock.requests) == 3
    # No policy, no headers.
    status, headers, _ = await ask(session, gateway.url, {})
    assert status == 200 and "Helicone-RateLimit-Limit" not in headers


async def test_window_slides(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    policy = {"Helicone-RateLimit-Policy": "2;w=1"}
    assert [(await ask(session, gateway.url, policy))[0] for _ in range(3)] == [200, 200, 429]
    refused_at = time.monotonic()

    async def admitted() -> bool:
        return (await ask(session, gateway.url, policy))[0] == 200

    await wait_until(admitted, timeout=3, interval=0.05)
    assert time.monotonic() - refused_at <= 1.5


async def test_segments_give_each_user_and_property_value_a_bucket(
    mock, start_gateway: GatewayFactory, backend, session
):
    gateway = await start_gateway(backend)
    by_user = {"Helicone-RateLimit-Policy": "1;w=60;s=user"}
    assert (await ask(session, gateway.url, {**by_user, "Helicone-User-Id": "ann"}))[0] == 200
    assert (await ask(session, gateway.url, {**by_user, "Helicone-User-Id": "bob"}))[0] == 200
    assert (await ask(session, gateway.url, {**by_user, "Helicone-User-Id": "ann"}))[0] == 429
    by_team = {"Helicone-RateLimit-Policy": "1;w=60;s=team"}
    assert (await ask(session, gateway.url, {**by_team, "Helicone-Property-Team": "red"}))[0] == 200
    assert (await ask(session, gateway.url, {**by_team, "helicone-property-team": "blue"}))[0] == 200
    assert (await ask(session, gateway.url, {**by_team, "Helicone-Property-TEAM": "red"}))[0] == 429


async def test_a_header_tightens_but_never_loosens_app_and_key_policies(
    mock, start_gateway: GatewayFactory, backend, session
):
    gateway = await start_gateway(
        backend + f'[auth]\njwt_secret = "{SECRET}"\n[apps.app-a]\nrate_limit = "2;w=60"\n'
    )
    issuer = KeyIssuer(AuthSettings(jwt_secret=SECRET))
    app_key = {"Helicone-Auth": "Bearer " + issuer.issue(KeyGrant(app="app-a"))[0]}
    loose = {**app_key, "Helicone-RateLimit-Policy": "100;w=60"}
    assert [(await ask(session, gateway.url, loose))[0] for _ in range(3)] == [200, 200, 429]
    status, headers, _ = await ask(session, gateway.url, loose)
    assert status == 429 and headers["Helicone-RateLimit-Policy"] == "2;w=60;u=request;s=global"

    other_key = {"Helicone-Auth": "Bearer " + issuer.issue(KeyGrant(app="app-b", rate_limit="3;w=60"))[0]}
    tight = {**other_key, "Helicone-RateLimit-Policy": "1;w=60"}
    status, headers, _ = await ask(session, gateway.url, tight)
    assert status == 200 and headers["Helicone-RateLimit-Policy"] == "1;w=60;u=request;s=global"
    assert (await ask(session, gateway.url, tight))[0] == 429
    # The key's own limit still holds without the header: 3 in all, the refused one not counted.
    assert [(await ask(session, gateway.url, other_key))[0] for _ in range(3)] == [200, 200, 429]


async def admitted_until_refused(session, url: str, headers: dict[str, str], body: dict) -> int:
    """Send until the first 429; every later request must be refused too."""
    statuses = [(await ask(session, url, headers, body))[0] for _ in range(8)]
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (8 - admitted)
    return admitted


# Each request reserves its worst case up front: 13 prompt tokens estimated from "user" + "a b c"
# (8 overhead + 9 bytes / 2) plus max_tokens 5 = 18, then settles to the mock's actual 3 + 5 = 8.
# A quota of 40 admits 8 + 8 + 18 and refuses the fourth (24 + 18 > 40): never past the cap, and
# more than the 2 that would fit if the unused part of each reservation were never given back.
async def test_cents_policy_is_a_spend_cap(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend + PRICEY)  # one cent per token
    capped = {"Helicone-RateLimit-Policy": "40;w=60;u=cents", "X-Mock-Chunks": "5"}
    body = {**chat("mock-pricey"), "max_tokens": 5}
    status, headers, _ = await ask(session, gateway.url, capped, body)
    assert (status, headers["Helicone-RateLimit-Remaining"]) == (200, "22")  # 40 - the 18 reserved
    assert 1 + await admitted_until_refused(session, gateway.url, capped, body) == 3
    assert len(mock.requests) == 3 and 3 * 8 <= 40


async def test_tokens_policy_counts_streamed_usage(mock, start_gateway: GatewayFactory, backend, session):
    gateway = await start_gateway(backend)
    capped = {"Helicone-RateLimit-Policy": "40;w=60;u=tokens", "X-Mock-Chunks": "5"}
    body = {**chat(), "stream": True, "max_tokens": 5}  # usage comes from the stream the gateway asked for
    assert await admitted_until_refused(session, gateway.url, capped, body) == 3
    assert len(mock.requests) == 3


async def test_concurrent_cents_requests_never_overspend(mock, start_gateway: GatewayFactory, backend, session):
    # Closed on failure: under this burst a slow Redis must refuse, not admit unmetered.
    gateway = await start_gateway(backend + "timeout_seconds = 2.0\nfail_open = false\n" + PRICEY)
    capped = {"Helicone-RateLimit-Policy": "100;w=60;u=cents", "X-Mock-Chunks": "5"}
    body = {**chat("mock-pricey"), "max_tokens": 5}
    statuses = [s for s, _, _ in await asyncio.gather(*(ask(session, gateway.url, capped, body) for _ in range(200)))]
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429, 503} and statuses.count(429) >= 150
    # Each answer costs 8 cents: spend stays within the 100-cent cap however the 200 interleave.
    assert 1 <= admitted and admitted * 8 <= 100 and len(mock.requests) == admitted


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_windows_admit_all_or_nothing_and_say_when_to_retry(kind):
    prefix = unique_prefix("windows")
    windows: Windows
    if kind == "memory":
        windows = MemoryWindows()
    else:
        windows = RedisWindows.open(RateLimitSettings(url=SHARED_URL, key_prefix=prefix))
    try:
        wide, narrow = Charge("wide", 60, 5, 1), Charge("narrow", 60, 1, 1)
        assert (await windows.admit([wide, narrow], "a")).admitted
        refused = await windows.admit([wide, narrow], "b")
        assert not refused.admitted and refused.used == (1, 1) and 59 <= refused.retry_after <= 60
        # The refused request charged neither window.
        assert (await windows.admit([wide], "c")).used == (2,)
        # A reservation counts in full until it is settled to the actual amount, in place.
        reserve = Charge("spend", 60, 1.0, 0.6)
        assert (await windows.admit([reserve], "r1")).admitted
        assert not (await windows.admit([reserve], "r2")).admitted  # 0.6 + 0.6 > 1
        await windows.settle([Charge("spend", 60, 1.0, 0.25, reserved=0.6)], "r1")
        verdict = await windows.admit([reserve], "r3")
        assert verdict.admitted and verdict.used[0] == pytest.approx(0.85)
        await windows.settle([Charge("spend", 60, 1.0, 0.0, reserved=0.6)], "r3")  # failed: released
        check = Charge("spend", 60, 1.0, 0)
        assert (await windows.admit([check], "r4")).used[0] == pytest.approx(0.25)
    finally:
        await windows.close()
        await scrub(prefix)


async def test_two_gateway_processes_sharing_redis_admit_exactly_the_quota(mock, tmp_path: Path, session):
    prefix = unique_prefix("fleet")
    config = tmp_path / "fleet.toml"
    # A generous timeout: four busy processes share two cores here, and a timeout would fail open.
    config.write_text(
        f'[ratelimit]\nurl = "{SHARED_URL}"\nkey_prefix = "{prefix}"\ntimeout_seconds = 2.0\n[logs]\nenabled = false\n'
    )
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeproxy", "--config", str(config), "serve", "--port", str(port),
            "--upstream", mock.url, "--data-dir", str(tmp_path / f"data-{port}"),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port, process in zip(ports, processes):
            async def up(port: int = port, process: asyncio.subprocess.Process = process) -> bool:
                assert process.returncode is None, f"gateway on port {port} exited"
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(up, timeout=20, interval=0.1)
        quota, total = 25, 80
        policy = {"Helicone-RateLimit-Policy": f"{quota};w=60"}
        statuses = await asyncio.gather(
            *(ask(session, f"http://127.0.0.1:{ports[i % 2]}", policy) for i in range(total))
        )
        codes = [status for status, _, _ in statuses]
        assert codes.count(200) == quota and codes.count(429) == total - quota
        assert len(mock.requests) == quota
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
        await scrub(prefix)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_or_hung_is_bounded_and_follows_fail_open(
    mock, start_gateway: GatewayFactory, session, tmp_path: Path, fail_open: bool
):
    server = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    gateway = await start_gateway(
        f'[ratelimit]\nurl = "{server.url}"\ntimeout_seconds = 0.2\nfail_open = {str(fail_open).lower()}\n'
    )
    policy = {"Helicone-RateLimit-Policy": "100;w=60"}
    want = 200 if fail_open else 503
    try:
        status, headers, raw = await ask(session, gateway.url, policy)
        assert status == want
        if not fail_open:
            assert headers["Retry-After"] == "1" and orjson.loads(raw)["error"]["code"] == "rate_limiter_unavailable"
        await server.start()

        async def counted() -> bool:
            status, headers, _ = await ask(session, gateway.url, policy)
            return status == 200 and "Helicone-RateLimit-Remaining" in headers

        await wait_until(counted, timeout=5, interval=0.1)
        os.kill(server.process.pid, signal.SIGSTOP)  # hung, not dead: reads time out
        try:
            started = time.monotonic()
            statuses = [(await ask(session, gateway.url, policy))[0] for _ in range(3)]
            assert statuses == [want] * 3
            assert time.monotonic() - started < 1.5  # one timeout, then the gate skips Redis a while
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await wait_until(counted, timeout=5, interval=0.1)
    finally:
        await server.stop()
