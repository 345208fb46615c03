"""bench/wrk.py: the C client of the throughput scenarios, run for real against the mock (a second or two each)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from pathlib import Path

import pytest

from bench import wrk
from bench.contenders import Backdrop, ContenderSpec, command_output, debian_binary, start, start_mock
from bench.loadgen import SCENARIOS, LoadResult, Scenario, scenario
from bench.measure import measure
from bench.mock_upstream import MockUpstream


@pytest.fixture(scope="module")
def wrk_binary() -> str:
    # `make test` installs it; on a machine without it, this installs it as `make bench` would.
    return debian_binary("wrk")


async def _run(binary: str, url: str, chosen: Scenario, folder: Path, seconds: float = 1) -> LoadResult:
    script = folder / "load.lua"
    script.write_text(wrk.script(chosen))
    done = await asyncio.to_thread(
        subprocess.run, wrk.command(binary, url, chosen, script, seconds), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert not done.stderr, done.stderr  # a Lua error is printed here, and wrk runs on without the script
    return wrk.parse(done.stdout, chosen, url)


def test_wrk_drives_the_non_streaming_concurrent_scenarios_only() -> None:
    assert [s.name for s in SCENARIOS if wrk.drives(s)] == ["c64", "cache-hit"]


async def test_wrk_sends_the_scenarios_request_and_counts_what_came_back(
    wrk_binary: str, mock: MockUpstream, tmp_path: Path
) -> None:
    chosen = dataclasses.replace(scenario("cache-hit"), concurrency=4)
    result = await _run(wrk_binary, mock.url, chosen, tmp_path)
    assert result.errors == 0 and result.completed > 20 and result.rps > 0
    # Requests still in flight when the clock stops reached the mock but are not counted.
    assert result.completed <= len(mock.requests) <= result.completed + chosen.concurrency
    first = mock.requests[0]
    assert first.body == chosen.body()
    assert first.headers["Helicone-Cache-Enabled"] == "true"
    assert first.headers["Authorization"] == "Bearer sk-bench"
    assert result.latency is not None
    assert 0 < result.latency.p50 <= result.latency.p90 <= result.latency.p99 <= result.latency.max
    assert 0.9 <= result.seconds <= 3.0  # wrk's own clock, from its summary


async def test_wrk_counts_error_responses_as_errors_not_throughput(
    wrk_binary: str, mock: MockUpstream, tmp_path: Path
) -> None:
    chosen = Scenario("e", concurrency=2, requests=0, seconds=1, model="mock-error-500")
    result = await _run(wrk_binary, mock.url, chosen, tmp_path)
    assert (result.completed, result.rps, result.latency) == (0, 0.0, None)
    assert result.errors > 0 and result.error_kinds == {"HTTP status >= 400": result.errors}


def test_parse_reads_the_summary_line_among_wrks_own_output() -> None:
    chosen = scenario("c64")
    output = (
        "Running 2s test @ http://127.0.0.1:1/v1/chat/completions\n  5 requests in 2.00s\n"
        'EDGEPROXY_WRK {"requests":1000,"duration_us":2000000,"status":10,"connect":0,"read":3,"write":0,'
        '"timeout":2,"mean_us":1500.0,"p50_us":1000,"p90_us":2000,"p99_us":5000,"max_us":9000}\n'
    )
    result = wrk.parse(output, chosen, "http://127.0.0.1:1")
    assert (result.completed, result.errors, result.rps, result.seconds) == (990, 15, 495.0, 2.0)
    assert result.error_kinds == {"socket read": 3, "socket timeout": 2, "HTTP status >= 400": 10}
    assert result.latency is not None and (result.latency.p50, result.latency.p99) == (1.0, 5.0)
    with pytest.raises(ValueError, match="no summary"):
        wrk.parse("Running 2s test\nunable to connect\n", chosen, "http://127.0.0.1:1")


@pytest.mark.parametrize("text", ["plain", "a \"quoted\" [x]", "ends in ]", "ends in ]]", "]=] and ]]", "line\nbreak"])
def test_lua_literals_hold_any_text(wrk_binary: str, tmp_path: Path, text: str) -> None:
    """The body and headers go into the script verbatim: checked by wrk's own Lua, which echoes them back."""
    script = tmp_path / "echo.lua"
    literal = wrk.lua_literal(text)
    script.write_text(f"io.write({literal})\nos.exit(0)\n")
    done = subprocess.run([wrk_binary, "-s", str(script), "http://127.0.0.1:9/"], capture_output=True, text=True,
                          check=False,
                          timeout=30)
    assert done.stdout == text


def test_measure_runs_throughput_scenarios_on_wrk_when_the_backdrop_has_it(wrk_binary: str, tmp_path: Path) -> None:
    mock, mock_url = start_mock(tmp_path)
    try:
        backdrop = Backdrop(mock_url, mock.pid, None, tmp_path, wrk=wrk_binary)
        running = start(ContenderSpec("edgeproxy-1w", "edgeproxy"), backdrop)
        try:
            done = measure(running, Scenario("c64", 8, 10_000_000, 1), backdrop)
            assert done.result.errors == 0 and done.result.completed > 20
            # wrk's warm-up run is left out of the figures: no warm-up requests, per-request CPU over the run.
            assert done.result.warmup == 0 and done.result.ttfb is None
            assert done.server_cpu_s > 0 and done.client_cpu_s > 0 and done.loop_cpu_s is not None
        finally:
            running.stop()
    finally:
        mock.stop()


def test_version_reads_the_first_line_wrk_prints(wrk_binary: str) -> None:
    assert wrk.version("wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer\nUsage: wrk") == "4.1.0"
    assert wrk.version("") == "unknown"
    assert wrk.version(command_output([wrk_binary, "-v"]))[0].isdigit()
