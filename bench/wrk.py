"""wrk, a C load generator, for the throughput scenarios (non-streaming, concurrency > 1): `--client wrk`.

`bench.loadgen`, the Python client, takes most of a core at c64 on a machine whose two cores it
shares with the mock and the contender; wrk needs a small fraction of that per request, so the
contenders' figures depend less on what the client leaves them (bench/README.md, "The client's
share"). `bench.loadgen` keeps what wrk cannot measure: time to first byte and the gaps between
SSE events.

wrk runs by time alone (whole seconds, one thread, one connection per unit of concurrency); its
Lua `done` hook prints the summary as one JSON line, which `parse` turns into the same LoadResult
the Python client gives. Responses with a status of 400 and above count as errors, as in wrk's own
summary; its latency percentiles come from its histogram.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .loadgen import LoadResult, Scenario, Stats

MARKER = "EDGEPROXY_WRK "
# Generous like the Python client's: a slow contender's request is late, not an error.
REQUEST_TIMEOUT = "60s"
# Before the clock: open the connections and the contender's upstream pool.
WARMUP_SECONDS = 1

# Lua: the request, and a `done` hook printing the summary (latencies in microseconds).
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,'
    .. '"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    MARKER, summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
_SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def drives(scenario: Scenario) -> bool:
    """True for the scenarios wrk runs: non-streaming at concurrency above 1."""
    return not scenario.stream and scenario.concurrency > 1


def script(scenario: Scenario) -> str:
    """The Lua script sending the scenario's request (the same body and headers as the Python client)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_literal(scenario.body().decode())}"]
    # The spaces matter: "[[[" would open a long string in Lua.
    lines += [f"wrk.headers[ {lua_literal(name)} ] = {lua_literal(value)}"
              for name, value in scenario.headers().items()]
    lines.append(f"MARKER = {lua_literal(MARKER)}")
    return "\n".join(lines) + "\n" + _DONE


def command(binary: str, base_url: str, scenario: Scenario, script_path: Path, seconds: float) -> list[str]:
    """The wrk command line for `seconds` (rounded up to whole seconds, as wrk takes them) of the scenario."""
    return [
        binary, "--threads", "1", "--connections", str(scenario.concurrency),
        "--duration", f"{max(1, math.ceil(seconds))}s", "--timeout", REQUEST_TIMEOUT,
        "--script", str(script_path), base_url.rstrip("/") + scenario.path,
    ]


def parse(output: str, scenario: Scenario, base_url: str) -> LoadResult:
    """wrk's summary line as a LoadResult; raises ValueError when the output has none."""
    line = next((line for line in output.splitlines() if line.startswith(MARKER)), None)
    if line is None:
        raise ValueError(f"wrk printed no summary: {output[-500:]!r}")
    summary = json.loads(line[len(MARKER):])
    seconds = summary["duration_us"] / 1e6
    kinds = {f"socket {kind}": summary[kind] for kind in _SOCKET_ERRORS if summary[kind]}
    if summary["status"]:
        kinds["HTTP status >= 400"] = summary["status"]
    # wrk counts a response whatever its status; a socket error is no response.
    ok = summary["requests"] - summary["status"]
    latency = None
    if ok > 0:
        ms = 1e-3
        latency = Stats(count=summary["requests"], mean=summary["mean_us"] * ms, p50=summary["p50_us"] * ms,
                        p90=summary["p90_us"] * ms, p99=summary["p99_us"] * ms, max=summary["max_us"] * ms)
    return LoadResult(
        scenario=scenario.name,
        url=base_url,
        concurrency=scenario.concurrency,
        completed=ok,
        errors=sum(kinds.values()),
        seconds=seconds,
        rps=ok / seconds if seconds > 0 else 0.0,
        latency=latency,
        ttfb=None,
        chunk_gap=None,
        events_per_stream=None,
        error_kinds=kinds,
    )


def version(output: str) -> str:
    """`4.1.0` from what `wrk -v` prints, whose first line is `wrk debian/4.1.0-3+b2 [epoll] …`."""
    first = output.splitlines()[:1]
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", first[0]) if first else None
    return match.group(1) if match else "unknown"


def lua_literal(text: str) -> str:
    """A Lua long-bracket literal holding `text` verbatim (no escapes to get wrong)."""
    level = 0
    # The first closing bracket of this level must be the one appended (text ending in "]" counts).
    while (text + f"]{'=' * level}]").find(f"]{'=' * level}]") < len(text):
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"
