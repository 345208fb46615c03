"""Spend caps in USD per key or per app over a day, week or month (UTC).

Spend lives in a `SpendLedger`, never in the log store: a request must not wait on a
ClickHouse query. The stage admits a request while spend is under every cap that applies,
and charges the request's list-price cost after the response has gone out. Admission and
settlement are separate steps so a reservation (worst-case cost up front, the difference
settled after) slots into `_admit`/`_settle` without changing the stage's shape.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiohttp import web
from redis import asyncio as aioredis

from .cache.remote import GuardedRedis, RedisCounters, RedisUnavailable, open_redis
from .errors import GatewayError
from .estimate import worst_case
from .exchange import Exchange
from .metrics import Metrics
from .pipeline import Handler
from .policy import app_policy
from .settings import RateLimitSettings, Settings

log = logging.getLogger("edgeproxy.budget")

REMAINING_HEADER = "Helicone-Budget-Remaining-Usd"
RESET_HEADER = "Helicone-Budget-Reset"
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Window:
    """One budget period, [start, end) in epoch seconds."""

    start: int
    end: int

    @classmethod
    def containing(cls, period: str, now: float) -> Window:
        """The day, ISO week (from Monday) or calendar month, in UTC, that holds `now`."""
        day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if period == "day":
            start, end = day, day + timedelta(days=1)
        elif period == "week":
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
        else:
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        return cls(int(start.timestamp()), int(end.timestamp()))

    def reset_at(self) -> str:
        return datetime.fromtimestamp(self.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Cap:
    """A limit on one scope's spend: `scope` is the ledger key, `label` what a refusal names."""

    scope: str
    label: str
    limit_usd: float
    period: str


class SpendLedger(Protocol):
    """Spend per scope and period; `add` returns the new total, so a reservation can be atomic."""

    async def spent(self, scope: str, window: Window) -> float: ...

    async def add(self, scope: str, window: Window, amount: float) -> float: ...

    async def close(self) -> None: ...


class MemoryLedger:
    """Spend in this process only (one worker, or tests); least recently used scopes drop past `max_entries`."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._totals: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._max_entries = max_entries
        self.evicted = 0

    async def spent(self, scope: str, window: Window) -> float:
        return self._totals.get((scope, window.start), 0.0)

    async def add(self, scope: str, window: Window, amount: float) -> float:
        key = (scope, window.start)
        total = self._totals.pop(key, 0.0) + amount
        self._totals[key] = total
        if len(self._totals) > self._max_entries:
            self._totals.popitem(last=False)
            self.evicted += 1  # that scope's spend is forgotten: it may overspend this period
        return total

    async def close(self) -> None:
        return None


class LedgerUnavailable(Exception):
    """The shared ledger did not answer in time (or is cooling down after failing)."""


class RedisLedger:
    """Spend shared by a fleet: INCRBYFLOAT on one key per scope and period, expiring after it.

    Calls go through `GuardedRedis`: detached (no pooled call is ever cancelled) behind a
    `FaultGate`, so a dead Redis costs one timeout per cooldown, not one per request.
    """

    # Kept a day past the period, so the spend just before a reset can still be read.
    GRACE_SECONDS = 86400

    def __init__(
        self, client: aioredis.Redis, *, prefix: str, timeout: float, counters: RedisCounters | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix + "spend:"
        self._guarded = GuardedRedis("budget", timeout, counters)

    @classmethod
    def open(cls, settings: RateLimitSettings, counters: RedisCounters | None = None) -> RedisLedger:
        client = open_redis(settings.url, settings.timeout_seconds, settings.max_connections)
        return cls(client, prefix=settings.key_prefix, timeout=settings.timeout_seconds, counters=counters)

    async def spent(self, scope: str, window: Window) -> float:
        value = await self._run(lambda: self._client.get(self._key(scope, window)))
        return float(value) if value is not None else 0.0

    async def add(self, scope: str, window: Window, amount: float) -> float:
        key = self._key(scope, window)
        pipe = self._client.pipeline(transaction=True)
        pipe.incrbyfloat(key, amount)
        pipe.expireat(key, window.end + self.GRACE_SECONDS)
        total, _ = await self._run(pipe.execute)
        return float(total)

    async def close(self) -> None:
        await self._guarded.calls.drain()
        await self._client.aclose(close_connection_pool=True)

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._guarded(call)
        except RedisUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc

    def _key(self, scope: str, window: Window) -> str:
        return f"{self._prefix}{scope}:{window.start}"


def open_ledger(settings: Settings, counters: RedisCounters | None = None) -> SpendLedger:
    """Budgets share the rate limiter's store: `ratelimit.url` is `memory://` or `redis://…`."""
    if settings.ratelimit.url.startswith("memory://"):
        return MemoryLedger()
    return RedisLedger.open(settings.ratelimit, counters)


class CostModel(Protocol):
    def cost_usd(
        self,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
    ) -> float | None: ...


@dataclass(slots=True)
class Admission:
    """What `_admit` decided for one request; `reserved_usd` is 0 until reservations arrive."""

    caps: list[tuple[Cap, Window]]
    reserved_usd: float = 0.0


