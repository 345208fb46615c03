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
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from .contenders import (
    ROOT,
    Backdrop,
    ContenderSpec,
    Process,
    Running,
    Unavailable,
    log_completeness,
    start,
    start_clickhouse,
    start_mock,
)
from .loadgen import SCENARIOS, Scenario, format_table, scenario
from .measure import Measurement, find_wrk, measure, wait_until_idle
from .profiling import PROFILE_CONTENDER, PROFILE_SCENARIOS, profile
from .report import (
    CONTROL,
    FLOOR,
    GATEWAY,
    LATENCY_MEASURES,
    PAIRED_CONTENDERS,
    PAIRED_SECONDS,
    PAIRED_WARMUP_SECONDS,
    SOAK_CONTENDERS,
    AddedLatency,
    LogCount,
    RunReport,
    render_markdown,
)

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"
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
DEFAULT_ROUNDS = 7
# Each round also measures the added latency of these against direct, at concurrency 1 (c1 and
# stream-c1): one pass of each, minutes apart, moved by ±0.3 ms with the machine's load, more than
# the 1 ms target leaves; side by side in a round they move together.
# The aiohttp floor (bench/floor_proxy.py) runs in the rounds too: on a slow or busy machine it shows
# how much of the gateway's figure any proxy on aiohttp pays before a feature of its own.
LATENCY_FLOOR = ContenderSpec(FLOOR, "floor")
LATENCY_CONTENDERS = (GATEWAY, FLOOR, "nginx")
# The rounds' control (report.CONTROL): the log-off gateway once more, beside the logging ones.
ROUNDS_CONTROL = ContenderSpec(CONTROL, "edgeproxy")
# Requests per latency pass in a round: ~1.5 s of c1 and ~2.5 s of stream-c1 on a slow 2-core VM.
LATENCY_ROUND_REQUESTS = 1000
# `make bench` must finish within 10 minutes. On a slow machine (9 min 35 s on a 2-core EPYC, LiteLLM
# alone taking 80 s to start) the default rounds stop early, once the next would not fit with the
# soaks after it, but never below MIN_ROUNDS. Rounds asked for with --rounds all run.
RUN_BUDGET_SECONDS = 570.0
MIN_ROUNDS = 3
# A soak's start, stop and log check around its measured window, for the budget: 2-3 s in the runs
# of 2026-12-07; the log check may wait up to 20 s more, which the budget's 30 s under 10 minutes covers.
SOAK_OVERHEAD_SECONDS = 8.0


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

    def has(self, name: str) -> bool:
        """Whether the plan holds a contender or a scenario of this name."""
        return any(c.name == name for c in self.contenders) or any(s.name == name for s in self.scenarios)

    def scenarios_for(self, spec: ContenderSpec) -> list[Scenario]:
        """Only gateways cache; `direct` runs the cache scenario too, as the cost of going upstream."""
        return [s for s in self.scenarios if not s.cache or spec.kind in ("direct", "edgeproxy")]


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
    if not any(s.name == "c64" or s.name in LATENCY_MEASURES for s in chosen):
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
    interleaved = Interleaved()
    log_counts: list[LogCount] = []
    try:
        if any(c.logs == "clickhouse" for c in plan.contenders) or plan.soak_seconds > 0:
            try:
                clickhouse, clickhouse_url = start_clickhouse(scratch)
            except Unavailable as exc:
                print(f"clickhouse double unavailable: {exc}", file=sys.stderr)
        backdrop = Backdrop(mock_url, mock.pid, clickhouse_url, scratch, clickhouse.pid if clickhouse else None,
                            wrk=find_wrk(skipped, versions) if plan.client == "wrk" else None)
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
            interleaved = interleaved_rounds(plan, backdrop, skipped, log_counts, run_started)
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
        rounds=tuple(interleaved.rps),
        rounds_loop_us=tuple(interleaved.loop_us),
        rounds_steal=tuple(interleaved.steal),
        added_latency=tuple(interleaved.added_latency),
        log_counts=tuple(log_counts),
    )


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


@dataclass
class Interleaved:
    """What the interleaved rounds measured, round by round (see `interleaved_rounds`)."""

    rps: list[dict[str, float]] = field(default_factory=list)
    loop_us: list[dict[str, float]] = field(default_factory=list)
    steal: list[dict[str, float]] = field(default_factory=list)
    added_latency: list[AddedLatency] = field(default_factory=list)


