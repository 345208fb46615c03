"""Load generator: N concurrent aiohttp clients on loopback, bounded by a request count and a time limit.

Measures per request the latency (send to last byte), the time to first byte and, for SSE
streams, the time between events. Run it in its own process, away from the servers it
measures: `python -m bench.loadgen --url http://127.0.0.1:8787 --scenario c64 [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

# Past the time limit, in-flight requests get this long to finish before they are cancelled.
GRACE_SECONDS = 10.0
# Warm-up ends after its request count or this share of the run's time limit, whichever comes first:
# a slow contender must not spend longer warming up than being measured.
WARMUP_SHARE = 0.15


@dataclass(frozen=True)
class Scenario:
    """One workload: what each request looks like and how many run at once, for how long.

    >>> Scenario("c64", concurrency=64, requests=50_000, seconds=8)
    """

    name: str
    concurrency: int
    requests: int
    seconds: float
    stream: bool = False
    chunks: int = 5
    chunk_gap_ms: int = 0
    cache: bool = False
    path: str = "/v1/chat/completions"
    model: str = "mock-model"
    # Requests sent before the clock starts: they open the pooled connections and warm caches.
    warmup: int = 0
    # The warm-up's time limit; None: WARMUP_SHARE of `seconds`. A window that must start in a steady
    # state (a logging gateway's flushes under way) gives it a count it will not reach and a time.
    warmup_seconds: float | None = None
    description: str = ""

    def model_name(self) -> str:
        """The mock reads chunk count and pacing from the model name, parsed once per name, not per request."""
        name = self.model
        if self.chunks != 5:
            name += f"-chunks-{self.chunks}"
        if self.chunk_gap_ms:
            name += f"-gap-{self.chunk_gap_ms}"
        return name

    def body(self) -> bytes:
        """The same body every time: the cache scenario needs it, and the others pay no JSON cost."""
        document: dict[str, Any] = {
            "model": self.model_name(),
            "messages": [{"role": "user", "content": f"benchmark {self.name}"}],
        }
        if self.stream:
            document["stream"] = True
        return orjson.dumps(document)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        if self.cache:
            headers["Helicone-Cache-Enabled"] = "true"
        return headers

    def scaled(self, factor: float) -> Scenario:
        """A shorter (or longer) run of the same workload, for `--quick`."""
        return dataclasses.replace(
            self, requests=max(1, int(self.requests * factor)), seconds=max(0.5, self.seconds * factor)
        )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("c1", 1, 3_000, 6.0, warmup=50, description="non-streaming, concurrency 1: added latency"),
    Scenario("c64", 64, 60_000, 6.0, warmup=256, description="non-streaming, concurrency 64: throughput"),
    Scenario(
        "stream-c1", 1, 1_500, 5.0, stream=True, chunks=50, warmup=20,
        description="streaming 50 chunks, concurrency 1: added time to first byte",
    ),
    Scenario(
        "stream-c32", 32, 4_000, 6.0, stream=True, chunks=50, chunk_gap_ms=5, warmup=64,
        description="streaming 50 chunks 5 ms apart, concurrency 32: relay under load",
    ),
    Scenario(
        "cache-hit", 64, 60_000, 6.0, cache=True, warmup=256,
        description="non-streaming, concurrency 64, Helicone-Cache-Enabled with one body: the hit path",
    ),
)


def scenario(name: str) -> Scenario:
    for known in SCENARIOS:
        if known.name == name:
            return known
    raise KeyError(f"unknown scenario {name!r}; known: {', '.join(s.name for s in SCENARIOS)}")


@dataclass(frozen=True)
class Stats:
    """Milliseconds: nearest-rank percentiles of one measure."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats | None:
        if not seconds:
            return None
        ordered = sorted(seconds)
        ms = 1000.0
        return cls(
            count=len(ordered),
            mean=sum(ordered) / len(ordered) * ms,
            p50=percentile(ordered, 50) * ms,
            p90=percentile(ordered, 90) * ms,
            p99=percentile(ordered, 99) * ms,
            max=ordered[-1] * ms,
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LoadResult:
    """What one run measured; `rps` counts successful requests only."""

    scenario: str
    url: str
    concurrency: int
    completed: int
    errors: int
    seconds: float
    rps: float
    latency: Stats | None
    ttfb: Stats | None
    chunk_gap: Stats | None
    events_per_stream: float | None
    warmup: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        stats = {key: Stats(**data[key]) if data.get(key) else None for key in ("latency", "ttfb", "chunk_gap")}
        return cls(**{**data, **stats})


@dataclass
class _Sample:
    start: float
    first_byte: float | None = None
    end: float | None = None
    status: int = 0
    events: int = 0
    error: str | None = None


class _Tally:
    """Everything the workers record; one per run, shared by its workers on one event loop."""

    def __init__(self) -> None:
        self.samples: list[_Sample] = []
        self.gaps: list[float] = []
        self.issued = 0


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], tally: _Tally | None
) -> _Sample:
    sample = _Sample(start=time.perf_counter())
    gaps = tally.gaps if tally is not None else None
    try:
        async with session.post(url, data=body, headers=headers) as response:
            sample.status = response.status
            last_event: float | None = None
            # A "\n\n" split across two reads still ends one event.
            ended_newline = False
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                if sample.first_byte is None:
                    sample.first_byte = now
                ended = chunk.count(b"\n\n") + (1 if ended_newline and chunk[:1] == b"\n" else 0)
                ended_newline = chunk[-1:] == b"\n"
                if ended:
                    if gaps is not None:
                        if last_event is not None:
                            gaps.append(now - last_event)
                        # Events that arrived in the same read came with no gap between them.
                        gaps.extend([0.0] * (ended - 1))
                    last_event = now
                    sample.events += ended
            sample.end = time.perf_counter()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        sample.error = type(exc).__name__
    return sample