class Budgets:
    """The budget stage: refuse with 429 once a cap is spent; charge each answered request after it.

    Caps come from the key's `budget` claim (scope: the key) and from the app's
    `[apps.<name>] budget_usd` (scope: the app, every key of it together). When the ledger
    cannot answer, `ratelimit.fail_open` decides: admit (and say so in the log) or 503.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: SpendLedger,
        prices: CostModel,
        metrics: Metrics,
        clock: Clock = time.time,
    ) -> None:
        self._apps = settings.apps
        self._fail_open = settings.ratelimit.fail_open
        self._reserve_max_tokens = settings.ratelimit.reserve_max_tokens
        self._ledger = ledger
        self._prices = prices
        self._metrics = metrics
        # Read at each request, not bound at startup, so tests can move time across a period.
        self.clock = clock

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        caps = self.caps(ex)
        if not caps:
            return call_next(ex)
        return self._capped(ex, caps, call_next)

    async def _capped(self, ex: Exchange, caps: list[Cap], call_next: Handler) -> web.StreamResponse:
        admission = await self._admit(ex, caps)
        try:
            return await call_next(ex)
        finally:
            await self._settle(ex, admission)

    def caps(self, ex: Exchange) -> list[Cap]:
        identity = ex.identity
        caps = []
        if identity.budget_usd is not None:
            caps.append(
                Cap(
                    f"key:{identity.key_id}",
                    f"key {identity.key_id}",
                    identity.budget_usd,
                    identity.budget_period,
                )
            )
        name, policy = app_policy(self._apps, identity.app_id) or ("", None)
        if policy is not None and policy.budget_usd is not None:
            caps.append(Cap(f"app:{name}", f"app {name!r}", policy.budget_usd, policy.budget_period))
        return caps

    async def _admit(self, ex: Exchange, caps: list[Cap]) -> Admission:
        """Reserve the request's worst-case cost on every cap at once, or refuse it.

        The reservation is added atomically (INCRBYFLOAT returns the new total) and rolled back
        if any cap would pass its limit, so concurrent requests cannot all pass on one reading.
        """
        now = self.clock()
        windows = [(cap, Window.containing(cap.period, now)) for cap in caps]
        worst = worst_case(ex, self._reserve_max_tokens)
        # An unpriced model reserves nothing: its cost is unknown before and after (logged as null).
        reserve = self._prices.cost_usd(ex.model, worst.prompt_tokens, worst.completion_tokens) or 0.0
        reserved: list[tuple[Cap, Window]] = []
        try:
            totals = []
            for cap, window in windows:
                totals.append(await self._ledger.add(cap.scope, window, reserve))
                reserved.append((cap, window))
        except LedgerUnavailable:
            await self._release(reserved, reserve)
            if not self._fail_open:
                raise GatewayError(
                    503, "Budget store unavailable", type="gateway_error", code="budget_unavailable"
                ) from None
            return Admission([])  # the ledger's FaultGate has counted and logged it
        for (cap, window), total in zip(windows, totals):
            used = total - reserve
            if used >= cap.limit_usd or total > cap.limit_usd + 1e-9:
                await self._release(reserved, reserve)
                self._metrics.budget_refused()
                ex.outcome = "budget_exceeded"
                needed = f" (this request may cost up to ${reserve:.4f})" if used < cap.limit_usd else ""
                raise GatewayError(
                    429,
                    f"Budget of ${cap.limit_usd:.2f} per {cap.period} for {cap.label} is spent "
                    f"(${used:.4f}){needed}; it resets at {window.reset_at()}",
                    type="insufficient_quota",
                    code="budget_exceeded",
                    headers={
                        REMAINING_HEADER: f"{max(0.0, cap.limit_usd - used):.6f}",
                        RESET_HEADER: window.reset_at(),
                        "Retry-After": str(max(1, window.end - int(now))),
                        # The OpenAI SDKs retry 429s unless told not to; this one lasts until the reset.
                        "x-should-retry": "false",
                    },
                )
        remaining = min(cap.limit_usd - total for (cap, _), total in zip(windows, totals))
        ex.response_headers[REMAINING_HEADER] = f"{max(0.0, remaining):.6f}"
        ex.reserved_usd = reserve
        return Admission(windows, reserve)

    async def _release(self, reserved: list[tuple[Cap, Window]], amount: float) -> None:
        for cap, window in reserved:
            try:
                await self._ledger.add(cap.scope, window, -amount)
            except LedgerUnavailable:
                log.warning("could not release $%.6f on %s: budget store unavailable", amount, cap.scope)

    async def _settle(self, ex: Exchange, admission: Admission) -> None:
        """Replace the reservation with what the request cost: nothing for failures and cache hits."""
        usage = ex.usage
        if ex.cache_status == "HIT" or usage.prompt_tokens is None:
            cost: float | None = 0.0
        else:
            cost = self._prices.cost_usd(ex.model, usage.prompt_tokens, usage.completion_tokens or 0, usage.cached_tokens)
        amount = (cost or 0.0) - admission.reserved_usd
        if amount == 0.0:
            return
        for cap, window in admission.caps:
            try:
                await self._ledger.add(cap.scope, window, amount)
            except LedgerUnavailable:
                log.warning("could not settle $%.6f on %s: budget store unavailable", amount, cap.scope)
