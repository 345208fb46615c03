"""A fleet: three `edgeproxy serve` processes sharing one Redis and one ClickHouse, in front of one mock.

What scale-out promises: limits are exact fleet-wide, a cache entry written through one replica
is a hit through another, every request is logged exactly once, and a replica killed with
SIGKILL loses no record older than the flush interval: its spool replays when it restarts with
the same data dir, while the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import clickhouse_connect
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from clickhouse_connect.driver.exceptions import DatabaseError

from bench.mock_upstream import MockUpstream
from tests.clickhouse_server import ClickHouseServer
from tests.conftest import wait_until
from tests.redis_server import SHARED_URL, free_port, scrub, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
FLEET_SIZE = 3
FLUSH_SECONDS = 0.2
# A record is submitted as its response ends and written (to ClickHouse or the fsynced spool) at
# most FLUSH_SECONDS later; this allows for that write and for scheduling on a busy 2-core box.
LOSS_WINDOW = FLUSH_SECONDS + 0.3
START_SECONDS = 30.0
CHAT = "/v1/chat/completions"


@dataclass
class Node:
    """One gateway process; `start()` again after `kill()` reuses its port and data dir."""

    index: int
    port: int
    data_dir: Path
    env: dict[str, str]
    stderr: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spooled_batches(self) -> int:
        return len(list((self.data_dir / "spool").glob("*.jsonl")))

    async def start(self, upstream: str) -> None:
        with self.stderr.open("ab") as err:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edgeproxy",
                "serve",
                "--port",
                str(self.port),
                "--upstream",
                upstream,
                "--data-dir",
                str(self.data_dir),
                env=self.env,
                cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        async def ready() -> bool:
            assert self.process is not None and self.process.returncode is None, self.tail()
            try:
                async with session.get(self.url + "/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, timeout=START_SECONDS, interval=0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()

    def tail(self) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"gateway {self.index} stderr:\n" + "\n".join(text.splitlines()[-30:])


@dataclass
class Fleet:
    nodes: list[Node]
    upstream: str
    database: str
    prefix: str
    clickhouse_url: str
    session: aiohttp.ClientSession

    async def restart(self, node: Node) -> None:
        await node.start(self.upstream)
        await node.wait_ready(self.session)


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def start_fleet(
    workdir: Path, upstream: str, clickhouse_url: str, session: aiohttp.ClientSession
) -> Fleet:
    """FLEET_SIZE gateways logging to `clickhouse_url`, sharing Redis under a prefix of their own."""
    prefix = unique_prefix("fleet")
    database = f"fleet_{uuid.uuid4().hex[:12]}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPROXY_", "PROMETHEUS_"))}
    shared = {
        "EDGEPROXY_CACHE_URL": SHARED_URL,
        "EDGEPROXY_CACHE_KEY_PREFIX": prefix,
        "EDGEPROXY_RATELIMIT_URL": SHARED_URL,
        "EDGEPROXY_RATELIMIT_KEY_PREFIX": prefix,
        # Refuse rather than admit when Redis fails, so a broken shared limiter cannot pass for exact.
        "EDGEPROXY_RATELIMIT_FAIL_OPEN": "false",
        # Three gateways, Redis, ClickHouse and the clients share two cores here: a cold burst
        # can take longer than the default 0.25 s, and this fleet tests exactness, not latency.
        "EDGEPROXY_RATELIMIT_TIMEOUT_SECONDS": "2",
        "EDGEPROXY_CACHE_TIMEOUT_SECONDS": "2",
        "EDGEPROXY_LOGS_CLICKHOUSE_URL": clickhouse_url,
        "EDGEPROXY_LOGS_DATABASE": database,
        "EDGEPROXY_LOGS_FLUSH_SECONDS": str(FLUSH_SECONDS),
        "EDGEPROXY_SERVER_DRAIN_SECONDS": "2",
    }
    nodes = [
        Node(
            i,
            free_port(),
            workdir / f"gw{i}",
            {**base, **shared, "EDGEPROXY_SERVER_NAME": f"fleet-{i}"},
            workdir / f"gw{i}.stderr",
        )
        for i in range(FLEET_SIZE)
    ]
    fleet = Fleet(nodes, upstream, database, prefix, clickhouse_url, session)
    try:
        for node in nodes:
            await node.start(upstream)
        await asyncio.gather(*(node.wait_ready(session) for node in nodes))
    except BaseException:
        await stop_fleet(fleet)
        raise
    return fleet


async def stop_fleet(fleet: Fleet) -> None:
    await asyncio.gather(*(node.stop() for node in fleet.nodes))
    await scrub(fleet.prefix)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    provider: MockUpstream,
    session: aiohttp.ClientSession,
    clickhouse_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Fleet]:
    """One fleet for the tests that do not break it; each test keeps to its own keys and ids."""
    fleet = await start_fleet(tmp_path_factory.mktemp("fleet"), provider.url, clickhouse_url, session)
    yield fleet
    await stop_fleet(fleet)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def chat(fleet: Fleet, node: Node, prompt: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    async with fleet.session.post(node.url + CHAT, json=body, headers=headers or {}) as response:
        return Reply(response.status, dict(response.headers), await response.read())


@dataclass(frozen=True)
class Logged:
    rows: int  # bare count(): a duplicate row would show here
    distinct: int
    final: int  # count() after FINAL: what queries that follow the docs see


async def logged(fleet: Fleet, ids: Collection[str]) -> Logged:
    """How many of `ids` the log table holds; zero while the table does not exist yet."""

    def query() -> Logged:
        client = clickhouse_connect.get_client(dsn=fleet.clickhouse_url, autogenerate_session_id=False)
        try:
            wanted = ", ".join(f"'{uuid.UUID(i)}'" for i in ids)
            table, where = f"{fleet.database}.requests", f"WHERE request_id IN ({wanted})"
            rows, distinct = client.query(
                f"SELECT count(), uniqExact(request_id) FROM {table} {where}"
            ).result_rows[0]
            final = client.query(f"SELECT count() FROM {table} FINAL {where}").result_rows[0][0]
            return Logged(int(rows), int(distinct), int(final))
        except DatabaseError:
            return Logged(0, 0, 0)
        finally:
            client.close()

    return await asyncio.to_thread(query)


async def wait_logged(fleet: Fleet, ids: Collection[str], timeout: float = 20.0) -> Logged:
    """Poll until every id is in the log; fail with what was found after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await logged(fleet, ids)
        if found.distinct >= len(ids):
            return found
        assert time.monotonic() < deadline, f"{found.distinct} of {len(ids)} records logged after {timeout}s"
        await asyncio.sleep(0.1)


