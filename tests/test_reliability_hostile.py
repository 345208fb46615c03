"""Hostile input: whatever a client sends, the answer is a 2xx or 4xx, in time, and the gateway lives on.

Property-based (hypothesis) over every header the gateway parses, over paths and over bodies:
first at the parsers (`parse_options`, `resolve_route`) for many examples, then through a live
gateway (raw sockets, so nothing is cleaned up on the way), whose log must hold one row for each
request its handler saw. Then the named attacks: oversized bodies and heads, CR/LF injection,
path traversal out of a target's base path, `Helicone-Target-URL` to internal addresses, and the
JWT cases `test_auth.py` does not already cover. The `slow` variants run the same properties
over many more examples (`make reliability`).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import string
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

# Imported before any thread: clickhouse-connect's writer thread imports numpy lazily, and
# hypothesis, in its own thread, could otherwise meet it half-initialised.
import numpy  # noqa: F401
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from edgeproxy.app import LOG_BATCHER, LOG_STORE
from edgeproxy.errors import GatewayError
from edgeproxy.options import parse_options
from edgeproxy.settings_loader import load_settings
from edgeproxy.targets import resolve_route, upstream_url

from .conftest import GatewayFactory, RunningGateway, wait_until
from .reliability_tools import RawReply, logged_rows, raw_exchange, raw_exchange_sync, request_bytes
from .test_auth import b64, hand_signed, valid_claims

SECRET = "hostile-secret-" + "h" * 40
ALLOWED_HOST = "allowed.example"
# The mock's model-name controls (errors, delays, resets) must not be hit by chance.
MOCK_CONTROL = re.compile(r"(error|retryafter|failfirst|slow|gap|failafter|hangafter|garbage)", re.IGNORECASE)
INTERNAL_HOSTS = (
    "127.0.0.1", "localhost", "localhost.", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "0.0.0.0",
    "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254", "metadata.google.internal", "metadata",
    "127.0.0.1.nip.io", "localtest.me", "10.0.0.1", "192.168.0.1",
)  # fmt: skip

# --- strategies ------------------------------------------------------------------------------------

# What aiohttp hands the handler: header bytes decoded as UTF-8 with surrogateescape.
wire_text = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
any_text = st.one_of(st.text(max_size=40), wire_text, st.text(min_size=500, max_size=700))
bools = st.sampled_from(["true", "false", "1", "0", "", "TRUE", " yes", "maybe", "tru\u0435"])
numbers = st.one_of(
    st.integers(-(10**6), 10**13).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e3", "0x10", " 3 ", "\u0663", "nan", "-0", "1_000", "9" * 400, ""]),
)
ports = st.sampled_from(["", ":80", ":443", ":9", ":99999", ":abc", ":-1", ":0", ":00", ":6379", ":", ":+80"])
schemes = st.sampled_from(["http", "https", "HTTP", "ftp", "file", "gopher", ""])
hosts = st.one_of(
    st.sampled_from((ALLOWED_HOST, ALLOWED_HOST.upper(), ALLOWED_HOST + ".", *INTERNAL_HOSTS)), any_text
)
separators = st.sampled_from(["", "@", "\\@", "#@", "?@", ";@", "%40", "%2f@", "\\", "/", "\t", " "])


@st.composite
def target_urls(draw: st.DrawFn) -> str:
    """URLs built to make parsers disagree: user info, backslashes, odd ports, internal names."""
    first = draw(hosts) + draw(ports)
    second = draw(st.sampled_from(["", "", draw(hosts) + draw(ports)]))
    rest = draw(separators) + second if second else ""
    path = draw(st.sampled_from(["", "/", "/v1", "/a/../..", "/%2e%2e/", "?x=1", "#frag"]))
    return f"{draw(schemes)}://{first}{rest}{path}"


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=12),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )


JSON_VALUES = _json_values()


rate_limit_policies = st.one_of(
    any_text,
    st.builds(
        lambda q, w, u, s, extra: f"{q};w={w};u={u};s={s}{extra}",
        numbers,
        numbers,
        st.sampled_from(["request", "cents", "tokens", "bytes", ""]),
        st.one_of(st.sampled_from(["user", "app", "global", "team", "a" * 65, "../x"]), any_text),
        st.sampled_from(["", ";w=1", ";x=1", ";", ";u"]),
    ),
)
fallbacks = st.one_of(
    any_text,
    JSON_VALUES.map(lambda v: orjson.dumps(v).decode()),
    st.lists(
        st.one_of(
            st.sampled_from(["openai", "nope", "../x", "", "a" * 65]),
            st.fixed_dictionaries(
                {
                    "target": st.sampled_from(["openai", "x y", 1]),
                    "model": st.one_of(st.none(), st.text(max_size=8), st.integers(0, 9)),
                }
            ),
        ),
        max_size=10,
    ).map(lambda v: orjson.dumps(v).decode()),
)

# Every header the gateway parses (options.py, auth.py), with values near and far from valid.
PARSED_HEADERS: dict[str, st.SearchStrategy[str]] = {
    "Helicone-Request-Id": st.one_of(
        st.uuids().map(str), st.uuids().map(lambda u: "{" + u.hex + "}"), any_text
    ),
    "Helicone-User-Id": any_text,
    "Helicone-Session-Id": any_text,
    "Helicone-Session-Path": any_text,
    "Helicone-Session-Name": any_text,
    "Helicone-Target-URL": st.one_of(target_urls(), any_text),
    "Helicone-Omit-Request": bools,
    "Helicone-Omit-Response": bools,
    "Helicone-Auth": st.one_of(
        any_text, any_text.map(lambda t: "Bearer " + t), st.just("Bearer eyJ\udcff.a.b")
    ),
    "Helicone-Cache-Enabled": bools,
    "Helicone-Cache-Bucket-Max-Size": numbers,
    "Helicone-Cache-Seed": any_text,
    "Cache-Control": st.one_of(
        numbers.map(lambda n: f"max-age={n}"), any_text, st.just("no-cache, max-age=5")
    ),
    "Helicone-Retry-Enabled": bools,
    "Helicone-Retry-Num": numbers,
    "Helicone-Retry-Factor": numbers,
    "Helicone-Retry-Min-Timeout": numbers,
    "Helicone-Retry-Max-Timeout": numbers,
    "Helicone-Fallbacks": fallbacks,
    "Helicone-RateLimit-Policy": rate_limit_policies,
    "Helicone-Property-Team": any_text,
    "Helicone-Property-": any_text,
    "Authorization": st.one_of(any_text, any_text.map(lambda t: "Bearer " + t)),
    "x-api-key": any_text,
    "api-key": any_text,
}
header_sets = st.dictionaries(st.sampled_from(sorted(PARSED_HEADERS)), st.just(None), max_size=5).flatmap(
    lambda chosen: st.fixed_dictionaries({name: PARSED_HEADERS[name] for name in chosen})
)
many_properties = st.integers(0, 40).map(lambda n: {f"Helicone-Property-P{i}": "v" for i in range(n)})

# --- the parsers, many examples -------------------------------------------------------------------

ROUTE_SETTINGS = load_settings(
    None,
    env={"EDGEPROXY_TARGET_URL_ALLOWLIST": f"{ALLOWED_HOST},127.0.0.1:9"},
    flags={"upstream": "http://127.0.0.1:9/base"},
)


def check_options(headers: dict[str, str]) -> None:
    """parse_options answers every header set with options or a 400 naming the header."""
    try:
        options = parse_options(CIMultiDict(headers))
    except GatewayError as err:
        assert err.status == 400 and err.code == "invalid_header" and err.param, err.message
        err.body()  # renders
        return
    # What passed is safe below the edge: valid UTF-8 for log rows, cache keys and Redis keys.
    texts = [
        options.user_id,
        options.session_id,
        options.session_path,
        options.session_name,
        options.auth_token or "",
    ]
    texts += [*options.properties, *options.properties.values()]
    texts += [options.cache.seed] if options.cache else []
    for text in texts:
        text.encode("utf-8")
    assert options.request_id is None or str(uuid.UUID(options.request_id)) == options.request_id
    if options.target_url is not None:
        parts = urlsplit(options.target_url)
        parsed = URL(options.target_url)  # the URL the upstream client will build
        assert parsed.host == parts.hostname and parsed.explicit_port == parts.port
    if options.retry:
        assert 0 <= options.retry.retries <= 10 and 1 <= options.retry.factor <= 10
        assert 0 <= options.retry.min_timeout_ms <= options.retry.max_timeout_ms <= 600_000
    if options.rate_limit:
        assert options.rate_limit.quota >= 0 and options.rate_limit.window_seconds >= 1
        options.rate_limit.header_value().encode("ascii")  # it is sent back in a response header
    assert len(options.properties) <= 32 and len(options.fallbacks) <= 8


def check_route(path: str, target_url: str | None) -> None:
    """A route never leaves its target's host or base path, and an ad-hoc host is allowlisted."""
    try:
        if target_url is not None:  # as the gateway sees it: parsed at intake first
            target_url = parse_options({"Helicone-Target-URL": target_url}).target_url
        route = resolve_route(ROUTE_SETTINGS, path, target_url)
    except GatewayError as err:
        assert 400 <= err.status < 500, err.message
        return
    base = URL(route.target.base_url)
    url = URL(upstream_url(route.target, route.path, "", "m"))
    assert (url.host, url.port) == (base.host, base.port)
    # Under the base path's API root: the base itself when it already ends in /v1, else base + /v1.
    api_root = base.path.rstrip("/")
    if not api_root.endswith("/v1"):
        api_root += "/v1"
    assert url.path == api_root or url.path.startswith(api_root + "/"), (path, str(url))
    assert ".." not in url.path.split("/") and "." not in url.path.split("/")
    if route.ad_hoc:
        with_port = {entry for entry in ROUTE_SETTINGS.target_url_allowlist if ":" in entry}
        without = {entry for entry in ROUTE_SETTINGS.target_url_allowlist if ":" not in entry}
        default = {"http": 80, "https": 443}[url.scheme]
        assert f"{url.host}:{url.port}" in with_port or (url.port == default and url.host in without), str(
            url
        )