def interleaved_rounds(plan: Plan, backdrop: Backdrop, skipped: dict[str, str],
                        log_counts: list[LogCount], run_started: float) -> Interleaved:
    """`plan.rounds` rounds (fewer if the budget says so) of the figures the targets judge, contenders side by side.

    Per round: c1 and stream-c1 on direct, the 1-worker gateway, the aiohttp floor and nginx, each contender's
    latency over direct's of the same round; then c64 on each paired contender, its req/s, the
    event-loop thread's CPU µs per request of each 1-worker edgeproxy, and the machine's steal
    share during each window. All are started once; those waiting their turn are idle. Each round
    starts with a different contender, so none always runs first (or right after the same neighbour).
    """
    measured = Interleaved()
    throughput = plan.has("c64") and sum(c.name in PAIRED_CONTENDERS and c.name not in skipped
                                         for c in plan.contenders) >= 2
    latency = [dataclasses.replace(s, requests=min(s.requests, LATENCY_ROUND_REQUESTS))
               for s in plan.scenarios if s.name in LATENCY_MEASURES]
    if not plan.has("direct") or not plan.has(GATEWAY):
        latency = []
    beside_direct = ("direct", *LATENCY_CONTENDERS)
    names = {*(PAIRED_CONTENDERS if throughput else ()), *(beside_direct if latency else ())}
    if not plan.has(GATEWAY):
        names.discard(CONTROL)
    specs = [c for c in (*plan.contenders, LATENCY_FLOOR, ROUNDS_CONTROL) if c.name in names and c.name not in skipped]
    c64 = dataclasses.replace(scenario("c64"), seconds=PAIRED_SECONDS, requests=10_000_000,
                              warmup=10_000_000, warmup_seconds=PAIRED_WARMUP_SECONDS)
    started: list[Running] = []
    try:
        for spec in specs:
            running = _start(spec, backdrop, skipped)
            if running is not None:
                started.append(running)
        latency_side = [r for r in started if r.spec.name in beside_direct]
        paired = [r for r in started if r.spec.name in PAIRED_CONTENDERS] if throughput else []
        number, round_seconds = 0, 0.0
        while more_rounds(number, plan, time.monotonic() - run_started, round_seconds):
            began = time.monotonic()
            if latency:
                _settle(started, backdrop)
            for chosen in latency:
                measured.added_latency += _added_latency(number + 1, _rotated(latency_side, number), chosen, backdrop)
            rps: dict[str, float] = {}
            if paired:
                rps, loop_us, steal = _throughput_round(_rotated(paired, number), c64, backdrop)
                measured.rps.append(rps)
                measured.loop_us.append(loop_us)
                measured.steal.append(steal)
            mine = [a for a in measured.added_latency if a.round == number + 1 and a.contender == GATEWAY]
            print(f"round {number + 1}/{plan.rounds}: " + ", ".join(
                [f"{k} {v:.0f} req/s" for k, v in rps.items()]
                + [f"{GATEWAY} {a.scenario} +{a.p50_ms:.2f} ms p50" for a in mine]), file=sys.stderr)
            number, round_seconds = number + 1, time.monotonic() - began
        if number < plan.rounds:
            print(f"rounds stopped at {number} of {plan.rounds}: the run's {plan.budget_seconds:g} s budget",
                  file=sys.stderr)
    finally:
        for running in started:
            _stop(running, "rounds", log_counts)
    return measured


def _settle(started: Sequence[Running], backdrop: Backdrop) -> None:
    """Let the contenders and the ClickHouse double finish leftover work (log batches, merges):
    concurrency 1 shows any neighbour's work."""
    for pid in [r.pid for r in started] + [backdrop.clickhouse_pid or 0]:
        if pid:
            wait_until_idle(pid)


def _throughput_round(order: Sequence[Running], c64: Scenario,
                      backdrop: Backdrop) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """c64 on each contender in `order`: its req/s, its event-loop CPU µs a request (1-worker edgeproxy)
    and the machine's steal share during its window."""
    rps, loop_us, steal = {}, {}, {}
    for running in order:
        done = measure(running, c64, backdrop)
        rps[running.spec.name] = done.result.rps
        if done.loop_us_per_request is not None:
            loop_us[running.spec.name] = done.loop_us_per_request
        if done.steal is not None:
            steal[running.spec.name] = done.steal
        # Its last log batch lands now, not in the next contender's window: the double's
        # insert of it too, which runs in another process.
        wait_until_idle(running.pid)
        if running.spec.logs == "clickhouse" and backdrop.clickhouse_pid is not None:
            wait_until_idle(backdrop.clickhouse_pid)
    return rps, loop_us, steal


def _added_latency(number: int, order: Sequence[Running], chosen: Scenario, backdrop: Backdrop) -> list[AddedLatency]:
    """One latency scenario on direct and the others in `order`: each one's p50 and p99 over direct's."""
    measure_of = LATENCY_MEASURES[chosen.name]
    stats = {running.spec.name: getattr(measure(running, chosen, backdrop).result, measure_of) for running in order}
    base = stats.get("direct")
    if base is None:
        return []
    return [AddedLatency(number, name, chosen.name, s.p50 - base.p50, s.p99 - base.p99)
            for name, s in stats.items() if name != "direct" and s is not None]


def _rotated(running: Sequence[Running], number: int) -> list[Running]:
    shift = number % len(running) if running else 0
    return [*running[shift:], *running[:shift]]


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
            scenarios = [next((s for s in plan.scenarios if s.name == name), scenario(name)) for name in names]
            # `--only` may name the one 1-worker edgeproxy to profile (e.g. with its log on).
            chosen = [c for c in plan.contenders if c.kind == "edgeproxy" and c.workers == 1] if args.only else []
            text = profile(scenarios, scratch, RESULTS_DIR, use_wrk=plan.client == "wrk",
                           spec=chosen[0] if len(chosen) == 1 else PROFILE_CONTENDER)
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
