"""Finished requests held by label set until the metrics sync hands them to prometheus-client.

Per request, prometheus-client's locked counter updates and histogram code cost ~65 kIr of ~875
at concurrency 1 (bench/README.md). Held here, a request is a few appends and additions; once a
second (or per 256 requests) the sync adds each histogram's timings bucket by bucket and each
counter's sum in one update.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

# The label values of one finished request as given: target, model, endpoint, status, cache, outcome.
Given = tuple[str, str, str, int, str, str]


@dataclass(frozen=True, slots=True)
class RequestChildren:
    """The labelled children one request touches, resolved once per combination of its values."""

    requests: Counter
    duration: Histogram
    ttfb: Histogram
    upstream: Histogram
    overhead: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    cached_tokens: Counter
    cost: Counter
    cost_saved: Counter
    unpriced: Counter
    cache_hit: bool


class HeldRequests:
    """One label set's finished requests until the next sync: the timings in arrays, the counters
    as sums. Nothing the cycle collector tracks is made per request (a tuple per request, held for
    a second, cost the logging gateway more in collections than it saved)."""

    __slots__ = (
        "cached_tokens",
        "children",
        "completion_tokens",
        "cost",
        "cost_saved",
        "durations",
        "overheads",
        "prompt_tokens",
        "requests",
        "ttfbs",
        "unpriced",
        "upstreams",
    )

    def __init__(self, children: RequestChildren) -> None:
        self.children = children
        self.requests = 0
        self.durations = array("d")
        self.ttfbs = array("d")
        self.upstreams = array("d")
        self.overheads = array("d")
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cost = 0.0
        self.unpriced = 0
        self.cost_saved = 0.0

    def hand_over(self, cache_hits: Counter) -> None:
        """Every timing to its histogram, each counter's sum to the counter in one update."""
        children = self.children
        for histogram, timings in (
            (children.duration, self.durations),
            (children.ttfb, self.ttfbs),
            (children.upstream, self.upstreams),
            (children.overhead, self.overheads),
        ):
            if timings:
                observe_all(histogram, timings)
        children.requests.inc(self.requests)
        for counter, amount in (
            (children.prompt_tokens, self.prompt_tokens),
            (children.completion_tokens, self.completion_tokens),
            (children.cached_tokens, self.cached_tokens),
            (children.cost, self.cost),
            (children.unpriced, self.unpriced),
        ):
            if amount:
                counter.inc(amount)
        if children.cache_hit:
            cache_hits.inc(self.requests)
            if self.cost_saved:
                children.cost_saved.inc(self.cost_saved)


def observe_all(histogram: Histogram, timings: Sequence[float]) -> None:
    """`histogram.observe(t)` for every t, as one update per bucket touched and one to the sum.

    `observe` makes two locked updates a value (the sum, then the first bucket whose bound is >= it):
    39 kIr of a request's ~836 at concurrency 1 for its three or four timings, ~1.5 µs a value
    where this takes ~0.25. prometheus-client has no bulk form, so this updates the value objects
    `observe` does (`_upper_bounds`, `_buckets`, `_sum`, the same since 0.4), in one process's
    registry and in the multiprocess files alike; a test holds it equal to `observe`.
    """
    bounds = histogram._upper_bounds  # private: see the docstring
    buckets = histogram._buckets
    # bisect_left finds the first bound >= t: the bucket `observe` picks (`t <= bound`).
    for index, count in Tally(bisect_left(bounds, seconds) for seconds in timings).items():
        buckets[index].inc(count)
    histogram._sum.inc(sum(timings))
