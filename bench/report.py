"""What a `make bench` run measured, the issue's targets judged on it, and bench/RESULTS.md."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import wrk
from .contenders import ContenderSpec
from .loadgen import SCENARIOS, LoadResult, Scenario, Stats
from .measure import RSS_FLAT_SHARE, Measurement

# The gateway the targets judge, its logging variants, and the aiohttp floor beside it in the rounds.
GATEWAY = "edgeproxy-1w"
LOGGING_ON = ("edgeproxy-1w-embedded", "edgeproxy-1w-clickhouse")
# A second log-off 1-worker gateway, the same as GATEWAY, in the c64 rounds only: its ratio over
# GATEWAY is what the machine's noise alone reads, the yardstick for the logging ratios beside it.
CONTROL = "edgeproxy-1w-control"
FLOOR = "aiohttp-floor"
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
# The throughput ratios the targets judge, measured again in interleaved rounds: on this kind of
# machine one 6 s pass of each contender swings ±10% with the neighbours' load, more than the
# margins the targets leave. Rounds put the contenders side by side in time; the median of the
# per-round ratios is what the targets read.
PAIRED_CONTENDERS = ("nginx", GATEWAY, CONTROL, *LOGGING_ON)
# Interleaved rounds: per round, a figure for each contender measured in it.
Rounds = tuple[dict[str, float], ...]
# Each window follows PAIRED_WARMUP_SECONDS of the same load, untimed, so that a logging gateway's
# flushes are in a steady state when it starts: the batch of its last second, written after it, is
# matched by the warm-up's, written inside it. A window that started idle left that work uncounted.
PAIRED_SECONDS = 4.0
PAIRED_WARMUP_SECONDS = 1.0
# The latency scenarios the targets judge, and the figure of each: the whole answer without
# streaming, the first byte when streamed.
LATENCY_MEASURES = {"c1": "latency", "stream-c1": "ttfb"}


@dataclass(frozen=True)
class AddedLatency:
    """A contender's latency over direct's in one interleaved round, the two measured one after the other (ms)."""

    round: int
    contender: str
    scenario: str
    p50_ms: float
    p99_ms: float


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
    # The interleaved rounds' latency scenarios: each contender over direct, round by round.
    added_latency: tuple[AddedLatency, ...] = ()

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



def check_targets(report: RunReport) -> list[Check]:
    """The issue's targets, for the 1-worker gateway against peers measured in the same run."""
    checks: list[Check] = []

    def added(scenario_name: str, label: str) -> None:
        def rounds_of(contender: str) -> list[AddedLatency]:
            return [a for a in report.added_latency if a.contender == contender and a.scenario == scenario_name]

        ours_rounds, floor_rounds = rounds_of(GATEWAY), rounds_of(FLOOR)
        ours, direct = report.find(GATEWAY, scenario_name), report.find("direct", scenario_name)
        measure_of = LATENCY_MEASURES[scenario_name]
        for quantile, limit in (("p50", 1.0), ("p99", 3.0)):
            target = f"{label} {quantile} ≤ {limit:g} ms over direct"
            if ours_rounds:
                values = [getattr(a, f"{quantile}_ms") for a in ours_rounds]
                extra = statistics.median(values)
                floor = [getattr(a, f"{quantile}_ms") for a in floor_rounds]
                beside = f"; the aiohttp floor +{statistics.median(floor):.2f}" if floor else ""
                checks.append(Check(target, f"+{extra:.2f} ms (median of {len(values)} interleaved rounds, "
                                            f"{min(values):+.2f} to {max(values):+.2f}{beside})", extra <= limit))
                continue
            ours_stats = getattr(ours.result, measure_of) if ours else None
            direct_stats = getattr(direct.result, measure_of) if direct else None
            if ours_stats is None or direct_stats is None:
                checks.append(Check(target, "not measured", None))
                continue
            extra = getattr(ours_stats, quantile) - getattr(direct_stats, quantile)
            checks.append(Check(target, f"+{extra:.2f} ms ({getattr(ours_stats, quantile):.2f} vs "
                                        f"{getattr(direct_stats, quantile):.2f})", extra <= limit))

    added("c1", "added latency, non-streaming, concurrency 1,")
    added("stream-c1", "added time to first byte, streaming, concurrency 1,")
    checks.append(_ratio_check(report, "litellm", "throughput (c64) ≥ 5× LiteLLM", lambda r: r >= 5.0))
    checks.append(_ratio_check(report, "nginx", "throughput (c64) within 3× of nginx", lambda r: r >= 1 / 3))
    control = report.throughput_ratio(CONTROL, GATEWAY)
    beside = f"; the control, an identical log-off gateway, {control[1]}" if control else ""
    for name in LOGGING_ON:
        target = f"throughput (c64) with logging on ({name.rsplit('-', 1)[1]}) within 10% of off"
        measured = report.throughput_ratio(name, GATEWAY)
        checks.append(Check(target, "not measured", None) if measured is None
                      else Check(target, measured[1] + beside, measured[0] >= 0.9))
    checks.append(_log_count_check(report.log_counts))
    if not report.soaks:
        checks.append(Check(f"RSS flat (±{RSS_FLAT_SHARE:.0%}) at full load", "not measured", None))
    for soak in report.soaks:
        checks.append(Check(f"RSS flat (±{RSS_FLAT_SHARE:.0%}) over {soak.result.seconds:.0f} s at full load (c64), "
                            f"{_soak_memory(soak)}", soak.rss.describe(), abs(soak.rss.drift) <= RSS_FLAT_SHARE))
    return checks


