"""The streaming core, end to end: the official SDK, raw sockets and the mock provider."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import socket
import time
import uuid

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import GatewayFactory, RunningGateway, wait_until

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello nonce-42"}]}


def clients(base_url: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    return (
        openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0),
        openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0),
    )


def without_ids(value: dict) -> dict:
    """Responses differ only in the mock's per-response id and timestamp."""
    return {k: v for k, v in value.items() if k not in ("id", "created")}


async def test_sdk_non_streaming_matches_direct(mock, gateway: RunningGateway) -> None:
    _, direct = clients(mock.url + "/v1")
    _, proxied = clients(gateway.base_url)
    want = await direct.chat.completions.create(**CHAT)
    got = await proxied.chat.completions.create(**CHAT)
    assert without_ids(got.model_dump()) == without_ids(want.model_dump())
    assert "nonce-42" in got.choices[0].message.content
    embed = await proxied.embeddings.create(model="mock-embed", input="abc")
    assert embed.data[0].embedding == (await direct.embeddings.create(model="mock-embed", input="abc")).data[0].embedding
    completion = await proxied.completions.create(model="mock-gpt", prompt="say nonce-7")
    assert "nonce-7" in completion.choices[0].text
    models = await proxied.models.list()
    assert [m.id for m in models.data] == [m.id for m in (await direct.models.list()).data]


async def test_sdk_sync_streaming_matches_direct(mock, gateway: RunningGateway) -> None:
    # The sync client runs in a thread: the servers live on this test's event loop.
    await asyncio.to_thread(sync_streaming_matches_direct, mock.url, gateway.base_url)


def sync_streaming_matches_direct(mock_url: str, base_url: str) -> None:
    direct, _ = clients(mock_url + "/v1")
    proxied, _ = clients(base_url)

    def text(client: openai.OpenAI, **extra) -> tuple[str, list]:
        stream = client.chat.completions.create(**CHAT, stream=True, **extra)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), [c.usage for c in chunks]

    want_text, want_usage = text(direct)
    got_text, got_usage = text(proxied)
    assert got_text == want_text and "nonce-42" in got_text
    # The gateway asked for usage itself; the client that did not must not see it.
    assert got_usage == want_usage and all(u is None for u in got_usage)
    _, with_usage = text(proxied, stream_options={"include_usage": True})
    assert with_usage[-1] is not None and with_usage[-1].completion_tokens > 0


async def test_async_streaming_and_tool_calls(mock, gateway: RunningGateway) -> None:
    _, proxied = clients(gateway.base_url)
    stream = await proxied.chat.completions.create(
        model="mock-tool",
        messages=CHAT["messages"],
        stream=True,
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    )
    arguments = ""
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += call.function.arguments or ""
    assert isinstance(orjson.loads(arguments), dict)


async def raw_stream(url: str, body: dict, headers: dict | None = None) -> list[tuple[float, bytes]]:
    """Read an SSE response as (arrival time, bytes) pairs, exactly as the socket delivered them."""
    arrivals = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(url + "/chat/completions", json=body, headers=headers or {}) as response,
    ):
        assert response.status == 200
        async for chunk in response.content.iter_any():
            arrivals.append((time.perf_counter(), chunk))
    return arrivals


async def test_sse_bytes_identical_and_timing_preserved(mock, gateway: RunningGateway) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Mock-Chunks": "4", "X-Mock-Chunk-Gaps": "0,200,200,200"}
    direct = await raw_stream(mock.url + "/v1", body, headers)
    proxied = await raw_stream(gateway.base_url, body, headers)

    def normalise(data: bytes) -> bytes:  # the mock stamps each response with its own id/time
        return b"".join(
            orjson.dumps({k: v for k, v in orjson.loads(line[6:]).items() if k not in ("id", "created")})
            if line.startswith(b"data: {")
            else line
            for line in data.split(b"\n")
        )

    assert normalise(b"".join(c for _, c in proxied)) == normalise(b"".join(c for _, c in direct))
    # Each chunk held 200 ms upstream arrives 200 ms after the one before it, not batched with the next.
    delayed = [later for earlier, later in itertools.pairwise(proxied) if later[0] - earlier[0] >= 0.19]
    assert len(delayed) == 3
    assert all(chunk.count(b"data: ") == 1 for _, chunk in delayed[:-1])


async def test_client_disconnect_cancels_upstream(mock, gateway: RunningGateway) -> None:
    body = {**CHAT, "stream": True}
    headers = {"X-Mock-Chunks": "50", "X-Mock-Chunk-Gap-Ms": "100"}
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.base_url + "/chat/completions", json=body, headers=headers)
        await response.content.readany()
        closed_at = time.perf_counter()
        response.close()
    cancellation = await wait_until(lambda: mock.cancellations, timeout=2)
    assert cancellation[0].at - closed_at < 0.1


