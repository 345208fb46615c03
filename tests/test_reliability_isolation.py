"""Tenant isolation under cancellation storms, on the memory cache and on Redis, down to the log rows.

test_tenant_isolation.py covers the Redis pool and the answers clients see; this adds the
memory backend and the request log: every row must carry the user and app of the tenant that
sent that request id, and no row's request or response may hold another tenant's question.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from edgeproxy.app import CACHE, LOG_BATCHER, LOG_STORE
from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.completion import assemble_stream
from edgeproxy.settings import AuthSettings

from .conftest import GatewayFactory, wait_until
from .redis_server import SHARED_URL, scrub, unique_prefix
from .reliability_tools import logged_rows, stored_copies

SECRET = "isolation-" + "i" * 40
TENANTS = 12
REQUESTS = 300
QUESTION = re.compile(r"(?:tenant \d+|everyone) asks [0-9a-f]{32}")


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
    own = {t: [f"tenant {t} asks {uuid.uuid4().hex}" for _ in range(3)] for t in range(TENANTS)}
    common = [f"everyone asks {uuid.uuid4().hex}" for _ in range(3)]
    sent: dict[str, tuple[int, str]] = {}  # request id → (tenant, question)
    answered: dict[str, bytes] = {}
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    gate = asyncio.Semaphore(48)

    async def fetch(
        session: aiohttp.ClientSession, body: dict, headers: dict[str, str], abort: str
    ) -> tuple[int, bytes, str]:
        async with session.post(
            gateway.base_url + "/chat/completions", json=body, headers=headers
        ) as response:
            if abort == "after_headers":
                return 0, b"", ""
            if abort == "mid_stream":
                await response.content.readany()
                return 0, b"", ""
            return response.status, await response.read(), response.headers.get("Helicone-Cache", "")

    async def one(session: aiohttp.ClientSession) -> None:
        tenant = random.randrange(TENANTS)
        question = random.choice(own[tenant] + common)
        stream = random.random() < 0.5
        abort = (
            random.choice(("before_headers", "after_headers", "mid_stream"))
            if random.random() < 1 / 3
            else ""
        )
        request_id = str(uuid.uuid4())
        sent[request_id] = (tenant, question)
        body = {"model": "mock-model", "stream": stream, "messages": [{"role": "user", "content": question}]}
        headers = {
            "Helicone-Auth": f"Bearer {keys[tenant]}",
            "Helicone-Request-Id": request_id,
            "Helicone-Cache-Enabled": "true",
            "X-Mock-Delay-Ms": str(random.choice((0, 5, 15))),
            "X-Mock-Chunks": "6",
            "X-Mock-Chunk-Gap-Ms": "2",
        }
        async with gate:
            task = asyncio.create_task(fetch(session, body, headers, abort))
            if abort == "before_headers":
                asyncio.get_running_loop().call_later(random.uniform(0, 0.012), task.cancel)
            try:
                status, raw, cache = await task
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
                return
        if status == 0:
            outcomes["aborted"] += 1
            return
        document = assemble_stream(raw) if stream else orjson.loads(raw)
        content = document["choices"][0]["message"]["content"]
        if status != 200 or question not in content:
            wrong.append(f"tenant {tenant} asked {question!r}, got {status} {content!r}")
        answered[request_id] = raw
        outcomes["hit" if cache == "HIT" else "completed"] += 1

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session) for _ in range(REQUESTS))), timeout=60)
    assert not wrong, wrong[:5]
    assert outcomes["hit"] > 30 and outcomes["cancelled"] + outcomes["aborted"] > 30, outcomes

    store = gateway.app[LOG_STORE]
    columns = "user_id, app_id, status, outcome, cache, request_body, response_body"

    async def every_answer_logged() -> dict:
        rows = await logged_rows(store, columns)
        return rows if set(answered) <= set(rows) else {}

    rows = await wait_until(every_answer_logged, timeout=20, interval=0.1)
    for request_id, row in rows.items():
        tenant, question = sent[request_id]
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
