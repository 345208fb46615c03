"""Prometheus metrics: defined once on a registry passed in, with bounded labels.

Multi-process (`--workers N`): prometheus-client picks file-backed values when
`PROMETHEUS_MULTIPROC_DIR` is set *when it is first imported*, so the master must set the
variable (and call `prepare_multiprocess_dir`) before anything imports prometheus_client, and
call `mark_worker_dead(pid, path)` when a worker exits. `render_metrics` then aggregates
every worker's files, whichever worker the scrape reaches.

Log pipeline: the batcher knows nothing of Prometheus. It exposes a `LogStats`-shaped object
(cumulative counters plus the current queue depth) and may be handed `observe_log_flush` as a
plain callback. `Metrics.sync()` copies the stats into ordinary counters (by delta) and a
gauge, and the requests in flight (a plain count on the hot path) into theirs. Custom
collectors are not aggregated across processes, so every worker runs `sync_periodically()`
and `render_metrics` syncs once more, making the scraped worker exact and the others at most
one interval old.

Finished requests wait for the same sync: `observe_request` holds their timings and sums by
label set (metric_requests.py), and the sync hands them over.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .metric_labels import (
    CACHE_LABELS,
    ENDPOINTS,
    OTHER,
    OUTCOMES,
    SPARE_VALUES,
    LabelSet,
    ModelLabels,
    status_class,
)
from .metric_requests import Given, HeldRequests, RequestChildren
from .pricing import PriceTable
from .settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GaugeMode = Literal["livesum", "livemax"]
# Fine enough at the low end to see a 1 ms gateway overhead; long enough for slow completions.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CIRCUIT_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
# Finished requests held for the next sync at most: past it they are handed over at once. A hand-over
# costs ~7 µs a request (four histogram observes) with the event loop paused, ~19 ms for the 2500 a
# second may bring; 256 keep the pause near 2 ms and most of the gain (wrk c64: 0.96× of holding
# 10 000, 1000 read 1.02×).
HELD_MAX = 256
# Past this size the memo of label children is cleared (hostile model names and paths cannot grow
# it), as the model-label memo is.
_CHILDREN_MAX = 4096


class LogStats(Protocol):
    """What the log batcher counts: cumulative row counters and the rows queued right now."""

    @property
    def queue_depth(self) -> int: ...
    @property
    def rows_written(self) -> int: ...
    @property
    def rows_spooled(self) -> int: ...
    @property
    def rows_dropped(self) -> int: ...
    @property
    def rows_replayed(self) -> int: ...


_LOG_COUNTERS = ("written", "spooled", "dropped", "replayed")


class Metrics:
    """Every edgeproxy metric, registered on `registry`; methods take plain values and bound labels."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        prices: PriceTable | None = None,
        models: Iterable[str] = (),
        targets: Iterable[str] | None = None,
    ) -> None:
        self.registry = registry
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir and not _values_are_multiprocess():
            raise RuntimeError(
                f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
                "set it before the first import so every worker writes its values to that directory"
            )
        self._model_label = ModelLabels(prices, models)
        self._target_label = LabelSet(targets or (), spare=8 if targets is not None else SPARE_VALUES)
        self._free_labels: dict[str, LabelSet] = {}
        self._request_children: dict[Given, RequestChildren] = {}
        # Finished requests by their label values as given, until the next sync counts them.
        self._held: dict[Given, HeldRequests] = {}
        self._held_requests = 0
        self._log_source: Callable[[], LogStats] | None = None
        self._log_seen = dict.fromkeys(_LOG_COUNTERS, 0)
        self._in_flight = 0
        self._define(registry)
        self.scrape_registry = registry
        if self.multiprocess_dir:
            # A private registry: the files of all workers, not this process's registry.
            self.scrape_registry = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.scrape_registry, path=self.multiprocess_dir)

    @classmethod
    def for_settings(cls, registry: CollectorRegistry, settings: Settings, prices: PriceTable) -> Metrics:
        """Labels bounded by the config: its targets, allowlisted URL targets and app model lists."""
        targets = [*settings.targets, *(f"url:{host.lower()}" for host in settings.target_url_allowlist)]
        models = [model for app in settings.apps.values() for model in app.models]
        return cls(registry, prices=prices, models=models, targets=targets)

    def _define(self, r: CollectorRegistry) -> None:
        by_request = ("target", "model", "endpoint", "status_class", "cache", "outcome")
        priced = ("target", "model")
        self.requests = _counter(r, "requests", "Finished requests.", *by_request)
        self.request_duration = _timing(r, "request_duration", "Request received to response finished.")
        self.time_to_first_byte = _timing(r, "time_to_first_byte", "Request received to first byte sent.")
        self.upstream_duration = _timing(r, "upstream_duration", "Sent upstream to upstream finished.")
        self.gateway_overhead = _timing(r, "gateway_overhead", "Time the gateway itself added.")
        self.prompt_tokens = _counter(r, "prompt_tokens", "Prompt tokens reported.", *priced)
        self.completion_tokens = _counter(r, "completion_tokens", "Completion tokens reported.", *priced)
        self.cached_tokens = _counter(r, "cached_tokens", "Prompt tokens read from provider caches.", *priced)
        self.cost = _counter(r, "cost_usd", "Spend at list prices, USD.", *priced)
        self.cost_saved = _counter(r, "cost_saved_usd", "List price of cached answers, USD.", *priced)
        self.unpriced = _counter(r, "unpriced_requests", "Requests with tokens but no price.", "model")
        self.cache_hits = _counter(r, "cache_hits", "Answers served from the cache.")
        self.cache_errors = _counter(r, "cache_errors", "Cache reads or writes that failed.")
        self.cache_tenant_mismatch = _counter(r, "cache_tenant_mismatch", "Entries of another tenant.")
        self.rate_limited = _counter(r, "rate_limited", "Refused by a rate limit.", "segment_kind")
        self.blocked = _counter(r, "blocked", "Refused by policy.", "reason")
        self.retries = _counter(r, "retries", "Upstream attempts after the first.", "target")
        self.budget_exceeded = _counter(r, "budget_exceeded", "Refused for an exhausted budget.")
        self.redis_errors = _counter(r, "redis_errors", "Redis calls that failed.", "component")
        self.upstream_errors = _counter(r, "upstream_errors", "Upstream attempts failed.", "target", "kind")
        self.log_rows = {name: _counter(r, f"log_rows_{name}", f"Log rows {name}.") for name in _LOG_COUNTERS}
        self.log_flush = Histogram(
            "edgeproxy_log_flush_seconds", "Time to write one batch of log rows.", buckets=BUCKETS, registry=r
        )
        # Gauges sum over live workers, except breakers: each worker has its own, show the worst.
        self.in_flight = _gauge(r, "requests_in_flight", "Requests being handled now.", "livesum")
        self.log_queue_depth = _gauge(r, "log_queue_depth", "Log rows waiting to be written.", "livesum")
        self.circuit_state = _gauge(
            r, "circuit_state", "Breaker state: 0 closed, 1 half-open, 2 open.", "livemax", "deployment"
        )

    # --- one finished request -------------------------------------------------------------

    def observe_request(
        self,
        *,
        target: str,
        model: str,
        endpoint: str,
        status: int,
        cache: str,
        outcome: str,
        duration_s: float,
        ttfb_s: float | None = None,
        upstream_s: float | None = None,
        overhead_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
        cost_usd: float | None = None,
        cost_saved_usd: float | None = None,
    ) -> None:
        """Count one finished request at the next `sync()`; `cache` is hit or miss (either case),
        anything else is `off`."""
        given = (target, model, endpoint, status, cache, outcome)
        held = self._held.get(given)
        if held is None:
            children = self._request_children.get(given) or self._children(given)
            held = self._held[given] = HeldRequests(children)
        held.requests += 1
        held.durations.append(duration_s)
        if ttfb_s is not None:
            held.ttfbs.append(ttfb_s)
        if upstream_s is not None:
            held.upstreams.append(upstream_s)
        if overhead_s is not None:
            held.overheads.append(overhead_s)
        if prompt_tokens is not None and prompt_tokens > 0:
            held.prompt_tokens += prompt_tokens
        if completion_tokens is not None and completion_tokens > 0:
            held.completion_tokens += completion_tokens
        if cached_tokens is not None and cached_tokens > 0:
            held.cached_tokens += cached_tokens
        if cost_usd is not None:
            if cost_usd > 0:
                held.cost += cost_usd
        elif prompt_tokens is not None:
            held.unpriced += 1
        if cost_saved_usd is not None and cost_saved_usd > 0:
            held.cost_saved += cost_saved_usd  # counted for cache hits only (`hand_over`)
        self._held_requests += 1
        if self._held_requests >= HELD_MAX:
            self._count_held()

    def _count_held(self) -> None:
        """Hand the requests held since the last sync to prometheus-client."""
        held, self._held, self._held_requests = self._held, {}, 0
        for waiting in held.values():
            waiting.hand_over(self.cache_hits)

    def _children(self, given: Given) -> RequestChildren:
        target, model, endpoint, status, cache, outcome = given
        key = (
            self._target_label(target),
            self._model_label(model),
            endpoint if endpoint in ENDPOINTS else OTHER,
            status_class(status),
            CACHE_LABELS.get(cache, "off"),
            outcome if outcome in OUTCOMES else OTHER,
        )
        target, model, endpoint = key[0], key[1], key[2]
        # prometheus-client keeps one child per label values, so equal labels share these.
        children = RequestChildren(
            requests=self.requests.labels(*key),
            duration=self.request_duration.labels(target, endpoint),
            ttfb=self.time_to_first_byte.labels(target, endpoint),
            upstream=self.upstream_duration.labels(target, endpoint),
            overhead=self.gateway_overhead.labels(target, endpoint),
            prompt_tokens=self.prompt_tokens.labels(target, model),
            completion_tokens=self.completion_tokens.labels(target, model),
            cached_tokens=self.cached_tokens.labels(target, model),
            cost=self.cost.labels(target, model),
            cost_saved=self.cost_saved.labels(target, model),
            unpriced=self.unpriced.labels(model),
            cache_hit=key[4] == "hit",
        )
        if len(self._request_children) >= _CHILDREN_MAX:
            self._request_children.clear()
        self._request_children[given] = children
        return children

    def request_started(self) -> None:
        # A plain count, copied to the gauge by `sync()`: two locked gauge updates a request cost
        # more than the figure is worth between scrapes, and a scrape syncs first.
        self._in_flight += 1

    def request_finished(self) -> None:
        """Pairs with `request_started`; call it in a `finally`, whatever `observe_request` did."""
        self._in_flight -= 1

    # --- events counted where they happen ---------------------------------------------------

    def rate_limit_refused(self, segment_kind: str) -> None:
        self.rate_limited.labels(self._free("segment_kind", segment_kind)).inc()

    def policy_blocked(self, reason: str) -> None:
        self.blocked.labels(self._free("reason", reason)).inc()

    def retried(self, target: str) -> None:
        self.retries.labels(self._target_label(target)).inc()

    def upstream_failed(self, target: str, kind: str) -> None:
        self.upstream_errors.labels(self._target_label(target), self._free("kind", kind)).inc()

    def redis_failed(self, component: str) -> None:
        self.redis_errors.labels(self._free("component", component)).inc()

    def budget_refused(self) -> None:
        self.budget_exceeded.inc()

    def cache_failed(self) -> None:
        self.cache_errors.inc()

    def cache_tenant_mismatched(self) -> None:
        self.cache_tenant_mismatch.inc()

    def set_circuit_state(self, deployment: str, state: str) -> None:
        """`state` is closed, half_open or open."""
        self.circuit_state.labels(self._free("deployment", deployment)).set(CIRCUIT_STATES[state])

    def _free(self, name: str, value: str) -> str:
        labels = self._free_labels.get(name)
        if labels is None:
            labels = self._free_labels[name] = LabelSet()
        return labels(value)

    # --- log pipeline -------------------------------------------------------------------------

    def watch_log_stats(self, source: Callable[[], LogStats]) -> None:
        """Export the batcher's stats, read from `source()` at every `sync()`."""
        self._log_source = source
        self._log_seen = dict.fromkeys(_LOG_COUNTERS, 0)

    def observe_log_flush(self, seconds: float) -> None:
        """A plain callback for the batcher: one batch took `seconds` to write."""
        self.log_flush.observe(seconds)

    def sync(self) -> None:
        """Count the requests finished since the last sync; copy the requests in flight into their
        gauge, and the watched log stats into the counters (by delta) and the queue gauge."""
        self._count_held()
        self.in_flight.set(self._in_flight)
        if self._log_source is None:
            return
        stats = self._log_source()
        self.log_queue_depth.set(stats.queue_depth)
        for name in _LOG_COUNTERS:
            now = getattr(stats, f"rows_{name}")
            seen = self._log_seen[name]
            # A smaller value means a new batcher whose counters started again from zero.
            delta = now - seen if now >= seen else now
            if delta > 0:
                self.log_rows[name].inc(delta)
            self._log_seen[name] = now

    async def sync_periodically(self, interval_s: float = 1.0) -> None:
        """Run `sync()` every `interval_s` until cancelled (one task per worker), and once more then,
        so a stopping worker's last requests are counted."""
        try:
            while True:
                self.sync()
                await asyncio.sleep(interval_s)
        finally:
            self.sync()


