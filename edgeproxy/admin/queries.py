"""The admin reads of the request log: SQL with every value bound, rows turned into JSON-ready dicts.

The same SQL runs on embedded chDB and on a ClickHouse server. Rows may repeat until parts merge
(a replayed spool batch), so every read says `FINAL`. Table and column names come from the code
and the validated settings, never from a request; request values travel as `{name:Type}` bindings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from ..logs.record import COLUMNS
from ..logs.store import LogStore
from .filters import Cursor, RequestFilter, RequestPage, UsageQuery

# The list leaves out the bodies and params (the detail view has them): a page stays small.
LIST_COLUMNS = tuple(c for c in COLUMNS if c not in ("params", "request_body", "response_body", "reserved_usd"))
_MILLISECOND_COLUMNS = frozenset({"latency_ms", "ttfb_ms", "upstream_ms", "gateway_ms"})
_USD_COLUMNS = frozenset({"cost_usd", "cost_saved_usd", "reserved_usd"})
_GROUP_KEYS = {"user": "user_id", "app": "app_id", "model": "model", "property": "properties[{group_property:String}]"}
# Aliases differ from column names: ClickHouse's old analyzer (before 24.3, or with it switched
# off) reads `cost_usd` inside `countIf(cost_usd IS NULL)` as the alias, an aggregate in an aggregate.
_AGGREGATES = """
    count() AS n,
    sum(coalesce(prompt_tokens, 0)) AS prompt,
    sum(coalesce(completion_tokens, 0)) AS completion,
    sum(coalesce(cost_usd, 0)) AS cost,
    sum(coalesce(cost_saved_usd, 0)) AS saved,
    countIf(cost_usd IS NULL AND prompt_tokens IS NOT NULL) AS unpriced,
    countIf(status >= 400) AS failed,
    countIf(cache = 'HIT') AS hits,
    quantiles(0.5, 0.95)(latency_ms) AS latency"""


class AdminQueries:
    """The request list, one request, and usage per group, read from a LogStore."""

    def __init__(self, store: LogStore) -> None:
        self._store = store
        self._table = f"{store.qualified} FINAL"

    async def list_requests(self, page: RequestPage) -> dict[str, Any]:
        """Newest first; `next_cursor` continues after the last row (null on the last page)."""
        where, params = filter_sql(page.filter)
        if page.cursor is not None:
            where.append(
                "(started_at, request_id) < (fromUnixTimestamp64Milli({cursor_ms:Int64}, 'UTC'), {cursor_id:UUID})"
            )
            params.update(cursor_ms=page.cursor.started_ms, cursor_id=page.cursor.request_id)
        # One row more than asked tells whether another page exists.
        params.update(limit=page.limit + 1, offset=page.offset)
        sql = (
            f"SELECT {', '.join(LIST_COLUMNS)} FROM {self._table} {_where(where)} "
            "ORDER BY started_at DESC, request_id DESC LIMIT {limit:UInt32} OFFSET {offset:UInt64}"
        )
        rows = await self._store.query(sql, params)
        more = len(rows) > page.limit
        rows = rows[: page.limit]
        cursor = str(Cursor(_epoch_ms(rows[-1]["started_at"]), str(rows[-1]["request_id"]))) if more else None
        return {"object": "list", "data": [record_json(row) for row in rows], "has_more": more, "next_cursor": cursor}

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """One full record, bodies and params included; None when no such request was logged."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM {self._table} WHERE request_id = {{id:UUID}} LIMIT 1"
        rows = await self._store.query(sql, {"id": request_id})
        return record_json(rows[0]) if rows else None

    async def usage(self, query: UsageQuery) -> dict[str, Any]:
        """Totals, the top groups by cost, and (with an interval) each top group per time bucket."""
        window = dataclasses.replace(query.filter, since_ms=query.since_ms, until_ms=query.until_ms)
        where, params = filter_sql(window)
        key = _GROUP_KEYS[query.group_by]
        if query.property is not None:
            params["group_property"] = query.property
        totals = await self._store.query(f"SELECT {_AGGREGATES} FROM {self._table} {_where(where)}", params)
        groups = await self._store.query(
            f"SELECT {key} AS group_key, {_AGGREGATES} FROM {self._table} {_where(where)} "
            "GROUP BY group_key ORDER BY cost DESC, n DESC, group_key LIMIT {limit:UInt32}",
            {**params, "limit": query.limit},
        )
        result: dict[str, Any] = {
            "object": "usage",
            "group_by": query.group_by if query.property is None else f"property:{query.property}",
            "from": _iso_ms(query.since_ms),
            "to": _iso_ms(query.until_ms),
            "interval_seconds": query.interval_s,
            "totals": usage_json(totals[0]),
            "groups": [{"key": row["group_key"], **usage_json(row)} for row in groups],
        }
        if query.interval_s is not None:
            result["series"] = await self._series(query, key, where, params, [row["group_key"] for row in groups])
        return result

    async def _series(
        self, query: UsageQuery, key: str, where: list[str], params: dict[str, Any], keys: list[str]
    ) -> list[dict[str, Any]]:
        if not keys:
            return []
        sql = (
            "SELECT toStartOfInterval(started_at, toIntervalSecond({interval_s:UInt32})) AS bucket, "
            f"{key} AS group_key, {_AGGREGATES} FROM {self._table} "
            f"{_where([*where, f'{key} IN {{group_keys:Array(String)}}'])} "
            "GROUP BY bucket, group_key ORDER BY bucket, group_key"
        )
        rows = await self._store.query(sql, {**params, "interval_s": query.interval_s, "group_keys": keys})
        return [{"time": _iso(row["bucket"]), "key": row["group_key"], **usage_json(row)} for row in rows]


