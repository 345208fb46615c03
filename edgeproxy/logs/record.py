"""One row per request: its columns, the named form of a row (LogRecord), and body capping.

The gateway builds each request's row as a plain tuple in `COLUMNS` order (observe.py): the named
form's 34 keyword arguments and its conversion took ~3 µs a request on the event loop, half of
what building the row took (bench/README.md). LogRecord is that same row with names, for tests
and tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

# Column order of `LogRecord.to_row()`; the table in schema/0001_requests.sql has these columns.
COLUMNS: tuple[str, ...] = (
    "request_id",
    "started_at",
    "latency_ms",
    "ttfb_ms",
    "upstream_ms",
    "gateway_ms",
    "status",
    "method",
    "path",
    "target",
    "model",
    "user_id",
    "app_id",
    "key_id",
    "properties",
    "session_id",
    "session_path",
    "session_name",
    "params",
    "request_body",
    "request_truncated",
    "response_body",
    "response_truncated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cost_saved_usd",
    "reserved_usd",
    "cache",
    "attempts",
    "answered_by",
    "error",
    "outcome",
)

Row = tuple[Any, ...]

# The properties of every row that has none: most rows. One shared dict, not one per row, so a
# queued row is a single object for the cycle collector to count (see batcher.py). Never mutated:
# rows only go to the store and the spool.
NO_PROPERTIES: dict[str, str] = {}


@dataclass(slots=True)
class LogRecord:
    """What the log keeps of one request, by name; `None` means unknown (an unpriced model's cost is None, not 0)."""

    request_id: str
    started_at: float
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    upstream_ms: float | None = None
    gateway_ms: float | None = None
    status: int = 0
    method: str = ""
    path: str = ""
    target: str = ""
    model: str = ""
    user_id: str = ""
    app_id: str = ""
    key_id: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    session_id: str = ""
    session_path: str = ""
    session_name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    request_body: str | None = None
    request_truncated: bool = False
    response_body: str | None = None
    response_truncated: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    cost_saved_usd: float | None = None
    reserved_usd: float | None = None
    cache: str = ""
    attempts: int = 0
    answered_by: str = ""
    error: str = ""
    outcome: str = "ok"

    def to_row(self) -> Row:
        """The record as a tuple in `COLUMNS` order, ready for clickhouse-connect and the spool."""
        return (
            self.request_id,
            datetime64_ms(self.started_at),
            self.latency_ms,
            self.ttfb_ms,
            self.upstream_ms,
            self.gateway_ms,
            self.status,
            self.method,
            self.path,
            self.target,
            self.model,
            self.user_id,
            self.app_id,
            self.key_id,
            self.properties or NO_PROPERTIES,
            self.session_id,
            self.session_path,
            self.session_name,
            params_json(self.params),
            self.request_body,
            self.request_truncated,
            self.response_body,
            self.response_truncated,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cost_usd,
            self.cost_saved_usd,
            self.reserved_usd,
            self.cache,
            self.attempts,
            self.answered_by,
            self.error,
            self.outcome,
        )


def datetime64_ms(seconds: float) -> int:
    """A Unix time as DateTime64(3) ticks: clickhouse-connect writes ints as-is, skipping datetime conversion."""
    return int(seconds * 1000)


def params_json(params: dict[str, Any] | None) -> str:
    """The `params` column: the logged request parameters as a JSON object."""
    if not params:
        return "{}"
    # default=str: a stray non-JSON value must not fail the whole batch.
    return orjson.dumps(params, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def cap_body(body: bytes | str | None, limit: int) -> tuple[str | None, bool]:
    """Decode a captured body, cut to at most `limit` bytes on a UTF-8 boundary; (text, truncated).

    A `limit` of 0 or less keeps no body at all (text None, truncated when there was one).
    Bytes that are not UTF-8 become U+FFFD rather than failing the row.
    """
    if body is None:
        return None, False
    if isinstance(body, str):
        if len(body) <= limit // 4:
            # At most 4 bytes per character: surely within the limit, skip the encode.
            return body, False
        body = body.encode()
    if limit <= 0:
        return None, len(body) > 0
    if len(body) <= limit:
        return body.decode("utf-8", "replace"), False
    end = limit
    # A continuation byte (10xxxxxx) at the cut means a character straddles it: step back to its
    # lead byte. At most 3 steps in valid UTF-8; the bound keeps binary input cheap too.
    while end > limit - 3 and end > 0 and body[end] & 0xC0 == 0x80:
        end -= 1
    return body[:end].decode("utf-8", "replace"), True
