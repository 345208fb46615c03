"""Instructions per request, counted by valgrind's callgrind: a cost figure a noisy machine repeats.

Timings on a shared 2-core VM move ±10–20% from one minute to the next (bench/README.md), more
than most changes to the hot path. The instructions a server executes for the same requests do
not: two runs agree within ~1%. So a hot-path change is judged here first, and `bench.compare`
shows what it does to time (which instructions leave out: the kernel's share of each syscall,
cache misses, the machine's speed).

    python -m bench.instructions                          # edgeproxy (log off) and the aiohttp floor
    python -m bench.instructions --only edgeproxy --logs embedded --scenario stream-c1

The server runs under `valgrind --tool=callgrind --instr-atstart=no`: uninstrumented (faster)
through start-up and a warm-up, then instrumented with its counters zeroed for `--requests`
requests sent one at a time by `bench.loadgen`, then dumped. Every thread is counted; the main
thread's share is what bounds a 1-worker gateway (its event loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import floor_proxy, loadgen
from .contenders import (
    ROOT,
    START_SECONDS,
    LogMode,
    Process,
    child_env,
    debian_binary,
    edgeproxy_command,
    free_port,
    start_mock,
)
from .loadgen import LoadResult, scenario

# Before the count: Python's specializing interpreter, the pools and the memos settle.
WARMUP_REQUESTS = 100
KINDS = ("edgeproxy", "floor")


@dataclass(frozen=True)
class Count:
    """What one instrumented run counted."""

    kind: str
    logs: LogMode
    scenario: str
    requests: int
    errors: int
    total_instructions: int
    main_thread_instructions: int

    @property
    def label(self) -> str:
        return self.kind if self.logs == "off" else f"{self.kind} (log {self.logs})"

    @property
    def per_request(self) -> float:
        return self.total_instructions / max(self.requests, 1)

    @property
    def main_per_request(self) -> float:
        return self.main_thread_instructions / max(self.requests, 1)


def server_command(kind: str, port: int, mock_url: str, data_dir: Path) -> list[str]:
    """The command line of the server measured: edgeproxy with 1 worker, or the aiohttp floor."""
    if kind == "floor":
        return floor_proxy.command(port, mock_url)
    return edgeproxy_command(port, mock_url, data_dir, workers=1)


def thread_totals(dump_files: Sequence[Path]) -> dict[int, int]:
    """Instructions per thread (1 is the main thread) from one dump's files, named `<out>.<dump>-<thread>`."""
    totals = {}
    for path in dump_files:
        thread = int(path.name.rsplit("-", 1)[1])
        totals[thread] = read_total(path.read_text(errors="replace"))
    return totals


def read_total(dump: str) -> int:
    """The event count of a callgrind dump (its `totals:` line, else `summary:`); raises when it has neither."""
    found = {}
    for line in dump.splitlines():
        key, _, value = line.partition(":")
        if key in ("totals", "summary"):
            found[key] = int(value.split()[0])
    if not found:
        raise ValueError("callgrind dump without a totals or summary line")
    return found["totals"] if "totals" in found else found["summary"]


def count(
    kind: str, chosen_scenario: str, requests: int, logs: LogMode, scratch: Path, mock_url: str,
    warmup: int = WARMUP_REQUESTS,
) -> Count:
    """Start `kind` under callgrind in front of the mock, count `requests` requests, stop it."""
    valgrind = debian_binary("valgrind")
    control = str(Path(valgrind).with_name("callgrind_control"))
    port = free_port()
    out = scratch / f"callgrind-{kind}-{logs}-{chosen_scenario}"
    folder = scratch / f"{kind}-{logs}"
    folder.mkdir(parents=True, exist_ok=True)
    env = child_env(EDGEPROXY_LOGS_ENABLED="false") if logs == "off" else child_env()
    command = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
               f"--callgrind-out-file={out}", *server_command(kind, port, mock_url, folder / "data")]
    server = Process(f"{kind} under callgrind", command, folder / "server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        # Several times slower under valgrind even uninstrumented: a longer start-up allowance.
        server.wait_http(url + "/v1/models", time.monotonic() + 4 * START_SECONDS)
        _load(url, chosen_scenario, warmup)
        for step in (["--instr=on"], ["--zero"]):
            subprocess.run([control, *step, str(server.pid)], check=True, capture_output=True, timeout=120)
        result = _load(url, chosen_scenario, requests)
        subprocess.run([control, "--dump", str(server.pid)], check=True, capture_output=True, timeout=300)
        totals = thread_totals(_wait_for_dump(out))
    finally:
        server.stop(timeout=60)
    return Count(kind, logs, chosen_scenario, result.completed, result.errors, sum(totals.values()), totals.get(1, 0))


def _load(url: str, chosen_scenario: str, requests: int) -> LoadResult:
    one_at_a_time = dataclasses.replace(scenario(chosen_scenario), requests=requests, seconds=600, concurrency=1,
                                        warmup=0)
    done = subprocess.run(loadgen.command(url, one_at_a_time), cwd=ROOT, capture_output=True, check=True, timeout=900)
    return LoadResult.from_json(orjson.loads(done.stdout))


def _wait_for_dump(out: Path, timeout: float = 60.0) -> list[Path]:
    """The files of the first dump, once callgrind has written every thread's (it writes them in turn)."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(out.parent.glob(out.name + ".1-*"))
        if files and all(_total_or_none(path) is not None for path in files):
            return files
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no complete dump at {out}.1-*")
        time.sleep(0.2)


def _total_or_none(path: Path) -> int | None:
    try:
        return read_total(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None


def render(counts: Sequence[Count]) -> str:
    """A Markdown table: thousands of instructions per request, all threads and the main one, against the floor."""
    floor = next((c for c in counts if c.kind == "floor"), None)
    lines = ["| server | scenario | requests | errors | kIr/request | main thread | ÷ floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in counts:
        ratio = f"{c.per_request / floor.per_request:.2f}×" if floor and floor.scenario == c.scenario else "–"
        lines.append(f"| {c.label} | {c.scenario} | {c.requests} | {c.errors} | {c.per_request / 1000:.0f} "
                     f"| {c.main_per_request / 1000:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=KINDS, help="count one server (default: edgeproxy, then the floor)")
    parser.add_argument("--logs", choices=("off", "embedded"), default="off", help="edgeproxy's request log")
    parser.add_argument("--scenario", default="c1", help="a bench.loadgen scenario, sent one request at a time")
    parser.add_argument("--requests", type=int, default=400, help="requests counted (after a warm-up)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        scenario(args.scenario)  # an unknown name fails here, before anything starts
    except KeyError as exc:
        parser.error(exc.args[0])
    scratch = Path(tempfile.mkdtemp(prefix="edgeproxy-instructions-"))
    mock, mock_url = start_mock(scratch)
    try:
        counts = [count(kind, args.scenario, args.requests, args.logs if kind == "edgeproxy" else "off",
                        scratch, mock_url) for kind in ([args.only] if args.only else KINDS)]
    finally:
        mock.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(orjson.dumps([{**c.__dict__, "per_request": c.per_request} for c in counts]).decode())
    else:
        print(render(counts))
    return 1 if any(c.errors for c in counts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
