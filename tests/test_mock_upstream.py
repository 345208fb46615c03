"""The mock provider speaks OpenAI's (and Anthropic's) wire formats and obeys its per-request controls."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from bench.mock_upstream import MockUpstream

ROOT = Path(__file__).resolve().parent.parent
USER: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello nonce-1"}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as mock:
        yield mock


@pytest.fixture
async def client(upstream: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


async def poll(predicate: Callable[[], Any], timeout: float = 2.0) -> Any:
    """Return predicate()'s first truthy value, polling until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)
    return value


async def post(mock: MockUpstream, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any, Any]:
    """POST JSON with aiohttp; returns status, headers and the raw body bytes."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(mock.url + path, json=body, **kwargs) as response,
    ):
        return response.status, response.headers, await response.read()


async def test_chat_json_echoes_nonce_and_counts_tokens(
    upstream: MockUpstream, client: openai.AsyncOpenAI
) -> None:
    reply = await client.chat.completions.create(model="mock-model", messages=USER)
    assert (
        reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "mock-model"
    )
    content = reply.choices[0].message.content or ""
    assert content.startswith("echo: hello nonce-1") and reply.choices[0].finish_reason == "stop"
    assert len(content.split()) == 3 + 4  # the echo chunk, then four filler words
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 5, 9)
    _, _, raw = await post(upstream, "/v1/chat/completions", {"model": "m", "messages": USER})
    body = orjson.loads(raw)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert (
        upstream.requests[0].json()["messages"] == USER
        and upstream.requests[0].path == "/v1/chat/completions"
    )


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_usage_chunk_only_when_asked(
    client: openai.AsyncOpenAI, include_usage: bool
) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=USER,
        stream=True,
        stream_options=options,
        extra_headers={"X-Mock-Chunks": "3"},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas[0] == "echo: hello nonce-1" and len(deltas) == 3
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and not any(reasons[:-1])
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    else:
        assert with_usage == [] and all(c.choices for c in chunks)


async def test_completions_json_and_stream(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="mock-model", prompt="say nonce-7")
    assert reply.object == "text_completion" and reply.choices[0].text.startswith("echo: say nonce-7")
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 5)
    stream = await client.completions.create(
        model="mock-model", prompt="say nonce-8", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text.replace("7", "8")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


async def test_embeddings_are_deterministic_and_sized(client: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise; floats must decode to the same vector.
    default = await client.embeddings.create(model="mock-embed", input=["one two", "three"])
    floats = await client.embeddings.create(
        model="mock-embed", input=["one two", "three"], encoding_format="float"
    )
    assert [len(d.embedding) for d in default.data] == [8, 8]
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert default.data[0].embedding != default.data[1].embedding and default.usage.prompt_tokens == 3
    wide = await client.embeddings.create(model="mock-embed", input="one two", dimensions=32)
    assert len(wide.data[0].embedding) == 32
    assert wide.data[0].embedding[:8] == pytest.approx(floats.data[0].embedding, abs=1e-6)


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert "mock-model" in [m.id for m in models.data] and all(m.object == "model" for m in models.data)


async def test_tool_calls_json_and_streamed_arguments(client: openai.AsyncOpenAI) -> None:
    tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reply = await client.chat.completions.create(model="mock-tool", messages=USER, tools=tools)
    call = (reply.choices[0].message.tool_calls or [])[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments)["echo"] == "hello nonce-1"  # type: ignore[union-attr]
    stream = await client.chat.completions.create(
        model="mock-tool",
        messages=USER,
        tools=tools,
        stream=True,
    )
    pieces, reasons = [], []
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            pieces.append(delta.function.arguments or "")  # type: ignore[union-attr]
        reasons.append(chunk.choices[0].finish_reason)
    assert len([p for p in pieces if p]) > 2 and reasons[-1] == "tool_calls"
    assert orjson.loads("".join(pieces)) == orjson.loads(call.function.arguments)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "model, headers, error",
    [
        ("mock-model", {"X-Mock-Status": "429", "X-Mock-Retry-After": "7"}, openai.RateLimitError),
        ("mock-error-429-retryafter-7", {}, openai.RateLimitError),
        ("mock-error-503", {}, openai.InternalServerError),
        ("mock-model", {"X-Mock-Status": "400"}, openai.BadRequestError),
    ],
)
async def test_injected_errors_in_openai_shape(
    upstream: MockUpstream,
    client: openai.AsyncOpenAI,
    model: str,
    headers: dict[str, str],
    error: type[openai.APIStatusError],
) -> None:
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model=model, messages=USER, extra_headers=headers)
    retry_after = caught.value.response.headers.get("retry-after")
    assert retry_after == ("7" if caught.value.status_code == 429 else None)
    status, _, raw = await post(
        upstream, "/v1/chat/completions", {"model": model, "messages": USER}, headers=headers
    )
    assert status == caught.value.status_code and set(orjson.loads(raw)["error"]) == ERROR_KEYS


async def test_fail_first_counts_per_key(upstream: MockUpstream) -> None:
    def headers(key: str) -> dict[str, str]:
        return {"X-Mock-Fail-First": "2", "X-Mock-Fail-Key": key, "X-Mock-Status": "503"}

    body = {"model": "mock-model", "messages": USER}
    statuses = [
        (await post(upstream, "/v1/chat/completions", body, headers=headers("a")))[0] for _ in range(4)
    ]
    assert statuses == [503, 503, 200, 200]
    assert (await post(upstream, "/v1/chat/completions", body, headers=headers("b")))[0] == 503
    upstream.reset()
    assert (await post(upstream, "/v1/chat/completions", body, headers=headers("a")))[0] == 503


@pytest.mark.parametrize(
    "model, headers", [("mock-model", {"X-Mock-Delay-Ms": "250"}), ("mock-slow-250", {})]
)
async def test_delay_before_headers(upstream: MockUpstream, model: str, headers: dict[str, str]) -> None:
    started = time.monotonic()
    status, _, _ = await post(
        upstream, "/v1/chat/completions", {"model": model, "messages": USER}, headers=headers
    )
    assert status == 200 and time.monotonic() - started >= 0.25


async def test_chunk_gaps_pace_the_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=USER,
        stream=True,
        extra_headers={"X-Mock-Chunks": "4", "X-Mock-Chunk-Gaps": "0,300,0", "X-Mock-Chunk-Gap-Ms": "60"},
    )
    arrivals = [
        time.monotonic() async for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(arrivals) == 4 and gaps[0] >= 0.29 and gaps[1] < 0.05 and gaps[2] >= 0.055


async def test_fail_after_resets_the_stream(upstream: MockUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=USER,
        stream=True,
        extra_headers={"X-Mock-Chunks": "10", "X-Mock-Fail-After": "2"},
    )
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        async for chunk in stream:
            received.extend(c.delta.content for c in chunk.choices if c.delta.content)
    causes, error = [], caught.value.__cause__
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    # A reset, not a clean close: the SDK reports a read error rooted in ConnectionResetError.
    assert len(received) == 2 and any(isinstance(cause, ConnectionResetError) for cause in causes), causes
    await asyncio.sleep(0.05)  # a reset the mock did itself is not a client cancellation
    assert upstream.cancellations == []


async def test_client_closing_mid_stream_is_recorded_promptly(
    upstream: MockUpstream, client: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "nonce-cancel-1"}]
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=messages,
        stream=True,
        extra_headers={"X-Mock-Chunks": "50", "X-Mock-Chunk-Gap-Ms": "50"},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    closed = time.monotonic()
    cancellations = await poll(lambda: upstream.cancellations)
    assert cancellations[0].nonce == "nonce-cancel-1" and cancellations[0].path == "/v1/chat/completions"
    assert cancellations[0].at - closed < 0.1


async def test_client_giving_up_during_delay_is_recorded(upstream: MockUpstream) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    body = {"model": "mock-slow-5000", "messages": [{"role": "user", "content": "nonce-delay"}]}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(upstream.url + "/v1/chat/completions", json=body)
        gave_up = time.monotonic()
    cancellations = await poll(lambda: upstream.cancellations)
    assert cancellations[0].nonce == "nonce-delay" and cancellations[0].at - gave_up < 0.1


async def test_hang_after_stays_open_until_the_client_leaves_and_stop_is_quick() -> None:
    mock = MockUpstream()
    await mock.start()

    async def hanging(session: aiohttp.ClientSession, nonce: str) -> aiohttp.ClientResponse:
        body = {"model": "mock-model", "messages": [{"role": "user", "content": nonce}], "stream": True}
        response = await session.post(
            mock.url + "/v1/chat/completions", json=body, headers={"X-Mock-Hang-After": "1"}
        )
        seen = b""
        while b"echo: " + nonce.encode() not in seen:
            seen += await response.content.readany()
        return response

    async with aiohttp.ClientSession() as session:
        idle, kept = await hanging(session, "nonce-idle"), await hanging(session, "nonce-kept")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(idle.content.readany(), 0.3)
        assert not idle.content.at_eof() and mock.cancellations == []
        idle.close()  # what an idle timeout in front of the mock does
        assert (await poll(lambda: mock.cancellations))[0].nonce == "nonce-idle"
        started = time.monotonic()
        await mock.stop()  # `kept` is still hanging; stopping must neither wait for it nor count it
        assert time.monotonic() - started < 1.0 and len(mock.cancellations) == 1
        kept.close()


async def test_multipart_parts_are_hashed(upstream: MockUpstream, client: openai.AsyncOpenAI) -> None:
    data = os.urandom(3 * 2**20)
    reply = await client.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch")
    parts = {part["name"]: part for part in (reply.model_extra or {})["parts"]}
    assert parts["file"] == {
        "name": "file",
        "filename": "batch.jsonl",
        "content_type": "application/jsonl",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert parts["purpose"]["size"] == 5 and reply.bytes == len(data) and reply.purpose == "batch"
    audio = bytes(range(256)) * 100
    text = await client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", audio), prompt="nonce-9"
    )
    assert text.text == "echo: nonce-9"
    assert {p["name"]: p["sha256"] for p in (text.model_extra or {})["parts"]}["file"] == hashlib.sha256(
        audio
    ).hexdigest()
    assert upstream.requests[-1].headers["Content-Type"].startswith("multipart/form-data")


async def test_anthropic_messages_json_and_events(upstream: MockUpstream) -> None:
    body = {
        "model": "mock-claude",
        "max_tokens": 50,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi nonce-3"}]}],
    }
    status, _, raw = await post(upstream, "/v1/messages", body, headers={"X-Mock-Chunks": "2"})
    message = orjson.loads(raw)
    assert status == 200 and message["type"] == "message" and message["stop_reason"] == "end_turn"
    assert message["content"] == [{"type": "text", "text": "echo: hi nonce-3 lorem"}]
    assert message["usage"] == {"input_tokens": 4, "output_tokens": 2}
    status, headers, raw = await post(
        upstream, "/v1/messages", {**body, "stream": True}, headers={"X-Mock-Chunks": "2"}
    )
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [block.split("\n") for block in raw.decode().strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [orjson.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert all(data["type"] == name for data, name in zip(datas, names))
    assert "".join(d["delta"]["text"] for d in datas[3:5]) == message["content"][0]["text"]
    status, _, raw = await post(upstream, "/v1/messages", body, headers={"X-Mock-Status": "529"})
    assert status == 529 and orjson.loads(raw) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "mock: injected status 529"},
    }


async def test_echo_garbage_404_and_bad_control(upstream: MockUpstream) -> None:
    body = {"model": "mock-model", "messages": USER}
    _, _, raw = await post(
        upstream, "/v1/chat/completions?a=1", body, headers={"X-Mock-Echo": "1", "X-Trace": "t1"}
    )
    echo = orjson.loads(raw)["mock_echo"]
    assert echo["method"] == "POST" and echo["path"] == "/v1/chat/completions" and echo["query"] == {"a": "1"}
    assert echo["headers"]["X-Trace"] == "t1" and orjson.loads(echo["body"]) == body
    status, _, raw = await post(upstream, "/v1/chat/completions", body, headers={"X-Mock-Garbage": "1"})
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    _, _, raw = await post(
        upstream, "/v1/chat/completions", {**body, "model": "mock-garbage", "stream": True}
    )
    assert any(line and not line.startswith(b"data: ") for line in raw.split(b"\n"))
    status, _, raw = await post(upstream, "/v1/nope", body)
    assert status == 404 and set(orjson.loads(raw)["error"]) == ERROR_KEYS
    status, _, raw = await post(upstream, "/v1/chat/completions", body, headers={"X-Mock-Chunks": "many"})
    assert status == 400 and "X-Mock-Chunks" in orjson.loads(raw)["error"]["message"]
    status, _, raw = await post(upstream, "/v1/chat/completions", data=b"{not json")
    assert status == 400 and upstream.requests[-1].body == b"{not json"


async def test_http_stats_and_reset(upstream: MockUpstream, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="mock-model", messages=USER)
    await client.models.list()
    async with aiohttp.ClientSession() as session:
        async with session.get(upstream.url + "/_mock/stats") as response:
            stats = await response.json()
        assert stats["requests"] == 2 and stats["by_path"] == {"/v1/chat/completions": 1, "/v1/models": 1}
        async with session.post(upstream.url + "/_mock/reset") as response:
            assert response.status == 200
        async with session.get(upstream.url + "/_mock/stats") as response:
            assert (await response.json())["requests"] == 0
    assert upstream.requests == []


async def test_cli_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.mock_upstream",
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