async def run_load(base_url: str, scenario: Scenario, *, request_timeout: float = 60.0) -> LoadResult:
    """Run one scenario against `base_url` (no `/v1`); stops after its request count or its time limit."""
    url = base_url.rstrip("/") + scenario.path
    body, headers = scenario.body(), scenario.headers()
    connector = aiohttp.TCPConnector(limit=scenario.concurrency, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:
        warmed = await _warm_up(session, url, body, headers, scenario)
        tally = _Tally()
        started = time.perf_counter()
        deadline = started + scenario.seconds

        async def worker() -> None:
            while tally.issued < scenario.requests and time.perf_counter() < deadline:
                tally.issued += 1
                tally.samples.append(await _one(session, url, body, headers, tally if scenario.stream else None))

        workers = [asyncio.ensure_future(worker()) for _ in range(scenario.concurrency)]
        _, pending = await asyncio.wait(workers, timeout=scenario.seconds + GRACE_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
    return summarise(scenario, base_url, tally.samples, tally.gaps, elapsed, cancelled=len(pending), warmed=warmed)


async def _warm_up(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], scenario: Scenario
) -> int:
    """Send the untimed requests; stops at its count or its time limit (`warmup_seconds`, else a share of
    the run's). Returns how many."""
    remaining = scenario.warmup
    limit = scenario.seconds * WARMUP_SHARE if scenario.warmup_seconds is None else scenario.warmup_seconds
    deadline = time.perf_counter() + limit
    sent = 0

    async def worker() -> None:
        nonlocal remaining, sent
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            sent += 1
            await _one(session, url, body, headers, None)

    await asyncio.gather(*(worker() for _ in range(min(scenario.concurrency, max(scenario.warmup, 0)))))
    return sent


def summarise(
    scenario: Scenario,
    base_url: str,
    samples: Iterable[_Sample],
    gaps: Sequence[float],
    elapsed: float,
    *,
    cancelled: int = 0,
    warmed: int = 0,
) -> LoadResult:
    """Fold the raw samples of one run into a LoadResult."""
    latencies: list[float] = []
    ttfbs: list[float] = []
    events: list[int] = []
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for sample in samples:
        if sample.error is not None:
            kinds[sample.error] += 1
            continue
        statuses[str(sample.status)] += 1
        if not 200 <= sample.status < 300:
            kinds[f"HTTP {sample.status}"] += 1
            continue
        assert sample.end is not None
        latencies.append(sample.end - sample.start)
        ttfbs.append((sample.first_byte or sample.end) - sample.start)
        events.append(sample.events)
    if cancelled:
        kinds["cancelled at the time limit"] += cancelled
    errors = sum(kinds.values())
    return LoadResult(
        scenario=scenario.name,
        url=base_url,
        concurrency=scenario.concurrency,
        completed=len(latencies),
        errors=errors,
        seconds=elapsed,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        latency=Stats.of(latencies),
        ttfb=Stats.of(ttfbs),
        chunk_gap=Stats.of(gaps) if scenario.stream else None,
        events_per_stream=sum(events) / len(events) if scenario.stream and events else None,
        warmup=warmed,
        statuses=dict(statuses),
        error_kinds=dict(kinds),
    )


def format_table(results: Sequence[LoadResult], labels: Sequence[str] | None = None) -> str:
    """A fixed-width text table, one row per result."""
    head = f"{'run':<28} {'req/s':>9} {'p50':>7} {'p90':>7} {'p99':>7} {'ttfb50':>7} {'ttfb99':>7} {'gap50':>6} {'gap99':>6} {'err':>5}"
    lines = [head, "-" * len(head)]
    for index, result in enumerate(results):
        label = labels[index] if labels else f"{result.scenario}"
        lines.append(
            f"{label:<28} {result.rps:>9.1f} {_ms(result.latency, 'p50'):>7} {_ms(result.latency, 'p90'):>7} "
            f"{_ms(result.latency, 'p99'):>7} {_ms(result.ttfb, 'p50'):>7} {_ms(result.ttfb, 'p99'):>7} "
            f"{_ms(result.chunk_gap, 'p50'):>6} {_ms(result.chunk_gap, 'p99'):>6} {result.errors:>5}"
        )
    lines.append("(milliseconds; gap = time between SSE events of a stream)")
    return "\n".join(lines)


def _ms(stats: Stats | None, name: str) -> str:
    return "-" if stats is None else f"{getattr(stats, name):.2f}"


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    # The client is measured too: uvloop keeps its own overhead, and so its noise, lower.
    return uvloop.new_event_loop


def command(url: str, chosen: Scenario) -> list[str]:
    """The command line that runs `chosen` against `url` in a process of its own and prints the result as JSON."""
    warmup_seconds = [] if chosen.warmup_seconds is None else ["--warmup-seconds", str(chosen.warmup_seconds)]
    return [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--scenario", chosen.name,
        "--requests", str(chosen.requests), "--seconds", str(chosen.seconds),
        "--concurrency", str(chosen.concurrency), "--warmup", str(chosen.warmup), *warmup_seconds, "--json",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL without /v1, e.g. http://127.0.0.1:8787")
    parser.add_argument("--scenario", default="c1", help=", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once")
    parser.add_argument("--warmup", type=int, help="untimed requests first")
    parser.add_argument("--warmup-seconds", type=float,
                        # argparse %-formats help text: the percent sign is doubled.
                        help=f"the warm-up's time limit (default {WARMUP_SHARE:.0%}% of --seconds)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        chosen = scenario(args.scenario)
    except KeyError as exc:
        parser.error(str(exc))
    overrides = {
        key: value
        for key, value in (
            ("requests", args.requests),
            ("seconds", args.seconds),
            ("concurrency", args.concurrency),
            ("warmup", args.warmup),
            ("warmup_seconds", args.warmup_seconds),
        )
        if value is not None
    }
    chosen = dataclasses.replace(chosen, **overrides)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result = runner.run(run_load(args.url, chosen))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.to_json()) + b"\n")
    else:
        print(format_table([result]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
