"""`[metrics] port`: serve `/metrics` on a port of its own, apart from the API clients reach.

A tiny second aiohttp application, started and stopped in the gateway's cleanup_ctx. With
several workers each binds the port with SO_REUSEPORT; every scrape renders all workers'
values (prometheus-client's multi-process files), whichever worker it reaches.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..metrics import Metrics, render_metrics
from ..settings import Settings

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def metrics_listener(metrics: Metrics, settings: Settings) -> CleanupContext:
    """A cleanup_ctx entry serving `metrics` at `http://<server.host>:<metrics.port>/metrics`."""

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = render_metrics(metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def listen(app: web.Application) -> AsyncIterator[None]:
        scraper = web.Application()
        scraper.router.add_get("/metrics", scrape)
        runner = web.AppRunner(scraper, access_log=None, shutdown_timeout=1)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, settings.server.host, settings.metrics.port, reuse_port=settings.server.workers > 1 or None
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        yield
        await runner.cleanup()

    return listen
