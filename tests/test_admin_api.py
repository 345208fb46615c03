"""The admin API end to end: real requests through the gateway, read back through /admin/v1.

The logged traffic (tests/admin_traffic.py) is sent once per log backend, embedded chDB and a
ClickHouse HTTP server, and every test below runs on both with the same expected values: the two
stores must answer alike.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from bench.mock_upstream import MockUpstream
from edgeproxy.admin.api import add_admin_routes, client_allowed
from edgeproxy.errors import GatewayError
from edgeproxy.settings_loader import load_settings
from tests.admin_traffic import (
    ADMIN_KEY,
    TEMPERATURE,
    Sent,
    now_ms,
    send_traffic,
    serve_gateway,
    wait_for_rows,
)

from .conftest import GatewayFactory

module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Logged:
    url: str
    sent: list[Sent]

    def ids(self, keep: Callable[[Sent], bool] = lambda s: True) -> set[str]:
        return {s.request_id for s in self.sent if keep(s)}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["embedded", "server"])
async def logged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Logged]:
    env = {"EDGEPROXY_ADMIN_KEY": ADMIN_KEY}
    if request.param == "server":
        env["EDGEPROXY_LOGS_CLICKHOUSE_URL"] = request.getfixturevalue("clickhouse_url")
        env["EDGEPROXY_LOGS_DATABASE"] = f"t_{uuid.uuid4().hex[:12]}"
    mock = MockUpstream()
    await mock.start()
    try:
        async with serve_gateway(mock.url, tmp_path_factory.mktemp(f"admin-{request.param}"), env) as gateway:
            sent = await send_traffic(gateway.url)
            await wait_for_rows(gateway.url, len(sent), ADMIN_KEY)
            yield Logged(gateway.url, sent)
    finally:
        await mock.stop()


async def get(url: str, path: str, params: dict[str, str] | None = None, key: str | None = ADMIN_KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/admin/v1/{path}", params=params or {}, headers=headers) as response,
    ):
        return response.status, await response.json()


async def listed(logged: Logged, **params: str) -> list[dict[str, Any]]:
    status, body = await get(logged.url, "requests", {"limit": "500", **params})
    assert status == 200, body
    return body["data"]


@module_loop
async def test_list_is_newest_first_and_omits_bodies(logged: Logged) -> None:
    rows = await listed(logged)
    assert [r["request_id"] for r in rows] == [s.request_id for s in reversed(logged.sent)]
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows), reverse=True)
    by_id = {r["request_id"]: r for r in rows}
    for sent in logged.sent:
        row = by_id[sent.request_id]
        assert not {"request_body", "response_body", "params"} & row.keys()
        assert (row["app_id"], row["user_id"], row["model"]) == (sent.call.app, sent.call.user, sent.call.model)
        assert (row["status"], row["cache"]) == (sent.status, sent.cache)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (sent.prompt_tokens, sent.completion_tokens)
        assert row["cost_usd"] == pytest.approx(sent.cost)
        assert row["properties"] == ({"Env": sent.call.env} if sent.call.env else {})
    assert {r["cache"] for r in rows} >= {"HIT", "MISS"}
    assert by_id[logged.sent[5].request_id]["outcome"] == "upstream_error"


FILTERS: list[tuple[dict[str, str], Callable[[Sent], bool]]] = [
    ({"user": "alice"}, lambda s: s.call.user == "alice"),
    ({"app": "search"}, lambda s: s.call.app == "search"),
    ({"model": "mock-fast"}, lambda s: s.call.model == "mock-fast"),
    ({"status": "500"}, lambda s: s.status == 500),
    ({"status": "2xx"}, lambda s: s.status == 200),
    ({"outcome": "upstream_error"}, lambda s: s.status == 500),
    ({"property": "Env:prod"}, lambda s: s.call.env == "prod"),
    ({"user": "alice", "property": "Env:dev"}, lambda s: s.call.user == "alice" and s.call.env == "dev"),
    ({"app": "billing", "status": "5xx"}, lambda s: s.call.app == "billing" and s.status == 500),
    # A property that is absent reads as '' in a Map: `Env:` must still match nothing here.
    ({"property": "Env:"}, lambda s: False),
    ({"user": "nobody"}, lambda s: False),
    # Values are bound, never spliced into SQL.
    ({"user": "alice' OR '1'='1"}, lambda s: False),
    ({"property": "Env') OR 1=1 --:prod"}, lambda s: False),
]


@module_loop
@pytest.mark.parametrize(("params", "keep"), FILTERS, ids=[str(p) for p, _ in FILTERS])
async def test_filters_narrow_the_list(logged: Logged, params: dict[str, str], keep: Callable[[Sent], bool]) -> None:
    rows = await listed(logged, **params)
    assert {r["request_id"] for r in rows} == logged.ids(keep)


@module_loop
async def test_time_window_takes_iso_and_epoch_ms(logged: Logged) -> None:
    rows = await listed(logged)
    oldest_first = list(reversed(rows))
    start, end = oldest_first[2]["started_at"], oldest_first[5]["started_at"]
    window = await listed(logged, **{"from": start, "to": end})
    assert [r["request_id"] for r in window] == [r["request_id"] for r in rows if start <= r["started_at"] < end]
    assert len(window) >= 1
    assert await listed(logged, **{"from": str(now_ms() + 60_000)}) == []
    assert len(await listed(logged, **{"from": "2000-01-01", "to": str(now_ms() + 60_000)})) == len(logged.sent)


@module_loop
async def test_cursor_and_offset_pages(logged: Logged) -> None:
    everything = [r["request_id"] for r in await listed(logged)]
    walked, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, page = await get(logged.url, "requests", params)
        assert status == 200, page
        walked += [r["request_id"] for r in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert walked == everything
    assert pages == (len(everything) + 1) // 2
    status, page = await get(logged.url, "requests", {"limit": "2", "offset": "2"})
    assert [r["request_id"] for r in page["data"]] == everything[2:4]


@module_loop
async def test_detail_has_bodies_and_params(logged: Logged) -> None:
    first = logged.sent[0]
    status, record = await get(logged.url, f"requests/{first.request_id}")
    assert status == 200, record
    assert record["request_id"] == first.request_id
    assert first.call.prompt in record["request_body"]
    assert "echo: " + first.call.prompt in record["response_body"]
    assert record["params"] == {"temperature": TEMPERATURE}
    assert record["properties"] == {"Env": "prod"}
    assert (record["user_id"], record["app_id"]) == ("alice", "billing")
    assert record["latency_ms"] > 0 and record["ttfb_ms"] is not None
    status, marked = await get(logged.url, f"requests/{logged.sent[-1].request_id}")
    assert orjson.loads(marked["request_body"])["messages"][0]["content"] == logged.sent[-1].call.prompt

    status, body = await get(logged.url, f"requests/{uuid.uuid4()}")
    assert (status, body["error"]["code"]) == (404, "request_not_found")
    status, body = await get(logged.url, "requests/not-a-uuid")
    assert (status, body["error"]["param"]) == (400, "id")


def expected_usage(sent: list[Sent]) -> dict[str, Any]:
    requests = len(sent)
    errors = sum(1 for s in sent if s.status >= 400)
    hits = sum(1 for s in sent if s.cache == "HIT")
    return {
        "requests": requests,
        "prompt_tokens": sum(s.prompt_tokens or 0 for s in sent),
        "completion_tokens": sum(s.completion_tokens or 0 for s in sent),
        "cost_usd": pytest.approx(sum(s.cost or 0 for s in sent)),
        "errors": errors,
        "error_rate": pytest.approx(errors / requests),
        "cache_hits": hits,
        "cache_hit_rate": pytest.approx(hits / requests),
    }


GROUPINGS: dict[str, Callable[[Sent], str]] = {
    "user": lambda s: s.call.user,
    "app": lambda s: s.call.app,
    "model": lambda s: s.call.model,
    "property:Env": lambda s: s.call.env or "",
}


@module_loop
@pytest.mark.parametrize("group_by", GROUPINGS)
async def test_usage_per_group(logged: Logged, group_by: str) -> None:
    status, usage = await get(logged.url, "usage", {"group_by": group_by})
    assert status == 200, usage
    assert usage["group_by"] == group_by
    expected: dict[str, list[Sent]] = {}
    for sent in logged.sent:
        expected.setdefault(GROUPINGS[group_by](sent), []).append(sent)
    groups = {g["key"]: g for g in usage["groups"]}
    assert groups.keys() == expected.keys()
    for key, sent in expected.items():
        assert {k: groups[key][k] for k in expected_usage(sent)} == expected_usage(sent), key
        assert groups[key]["p50_latency_ms"] <= groups[key]["p95_latency_ms"]
    assert {k: usage["totals"][k] for k in expected_usage(logged.sent)} == expected_usage(logged.sent)
    costs = [g["cost_usd"] for g in usage["groups"]]
    assert costs == sorted(costs, reverse=True)
    assert "series" not in usage


@module_loop
async def test_usage_series_adds_up_to_the_groups(logged: Logged) -> None:
    rows = await listed(logged)
    start = min(r["started_at"] for r in rows)
    params = {"group_by": "user", "from": start, "to": str(now_ms() + 1000), "interval": "10s", "app": "billing"}
    status, usage = await get(logged.url, "usage", params)
    assert status == 200, usage
    assert usage["interval_seconds"] == 10
    assert {g["key"] for g in usage["groups"]} == {"alice", "bob"}
    for group in usage["groups"]:
        points = [p for p in usage["series"] if p["key"] == group["key"]]
        assert points and all(p["time"].endswith("0.000Z") for p in points)
        assert sum(p["requests"] for p in points) == group["requests"]
        assert sum(p["cost_usd"] for p in points) == pytest.approx(group["cost_usd"])


@module_loop
async def test_usage_group_names_are_bound(logged: Logged) -> None:
    status, usage = await get(logged.url, "usage", {"group_by": "property:x') OR 1=1 --"})
    assert status == 200, usage
    assert [(g["key"], g["requests"]) for g in usage["groups"]] == [("", len(logged.sent))]


BAD_PARAMETERS = [
    ("requests", {"limit": "501"}, "limit"),
    ("requests", {"limit": "0"}, "limit"),
    ("requests", {"offset": "-1"}, "offset"),
    ("requests", {"status": "abc"}, "status"),
    ("requests", {"status": "700"}, "status"),
    ("requests", {"from": "yesterday"}, "from"),
    ("requests", {"to": "2026-13-01"}, "to"),
    ("requests", {"from": "2026-02-01", "to": "2026-01-01"}, "from"),
    ("requests", {"property": "no-colon"}, "property"),
    ("requests", {"cursor": "garbage"}, "cursor"),
    ("requests", {"cursor": f"1767225600000_{uuid.UUID(int=1)}", "offset": "1"}, "cursor"),
    ("requests", {"users": "alice"}, "users"),
    ("requests", {"user": "x" * 300}, "user"),
    ("usage", {}, "group_by"),
    ("usage", {"group_by": "team"}, "group_by"),
    ("usage", {"group_by": "property:"}, "group_by"),
    ("usage", {"group_by": "user", "interval": "0s"}, "interval"),
    ("usage", {"group_by": "user", "interval": "soon"}, "interval"),
    ("usage", {"group_by": "user", "interval": "1s"}, "interval"),  # 7 days of seconds: too many buckets
    ("usage", {"group_by": "user", "limit": "1000"}, "limit"),
]


@module_loop
@pytest.mark.parametrize(("resource", "params", "param"), BAD_PARAMETERS, ids=[f"{r}-{p}" for r, _, p in BAD_PARAMETERS])
async def test_bad_parameters_are_400_naming_them(logged: Logged, resource: str, params: dict[str, str], param: str) -> None:
    status, body = await get(logged.url, resource, params)
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


# --- who may ask ------------------------------------------------------------------------------

ACCESS = [
    (None, "", "127.0.0.1", None),
    (None, "", "::1", None),
    (None, "", "::ffff:127.0.0.1", None),
    (None, "", "127.8.9.10", None),
    (None, "", "10.1.2.3", 403),
    (None, "", "::ffff:192.0.2.1", 403),
    (None, "", None, 403),
    (None, "", "not-an-address", 403),
    ("s3cret", "Bearer s3cret", "203.0.113.5", None),
    ("s3cret", "bearer s3cret", "127.0.0.1", None),
    ("s3cret", "", "127.0.0.1", 401),
    ("s3cret", "Bearer s3cre", "127.0.0.1", 401),
    ("s3cret", "Bearer s3cret-and-more", "127.0.0.1", 401),
    ("s3cret", "Basic s3cret", "127.0.0.1", 401),
    ("s3cret", "Bearer ", "127.0.0.1", 401),
]


@pytest.mark.parametrize(("admin_key", "authorization", "remote", "status"), ACCESS)
def test_client_allowed(admin_key: str | None, authorization: str, remote: str | None, status: int | None) -> None:
    if status is None:
        client_allowed(admin_key, authorization, remote)
        return
    with pytest.raises(GatewayError) as refused:
        client_allowed(admin_key, authorization, remote)
    assert refused.value.status == status


def test_admin_key_environment_alias() -> None:
    assert load_settings(env={"EDGEPROXY_ADMIN_KEY": "from-alias"}).admin.admin_key == "from-alias"
    assert load_settings(env={"EDGEPROXY_ADMIN_ADMIN_KEY": "long-form"}).admin.admin_key == "long-form"
    assert load_settings(env={}).admin.admin_key is None


async def test_admin_key_is_required_when_configured(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(env={"EDGEPROXY_ADMIN_KEY": ADMIN_KEY})
    status, body = await get(gateway.url, "requests", key=None)
    assert (status, body["error"]["code"], body["error"]["type"]) == (401, "invalid_admin_key", "invalid_request_error")
    status, body = await get(gateway.url, "usage", {"group_by": "user"}, key="wrong")
    assert status == 401
    # The right key passes the check; this gateway keeps no log, which it says.
    status, body = await get(gateway.url, "requests")
    assert (status, body["error"]["code"]) == (503, "log_disabled")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/admin/v1/requests") as response:
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.headers["Cache-Control"] == "no-store"
        async with session.get(f"{gateway.url}/admin", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (301, "admin/")
        async with session.get(f"{gateway.url}/admin/") as response:
            assert response.status == 200
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert "static/app.js" in await response.text()
        async with session.get(f"{gateway.url}/admin/static/app.js") as response:
            assert response.status == 200 and response.content_type == "text/javascript"
        async with session.get(f"{gateway.url}/admin/static/..%2Fapi.py") as response:
            assert response.status == 404


async def test_without_a_key_only_loopback_clients_get_in() -> None:
    """A real server whose middleware makes the peer look remote, as a client elsewhere would."""

    @web.middleware
    async def from_afar(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        return await handler(request.clone(remote="198.51.100.7") if request.headers.get("X-Test-Remote") else request)

    app = web.Application(middlewares=[from_afar])
    add_admin_routes(app.router, None, None)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/admin/v1/requests"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"X-Test-Remote": "1"}) as response:
                body = await response.json()
                assert (response.status, body["error"]["code"]) == (403, "admin_key_not_configured")
            async with session.get(url) as response:
                # Loopback passes; no log store is configured here, so the answer is 503.
                assert (response.status, (await response.json())["error"]["code"]) == (503, "log_disabled")
    finally:
        await runner.cleanup()
