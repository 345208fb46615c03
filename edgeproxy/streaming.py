"""SSE relay: each upstream chunk goes to the client as it arrives, then into the bounded capture."""

from __future__ import annotations

import time

import orjson
from aiohttp import ClientResponse, web

from .exchange import Exchange

# Raw upstream bytes kept past the capture limit, enough to find the final usage event.
USAGE_TAIL_BYTES = 16 * 1024


class EventBuffer:
    """Cuts a byte stream at SSE event boundaries: bytes of an event split across reads wait for
    its end, which for real providers (one event per write) adds no delay."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def complete(self, chunk: bytes) -> bytes:
        """The whole events (each ending in a blank line) that this chunk completes."""
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
        if b'"usage"' not in complete:
            return complete
        if b'"choices":[]' not in complete:
            # No usage-only event here (every chunk but the last): dropping the nulls is one C-level
            # pass, where splitting into events and joining them back cost ~3 µs per chunk.
            return complete.replace(b',"usage":null', b"")
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if b'"choices":[]' in event and b'"usage":{' in event:
                self.hidden.append(event)
                continue
            # OpenAI adds `"usage":null` to every chunk once usage is requested.
            kept.append(event.replace(b',"usage":null', b""))
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        return self._events.rest()


async def relay(ex: Exchange, upstream: ClientResponse, client: web.StreamResponse) -> bytes:
    """Copy the upstream body to the client chunk by chunk; return the raw tail for usage parsing.

    Backpressure comes from `client.write`, which waits while the client's socket buffer is full.
    """
    capture = ex.capture
    filt = UsageChunkFilter() if ex.hide_usage_chunk else None
    guard = ex.response_filter
    tail = b""
    first = True
    async for chunk in upstream.content.iter_any():
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
        await client.write(chunk)
        if ex.client_first_byte is None:
            ex.client_first_byte = time.perf_counter()
        capture.add(chunk)
    rest = filt.flush() if filt is not None else b""
    if guard is not None:
        rest = guard.feed(rest) + guard.flush()
    if rest:
        await client.write(rest)
        capture.add(rest)
    if filt is not None:
        tail += b"".join(event + b"\n\n" for event in filt.hidden)
    return tail


def error_event(message: str, code: str) -> bytes:
    """A final SSE event in OpenAI's error shape, for a stream that broke after it began."""
    payload = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"