path_segments = st.sampled_from(
    ["v1", "v1", "openai", "chat", "completions", "..", ".", "%2e%2e", "%2E.", ".%2e", "%252e%252e", "%2f", "%5c..",
     "..\\..", "admin", "", "%ff", "%00", "a%3Fb", "~", "\u00e9"]
)  # fmt: skip
raw_paths = st.lists(path_segments, min_size=1, max_size=7).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=600, deadline=None, database=None)
@given(headers=header_sets)
def test_parse_options_answers_any_headers_with_options_or_a_400(headers: dict[str, str]) -> None:
    check_options(headers)


@settings(max_examples=50, deadline=None, database=None)
@given(headers=many_properties)
def test_property_count_is_bounded(headers: dict[str, str]) -> None:
    check_options(headers)


@settings(max_examples=600, deadline=None, database=None)
@given(path=raw_paths, target_url=st.one_of(st.none(), target_urls()))
def test_routes_stay_on_their_target_and_base_path(path: str, target_url: str | None) -> None:
    check_route(unquote(path, errors="surrogateescape"), target_url)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, database=None)
@given(headers=header_sets)
def test_parse_options_long_run(headers: dict[str, str]) -> None:
    check_options(headers)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, database=None)
@given(path=raw_paths, target_url=st.one_of(st.none(), target_urls()))
def test_routes_long_run(path: str, target_url: str | None) -> None:
    check_route(unquote(path, errors="surrogateescape"), target_url)


