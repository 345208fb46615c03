"""Routing across deployments: weighted split, latency-aware choice, ejection and recovery."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from edgeproxy.routing import Circuit, Route
from edgeproxy.settings import Deployment, RouteSettings

from .conftest import GatewayFactory


def routed_config(mock_url: str, strategy: str, deployments: str, extra: str = "") -> str:
    return f"""
[targets.east]
base_url = "{mock_url}"
[targets.west]
base_url = "{mock_url}"
[routes."team-model"]
strategy = "{strategy}"
deployments = [{deployments}]
{extra}
"""


async def send(session: aiohttp.ClientSession, url: str, count: int, concurrency: int = 16) -> list[int]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with semaphore:
            body = {"model": "team-model", "messages": [{"role": "user", "content": f"n{i}"}]}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

    return await asyncio.gather(*(one(i) for i in range(count)))


def served_models(mock) -> Counter:
    return Counter(request.json()["model"] for request in mock.requests)


async def test_weighted_split_within_tolerance(mock, start_gateway: GatewayFactory) -> None:
    deployments = '{target = "east", model = "mock-a", weight = 3}, {target = "west", model = "mock-b", weight = 1}'
    gateway = await start_gateway(routed_config(mock.url, "weighted", deployments))
    async with aiohttp.ClientSession() as session:
        statuses = await send(session, gateway.url, 1000)
    assert statuses == [200] * 1000
    served = served_models(mock)
    # 750 expected; the binomial standard deviation is about 14, so ±70 is five of them.
    assert abs(served["mock-a"] - 750) <= 70 and served["mock-a"] + served["mock-b"] == 1000


async def test_latency_aware_moves_traffic_off_a_slow_deployment(mock, start_gateway: GatewayFactory) -> None:
    deployments = '{target = "east", model = "mock-slow-80"}, {target = "west", model = "mock-fast"}'
    gateway = await start_gateway(routed_config(mock.url, "latency", deployments))
    async with aiohttp.ClientSession() as session:
        await send(session, gateway.url, 200, concurrency=4)
    served = served_models(mock)
    assert served["mock-fast"] > 4 * served["mock-slow-80"]


async def test_least_busy_prefers_the_idle_deployment(mock, start_gateway: GatewayFactory) -> None:
    deployments = '{target = "east", model = "mock-slow-150"}, {target = "west", model = "mock-fast"}'
    gateway = await start_gateway(routed_config(mock.url, "least_busy", deployments))
    async with aiohttp.ClientSession() as session:
        await send(session, gateway.url, 60, concurrency=6)
    served = served_models(mock)
    assert served["mock-fast"] > 2 * served["mock-slow-150"]


async def test_failing_deployment_is_ejected_and_probed_back(mock, start_gateway: GatewayFactory) -> None:
    # mock-failfirst-3 answers 500 to its first three requests, then recovers.
    deployments = '{target = "east", model = "mock-failfirst-3"}, {target = "west", model = "mock-fast"}'
    extra = "failure_threshold = 3\ncooldown_seconds = 0.3\n"
    gateway = await start_gateway(routed_config(mock.url, "weighted", deployments, extra))
    async with aiohttp.ClientSession() as session:
        # Clients never see the failures: each failed attempt moves on to the healthy deployment.
        assert await send(session, gateway.url, 40, concurrency=1) == [200] * 40
        failing_calls = served_models(mock)["mock-failfirst-3"]
        assert failing_calls == 3  # ejected after three failures, never called while ejected
        async with session.get(gateway.url + "/metrics") as response:
            assert 'edgeproxy_circuit_state{deployment="team-model@east/mock-failfirst-3"} 2.0' in await response.text()
        await asyncio.sleep(0.35)
        await send(session, gateway.url, 40, concurrency=1)
    # After the cool-down a probe succeeds and the deployment takes its share again.
    assert served_models(mock)["mock-failfirst-3"] > failing_calls + 5


async def test_all_ejected_fails_fast_with_503(mock, start_gateway: GatewayFactory) -> None:
    deployments = '{target = "east", model = "mock-error-500"}'
    extra = "failure_threshold = 1\ncooldown_seconds = 60\n"
    gateway = await start_gateway(routed_config(mock.url, "weighted", deployments, extra))
    async with aiohttp.ClientSession() as session:
        assert await send(session, gateway.url, 1) == [500]
        calls = len(mock.requests)
        assert await send(session, gateway.url, 3) == [503, 503, 503]
    assert len(mock.requests) == calls  # a known-down deployment is not waited on


def test_circuit_doubles_cooldown_on_failed_probe() -> None:
    now = [0.0]
    route = Route("m", RouteSettings((Deployment("t", "a"),), failure_threshold=1, cooldown_seconds=1), lambda: now[0])
    state = route.states[0]
    route.started(state)
    route.finished(state, ok=False, latency=None)
    assert state.circuit is Circuit.OPEN and route.plan() == []
    now[0] = 1.0
    assert route.plan() == [state] and state.circuit is Circuit.HALF_OPEN
    route.started(state)
    assert route.plan() == []  # one probe at a time
    route.finished(state, ok=False, latency=None)
    assert state.cooldown == 2.0 and state.open_until == 3.0
    now[0] = 3.0
    route.plan()
    route.started(state)
    route.finished(state, ok=True, latency=0.01)
    assert state.circuit is Circuit.CLOSED and state.cooldown == 0.0


@pytest.mark.parametrize("strategy", ["weighted", "least_busy", "latency"])
def test_plan_lists_each_healthy_deployment_once(strategy: str) -> None:
    deployments = tuple(Deployment("t", name) for name in "abc")
    route = Route("m", RouteSettings(deployments, strategy=strategy))  # type: ignore[arg-type]
    for _ in range(50):
        assert sorted(s.deployment.model for s in route.plan()) == ["a", "b", "c"]
