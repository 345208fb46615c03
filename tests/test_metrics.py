"""Metrics: samples and labels of one observed request, bounded labels, log stats, multi-process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.metric_labels import OTHER
from edgeproxy.metric_requests import observe_all
from edgeproxy.metrics import (
    HELD_MAX,
    Metrics,
    mark_worker_dead,
    prepare_multiprocess_dir,
    render_metrics,
)
from edgeproxy.pricing import PriceTable
from edgeproxy.settings import AppPolicy, Settings, TargetSettings

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(body: bytes) -> Samples:
    """Every sample of an exposition, keyed by (name, labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def label_values(found: Samples, name: str, label: str) -> set[str]:
    return {dict(key[1])[label] for key in found if key[0] == name}


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.shipped()


@pytest.fixture
def metrics(prices: PriceTable) -> Metrics:
    return Metrics(CollectorRegistry(), prices=prices, targets=["openai", "anthropic"])


def observe(metrics: Metrics, **overrides: object) -> None:
    request: dict[str, object] = {
        "target": "openai",
        "model": "gpt-4o-mini-2024-07-18",
        "endpoint": "chat",
        "status": 200,
        "cache": "MISS",
        "outcome": "ok",
        "duration_s": 0.2,
        "ttfb_s": 0.05,
        "upstream_s": 0.19,
        "overhead_s": 0.0008,
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "cached_tokens": 20,
        "cost_usd": 0.0125,
    }
    request.update(overrides)
    metrics.observe_request(**request)  # type: ignore[arg-type]


def test_one_request_gives_its_samples(metrics: Metrics) -> None:
    observe(metrics)
    found = samples(render_metrics(metrics)[0])
    request_labels = {
        "target": "openai",
        "model": "gpt-4o-mini",
        "endpoint": "chat",
        "status_class": "2xx",
        "cache": "miss",
        "outcome": "ok",
    }
    assert value(found, "edgeproxy_requests_total", **request_labels) == 1.0
    assert label_values(found, "edgeproxy_requests_total", "model") == {"gpt-4o-mini"}
    timed = {"target": "openai", "endpoint": "chat"}
    assert value(found, "edgeproxy_request_duration_seconds_count", **timed) == 1.0
    assert value(found, "edgeproxy_request_duration_seconds_sum", **timed) == pytest.approx(0.2)
    assert value(found, "edgeproxy_time_to_first_byte_seconds_sum", **timed) == pytest.approx(0.05)
    assert value(found, "edgeproxy_upstream_duration_seconds_sum", **timed) == pytest.approx(0.19)
    # A sub-millisecond overhead lands in the 1 ms bucket and not in the 0.5 ms one.
    assert value(found, "edgeproxy_gateway_overhead_seconds_bucket", **timed, le="0.0005") == 0.0
    assert value(found, "edgeproxy_gateway_overhead_seconds_bucket", **timed, le="0.001") == 1.0
    priced = {"target": "openai", "model": "gpt-4o-mini"}
    assert value(found, "edgeproxy_prompt_tokens_total", **priced) == 120.0
    assert value(found, "edgeproxy_completion_tokens_total", **priced) == 30.0
    assert value(found, "edgeproxy_cached_tokens_total", **priced) == 20.0
    assert value(found, "edgeproxy_cost_usd_total", **priced) == pytest.approx(0.0125)
    assert value(found, "edgeproxy_unpriced_requests_total", model="gpt-4o-mini") == 0.0
    assert value(found, "edgeproxy_cache_hits_total") == 0.0


def test_observe_all_matches_observe_value_by_value() -> None:
    # On a bound, between bounds, past the last finite one, zero, negative, repeated: every bucket and
    # the count as `observe` leaves them (it reaches into prometheus-client's value objects).
    timings = [0.0, -0.5, 0.001, 0.0011, 0.001, 0.25, 0.2500001, 7.0, 1e9, 0.0004, 0.0004, 0.0004]
    bounds = (0.001, 0.01, 0.25, 5.0)
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "t", ["route"], buckets=bounds, registry=one_by_one).labels("a")
    bulk = Histogram("t_seconds", "t", ["route"], buckets=bounds, registry=at_once).labels("a")
    for seconds in timings:
        reference.observe(seconds)
    observe_all(bulk, timings[:5])
    observe_all(bulk, timings[5:])

    expected, found = samples(generate_latest(one_by_one)), samples(generate_latest(at_once))
    assert {k: v for k, v in found.items() if k[0] != "t_seconds_created"} == pytest.approx(
        {k: v for k, v in expected.items() if k[0] != "t_seconds_created"}
    )
    assert value(found, "t_seconds_bucket", route="a", le="0.001") == 7.0
    assert value(found, "t_seconds_bucket", route="a", le="+Inf") == len(timings)