# --- the tests -----------------------------------------------------------------------------


async def test_rate_limit_is_exact_across_the_fleet(fleet: Fleet) -> None:
    headers = {"Helicone-RateLimit-Policy": "20;w=60;s=global"}
    # All at once, spread evenly: three per-process limiters would admit 20 each.
    replies = await asyncio.gather(
        *(chat(fleet, fleet.nodes[i % FLEET_SIZE], f"limited {i}", headers) for i in range(60))
    )
    statuses = [r.status for r in replies]
    assert statuses.count(200) == 20, [
        (r.status, r.body[:200]) for r in replies if r.status not in (200, 429)
    ]
    assert statuses.count(429) == 40, statuses
    for reply in replies:
        assert reply.headers["Helicone-RateLimit-Policy"] == "20;w=60;u=request;s=global"
        if reply.status == 429:
            assert int(reply.headers["Retry-After"]) >= 1
    # The window is shared, not per process: every replica now refuses.
    for node in fleet.nodes:
        assert (await chat(fleet, node, "one more", headers)).status == 429


async def test_cache_entry_written_through_one_is_hit_through_another(
    fleet: Fleet, provider: MockUpstream
) -> None:
    prompt = f"cache me {uuid.uuid4()}"
    headers = {"Helicone-Cache-Enabled": "true"}
    async with cache_write(fleet):
        first = await chat(fleet, fleet.nodes[0], prompt, headers)
    assert (first.status, first.headers["Helicone-Cache"]) == (200, "MISS")
    for node in fleet.nodes[1:]:
        hit = await chat(fleet, node, prompt, headers)
        assert (hit.status, hit.headers["Helicone-Cache"]) == (200, "HIT"), node.index
        assert hit.body == first.body
    upstream_calls = [r for r in provider.requests if r.path == CHAT and prompt.encode() in r.body]
    assert len(upstream_calls) == 1


@contextlib.asynccontextmanager
async def cache_write(fleet: Fleet) -> AsyncIterator[None]:
    """Wait, after the block, until the fleet's Redis holds one more cache entry than before it.

    The entry is written just after its response ends, so a client could otherwise race it.
    """
    client = aioredis.Redis.from_url(SHARED_URL)
    pattern = fleet.prefix + "cache:*"

    async def entries() -> int:
        return len([key async for key in client.scan_iter(match=pattern, count=1000)])

    try:
        before = await entries()
        yield
        await wait_until(lambda: _more(entries(), before), timeout=5)
    finally:
        await client.aclose()


async def _more(count: Awaitable[int], than: int) -> bool:
    return await count > than