# --- through a live gateway -----------------------------------------------------------------------

token_chars = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_names = st.text(alphabet=token_chars, min_size=1, max_size=20).filter(
    lambda n: (
        not n.lower().startswith(("x-mock", "content-length", "transfer-encoding", "connection", "host"))
    )
)
# Header values as bytes on the wire: anything but CR, LF and NUL (which the parser refuses; see below).
wire_values = st.one_of(
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=30)
).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip())


MODEL_NAMES = st.one_of(st.just("mock-model"), st.text(max_size=20), st.integers(0, 10**6), st.none()).filter(
    lambda m: not (isinstance(m, str) and MOCK_CONTROL.search(m))
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["chat"] * 4 + ["json", "bytes", "empty"]))
    if kind == "chat":
        body: dict[str, Any] = {
            "model": draw(MODEL_NAMES),
            "messages": draw(st.one_of(st.just([{"role": "user", "content": "hi"}]), JSON_VALUES)),
        }
        body.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["stream", "max_tokens", "n", "user", "tools"]), JSON_VALUES, max_size=3
                )
            )
        )
        return orjson.dumps(body)
    if kind == "json":
        value = draw(JSON_VALUES)
        if (
            isinstance(value, dict)
            and isinstance(value.get("model"), str)
            and MOCK_CONTROL.search(value["model"])
        ):
            value["model"] = "mock-model"
        return orjson.dumps(value)
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return b""