def test_repeated_requests_accumulate(metrics: Metrics) -> None:
    for _ in range(3):
        observe(metrics)
    observe(metrics, status=502, outcome="upstream_error", cost_usd=None, prompt_tokens=None)
    found = samples(render_metrics(metrics)[0])
    base = {"target": "openai", "model": "gpt-4o-mini", "endpoint": "chat", "cache": "miss"}
    assert value(found, "edgeproxy_requests_total", **base, status_class="2xx", outcome="ok") == 3.0
    assert (
        value(found, "edgeproxy_requests_total", **base, status_class="5xx", outcome="upstream_error") == 1.0
    )
    assert value(found, "edgeproxy_prompt_tokens_total", target="openai", model="gpt-4o-mini") == 360.0
    assert value(found, "edgeproxy_request_duration_seconds_count", target="openai", endpoint="chat") == 4.0


def test_cache_hit_and_unpriced(metrics: Metrics) -> None:
    observe(metrics, cache="HIT", cost_usd=0.0, cost_saved_usd=0.5, upstream_s=None)
    observe(metrics, model="llama-3-70b", cost_usd=None)
    observe(metrics, cache="", model="")
    found = samples(render_metrics(metrics)[0])
    assert value(found, "edgeproxy_cache_hits_total") == 1.0
    assert value(found, "edgeproxy_cost_saved_usd_total", target="openai", model="gpt-4o-mini") == 0.5
    assert value(found, "edgeproxy_unpriced_requests_total", model=OTHER) == 1.0
    assert label_values(found, "edgeproxy_requests_total", "cache") == {"hit", "miss", "off"}
    assert label_values(found, "edgeproxy_requests_total", "model") == {"gpt-4o-mini", OTHER, "none"}
    # The hit never went upstream: only the two others were timed there.
    assert value(found, "edgeproxy_upstream_duration_seconds_count", target="openai", endpoint="chat") == 2.0


def test_labels_stay_bounded(metrics: Metrics) -> None:
    for i in range(1000):
        observe(
            metrics,
            model=f"user-model-{i}",
            target=f"target-{i}",
            endpoint=f"/v1/thing/{i}",
            outcome=f"outcome-{i}",
            status=100 + i,
        )
        metrics.policy_blocked(f"reason-{i}")
        metrics.upstream_failed(f"target-{i}", f"kind-{i}")
    found = samples(render_metrics(metrics)[0])
    assert label_values(found, "edgeproxy_requests_total", "model") == {OTHER}
    assert label_values(found, "edgeproxy_requests_total", "endpoint") == {OTHER}
    assert label_values(found, "edgeproxy_requests_total", "outcome") == {OTHER}
    assert label_values(found, "edgeproxy_requests_total", "status_class") == {
        "1xx", "2xx", "3xx", "4xx", "5xx", OTHER
    }  # fmt: skip
    assert len(label_values(found, "edgeproxy_requests_total", "target")) <= 2 + 8 + 1
    assert len(label_values(found, "edgeproxy_blocked_total", "reason")) <= 33
    assert len(label_values(found, "edgeproxy_upstream_errors_total", "kind")) <= 33
    assert len([key for key in found if key[0] == "edgeproxy_requests_total"]) <= 11 * 6


def test_configured_models_and_targets_are_labels(prices: PriceTable) -> None:
    settings = Settings(
        targets={"openai": TargetSettings(name="openai", base_url="http://127.0.0.1:1")},
        target_url_allowlist=("Example.test:8443",),
        apps={"bot": AppPolicy(models=("house-model",))},
    )
    metrics = Metrics.for_settings(CollectorRegistry(), settings, prices)
    observe(metrics, model="house-model", target="url:example.test:8443", cost_usd=None, prompt_tokens=None)
    found = samples(render_metrics(metrics)[0])
    assert label_values(found, "edgeproxy_requests_total", "model") == {"house-model"}
    assert label_values(found, "edgeproxy_requests_total", "target") == {"url:example.test:8443"}


