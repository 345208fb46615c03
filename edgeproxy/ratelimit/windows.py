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
    amount: float  # due now: 1 for a request-unit policy at admission; 0 checks without charging


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    used: tuple[float, ...]  # per charge, including what this admission charged
    retry_after: float  # seconds until every refusing window has room; 0 when admitted


class WindowsUnavailable(Exception):
    """The shared backend could not answer in time."""


class Windows(Protocol):
    async def start(self) -> None: ...

    async def admit(self, charges: Sequence[Charge]) -> Verdict: ...

    async def charge(self, charges: Sequence[Charge]) -> None: ...

    async def close(self) -> None: ...


def admits(used: float, amount: float, quota: float) -> bool:
    """A request-unit charge must fit; a post-charged unit only needs the window not yet spent."""
    if amount > 0:
        return used + amount <= quota + EPSILON
    return used < quota - EPSILON


def wait_seconds(
    entries: Iterable[tuple[float, float]], used: float, amount: float, quota: float, window: float, now: float
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
        self.entries: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def expire(self, cutoff: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[1]
        if not entries:
            self.total = 0.0

    def add(self, now: float, amount: float) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            _, newest = self.entries.pop()
            amount += newest
            self.total -= newest
        self.entries.append((now, amount))
        self.total += amount


class MemoryWindows:
    """Exact sliding windows in this process: a deque of entries per bucket, LRU-bounded in count."""

    def __init__(self, *, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic) -> None:
        self._logs: OrderedDict[str, _Log] = OrderedDict()
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

    async def admit(self, charges: Sequence[Charge]) -> Verdict:
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
                log.add(now, charge.amount)
        return Verdict(True, tuple(log.total for log in logs), 0.0)

    async def charge(self, charges: Sequence[Charge]) -> None:
        now = self._clock()
        for charge in charges:
            if charge.amount > 0:
                self._log(charge.bucket, charge.window_seconds, now).add(now, charge.amount)

    async def close(self) -> None:
        self._logs.clear()
