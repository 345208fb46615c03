"""`edgeproxy serve --workers N`: one embedded log owned by the master, one metrics view over all workers."""

from __future__ import annotations

import asyncio
import gc
import uuid
from functools import partial
from pathlib import Path

import aiohttp
import orjson

from bench.contenders import requests_served
from bench.mock_upstream import MockUpstream
from edgeproxy.serve import GC_YOUNG_THRESHOLD, tune_collector

from .conftest import wait_until
from .gateway_process import GatewayProcess, rows_in_folder

REQUESTS = 200


async def send(url: str, count: int, concurrency: int = 16) -> list[str]:
    """`count` chat requests, each on a new connection so SO_REUSEPORT spreads them over the workers."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(request_id: str) -> int:
            body = {"model": "mock-model", "messages": [{"role": "user", "content": request_id}]}
            headers = {"Content-Type": "application/json", "Helicone-Request-Id": request_id}
            async with gate, session.post(f"{url}/v1/chat/completions", data=orjson.dumps(body), headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(request_id) for request_id in ids))
    assert statuses == [200] * count
    return ids


async def requests_counted(url: str) -> int:
    """edgeproxy_requests_total summed over its labels, as one scrape (on a new connection) reports it."""
    return await asyncio.to_thread(requests_served, url)


async def test_workers_log_into_the_masters_embedded_store_and_share_metrics(mock: MockUpstream, tmp_path: Path) -> None:
    data = tmp_path / "data"
    gateway = GatewayProcess(data, mock.url, workers=2, env={"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.1"})
    try:
        await gateway.start()
        ids = await send(gateway.url, REQUESTS)
        # Each worker counts what it served; any scrape, whichever worker answers it, shows the sum.

        async def summed() -> bool:
            return await requests_counted(gateway.url) == REQUESTS

        await wait_until(summed, timeout=10, interval=0.1)
        for _ in range(6):
            assert await requests_counted(gateway.url) == REQUESTS
        # Reads go through the owner too: any worker's admin API finds any worker's request.
        for request_id in ids[:8]:
            await wait_until(partial(admin_has, gateway.url, request_id), timeout=10, interval=0.1)
        assert await gateway.stop() == 0, gateway.output()
    finally:
        await gateway.kill()
    counts = await rows_in_folder(data / "clickhouse")
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}


async def admin_has(url: str, request_id: str) -> bool:
    """True when the admin API (asked on a new connection) knows the request."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{url}/admin/v1/requests/{request_id}") as response,
    ):
        # 503 log_unavailable: that worker's log is not migrated yet (its first moments): ask again.
        if response.status == 404 or (response.status == 503 and "log_unavailable" in await response.text()):
            return False
        assert response.status == 200, await response.text()
        return request_id in await response.text()


def workers_of(pid: int) -> set[int]:
    """The worker processes of a master (multiprocessing's resource tracker left out)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_exit_when_the_master_is_killed(mock: MockUpstream, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "data", mock.url, workers=2, env={"EDGEPROXY_LOGS_ENABLED": "false"})
    await gateway.start()
    assert gateway.proc is not None
    workers = await wait_until(lambda: len(workers_of(gateway.proc.pid)) == 2 and workers_of(gateway.proc.pid))
    await gateway.kill()
    # No orphan keeps the port: each worker is told (SIGTERM) that its master died, and drains.
    await wait_until(lambda: not any(alive(pid) for pid in workers), timeout=15)


def test_tune_collector_freezes_startup_objects_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    gc.unfreeze()  # conftest froze the test session's heap; start from nothing frozen
    try:
        assert gc.get_freeze_count() == 0
        tune_collector()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert GC_YOUNG_THRESHOLD > before[0]
    finally:
        gc.set_threshold(*before)
        gc.freeze()
