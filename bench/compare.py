"""`make bench`: every contender in front of one mock, each scenario driven from its own load process.

    python -m bench.compare            full run (< 10 min), writes bench/RESULTS.md
    python -m bench.compare --quick    ~1 minute subset
    python -m bench.compare --soak 300 the 5-minute memory check
    python -m bench.compare --profile  py-spy on edgeproxy under c64 and stream-c32

Raw figures go to bench/results/ (ignored by git) as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from . import loadgen, wrk
from .contenders import (
    ROOT,
    Backdrop,
    ContenderSpec,
    Process,
    Running,
    Unavailable,
    command_output,
    cpu_seconds,
    debian_binary,
    log_completeness,
    machine_ticks,
    main_thread_cpu_seconds,
    rss_bytes,
    start,
    start_clickhouse,
    start_mock,
    steal_share,
)
from .loadgen import SCENARIOS, LoadResult, Scenario, Stats, format_table, scenario

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"
SAMPLE_SECONDS = 0.5
QUICK_FACTOR = 0.2

CONTENDERS: tuple[ContenderSpec, ...] = (
    ContenderSpec("direct", "direct"),
    ContenderSpec("nginx", "nginx"),
    ContenderSpec("litellm", "litellm"),
    ContenderSpec("edgeproxy-1w", "edgeproxy"),
    ContenderSpec("edgeproxy-1w-embedded", "edgeproxy", logs="embedded"),
    ContenderSpec("edgeproxy-1w-clickhouse", "edgeproxy", logs="clickhouse"),
    ContenderSpec("edgeproxy-2w", "edgeproxy", workers=2),
    ContenderSpec("edgeproxy-2w-clickhouse", "edgeproxy", workers=2, logs="clickhouse"),
)
QUICK_CONTENDERS = ("direct", "nginx", "litellm", "edgeproxy-1w", "edgeproxy-1w-embedded")
# The default configuration (embedded log store on): what a user runs, so what must not grow; its
# RSS holds the gateway and the chDB engine, whose memory follows the data it stores and merges.
# The same gateway logging to the ClickHouse double shows the gateway's own memory alone.
SOAK_CONTENDERS = (
    ContenderSpec("edgeproxy-1w-soak", "edgeproxy", logs="embedded"),
    ContenderSpec("edgeproxy-1w-soak-clickhouse", "edgeproxy", logs="clickhouse"),
)
SOAK_MEMORY = {
    "embedded": "embedded log store on: gateway and chDB engine",
    "clickhouse": "log to the ClickHouse double: the gateway alone",
}
PROFILE_CONTENDER = ContenderSpec("edgeproxy-1w-profile", "edgeproxy")
PROFILE_SCENARIOS = ("c64", "stream-c32")
# The throughput ratios the targets judge, measured again in interleaved rounds: on this kind of
# machine one 6 s pass of each contender swings ±10% with the neighbours' load, more than the
# margins the targets leave. Rounds put the contenders side by side in time; the median of the
# per-round ratios is what the targets read.
PAIRED_CONTENDERS = ("nginx", "edgeproxy-1w", "edgeproxy-1w-embedded", "edgeproxy-1w-clickhouse")
# Interleaved rounds: per round, a figure for each contender measured in it.
Rounds = tuple[dict[str, float], ...]
# Long enough that the last log batch of a window, which lands after it, is a small share of it.
PAIRED_SECONDS = 5.0
DEFAULT_ROUNDS = 7
# `make bench` must finish within 10 minutes. On a slow machine (9 min 35 s on a 2-core EPYC, LiteLLM
# alone taking 80 s to start) the default rounds stop early, once the next would not fit with the
# soaks after it, but never below MIN_ROUNDS. Rounds asked for with --rounds all run.
RUN_BUDGET_SECONDS = 570.0
MIN_ROUNDS = 3
# A soak's start, stop and log check around its measured window, for the budget.
SOAK_OVERHEAD_SECONDS = 15.0


@dataclass(frozen=True)
class Plan:
    contenders: tuple[ContenderSpec, ...]
    scenarios: tuple[Scenario, ...]
    soak_seconds: float
    quick: bool
    rounds: int = 0
    # "wrk": the throughput scenarios, rounds and soaks on wrk (bench/wrk.py); "loadgen": all on bench.loadgen.
    client: Literal["loadgen", "wrk"] = "loadgen"
    # Seconds the whole run may take; the default rounds stop early to keep it (None: no limit).
    budget_seconds: float | None = None

    def scenarios_for(self, spec: ContenderSpec) -> list[Scenario]:
        """Only gateways cache; `direct` runs the cache scenario too, as the cost of going upstream."""
        return [s for s in self.scenarios if not s.cache or spec.kind in ("direct", "edgeproxy")]


# --- what a run measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Resident memory samples of one process tree: (seconds since the load began, bytes)."""

    samples: tuple[tuple[float, int], ...]

    def _settled(self) -> list[int]:
        # The first fifth is warm-up (pools, caches and allocator arenas filling), not growth.
        if not self.samples:
            return []
        horizon = self.samples[-1][0] * 0.2
        return [size for at, size in self.samples if at >= horizon] or [self.samples[-1][1]]

    @property
    def start_mb(self) -> float:
        settled = self._settled()
        return statistics.median(settled[:3]) / 2**20 if settled else 0.0

    @property
    def end_mb(self) -> float:
        settled = self._settled()
        return statistics.median(settled[-3:]) / 2**20 if settled else 0.0

    @property
    def peak_mb(self) -> float:
        return max((size for _, size in self.samples), default=0) / 2**20

    @property
    def drift(self) -> float:
        """Relative change from the settled start to the end: 0.05 is 5 % growth."""
        return self.end_mb / self.start_mb - 1.0 if self.start_mb else 0.0

    def describe(self) -> str:
        return (f"{self.start_mb:.1f} MB → {self.end_mb:.1f} MB ({self.drift:+.1%}), peak {self.peak_mb:.1f} MB, "
                f"{len(self.samples)} samples")


