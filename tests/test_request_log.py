"""The request log end to end: the official SDK through the real gateway, one row per request.

Parametrised over the embedded store (chDB in this process) and a ClickHouse HTTP endpoint (the
chDB-backed double, or the server named by CLICKHOUSE_URL). Rows are counted with FINAL and
uniqExact(request_id), as the log's readers must.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from edgeproxy.app import LOG_BATCHER, LOG_STORE
from edgeproxy.logs.store import LogStore

from .conftest import GatewayFactory, RunningGateway, wait_until

# The gateway flushes fast here so rows land within a test's patience.
LOG_ENV = {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05", "EDGEPROXY_SERVER_MAX_BODY_BYTES": "65536"}
# The price table's made-up price of `mock-*`, USD per million tokens.
MOCK_INPUT, MOCK_OUTPUT = 1.0, 2.0
MOCK_CHUNKS = 5  # the mock's default completion length, one token per chunk
UNPRICED = "acme-unpriced-1"
REPEAT = 3  # each kind of request, sent this many times at once

ROW_SQL = """
SELECT toString(request_id) AS id, status, outcome, model, user_id, properties, session_id,
       session_path, session_name, params, request_body, response_body, prompt_tokens,
       completion_tokens, total_tokens, cost_usd, cost_saved_usd, cache, path, error
FROM {table} FINAL
"""


@dataclass
class Expect:
    """What one request's row must hold; `checks` run on the row for what a value cannot say."""

    status: int
    outcome: str = "ok"
    model: str = "mock-model"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    priced: bool = True
    cache: str = ""
    user_id: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    session: tuple[str, str, str] = ("", "", "")
    params: dict[str, Any] = field(default_factory=dict)
    request_body: bool = True
    response_body: bool = True
    checks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    @property
    def cost(self) -> float | None:
        if self.prompt_tokens is None or not self.priced:
            return None
        if self.cache == "HIT":
            return 0.0
        return (self.prompt_tokens * MOCK_INPUT + (self.completion_tokens or 0) * MOCK_OUTPUT) / 1e6


Sent = dict[str, Expect]


def words(text: str) -> int:
    """The mock counts prompt tokens as whitespace-separated words."""
    return len(text.split())


def nonce() -> str:
    return f"nonce-{uuid.uuid4().hex[:8]}"


def client(gateway: RunningGateway, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="sk-test", max_retries=0, default_headers=headers or None
    )


def helicone_id(headers: Any) -> str:
    value = headers.get("Helicone-Id")
    assert value, "every response carries Helicone-Id"
    return str(value)


# --- one function per kind of request: send it, return its id and what its row must hold ---------


async def chat_json(gateway: RunningGateway) -> tuple[str, Expect]:
    text = f"hello {nonce()} there"
    session = (f"s-{uuid.uuid4().hex[:6]}", "/plan/step-1", "Trip planner")
    sdk = client(
        gateway,
        **{
            "Helicone-User-Id": "user-42",
            "Helicone-Property-Env": "prod",
            "Helicone-Property-Feature": "search v2",
            "Helicone-Session-Id": session[0],
            "Helicone-Session-Path": session[1],
            "Helicone-Session-Name": session[2],
        },
    )
    raw = await sdk.chat.completions.with_raw_response.create(
        model="mock-model",
        messages=[{"role": "user", "content": text}],
        temperature=0.25,
        max_tokens=64,
        seed=7,
    )
    answer = raw.parse()
    content = answer.choices[0].message.content

    def body_is_the_answer(row: dict[str, Any]) -> None:
        assert orjson.loads(row["response_body"])["choices"][0]["message"]["content"] == content
        assert orjson.loads(row["request_body"])["messages"][0]["content"] == text

    return helicone_id(raw.headers), Expect(
        200,
        prompt_tokens=words(text),
        completion_tokens=answer.usage.completion_tokens,
        user_id="user-42",
        # The SDK (httpx) sends header names lower-cased; the gateway keeps them as they arrive.
        properties={"env": "prod", "feature": "search v2"},
        session=session,
        params={"temperature": 0.25, "max_tokens": 64, "seed": 7},
        checks=[body_is_the_answer],
    )