def filter_sql(f: RequestFilter) -> tuple[list[str], dict[str, Any]]:
    """WHERE conditions and their bindings for a filter; names and values are all bound."""
    where: list[str] = []
    params: dict[str, Any] = {}
    for value, condition, name in (
        (f.user, "user_id = {user:String}", "user"),
        (f.app, "app_id = {app:String}", "app"),
        (f.model, "model = {model:String}", "model"),
        (f.outcome, "outcome = {outcome:String}", "outcome"),
        (f.status, "status = {status:UInt16}", "status"),
        (f.status_class, "intDiv(status, 100) = {status_class:UInt8}", "status_class"),
        (f.since_ms, "started_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')", "since_ms"),
        (f.until_ms, "started_at < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')", "until_ms"),
    ):
        if value is not None:
            where.append(condition)
            params[name] = value
    if f.property is not None:
        # mapContains too: a missing key reads as '', which must not match `name:`.
        where.append(
            "mapContains(properties, {property_name:String}) AND properties[{property_name:String}] = {property_value:String}"
        )
        params.update(property_name=f.property[0], property_value=f.property[1])
    return where, params


def record_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A log row as JSON-ready values: ids and times as strings, Float32 noise rounded away."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if value is None:
            out[name] = None
        elif name == "request_id":
            out[name] = str(value)
        elif name == "started_at":
            out[name] = _iso(value)
        elif name in _MILLISECOND_COLUMNS:
            out[name] = round(float(value), 3)
        elif name in _USD_COLUMNS:
            out[name] = round(float(value), 10)
        elif name == "params":
            out[name] = _json_or_text(value)
        elif name == "properties":
            out[name] = dict(value)
        else:
            out[name] = value
    return out


def usage_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """One aggregate row as the usage API's fields; rates are null where nothing was counted."""
    requests = int(row["n"])
    p50, p95 = (list(row["latency"]) + [math.nan, math.nan])[:2]
    return {
        "requests": requests,
        "prompt_tokens": int(row["prompt"]),
        "completion_tokens": int(row["completion"]),
        "cost_usd": round(float(row["cost"]), 10),
        "cost_saved_usd": round(float(row["saved"]), 10),
        "unpriced_requests": int(row["unpriced"]),
        "errors": int(row["failed"]),
        "error_rate": round(row["failed"] / requests, 6) if requests else None,
        "cache_hits": int(row["hits"]),
        "cache_hit_rate": round(row["hits"] / requests, 6) if requests else None,
        "p50_latency_ms": _finite(p50),
        "p95_latency_ms": _finite(p95),
    }


def _where(conditions: Sequence[str]) -> str:
    return "WHERE " + " AND ".join(f"({c})" for c in conditions) if conditions else ""


def _finite(value: float) -> float | None:
    return round(float(value), 3) if value is not None and math.isfinite(value) else None


def _json_or_text(value: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


def _utc(moment: datetime) -> datetime:
    """clickhouse-connect returns naive UTC datetimes; make them aware (and UTC if they were not)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    """`2026-01-01T00:00:00.123Z`."""
    return _utc(moment).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _iso_ms(epoch_ms: int) -> str:
    return _iso(datetime.fromtimestamp(epoch_ms / 1000, UTC))


def _epoch_ms(moment: datetime) -> int:
    return round(_utc(moment).timestamp() * 1000)