def on_the_wire(value: str, keep_controls: bool) -> bytes:
    """A header value as bytes; control characters (which the HTTP parser refuses) mostly dropped."""
    raw = (
        value.encode("utf-8", "surrogateescape").replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    )
    return raw if keep_controls else bytes(c for c in raw if c >= 0x20 and c != 0x7F)


@st.composite
def live_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]))
    routes = ["/v1/chat/completions"] * 2 + ["/openai/v1/chat/completions", "/v1/embeddings"]
    path = draw(st.sampled_from(routes)) if draw(st.integers(0, 3)) else draw(raw_paths)
    keep_controls = draw(st.integers(0, 9)) == 0
    headers = [
        (name.encode(), on_the_wire(value, keep_controls)) for name, value in draw(header_sets).items()
    ]
    headers += [
        (n.encode(), v) for n, v in draw(st.dictionaries(header_names, wire_values, max_size=3)).items()
    ]
    content_type = draw(
        st.sampled_from([b"application/json"] * 4 + [b"text/plain", b"multipart/form-data", b"\xff"])
    )
    headers.append((b"Content-Type", content_type))
    return request_bytes(method, path.encode("utf-8", "surrogateescape"), headers, draw(bodies()))


async def live_fuzz(start_gateway: GatewayFactory, mock: Any, examples: int) -> None:
    """Send `examples` hostile requests; every answer is 2xx/4xx in time, every handled one logged once."""
    mock_netloc = URL(mock.url).raw_authority
    gateway = await start_gateway(
        # Only the mock is allowlisted: an allowlisted name would be resolved, and nothing may leave loopback.
        f'target_url_allowlist = ["{mock_netloc}"]\n[auth]\njwt_secret = "{SECRET}"\n',
        {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05", "EDGEPROXY_SERVER_MAX_BODY_BYTES": "4096"},
        logs="server",
    )
    port = URL(gateway.url).port
    assert port is not None
    # Request id → the statuses it was answered with: the fuzz names its own ids too
    # (Helicone-Request-Id), and may name one twice, each logged under it.
    handled: dict[str, set[int]] = {}
    statuses: dict[int, int] = {}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=live_requests())
    def one(data: bytes) -> None:
        reply = raw_exchange_sync(port, data, timeout=10)
        assert 200 <= reply.status < 500, f"{reply.status} for {data[:300]!r}: {reply.body[:300]!r}"
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        request_id = reply.header("Helicone-Id")
        if request_id is not None:
            handled.setdefault(request_id.decode(), set()).add(reply.status)

    # Hypothesis drives examples synchronously, so it runs in a thread beside the event loop.
    await asyncio.to_thread(one)
    store, batcher = gateway.app[LOG_STORE], gateway.app[LOG_BATCHER]

    async def all_logged() -> bool:
        return len(set(handled) & set(await logged_rows(store))) == len(handled)

    await wait_until(all_logged, timeout=20, interval=0.1)
    rows = await logged_rows(store)
    assert all(rows[i]["status"] in answered for i, answered in handled.items())
    assert batcher.stats.rows_rejected == 0 and batcher.stats.rows_dropped == 0
    await assert_alive(gateway)
    print(
        f"\nlive fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, {len(handled)} logged"
    )


async def assert_alive(gateway: RunningGateway) -> None:
    port = URL(gateway.url).port
    assert port is not None
    reply = await raw_exchange(
        port,
        request_bytes(
            "POST",
            b"/v1/chat/completions",
            [(b"Content-Type", b"application/json")],
            orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "still there?"}]}),
        ),
    )
    assert reply.status == 200 and b"still there?" in reply.body


async def test_live_gateway_answers_hostile_requests_with_2xx_or_4xx(
    mock, start_gateway: GatewayFactory
) -> None:
    await live_fuzz(start_gateway, mock, examples=200)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_live_gateway_long_run(mock, start_gateway: GatewayFactory) -> None:
    await live_fuzz(start_gateway, mock, examples=2000)


# --- named attacks ----------------------------------------------------------------------------------

CHAT_BODY = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})


