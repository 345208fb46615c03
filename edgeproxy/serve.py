"""Serving: one process, or N worker processes sharing one port through SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket

from aiohttp import web

from .app import create_app
from .settings import DEFAULT_UPSTREAM, Settings

log = logging.getLogger("edgeproxy.serve")


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; in-flight streams get `drain_seconds` to finish."""
    _warn_without_key(settings)
    if settings.server.workers == 1:
        _run_worker(settings, reuse_port=False)
        return 0
    return _run_workers(settings)


def _run_worker(settings: Settings, *, reuse_port: bool) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    server = settings.server
    log.info("edgeproxy listening on http://%s:%d (pid %d)", server.host, server.port, os.getpid())
    web.run_app(
        create_app(settings),
        host=server.host,
        port=server.port,
        reuse_port=reuse_port,
        shutdown_timeout=server.drain_seconds,
        access_log=None,
        print=None,
        # A client that goes away cancels its handler, and with it the upstream request.
        handler_cancellation=True,
        loop=loop,
    )


def _run_workers(settings: Settings) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_run_worker, args=(settings,), kwargs={"reuse_port": True}, name=f"edgeproxy-{i}")
        for i in range(settings.server.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    failed = [w.name for w in workers if w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed:
        log.error("workers exited with errors: %s", ", ".join(failed))
        return 1
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _warn_without_key(settings: Settings) -> None:
    target = settings.targets[settings.default_target]
    if target.api_key is None and target.base_url == DEFAULT_UPSTREAM:
        log.warning(
            "no provider key configured: clients must send their own Authorization header. "
            "Set OPENAI_API_KEY (or [targets.openai] api_key in the config) to inject one, "
            "or run `make demo` to try the gateway against the bundled mock provider."
        )
