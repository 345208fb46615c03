"""The limit stage: admit a request only if every applicable policy has room; settle spend after."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..errors import GatewayError
from ..estimate import worst_case
from ..exchange import Exchange
from ..pipeline import Handler
from ..pricing import PriceTable
from ..settings import RateLimitSettings
from .policies import Applied, PolicyBook
from .windows import Charge, Verdict, Windows, WindowsUnavailable, admits


class LimitCounters(Protocol):
    """The part of `Metrics` the limiter reports to."""

    def rate_limit_refused(self, segment_kind: str) -> None: ...


@dataclass(slots=True)
class LimitStats:
    admitted: int = 0
    refused: int = 0
    unavailable: int = 0
    # Post-charged policies whose amount could not be known (no usage, or an unpriced model).
    unmetered: int = 0


class RateLimitStage:
    """Checks app, key and header policies together (all must admit) before the request goes on.

    Every response under a policy carries `Helicone-RateLimit-Limit`, `-Remaining` and `-Policy`
    for the policy closest to refusing; a refusal is a 429 with `Retry-After`.
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        book: PolicyBook,
        windows: Windows,
        prices: PriceTable,
        counters: LimitCounters | None = None,
    ) -> None:
        self._settings = settings
        self._book = book
        self._windows = windows
        self._prices = prices
        self._counters = counters
        self.stats = LimitStats()

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        applied = self._book.applicable(ex)
        if not applied:
            return call_next(ex)
        return self._limited(ex, applied, call_next)

    async def _limited(self, ex: Exchange, applied: Sequence[Applied], call_next: Handler) -> web.StreamResponse:
        charges = self._reservations(ex, applied)
        try:
            verdict = await self._windows.admit(charges, ex.request_id)
        except WindowsUnavailable:
            self.stats.unavailable += 1
            if not self._settings.fail_open:
                raise GatewayError(
                    503,
                    "Rate limiting is unavailable, so the gateway refuses requests under a rate limit",
                    type="gateway_error",
                    code="rate_limiter_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
            _set_headers(ex, applied[0], None)  # fail open: say which policy, not what is left
            charges = [Charge(c.bucket, c.window_seconds, c.quota, 0.0) for c in charges]
        else:
            self._enforce(ex, applied, charges, verdict)
        self.stats.admitted += 1
        try:
            return await call_next(ex)
        finally:
            if any(a.policy.unit != "request" for a in applied):
                await self._settle(ex, applied, charges)

    def _reservations(self, ex: Exchange, applied: Sequence[Applied]) -> list[Charge]:
        """Admission charges: one per request-unit policy; the worst case for cents and tokens."""
        worst = worst_case(ex, self._settings.reserve_max_tokens) if any(
            a.policy.unit != "request" for a in applied
        ) else None
        charges = []
        for a in applied:
            amount = 1.0
            if worst is not None and a.policy.unit == "tokens":
                amount = float(worst.total_tokens)
            elif worst is not None and a.policy.unit == "cents":
                # An unpriced model reserves nothing (only checks); it is counted as unmetered after.
                cost = self._prices.cost_usd(ex.model, worst.prompt_tokens, worst.completion_tokens)
                amount = 0.0 if cost is None else cost * 100.0
                ex.reserved_usd = cost  # logged beside the settled cost
            charges.append(Charge(a.bucket, a.policy.window_seconds, a.policy.quota, amount))
        return charges

    def _enforce(self, ex: Exchange, applied: Sequence[Applied], charges: Sequence[Charge], verdict: Verdict) -> None:
        if verdict.admitted:
            # The policy with the smallest share of its quota left is the one the client should watch.
            index = min(range(len(applied)), key=lambda i: _share_left(charges[i], verdict.used[i]))
            _set_headers(ex, applied[index], applied[index].policy.quota - verdict.used[index])
            return
        index = next(i for i, c in enumerate(charges) if not admits(verdict.used[i], c.amount, c.quota))
        binding = applied[index]
        _set_headers(ex, binding, binding.policy.quota - verdict.used[index])
        self.stats.refused += 1
        if self._counters is not None:
            self._counters.rate_limit_refused(binding.segment_kind)
        retry_after = max(1, math.ceil(verdict.retry_after))
        raise GatewayError(
            429,
            f"Rate limit exceeded: {binding.policy.header_value()} ({binding.source} policy); "
            f"retry in {retry_after}s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )

    async def _settle(self, ex: Exchange, applied: Sequence[Applied], reserved: Sequence[Charge]) -> None:
        """Replace cents and tokens reservations with the answer's usage: nothing for failures and cache hits."""
        charges = []
        for a, charge in zip(applied, reserved):
            amount = charge.amount
            if a.policy.unit != "request":
                actual = 0.0 if ex.cache_status == "HIT" or ex.status >= 400 else self._amount(ex, a.policy.unit)
                if actual is None:
                    self.stats.unmetered += 1  # answered but unmeasurable: the reservation stands
                else:
                    amount = actual
            charges.append(Charge(charge.bucket, charge.window_seconds, charge.quota, amount, charge.amount))
        # The client has its answer, so the wait costs it nothing; a client leaving now cannot
        # cancel the settlement (Redis calls are detached, memory ones never wait).
        try:
            await self._windows.settle(charges, ex.request_id)
        except WindowsUnavailable:
            self.stats.unavailable += 1

    def _amount(self, ex: Exchange, unit: str) -> float | None:
        usage = ex.usage
        if unit == "tokens":
            if usage.total_tokens is not None:
                return float(usage.total_tokens)
            if usage.prompt_tokens is not None and usage.completion_tokens is not None:
                return float(usage.prompt_tokens + usage.completion_tokens)
            return None
        cost = self._prices.cost_usd(ex.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        return None if cost is None else cost * 100.0

    async def start(self) -> None:
        await self._windows.start()

    async def close(self) -> None:
        await self._windows.close()


def _share_left(charge: Charge, used: float) -> float:
    return (charge.quota - used) / charge.quota if charge.quota > 0 else 0.0


def _set_headers(ex: Exchange, applied: Applied, remaining: float | None) -> None:
    headers = ex.response_headers
    headers["Helicone-RateLimit-Limit"] = _number(applied.policy.quota)
    if remaining is not None:
        headers["Helicone-RateLimit-Remaining"] = _number(max(0.0, remaining))
    headers["Helicone-RateLimit-Policy"] = applied.policy.header_value()


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".")
