"""Prompt policy through the gateway: system prompt, banned input, caps, and the output guard."""

from __future__ import annotations

import re
import time

import aiohttp
import openai
import orjson
import pytest

from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.completion import assemble_stream, sse_payloads
from edgeproxy.output_guard import REDACTED, OutputGuard
from edgeproxy.settings import AuthSettings

from .conftest import GatewayFactory

SECRET = "policy-secret-" + "p" * 60
ENV = {"EDGEPROXY_JWT_SECRET": SECRET}
# The mock answers "echo: <last user message>" then " lorem", " ipsum", " dolor", " sit", one per event,
# so this prompt makes the guarded phrase straddle three events of the answer.
PROMPT = "the code word"
PHRASE = "word lorem ipsum"
POLICY = f"""
[apps.default]
system_prompt = "You are the billing assistant."
banned_patterns = ["forbidden\\\\s+topic", "^drop table"]
output_guard = ["{PHRASE}", "dolor"]
max_tokens = 100
models = ["mock-*"]

[apps.billing]
system_prompt = "Billing only."
system_prompt_mode = "replace"
"""


def chat(content: str = PROMPT, **extra: object) -> dict:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


async def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers or {}) as response,
    ):
        return response.status, await response.read()


async def raw_events(url: str, body: dict, headers: dict[str, str]) -> list[tuple[float, bytes]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        return [(time.perf_counter(), chunk) async for chunk in response.content.iter_any()]


async def test_system_prompt_prepended_and_replaced(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(POLICY, ENV)
    messages = [{"role": "system", "content": "client rules"}, {"role": "user", "content": "hi"}]
    assert (await post(gateway.base_url + "/chat/completions", {"model": "mock-gpt", "messages": messages}))[
        0
    ] == 200
    assert mock.requests[-1].json()["messages"] == [
        {"role": "system", "content": "You are the billing assistant."},
        *messages,
    ]
    billing, _ = KeyIssuer(AuthSettings(jwt_secret=SECRET)).issue(KeyGrant(app="billing"))
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key="x",
        max_retries=0,
        default_headers={"Helicone-Auth": f"Bearer {billing}"},
    )
    await client.chat.completions.create(model="mock-gpt", messages=messages)  # type: ignore[arg-type]
    assert mock.requests[-1].json()["messages"] == [
        {"role": "system", "content": "Billing only."},
        messages[1],
    ]


@pytest.mark.parametrize(
    "content", ["let us discuss a FORBIDDEN   Topic", "Drop table users", "fine start\nthen forbidden topic"]
)
async def test_banned_input_refused_before_any_upstream_call(
    mock, start_gateway: GatewayFactory, content: str
) -> None:
    gateway = await start_gateway(POLICY, ENV)
    status, body = await post(gateway.base_url + "/chat/completions", chat(content))
    error = orjson.loads(body)["error"]
    assert (status, error["code"]) == (400, "policy_violation")
    assert "apps.default.banned_patterns" in error["message"]
    assert mock.requests == []
    assert (await post(gateway.base_url + "/chat/completions", chat("a permitted topic")))[0] == 200


async def test_banned_input_in_parts_and_other_endpoints(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(POLICY, ENV)
    parts = chat([{"type": "text", "text": "ok"}, {"type": "text", "text": "forbidden topic"}])  # type: ignore[arg-type]
    assert (await post(gateway.base_url + "/chat/completions", parts))[0] == 400
    legacy = {"model": "mock-gpt", "prompt": ["fine", "forbidden topic"]}
    assert (await post(gateway.base_url + "/completions", legacy))[0] == 400
    assert (
        await post(gateway.base_url + "/embeddings", {"model": "mock-embed", "input": "forbidden topic"})
    )[0] == 400
    assert mock.requests == []


async def test_model_allowlist_and_max_tokens_cap(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(POLICY, ENV)
    url = gateway.base_url + "/chat/completions"
    status, body = await post(url, {**chat(), "model": "gpt-4o"})
    assert (status, orjson.loads(body)["error"]["code"]) == (403, "model_not_allowed")
    assert "apps.default.models" in orjson.loads(body)["error"]["message"]
    for param in ("max_tokens", "max_completion_tokens"):
        status, body = await post(url, chat(**{param: 101}))
        error = orjson.loads(body)["error"]
        assert (status, error["code"], error["param"]) == (400, "max_tokens_exceeded", param)
        assert "apps.default.max_tokens" in error["message"]
    assert mock.requests == []
    assert (await post(url, chat(max_tokens=100)))[0] == 200


async def test_guard_redacts_non_streamed_answer(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(POLICY, ENV)
    direct = orjson.loads((await post(mock.url + "/v1/chat/completions", chat()))[1])
    assert PHRASE in direct["choices"][0]["message"]["content"]
    _, body = await post(gateway.base_url + "/chat/completions", chat())
    answer = orjson.loads(body)
    assert answer["choices"][0]["message"]["content"] == f"echo: the code {REDACTED} {REDACTED} sit"
    assert answer["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


async def test_guard_catches_a_phrase_split_across_stream_chunks(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(POLICY, ENV)
    # Each content event arrives on its own, 300 ms after the first one.
    headers = {"X-Mock-Chunk-Gaps": "0,300,20,20,20"}
    direct = await raw_events(mock.url + "/v1/chat/completions", chat(stream=True), headers)
    pieces = [
        c["choices"][0]["delta"].get("content") or "" for c in sse_payloads(b"".join(b for _, b in direct))
    ]
    assert PHRASE in "".join(pieces) and not any(PHRASE in piece for piece in pieces)

    proxied = await raw_events(gateway.base_url + "/chat/completions", chat(stream=True), headers)
    raw = b"".join(chunk for _, chunk in proxied)
    text = assemble_stream(raw)["choices"][0]["message"]["content"]
    assert text == f"echo: the code {REDACTED} {REDACTED} sit"
    assert raw.endswith(b"data: [DONE]\n\n")
    # Only the longest phrase minus one characters wait: "echo" of "echo: the code word" went out at once.
    first_text = next(t for t, chunk in proxied if b'"content":"echo' in chunk)
    assert proxied[-1][0] - first_text >= 0.25

    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    stream = await client.chat.completions.create(**chat(stream=True))  # type: ignore[call-overload]
    sdk_text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert sdk_text == text


async def test_guard_on_anthropic_stream_and_system_prompt(mock, start_gateway: GatewayFactory) -> None:
    config = POLICY + f'[targets.claude]\nbase_url = "{mock.url}"\nkind = "anthropic"\n'
    gateway = await start_gateway(config, ENV)
    body = {
        "model": "mock-claude",
        "max_tokens": 50,
        "stream": True,
        "system": "client",
        "messages": chat()["messages"],
    }
    events = await raw_events(gateway.url + "/claude/v1/messages", body, {"X-Mock-Chunk-Gap-Ms": "5"})
    blocks = assemble_stream(b"".join(chunk for _, chunk in events))["content"]
    assert blocks[0]["text"] == f"echo: the code {REDACTED} {REDACTED} sit"
    assert mock.requests[-1].json()["system"] == "You are the billing assistant.\n\nclient"


# --- the guard alone, event by event -----------------------------------------------------------


def openai_events(pieces: list[str], finish: bool = True) -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces
    ]
    if finish:
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + ([b"data: [DONE]\n\n"] if finish else [])


def completion_events(pieces: list[str]) -> list[bytes]:
    choices = [{"index": 0, "text": p, "finish_reason": None} for p in pieces]
    choices.append({"index": 0, "text": "", "finish_reason": "stop"})
    return [b"data: " + orjson.dumps({"id": "c", "choices": [c]}) + b"\n\n" for c in choices]


def anthropic_events(pieces: list[str]) -> list[bytes]:
    deltas = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
        for p in pieces
    ]
    return [b"event: " + d["type"].encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n" for d in deltas] + [
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    ]


def guard(*phrases: str) -> OutputGuard:
    ordered = sorted(phrases, key=len, reverse=True)
    return OutputGuard(re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE), len(ordered[0]) - 1)


def run(g: OutputGuard, events: list[bytes], split: int | None = None) -> bytes:
    """Feed events one by one, or as one byte stream cut every `split` bytes."""
    if split is not None:
        data = b"".join(events)
        events = [data[i : i + split] for i in range(0, len(data), split)]
    return b"".join(g.feed(e) for e in events) + g.flush()


def text_of(raw: bytes) -> str:
    assembled = assemble_stream(raw)
    if "content" in assembled:
        return "".join(block["text"] for block in assembled["content"])
    choice = assembled["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content", ""))


GUARD_CASES = [
    ("split across two", ["the secr", "et plan"], ["secret"], "the [redacted] plan"),
    ("split across four", ["to", "p se", "cr", "et!"], ["top secret"], "[redacted]!"),
    ("case-insensitive", ["A Top SECRET"], ["top secret"], "A [redacted]"),
    ("repeated", ["xsecretsecr", "etx"], ["secret"], "x[redacted][redacted]x"),
    ("two phrases, longest wins", ["secret plan b"], ["secret", "secret plan"], "[redacted] b"),
    ("nothing guarded", ["plain ", "text"], ["secret"], "plain text"),
    ("phrase at the very end", ["ends with sec", "ret"], ["secret"], "ends with [redacted]"),
]


@pytest.mark.parametrize("shape", [openai_events, completion_events, anthropic_events])
@pytest.mark.parametrize("split", [None, 7])
@pytest.mark.parametrize(
    "pieces, phrases, want", [c[1:] for c in GUARD_CASES], ids=[c[0] for c in GUARD_CASES]
)
def test_guard_stream_table(
    shape, split: int | None, pieces: list[str], phrases: list[str], want: str
) -> None:
    raw = run(guard(*phrases), shape(pieces), split)
    assert text_of(raw) == want
    for payload in sse_payloads(raw):  # every event the client gets is still valid JSON
        assert isinstance(payload, dict)


def test_guard_holds_back_only_the_longest_phrase_minus_one() -> None:
    g = guard("secret", "top secret plan")  # longest is 15 characters: 14 wait
    sent = ""
    for i, event in enumerate(openai_events(["a" * 20, "b" * 3, "c" * 30], finish=False)):
        sent += text_of(g.feed(event))
        fed = [20, 23, 53][i]
        assert sent == ("a" * 20 + "b" * 3 + "c" * 30)[: fed - 14]
    assert text_of(g.flush()) == "c" * 14  # a stream cut short still releases what was held


def test_guard_rewrites_whole_bodies_and_leaves_others_alone() -> None:
    g = guard("secret")
    body = orjson.dumps({"choices": [{"message": {"content": "my SECRET"}}, {"text": "secret x"}]})
    answer = orjson.loads(g.whole(body))
    assert answer["choices"][0]["message"]["content"] == "my [redacted]"
    assert answer["choices"][1]["text"] == "[redacted] x"
    anthropic = orjson.loads(g.whole(orjson.dumps({"content": [{"type": "text", "text": "a secret"}]})))
    assert anthropic["content"][0]["text"] == "a [redacted]"
    untouched = orjson.dumps({"choices": [{"message": {"content": "fine"}}]})
    assert g.whole(untouched) is untouched
    assert g.whole(b"not json") == b"not json"
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    assert guard("secret").feed(usage) == usage  # events without text pass byte for byte
