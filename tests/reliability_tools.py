"""Tools the reliability tests share: a raw HTTP/1.1 client, /proc sampling, a mixed load, log rows.

The raw client exists because well-behaved clients refuse to send what these tests must send
(CR/LF in header values, bytes that are not UTF-8, truncated bodies) and hide what the server
sent back (header bytes exactly as written).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from edgeproxy.completion import assemble_stream
from edgeproxy.logs.store import LogStore

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}


@dataclass(frozen=True)
class RawReply:
    """A response as the socket delivered it; `status` 0 means the server closed without answering."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


def request_bytes(
    method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"", *, length: bool = True
) -> bytes:
    """An HTTP/1.1 request with `Connection: close`, headers sent byte for byte as given."""
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> RawReply:
    """Send `data` and read one response; an AssertionError if it is not complete within `timeout`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while not complete(received):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    except TimeoutError:
        raise AssertionError(
            f"no complete answer within {timeout}s to {data[:200]!r}: got {bytes(received[:300])!r}"
        ) from None
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server refused early (e.g. a head too large); what it sent first still counts
    finally:
        writer.close()
    return parse_reply(bytes(received))


def complete(raw: bytes | bytearray) -> bool:
    """Whether `raw` holds a whole response (by Content-Length or chunked framing; else until close)."""
    head, found, body = bytes(raw).partition(b"\r\n\r\n")
    if not found:
        return False
    if head.startswith(b"HTTP/1.1 100"):
        return complete(body)
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        return body.endswith(b"0\r\n\r\n")
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False  # no framing: the body ends when the server closes


def parse_reply(raw: bytes) -> RawReply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/"):
        return RawReply(0, [], b"", raw)
    status = int(lines[0].split(b" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
    if status == 100:  # `Expect: 100-continue`: the real answer follows
        return parse_reply(body)
    if any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers):
        body = dechunk(body)
    return RawReply(status, headers, body, raw)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


# --- /proc ---------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sampler:
    """Samples a process's RSS and open descriptors every `interval` seconds: (time, rss KiB, fds)."""

    pid: int
    interval: float = 1.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        started = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - started, rss_kib(self.pid), fd_count(self.pid)))
            await asyncio.sleep(self.interval)

    def window(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] < end]

    @property
    def peak_rss_kib(self) -> int:
        return max(s[1] for s in self.samples)


def median_rss(samples: list[tuple[float, int, int]]) -> float:
    return statistics.median(s[1] for s in samples)


# --- a mixed load --------------------------------------------------------------------------------

# Kinds of request in a mixed load, and the status each must end with.
KINDS: dict[str, int] = {
    "plain": 200,
    "stream": 200,
    "cached": 200,
    "limited": 429,  # a policy of 0 requests: always refused
    "broken": 200,  # the mock resets the connection mid-stream: an error event ends the stream
    "upstream_error": 503,  # the mock answers 503 and the gateway relays it
}


@dataclass
class MixedLoad:
    """Concurrent workers sending a weighted mix of request kinds, each with its own request id.

    `sent` maps every request id to (kind, status seen); a status outside the kind's expected one
    is an error. Workers stop when `stop()` is called or `duration` runs out.
    """

    url: str
    concurrency: int = 64
    duration: float = 60.0
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "plain": 4, "stream": 4, "cached": 3, "limited": 1, "broken": 0.5, "upstream_error": 0.5,
        }
    )  # fmt: skip
    extra_headers: dict[str, str] = field(default_factory=dict)
    # False: record outcomes only (`history`), for a test that judges them by phase.
    strict: bool = True
    sent: dict[str, tuple[str, int]] = field(default_factory=dict)
    # (time answered, kind, status, Helicone-Cache, seconds taken)
    history: list[tuple[float, str, int, str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        deadline = time.monotonic() + self.duration
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, deadline) for _ in range(self.concurrency)))

    def stop(self) -> None:
        self._stop.set()

    def counts(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.sent.values())

    async def _worker(self, session: aiohttp.ClientSession, deadline: float) -> None:
        kinds, weights = list(self.weights), list(self.weights.values())
        while not self._stop.is_set() and time.monotonic() < deadline:
            kind = random.choices(kinds, weights)[0]
            request_id = str(uuid.uuid4())
            body, headers = mixed_request(kind, request_id)
            headers.update(self.extra_headers)
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{self.url}/v1/chat/completions", data=body, headers=headers
                ) as response:
                    data = await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.sent[request_id] = (kind, 0)
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            took = time.perf_counter() - started
            self.latencies[kind].append(took)
            self.sent[request_id] = (kind, status)
            self.history.append(
                (time.monotonic(), kind, status, response.headers.get("Helicone-Cache", ""), took)
            )
            if not self.strict:
                continue
            problem = check_mixed(kind, status, data)
            if problem:
                self.errors.append(f"{kind} {request_id}: {problem}")


