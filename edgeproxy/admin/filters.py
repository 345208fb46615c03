"""Admin query parameters → frozen filters, validated once; a bad value is a 400 that names it.

The admin API and the `usage`/`requests` commands share these parsers: the CLI turns its flags
into the same query parameters, so both answer the same question the same way.

    GET /admin/v1/requests?user=alice&status=5xx&property=env:prod&from=2026-01-01&limit=20
    GET /admin/v1/usage?group_by=property:env&from=1767225600000&interval=1h
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from ..errors import GatewayError

GroupBy = Literal["user", "app", "model", "property"]

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_GROUPS = 500
DEFAULT_GROUPS = 20
# Usage without `from` looks back this far from `to`, so a time series has a bounded range.
DEFAULT_USAGE_RANGE_MS = 7 * 86_400_000
# Buckets a time series may have; a year of hours is too many for one chart.
MAX_BUCKETS = 2000
MAX_TEXT = 256
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_STATUS_CLASS = re.compile(r"^([1-5])xx$")
_CURSOR = re.compile(r"^(\d{1,15})_([0-9a-fA-F-]{36})$")
REQUEST_PARAMS = frozenset({"user", "app", "model", "status", "outcome", "from", "to", "property"})
LIST_PARAMS = REQUEST_PARAMS | {"limit", "offset", "cursor"}
USAGE_PARAMS = REQUEST_PARAMS | {"group_by", "interval", "limit"}


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which requests: every field None matches all; times are epoch milliseconds, `to` exclusive."""

    user: str | None = None
    app: str | None = None
    model: str | None = None
    status: int | None = None
    status_class: int | None = None
    outcome: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    property: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the previous page ended: the last row's start time and id (newest first)."""

    started_ms: int
    request_id: str

    def __str__(self) -> str:
        return f"{self.started_ms}_{self.request_id}"


