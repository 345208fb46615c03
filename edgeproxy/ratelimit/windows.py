"""Sliding-window logs: the backend protocol, and the exact in-process implementation.

A window holds (time, amount) entries; usage is the sum of the entries younger than the
window. Admission is all-or-nothing over every policy of a request: either every window
admits and each is charged its admission amount, or none is charged.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Buckets kept in one process; past it the least recently used goes (and the eviction is counted).
MAX_BUCKETS = 100_000
# Entries per bucket; past it new amounts merge into the newest entry, which then expires later:
# the window only ever over-counts, never under-counts.
MAX_ENTRIES = 10_000
# Float sums of cents drift; this much over the quota still counts as within it.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Charge:
    bucket: str
    window_seconds: int
    quota: float
    amount: float  # due now: 1 for a request-unit policy; a reservation for cents/tokens; 0 only checks
    reserved: float = 0.0  # in `settle`: what admission charged, now replaced by `amount`


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    used: tuple[float, ...]  # per charge, including what this admission charged
    retry_after: float  # seconds until every refusing window has room; 0 when admitted


class WindowsUnavailable(Exception):
    """The shared backend could not answer in time."""


class Windows(Protocol):
    """`admit` charges all or nothing under `reservation`; `settle` swaps each reserved amount for
    the actual one at the reservation's own time, so the window neither keeps an unused
    reservation nor lets it expire before the charge that replaces it."""

    async def start(self) -> None: ...

    async def admit(self, charges: Sequence[Charge], reservation: str) -> Verdict: ...

    async def settle(self, charges: Sequence[Charge], reservation: str) -> None: ...

    async def close(self) -> None: ...


def admits(used: float, amount: float, quota: float) -> bool:
    """A request-unit charge must fit; a post-charged unit only needs the window not yet spent."""
    if amount > 0:
        return used + amount <= quota + EPSILON
    return used < quota - EPSILON


def wait_seconds(
    entries: Iterable[Sequence[float]], used: float, amount: float, quota: float, window: float, now: float
) -> float:
    """Time until enough of the oldest entries leave the window for `admits` to hold."""
    freed = 0.0
    for at, entry_amount in entries:
        freed += entry_amount
        if admits(used - freed, amount, quota):
            return max(0.0, at + window - now)
    return float(window)  # never fits (amount above quota): a window is as good an answer as any


class _Log:
    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        # [time, amount] lists, so a reservation can be settled in place.
        self.entries: deque[list[float]] = deque()
        self.total = 0.0

    def expire(self, cutoff: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[1]
        if not entries:
            self.total = 0.0

    def add(self, now: float, amount: float) -> list[float]:
        if len(self.entries) >= MAX_ENTRIES:
            # Merge into the newest entry in place: a reservation held by it stays settleable.
            newest = self.entries[-1]
            newest[0], newest[1] = now, newest[1] + amount
            self.total += amount
            return newest
        entry = [now, amount]
        self.entries.append(entry)
        self.total += amount
        return entry


class MemoryWindows:
    """Exact sliding windows in this process: a deque of entries per bucket, LRU-bounded in count."""

    def __init__(self, *, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic) -> None:
        self._logs: OrderedDict[str, _Log] = OrderedDict()
        # Open reservations: (reservation, bucket) → its log entry; bounded like the buckets.
        self._reserved: OrderedDict[tuple[str, str], tuple[_Log, list[float]]] = OrderedDict()
        self._max_buckets = max_buckets
        self._clock = clock
        self.evictions = 0

    def _log(self, bucket: str, window: float, now: float) -> _Log:
        log = self._logs.get(bucket)
        if log is None:
            log = self._logs[bucket] = _Log()
            if len(self._logs) > self._max_buckets:
                self._logs.popitem(last=False)
                self.evictions += 1
        else:
            self._logs.move_to_end(bucket)
        log.expire(now - window)
        return log

    async def start(self) -> None:
        pass

    async def admit(self, charges: Sequence[Charge], reservation: str) -> Verdict:
        now = self._clock()
        logs = [self._log(c.bucket, c.window_seconds, now) for c in charges]
        refused = [(c, log) for c, log in zip(charges, logs) if not admits(log.total, c.amount, c.quota)]
        if refused:
            wait = max(
                wait_seconds(log.entries, log.total, c.amount, c.quota, c.window_seconds, now) for c, log in refused
            )
            return Verdict(False, tuple(log.total for log in logs), wait)
        for charge, log in zip(charges, logs):
            if charge.amount > 0:
                self._reserved[(reservation, charge.bucket)] = (log, log.add(now, charge.amount))
                if len(self._reserved) > self._max_buckets:
                    self._reserved.popitem(last=False)  # never settled: it stays charged in full
        return Verdict(True, tuple(log.total for log in logs), 0.0)

    async def settle(self, charges: Sequence[Charge], reservation: str) -> None:
        now = self._clock()
        for charge in charges:
            held = self._reserved.pop((reservation, charge.bucket), None)
            if held is not None:
                log, entry = held
                if entry[0] > now - charge.window_seconds:  # still in the window: correct it in place
                    entry[1] += charge.amount - charge.reserved
                    log.total += charge.amount - charge.reserved
            elif charge.amount > 0 and charge.reserved == 0:
                self._log(charge.bucket, charge.window_seconds, now).add(now, charge.amount)

    async def close(self) -> None:
        self._logs.clear()
