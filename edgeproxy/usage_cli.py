"""`edgeproxy usage` and `edgeproxy requests`: the request log as aligned tables in the terminal.

    edgeproxy usage --by user --since 7d                  # spend, tokens, errors, latency per user
    edgeproxy usage --by property:env --since 24h --interval 1h
    edgeproxy requests --user alice --last 20             # newest first
    edgeproxy requests --id 3f9c…                         # one request with its prompt and response

Where the rows come from (one rule): with `--url` (env `EDGEPROXY_ADMIN_URL`) the commands ask
a running gateway's admin API, sending `--admin-key` (env `EDGEPROXY_ADMIN_KEY`, or the config's
`admin.admin_key`); without it they read the configured log store themselves: the ClickHouse
server of `logs.clickhouse_url`, or the embedded store under `--data-dir`. A chDB folder opens
in one process at a time, so while a gateway runs on the embedded store, use `--url`.
Both paths parse the same query parameters and run the same queries, so they print the same.
`--json` prints the API's JSON instead of a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from .admin.filters import parse_duration, parse_request_id, parse_request_page, parse_usage_query
from .errors import GatewayError
from .settings import Settings

URL_ENV = "EDGEPROXY_ADMIN_URL"
_FILTERS = ("user", "app", "model", "status", "outcome", "property")
_CELL_MAX = 40


class CommandError(Exception):
    """A failure to report on stderr; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class LogSource(Protocol):
    """`resource` is `requests`, `requests/<id>` or `usage`; `params` are the admin API's query parameters."""

    def fetch(self, resource: str, params: Mapping[str, str]) -> dict[str, Any]: ...


class ApiSource:
    """Reads through a gateway's admin API (stdlib HTTP: a one-shot command needs no event loop)."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        self._base = url.rstrip("/") + "/admin/v1/"
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        # No proxy from the environment, as the gateway's own HTTP clients.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(self, resource: str, params: Mapping[str, str]) -> dict[str, Any]:
        url = self._base + resource + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with self._opener.open(urllib.request.Request(url, headers=self._headers), timeout=60) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise CommandError(f"cannot reach {self._base}: {reason}") from exc
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CommandError(f"{self._base}{resource} answered {status} without JSON") from None
        if status != 200:
            message = data.get("error", {}).get("message", "") if isinstance(data, dict) else ""
            raise CommandError(f"the gateway answered {status}: {message}", 2 if status == 400 else 1)
        return dict(data)


class StoreSource:
    """Reads the log store directly, with the admin API's parsers and queries."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def fetch(self, resource: str, params: Mapping[str, str]) -> dict[str, Any]:
        return asyncio.run(self._fetch(resource, params))

    async def _fetch(self, resource: str, params: Mapping[str, str]) -> dict[str, Any]:
        # Imported here: clickhouse-connect (and chDB) load only for a direct read.
        from .admin.queries import AdminQueries
        from .logs.store import open_log_store

        store = open_log_store(self._settings.logs, self._settings.data_dir)
        queries = AdminQueries(store)
        try:
            if resource == "usage":
                return await queries.usage(parse_usage_query(params))
            if resource == "requests":
                return await queries.list_requests(parse_request_page(params))
            request_id = resource.removeprefix("requests/")
            record = await queries.get_request(request_id)
        except GatewayError as err:
            raise CommandError(err.message, 2) from None
        except Exception as exc:  # the engine's errors are many; all mean "could not read"
            raise CommandError(f"could not read the request log at {store.name}: {_first_line(exc)}") from exc
        finally:
            await store.close()
        if record is None:
            raise CommandError(f"no request {request_id} in the log")
        return record


def add_usage_commands(commands: Any) -> None:
    """Register `usage` and `requests` on the CLI's subcommand parser."""
    usage = commands.add_parser(
        "usage", help="requests, tokens, spend, errors and latency per user, app, model or property"
    )
    usage.add_argument("--by", default="user", help="user, app, model or property:NAME (default user)")
    usage.add_argument("--interval", help="also show each group per bucket of this size: 1h, 1d, …")
    usage.add_argument("--top", type=int, default=20, help="groups to show, by spend (default 20, at most 500)")
    usage.set_defaults(run=_usage)

    requests = commands.add_parser("requests", help="the request log, newest first; --id shows one in full")
    requests.add_argument("--last", type=int, default=20, help="how many (default 20, at most 500)")
    requests.add_argument("--id", help="show this request in full: prompt, response, params")
    requests.set_defaults(run=_requests)

    for command in (usage, requests):
        for name in ("user", "app", "model", "outcome"):
            command.add_argument(f"--{name}", help=f"only this {name}")
        command.add_argument("--status", help="only this status (429) or class (5xx)")
        command.add_argument("--property", help="only requests whose property NAME has VALUE, as NAME:VALUE")
        command.add_argument("--since", help="start: a duration back from now (7d, 12h) or an ISO time")
        command.add_argument("--until", help="end: a duration back from now or an ISO time (default now)")
        command.add_argument("--json", action="store_true", help="print the admin API's JSON")
        command.add_argument("--url", default=os.environ.get(URL_ENV), help=f"a gateway's base URL (env {URL_ENV})")
        command.add_argument("--admin-key", help="the gateway's admin key (env EDGEPROXY_ADMIN_KEY)")
        command.add_argument("--data-dir", help="the embedded store's folder, without --url (env EDGEPROXY_DATA_DIR)")


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    def params() -> dict[str, str]:
        found = {**_filter_params(args), "group_by": args.by, "limit": str(args.top)}
        if args.interval:
            found["interval"] = args.interval
        return found

    return _run(args, settings, "usage", params, usage_text)