@dataclass(frozen=True)
class Measurement:
    """One scenario against one contender: the client's view plus the server's memory and CPU."""

    contender: str
    scenario: str
    result: LoadResult
    rss: Trace
    server_cpu_s: float
    # The mock's CPU while a proxy ran (None for `direct`, where the mock is the server).
    mock_cpu_s: float | None
    client_cpu_s: float
    # The event-loop thread's share of server_cpu_s, for a 1-worker edgeproxy (None otherwise): its
    # writer and engine threads run beside it, and the loop's figure moves far less than req/s.
    loop_cpu_s: float | None = None
    # The share of the machine's CPU time the hypervisor gave to other guests meanwhile (/proc/stat):
    # on a shared VM, the noise no figure here can correct for.
    steal: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU per request (warm-up included): efficiency that CPU contention does not distort."""
        return self._per_request(self.server_cpu_s)

    @property
    def loop_us_per_request(self) -> float | None:
        """The event-loop thread's CPU per request (warm-up included), when measured."""
        return None if self.loop_cpu_s is None else self._per_request(self.loop_cpu_s)

    def _per_request(self, cpu_s: float) -> float | None:
        sent = self.result.completed + self.result.errors + self.result.warmup
        return cpu_s / sent * 1e6 if sent else None


@dataclass(frozen=True)
class LogCount:
    """A logging edgeproxy's requests against the rows its log held before it stopped."""

    contender: str
    phase: str  # "scenarios", "rounds" or "soak": each is a gateway of its own
    served: int
    stored: int


@dataclass(frozen=True)
class RunReport:
    date: str
    quick: bool
    machine: dict[str, Any]
    versions: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    measurements: tuple[Measurement, ...]
    soaks: tuple[Measurement, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    # Interleaved c64 rounds: each maps a contender to its req/s in that round.
    rounds: Rounds = ()
    # The same rounds: each maps a 1-worker edgeproxy to its event-loop thread's CPU µs per request.
    rounds_loop_us: Rounds = ()
    # The same rounds: each maps a contender to the machine's steal share during its window.
    rounds_steal: Rounds = ()
    log_counts: tuple[LogCount, ...] = ()

    def find(self, contender: str, scenario_name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.contender == contender and m.scenario == scenario_name), None)

    def throughput_ratio(self, ours: str, theirs: str) -> tuple[float, str] | None:
        """`ours` c64 req/s over `theirs`, and how it was measured: the median over the rounds when there are any."""
        paired = [r[ours] / r[theirs] for r in self.rounds if r.get(ours) and r.get(theirs)]
        if paired:
            ratio = statistics.median(paired)
            # Three decimals: at two, a median of 0.8993 reads "0.90×" beside a miss of "within 10%".
            return ratio, (f"{ratio:.3f}× (median of {len(paired)} interleaved rounds, "
                           f"{min(paired):.2f}–{max(paired):.2f})")
        mine, peer = self.find(ours, "c64"), self.find(theirs, "c64")
        if mine is None or peer is None or not peer.result.rps:
            return None
        ratio = mine.result.rps / peer.result.rps
        return ratio, f"{ratio:.2f}× ({mine.result.rps:.0f} vs {peer.result.rps:.0f} req/s)"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    ok: bool | None  # None: not measured in this run