def mixed_request(kind: str, request_id: str) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one request of `kind`."""
    headers = {"Content-Type": "application/json", "Helicone-Request-Id": request_id}
    content = f"{kind} {request_id}"
    body: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": content}]}
    if kind == "stream":
        body["stream"] = True
        headers["X-Mock-Chunks"] = "8"
    elif kind == "cached":
        # A handful of questions asked over and over: nearly all are hits.
        body["messages"][0]["content"] = f"cached question {random.randrange(20)}"
        headers["Helicone-Cache-Enabled"] = "true"
    elif kind == "limited":
        headers["Helicone-RateLimit-Policy"] = "0;w=60"
    elif kind == "broken":
        body["stream"] = True
        headers["X-Mock-Fail-After"] = "2"
    elif kind == "upstream_error":
        headers["X-Mock-Status"] = "503"
    return orjson.dumps(body), headers


def check_mixed(kind: str, status: int, data: bytes) -> str:
    """Why this answer is wrong for its kind, or '' when it is right."""
    expected = KINDS[kind]
    if status != expected:
        return f"status {status}, expected {expected}: {data[:200]!r}"
    if kind == "stream" and not data.endswith(b"data: [DONE]\n\n"):
        return f"stream cut short: {data[-200:]!r}"
    if kind == "broken" and b'"upstream_stream_error"' not in data[-400:]:
        return f"broken stream without its error event: {data[-200:]!r}"
    if kind == "cached" and b"cached question" not in data:
        return f"wrong cached answer: {data[:200]!r}"
    return ""


# --- the request log -----------------------------------------------------------------------------


async def logged_rows(
    store: LogStore, columns: str = "status, outcome, user_id, error"
) -> dict[str, dict[str, Any]]:
    """Request id → its row (read with FINAL, as the log's readers must); empty until the table exists."""
    try:
        rows = await store.query(f"SELECT toString(request_id) AS id, {columns} FROM {store.qualified} FINAL")
    except Exception as exc:
        if "UNKNOWN_TABLE" in str(exc) or "UNKNOWN_DATABASE" in str(exc):
            return {}
        raise
    return {row.pop("id"): row for row in rows}


async def stored_copies(store: LogStore) -> tuple[int, int]:
    """(rows stored, distinct request ids): equal when nothing was logged twice."""
    rows = await store.query(
        f"SELECT count() AS stored, uniqExact(request_id) AS distinct_ids FROM {store.qualified} FINAL"
    )
    return int(rows[0]["stored"]), int(rows[0]["distinct_ids"])


def raw_exchange_sync(port: int, data: bytes, timeout: float = 10.0) -> RawReply:
    """`raw_exchange` for a worker thread (hypothesis drives examples synchronously)."""
    import socket

    received = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            while not complete(received):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            raise AssertionError(f"no complete answer within {timeout}s to {data[:200]!r}") from None
        except (ConnectionResetError, BrokenPipeError):
            pass
    return parse_reply(bytes(received))


# --- processes ---------------------------------------------------------------------------------


class MockProcess:
    """The mock provider in a process of its own (`python -m bench.mock_upstream`), for load tests.

    Under load the mock must not share the test's event loop (and core) with the load generator.
    """

    def __init__(self) -> None:
        self.url = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> None:
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.mock_upstream", "--port", "0", "--record-limit", "0",
            stdout=asyncio.subprocess.PIPE, cwd=root,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        self.url = line.decode().strip()
        assert self.url.startswith("http://"), line

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()


def clickhouse_rows(url: str, database: str) -> tuple[int, int, set[str]]:
    """(rows with FINAL, distinct ids, the ids) of `database.requests` on a ClickHouse HTTP endpoint."""
    import clickhouse_connect

    parsed = URL(url)
    client = clickhouse_connect.get_client(
        host=parsed.host, port=parsed.port, username=parsed.user or "default", password=parsed.password or "",
        autogenerate_session_id=False,
    )  # fmt: skip
    try:
        table = f"{database}.requests"
        counts = client.query(f"SELECT count(), uniqExact(request_id) FROM {table} FINAL").result_rows[0]
        ids = {
            str(row[0]) for row in client.query(f"SELECT toString(request_id) FROM {table} FINAL").result_rows
        }
        return int(counts[0]), int(counts[1]), ids
    finally:
        client.close()


# --- many tenants, a third of whom leave mid-flight ---------------------------------------------

# What tenants ask: their own nonce, or a question every tenant asks verbatim (the cache's bait).
QUESTION = re.compile(r"(?:tenant \d+|everyone) asks [0-9a-f]{32}")
ABORTS = ("before_headers", "after_headers", "mid_stream")


@dataclass(frozen=True)
class TenantReply:
    """One request of `tenant_traffic`: who asked what, and what came back.

    `outcome` is "answered", "cancelled" (the request was cancelled before the response
    headers) or "aborted" (the client left after the headers or mid-stream, unread).
    """

    tenant: int
    question: str
    request_id: str
    stream: bool
    abort: str
    outcome: str
    status: int = 0
    raw: bytes = b""
    cache: str = ""

    def content(self) -> str:
        document = assemble_stream(self.raw) if self.stream else orjson.loads(self.raw)
        return document["choices"][0]["message"]["content"]

    def answer_id(self) -> str:
        """The completion id the mock gave the answer: the same id twice means one answer served twice."""
        return self.raw.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()


async def tenant_traffic(base_url: str, keys: list[str], requests: int, *, timeout: float) -> list[TenantReply]:
    """`requests` cacheable chat calls, each from a random tenant (`keys[t]` is tenant t's key), 48 at a time.

    Half stream; a third leave early (cancelled before the headers, or gone after the headers or
    the first chunk). The mock answers after 0, 5 or 15 ms, in 6 chunks 2 ms apart when streamed.
    """
    own = {t: [f"tenant {t} asks {uuid.uuid4().hex}" for _ in range(3)] for t in range(len(keys))}
    common = [f"everyone asks {uuid.uuid4().hex}" for _ in range(3)]
    gate = asyncio.Semaphore(48)

    async def fetch(session: aiohttp.ClientSession, body: dict, headers: dict[str, str], abort: str) -> tuple[int, bytes, str]:
        async with session.post(base_url + "/chat/completions", json=body, headers=headers) as response:
            if abort == "after_headers":
                return 0, b"", ""  # leave without reading: the connection is closed, not reused
            if abort == "mid_stream":
                await response.content.readany()
                return 0, b"", ""
            return response.status, await response.read(), response.headers.get("Helicone-Cache", "")

    async def one(session: aiohttp.ClientSession) -> TenantReply:
        tenant = random.randrange(len(keys))
        question = random.choice(own[tenant] + common)
        stream = random.random() < 0.5
        abort = random.choice(ABORTS) if random.random() < 1 / 3 else ""
        request_id = str(uuid.uuid4())
        body = {"model": "mock-model", "stream": stream, "messages": [{"role": "user", "content": question}]}
        headers = {
            "Helicone-Auth": f"Bearer {keys[tenant]}",
            "Helicone-Request-Id": request_id,
            "Helicone-Cache-Enabled": "true",
            "X-Mock-Delay-Ms": str(random.choice((0, 5, 15))),
            "X-Mock-Chunks": "6",
            "X-Mock-Chunk-Gap-Ms": "2",
        }
        asked = {"tenant": tenant, "question": question, "request_id": request_id, "stream": stream, "abort": abort}
        async with gate:
            task = asyncio.create_task(fetch(session, body, headers, abort))
            if abort == "before_headers":
                asyncio.get_running_loop().call_later(random.uniform(0, 0.012), task.cancel)
            try:
                status, raw, cache = await task
            except asyncio.CancelledError:
                return TenantReply(**asked, outcome="cancelled")
        if status == 0:
            return TenantReply(**asked, outcome="aborted")
        return TenantReply(**asked, outcome="answered", status=status, raw=raw, cache=cache)

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        return await asyncio.wait_for(asyncio.gather(*(one(session) for _ in range(requests))), timeout=timeout)