def test_events_and_gauges(metrics: Metrics) -> None:
    metrics.request_started()
    metrics.request_started()
    metrics.request_finished()
    metrics.rate_limit_refused("user")
    metrics.retried("openai")
    metrics.retried("openai")
    metrics.budget_refused()
    metrics.cache_failed()
    metrics.cache_tenant_mismatched()
    metrics.redis_failed("ratelimit")
    metrics.set_circuit_state("openai/gpt-4o", "open")
    found = samples(render_metrics(metrics)[0])
    assert value(found, "edgeproxy_requests_in_flight") == 1.0
    assert value(found, "edgeproxy_rate_limited_total", segment_kind="user") == 1.0
    assert value(found, "edgeproxy_retries_total", target="openai") == 2.0
    assert value(found, "edgeproxy_budget_exceeded_total") == 1.0
    assert value(found, "edgeproxy_cache_errors_total") == 1.0
    assert value(found, "edgeproxy_cache_tenant_mismatch_total") == 1.0
    assert value(found, "edgeproxy_redis_errors_total", component="ratelimit") == 1.0
    assert value(found, "edgeproxy_circuit_state", deployment="openai/gpt-4o") == 2.0


@dataclass
class FakeLogStats:
    queue_depth: int = 0
    rows_written: int = 0
    rows_spooled: int = 0
    rows_dropped: int = 0
    rows_replayed: int = 0


def test_log_stats_are_synced_by_delta(metrics: Metrics) -> None:
    batcher = FakeLogStats(queue_depth=7, rows_written=100, rows_dropped=2)
    metrics.watch_log_stats(lambda: batcher)
    metrics.observe_log_flush(0.004)
    found = samples(render_metrics(metrics)[0])
    assert value(found, "edgeproxy_log_queue_depth") == 7.0
    assert value(found, "edgeproxy_log_rows_written_total") == 100.0
    assert value(found, "edgeproxy_log_rows_dropped_total") == 2.0
    assert value(found, "edgeproxy_log_flush_seconds_count") == 1.0

    batcher.queue_depth, batcher.rows_written, batcher.rows_spooled = 0, 150, 5
    found = samples(render_metrics(metrics)[0])
    assert value(found, "edgeproxy_log_queue_depth") == 0.0
    assert value(found, "edgeproxy_log_rows_written_total") == 150.0
    assert value(found, "edgeproxy_log_rows_spooled_total") == 5.0

    # A restarted batcher counts from zero again; the exported counter keeps rising.
    batcher = FakeLogStats(rows_written=10, rows_replayed=5)
    found = samples(render_metrics(metrics)[0])
    assert value(found, "edgeproxy_log_rows_written_total") == 160.0
    assert value(found, "edgeproxy_log_rows_replayed_total") == 5.0


def written(metrics: Metrics) -> float:
    """The exported counter, read without the sync a scrape would do."""
    return metrics.registry.get_sample_value("edgeproxy_log_rows_written_total") or 0.0


async def test_sync_periodically_runs_until_cancelled(metrics: Metrics) -> None:
    batcher = FakeLogStats(rows_written=3)
    metrics.watch_log_stats(lambda: batcher)
    task = asyncio.create_task(metrics.sync_periodically(0.01))
    deadline = asyncio.get_running_loop().time() + 5
    while written(metrics) < 3:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    batcher.rows_written = 9
    while written(metrics) < 9:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def requests_counted(metrics: Metrics) -> float:
    """The requests counter as the registry holds it now, without a sync."""
    found = samples(generate_latest(metrics.registry))
    return sum(v for (name, _), v in found.items() if name == "edgeproxy_requests_total")


async def test_finished_requests_are_counted_at_sync_and_when_the_sync_task_stops(metrics: Metrics) -> None:
    observe(metrics)
    observe(metrics, cost_usd=0.5)
    # Held until a sync: the hot path only noted them.
    assert requests_counted(metrics) == 0
    metrics.sync()
    assert requests_counted(metrics) == 2
    found = samples(generate_latest(metrics.registry))
    assert value(found, "edgeproxy_cost_usd_total", target="openai", model="gpt-4o-mini") == pytest.approx(0.5125)
    assert value(found, "edgeproxy_time_to_first_byte_seconds_count", target="openai", endpoint="chat") == 2
    # A stopping worker's last requests are counted when its sync task is cancelled.
    task = asyncio.create_task(metrics.sync_periodically(3600))
    await asyncio.sleep(0)
    observe(metrics)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert requests_counted(metrics) == 3