async def chat_stream(gateway: RunningGateway, *, include_usage: bool) -> tuple[str, Expect]:
    text = f"stream {nonce()}"
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": text}], stream=True, **extra
    )
    chunks = [chunk async for chunk in raw.parse()]
    received = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usages) == 1 and usages[0].completion_tokens == MOCK_CHUNKS
    else:
        # The gateway asked upstream for usage; the client that did not must not see it.
        assert usages == [] and all(c.choices for c in chunks)

    def body_is_the_assembled_stream(row: dict[str, Any]) -> None:
        stored = orjson.loads(row["response_body"])
        assert stored["choices"][0]["message"]["content"] == received
        assert stored["choices"][0]["finish_reason"] == "stop"

    return helicone_id(raw.headers), Expect(
        200,
        prompt_tokens=words(text),
        completion_tokens=MOCK_CHUNKS,
        params={"stream": True},
        checks=[body_is_the_assembled_stream],
    )


async def completion(gateway: RunningGateway) -> tuple[str, Expect]:
    prompt = f"say {nonce()} please"
    raw = await client(gateway).completions.with_raw_response.create(model="mock-model", prompt=prompt)
    answer = raw.parse()
    assert answer.choices[0].text.startswith("echo: ")
    return helicone_id(raw.headers), Expect(200, prompt_tokens=words(prompt), completion_tokens=MOCK_CHUNKS)


async def embedding(gateway: RunningGateway) -> tuple[str, Expect]:
    text = f"embed these {nonce()} words"
    raw = await client(gateway).embeddings.with_raw_response.create(model="mock-embed", input=text)
    assert raw.parse().data[0].embedding
    return helicone_id(raw.headers), Expect(200, model="mock-embed", prompt_tokens=words(text))


async def refused(call: Awaitable[Any], status: int) -> str:
    """Await an SDK call that must fail with `status`; the failed response's Helicone-Id."""
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    assert caught.value.status_code == status
    return helicone_id(caught.value.response.headers)


async def upstream_500(gateway: RunningGateway) -> tuple[str, Expect]:
    sdk = client(gateway, **{"X-Mock-Status": "500"})
    call = sdk.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": nonce()}])
    return await refused(call, 500), Expect(500, outcome="upstream_error")


async def bad_header(gateway: RunningGateway) -> tuple[str, Expect]:
    sdk = client(gateway, **{"Helicone-Cache-Enabled": "perhaps", "Helicone-User-Id": "user-400"})
    call = sdk.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": nonce()}])

    def names_the_header(row: dict[str, Any]) -> None:
        assert "Helicone-Cache-Enabled" in row["error"]

    # Refused while the headers are parsed: nothing of the request is known, not even its user.
    return await refused(call, 400), Expect(
        400, outcome="rejected", model="", request_body=False, response_body=False, checks=[names_the_header]
    )


async def too_large(gateway: RunningGateway) -> tuple[str, Expect]:
    call = client(gateway).chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "x" * 70_000}]
    )
    return await refused(call, 413), Expect(
        413, outcome="rejected", model="", request_body=False, response_body=False
    )


async def cancelled_stream(gateway: RunningGateway) -> tuple[str, Expect]:
    sdk = client(gateway, **{"X-Mock-Chunks": "40", "X-Mock-Chunk-Gap-Ms": "50"})
    raw = await sdk.chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": nonce()}], stream=True
    )
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()  # the client walks away mid-stream
    # The upstream never finished, so it never reported usage: no tokens, no cost.
    return helicone_id(raw.headers), Expect(200, outcome="cancelled", params={"stream": True})


async def omitted(gateway: RunningGateway, header: str) -> tuple[str, Expect]:
    raw = await client(gateway, **{header: "true"}).chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": nonce()}]
    )
    raw.parse()
    return helicone_id(raw.headers), Expect(
        200,
        prompt_tokens=1,
        completion_tokens=MOCK_CHUNKS,
        request_body=header != "Helicone-Omit-Request",
        response_body=header != "Helicone-Omit-Response",
    )


async def unpriced(gateway: RunningGateway) -> tuple[str, Expect]:
    text = f"what does {nonce()} cost"
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model=UNPRICED, messages=[{"role": "user", "content": text}]
    )
    raw.parse()
    return helicone_id(raw.headers), Expect(
        200, model=UNPRICED, prompt_tokens=words(text), completion_tokens=MOCK_CHUNKS, priced=False
    )


async def cached_pair(gateway: RunningGateway) -> list[tuple[str, Expect]]:
    """The same question twice with the cache on: a miss that pays, then a hit that costs nothing."""
    text = f"cache me {nonce()}"
    sdk = client(gateway, **{"Helicone-Cache-Enabled": "true"})
    pair = []
    for status in ("MISS", "HIT"):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="mock-model", messages=[{"role": "user", "content": text}]
        )
        assert raw.headers.get("Helicone-Cache") == status
        raw.parse()
        pair.append((helicone_id(raw.headers), Expect(200, prompt_tokens=words(text), completion_tokens=MOCK_CHUNKS, cache=status)))
    miss_cost = pair[0][1].cost

    def saved_the_miss_price(row: dict[str, Any]) -> None:
        assert math.isclose(row["cost_saved_usd"], miss_cost, rel_tol=1e-9)

    pair[1][1].checks.append(saved_the_miss_price)
    return pair