def build_plan(args: argparse.Namespace) -> Plan:
    names = set(args.only.split(",")) if args.only else set(QUICK_CONTENDERS if args.quick else ())
    contenders = tuple(c for c in CONTENDERS if not names or c.name in names)
    unknown = names - {c.name for c in CONTENDERS}
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}")
    chosen = [scenario(n) for n in args.scenarios.split(",")] if args.scenarios else list(SCENARIOS)
    if args.quick:
        chosen = [s.scaled(QUICK_FACTOR) for s in chosen]
    soak = args.soak if args.soak is not None else (5.0 if args.quick else 20.0)
    rounds = args.rounds if args.rounds is not None else (0 if args.quick else DEFAULT_ROUNDS)
    if not any(s.name == "c64" for s in chosen):
        rounds = 0
    budget = RUN_BUDGET_SECONDS if args.rounds is None else None
    return Plan(contenders, tuple(chosen), soak, args.quick, rounds, args.client, budget)


def more_rounds(done: int, plan: Plan, elapsed: float, round_seconds: float) -> bool:
    """Whether another interleaved round runs: the plan's count, cut short when the next round and
    the soaks after it would overrun the run's budget (never below MIN_ROUNDS)."""
    if done >= plan.rounds:
        return False
    if plan.budget_seconds is None or done < MIN_ROUNDS:
        return True
    soaks = len(SOAK_CONTENDERS) * (plan.soak_seconds + SOAK_OVERHEAD_SECONDS) if plan.soak_seconds > 0 else 0.0
    return elapsed + round_seconds + soaks <= plan.budget_seconds


def measure(running: Running, chosen: Scenario, backdrop: Backdrop) -> Measurement:
    """Drive one scenario from a separate load process while sampling the contender's memory and CPU."""
    read: Callable[[bytes], LoadResult]
    if backdrop.wrk is not None and wrk.drives(chosen):
        script = backdrop.scratch / f"wrk-{chosen.name}.lua"
        script.write_text(wrk.script(chosen))
        # wrk has no warm-up of its own: an untimed run first, before the CPU figures start.
        subprocess.run(wrk.command(backdrop.wrk, running.url, chosen, script, wrk.WARMUP_SECONDS),
                       capture_output=True, check=False, timeout=120)
        command = wrk.command(backdrop.wrk, running.url, chosen, script, chosen.seconds)

        def read(out: bytes) -> LoadResult:
            return wrk.parse(out.decode(errors="replace"), chosen, running.url)
    else:
        command = loadgen.command(running.url, chosen)

        def read(out: bytes) -> LoadResult:
            return LoadResult.from_json(orjson.loads(out))
    single_loop = running.spec.kind == "edgeproxy" and running.spec.workers == 1
    loop_before = main_thread_cpu_seconds(running.pid) if single_loop else 0.0
    server_before = cpu_seconds(running.pid)
    mock_before = cpu_seconds(backdrop.mock_pid)
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks_before = machine_ticks()
    started = time.monotonic()
    load = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    deadline = started + chosen.seconds + 120.0
    while load.poll() is None:
        samples.append((time.monotonic() - started, rss_bytes(running.pid)))
        if time.monotonic() > deadline:
            load.kill()
        time.sleep(SAMPLE_SECONDS)
    out, err = load.communicate()
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steal = steal_share(ticks_before, machine_ticks())
    if load.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({load.returncode}): {err.decode()[-2000:]}")
    samples.append((time.monotonic() - started, rss_bytes(running.pid)))
    server = cpu_seconds(running.pid) - server_before
    loop = main_thread_cpu_seconds(running.pid) - loop_before if single_loop else None
    mock = cpu_seconds(backdrop.mock_pid) - mock_before
    client = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    return Measurement(
        contender=running.spec.name,
        scenario=chosen.name,
        result=read(out),
        rss=Trace(tuple(samples)),
        server_cpu_s=server,
        mock_cpu_s=None if running.pid == backdrop.mock_pid else mock,
        client_cpu_s=client,
        loop_cpu_s=loop,
        steal=steal,
    )


