"""Serving: one process, or N worker processes sharing one port through SO_REUSEPORT.

With workers, the master process owns what only one process may hold: the embedded log store
(a chDB folder opens in one process only), which it serves to the workers over ClickHouse's
HTTP protocol when no `logs.clickhouse_url` is set, and the folder of Prometheus value files
the workers share. `.app` is imported only inside the workers: prometheus_client reads
PROMETHEUS_MULTIPROC_DIR once, on import, so the master sets it first.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

from aiohttp import web

from .settings import DEFAULT_UPSTREAM, Settings

log = logging.getLogger("edgeproxy.serve")

# Named here rather than imported from .metrics, whose import would load prometheus_client.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_SERVER_START_SECONDS = 30.0
# Containers allocated, net of those freed, between youngest-generation collections (CPython's
# default is 700). A request allocates and frees thousands of them, so at 700 the collector ran
# several times per request batch and cost ~8% of a worker's CPU under load (bench/); at 10 000
# it runs ~80x less often. Objects of finished requests are freed by reference counting anyway.
GC_YOUNG_THRESHOLD = 10_000


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; in-flight streams get `drain_seconds` to finish."""
    _warn_without_key(settings)
    if settings.server.workers == 1:
        _run_worker(settings, reuse_port=False)
        return 0
    return _run_workers(settings)


def _run_worker(settings: Settings, *, reuse_port: bool) -> None:
    from .app import create_app

    if reuse_port:
        _terminate_with_parent()

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    server = settings.server
    log.info("edgeproxy listening on http://%s:%d (pid %d)", server.host, server.port, os.getpid())
    app = create_app(settings)
    tune_collector()
    web.run_app(
        app,
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


def tune_collector() -> None:
    """Set the garbage collector up for serving; call once the app is built, before traffic."""
    # Long-lived startup objects (modules, settings, pools) move out of the collector's sight,
    # so the full collections that run under load stay short: fewer multi-ms tail latencies.
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def _run_workers(settings: Settings) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    metrics_dir = _prepare_metrics_dir(settings)
    try:
        with _log_owner(settings) as worker_settings:
            workers = _spawn_and_wait(worker_settings)
    except _LogOwnerError as exc:
        log.error("%s", exc)
        return 2
    from .metrics import mark_worker_dead

    for worker in workers:
        if worker.pid is not None:
            mark_worker_dead(worker.pid, metrics_dir)
    failed = [w.name for w in workers if w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed:
        log.error("workers exited with errors: %s", ", ".join(failed))
        return 1
    return 0


def _spawn_and_wait(settings: Settings) -> list[BaseProcess]:
    """Start the workers, forward SIGTERM/SIGINT to them, and return once all have exited."""
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = [
        context.Process(target=_run_worker, args=(settings,), kwargs={"reuse_port": True}, name=f"edgeproxy-{i}")
        for i in range(settings.server.workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return workers


def _prepare_metrics_dir(settings: Settings) -> str:
    """Point every worker's prometheus_client at one folder of value files, emptied of a previous run's."""
    directory = os.environ.get(MULTIPROC_ENV) or str(settings.data_dir.resolve() / "metrics")
    # Set before anything imports prometheus_client; spawned workers inherit it.
    os.environ[MULTIPROC_ENV] = directory
    from .metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir(directory)
    return directory


class _LogOwnerError(RuntimeError):
    """The master could not take the embedded log store (another process holds it, or it broke)."""


@contextmanager
def _log_owner(settings: Settings) -> Iterator[Settings]:
    """The workers' settings: with an embedded log, pointed at a server this process runs over its folder.

    The server stops only after the `with` body, i.e. after the workers exited and drained their
    queues into it.
    """
    logs = settings.logs
    if not logs.enabled or logs.clickhouse_url:
        yield settings
        return
    from .logs.embedded_server import EmbeddedServer
    from .logs.store import embedded_folder

    folder = embedded_folder(settings.data_dir)
    server = EmbeddedServer(folder, password=secrets.token_urlsafe(24), engine_nice=logs.engine_nice)
    try:
        server.start()
        _wait_until_answering(f"http://127.0.0.1:{server.port}/ping", LOG_SERVER_START_SECONDS)
    except Exception as exc:
        server.stop()
        raise _LogOwnerError(f"cannot serve the embedded log store {folder} to the workers: {exc}") from exc
    log.info("request log: embedded store %s served to the workers on 127.0.0.1:%d", folder, server.port)
    try:
        yield dataclasses.replace(settings, logs=dataclasses.replace(logs, clickhouse_url=server.url))
    finally:
        server.stop()


def _wait_until_answering(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _terminate_with_parent() -> None:
    """A worker whose master dies (even by kill -9) gets SIGTERM and drains, instead of living on orphaned."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the master died before the call above took effect
        os.kill(os.getpid(), signal.SIGTERM)


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
