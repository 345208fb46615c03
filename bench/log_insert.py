"""CPU per logged row by batch size: the gateway's writer and the store, embedded chDB or the ClickHouse double.

    python -m bench.log_insert                      # both stores, batches of 1000 and 10 000
    python -m bench.log_insert --store http --batches 250,1000,4000
    python -m bench.log_insert --store embedded --batches 3000 --rows 900000 --setting merge_selector_base=5
    python -m bench.log_insert --memory 1200   # RSS of this process over 1200 embedded inserts of 3000 rows

An insert costs a fixed amount (a new part) plus a little per row, and every row is rewritten by
later merges; this measures both, for the `logs.batch_rows` choice and the table's merge settings,
without the rest of the gateway. Each size inserts the same total number of rows with fresh ids
(repeated ones would collapse in merges and hide their cost), each batch under its own
deduplication token as the batcher sends them, `--pace` seconds apart, then waits for the merges
the inserts started to finish. `--setting` overrides one of the table's settings after migration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeproxy.logs.migrate import migrate
from edgeproxy.logs.record import LogRecord, Row
from edgeproxy.logs.store import LogStore, open_log_store
from edgeproxy.settings import LogSettings

from .contenders import Process, cpu_seconds, start_clickhouse, stat_cpu_seconds

# Merges still running this long after the last insert are left out of the figures.
SETTLE_SECONDS = 120.0


@dataclass(frozen=True)
class InsertCost:
    store: str
    batch_rows: int
    writer_us_per_row: float  # this process: the gateway's side (clickhouse-connect, and chDB when embedded)
    server_us_per_row: float | None  # the double's process; None when embedded
    merge_us_per_row: float  # the engine's merge threads, wherever it runs (part of one of the above)
    ms_per_insert: float
    peak_parts: int  # most live parts seen in the table


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
async def _migrated_store(store_kind: str, scratch: Path,
                          settings: Sequence[str] = ()) -> AsyncIterator[tuple[LogStore, Process | None]]:
    """An empty request table with `settings` overridden: embedded in this process, or in the ClickHouse double
    ("http"), and the double."""
    server: Process | None = None
    url = None
    if store_kind == "http":
        server, url = start_clickhouse(scratch)
    store = open_log_store(LogSettings(clickhouse_url=url), scratch)
    try:
        await migrate(store)
        for setting in settings:
            await store.command(f"ALTER TABLE {store.qualified} MODIFY SETTING {setting}")
        yield store, server
    finally:
        await store.close()
        if server is not None:
            server.stop()


async def measure(store_kind: str, batches: list[int], total_rows: int, scratch: Path,
                  settings: Sequence[str] = (), pace: float = 0.05) -> list[InsertCost]:
    costs = []
    async with _migrated_store(store_kind, scratch, settings) as (store, server):
        engine_pid = server.pid if server is not None else os.getpid()
        template = sample_row()
        for size in batches:
            await store.insert(_fresh(template, size))  # the first insert of a size pays for warm-up
            await _settled(store)
            count = max(1, total_rows // size)
            generating = 0.0  # fresh ids are the bench's work, not the writer's
            peak_parts = 0
            inserting = 0.0  # wall time inside inserts, the pace left out
            mine, theirs, merges = time.process_time(), _cpu(server), _merge_cpu(engine_pid)
            for done in range(count):
                before = time.thread_time()
                rows = _fresh(template, size)
                generating += time.thread_time() - before
                start = time.perf_counter()
                await store.insert(rows, uuid.uuid4().hex)
                inserting += time.perf_counter() - start
                if done % 10 == 0:
                    peak_parts = max(peak_parts, await _live_parts(store))
                await asyncio.sleep(pace)
            await _settled(store)
            inserted = count * size
            server_cpu = _cpu(server) - theirs if server is not None else None
            costs.append(InsertCost(
                store=store_kind, batch_rows=size,
                writer_us_per_row=1e6 * (time.process_time() - mine - generating) / inserted,
                server_us_per_row=1e6 * server_cpu / inserted if server_cpu is not None else None,
                merge_us_per_row=1e6 * (_merge_cpu(engine_pid) - merges) / inserted,
                ms_per_insert=1e3 * inserting / count,
                peak_parts=peak_parts,
            ))
    return costs


def _fresh(template: Row, size: int) -> list[Row]:
    return [(str(uuid.uuid4()), *template[1:]) for _ in range(size)]


async def _live_parts(store: LogStore) -> int:
    rows = await store.query(
        "SELECT count() AS parts FROM system.parts WHERE active AND database = {d:String} AND table = {t:String}",
        {"d": store.database, "t": store.table},
    )
    return int(rows[0]["parts"])


async def _settled(store: LogStore) -> None:
    """Wait until no merge has run on the table for a second (at most SETTLE_SECONDS)."""
    deadline, quiet_since = time.monotonic() + SETTLE_SECONDS, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 1.0:
        rows = await store.query(
            "SELECT count() AS running FROM system.merges WHERE database = {d:String} AND table = {t:String}",
            {"d": store.database, "t": store.table},
        )
        if rows[0]["running"]:
            quiet_since = time.monotonic()
        await asyncio.sleep(0.1)


def _merge_cpu(pid: int) -> float:
    """CPU seconds of the ClickHouse engine's merge threads in process `pid`."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        if stat[stat.index("(") + 1 : stat.rindex(")")].startswith("MergeMutate"):
            total += stat_cpu_seconds(stat)
    return total


