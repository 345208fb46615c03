"""SSE relay: each upstream chunk goes to the client as it arrives, then into the bounded capture."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import orjson
from aiohttp import ClientResponse, SocketTimeoutError, web

from .exchange import Exchange

# Raw upstream bytes kept past the capture limit, enough to find the final usage event.
USAGE_TAIL_BYTES = 16 * 1024
CLIENT_STALLED = "client stopped reading"
# OpenAI adds it to every chunk once usage is asked for; a client that did not ask never sees it.
_NULL_USAGE = b',"usage":null'
_NULL_USAGE_END = _NULL_USAGE + b"}\n\n"


class EventBuffer:
    """Cuts a byte stream at SSE event boundaries: bytes of an event split across reads wait for
    its end, which for real providers (one event per write) adds no delay."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def complete(self, chunk: bytes) -> bytes:
        """The whole events (each ending in a blank line) that this chunk completes."""
        if not self._pending and chunk.endswith(b"\n\n"):
            return chunk  # whole events, as a provider writes them: nothing to cut or keep
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        return data[: end + 2]

    def rest(self) -> bytes:
        """What is left when the stream ends: an event that never ended."""
        rest, self._pending = self._pending, b""
        return rest


class UsageChunkFilter:
    """Hides the usage-only chunk the gateway asked for, so the client sees what it asked for."""

    __slots__ = ("_events", "hidden")

    def __init__(self) -> None:
        self._events = EventBuffer()
        self.hidden: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        complete = self._events.complete(chunk)
        # `find`, not `in`: CPython 3.11's `bytes in bytes` first tries the needle as an int, and
        # raising and clearing that TypeError cost more than the search (callgrind, per chunk).
        at = complete.find(b'"choices":[]')
        if at < 0:
            # No usage-only event here (every chunk but the last). One event ending in the null, as
            # OpenAI sends it: cut it off the end; else one C-level pass drops every null (none: the
            # same bytes back), where splitting into events and joining them back cost ~3 µs a chunk.
            if complete.endswith(_NULL_USAGE_END) and complete.find(b"\n") == len(complete) - 2:
                return complete[: -len(_NULL_USAGE_END)] + b"}\n\n"
            return complete.replace(_NULL_USAGE, b"")
        # Only the events around a `"choices":[]` are looked at: a burst of ~50 events read at once
        # is not split into events and joined back.
        kept, start = [], 0
        while at >= 0:
            before = complete.rfind(b"\n\n", start, at)
            begin = before + 2 if before >= 0 else start
            end = complete.find(b"\n\n", at) + 2
            event = complete[begin : end - 2]
            if event.find(b'"usage":{') >= 0:
                self.hidden.append(event)
                kept.append(complete[start:begin])
                start = end
            at = complete.find(b'"choices":[]', end)
        kept.append(complete[start:])
        # A null cannot span two events (it holds no blank line), so one pass over the rest will do.
        return b"".join(kept).replace(_NULL_USAGE, b"")

    def flush(self) -> bytes:
        return self._events.rest()


