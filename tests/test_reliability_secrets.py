"""No secret ever leaves where it belongs: not in python logging, log rows, metrics or error bodies.

Requests carry a distinct secret in every credential header (Authorization, api-key, x-api-key,
Helicone-Auth, Proxy-Authorization, Cookie), the config holds provider keys, the JWT secret
and the admin key, and the traffic takes every path: answered, streamed, cached, refused (400,
401, 403, 413, 429), failed upstream and unreachable. Then every sink is searched for every
secret. The provider key must reach the provider, and nothing else any provider.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import aiohttp
import orjson
import pytest
from clickhouse_connect.driver.exceptions import ClickHouseError
from yarl import URL

from edgeproxy.app import LOG_BATCHER, LOG_STORE
from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.settings import AuthSettings

from .conftest import GatewayFactory, wait_until
from .reliability_tools import raw_exchange, request_bytes

JWT_SECRET = "SECRETjwt-" + "j" * 40
PROVIDER_KEY = "sk-SECRETprovider-0001"
ANTHROPIC_KEY = "sk-ant-SECRETprovider-0002"
AZURE_KEY = "SECRETazure-0003"
ADMIN_KEY = "SECRETadmin-0004"
CLIENT_SECRETS = {
    "Authorization": "Bearer sk-SECRETclient-0005",
    "api-key": "SECRETclient-0006",
    "x-api-key": "SECRETclient-0007",
    "Proxy-Authorization": "Basic SECRETclient-0008",
    "Cookie": "session=SECRETclient-0009",
}
BAD_GATEWAY_KEY = "eyJSECRETbogus-0010.eyJx.sig"
# Every secret's distinctive part: none may appear in any sink.
MARKERS = ["SECRETjwt", "SECRETprovider", "SECRETazure", "SECRETadmin", "SECRETclient", "SECRETbogus"]


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(mock_url: str) -> str:
    return f"""
