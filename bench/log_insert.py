"""CPU per logged row by batch size: the gateway's writer and the store, embedded chDB or the ClickHouse double.

    python -m bench.log_insert                      # both stores, batches of 1000 and 10 000
    python -m bench.log_insert --store http --batches 250,1000,4000
    python -m bench.log_insert --memory 1200   # RSS of this process over 1200 embedded inserts of 3000 rows

An insert costs a fixed amount (a new part) plus a little per row; this measures both sides of
the `logs.batch_rows` choice without the rest of the gateway. Each size inserts the same total
number of rows, each batch under its own deduplication token, as the batcher sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeproxy.logs.migrate import migrate
from edgeproxy.logs.record import LogRecord, Row
from edgeproxy.logs.store import LogStore, open_log_store
from edgeproxy.settings import LogSettings

from .contenders import Process, cpu_seconds, start_clickhouse


@dataclass(frozen=True)
class InsertCost:
    store: str
    batch_rows: int
    writer_us_per_row: float  # this process: the gateway's side (clickhouse-connect, and chDB when embedded)
    server_us_per_row: float | None  # the double's process; None when embedded
    ms_per_insert: float


def sample_row() -> Row:
    """A row shaped like the bench's chat completion: short bodies, a few parameters."""
    return LogRecord(
        request_id=str(uuid.uuid4()), started_at=time.time(), latency_ms=1.2, ttfb_ms=1.0,
        upstream_ms=0.8, gateway_ms=0.3, status=200, method="POST", path="/v1/chat/completions",
        target="openai", model="gpt-4o-mini", user_id="user-17", app_id="bench",
        properties={"team": "a"}, params={"temperature": 0.2, "max_tokens": 16},
        request_body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}',
        response_body='{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":'
        '{"role":"assistant","content":"Hi! Fine, thanks."},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}',
        prompt_tokens=9, completion_tokens=7, total_tokens=16, cost_usd=0.00001, cache="MISS",
        attempts=1, answered_by="openai",
    ).to_row()


@asynccontextmanager
async def _migrated_store(store_kind: str, scratch: Path) -> AsyncIterator[tuple[LogStore, Process | None]]:
    """An empty request table: embedded in this process, or in the ClickHouse double ("http"), and the double."""
    server: Process | None = None
    if store_kind == "http":
        server, url = start_clickhouse(scratch)
        settings = LogSettings(clickhouse_url=url)
    else:
        settings = LogSettings()
    store = open_log_store(settings, scratch)
    try:
        await migrate(store)
        yield store, server
    finally:
        await store.close()
        if server is not None:
            server.stop()


async def measure(store_kind: str, batches: list[int], total_rows: int, scratch: Path) -> list[InsertCost]:
    costs = []
    async with _migrated_store(store_kind, scratch) as (store, server):
        for size in batches:
            rows = [sample_row() for _ in range(size)]
            await store.insert(rows)  # the first insert of a size pays for warm-up
            count = max(1, total_rows // size)
            mine, theirs, start = time.process_time(), _cpu(server), time.perf_counter()
            for _ in range(count):
                await store.insert(rows, uuid.uuid4().hex)
            elapsed = time.perf_counter() - start
            inserted = count * size
            server_cpu = _cpu(server) - theirs if server is not None else None
            costs.append(InsertCost(
                store=store_kind, batch_rows=size,
                writer_us_per_row=1e6 * (time.process_time() - mine) / inserted,
                server_us_per_row=1e6 * server_cpu / inserted if server_cpu is not None else None,
                ms_per_insert=1e3 * elapsed / count,
            ))
    return costs


async def memory_trace(store_kind: str, inserts: int, scratch: Path, batch_rows: int = 3000,
                       every: int = 100) -> list[tuple[int, int, int]]:
    """(rows stored, RSS MB, anonymous RSS MB) of this process every `every` inserts of fresh rows.

    Embedded, this process holds the chDB engine, so this is the engine's memory as its data grows;
    over HTTP it is the writer's alone.
    """
    trace = []
    async with _migrated_store(store_kind, scratch) as (store, _):
        template = sample_row()
        for done in range(1, inserts + 1):
            # Fresh ids: the replacing merge would collapse repeated ones and hide the growth.
            rows = [(str(uuid.uuid4()), *template[1:]) for _ in range(batch_rows)]
            await store.insert(rows, uuid.uuid4().hex)
            if done % every == 0:
                trace.append((done * batch_rows, *_rss_mb()))
    return trace


def _rss_mb() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) // 1024, int(status["RssAnon"].split()[0]) // 1024


def _cpu(server: Process | None) -> float:
    return cpu_seconds(server.pid) if server is not None else 0.0


def render(costs: list[InsertCost]) -> str:
    lines = [
        "| store | batch rows | writer µs/row | server µs/row | ms per insert |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cost in costs:
        server = f"{cost.server_us_per_row:.1f}" if cost.server_us_per_row is not None else "-"
        lines.append(f"| {cost.store} | {cost.batch_rows} | {cost.writer_us_per_row:.1f} | {server} | {cost.ms_per_insert:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("embedded", "http", "both"), default="both")
    parser.add_argument("--batches", default="1000,10000", help="comma-separated batch sizes")
    parser.add_argument("--rows", type=int, default=40_000, help="rows inserted per batch size")
    parser.add_argument("--memory", type=int, metavar="INSERTS", help="trace RSS over this many 3000-row inserts instead")
    args = parser.parse_args()
    if args.memory:
        kind = "http" if args.store == "http" else "embedded"
        with tempfile.TemporaryDirectory(prefix="edgeproxy-log-memory-") as scratch:
            for rows, rss, anon in asyncio.run(memory_trace(kind, args.memory, Path(scratch))):
                print(f"{kind} {rows:>9} rows stored: RSS {rss} MB, anonymous {anon} MB")
        return
    batches = [int(size) for size in args.batches.split(",")]
    kinds = ("embedded", "http") if args.store == "both" else (args.store,)
    costs = []
    for kind in kinds:
        # chDB opens one folder per process, so each store gets a fresh folder and its own run.
        with tempfile.TemporaryDirectory(prefix="edgeproxy-log-insert-") as scratch:
            costs += asyncio.run(measure(kind, batches, args.rows, Path(scratch)))
    print(render(costs))


if __name__ == "__main__":
    main()