class IdleWatch:
    """The upstream's idle limit for one stream, kept with one timer for the whole stream.

    aiohttp's `sock_read` cancels and re-arms a timer on every read (a `call_later` and a cancel,
    3.9 µs on a slow CPU, ~4% of what relaying a chunk costs there). Here a chunk only
    stamps the time; the one timer, when it fires, re-arms for what is left, or, after `seconds`
    with nothing read, ends the read with aiohttp's own SocketTimeoutError.
    """

    __slots__ = ("_content", "_handle", "_last", "_loop", "_seconds")

    def __init__(self, upstream: ClientResponse, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._content = upstream.content
        self._seconds = seconds
        self._last = self._loop.time()
        self._handle = self._loop.call_later(seconds, self._check)
        connection = upstream.connection
        if connection is not None and connection.protocol is not None:
            # aiohttp's timer, armed by the last read, stays until the next read, which no longer re-arms it.
            connection.protocol.read_timeout = None

    def touch(self) -> None:
        """Something was read: the idle time starts again."""
        self._last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        left = self._last + self._seconds - self._loop.time()
        if left > 0:
            self._handle = self._loop.call_later(left, self._check)
            return
        self._content.set_exception(SocketTimeoutError("Timeout on reading data from socket"))


async def relay(
    ex: Exchange, upstream: ClientResponse, client: web.StreamResponse, stall_seconds: float, idle_seconds: float
) -> bytes:
    """Copy the upstream body to the client chunk by chunk; return the raw tail for usage parsing.

    Backpressure comes from `client.write`, which waits while the client's socket buffer is full,
    for at most `stall_seconds` (see `send`). An upstream that sends nothing for `idle_seconds`
    raises a TimeoutError (see `IdleWatch`); time spent waiting on the client does not count.
    """
    capture = ex.capture
    filt = UsageChunkFilter() if ex.hide_usage_chunk else None
    guard = ex.response_filter
    tail = b""
    first = True
    watch = IdleWatch(upstream, idle_seconds)
    try:
        async for chunk in upstream.content.iter_any():
            watch.touch()
            if first:
                first = False
                ex.upstream_first_byte = time.perf_counter()  # the first body chunk, not the headers
            if capture.truncated:
                tail = (tail + chunk)[-USAGE_TAIL_BYTES:]
            if filt is not None:
                chunk = filt.feed(chunk)
            if guard is not None and chunk:
                chunk = guard.feed(chunk)
            if not chunk:
                continue
            await send(ex, client, chunk, stall_seconds)
            watch.touch()
            if ex.client_first_byte is None:
                ex.client_first_byte = time.perf_counter()
            capture.add(chunk)
    finally:
        watch.cancel()
    rest = filt.flush() if filt is not None else b""
    if guard is not None:
        rest = guard.feed(rest) + guard.flush()
    if rest:
        await send(ex, client, rest, stall_seconds)
        capture.add(rest)
    if filt is not None:
        tail += b"".join(event + b"\n\n" for event in filt.hidden)
    return tail


async def send(ex: Exchange, client: web.StreamResponse, chunk: bytes, stall_seconds: float) -> None:
    """Write one chunk; a client that accepts nothing for `stall_seconds` is dropped.

    aiohttp has no write timeout, and the upstream's timers do not run while the relay waits on
    the client, so a client that never reads would hold its handler and upstream connection for
    good. Only a write that can wait is timed (a timer per chunk would cost the hot path): one
    behind unsent bytes, or larger than the transport's high-water mark.
    """
    await _bounded(ex, client.write(chunk), len(chunk), stall_seconds)


async def send_eof(ex: Exchange, client: web.StreamResponse, stall_seconds: float) -> None:
    """End a streamed response, bounded as `send` bounds a chunk: the last bytes may still be unsent."""
    await _bounded(ex, client.write_eof(), 0, stall_seconds)


async def send_whole(ex: Exchange, client: web.Response, stall_seconds: float) -> web.Response:
    """Send a complete response (headers and body); a client that stops reading is cut off as in `send`."""
    await client.prepare(ex.request)
    ex.client_first_byte = time.perf_counter()
    try:
        await _bounded(ex, client.write_eof(), client.content_length or 0, stall_seconds)
    except ConnectionError:
        ex.outcome = "cancelled"
    return client


def _bounded(ex: Exchange, write: Awaitable[None], size: int, stall_seconds: float) -> Awaitable[None]:
    # A plain function handing back what to await: no coroutine frame of its own on the per-chunk path.
    return within_stall(ex, write, stall_seconds) if may_wait(ex, size) else write


def may_wait(ex: Exchange, size: int) -> bool:
    """Whether writing `size` bytes can wait on the client: bytes are still unsent, or it is a big write.

    Below the transport's high-water mark an empty buffer cannot make a write wait.
    """
    transport = ex.request.transport
    if transport is None:
        return False
    return transport.get_write_buffer_size() > 0 or size > transport.get_write_buffer_limits()[1]


async def within_stall(ex: Exchange, write: Awaitable[None], stall_seconds: float) -> None:
    """Await a write to the client; past `stall_seconds`, abort the connection (ConnectionResetError)."""
    try:
        async with asyncio.timeout(stall_seconds):
            await write
    except TimeoutError:
        ex.error = f"{CLIENT_STALLED} for {stall_seconds:g}s"
        if ex.request.transport is not None:
            ex.request.transport.abort()
        raise ConnectionResetError(ex.error) from None


def error_event(message: str, code: str) -> bytes:
    """A final SSE event in OpenAI's error shape, for a stream that broke after it began."""
    payload = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"