[targets.openai]
api_key = "{PROVIDER_KEY}"
[targets.plain]
base_url = "{mock_url}"
[targets.claude]
base_url = "{mock_url}"
kind = "anthropic"
api_key = "{ANTHROPIC_KEY}"
[targets.azure]
base_url = "{mock_url}/v1/azure"
kind = "azure"
api_key = "{AZURE_KEY}"
api_version = "2024-06-01"
[targets.down]
base_url = "http://127.0.0.1:{dead_port()}"
api_key = "{PROVIDER_KEY}"
[auth]
jwt_secret = "{JWT_SECRET}"
[admin]
admin_key = "{ADMIN_KEY}"
[apps.strict]
models = ["only-this-model"]
"""


async def test_no_secret_in_logs_rows_metrics_or_error_bodies(
    mock, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await start_gateway(
        config(mock.url),
        {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05", "EDGEPROXY_SERVER_MAX_BODY_BYTES": "4096"},
        logs="server",
    )
    issuer = KeyIssuer(AuthSettings(jwt_secret=JWT_SECRET))
    good_key, _ = issuer.issue(KeyGrant(app="billing", user="alice"))
    strict_key, _ = issuer.issue(KeyGrant(app="strict"))
    secrets = [*MARKERS, good_key, strict_key, good_key.rsplit(".", 1)[1]]
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}
    sent = [
        ("/v1/chat/completions", {}, chat),
        ("/v1/chat/completions", {}, {**chat, "stream": True}),
        ("/v1/chat/completions", {"Helicone-Cache-Enabled": "true"}, chat),
        ("/v1/chat/completions", {"Helicone-Cache-Enabled": "true"}, chat),  # a hit
        ("/plain/v1/chat/completions", {}, chat),  # the client's own key passes through
        ("/claude/v1/messages", {}, {"model": "mock-claude", "max_tokens": 5, "messages": chat["messages"]}),
        ("/azure/v1/chat/completions", {}, chat),  # 404: the mock serves no Azure paths
        ("/down/v1/chat/completions", {}, chat),  # 502
        ("/v1/chat/completions", {"X-Mock-Status": "503"}, chat),
        ("/v1/chat/completions", {"X-Mock-Status": "401"}, chat),  # the provider refuses
        ("/v1/chat/completions", {"X-Mock-Fail-After": "1"}, {**chat, "stream": True}),
        ("/v1/chat/completions", {"Helicone-RateLimit-Policy": "0;w=60"}, chat),  # 429
        ("/v1/chat/completions", {"Helicone-Retry-Num": "x"}, chat),  # 400
        ("/v1/chat/completions", {"Helicone-User-Id": "mallory"}, chat),  # 403: the key names alice
        ("/v1/chat/completions", {"Helicone-Auth": f"Bearer {strict_key}"}, chat),  # 403: model
        ("/v1/chat/completions", {"Helicone-Auth": f"Bearer {BAD_GATEWAY_KEY}"}, chat),  # 401
        ("/v1/chat/completions", {"Helicone-Auth": f"Basic {BAD_GATEWAY_KEY}"}, chat),  # 400
        ("/v1/chat/completions", {}, {**chat, "pad": "p" * 5000}),  # 413
        ("/nope/v1/chat/completions", {}, chat),  # unknown target
        ("/v1/chat/completions", {"Helicone-Target-URL": "http://u:SECRETclient-0011@127.0.0.1:1"}, chat),
    ]
    seen: list[str] = []
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        for path, extra, body in sent:
            headers = {**CLIENT_SECRETS, "Helicone-Auth": f"Bearer {good_key}", **extra}
            async with session.post(gateway.url + path, json=body, headers=headers) as response:
                seen.append(f"{response.status} {dict(response.headers)} {await response.text()}")
                ids.append(response.headers["Helicone-Id"])
        # The SDK's header carries the gateway key when the gateway injects the provider's.
        headers = {"Authorization": f"Bearer {good_key}"}
        async with session.post(
            gateway.base_url + "/chat/completions", json=chat, headers=headers
        ) as response:
            assert response.status == 200
        async with session.get(gateway.url + "/metrics") as response:
            seen.append(await response.text())
    # A malformed head quoting a secret: aiohttp refuses it and must not log the bytes.
    reply = await raw_exchange(
        URL(gateway.url).port or 0,
        request_bytes(
            "POST", b"/v1/chat/completions", [(b"Authorization", b"Bearer sk-SECRETclient-0012\x01")]
        ),
    )
    assert reply.status == 400
    assert "refused a malformed request from 127.0.0.1 (BadHttpMessage, HTTP 400)" in caplog.text
    statuses = sorted({int(text.split(" ", 1)[0]) for text in seen[:-1]})
    assert statuses == [200, 400, 401, 403, 404, 413, 429, 502, 503], statuses

    store, batcher = gateway.app[LOG_STORE], gateway.app[LOG_BATCHER]

    async def logged() -> list[dict[str, Any]]:
        try:
            rows = await store.query(f"SELECT * FROM {store.qualified} FINAL")
        except ClickHouseError:  # the migrations have not created the table yet
            return []
        return rows if len(rows) >= len(ids) + 1 else []

    rows = await wait_until(logged, timeout=10, interval=0.1)
    assert {str(row["request_id"]) for row in rows} >= set(ids)
    assert batcher.stats.rows_dropped == 0
    sinks = {
        "python logging": caplog.text,
        "log rows": orjson.dumps(rows, default=str).decode(),
        "responses and metrics": "\n".join(seen),
    }
    for sink, text in sinks.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:24]}… found in {sink}"

    # Upstream: each provider key reached its own provider only; no gateway secret reached any.
    received = [(r.path, {k.lower(): v for k, v in r.headers.items()}) for r in mock.requests]
    upstream_text = orjson.dumps(received).decode()
    for secret in (JWT_SECRET, ADMIN_KEY, good_key, strict_key, BAD_GATEWAY_KEY):
        assert secret not in upstream_text
    by_path = {path: headers for path, headers in received}
    assert any(h.get("authorization") == f"Bearer {PROVIDER_KEY}" for _, h in received)
    assert (
        by_path["/v1/messages"]["x-api-key"] == ANTHROPIC_KEY
        and "authorization" not in by_path["/v1/messages"]
    )
    azure = next(h for p, h in received if p.startswith("/v1/azure/openai/deployments/"))
    assert azure["api-key"] == AZURE_KEY and "authorization" not in azure
    assert any(h.get("authorization") == CLIENT_SECRETS["Authorization"] for _, h in received)  # /plain
    for _, headers in received:
        assert "proxy-authorization" not in headers
