"""Routing: a model alias spread over deployments, with per-deployment health and latency.

State is per process (in-flight counts and latencies are local facts); each replica ejects a
failing deployment on its own evidence, which needs no coordination and converges quickly.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from .settings import Deployment, RouteSettings

# Peak-EWMA decay time: an old latency spike fades over about this many seconds.
EWMA_TAU_SECONDS = 10.0


class Circuit(Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(slots=True)
class DeploymentState:
    deployment: Deployment
    name: str
    in_flight: int = 0
    latency_ewma: float = 0.0
    observed_at: float = 0.0
    failures: int = 0
    circuit: Circuit = Circuit.CLOSED
    open_until: float = 0.0
    cooldown: float = 0.0
    # A half-open deployment takes one probe at a time.
    probing: bool = False
    samples: int = field(default=0)

    def score(self) -> float:
        """Expected latency of one more request: peak-EWMA scaled by the queue in front of it."""
        return (self.latency_ewma or 1e-3) * (self.in_flight + 1)


class Route:
    """The deployments of one alias, and the choice of which to try first."""

    def __init__(self, alias: str, settings: RouteSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.alias = alias
        self.settings = settings
        self._clock = clock
        self.states = [
            DeploymentState(d, f"{alias}@{d.target}/{d.model}") for d in settings.deployments
        ]
        self._random = random.Random()

    def plan(self) -> list[DeploymentState]:
        """Deployments to try, best first; ones known to be down are left out."""
        now = self._clock()
        healthy = []
        for state in self.states:
            if state.circuit is Circuit.OPEN and now >= state.open_until:
                state.circuit, state.probing = Circuit.HALF_OPEN, False
            if state.circuit is Circuit.CLOSED or (state.circuit is Circuit.HALF_OPEN and not state.probing):
                healthy.append(state)
        return self._order(healthy)

    def _order(self, states: list[DeploymentState]) -> list[DeploymentState]:
        if len(states) <= 1:
            return states
        strategy = self.settings.strategy
        if strategy == "least_busy":
            return sorted(states, key=lambda s: (s.in_flight, self._random.random()))
        if strategy == "latency":
            first, second = self._random.sample(states, 2)
            best = first if first.score() <= second.score() else second
            rest = sorted((s for s in states if s is not best), key=DeploymentState.score)
            return [best, *rest]
        # Weighted random order without replacement (Efraimidis–Spirakis keys).
        return sorted(
            states,
            key=lambda s: -math.log(1.0 - self._random.random()) / s.deployment.weight,
        )

    def started(self, state: DeploymentState) -> None:
        state.in_flight += 1
        if state.circuit is Circuit.HALF_OPEN:
            state.probing = True

    def finished(self, state: DeploymentState, ok: bool, latency: float | None) -> None:
        """Record one attempt's outcome: latency feeds the EWMA, failures the circuit breaker."""
        now = self._clock()
        state.in_flight -= 1
        state.probing = False
        if latency is not None:
            self._observe_latency(state, latency, now)
        if ok:
            state.failures, state.circuit, state.cooldown = 0, Circuit.CLOSED, 0.0
            return
        state.failures += 1
        settings = self.settings
        if state.circuit is Circuit.HALF_OPEN or state.failures >= settings.failure_threshold:
            # Each failed probe doubles the ejection, up to the cap.
            state.cooldown = min(settings.max_cooldown_seconds, (state.cooldown * 2) or settings.cooldown_seconds)
            state.circuit, state.open_until = Circuit.OPEN, now + state.cooldown

    @staticmethod
    def _observe_latency(state: DeploymentState, latency: float, now: float) -> None:
        if latency > state.latency_ewma or state.samples == 0:
            state.latency_ewma = latency  # peak: react to a slowdown at once
        else:
            weight = math.exp(-(now - state.observed_at) / EWMA_TAU_SECONDS)
            state.latency_ewma = state.latency_ewma * weight + latency * (1.0 - weight)
        state.observed_at = now
        state.samples += 1


class Router:
    """All routes of the config, looked up by the model name a request asks for."""

    def __init__(self, routes: Mapping[str, RouteSettings], clock: Callable[[], float] = time.monotonic) -> None:
        self.routes = {alias: Route(alias, settings, clock) for alias, settings in routes.items()}

    def route_for(self, model: str) -> Route | None:
        return self.routes.get(model) if model else None