def run(plan: Plan, scratch: Path) -> RunReport:
    """Start the backdrop, then each contender in turn; a contender that cannot start is skipped, with why."""
    run_started = time.monotonic()
    load_before = os.getloadavg()
    mock, mock_url = start_mock(scratch)
    clickhouse: Process | None = None
    clickhouse_url: str | None = None
    skipped: dict[str, str] = {}
    measurements: list[Measurement] = []
    versions: dict[str, str] = {}
    soaks: tuple[Measurement, ...] = ()
    rounds: Rounds = ()
    rounds_loop_us: Rounds = ()
    rounds_steal: Rounds = ()
    log_counts: list[LogCount] = []
    try:
        if any(c.logs == "clickhouse" for c in plan.contenders) or plan.soak_seconds > 0:
            try:
                clickhouse, clickhouse_url = start_clickhouse(scratch)
            except Unavailable as exc:
                print(f"clickhouse double unavailable: {exc}", file=sys.stderr)
        backdrop = Backdrop(mock_url, mock.pid, clickhouse_url, scratch, clickhouse.pid if clickhouse else None,
                            wrk=_find_wrk(skipped, versions) if plan.client == "wrk" else None)
        for spec in plan.contenders:
            running = _start(spec, backdrop, skipped)
            if running is None:
                continue
            if spec.kind != "direct":
                versions[spec.kind] = running.version
            try:
                for chosen in plan.scenarios_for(spec):
                    began = time.monotonic()
                    done = measure(running, chosen, backdrop)
                    measurements.append(done)
                    row = format_table([done.result], [f"{spec.name} {chosen.name}"]).splitlines()[2]
                    print(f"{row}  ({time.monotonic() - began:.1f} s)", file=sys.stderr)
            finally:
                _stop(running, "scenarios", log_counts)
        if plan.rounds > 0:
            rounds, rounds_loop_us, rounds_steal = _paired_rounds(plan, backdrop, skipped, log_counts, run_started)
        if plan.soak_seconds > 0:
            measured = [_soak(spec, plan, backdrop, skipped, log_counts) for spec in SOAK_CONTENDERS]
            soaks = tuple(soak for soak in measured if soak is not None)
    finally:
        if clickhouse is not None:
            clickhouse.stop()
        mock.stop()
    return RunReport(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=plan.quick,
        machine=_machine(),
        versions={**_base_versions(), **versions},
        load_before=load_before,
        load_after=os.getloadavg(),
        measurements=tuple(measurements),
        soaks=soaks,
        skipped=skipped,
        rounds=rounds,
        rounds_loop_us=rounds_loop_us,
        rounds_steal=rounds_steal,
        log_counts=tuple(log_counts),
    )


def _find_wrk(skipped: dict[str, str], versions: dict[str, str]) -> str | None:
    """wrk for the throughput scenarios; without it bench.loadgen runs them, and the report says so."""
    try:
        binary = debian_binary("wrk")
    except Unavailable as exc:
        skipped["wrk"] = f"{exc}; bench.loadgen ran every scenario instead"
        print(f"wrk unavailable: {exc}", file=sys.stderr)
        return None
    versions["wrk"] = wrk.version(command_output([binary, "-v"]))
    return binary


def _start(spec: ContenderSpec, backdrop: Backdrop, skipped: dict[str, str]) -> Running | None:
    began = time.monotonic()
    try:
        running = start(spec, backdrop)
        print(f"started {spec.name} in {time.monotonic() - began:.1f} s", file=sys.stderr)
        return running
    except Unavailable as exc:
        skipped[spec.name] = str(exc)
        print(f"skipping {spec.name}: {exc}", file=sys.stderr)
        return None


def _stop(running: Running, phase: str, log_counts: list[LogCount]) -> None:
    """Stop a contender; a logging edgeproxy first has its log rows counted against its requests."""
    try:
        if running.spec.kind == "edgeproxy" and running.spec.logs != "off" and running.process is not None \
                and running.process.exited() is None:
            try:
                served, stored = log_completeness(running.url)
                log_counts.append(LogCount(running.spec.name, phase, served, stored))
            except (OSError, ValueError, KeyError) as exc:  # no answer, or not the one expected
                print(f"could not count {running.spec.name}'s log rows: {exc}", file=sys.stderr)
    finally:
        running.stop()


