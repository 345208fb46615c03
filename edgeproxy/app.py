"""Builds the aiohttp application: resources under typed AppKeys, opened and closed in cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from .admin.api import add_admin_routes
from .admin.metrics_port import metrics_listener
from .auth import Authenticate, KeyVerifier, has_key_material
from .budget import Budgets, SpendLedger, open_ledger
from .cache import CacheStage, open_store
from .logs.batcher import LogBatcher
from .logs.migrate import migrate
from .logs.spool import Spool
from .logs.store import LogStore, open_log_store, preload_client_modules
from .metrics import Metrics, render_metrics
from .observe import Observe
from .pipeline import Intake, chain, gateway_handler
from .policy import Police
from .pricing import PriceTable
from .ratelimit import PolicyBook, RateLimitStage, open_windows
from .revocation import RevocationList, open_revocations
from .routing import Router
from .settings import Settings
from .upstream import Forwarder, Upstreams

log = logging.getLogger("edgeproxy.app")

SETTINGS = web.AppKey("settings", Settings)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)
LOG_STORE = web.AppKey("log_store", LogStore)
LOG_BATCHER = web.AppKey("log_batcher", LogBatcher)
LIMITER = web.AppKey("limiter", RateLimitStage)
CACHE = web.AppKey("cache", CacheStage)
REVOCATIONS = web.AppKey("revocations", RevocationList)
LEDGER = web.AppKey("ledger", SpendLedger)
BUDGETS = web.AppKey("budgets", Budgets)


def create_app(settings: Settings) -> web.Application:
    """The gateway as an aiohttp Application; `make run` and the tests build it the same way."""
    # The body limit is enforced by Intake with a 413 in the provider's shape; aiohttp's own
    # limit is set just above it so a huge body is never buffered whole.
    # aiohttp's keep-alive timer also runs while a request head is being read (its only bound
    # on a slowloris head); the body is bounded by Intake.
    handler_args = {
        "max_field_size": 16384,
        "keepalive_timeout": settings.server.idle_seconds,
        "logger": MalformedRequestLog(logging.getLogger("aiohttp.server"), {}),
    }
    app = web.Application(client_max_size=settings.server.max_body_bytes + 1, handler_args=handler_args)
    app[SETTINGS] = settings
    app[UPSTREAMS] = Upstreams(settings)
    app[STATE] = {"ready": False}
    prices = PriceTable.from_settings(settings)
    app[METRICS] = metrics = Metrics.for_settings(CollectorRegistry(), settings, prices)
    batcher = _open_log(app, settings, metrics) if settings.logs.enabled else None
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    app[LIMITER] = RateLimitStage(
        settings.ratelimit, PolicyBook(settings.apps), open_windows(settings.ratelimit, metrics), prices, metrics
    )
    app[CACHE] = CacheStage(
        settings.cache, open_store(settings.cache, metrics), prices, stall_seconds=settings.timeouts.idle
    )
    app.cleanup_ctx.append(_limits_and_cache_ctx)
    verifier = KeyVerifier(settings.auth) if has_key_material(settings.auth) else None
    app[REVOCATIONS] = open_revocations(settings, metrics)
    app[LEDGER] = open_ledger(settings, metrics)
    app[BUDGETS] = Budgets(settings, app[LEDGER], prices, metrics)
    app.cleanup_ctx.append(_auth_and_budget_ctx)
    app.cleanup_ctx.append(_ready_ctx)

    capture_limit = max(settings.logs.body_max_bytes * 4, 1024 * 1024)
    pipeline = chain(
        [
            Observe(batcher, prices, metrics, settings.logs.body_max_bytes),
            Intake(settings, capture_limit),
            Authenticate(settings.auth, verifier, app[REVOCATIONS]),
            Police(settings.apps, metrics),
            app[LIMITER],
            app[BUDGETS],
            app[CACHE],
        ],
        Forwarder(settings, app[UPSTREAMS], Router(settings.routes), metrics),
    )
    handler = gateway_handler(pipeline)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if settings.metrics.enabled and settings.metrics.port:
        app.cleanup_ctx.append(metrics_listener(metrics, settings))
    elif settings.metrics.enabled:
        app.router.add_get("/metrics", _metrics)
    # Before the catch-all `/{target}/v1/…`, which `/admin/v1/…` would match too.
    add_admin_routes(app.router, app.get(LOG_STORE), settings.admin.admin_key)
    app.router.add_route("*", "/v1/{tail:.*}", handler)
    app.router.add_route("*", "/{target}/v1/{tail:.*}", handler)
    return app


def _open_log(app: web.Application, settings: Settings, metrics: Metrics) -> LogBatcher:
    """The request log: store, spool and batcher; migrations run (and retry) in the background."""
    logs = settings.logs
    preload_client_modules(embedded=not logs.clickhouse_url)
    store = open_log_store(logs, settings.data_dir)
    spool = Spool(settings.data_dir / "spool", logs.spool_max_bytes)
    batcher = LogBatcher(
        store, spool, logs, prepare=lambda: migrate(store, ttl_days=logs.ttl_days), on_flush=metrics.observe_log_flush
    )
    metrics.watch_log_stats(lambda: batcher.stats)
    app[LOG_STORE] = store
    app[LOG_BATCHER] = batcher
    app.cleanup_ctx.append(_log_ctx)
    return batcher


class MalformedRequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log, minus the request bytes it quotes when it refuses a malformed request.

    Those bytes are the offending header line, which may carry a credential; the client gets
    its 400 either way, and a flood of them logs one line each, without a traceback.
    """

    def log(self, level: int, msg: object, *args: object, exc_info: object = None, **kwargs: object) -> None:
        if isinstance(exc_info, HttpProcessingError):
            msg = "refused a malformed request from %s (%s, HTTP %s)"
            args = (args[0] if args else "?", type(exc_info).__name__, exc_info.code)
            level, exc_info = logging.INFO, None
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


async def _log_ctx(app: web.Application) -> AsyncIterator[None]:
    batcher, store = app[LOG_BATCHER], app[LOG_STORE]
    await batcher.start()
    yield
    # Runs after aiohttp drained in-flight requests, so their records are already queued.
    await batcher.close(timeout=app[SETTINGS].server.drain_seconds)
    await store.close()


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[UPSTREAMS].close()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[METRICS].sync_periodically())
    yield
    task.cancel()


async def _limits_and_cache_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[LIMITER].start()
    yield
    await app[CACHE].close()
    await app[LIMITER].close()


async def _auth_and_budget_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[REVOCATIONS].close()
    await app[LEDGER].close()


async def _ready_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STATE]["ready"] = True
    yield
    app[STATE]["ready"] = False


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[STATE]["ready"]
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render_metrics(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": content_type})