def _counter(registry: CollectorRegistry, thing: str, documentation: str, *labels: str) -> Counter:
    # prometheus-client appends `_total` to a counter's name.
    return Counter(f"edgeproxy_{thing}", documentation, labels, registry=registry)


def _timing(registry: CollectorRegistry, thing: str, documentation: str) -> Histogram:
    return Histogram(
        f"edgeproxy_{thing}_seconds",
        documentation,
        ("target", "endpoint"),
        buckets=BUCKETS,
        registry=registry,
    )


def _gauge(
    registry: CollectorRegistry, thing: str, documentation: str, mode: GaugeMode, *labels: str
) -> Gauge:
    return Gauge(f"edgeproxy_{thing}", documentation, labels, registry=registry, multiprocess_mode=mode)


def render_metrics(metrics: Metrics) -> tuple[bytes, str]:
    """The exposition body and its Content-Type: all workers' values in multi-process mode."""
    metrics.sync()
    return generate_latest(metrics.scrape_registry), CONTENT_TYPE_PLAIN_0_0_4


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> Path:
    """Create the directory, or empty it of a previous run's value files (master, before workers)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    return directory


def mark_worker_dead(pid: int, path: str | os.PathLike[str]) -> None:
    """Drop an exited worker's live gauges (in-flight, queue depth, circuit state)."""
    mark_process_dead(pid, os.fspath(path))


def _values_are_multiprocess() -> bool:
    return values.ValueClass is not values.MutexValue