@dataclass(frozen=True, slots=True)
class RequestPage:
    """A page of the request list: at most `limit` rows after `cursor`, or after `offset` rows."""

    filter: RequestFilter
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    cursor: Cursor | None = None


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Usage per group (the top `limit` by cost), optionally per `interval_s` bucket too."""

    filter: RequestFilter
    group_by: GroupBy
    since_ms: int
    until_ms: int
    property: str | None = None
    interval_s: int | None = None
    limit: int = DEFAULT_GROUPS


def invalid(param: str, expected: str, value: str) -> GatewayError:
    """A 400 that names the parameter, what it expects and what it got."""
    shown = value if len(value) <= 80 else value[:77] + "..."
    return GatewayError(
        400, f"Invalid value for parameter {param}: expected {expected}, got {shown!r}", param=param, code="invalid_parameter"
    )


def parse_request_page(params: Mapping[str, str]) -> RequestPage:
    """`GET /admin/v1/requests` parameters: the filter, `limit` (≤ 500) and `cursor` or `offset`."""
    _refuse_unknown(params, LIST_PARAMS)
    cursor_text, offset_text = params.get("cursor"), params.get("offset")
    if cursor_text and offset_text:
        raise invalid("cursor", "either cursor or offset, not both", cursor_text)
    return RequestPage(
        filter=parse_filter(params),
        limit=_int(params.get("limit"), "limit", 1, MAX_LIMIT, DEFAULT_LIMIT),
        offset=_int(offset_text, "offset", 0, 10_000_000, 0),
        cursor=parse_cursor(cursor_text) if cursor_text else None,
    )


def parse_usage_query(params: Mapping[str, str], now_ms: int | None = None) -> UsageQuery:
    """`GET /admin/v1/usage` parameters; `to` defaults to now and `from` to seven days before it."""
    _refuse_unknown(params, USAGE_PARAMS)
    group_text = params.get("group_by", "")
    property_name = None
    if group_text.startswith("property:") and len(group_text) > len("property:"):
        group_by: GroupBy = "property"
        property_name = _text(group_text[len("property:") :], "group_by")
    elif group_text in ("user", "app", "model"):
        group_by = group_text  # type: ignore[assignment]
    else:
        raise invalid("group_by", "user, app, model or property:<name>", group_text)
    filter = parse_filter(params)
    until = filter.until_ms if filter.until_ms is not None else (now_ms or int(time.time() * 1000))
    since = filter.since_ms if filter.since_ms is not None else until - DEFAULT_USAGE_RANGE_MS
    if since >= until:
        raise invalid("from", "a time before `to`", params.get("from", str(since)))
    interval = params.get("interval")
    interval_s = parse_duration(interval, "interval") if interval else None
    if interval_s is not None and (until - since) / (interval_s * 1000) > MAX_BUCKETS:
        raise invalid("interval", f"at most {MAX_BUCKETS} buckets between from and to", interval or "")
    return UsageQuery(
        filter=filter,
        group_by=group_by,
        property=property_name,
        since_ms=since,
        until_ms=until,
        interval_s=interval_s,
        limit=_int(params.get("limit"), "limit", 1, MAX_GROUPS, DEFAULT_GROUPS),
    )


def parse_filter(params: Mapping[str, str]) -> RequestFilter:
    """The filter parameters shared by the list and usage: user, app, model, status, outcome, from, to, property."""
    status, status_class = _status(params.get("status"))
    since = parse_instant(params["from"], "from") if params.get("from") else None
    until = parse_instant(params["to"], "to") if params.get("to") else None
    if since is not None and until is not None and since >= until:
        raise invalid("from", "a time before `to`", params["from"])
    prop = None
    if params.get("property"):
        name, sep, value = params["property"].partition(":")
        if not sep or not name:
            raise invalid("property", "name:value", params["property"])
        prop = (_text(name, "property"), _text(value, "property"))
    return RequestFilter(
        user=_optional_text(params.get("user"), "user"),
        app=_optional_text(params.get("app"), "app"),
        model=_optional_text(params.get("model"), "model"),
        status=status,
        status_class=status_class,
        outcome=_optional_text(params.get("outcome"), "outcome"),
        since_ms=since,
        until_ms=until,
        property=prop,
    )


def parse_instant(text: str, param: str) -> int:
    """Epoch milliseconds from digits, or from ISO 8601 (a time without offset is UTC)."""
    text = text.strip()
    if text.isdigit():
        if len(text) > 15:
            raise invalid(param, "an ISO 8601 time or epoch milliseconds", text)
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(param, "an ISO 8601 time or epoch milliseconds", text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_duration(text: str, param: str) -> int:
    """Seconds from `90`, `30s`, `5m`, `1h`, `7d` or `2w`; never zero."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0 or len(match.group(1)) > 9:
        raise invalid(param, "a duration like 30s, 5m, 1h, 7d or 2w", text)
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_cursor(text: str) -> Cursor:
    match = _CURSOR.match(text)
    if not match:
        raise invalid("cursor", "a next_cursor value from a previous page", text)
    return Cursor(int(match.group(1)), parse_request_id(match.group(2), "cursor"))


def parse_request_id(text: str, param: str = "id") -> str:
    """A request id in canonical UUID form."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise invalid(param, "a request id (UUID)", text) from None


def _status(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    match = _STATUS_CLASS.match(text.strip().lower())
    if match:
        return None, int(match.group(1))
    if text.isdigit() and 100 <= int(text) <= 599:
        return int(text), None
    raise invalid("status", "an HTTP status (429) or class (5xx)", text)


def _int(text: str | None, param: str, low: int, high: int, default: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise invalid(param, f"an integer from {low} to {high}", text)
    return int(text)


def _text(value: str, param: str) -> str:
    if len(value) > MAX_TEXT:
        raise invalid(param, f"at most {MAX_TEXT} characters", value)
    return value


def _optional_text(value: str | None, param: str) -> str | None:
    return None if value is None or value == "" else _text(value, param)


def _refuse_unknown(params: Mapping[str, str], known: frozenset[str]) -> None:
    # A misspelt filter (`users=alice`) would otherwise silently match everything.
    for name in params:
        if name not in known:
            raise GatewayError(
                400,
                f"Unknown parameter {name[:80]!r}; known: {', '.join(sorted(known))}",
                param=name[:80],
                code="unknown_parameter",
            )