def port_of(gateway: RunningGateway) -> int:
    port = URL(gateway.url).port
    assert port is not None
    return port


async def post_raw(
    gateway: RunningGateway,
    headers: list[tuple[bytes, bytes]],
    body: bytes = CHAT_BODY,
    path: bytes = b"/v1/chat/completions",
) -> RawReply:
    return await raw_exchange(
        port_of(gateway),
        request_bytes("POST", path, [(b"Content-Type", b"application/json"), *headers], body),
    )


async def test_oversized_and_undecodable_bodies_are_refused_without_buffering(
    mock, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway(env={"EDGEPROXY_SERVER_MAX_BODY_BYTES": "65536"})
    port = port_of(gateway)
    # Announced too large: refused from the head alone, before a byte of body is read.
    head_only = request_bytes(
        "POST", b"/v1/chat/completions", [(b"Content-Length", b"10000000000")], length=False
    )
    reply = await raw_exchange(port, head_only)
    assert reply.status == 413 and orjson.loads(reply.body)["error"]["code"] == "body_too_large"
    # Chunked, no length: refused once the limit is crossed.
    chunk = b"x" * 32768
    chunked = request_bytes(
        "POST", b"/v1/chat/completions", [(b"Transfer-Encoding", b"chunked")], length=False
    )
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    assert (await raw_exchange(port, chunked)).status == 413
    # A gzip bomb: 64 KiB on the wire, 64 MiB inflated; the limit counts inflated bytes.
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    reply = await post_raw(gateway, [(b"Content-Encoding", b"gzip")], bomb)
    assert reply.status == 413
    # A body that is not what its Content-Encoding says: a 400, not an internal error.
    reply = await post_raw(gateway, [(b"Content-Encoding", b"gzip")], CHAT_BODY)
    assert reply.status == 400 and orjson.loads(reply.body)["error"]["code"] == "bad_body"
    assert mock.requests == []
    await assert_alive(gateway)


async def test_oversized_heads_are_refused_and_the_gateway_lives_on(
    mock, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway()
    cases = {
        "one huge header": [(b"X-Big", b"a" * 20000)],
        "huge Helicone header": [(b"Helicone-User-Id", b"u" * 20000)],
        "too many headers": [(b"X-H%d" % i, b"v") for i in range(300)],
        "many properties": [(b"Helicone-Property-P%d" % i, b"v") for i in range(100)],
        "long header name": [(b"X-" + b"n" * 9000, b"v")],
    }
    for name, headers in cases.items():
        reply = await post_raw(gateway, headers)
        assert 400 <= reply.status < 500, (name, reply.status, reply.body[:200])
    reply = await raw_exchange(port_of(gateway), request_bytes("POST", b"/v1/" + b"a" * 20000, [], CHAT_BODY))
    assert 400 <= reply.status < 500
    assert mock.requests == []
    await assert_alive(gateway)


# (A CRLF pair on the wire simply starts the client's next header line: not an injection.)
INJECTIONS = [
    b"a\nInjected: 1",  # bare LF
    b"a\rInjected: 1",  # bare CR
    b"a\r\n Injected: 1",  # obs-fold: a continuation line
    b"a\r\n\tInjected: 1",
    b"a\x00Injected: 1",
    b"a\x0bInjected: 1",
    b"a%0d%0aInjected: 1",  # encoded: must stay opaque text
    b"a\\r\\nInjected: 1",
    b"a\xe5\x98\x8a\xe5\x98\x8dInjected: 1",  # U+560A U+560D: CR/LF in their low bytes
    b"a\xc2\x85Injected: 1",  # U+0085, NEL
    b"a\xe2\x80\xa8Injected: 1",  # U+2028, LINE SEPARATOR
]


@pytest.mark.parametrize(
    "header",
    [
        b"Helicone-User-Id",
        b"Helicone-Request-Id",
        b"Helicone-Property-Team",
        b"Helicone-RateLimit-Policy",
        b"X-Forwarded-Thing",
        b"Authorization",
    ],
)
async def test_header_injection_is_never_reflected_or_forwarded(
    mock, start_gateway: GatewayFactory, header: bytes
) -> None:
    gateway = await start_gateway()
    for value in INJECTIONS:
        reply = await post_raw(gateway, [(header, value)])
        assert 200 <= reply.status < 500, (value, reply.status)
        assert reply.header("Injected") is None and b"\r\nInjected" not in reply.raw.split(b"\r\n\r\n")[0]
    # What was forwarded (unknown headers are) arrived as one opaque value, never split.
    for received in mock.requests:
        assert "Injected" not in received.headers
        assert all("\r" not in v and "\n" not in v for v in received.headers.values())
    # Values that reach the log are opaque text too, and reflected ones (the request id) are re-rendered.
    reply = await post_raw(gateway, [(b"Helicone-Request-Id", b"{12345678-1234-5678-1234-567812345678}")])
    assert reply.header("Helicone-Id") == b"12345678-1234-5678-1234-567812345678"


TRAVERSALS = [
    b"/openai/../admin",
    b"/..%2f/v1/chat/completions",
    b"/openai/v1/../../admin/v1/requests",
    b"/v1/../admin/v1/requests",
    b"/v1/chat/completions/../../../etc/passwd",
    b"/openai/v1/%2e%2e/%2e%2e/x",
    b"/openai/v1/%252e%252e/%252e%252e/x",
    b"/v1/.%2e/.%2e/x",
    b"/v1/%2e%2e%2f%2e%2e%2fx",
    b"/v1/..%5c..%5cx",
    b"/openai/v1/./../x",
    b"/%2e%2e/v1/chat/completions",
    b"//v1/chat/completions",
]


async def test_path_traversal_never_leaves_the_targets_base_path(mock, start_gateway: GatewayFactory) -> None:
    # A target with a base path: a `..` that escaped it would reach another tenant's prefix.
    gateway = await start_gateway(f'[targets.scoped]\nbase_url = "{mock.url}/v1"\n')
    for path in TRAVERSALS + [
        p.replace(b"/openai/", b"/scoped/") for p in TRAVERSALS if p.startswith(b"/openai/")
    ]:
        reply = await raw_exchange(
            port_of(gateway), request_bytes("POST", path, [(b"Content-Type", b"application/json")], CHAT_BODY)
        )
        assert reply.status in (400, 404), (path, reply.status, reply.body[:200])
        assert mock.stats()["requests"] == 0, (path, [r.path for r in mock.requests])
    # Dots inside a segment are fine: only `.` and `..` segments are refused.
    reply = await post_raw(gateway, [], path=b"/v1/chat/completions?x=..")
    assert reply.status == 200


async def test_target_url_to_internal_addresses_is_refused_unless_allowlisted(
    mock, start_gateway: GatewayFactory, clickhouse_url: str
) -> None:
    mock_port = URL(mock.url).port
    open_ports = [mock_port, URL(clickhouse_url).port, 6379]
    gateway = await start_gateway('target_url_allowlist = ["api.example.com"]\n')
    urls = [f"http://{host}:{port}" for host in INTERNAL_HOSTS for port in open_ports]
    urls += [f"http://{host}" for host in INTERNAL_HOSTS] + [
        f"https://{host}/latest/meta-data" for host in INTERNAL_HOSTS
    ]
    urls += [
        f"http://api.example.com@127.0.0.1:{mock_port}",
        f"http://api.example.com:443@127.0.0.1:{mock_port}",
        f"http://127.0.0.1:{mock_port}\\@api.example.com",
        f"http://127.0.0.1:{mock_port}#@api.example.com",
        f"http://api.example.com:{mock_port}",  # an allowlisted name on another port
        f"http://127.0.0.1:{mock_port}/?@api.example.com",
        "http://api.example.com:99999",
        "http://api.example.com:0",  # a port, not the default one
        "http://[::1",
    ]
    for url in urls:
        reply = await post_raw(gateway, [(b"Helicone-Target-URL", url.encode())])
        assert reply.status == 400, (url, reply.status, reply.body[:200])
        assert orjson.loads(reply.body)["error"]["param"] == "Helicone-Target-URL"
    assert mock.requests == []
    # The allowlist matches names, not addresses: an operator who lists `localhost:PORT` chose
    # to let clients reach that port (the README says so).
    chosen = await start_gateway(f'target_url_allowlist = ["localhost:{mock_port}"]\n')
    reply = await post_raw(chosen, [(b"Helicone-Target-URL", f"http://localhost:{mock_port}".encode())])
    assert reply.status == 200 and len(mock.requests) == 1
    reply = await post_raw(chosen, [(b"Helicone-Target-URL", f"http://127.0.0.1:{mock_port}".encode())])
    assert reply.status == 400 and len(mock.requests) == 1


# --- JWT attacks test_auth.py does not cover ---------------------------------------------------------


def signed(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    return hand_signed(header, claims, secret.encode())


def claims(**extra: Any) -> dict[str, Any]:
    return {**valid_claims(), **extra}


def unsigned(alg: str) -> str:
    return f"{b64(orjson.dumps({'alg': alg}))}.{b64(orjson.dumps(claims()))}."


ATTACKER = "attacker-secret-" + "a" * 40
JWT_ATTACKS: dict[str, Callable[[], str]] = {
    "embedded jwk": lambda: signed(
        {"alg": "HS256", "jwk": {"kty": "oct", "k": b64(ATTACKER.encode())}}, claims(), ATTACKER
    ),
    "jku to attacker": lambda: signed({"alg": "HS256", "jku": "http://127.0.0.1:1/keys"}, claims(), ATTACKER),
    "kid path traversal": lambda: signed({"alg": "HS256", "kid": "../../../../dev/null"}, claims(), ""),
    "alg None": lambda: unsigned("None"),
    "alg nOnE": lambda: unsigned("nOnE"),
    "signature stripped": lambda: signed({"alg": "HS256"}, claims(), SECRET).rsplit(".", 1)[0] + ".",
    "empty secret": lambda: signed({"alg": "HS256"}, claims(), ""),
    "oversized": lambda: signed({"alg": "HS256"}, claims(pad="p" * 9000), SECRET),
    "nested header": lambda: b64(b"[" * 3000) + "." + b64(b"{}") + ".x",
    "non-ASCII": lambda: "eyJ\u00e9.a.b",
    "two tokens": lambda: (
        signed({"alg": "HS256"}, claims(), SECRET) + " " + signed({"alg": "HS256"}, claims(), SECRET)
    ),
}


@pytest.mark.parametrize("attack", sorted(JWT_ATTACKS))
async def test_more_forged_keys_are_refused(mock, start_gateway: GatewayFactory, attack: str) -> None:
    gateway = await start_gateway(f'[auth]\nrequired = true\njwt_secret = "{SECRET}"\n')
    token = JWT_ATTACKS[attack]()
    reply = await post_raw(gateway, [(b"Helicone-Auth", b"Bearer " + token.encode())])
    assert reply.status in (400, 401), (reply.status, reply.body[:200])
    assert token.encode() not in reply.body
    assert mock.requests == []


async def test_keys_in_the_sdk_header_and_odd_but_signed_claims_never_give_a_500(
    mock, start_gateway: GatewayFactory
) -> None:
    # The gateway injects the provider key, so the SDK's Authorization header carries the gateway key.
    gateway = await start_gateway(
        f'[targets.openai]\napi_key = "sk-provider"\n[auth]\njwt_secret = "{SECRET}"\n'
    )
    for raw in (
        b"Bearer eyJ\xff.a.b",
        b"Bearer eyJ\xc3\xa9.a.b",
        b"Bearer " + b"eyJ" + b"x" * 9000 + b".a.b",
    ):
        reply = await post_raw(gateway, [(b"Authorization", raw)])
        assert reply.status == 401, (raw[:20], reply.status, reply.body[:200])
    # A validly signed key whose rate_limit claim is malformed is the issuer's mistake: the
    # gateway says so with a 500 of its own, deliberately (ratelimit/policies.py).
    for bad in ("bogus", "1;w=0"):
        reply = await post_raw(
            gateway,
            [
                (
                    b"Authorization",
                    b"Bearer " + signed({"alg": "HS256"}, claims(rate_limit=bad), SECRET).encode(),
                )
            ],
        )
        assert reply.status == 500 and b"malformed rate_limit claim" in reply.body
    odd = [
        claims(max_tokens=-5),
        claims(budget={"usd": -1}),
        claims(models=[]),
        claims(user="\u0000"),
        claims(sub="../../x", jti="a b"),
    ]
    for payload in odd:
        reply = await post_raw(
            gateway, [(b"Authorization", b"Bearer " + signed({"alg": "HS256"}, payload, SECRET).encode())]
        )
        assert 200 <= reply.status < 500, (payload, reply.status, reply.body[:200])