def _paired_rounds(plan: Plan, backdrop: Backdrop, skipped: dict[str, str],
                   log_counts: list[LogCount], run_started: float) -> tuple[Rounds, Rounds, Rounds]:
    """c64 on each paired contender in turn, `plan.rounds` times (fewer if the budget says so), all started at once.

    Returns req/s per round; per round the event-loop thread's CPU µs per request of each
    1-worker edgeproxy; and per round the machine's steal share during each contender's window.

    Each round starts with a different contender, so none always runs first (or right after the same
    neighbour); the servers waiting their turn are idle.
    """
    specs = [c for c in plan.contenders if c.name in PAIRED_CONTENDERS and c.name not in skipped]
    if len(specs) < 2:
        return (), (), ()
    chosen = dataclasses.replace(scenario("c64"), seconds=PAIRED_SECONDS, requests=10_000_000)
    started: list[Running] = []
    rounds: list[dict[str, float]] = []
    rounds_loop_us: list[dict[str, float]] = []
    rounds_steal: list[dict[str, float]] = []
    try:
        for spec in specs:
            running = _start(spec, backdrop, skipped)
            if running is not None:
                started.append(running)
        number, round_seconds = 0, 0.0
        while more_rounds(number, plan, time.monotonic() - run_started, round_seconds):
            began = time.monotonic()
            shift = number % len(started)
            rps, loop_us, steal = {}, {}, {}
            for running in started[shift:] + started[:shift]:
                done = measure(running, chosen, backdrop)
                rps[running.spec.name] = done.result.rps
                if done.loop_us_per_request is not None:
                    loop_us[running.spec.name] = done.loop_us_per_request
                if done.steal is not None:
                    steal[running.spec.name] = done.steal
                # Its last log batch lands now, not in the next contender's window: the double's
                # insert of it too, which runs in another process.
                _wait_until_idle(running.pid)
                if running.spec.logs == "clickhouse" and backdrop.clickhouse_pid is not None:
                    _wait_until_idle(backdrop.clickhouse_pid)
            rounds.append(rps)
            rounds_loop_us.append(loop_us)
            rounds_steal.append(steal)
            print(f"round {number + 1}/{plan.rounds}: " + ", ".join(f"{k} {v:.0f}" for k, v in rps.items()),
                  file=sys.stderr)
            number, round_seconds = number + 1, time.monotonic() - began
        if number < plan.rounds:
            print(f"rounds stopped at {number} of {plan.rounds}: the run's {plan.budget_seconds:g} s budget",
                  file=sys.stderr)
    finally:
        for running in started:
            _stop(running, "rounds", log_counts)
    return tuple(rounds), tuple(rounds_loop_us), tuple(rounds_steal)


def _wait_until_idle(pid: int, timeout: float = 5.0, step: float = 0.25) -> None:
    """Until the process tree uses under 2% of a core over `step` seconds (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    used = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(pid)
        if now - used < 0.02 * step:
            return
        used = now


def _soak_memory(soak: Measurement) -> str:
    """Whose memory a soak's RSS holds."""
    return SOAK_MEMORY[next(spec.logs for spec in SOAK_CONTENDERS if spec.name == soak.contender)]


def _soak(spec: ContenderSpec, plan: Plan, backdrop: Backdrop, skipped: dict[str, str],
          log_counts: list[LogCount]) -> Measurement | None:
    running = _start(spec, backdrop, skipped)
    if running is None:
        return None
    base = scenario("c64")
    # Bounded by time alone: the request cap sits far above what the time allows.
    chosen = dataclasses.replace(base, seconds=plan.soak_seconds, requests=10_000_000)
    try:
        done = measure(running, chosen, backdrop)
    finally:
        _stop(running, "soak", log_counts)
    print(f"soak {spec.name} {plan.soak_seconds:g}s: RSS {done.rss.describe()}", file=sys.stderr)
    return done


