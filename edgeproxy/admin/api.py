"""The admin API and page: `/admin/v1/requests`, `/admin/v1/requests/{id}`, `/admin/v1/usage`, `/admin/`.

Access: `Authorization: Bearer <admin.admin_key>` (env `EDGEPROXY_ADMIN_KEY`). With no key
configured the API answers loopback clients only, judged by the socket's peer address (a
reverse proxy on the same host is loopback too: set a key before exposing the gateway).
Refusals are 401 (missing or wrong key) or 403 (no key configured, remote client), in the
provider's error shape. The page itself is static and holds no data; it reads the API.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ..errors import GatewayError
from ..logs.store import LogStore
from .filters import parse_request_id, parse_request_page, parse_usage_query
from .queries import AdminQueries

log = logging.getLogger("edgeproxy.admin")

STATIC_DIR = Path(__file__).with_name("static")
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The page renders logged prompts, which anyone calling the gateway controls: no inline script,
# nothing from elsewhere, no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def client_allowed(admin_key: str | None, authorization: str, remote: str | None) -> None:
    """Raise the 401/403 GatewayError unless this client may use the admin API."""
    if admin_key is None:
        if not _is_loopback(remote):
            raise GatewayError(
                403,
                "The admin API answers only loopback clients until admin.admin_key (EDGEPROXY_ADMIN_KEY) is set",
                type="invalid_request_error",
                code="admin_key_not_configured",
            )
        return
    scheme, _, token = authorization.strip().partition(" ")
    given = token.strip().encode()
    # compare_digest takes time independent of where the values differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, admin_key.encode()):
        raise GatewayError(
            401,
            "Invalid or missing admin key (send Authorization: Bearer <admin key>)",
            type="invalid_request_error",
            code="invalid_admin_key",
            headers={"WWW-Authenticate": 'Bearer realm="edgeproxy-admin"'},
        )


def log_unavailable(exc: Exception) -> GatewayError:
    """The 503 for a failed read; a log not migrated yet (a gateway's first second) says so."""
    text = str(exc)
    if "UNKNOWN_DATABASE" in text or "UNKNOWN_TABLE" in text:
        message = "The request log has no table yet: the gateway creates it on its first flush (or run `edgeproxy migrate`)"
    else:
        log.warning("admin read of the request log failed: %s", exc)
        message = f"The request log could not be read ({type(exc).__name__})"
    return GatewayError(503, message, type="server_error", code="log_unavailable")


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class AdminApi:
    """The JSON handlers; `queries` is None when the request log is disabled."""

    def __init__(self, queries: AdminQueries | None, admin_key: str | None) -> None:
        self._queries = queries
        self._admin_key = admin_key

    async def list_requests(self, request: web.Request) -> web.Response:
        page = parse_request_page(request.query)
        return _json(await self._read(lambda q: q.list_requests(page)))

    async def get_request(self, request: web.Request) -> web.Response:
        request_id = parse_request_id(request.match_info["id"])
        record = await self._read(lambda q: q.get_request(request_id))
        if record is None:
            raise GatewayError(404, f"No request {request_id} in the log", code="request_not_found")
        return _json(record)

    async def usage(self, request: web.Request) -> web.Response:
        query = parse_usage_query(request.query)
        return _json(await self._read(lambda q: q.usage(query)))

    def guarded(self, handler: Handler) -> Handler:
        """`handler` behind the admin-key check, its GatewayErrors rendered in the provider's shape."""

        async def run(request: web.Request) -> web.StreamResponse:
            try:
                client_allowed(self._admin_key, request.headers.get("Authorization", ""), request.remote)
                return await handler(request)
            except GatewayError as err:
                response = err.response()
                response.headers.update(_API_HEADERS)
                return response

        return run

    async def _read(self, call: Callable[[AdminQueries], Awaitable[Any]]) -> Any:
        if self._queries is None:
            raise GatewayError(503, "The request log is disabled (logs.enabled = false)", type="server_error", code="log_disabled")
        try:
            return await call(self._queries)
        except Exception as exc:  # the store's errors are many (network, schema, engine): all mean "unavailable"
            raise log_unavailable(exc) from exc


class AdminPage:
    """The built-in page: index.html and its two assets, read once, served with a strict CSP."""

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self._index = (directory / "index.html").read_bytes()
        self._assets = {name: (directory / name).read_bytes() for name in _ASSETS}

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._index, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            raise web.HTTPNotFound()
        return web.Response(body=self._assets[name], content_type=_ASSETS[name], charset="utf-8", headers=_PAGE_HEADERS)

    async def redirect(self, request: web.Request) -> web.Response:
        # Relative, so the page also works behind a proxy that mounts the gateway under a prefix.
        raise web.HTTPMovedPermanently("admin/")


def add_admin_routes(router: web.UrlDispatcher, store: LogStore | None, admin_key: str | None) -> None:
    """Register the admin API and page; call before the gateway's catch-all `/{target}/v1/…` route."""
    api = AdminApi(AdminQueries(store) if store is not None else None, admin_key)
    page = AdminPage()
    router.add_get("/admin/v1/requests", api.guarded(api.list_requests))
    router.add_get("/admin/v1/requests/{id}", api.guarded(api.get_request))
    router.add_get("/admin/v1/usage", api.guarded(api.usage))
    router.add_get("/admin", page.redirect)
    router.add_get("/admin/", page.index)
    router.add_get("/admin/static/{name}", page.asset)


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json", headers=_API_HEADERS)