def _soak_memory(soak: Measurement) -> str:
    """Whose memory a soak's RSS holds."""
    return SOAK_MEMORY[next(spec.logs for spec in SOAK_CONTENDERS if spec.name == soak.contender)]


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
    if report.added_latency:
        lines += ["", "## Added latency in interleaved rounds", "", *_latency_table(report.added_latency)]
    if report.rounds:
        lines += ["", "## c64 in interleaved rounds", "", *_rounds_table(report.rounds, report.rounds_steal)]
        lines += _loop_cpu_lines(report.rounds_loop_us)
    if report.soaks:
        lines += ["", "## Memory under sustained load", ""]
        lines += [(f"- `{soak.contender}` ({_soak_memory(soak)}) under c64 for {soak.result.seconds:.0f} s: "
                   f"{soak.result.rps:.0f} req/s, {soak.result.errors} errors; RSS {soak.rss.describe()}"
                   + ("." if soak.steal is None else f"; steal {soak.steal:.1%}."))
                  for soak in report.soaks]
        lines += ["", ("Start and end are the medians of the first and the last quarter of the samples taken after "
                       "the first fifth of the run (warm-up); the peak is every sample's highest, with how long the "
                       f"run stayed more than {RSS_FLAT_SHARE:.0%} above its start (the embedded engine's merges hold buffers for a "
                       "few seconds: bench/README.md). `--soak 300` runs the 5-minute check.")]
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


def _latency_table(added: Sequence[AddedLatency]) -> list[str]:
    # Scenario by scenario, the gateway first in each.
    names = sorted(dict.fromkeys(a.contender for a in added), key=lambda name: name != GATEWAY)
    seen = {(a.contender, a.scenario) for a in added}
    columns = [(name, chosen) for chosen in LATENCY_MEASURES for name in names if (name, chosen) in seen]
    figure = {"latency": "latency", "ttfb": "TTFB"}
    head = ["round", *(f"{name} {scenario_name} +{figure[LATENCY_MEASURES[scenario_name]]} {quantile}"
                       for name, scenario_name in columns for quantile in ("p50", "p99"))]
    out = [(f"{len({a.round for a in added})} rounds; each runs c1 and stream-c1 on direct and each contender "
            "below, one after the other, a different one first each round. A cell is the contender's figure "
            "over direct's of the same round, in ms: the whole answer for c1, the first byte for stream-c1. "
            "The latency targets read the median of the rounds."),
           "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_cell = {(a.round, a.contender, a.scenario): a for a in added}
    for number in sorted({a.round for a in added}):
        cells = [str(number)]
        for name, scenario_name in columns:
            found = by_cell.get((number, name, scenario_name))
            cells += ["-", "-"] if found is None else [f"{found.p50_ms:+.2f}", f"{found.p99_ms:+.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _rounds_table(rounds: Sequence[dict[str, float]], steal: Sequence[dict[str, float]]) -> list[str]:
    names = [name for name in PAIRED_CONTENDERS if any(name in r for r in rounds)]
    pairs = [(GATEWAY, "nginx"), *((name, GATEWAY) for name in (CONTROL, *LOGGING_ON))]
    pairs = [(a, b) for a, b in pairs if a in names and b in names]
    head = ["round", *(f"{name} req/s" for name in names), *(f"{a} ÷ {b}" for a, b in pairs)]
    if steal:
        head.append("steal % of the windows")
    out = [(f"{len(rounds)} rounds of c64 for {PAIRED_SECONDS:g} s per contender (after {PAIRED_WARMUP_SECONDS:g} s "
            "of the same load, untimed), all started at once and "
            "measured one after another, a different one first each round. Targets on throughput ratios "
            "read the median of the per-round ratios below."
            + (f" {CONTROL} is a second {GATEWAY}, log off like it: its ratio is the noise alone."
               if CONTROL in names else "")
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
                 "double's process. It moves less from round to round than req/s, but it moves too: the "
                 "machine's speed changes the CPU a request takes"
                 + (f" (compare {CONTROL} with {GATEWAY})." if CONTROL in medians else "."))]


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