def profile(plan: Plan, scratch: Path, names: Sequence[str], spec: ContenderSpec = PROFILE_CONTENDER) -> str:
    """py-spy on a 1-worker edgeproxy while each named scenario runs; returns a Markdown summary."""
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
                            wrk=_find_wrk({}, {}) if plan.client == "wrk" else None)
        running = start(spec, backdrop)
        try:
            for name in names:
                chosen = next((s for s in plan.scenarios if s.name == name), scenario(name))
                stacks = RESULTS_DIR / f"profile-{spec.name}-{name}.txt"
                # --nonblocking: sample without pausing the server, so the figures stay honest.
                spy_command = [spy, "record", "--pid", str(running.pid), "--rate", "250", "--nonblocking",
                               "--format", "raw", "--output", str(stacks),
                               "--duration", str(int(chosen.seconds) + 2)]
                spying = subprocess.Popen(spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                done = measure(running, chosen, backdrop)
                _, err = spying.communicate(timeout=chosen.seconds + 60)
                if not stacks.exists():
                    raise SystemExit(f"py-spy wrote nothing: {err.decode()[-1000:]}")
                sections.append(profile_summary(f"{spec.name}, {name}", stacks.read_text(), done))
        finally:
            running.stop()
    finally:
        if clickhouse is not None:
            clickhouse.stop()
        mock.stop()
    return "\n\n".join(sections)


# --- the report ---------------------------------------------------------------------------------------

GATEWAY = "edgeproxy-1w"
LOGGING_ON = ("edgeproxy-1w-embedded", "edgeproxy-1w-clickhouse")


def check_targets(report: RunReport) -> list[Check]:
    """The issue's targets, for the 1-worker gateway against peers measured in the same run."""
    checks: list[Check] = []

    def added(scenario_name: str, pick: Callable[[Measurement], Stats | None], label: str) -> None:
        ours, floor = report.find(GATEWAY, scenario_name), report.find("direct", scenario_name)
        for quantile, limit in (("p50", 1.0), ("p99", 3.0)):
            target = f"{label} {quantile} ≤ {limit:g} ms over direct"
            ours_stats = pick(ours) if ours else None
            floor_stats = pick(floor) if floor else None
            if ours_stats is None or floor_stats is None:
                checks.append(Check(target, "not measured", None))
                continue
            extra = getattr(ours_stats, quantile) - getattr(floor_stats, quantile)
            checks.append(Check(target, f"+{extra:.2f} ms ({getattr(ours_stats, quantile):.2f} vs "
                                        f"{getattr(floor_stats, quantile):.2f})", extra <= limit))

    added("c1", lambda m: m.result.latency, "added latency, non-streaming, concurrency 1,")
    added("stream-c1", lambda m: m.result.ttfb, "added time to first byte, streaming, concurrency 1,")
    checks.append(_ratio_check(report, "litellm", "throughput (c64) ≥ 5× LiteLLM", lambda r: r >= 5.0))
    checks.append(_ratio_check(report, "nginx", "throughput (c64) within 3× of nginx", lambda r: r >= 1 / 3))
    for name in LOGGING_ON:
        target = f"throughput (c64) with logging on ({name.rsplit('-', 1)[1]}) within 10% of off"
        measured = report.throughput_ratio(name, GATEWAY)
        checks.append(Check(target, "not measured", None) if measured is None
                      else Check(target, measured[1], measured[0] >= 0.9))
    checks.append(_log_count_check(report.log_counts))
    if not report.soaks:
        checks.append(Check("RSS flat (±10%) at full load", "not measured", None))
    for soak in report.soaks:
        checks.append(Check(f"RSS flat (±10%) over {soak.result.seconds:.0f} s at full load (c64), "
                            f"{_soak_memory(soak)}", soak.rss.describe(), abs(soak.rss.drift) <= 0.10))
    return checks


def _log_count_check(counts: Sequence[LogCount]) -> Check:
    """Not a target of its own but the logging figures' premise: a log that lost rows did less work."""
    target = "every request logged (rows in the store = requests served), each logging gateway"
    if not counts:
        return Check(target, "not measured", None)
    short = [c for c in counts if c.stored < c.served]
    served = sum(c.served for c in counts)
    if not short:
        return Check(target, f"{served} of {served} requests in {len(counts)} gateways", True)
    return Check(target, "; ".join(f"{c.contender} ({c.phase}): {c.stored} of {c.served}" for c in short), False)


def _ratio_check(report: RunReport, peer: str, target: str, good: Callable[[float], bool]) -> Check:
    measured = report.throughput_ratio(GATEWAY, peer)
    if measured is None:
        reason = report.skipped.get(peer)
        return Check(target, f"not measured{': ' + reason[:160] if reason else ''}", None)
    return Check(target, measured[1], good(measured[0]))


def render_markdown(report: RunReport) -> str:
    """bench/RESULTS.md: targets, then one table per scenario with ratios against direct and each peer."""
    machine = report.machine
    mode = "python -m bench.compare --quick" if report.quick else "make bench (python -m bench.compare)"
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{mode}` on {report.date}. Method and caveats: [README.md](README.md).",
        "",
        (f"- Machine: {machine.get('cores')} cores ({machine.get('cpu') or 'unknown CPU'}), Linux "
         f"{machine.get('kernel')}, Python {machine.get('python')}."),
        ("- Load generator, mock provider and contender share those cores, each in its own process: "
         "throughput is that of a saturated machine, not of the contender alone."),
        _clients_line(report),
        (f"- Load average before / after: {_load(report.load_before)} / {_load(report.load_after)}"
         " (other jobs on the machine add noise; compare ratios within this run, not across runs)."),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items())) + ".",
        "",
        "## Targets (edgeproxy, 1 worker, logging off unless named; same run)",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
    ]
    for check in check_targets(report):
        verdict = "n/a" if check.ok is None else ("pass" if check.ok else "**miss**")
        lines.append(f"| {check.target} | {check.measured} | {verdict} |")
    for chosen in SCENARIOS:
        rows = [m for m in report.measurements if m.scenario == chosen.name]
        if rows:
            lines += ["", f"## {chosen.name}: {chosen.description}", "", *_scenario_table(report, chosen, rows)]
    if report.rounds:
        lines += ["", "## c64 in interleaved rounds", "", *_rounds_table(report.rounds, report.rounds_steal)]
        lines += _loop_cpu_lines(report.rounds_loop_us)
    if report.soaks:
        lines += ["", "## Memory under sustained load", ""]
        lines += [(f"- `{soak.contender}` ({_soak_memory(soak)}) under c64 for {soak.result.seconds:.0f} s: "
                   f"{soak.result.rps:.0f} req/s, {soak.result.errors} errors; RSS {soak.rss.describe()}"
                   + ("." if soak.steal is None else f"; steal {soak.steal:.1%}."))
                  for soak in report.soaks]
        lines += ["", ("Start is the median of the first samples after the first fifth of the run (warm-up), "
                       "end the median of the last three; `--soak 300` runs the 5-minute check.")]
    if report.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in report.skipped.items()]
    return "\n".join(lines) + "\n"


def _clients_line(report: RunReport) -> str:
    if "wrk" not in report.versions:
        return "- Client: `bench.loadgen` (Python, aiohttp on uvloop) for every scenario."
    throughput = ", ".join(s.name for s in SCENARIOS if wrk.drives(s))
    return (f"- Clients: wrk {report.versions['wrk']} (C, one thread) for {throughput}, the interleaved rounds and "
            "the soaks; `bench.loadgen` (Python, aiohttp on uvloop) for the rest, which need concurrency 1 or "
            "per-event timing.")


def _scenario_table(report: RunReport, chosen: Scenario, rows: list[Measurement]) -> list[str]:
    peers = [("direct", "× direct"), ("nginx", "× nginx"), ("litellm", "× LiteLLM")]
    base = {name: report.find(name, chosen.name) for name, _ in peers}
    head = ["contender", "req/s", *[label for name, label in peers if base[name]], "p50 ms", "p99 ms",
            "+p50 vs direct", "+p99 vs direct"]
    if chosen.stream:
        head += ["TTFB p50", "TTFB p99", "+TTFB p50", "+TTFB p99", "gap p50", "gap p99"]
    head += ["server CPU µs/req", "RSS peak MB", "errors"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    floor = base["direct"]
    for m in rows:
        r = m.result
        cells = [m.contender, f"{r.rps:.0f}"]
        cells += [_ratio(r.rps, b.result.rps) for name, b in base.items() if b is not None]
        cells += [_stat(r.latency, "p50"), _stat(r.latency, "p99"),
                  _delta(r.latency, floor.result.latency if floor else None, "p50"),
                  _delta(r.latency, floor.result.latency if floor else None, "p99")]
        if chosen.stream:
            floor_ttfb = floor.result.ttfb if floor else None
            cells += [_stat(r.ttfb, "p50"), _stat(r.ttfb, "p99"), _delta(r.ttfb, floor_ttfb, "p50"),
                      _delta(r.ttfb, floor_ttfb, "p99"), _stat(r.chunk_gap, "p50"), _stat(r.chunk_gap, "p99")]
        cpu = m.cpu_us_per_request
        cells += ["-" if cpu is None else f"{cpu:.0f}", f"{m.rss.peak_mb:.0f}", _errors(r)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _rounds_table(rounds: Sequence[dict[str, float]], steal: Sequence[dict[str, float]]) -> list[str]:
    names = [name for name in PAIRED_CONTENDERS if any(name in r for r in rounds)]
    pairs = [(GATEWAY, "nginx"), *((name, GATEWAY) for name in LOGGING_ON)]
    pairs = [(a, b) for a, b in pairs if a in names and b in names]
    head = ["round", *(f"{name} req/s" for name in names), *(f"{a} ÷ {b}" for a, b in pairs)]
    if steal:
        head.append("steal % of the windows")
    out = [(f"{len(rounds)} rounds of c64 for {PAIRED_SECONDS:g} s per contender, all started at once and "
            "measured one after another, a different one first each round. Targets on throughput ratios "
            "read the median of the per-round ratios below."
            + (" Steal is the share of the machine's CPU time the hypervisor gave to other guests during "
               "the round's windows (/proc/stat): noise that moves a window's req/s." if steal else "")), "",
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for number, r in enumerate(rounds, 1):
        cells = [str(number), *(f"{r[name]:.0f}" if name in r else "-" for name in names)]
        cells += [_ratio(r[a], r[b]) if a in r and b in r else "-" for a, b in pairs]
        if steal:
            shares = list(steal[number - 1].values()) if number <= len(steal) else []
            cells.append(f"{100 * min(shares):.1f}–{100 * max(shares):.1f}" if shares else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _loop_cpu_lines(rounds_loop_us: Sequence[dict[str, float]]) -> list[str]:
    """The event-loop thread's CPU per request over the same rounds: the logging cost, less noisy than req/s."""
    medians = {name: statistics.median(values) for name in PAIRED_CONTENDERS
               if (values := [r[name] for r in rounds_loop_us if name in r])}
    if not medians:
        return []
    base = medians.get(GATEWAY)
    parts = [f"{name} {us:.0f} µs" + (f" ({us / base - 1:+.1%})" if base and name != GATEWAY else "")
             for name, us in medians.items()]
    return ["", ("Event-loop thread CPU per request in the same rounds (median): " + ", ".join(parts) + ". "
                 "It leaves out the log writer's thread, the embedded engine's threads and the ClickHouse "
                 "double's process, and moves far less from round to round than req/s.")]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def _stat(stats: Stats | None, name: str) -> str:
    return "-" if stats is None else f"{getattr(stats, name):.2f}"


def _delta(stats: Stats | None, floor: Stats | None, name: str) -> str:
    if stats is None or floor is None:
        return "-"
    return f"{getattr(stats, name) - getattr(floor, name):+.2f}"


def _errors(result: LoadResult) -> str:
    if not result.errors:
        return "0"
    kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(result.error_kinds.items()))
    return f"{result.errors} ({kinds})"


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


# --- profiles ------------------------------------------------------------------------------------------

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


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version()}


def _base_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("aiohttp", "uvloop", "orjson", "chdb", "clickhouse-connect"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute subset")
    parser.add_argument("--soak", type=float, help="seconds of full load on each soak gateway, memory sampled (300 = 5 min)")
    parser.add_argument("--only", help="comma-separated contender names: " + ", ".join(c.name for c in CONTENDERS))
    parser.add_argument("--scenarios", help="comma-separated scenario names: " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--profile", action="store_true", help="profile edgeproxy with py-spy instead")
    parser.add_argument("--rounds", type=int,
                        help=f"interleaved c64 rounds of {', '.join(PAIRED_CONTENDERS)} for the throughput "
                             f"ratios (default {DEFAULT_ROUNDS}, 0 with --quick)")
    parser.add_argument("--client", choices=("loadgen", "wrk"), default="loadgen",
                        help="what drives c64, cache-hit, the rounds and the soaks: bench.loadgen (Python, the "
                             "default) or wrk (C, far less CPU per request: see bench/README.md)")
    parser.add_argument("--no-write", action="store_true", help="print the report, leave bench/RESULTS.md alone")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (servers' logs)")
    args = parser.parse_args(argv)
    plan = build_plan(args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        if args.profile:
            names = [s.name for s in plan.scenarios] if args.scenarios else PROFILE_SCENARIOS
            # `--only` may name the one 1-worker edgeproxy to profile (e.g. with its log on).
            chosen = [c for c in plan.contenders if c.kind == "edgeproxy" and c.workers == 1] if args.only else []
            text = profile(plan, scratch, names, chosen[0] if len(chosen) == 1 else PROFILE_CONTENDER)
            (RESULTS_DIR / f"profile-{stamp}.md").write_text(text + "\n")
            print(text)
            return 0
        report = run(plan, scratch)
    finally:
        if args.keep:
            print(f"scratch folder kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    (RESULTS_DIR / f"run-{stamp}.json").write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    text = render_markdown(report)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
