"""The benchmark's own machinery: the load generator, the contenders' processes and the report (tiny runs)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from bench import log_insert
from bench.compare import (
    DEFAULT_ROUNDS,
    MIN_ROUNDS,
    RUN_BUDGET_SECONDS,
    Plan,
    build_plan,
    interleaved_rounds,
    more_rounds,
)
from bench.contenders import (
    Backdrop,
    ContenderSpec,
    cpu_seconds,
    log_completeness,
    machine_ticks,
    main_thread_cpu_seconds,
    render_nginx_conf,
    rss_bytes,
    start,
    start_mock,
    stat_steal_ticks,
    steal_share,
)
from bench.loadgen import LoadResult, Scenario, Stats, percentile, run_load
from bench.measure import Measurement, Trace, measure
from bench.mock_upstream import MockUpstream
from bench.profiling import area, parse_stacks, profile_summary
from bench.report import AddedLatency, Check, LogCount, RunReport, check_targets, render_markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 90, 4.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([float(i) for i in range(1, 1001)], 50, 500.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


async def test_non_streaming_run_counts_every_request(mock: MockUpstream) -> None:
    result = await run_load(mock.url, Scenario("t", concurrency=4, requests=40, seconds=30, warmup=4))
    assert (result.completed, result.errors) == (40, 0)
    assert mock.stats()["requests"] == 44  # warm-up requests reach the server but are not counted
    assert result.latency is not None and result.latency.count == 40
    assert 0 < result.latency.p50 <= result.latency.p90 <= result.latency.p99 <= result.latency.max
    assert result.ttfb is not None and result.ttfb.p50 <= result.latency.p50
    assert result.rps > 0 and result.chunk_gap is None and result.statuses == {"200": 40}


async def test_streaming_run_measures_events_and_gaps(mock: MockUpstream) -> None:
    scenario = Scenario("s", concurrency=2, requests=6, seconds=30, stream=True, chunks=10, chunk_gap_ms=3)
    result = await run_load(mock.url, scenario)
    assert result.completed == 6
    # The mock's stream: a role chunk, 10 content chunks, the finish chunk and [DONE].
    assert result.events_per_stream == 13
    assert result.chunk_gap is not None and result.chunk_gap.count == 6 * 12
    # Content chunks are paced 3 ms apart by the mock; the measured gaps must show it.
    assert result.chunk_gap.p50 >= 2.0


async def test_run_stops_at_its_time_limit(mock: MockUpstream) -> None:
    scenario = Scenario("slow", concurrency=2, requests=10_000, seconds=0.5, model="mock-slow-100")
    started = time.monotonic()
    result = await run_load(mock.url, scenario)
    assert time.monotonic() - started < 3.0
    assert 2 <= result.completed < 40


async def test_warm_up_can_run_for_a_time_of_its_own(mock: MockUpstream) -> None:
    # The interleaved c64 windows start after a second of load, whatever their length: a count the
    # warm-up cannot reach, and its own time limit instead of a share of the window's.
    scenario = Scenario("w", concurrency=2, requests=5, seconds=0.2, warmup=10**9, warmup_seconds=0.6)
    started = time.monotonic()
    result = await run_load(mock.url, scenario)
    assert time.monotonic() - started >= 0.6
    assert result.completed == 5 and result.warmup > 5
    assert mock.stats()["requests"] == result.warmup + 5
    shared = await run_load(mock.url, dataclasses.replace(scenario, warmup_seconds=None))
    assert shared.warmup < result.warmup  # 15% of 0.2 s


async def test_failed_requests_are_errors_not_throughput(mock: MockUpstream) -> None:
    result = await run_load(mock.url, Scenario("e", concurrency=2, requests=10, seconds=30, model="mock-error-500"))
    assert (result.completed, result.errors, result.rps) == (0, 10, 0.0)
    assert result.error_kinds == {"HTTP 500": 10} and result.latency is None


async def test_loadgen_command_prints_json(mock: MockUpstream) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--url", mock.url, "--scenario", "stream-c1", "--requests", "3",
        "--seconds", "20", "--warmup", "2", "--warmup-seconds", "5", "--json", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    result = LoadResult.from_json(orjson.loads(out))
    assert (result.scenario, result.completed, result.events_per_stream, result.warmup) == ("stream-c1", 3, 53, 2)


def test_scenario_steers_the_mock_through_the_model_name() -> None:
    scenario = Scenario("x", 1, 1, 1, stream=True, chunks=50, chunk_gap_ms=5, cache=True)
    body = orjson.loads(scenario.body())
    assert body == {"model": "mock-model-chunks-50-gap-5", "stream": True,
                    "messages": [{"role": "user", "content": "benchmark x"}]}
    assert scenario.headers()["Helicone-Cache-Enabled"] == "true"
    assert "Helicone-Cache-Enabled" not in Scenario("y", 1, 1, 1).headers()


def test_nginx_config_is_a_streaming_keepalive_proxy(tmp_path: Path) -> None:
    text = render_nginx_conf(tmp_path, 4321, "http://127.0.0.1:5555", 1)
    for needle in ("listen 127.0.0.1:4321;", "server 127.0.0.1:5555;", "proxy_buffering off;", "keepalive 256;",
                   'proxy_set_header Connection "";', f"pid {tmp_path}/nginx.pid;", "proxy_set_header Host $host;"):
        assert needle in text
    assert "$prefix" not in text.split("\n", 3)[3]  # only the header comment names the placeholders


def test_contenders_run_from_a_separate_load_process(tmp_path: Path) -> None:
    """Mock, edgeproxy and (when installed) nginx as subprocesses; measure() samples their memory and CPU."""
    mock, mock_url = start_mock(tmp_path)
    try:
        assert cpu_seconds(mock.pid) > 0  # a Python process that imported aiohttp has used some CPU
        backdrop = Backdrop(mock_url, mock.pid, None, tmp_path)
        specs = [ContenderSpec("direct", "direct"), ContenderSpec("edgeproxy-1w", "edgeproxy")]
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            specs.append(ContenderSpec("nginx", "nginx"))
        for spec in specs:
            running = start(spec, backdrop)
            try:
                assert rss_bytes(running.pid) > 1_000_000
                tiny = Scenario("stream-c1", 2, 6, 20, stream=True, chunks=5, warmup=1)
                done = measure(running, tiny, backdrop)
                assert done.result.completed == 6, (spec.name, done.result.error_kinds)
                assert done.result.events_per_stream is not None and done.result.events_per_stream >= 7
                assert done.rss.samples and done.rss.peak_mb > 1 and done.client_cpu_s > 0
                assert done.steal is not None and 0 <= done.steal < 1
                if spec.kind == "edgeproxy":
                    # A part of the process's CPU; both count in clock ticks, so a tiny run may read 0.
                    assert done.loop_cpu_s is not None and 0 <= done.loop_cpu_s <= done.server_cpu_s + 0.02
                else:
                    assert done.loop_cpu_s is None
            finally:
                running.stop()
            assert running.process is None or running.process.exited() is not None
    finally:
        mock.stop()


def test_log_completeness_reads_requests_and_stored_rows_through_the_gateway(tmp_path: Path) -> None:
    mock, mock_url = start_mock(tmp_path)
    try:
        backdrop = Backdrop(mock_url, mock.pid, None, tmp_path)
        running = start(ContenderSpec("edgeproxy-1w-embedded", "edgeproxy", logs="embedded"), backdrop)
        try:
            done = measure(running, Scenario("c1", 1, 12, 20, warmup=2), backdrop)
            assert done.result.completed == 12
            assert log_completeness(running.url) == (14, 14)  # the warm-up requests are logged too
        finally:
            running.stop()
    finally:
        mock.stop()


def test_main_thread_cpu_counts_the_main_thread_only() -> None:
    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    before = main_thread_cpu_seconds(os.getpid())
    side = threading.Thread(target=spin, args=(0.3,))
    side.start()
    side.join()
    after_side = main_thread_cpu_seconds(os.getpid())
    spin(0.3)
    after_main = main_thread_cpu_seconds(os.getpid())
    assert after_side - before < 0.15  # the other thread's 0.3 s is not the main thread's
    assert after_main - after_side > 0.2


def _stats(p50: float, p99: float) -> Stats:
    return Stats(count=100, mean=p50, p50=p50, p90=p99, p99=p99, max=p99)


def _measured(contender: str, scenario: str, rps: float, p50: float, p99: float) -> Measurement:
    result = LoadResult(scenario, "http://127.0.0.1:1", 1, 1000, 0, 1.0, rps, _stats(p50, p99), _stats(p50, p99),
                        None, None)
    samples = tuple((float(t), 50 * 2**20) for t in range(10))  # a flat 50 MB
    return Measurement(contender, scenario, result, Trace(samples), 0.5, 0.1, 0.4)


def _report(measurements: list[Measurement], soaks: tuple[Measurement, ...] = ()) -> RunReport:
    return RunReport("2026-01-01T00:00:00+00:00", False, {"cores": 2, "cpu": "test", "kernel": "k", "python": "3"},
                     {"nginx": "1.22.1"}, (0.1, 0.1, 0.1), (0.2, 0.2, 0.2), tuple(measurements), soaks,
                     {"litellm": "install failed"})


def test_targets_compare_the_gateway_with_peers_of_the_same_run() -> None:
    report = _report([
        _measured("direct", "c1", 2000, 0.5, 1.0),
        _measured("edgeproxy-1w", "c1", 1000, 1.2, 5.0),  # +0.7 ms p50 (pass), +4.0 ms p99 (miss)
        _measured("direct", "c64", 4000, 10, 20),
        _measured("nginx", "c64", 3000, 12, 22),
        _measured("edgeproxy-1w", "c64", 1200, 30, 60),
        _measured("edgeproxy-1w-embedded", "c64", 1150, 31, 61),
        _measured("edgeproxy-1w-clickhouse", "c64", 1000, 35, 70),
    ], soaks=(_measured("edgeproxy-1w-soak", "c64", 1000, 30, 60),
              dataclasses.replace(_measured("edgeproxy-1w-soak-clickhouse", "c64", 1000, 30, 60),
                                  rss=Trace(tuple((float(t), (50 + 2 * t) * 2**20) for t in range(10))))))
    verdicts = {check.target: check for check in check_targets(report)}
    assert verdicts["added latency, non-streaming, concurrency 1, p50 ≤ 1 ms over direct"].ok is True
    assert verdicts["added latency, non-streaming, concurrency 1, p99 ≤ 3 ms over direct"].ok is False
    assert verdicts["throughput (c64) within 3× of nginx"] == Check(
        "throughput (c64) within 3× of nginx", "0.40× (1200 vs 3000 req/s)", True)
    assert verdicts["throughput (c64) ≥ 5× LiteLLM"].ok is None
    assert "install failed" in verdicts["throughput (c64) ≥ 5× LiteLLM"].measured
    assert verdicts["throughput (c64) with logging on (embedded) within 10% of off"].ok is True
    assert verdicts["throughput (c64) with logging on (clickhouse) within 10% of off"].ok is False
    assert verdicts["added time to first byte, streaming, concurrency 1, p50 ≤ 1 ms over direct"].ok is None
    rss = {c.target.rsplit(", ", 1)[1]: c.ok for c in verdicts.values() if c.target.startswith("RSS flat")}
    assert rss == {"embedded log store on: gateway and chDB engine": True,
                   "log to the ClickHouse double: the gateway alone": False}


def test_every_logging_gateway_must_have_logged_every_request() -> None:
    target = "every request logged (rows in the store = requests served), each logging gateway"
    whole = (LogCount("edgeproxy-1w-embedded", "rounds", 5000, 5000), LogCount("edgeproxy-1w-soak", "soak", 700, 700))
    verdicts = {c.target: c for c in check_targets(dataclasses.replace(_report([]), log_counts=whole))}
    assert verdicts[target] == Check(target, "5700 of 5700 requests in 2 gateways", True)
    # A store that answered 200 and kept the first block of each insert only.
    short = (*whole, LogCount("edgeproxy-1w-clickhouse", "rounds", 5000, 4096))
    verdicts = {c.target: c for c in check_targets(dataclasses.replace(_report([]), log_counts=short))}
    assert verdicts[target] == Check(target, "edgeproxy-1w-clickhouse (rounds): 4096 of 5000", False)
    assert {c.target: c for c in check_targets(_report([]))}[target].ok is None


def test_markdown_has_ratios_against_direct_and_each_peer() -> None:
    report = _report([
        _measured("direct", "c64", 4000, 10, 20),
        _measured("nginx", "c64", 3200, 12, 22),
        _measured("edgeproxy-1w", "c64", 1600, 30, 61),
    ])
    text = render_markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| edgeproxy-1w |"))
    # req/s, × direct, × nginx, p50, p99, +p50, +p99 vs direct
    assert row.split(" | ")[1:8] == ["1600", "0.40", "0.50", "30.00", "61.00", "+20.00", "+41.00"]
    assert "2 cores" in text and "nginx 1.22.1" in text and "2026-01-01" in text
    assert "- **litellm**: install failed" in text


def test_interleaved_rounds_decide_the_throughput_ratios() -> None:
    single_pass = [
        _measured("nginx", "c64", 3000, 12, 22),
        _measured("edgeproxy-1w", "c64", 1200, 30, 60),  # one pass alone: 0.40× nginx
        _measured("edgeproxy-1w-clickhouse", "c64", 1000, 35, 70),  # one pass alone: 0.83× off (a miss)
    ]
    rounds = (
        {"nginx": 3000.0, "edgeproxy-1w": 900.0, "edgeproxy-1w-clickhouse": 850.0},
        {"nginx": 2800.0, "edgeproxy-1w": 1000.0, "edgeproxy-1w-clickhouse": 930.0},
        {"edgeproxy-1w": 1100.0, "edgeproxy-1w-clickhouse": 1050.0, "nginx": 3100.0},
    )
    loop_us = (
        {"edgeproxy-1w": 200.0, "edgeproxy-1w-clickhouse": 212.0},
        {"edgeproxy-1w": 210.0, "edgeproxy-1w-clickhouse": 230.0},
        {"edgeproxy-1w": 190.0, "edgeproxy-1w-clickhouse": 209.0},
    )
    report = dataclasses.replace(_report(single_pass), rounds=rounds, rounds_loop_us=loop_us)
    verdicts = {check.target: check for check in check_targets(report)}
    # Median of the per-round ratios (0.30, 0.357…, 0.354…), not the ratio of medians nor the single pass.
    assert verdicts["throughput (c64) within 3× of nginx"] == Check(
        "throughput (c64) within 3× of nginx", "0.355× (median of 3 interleaved rounds, 0.30–0.36)", True)
    logging = verdicts["throughput (c64) with logging on (clickhouse) within 10% of off"]
    assert logging.ok is True and logging.measured.startswith("0.944× (median of 3 interleaved rounds")
    assert verdicts["throughput (c64) with logging on (embedded) within 10% of off"].ok is None
    text = render_markdown(report)
    assert "## c64 in interleaved rounds" in text
    header = next(line for line in text.splitlines() if line.startswith("| round |"))
    assert header.endswith("| edgeproxy-1w ÷ nginx | edgeproxy-1w-clickhouse ÷ edgeproxy-1w |")
    assert "| 3 | 3100 | 1100 | 1050 | 0.35 | 0.95 |" in text
    # Medians per contender (200 and 212 µs), the logging one against log off.
    assert "(median): edgeproxy-1w 200 µs, edgeproxy-1w-clickhouse 212 µs (+6.0%)." in text
    assert "steal" not in header  # no column for rounds that did not read it

    steal = ({"nginx": 0.01, "edgeproxy-1w": 0.125}, {}, {"edgeproxy-1w": 0.02})
    text = render_markdown(dataclasses.replace(report, rounds_steal=steal))
    header = next(line for line in text.splitlines() if line.startswith("| round |"))
    assert header.endswith("| edgeproxy-1w-clickhouse ÷ edgeproxy-1w | steal % of the windows |")
    assert "| 1 | 3000 | 900 | 850 | 0.30 | 0.94 | 1.0–12.5 |" in text
    assert "| 2 | 2800 | 1000 | 930 | 0.36 | 0.93 | - |" in text
    assert "| 3 | 3100 | 1100 | 1050 | 0.35 | 0.95 | 2.0–2.0 |" in text


def test_the_control_gateway_shows_what_noise_alone_reads_beside_the_logging_ratios() -> None:
    rounds = (
        {"nginx": 3000.0, "edgeproxy-1w": 900.0, "edgeproxy-1w-control": 990.0, "edgeproxy-1w-clickhouse": 850.0},
        {"nginx": 2800.0, "edgeproxy-1w": 1000.0, "edgeproxy-1w-control": 800.0, "edgeproxy-1w-clickhouse": 930.0},
        {"nginx": 3100.0, "edgeproxy-1w": 1100.0, "edgeproxy-1w-control": 1045.0, "edgeproxy-1w-clickhouse": 1050.0},
    )
    report = dataclasses.replace(_report([]), rounds=rounds)
    verdicts = {check.target: check for check in check_targets(report)}
    logging = verdicts["throughput (c64) with logging on (clickhouse) within 10% of off"]
    # The verdict still reads the logging ratio alone (0.944×); the control (1.10, 0.80, 0.95) stands beside it.
    assert logging.ok is True
    assert logging.measured == ("0.944× (median of 3 interleaved rounds, 0.93–0.95); the control, an identical "
                                "log-off gateway, 0.950× (median of 3 interleaved rounds, 0.80–1.10)")
    text = render_markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| round |"))
    assert header == ("| round | nginx req/s | edgeproxy-1w req/s | edgeproxy-1w-control req/s | "
                      "edgeproxy-1w-clickhouse req/s | edgeproxy-1w ÷ nginx | edgeproxy-1w-control ÷ edgeproxy-1w | "
                      "edgeproxy-1w-clickhouse ÷ edgeproxy-1w |")
    assert "| 2 | 2800 | 1000 | 800 | 930 | 0.36 | 0.80 | 0.93 |" in text
    assert "edgeproxy-1w-control is a second edgeproxy-1w, log off like it" in text


def test_latency_targets_read_the_median_of_the_interleaved_rounds() -> None:
    single_pass = [
        _measured("direct", "c1", 2000, 0.5, 1.0),
        _measured("edgeproxy-1w", "c1", 1000, 1.7, 2.0),  # one pass alone: +1.2 ms p50, a miss
    ]
    added = (
        AddedLatency(1, "edgeproxy-1w", "c1", 0.9, 2.5),
        AddedLatency(1, "nginx", "c1", 0.1, 0.3),
        AddedLatency(1, "edgeproxy-1w", "stream-c1", 1.4, 2.0),
        AddedLatency(2, "edgeproxy-1w", "c1", 0.6, 3.5),
        AddedLatency(2, "nginx", "c1", 0.2, 0.1),
        AddedLatency(2, "edgeproxy-1w", "stream-c1", 0.8, 2.9),
        AddedLatency(3, "edgeproxy-1w", "c1", 0.7, 3.1),
        AddedLatency(3, "edgeproxy-1w", "stream-c1", 1.1, 1.0),
        AddedLatency(1, "aiohttp-floor", "stream-c1", 0.9, 1.0),
        AddedLatency(2, "aiohttp-floor", "stream-c1", 0.7, 1.0),
    )
    report = dataclasses.replace(_report(single_pass), added_latency=added)
    verdicts = {check.target: check for check in check_targets(report)}
    c1 = "added latency, non-streaming, concurrency 1,"
    assert verdicts[f"{c1} p50 ≤ 1 ms over direct"] == Check(
        f"{c1} p50 ≤ 1 ms over direct", "+0.70 ms (median of 3 interleaved rounds, +0.60 to +0.90)", True)
    assert verdicts[f"{c1} p99 ≤ 3 ms over direct"].ok is False  # median of 2.5, 3.5, 3.1
    stream = "added time to first byte, streaming, concurrency 1,"
    assert verdicts[f"{stream} p50 ≤ 1 ms over direct"] == Check(
        f"{stream} p50 ≤ 1 ms over direct",
        "+1.10 ms (median of 3 interleaved rounds, +0.80 to +1.40; the aiohttp floor +0.80)", False)
    assert verdicts[f"{stream} p99 ≤ 3 ms over direct"].ok is True  # nginx's figures judge nothing
    text = render_markdown(report)
    assert "## Added latency in interleaved rounds" in text
    header = next(line for line in text.splitlines() if line.startswith("| round |") and "+latency" in line)
    assert header == ("| round | edgeproxy-1w c1 +latency p50 | edgeproxy-1w c1 +latency p99 | nginx c1 +latency p50 "
                      "| nginx c1 +latency p99 | edgeproxy-1w stream-c1 +TTFB p50 | edgeproxy-1w stream-c1 +TTFB p99 "
                      "| aiohttp-floor stream-c1 +TTFB p50 | aiohttp-floor stream-c1 +TTFB p99 |")
    assert "| 3 | +0.70 | +3.10 | - | - | +1.10 | +1.00 | - | - |" in text


def test_interleaved_rounds_measure_latency_beside_direct(tmp_path: Path) -> None:
    """Two real rounds: c1 and stream-c1 on direct, the gateway and the aiohttp floor, one figure per round,
    scenario and contender."""
    mock, mock_url = start_mock(tmp_path)
    try:
        backdrop = Backdrop(mock_url, mock.pid, None, tmp_path)
        tiny = (Scenario("c1", 1, 30, 20, warmup=2), Scenario("stream-c1", 1, 20, 20, stream=True, chunks=5, warmup=2))
        plan = Plan((ContenderSpec("direct", "direct"), ContenderSpec("edgeproxy-1w", "edgeproxy")), tiny,
                    soak_seconds=0.0, quick=False, rounds=2)
        log_counts: list[LogCount] = []
        measured = interleaved_rounds(plan, backdrop, {}, log_counts, time.monotonic())
    finally:
        mock.stop()
    assert sorted((a.round, a.scenario, a.contender) for a in measured.added_latency) == [
        (number, chosen, contender) for number in (1, 2) for chosen in ("c1", "stream-c1")
        for contender in ("aiohttp-floor", "edgeproxy-1w")]
    # A proxy in front of the mock adds time; so much would mean the figures were not paired.
    assert all(-5 < a.p50_ms < 50 for a in measured.added_latency)
    assert measured.rps == [] and log_counts == []  # no c64 in the plan: no throughput windows


def test_steal_is_the_hypervisors_share_of_the_machines_cpu_time() -> None:
    before = stat_steal_ticks("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    after = stat_steal_ticks("cpu  150 0 70 900 10 0 0 70 5 0\ncpu0 75 0 35 450 5 0 0 35 5 0\n")
    assert (before, after) == ((40, 1000), (70, 1200))  # guest time is in user already: not added twice
    assert steal_share(before, after) == pytest.approx(30 / 200)
    assert steal_share(after, after) is None
    stolen, total = machine_ticks()
    assert 0 <= stolen <= total and total > 0


def test_rounds_run_by_default_only_in_a_full_run_with_c64() -> None:
    def plan(*argv: str) -> Plan:
        parser_args = {"quick": False, "soak": None, "only": None, "scenarios": None, "rounds": None,
                       "client": "loadgen"}
        for flag, value in zip(argv[::2], argv[1::2], strict=True):
            parser_args[flag] = value
        return build_plan(argparse.Namespace(**parser_args))

    assert plan().rounds == DEFAULT_ROUNDS
    assert plan("quick", True).rounds == 0
    assert plan("scenarios", "c1,stream-c1").rounds == DEFAULT_ROUNDS  # the latency rounds
    assert plan("scenarios", "stream-c32,cache-hit").rounds == 0
    assert plan("quick", True, "rounds", 2).rounds == 2
    assert (plan().client, plan("client", "wrk").client) == ("loadgen", "wrk")
    # The default rounds keep to the run's budget; rounds asked for by number all run.
    assert (plan().budget_seconds, plan("rounds", 7).budget_seconds) == (RUN_BUDGET_SECONDS, None)


@pytest.mark.parametrize(
    ("done", "elapsed", "budget", "more"),
    [
        (0, 1000.0, 570.0, True),  # over the budget already: still the minimum of rounds
        (MIN_ROUNDS - 1, 1000.0, 570.0, True),
        (MIN_ROUNDS, 480.0, 570.0, True),  # 480 + 30 for the round + 2 × (20 + 8) for the soaks = 566
        (MIN_ROUNDS, 490.0, 570.0, False),  # 490 + 30 + 56 = 576: the soaks would overrun
        (MIN_ROUNDS, 490.0, None, True),  # no budget: the count alone
        (DEFAULT_ROUNDS, 0.0, 570.0, False),  # the count is reached
    ],
)
def test_default_rounds_stop_early_when_the_rest_would_overrun_the_budget(
    done: int, elapsed: float, budget: float | None, more: bool
) -> None:
    plan = Plan((), (), soak_seconds=20.0, quick=False, rounds=DEFAULT_ROUNDS, budget_seconds=budget)
    assert more_rounds(done, plan, elapsed, round_seconds=30.0) is more


@pytest.mark.parametrize(
    ("sizes", "drift"),
    [
        ([100] * 10, 0.0),
        ([50, 80] + [100] * 8, 0.0),  # growth during warm-up is not drift
        ([100, 100, 100, 100, 105, 110, 115, 120, 120, 120], 0.2),
        ([100] * 18 + [150] * 3 + [120] * 19, 0.2),  # a level that stays higher is drift
        ([100] * 37 + [150] * 3, 0.0),  # a transient at the end, as an embedded merge's buffers, is not
    ],
)
def test_memory_drift_ignores_warm_up_and_transients(sizes: list[int], drift: float) -> None:
    trace = Trace(tuple((float(t), size * 2**20) for t, size in enumerate(sizes)))
    assert trace.drift == pytest.approx(drift)


def test_memory_report_shows_a_transient_beside_the_drift() -> None:
    trace = Trace(tuple((t * 0.5, size * 2**20) for t, size in enumerate([100] * 37 + [150] * 3)))
    assert trace.seconds_beyond(0.10) == pytest.approx(1.5)
    assert trace.seconds_beyond(0.60) == 0.0
    assert "100.0 MB → 100.0 MB (+0.0%), peak 150.0 MB (+50.0%; 1.5 s above +10%)" in trace.describe()


def test_profile_summary_attributes_samples_to_areas() -> None:
    raw = (
        "main (bench/x.py:1);handle (edgeproxy/pipeline.py:43);_send (edgeproxy/upstream.py:141) 6\n"
        "main (bench/x.py:1);_writelines (aiohttp/http_writer.py:90) 3\n"
        "main (bench/x.py:1);ClientSession._request (aiohttp/client.py:700) 1\n"
        "garbage line\n"
    )
    assert sum(parse_stacks(raw).values()) == 10
    assert [area(p) for p in ("edgeproxy/upstream.py", "aiohttp/client.py", "aiohttp/web.py", "asyncio/tasks.py")] \
        == ["edgeproxy", "aiohttp client", "aiohttp server/http", "asyncio"]
    text = profile_summary("c64", raw, _measured("edgeproxy-1w", "c64", 1000, 1, 2))
    assert "| edgeproxy | 60.0% |" in text and "| aiohttp server/http | 30.0% |" in text
    assert "| `handle (edgeproxy/pipeline.py)` | 60.0% |" in text


@pytest.mark.parametrize("store", ["embedded", "http"])
async def test_log_insert_bench_measures_both_sides_per_batch_size(store: str, tmp_path: Path) -> None:
    costs = await log_insert.measure(store, [20, 100], total_rows=200, scratch=tmp_path, pace=0)
    assert [cost.batch_rows for cost in costs] == [20, 100]
    assert all(cost.writer_us_per_row > 0 and cost.ms_per_insert > 0 for cost in costs)
    assert all(cost.peak_parts >= 1 for cost in costs)
    # Only the double runs in a process of its own.
    assert all((cost.server_us_per_row is not None) == (store == "http") for cost in costs)
    table = log_insert.render(costs)
    assert table.count(f"| {store} |") == 2


async def test_log_memory_trace_reports_rows_and_resident_memory(tmp_path: Path) -> None:
    trace = await log_insert.memory_trace("http", 4, tmp_path, batch_rows=50, every=2)
    assert [rows for rows, _, _ in trace] == [100, 200]
    assert all(rss >= anon > 0 for _, rss, anon in trace)