async def memory_trace(store_kind: str, inserts: int, scratch: Path, batch_rows: int = 3000,
                       every: int = 100, settings: Sequence[str] = ()) -> list[tuple[int, int, int]]:
    """(rows stored, RSS MB, anonymous RSS MB) of this process every `every` inserts of fresh rows.

    Embedded, this process holds the chDB engine, so this is the engine's memory as its data grows;
    over HTTP it is the writer's alone.
    """
    trace = []
    async with _migrated_store(store_kind, scratch, settings) as (store, _):
        template = sample_row()
        for done in range(1, inserts + 1):
            # Fresh ids: the replacing merge would collapse repeated ones and hide the growth.
            await store.insert(_fresh(template, batch_rows), uuid.uuid4().hex)
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
        "| store | batch rows | writer µs/row | server µs/row | of which merges µs/row | ms per insert | peak parts |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cost in costs:
        server = f"{cost.server_us_per_row:.1f}" if cost.server_us_per_row is not None else "-"
        lines.append(
            f"| {cost.store} | {cost.batch_rows} | {cost.writer_us_per_row:.1f} | {server} "
            f"| {cost.merge_us_per_row:.1f} | {cost.ms_per_insert:.1f} | {cost.peak_parts} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("embedded", "http", "both"), default="both")
    parser.add_argument("--batches", default="1000,10000", help="comma-separated batch sizes")
    parser.add_argument("--rows", type=int, default=200_000, help="rows inserted per batch size")
    parser.add_argument("--pace", type=float, default=0.05, help="seconds between inserts (default %(default)s)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a table setting to override after migration; repeatable")
    parser.add_argument("--memory", type=int, metavar="INSERTS", help="trace RSS over this many 3000-row inserts instead")
    args = parser.parse_args()
    if args.memory:
        kind = "http" if args.store == "http" else "embedded"
        with tempfile.TemporaryDirectory(prefix="edgeproxy-log-memory-") as scratch:
            for rows, rss, anon in asyncio.run(memory_trace(kind, args.memory, Path(scratch), settings=args.setting)):
                print(f"{kind} {rows:>9} rows stored: RSS {rss} MB, anonymous {anon} MB")
        return
    batches = [int(size) for size in args.batches.split(",")]
    kinds = ("embedded", "http") if args.store == "both" else (args.store,)
    costs = []
    for kind in kinds:
        # chDB opens one folder per process, so each store gets a fresh folder and its own run.
        with tempfile.TemporaryDirectory(prefix="edgeproxy-log-insert-") as scratch:
            costs += asyncio.run(measure(kind, batches, args.rows, Path(scratch), args.setting, args.pace))
    print(render(costs))


if __name__ == "__main__":
    main()