def test_finished_requests_past_the_bound_are_counted_without_a_sync(metrics: Metrics) -> None:
    for _ in range(HELD_MAX - 1):
        observe(metrics)
    assert requests_counted(metrics) == 0
    observe(metrics)
    assert requests_counted(metrics) == HELD_MAX


async def test_served_over_http(metrics: Metrics) -> None:
    observe(metrics)

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = render_metrics(metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            found = samples(await response.read())
    finally:
        await runner.cleanup()
    assert value(found, "edgeproxy_request_duration_seconds_count", target="openai", endpoint="chat") == 1.0


def test_env_set_after_import_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before the first import"):
        Metrics(CollectorRegistry())


# --- multi-process --------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from edgeproxy.metrics import Metrics, render_metrics
    from edgeproxy.pricing import PriceTable

    metrics = Metrics(CollectorRegistry(), prices=PriceTable.shipped(), targets=["openai"])
    if sys.argv[1] == "write":
        metrics.request_started()  # left in flight: this worker's gauge lives until marked dead
        metrics.observe_request(
            target="openai", model="mock-fast", endpoint="chat", status=200, cache="miss", outcome="ok",
            duration_s=0.1, overhead_s=0.002, prompt_tokens=int(sys.argv[2]), completion_tokens=10,
            cost_usd=0.25,
        )
        metrics.watch_log_stats(lambda: type("S", (), dict(
            queue_depth=4, rows_written=int(sys.argv[2]), rows_spooled=0, rows_dropped=1, rows_replayed=0))())
        metrics.sync()
    else:
        sys.stdout.buffer.write(render_metrics(metrics)[0])
    """
)


def run_worker(directory: Path, *args: str) -> bytes:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *args], check=False, env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_multiprocess_render_aggregates_workers(tmp_path: Path) -> None:
    directory = prepare_multiprocess_dir(tmp_path / "prom")
    run_worker(directory, "write", "100")
    run_worker(directory, "write", "50")
    assert len(list(directory.glob("*.db"))) >= 4  # counter, histogram and gauge files of two pids

    found = samples(run_worker(directory, "render"))
    request = {
        "target": "openai",
        "model": "mock-*",
        "endpoint": "chat",
        "status_class": "2xx",
        "cache": "miss",
        "outcome": "ok",
    }
    assert value(found, "edgeproxy_requests_total", **request) == 2.0
    assert value(found, "edgeproxy_prompt_tokens_total", target="openai", model="mock-*") == 150.0
    assert value(found, "edgeproxy_cost_usd_total", target="openai", model="mock-*") == pytest.approx(0.5)
    timed = {"target": "openai", "endpoint": "chat"}
    assert value(found, "edgeproxy_gateway_overhead_seconds_count", **timed) == 2.0
    assert value(found, "edgeproxy_gateway_overhead_seconds_bucket", **timed, le="0.0025") == 2.0
    assert value(found, "edgeproxy_gateway_overhead_seconds_bucket", **timed, le="0.001") == 0.0
    assert value(found, "edgeproxy_requests_in_flight") == 2.0
    assert value(found, "edgeproxy_log_queue_depth") == 8.0
    assert value(found, "edgeproxy_log_rows_written_total") == 150.0
    assert value(found, "edgeproxy_log_rows_dropped_total") == 2.0


def test_dead_worker_leaves_live_gauges_and_keeps_counters(tmp_path: Path) -> None:
    directory = prepare_multiprocess_dir(tmp_path / "prom")
    run_worker(directory, "write", "10")
    run_worker(directory, "write", "20")
    pids = sorted({int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("gauge_livesum_*.db")})
    assert len(pids) == 2
    mark_worker_dead(pids[0], directory)
    found = samples(run_worker(directory, "render"))
    assert value(found, "edgeproxy_requests_in_flight") == 1.0
    assert value(found, "edgeproxy_prompt_tokens_total", target="openai", model="mock-*") == 30.0


def test_prepare_multiprocess_dir_removes_stale_files(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "keep.txt").write_text("not ours")
    assert prepare_multiprocess_dir(directory) == directory
    assert sorted(path.name for path in directory.iterdir()) == ["keep.txt"]
    assert prepare_multiprocess_dir(tmp_path / "new" / "dir").is_dir()