@pytest.mark.parametrize(
    "header, value",
    [
        ("Helicone-Omit-Request", "maybe"),
        ("Helicone-Request-Id", "not-a-uuid"),
        ("Helicone-Cache-Enabled", "yes please"),
        ("Helicone-Retry-Num", "-1"),
        ("Helicone-RateLimit-Policy", "10;w=abc"),
        ("Helicone-Fallbacks", "[1, 2]"),
        ("Helicone-Target-URL", "ftp://example"),
    ],
)
async def test_bad_header_is_400_naming_it(gateway: RunningGateway, header: str, value: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/chat/completions", json=CHAT, headers={header: value}) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
        assert header in error["message"] and error["param"] == header
        assert response.headers["Helicone-Id"]


async def test_refusals_in_provider_shape(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway("[server]\nmax_body_bytes = 1000\n")
    async with aiohttp.ClientSession() as session:
        async def post(path: str, **kwargs) -> tuple[int, dict]:
            async with session.post(gateway.url + path, **kwargs) as response:
                return response.status, await response.json()

        status, body = await post("/v1/chat/completions", data=b"x" * 5000)
        assert status == 413 and "1000" in body["error"]["message"]
        status, body = await post("/nosuch/v1/chat/completions", json=CHAT)
        assert status == 400 and "nosuch" in body["error"]["message"]
        status, body = await post(
            "/v1/chat/completions", json=CHAT, headers={"Helicone-Target-URL": "http://169.254.169.254"}
        )
        assert status == 400 and body["error"]["param"] == "Helicone-Target-URL"
        # Invalid JSON passes to the provider, whose error is the truth.
        status, body = await post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        assert status == 400 and mock.requests[-1].body == b"{not json"
    assert len(mock.requests) == 1


async def test_target_url_allowlisted_host_is_proxied(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(f'target_url_allowlist = ["127.0.0.1:{mock.url.rsplit(":", 1)[1]}"]\n', upstream="http://127.0.0.1:9")
    _, client = clients(gateway.base_url)
    reply = await client.chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"Helicone-Target-URL": mock.url}
    )
    assert reply.http_response.status_code == 200 and "nonce-42" in reply.parse().choices[0].message.content


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_upstream_down_is_502_and_timeout_504(mock, start_gateway: GatewayFactory) -> None:
    down = await start_gateway(upstream=f"http://127.0.0.1:{free_port()}")
    slow = await start_gateway("[timeouts]\nfirst_byte = 0.3\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(down.base_url + "/chat/completions", json=CHAT) as response:
            assert response.status == 502
            assert (await response.json())["error"]["code"] == "upstream_unreachable"
        started = time.perf_counter()
        async with session.post(slow.base_url + "/chat/completions", json=CHAT, headers={"X-Mock-Delay-Ms": "3000"}) as response:
            assert response.status == 504
            assert (await response.json())["error"]["code"] == "upstream_timeout"
        assert time.perf_counter() - started < 2


async def test_the_wait_for_the_head_ends_at_the_shorter_of_first_byte_and_idle(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits: list[float | None] = []
    timeout = asyncio.timeout

    def counting(delay: float | None) -> asyncio.Timeout:
        limits.append(delay)
        return timeout(delay)

    monkeypatch.setattr(asyncio, "timeout", counting)
    idle_first = await start_gateway("[timeouts]\nfirst_byte = 5\nidle = 0.3\n")
    first_byte_first = await start_gateway("[timeouts]\nfirst_byte = 0.3\nidle = 5\n")
    async with aiohttp.ClientSession() as session:
        for gateway, first_byte, own_timer in ((idle_first, 5, False), (first_byte_first, 0.3, True)):
            limits.clear()
            started = time.perf_counter()
            async with session.post(
                gateway.base_url + "/chat/completions", json=CHAT, headers={"X-Mock-Delay-Ms": "3000"}
            ) as response:
                error = (await response.json())["error"]
            assert response.status == 504 and error["code"] == "upstream_timeout"
            assert "no response within 0.3s" in error["message"]
            assert 0.3 <= time.perf_counter() - started < 2
            # aiohttp's read timer (idle) already bounds the head: a timer of the gateway's own only
            # for a shorter first_byte.
            assert (first_byte in limits) is own_timer, limits


async def test_mid_stream_failure_ends_with_error_event(gateway: RunningGateway) -> None:
    arrivals = await raw_stream(gateway.base_url, {**CHAT, "stream": True}, {"X-Mock-Chunks": "10", "X-Mock-Fail-After": "2"})
    text = b"".join(c for _, c in arrivals)
    last = [line for line in text.split(b"\n") if line.startswith(b"data: ")][-1]
    assert orjson.loads(last[6:])["error"]["code"] == "upstream_stream_error"


async def test_multipart_arrives_intact_and_headers_are_stripped(mock, gateway: RunningGateway) -> None:
    audio = bytes(range(256)) * 400
    form = aiohttp.FormData()
    form.add_field("file", audio, filename="clip.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    headers = {
        "Helicone-User-Id": "alice",
        "Helicone-Property-Team": "search",
        "Connection": "keep-alive, X-Hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic secret",
        "TE": "trailers",
        "X-App-Header": "kept",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/audio/transcriptions", data=form, headers=headers) as response,
    ):
        assert response.status == 200
        parts = {part["name"]: part for part in (await response.json())["parts"]}
    assert parts["file"]["sha256"] == hashlib.sha256(audio).hexdigest()
    received = {k.lower() for k in mock.requests[-1].headers}
    assert "x-app-header" in received
    assert not received & {"helicone-user-id", "helicone-property-team", "keep-alive", "proxy-authorization", "te"}


async def test_provider_key_injected_and_client_key_passes_otherwise(mock, start_gateway: GatewayFactory) -> None:
    injecting = await start_gateway('[targets.openai]\napi_key = "sk-gateway"\n')
    passing = await start_gateway()
    for gateway, expected in ((injecting, "Bearer sk-gateway"), (passing, "Bearer sk-client")):
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client", max_retries=0)
        await client.chat.completions.create(**CHAT)
        assert mock.requests[-1].headers["Authorization"] == expected


async def test_every_response_has_helicone_id_and_health(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        given = []
        for _ in range(2):
            async with session.post(gateway.base_url + "/chat/completions", json=CHAT) as response:
                given.append(response.headers["Helicone-Id"])
        # The gateway's own ids: random (version 4) UUIDs in their canonical form, one per request.
        assert [str(uuid.UUID(request_id, version=4)) for request_id in given] == given
        assert given[0] != given[1]
        async with session.get(gateway.url + "/healthz") as response:
            assert response.status == 200
        async with session.get(gateway.url + "/readyz") as response:
            assert response.status == 200
        request_id = "0b7b3a0e-8c53-4a55-9d43-3f1d4f7f8a11"
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT, headers={"Helicone-Request-Id": request_id}) as response:
            assert response.headers["Helicone-Id"] == request_id


async def test_unknown_path_under_v1_is_forwarded(mock, gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(gateway.base_url + "/nonexistent") as response:
        assert response.status == 404
    assert mock.requests[-1].path == "/v1/nonexistent"


async def test_overhead_header_excludes_upstream_time(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        for body, delay in ((CHAT, "150"), ({**CHAT, "stream": True}, "150")):
            started = time.perf_counter()
            async with session.post(
                gateway.base_url + "/chat/completions", json=body, headers={"X-Mock-Delay-Ms": delay}
            ) as response:
                await response.read()
            total_ms = (time.perf_counter() - started) * 1000
            overhead = float(response.headers["Edgeproxy-Overhead-Ms"])
            # The upstream's 150 ms are not the gateway's: what remains is small and below the total.
            assert 0 <= overhead < total_ms - 140
        async with session.get(gateway.url + "/metrics") as response:
            counts = [
                float(line.rsplit(" ", 1)[1])
                for line in (await response.text()).splitlines()
                if line.startswith("edgeproxy_gateway_overhead_seconds_count")
            ]
    assert sum(counts) == 2


async def test_upstream_cookies_reach_their_client_and_never_a_later_request(mock, start_gateway: GatewayFactory) -> None:
    # A hostname, not an IP: a cookie jar keeps cookies only from named hosts.
    gateway = await start_gateway(upstream=mock.url.replace("127.0.0.1", "localhost"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        headers = {"X-Mock-Set-Cookie": "session=alice-secret; Path=/"}
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Set-Cookie"] == "session=alice-secret; Path=/"
        async with session.post(gateway.base_url + "/chat/completions", json=CHAT) as response:
            assert response.status == 200
    # The gateway's upstream session is shared by every tenant: it must not replay one's cookie for another.
    assert "Cookie" not in mock.requests[-1].headers


async def test_without_a_log_the_metrics_still_count_tokens_cost_and_timings(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, {**CHAT, "stream": True}):
            async with session.post(gateway.base_url + "/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()
        async with session.get(gateway.url + "/metrics") as response:
            families = text_string_to_metric_families(await response.text())
    found: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    assert found["edgeproxy_requests_total"] == 2
    assert found["edgeproxy_prompt_tokens_total"] > 0 and found["edgeproxy_completion_tokens_total"] > 0
    assert found["edgeproxy_cost_usd_total"] > 0  # mock-* has a (made-up) price
    for timing in ("time_to_first_byte", "upstream_duration", "gateway_overhead", "request_duration"):
        assert found[f"edgeproxy_{timing}_seconds_count"] == 2, timing
    assert found["edgeproxy_requests_in_flight"] == 0