KINDS: dict[str, Callable[[RunningGateway], Awaitable[tuple[str, Expect]]]] = {
    "chat": chat_json,
    "stream": lambda g: chat_stream(g, include_usage=False),
    "stream+usage": lambda g: chat_stream(g, include_usage=True),
    "completion": completion,
    "embedding": embedding,
    "upstream-500": upstream_500,
    "bad-header": bad_header,
    "413": too_large,
    "cancelled": cancelled_stream,
    "omit-request": lambda g: omitted(g, "Helicone-Omit-Request"),
    "omit-response": lambda g: omitted(g, "Helicone-Omit-Response"),
    "unpriced": unpriced,
}


# --- reading the log -----------------------------------------------------------------------------


async def settled_rows(gateway: RunningGateway, expected: int, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    """Every row once `expected` distinct requests landed; asserts the count is exact and unduplicated."""
    store: LogStore = gateway.app[LOG_STORE]
    batcher = gateway.app[LOG_BATCHER]
    # Inserted rows mean the migrations ran: the table may not exist before (fast clients finish first).
    await wait_until(lambda: batcher.stats.rows_written + batcher.stats.rows_replayed >= expected, timeout=timeout)

    async def distinct() -> bool:
        rows = await store.query(f"SELECT uniqExact(request_id) AS n FROM {store.qualified}")
        return rows[0]["n"] >= expected

    await wait_until(distinct, timeout=timeout, interval=0.05)
    await wait_until(lambda: batcher.stats.queue_depth == 0, timeout=timeout)
    counts = await store.query(
        f"SELECT count() AS final, uniqExact(request_id) AS distinct FROM {store.qualified} FINAL"
    )
    assert counts[0] == {"final": expected, "distinct": expected}
    stats = batcher.stats
    assert stats.rows_dropped == 0 and stats.rows_written + stats.rows_replayed == expected
    rows = await store.query(ROW_SQL.format(table=store.qualified))
    return {row["id"]: row for row in rows}


def check_row(row: dict[str, Any], want: Expect, kind: str) -> None:
    where = f"{kind} {row['id']}"
    got = {
        "status": row["status"],
        "outcome": row["outcome"],
        "model": row["model"],
        "cache": row["cache"],
        "user_id": row["user_id"],
        "properties": dict(row["properties"]),
        "session": (row["session_id"], row["session_path"], row["session_name"]),
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "request_body": row["request_body"] is not None,
        "response_body": row["response_body"] is not None,
    }
    expected = {
        "status": want.status,
        "outcome": want.outcome,
        "model": want.model,
        "cache": want.cache,
        "user_id": want.user_id,
        "properties": want.properties,
        "session": want.session,
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": want.completion_tokens,
        "request_body": want.request_body,
        "response_body": want.response_body,
    }
    assert got == expected, where
    if want.prompt_tokens is not None:
        assert row["total_tokens"] == want.prompt_tokens + (want.completion_tokens or 0), where
    if want.cost is None:
        assert row["cost_usd"] is None, where
    else:
        assert row["cost_usd"] is not None and math.isclose(row["cost_usd"], want.cost, rel_tol=1e-9), where
    params = orjson.loads(row["params"])
    assert params == want.params, where
    for check in want.checks:
        check(row)


async def metric(gateway: RunningGateway, name: str, labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# --- the tests -------------------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "server"])
async def logged(request: pytest.FixtureRequest, start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(logs=request.param, env=LOG_ENV)


async def test_every_request_is_exactly_one_row_with_its_fields(logged: RunningGateway) -> None:
    sends = [(kind, send) for kind, send in KINDS.items() for _ in range(REPEAT)]
    results = await asyncio.gather(*(send(logged) for _, send in sends))
    sent = {request_id: (kind, want) for (kind, _), (request_id, want) in zip(sends, results)}
    for request_id, want in await cached_pair(logged):
        sent[request_id] = ("cache", want)
    assert len(sent) == len(sends) + 2, "every request has its own id"

    rows = await settled_rows(logged, len(sent))
    assert set(rows) == set(sent)
    for request_id, (kind, want) in sent.items():
        check_row(rows[request_id], want, kind)
    assert await metric(logged, "edgeproxy_unpriced_requests_total", 'model="other"') == REPEAT
