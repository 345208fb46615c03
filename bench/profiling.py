"""`python -m bench.compare --profile`: py-spy on a 1-worker edgeproxy, summarised by area and function."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .contenders import Backdrop, ContenderSpec, Process, start, start_clickhouse, start_mock
from .loadgen import Scenario
from .measure import Measurement, find_wrk, measure
from .report import _stat

PROFILE_CONTENDER = ContenderSpec("edgeproxy-1w-profile", "edgeproxy")
PROFILE_SCENARIOS = ("c64", "stream-c32")


def profile(scenarios: Sequence[Scenario], scratch: Path, results: Path, *, use_wrk: bool = False,
            spec: ContenderSpec = PROFILE_CONTENDER) -> str:
    """py-spy on a 1-worker edgeproxy while each scenario runs (its stacks kept in `results`); returns a
    Markdown summary."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")
    mock, mock_url = start_mock(scratch)
    clickhouse: Process | None = None
    sections = []
    try:
        clickhouse_url = None
        if spec.logs == "clickhouse":
            clickhouse, clickhouse_url = start_clickhouse(scratch)
        backdrop = Backdrop(mock_url, mock.pid, clickhouse_url, scratch,
                            wrk=find_wrk({}, {}) if use_wrk else None)
        running = start(spec, backdrop)
        try:
            for chosen in scenarios:
                stacks = results / f"profile-{spec.name}-{chosen.name}.txt"
                # --nonblocking: sample without pausing the server, so the figures stay honest.
                spy_command = [spy, "record", "--pid", str(running.pid), "--rate", "250", "--nonblocking",
                               "--format", "raw", "--output", str(stacks),
                               "--duration", str(int(chosen.seconds) + 2)]
                spying = subprocess.Popen(spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                done = measure(running, chosen, backdrop)
                _, err = spying.communicate(timeout=chosen.seconds + 60)
                if not stacks.exists():
                    raise SystemExit(f"py-spy wrote nothing: {err.decode()[-1000:]}")
                sections.append(profile_summary(f"{spec.name}, {chosen.name}", stacks.read_text(), done))
        finally:
            running.stop()
    finally:
        if clickhouse is not None:
            clickhouse.stop()
        mock.stop()
    return "\n\n".join(sections)


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def area(path: str) -> str:
    """The part of the stack a frame belongs to, by its file: edgeproxy, aiohttp server or client, asyncio…"""
    if "edgeproxy/" in path:
        return "edgeproxy"
    if "aiohttp/" in path:
        name = path.rsplit("/", 1)[-1]
        return "aiohttp client" if name.startswith(("client", "connector")) else "aiohttp server/http"
    tail = path.split("site-packages/")[-1]
    return tail.split("/", 1)[0].removesuffix(".py") if "/" in tail else tail.removesuffix(".py")


def parse_stacks(raw: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: `frame;frame;… count` per line."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _label(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match.group("function"), match.group("file")) if match else (frame, "")


def profile_summary(name: str, raw: str, done: Measurement, top: int = 15) -> str:
    """Where the CPU went: share by area, and the top functions by self and by inclusive time."""
    stacks = parse_stacks(raw)
    total = sum(stacks.values()) or 1
    by_area: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    by_total: Counter[str] = Counter()
    for stack, count in stacks.items():
        labels = [_label(frame) for frame in stack]
        function, path = labels[-1]
        by_area[area(path)] += count
        by_self[f"{function} ({path})"] += count
        for seen in {f"{f} ({p})" for f, p in labels}:
            by_total[seen] += count
    r = done.result
    lines = [f"## Profile: {name}", "",
             (f"{total} samples at 250 Hz (idle excluded) while serving {r.rps:.0f} req/s, p50 "
              f"{_stat(r.latency, 'p50')} ms, p99 {_stat(r.latency, 'p99')} ms; server CPU "
              f"{done.cpu_us_per_request or 0:.0f} µs/request."), "",
             "| area (self time) | share |", "| --- | --- |"]
    lines += [f"| {key} | {count / total:.1%} |" for key, count in by_area.most_common(12)]
    for title, counts in (("self", by_self), ("inclusive", _inclusive_of_interest(by_total))):
        lines += ["", f"| top functions ({title}) | share |", "| --- | --- |"]
        lines += [f"| `{key}` | {count / total:.1%} |" for key, count in counts.most_common(top)]
    return "\n".join(lines)


def _inclusive_of_interest(by_total: Counter[str]) -> Counter[str]:
    """Inclusive time without the frames every sample shares (runpy, the event loop's run methods)."""
    shared = ("runpy", "run_app", "Runner.run", "run_until_complete", "run_forever", "<module>", "main (")
    return Counter({key: count for key, count in by_total.items() if not any(s in key for s in shared)})
