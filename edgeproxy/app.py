"""Builds the aiohttp application: resources under typed AppKeys, opened and closed in cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .observe import Observe
from .pipeline import Intake, chain, gateway_handler
from .pricing import PriceTable
from .settings import Settings
from .upstream import Forwarder, Upstreams

log = logging.getLogger("edgeproxy.app")

SETTINGS = web.AppKey("settings", Settings)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
STATE = web.AppKey("state", dict)


def create_app(settings: Settings) -> web.Application:
    """The gateway as an aiohttp Application; `make run` and the tests build it the same way."""
    # The body limit is enforced by Intake with a 413 in the provider's shape; aiohttp's own
    # limit is set just above it so a huge body is never buffered whole.
    app = web.Application(client_max_size=settings.server.max_body_bytes + 1, handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    app[UPSTREAMS] = Upstreams(settings)
    app[STATE] = {"ready": False}
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_ready_ctx)

    prices = PriceTable(settings.prices)
    capture_limit = max(settings.logs.body_max_bytes * 4, 1024 * 1024)
    pipeline = chain(
        [
            Observe(None, prices, None, settings.logs.body_max_bytes),
            Intake(settings, capture_limit),
        ],
        Forwarder(settings, app[UPSTREAMS]),
    )
    handler = gateway_handler(pipeline)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_route("*", "/v1/{tail:.*}", handler)
    app.router.add_route("*", "/{target}/v1/{tail:.*}", handler)
    return app


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[UPSTREAMS].close()


async def _ready_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STATE]["ready"] = True
    yield
    app[STATE]["ready"] = False


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[STATE]["ready"]
    return web.json_response({"ready": ready}, status=200 if ready else 503)