async def test_every_request_is_logged_exactly_once(fleet: Fleet) -> None:
    ids: list[str] = []
    nodes = itertools.cycle(fleet.nodes)

    async def send(prompt: str, headers: dict[str, str] | None = None) -> Reply:
        request_id = str(uuid.uuid4())
        ids.append(request_id)
        return await chat(fleet, next(nodes), prompt, {"Helicone-Request-Id": request_id, **(headers or {})})

    plain = await asyncio.gather(*(send(f"plain {i}") for i in range(30)))
    assert all(r.status == 200 for r in plain)
    # Early exits must be logged too: refusals by the limiter and answers from the cache.
    # A window of its own (w=30): the rate-limit test's global bucket is w=60.
    policy = {"Helicone-RateLimit-Policy": "3;w=30;s=global"}
    limited = await asyncio.gather(*(send("limited", policy) for _ in range(9)))
    assert sorted(r.status for r in limited) == [200] * 3 + [429] * 6
    cached = {"Helicone-Cache-Enabled": "true"}
    prompt = f"cached {uuid.uuid4()}"
    async with cache_write(fleet):
        assert (await send(prompt, cached)).headers["Helicone-Cache"] == "MISS"
    hits = [await send(prompt, cached) for _ in range(5)]
    assert [r.headers["Helicone-Cache"] for r in hits] == ["HIT"] * 5

    found = await wait_logged(fleet, ids)
    assert found == Logged(rows=len(ids), distinct=len(ids), final=len(ids))


@dataclass
class Load:
    """Requests from a few concurrent clients, round-robin over the live nodes, each with its own id."""

    fleet: Fleet
    live: list[Node]
    answered: list[tuple[str, int, float]] = field(default_factory=list)  # (id, node, monotonic time)
    failed: list[int] = field(default_factory=list)
    max_requests: int = 3000
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, clients: int = 6) -> None:
        await asyncio.gather(*(self._client() for _ in range(clients)))

    def stop(self) -> None:
        self._stop.set()

    def ok_from(self, nodes: Collection[int]) -> int:
        return sum(1 for _id, node, _t in self.answered if node in nodes)

    async def _client(self) -> None:
        while not self._stop.is_set() and len(self.answered) + len(self.failed) < self.max_requests:
            node = self.live[next(self._turn) % len(self.live)]
            request_id = str(uuid.uuid4())
            try:
                reply = await chat(
                    self.fleet, node, f"load {request_id}", {"Helicone-Request-Id": request_id}
                )
            except (aiohttp.ClientError, TimeoutError):
                self.failed.append(node.index)
                continue
            if reply.status == 200:
                self.answered.append((request_id, node.index, time.monotonic()))
            else:
                self.failed.append(node.index)


async def test_sigkill_loses_no_flushed_record_and_the_spool_replays(
    provider: MockUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A fleet and a ClickHouse of its own: this test stops ClickHouse, so the killed replica dies
    # holding a spool, and kills a replica.
    clickhouse = ClickHouseServer(tmp_path / "clickhouse")
    await asyncio.to_thread(clickhouse.start)
    fleet = await start_fleet(tmp_path, provider.url, clickhouse.url, session)
    try:
        victim, survivors = fleet.nodes[0], fleet.nodes[1:]
        load = Load(fleet, list(fleet.nodes))
        running = asyncio.create_task(load.run())
        try:
            await wait_until(lambda: len(load.answered) >= 60, timeout=15)
            await wait_logged(fleet, [i for i, _n, _t in load.answered[:30]])

            # ClickHouse goes away: every replica keeps answering and spools its batches.
            await asyncio.to_thread(clickhouse.stop, kill=True)
            outage_began = time.monotonic()
            # Kill once the victim has answered a request older than the loss window since the
            # outage: that record can only have survived in its spool.
            await wait_until(
                lambda: any(
                    node == victim.index and outage_began < at < time.monotonic() - LOSS_WINDOW
                    for _id, node, at in load.answered
                ),
                timeout=10,
            )
            await victim.kill()
            killed_at = time.monotonic()
            load.live[:] = survivors
            after_kill = load.ok_from({n.index for n in survivors})
            await wait_until(
                lambda: load.ok_from({n.index for n in survivors}) >= after_kill + 60, timeout=15
            )
        finally:
            load.stop()
            await asyncio.wait_for(running, 20)
        assert victim.spooled_batches > 0, "the killed replica left its spool behind"
        assert set(load.failed) <= {victim.index}, "the survivors refused requests"
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(fleet, victim, "anyone there?")

        await asyncio.to_thread(clickhouse.start)
        await fleet.restart(victim)
        expected = {
            request_id
            for request_id, node, answered_at in load.answered
            if node != victim.index or answered_at < killed_at - LOSS_WINDOW
        }
        spooled_only = {
            request_id
            for request_id, node, answered_at in load.answered
            if node == victim.index and outage_began < answered_at < killed_at - LOSS_WINDOW
        }
        assert spooled_only, "no record of the victim depended on its spool"
        await wait_logged(fleet, expected, timeout=30)
        await wait_until(lambda: victim.spooled_batches == 0, timeout=15)
        # Delivery is at least once (a replay may repeat a batch); FINAL collapses by request_id.
        found = await logged(fleet, [request_id for request_id, _n, _t in load.answered])
        assert found.final == found.distinct >= len(expected)
    finally:
        await stop_fleet(fleet)
        await asyncio.to_thread(clickhouse.stop)
