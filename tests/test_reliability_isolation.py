"""Tenant isolation under cancellation storms, on the memory cache and on Redis, down to the log rows.

test_tenant_isolation.py covers the Redis pool and the answers clients see; this adds the
memory backend and the request log: every row must carry the user and app of the tenant that
sent that request id, and no row's request or response may hold another tenant's question.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from edgeproxy.app import CACHE, LOG_BATCHER, LOG_STORE
from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.settings import AuthSettings

from .conftest import GatewayFactory, wait_until
from .redis_server import SHARED_URL, scrub, unique_prefix
from .reliability_tools import QUESTION, logged_rows, stored_copies, tenant_traffic

SECRET = "isolation-" + "i" * 40
TENANTS = 12
REQUESTS = 300


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix("isolation")
    yield value
    await scrub(value)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_every_answer_and_log_row_stays_with_its_tenant(
    mock, start_gateway: GatewayFactory, prefix: str, backend: str
) -> None:
    cache = (
        f'url = "{SHARED_URL}"\nkey_prefix = "{prefix}"\nmax_connections = 2\n' if backend == "redis" else ""
    )
    gateway = await start_gateway(
        f'[cache]\n{cache}timeout_seconds = 2.0\n[auth]\njwt_secret = "{SECRET}"\n',
        {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"},
        logs="server",
    )
    issuer = KeyIssuer(AuthSettings(jwt_secret=SECRET))
    keys = [issuer.issue(KeyGrant(app=f"app-{t}", user=f"user-{t}"))[0] for t in range(TENANTS)]
    replies = await tenant_traffic(gateway.base_url, keys, REQUESTS, timeout=60)
    sent = {reply.request_id: reply for reply in replies}
    answered = {reply.request_id for reply in replies if reply.outcome == "answered"}
    wrong = [f"tenant {r.tenant} asked {r.question!r}, got {r.status} {r.raw[:200]!r}" for r in replies
             if r.outcome == "answered" and (r.status != 200 or r.question not in r.content())]
    assert not wrong, wrong[:5]
    outcomes = Counter("hit" if r.cache == "HIT" else r.outcome for r in replies)
    assert outcomes["hit"] > 30 and outcomes["cancelled"] + outcomes["aborted"] > 30, outcomes

    store = gateway.app[LOG_STORE]
    columns = "user_id, app_id, status, outcome, cache, request_body, response_body"

    async def every_answer_logged() -> dict:
        rows = await logged_rows(store, columns)
        return rows if set(answered) <= set(rows) else {}

    rows = await wait_until(every_answer_logged, timeout=20, interval=0.1)
    for request_id, row in rows.items():
        tenant, question = sent[request_id].tenant, sent[request_id].question
        assert (row["user_id"], row["app_id"]) == (f"user-{tenant}", f"app-{tenant}"), (request_id, row)
        for text in (row["request_body"] or "", row["response_body"] or ""):
            assert set(QUESTION.findall(text)) <= {question}, (tenant, question, text[:300])
        if request_id in answered:
            assert row["status"] == 200 and question in (row["response_body"] or ""), row
    stored, distinct = await stored_copies(store)
    assert stored == distinct == len(rows)
    assert gateway.app[LOG_BATCHER].stats.rows_dropped == 0
    assert gateway.app[CACHE].store.stats.tenant_mismatches == 0
    print(f"\n{backend}: {dict(outcomes)}, {len(rows)} rows, each with its own tenant")
