"""Shared fixtures: the mock provider and gateways on loopback ports, built as `make run` builds them."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bench.mock_upstream import MockUpstream
from edgeproxy.app import create_app
from edgeproxy.settings import Settings
from edgeproxy.settings_loader import load_settings
from tests.clickhouse_server import ClickHouseServer
from tests.clickhouse_server import clickhouse_url as real_clickhouse_url


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep the loaded test modules out of the collector's sight, as a worker does with its startup
    heap (serve.tune_collector): with every test module imported, one full collection took ~150 ms
    on a slow machine, long enough to trip a 0.25 s Redis timeout in a gateway serving in-process."""
    gc.collect()
    gc.freeze()


@dataclass
class RunningGateway:
    settings: Settings
    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def stop(self) -> None:
        await self.runner.cleanup()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def start_gateway(
    mock: MockUpstream, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[GatewayFactory]:
    """Start a gateway in front of the mock; `config` is TOML text, `env` extra environment."""
    running: list[RunningGateway] = []

    async def start(
        config: str = "", env: dict[str, str] | None = None, *, logs: str = "off", **flags: Any
    ) -> RunningGateway:
        """`logs`: "off", "embedded" (chDB under the data dir) or "server" (ClickHouse over HTTP)."""
        config_file = tmp_path / f"edgeproxy-{len(running)}.toml"
        config_file.write_text(config)
        flags.setdefault("upstream", mock.url)
        flags.setdefault("data_dir", str(tmp_path / f"data-{len(running)}"))
        env = dict(env or {})
        if logs == "off":
            env.setdefault("EDGEPROXY_LOGS_ENABLED", "false")
        elif logs == "server":
            env.setdefault("EDGEPROXY_LOGS_CLICKHOUSE_URL", request.getfixturevalue("clickhouse_url"))
            env.setdefault("EDGEPROXY_LOGS_DATABASE", f"t_{uuid.uuid4().hex[:12]}")
        settings = load_settings(config_file, env=env, flags=flags)
        app = create_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        gateway = RunningGateway(settings, app, runner, f"http://127.0.0.1:{port}")
        running.append(gateway)
        return gateway

    yield start
    for gateway in reversed(running):
        await gateway.stop()


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ClickHouse HTTP endpoint: `CLICKHOUSE_URL` when set, else the chDB-backed double."""
    url = real_clickhouse_url()
    if url:
        yield url
        return
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def double(tmp_path: Path) -> Iterator[ClickHouseServer]:
    """A ClickHouse endpoint of this test's own, which it may stop, freeze and start again."""
    server = ClickHouseServer(tmp_path / "clickhouse")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway()


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until `predicate()` is truthy (awaiting it if needed); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
