"""Exchange: the one typed object a request carries through the pipeline's stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from .estimate import WorstCase
from .options import RequestOptions
from .settings import TargetSettings
from .targets import Route

# Until the parse stage routes it (a request refused before that goes nowhere).
UNROUTED = Route(TargetSettings(name="", base_url=""), "")


@dataclass(slots=True)
class Identity:
    """Who is calling: filled by authentication (a gateway key's claims) or left anonymous."""

    app_id: str = ""
    key_id: str = ""
    user_id: str = ""
    models: tuple[str, ...] = ()
    rate_limit: str | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    user_override: bool = True
    max_tokens: int | None = None


class ResponseFilter(Protocol):
    """Rewrites what the client is sent (the output guard): a stream chunk by chunk, or a whole body."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def whole(self, body: bytes) -> bytes: ...


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(slots=True)
class Capture:
    """What the client was sent, kept up to `limit` bytes for the log and the cache."""

    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        if self.truncated:
            return
        if self.size + len(chunk) > self.limit:
            self.truncated = True
            return
        self.chunks.append(chunk)
        self.size += len(chunk)

    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(slots=True)
class Exchange:
    request: web.Request
    options: RequestOptions
    # The gateway's own (a random UUID), or the one the client named in Helicone-Request-Id.
    request_id: str
    body: bytes = b""
    route: Route = UNROUTED
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    identity: Identity = field(default_factory=Identity)
    status: int = 0
    streamed: bool = False
    # Monotonic instants (perf_counter) filled as the exchange progresses.
    upstream_sent: float | None = None
    upstream_first_byte: float | None = None
    upstream_done: float | None = None
    client_first_byte: float | None = None
    usage: Usage = field(default_factory=Usage)
    capture: Capture = field(default_factory=lambda: Capture(limit=64 * 1024))
    response_headers: dict[str, str] = field(default_factory=dict)
    cache_status: str = ""
    cost_saved_usd: float | None = None
    reserved_usd: float | None = None
    attempts: int = 0
    answered_by: str = ""
    outcome: str = "ok"
    error: str = ""
    # The client asked no usage in its stream: the gateway asked for it and hides that chunk.
    hide_usage_chunk: bool = False
    # Set by the policy stage when an output guard applies; the forwarder runs every byte through it.
    response_filter: ResponseFilter | None = None
    # Raw end of a stream whose capture overflowed, plus any hidden usage event.
    usage_tail: bytes = b""
    # The reservation size, estimated once (estimate.worst_case) for every stage that reserves.
    worst_case: WorstCase | None = None
    _json: Any = None
    _json_parsed: bool = False

    def json(self) -> Any:
        """The request body as JSON, parsed at most once; None when it is not a JSON object."""
        if not self._json_parsed:
            self._json_parsed = True
            if self.body[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
                try:
                    parsed = orjson.loads(self.body)
                except orjson.JSONDecodeError:
                    parsed = None
                self._json = parsed if isinstance(parsed, dict) else None
        return self._json

    def replace_json(self, document: dict[str, Any]) -> None:
        """Swap in a rewritten body (policy, routing); the bytes sent upstream follow it."""
        self._json = document
        self._json_parsed = True
        self.body = orjson.dumps(document)
        self.worst_case = None

    @property
    def model(self) -> str:
        document = self.json()
        model = document.get("model") if document else None
        return model if isinstance(model, str) else ""

    @property
    def logged_path(self) -> str:
        """The path the log and metrics name: the routed /v1/… path, or the raw one (capped) if never routed."""
        return self.route.path or self.request.path[:256]

    def first_byte_seconds(self) -> float | None:
        """Request received to the first byte sent (or, before that, received from upstream)."""
        first = self.client_first_byte or self.upstream_first_byte
        return None if first is None else first - self.started

    def upstream_seconds(self, now: float) -> float | None:
        """Sent upstream to upstream finished (to `now` if it never finished)."""
        if self.upstream_sent is None:
            return None
        return (self.upstream_done or now) - self.upstream_sent

    def gateway_seconds(self) -> float | None:
        """Time the gateway itself added: before the upstream call, and from upstream to client."""
        if self.upstream_sent is None:
            return None
        added = self.upstream_sent - self.started
        upstream_ready = self.upstream_first_byte if self.streamed else self.upstream_done
        if self.client_first_byte is not None and upstream_ready is not None:
            added += max(0.0, self.client_first_byte - upstream_ready)
        return added