def _requests(args: argparse.Namespace, settings: Settings) -> int:
    if args.id:
        try:
            request_id = parse_request_id(args.id, "--id")
        except GatewayError as err:
            print(f"edgeproxy: {err.message}", file=sys.stderr)
            return 2
        return _run(args, settings, f"requests/{request_id}", dict, record_text)
    return _run(
        args,
        settings,
        "requests",
        lambda: {**_filter_params(args), "limit": str(args.last)},
        lambda data: requests_text(data["data"]),
    )


def _run(
    args: argparse.Namespace,
    settings: Settings,
    resource: str,
    params: Callable[[], Mapping[str, str]],
    show: Callable[[dict[str, Any]], str],
) -> int:
    try:
        data = _source(args, settings).fetch(resource, params())
    except CommandError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return exc.code
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else show(data))
    return 0


def _source(args: argparse.Namespace, settings: Settings) -> LogSource:
    """The admin API with --url; else the configured store (not created by reading, when embedded)."""
    if args.url:
        return ApiSource(args.url, args.admin_key or settings.admin.admin_key)
    # open_log_store keeps the embedded store in <data_dir>/clickhouse.
    folder = settings.data_dir / "clickhouse"
    if not settings.logs.clickhouse_url and not folder.is_dir():
        raise CommandError(f"no embedded request log in {folder}: pass --data-dir, or --url for a running gateway")
    return StoreSource(settings)


def _filter_params(args: argparse.Namespace) -> dict[str, str]:
    params = {name: getattr(args, name) for name in _FILTERS if getattr(args, name)}
    now_ms = int(time.time() * 1000)
    for flag, param in (("since", "from"), ("until", "to")):
        value = getattr(args, flag)
        if value:
            params[param] = _instant(value, flag, now_ms)
    return params


def _instant(text: str, flag: str, now_ms: int) -> str:
    """A duration back from now (`7d`) becomes epoch ms; anything else goes to the API as given."""
    if text[-1:].isalpha() and text[:-1].isdigit():
        try:
            return str(now_ms - parse_duration(text, flag) * 1000)
        except GatewayError as err:
            raise CommandError(f"--{flag}: {err.message}", 2) from None
    return text


# --- rendering ----------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in `right` right-aligned."""
    cells = [[_cell(value) for value in row] for row in [list(headers), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [value.rjust(widths[i]) if i in right else value.ljust(widths[i]) for i, value in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def requests_text(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no requests match"
    headers = ("TIME (UTC)", "REQUEST ID", "USER", "APP", "MODEL", "STATUS", "OUTCOME", "MS", "TOKENS", "COST USD", "CACHE")
    table = [
        (
            _time(row["started_at"]),
            row["request_id"],
            row["user_id"] or "-",
            row["app_id"] or "-",
            row["model"] or "-",
            str(row["status"]),
            row["outcome"],
            _number(row["latency_ms"], 1),
            _tokens(row),
            _usd(row["cost_usd"]),
            row["cache"] or "-",
        )
        for row in rows
    ]
    return render_table(headers, table, frozenset({5, 7, 8, 9}))


def usage_text(data: Mapping[str, Any]) -> str:
    group = str(data["group_by"]).upper()
    headers = (group, "REQUESTS", "PROMPT TOK", "COMPL TOK", "COST USD", "ERRORS", "CACHE HIT", "P50 MS", "P95 MS")
    right = frozenset(range(1, len(headers)))
    rows = [_usage_row(row["key"] or "(none)", row) for row in data["groups"]]
    rows.append(_usage_row("TOTAL", data["totals"]))
    title = f"usage by {data['group_by']}, {_time(data['from'])} to {_time(data['to'])} UTC"
    parts = [title, "", render_table(headers, rows, right)]
    if data.get("series") is not None:
        series_headers = ("BUCKET (UTC)", group, *headers[1:])
        series = [(_time(row["time"]), *_usage_row(row["key"] or "(none)", row)) for row in data["series"]]
        every = _interval(data["interval_seconds"])
        parts += ["", f"per {every}", render_table(series_headers, series, frozenset(range(2, 10)))]
    return "\n".join(parts)


def record_text(record: Mapping[str, Any]) -> str:
    """One request: its fields as `name: value` lines, then the prompt and the response."""
    width = max(len(name) for name in record)
    lines = []
    for name, value in record.items():
        if name in ("request_body", "response_body"):
            continue
        shown = orjson.dumps(value).decode() if isinstance(value, (dict, list)) else ("-" if value is None else str(value))
        lines.append(f"{name.ljust(width)}  {shown}".rstrip())
    for name in ("request_body", "response_body"):
        lines += ["", f"--- {name} ---", _pretty(record.get(name))]
    return "\n".join(lines)


def _usage_row(key: str, row: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        key,
        str(row["requests"]),
        str(row["prompt_tokens"]),
        str(row["completion_tokens"]),
        _usd(row["cost_usd"]),
        f"{row['errors']} ({_percent(row['error_rate'])})",
        _percent(row["cache_hit_rate"]),
        _number(row["p50_latency_ms"], 1),
        _number(row["p95_latency_ms"], 1),
    )


def _interval(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cell(value: str) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= _CELL_MAX else value[: _CELL_MAX - 1] + "…"


def _time(iso: str) -> str:
    return iso.replace("T", " ")[:19]


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _tokens(row: Mapping[str, Any]) -> str:
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    return "-" if prompt is None and completion is None else f"{prompt or 0}/{completion or 0}"


def _pretty(body: str | None) -> str:
    if body is None:
        return "(not logged)"
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return body


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
