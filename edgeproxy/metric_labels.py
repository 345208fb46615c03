"""Bounded label values for the metrics: every label a request sets maps into a fixed or capped set,
so hostile model names or paths cannot grow Prometheus's series without bound."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from .pricing import PriceTable

OTHER = "other"
NO_MODEL = "none"
ENDPOINTS = frozenset(
    (
        "chat",
        "completions",
        "embeddings",
        "responses",
        "messages",
        "models",
        "audio",
        "images",
        "files",
        OTHER,
    )
)
OUTCOMES = frozenset(
    {
        "ok",
        "cancelled",
        "upstream_error",
        "unauthorized",
        "forbidden",
        "rejected",
        "rate_limited",
        "blocked",
        "budget_exceeded",
        "timeout",
        "gateway_error",
    }
)
CACHE_LABELS = {"hit": "hit", "HIT": "hit", "miss": "miss", "MISS": "miss"}  # anything else is off
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Free-form labels set by code (reasons, kinds, components) admit this many values, then fold.
SPARE_VALUES = 32
# Past this size the memo is cleared, so hostile model names cannot grow memory.
_MODEL_MEMO_MAX = 4096


# Nearly every request names one of a few paths; a hostile client's new paths only evict.
@functools.lru_cache(maxsize=1024)
def endpoint_of(path: str) -> str:
    """The API resource a path names (`/openai/v1/chat/completions` → `chat`), from a fixed set."""
    parts = [part for part in path.split("/") if part]
    rest = parts
    for i, part in enumerate(parts):
        if part == "v1":
            rest = parts[i + 1 :]
            break
        if part == "deployments":  # Azure: /openai/deployments/<name>/chat/completions
            rest = parts[i + 2 :]
            break
    if not rest:
        return OTHER
    head = rest[0]
    if head == "chat":
        return "chat" if rest[1:2] == ["completions"] else OTHER
    return head if head in ENDPOINTS else OTHER


def status_class(status: int) -> str:
    """`2xx` for 200…299 and so on; anything outside 100…599 is `other`."""
    return _STATUS_CLASSES[status // 100 - 1] if 100 <= status < 600 else OTHER


class LabelSet:
    """Admits the known values and the first `spare` new ones; everything after is `other`."""

    def __init__(self, known: Iterable[str] = (), spare: int = SPARE_VALUES) -> None:
        self._seen = set(known)
        self._spare = spare

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if self._spare > 0:
            self._spare -= 1
            self._seen.add(value)
            return value
        return OTHER


class ModelLabels:
    """A model name → a configured name, its price-table key, or `other`."""

    def __init__(self, prices: PriceTable | None, configured: Iterable[str]) -> None:
        self._prices = prices
        self._configured = frozenset(configured)
        self._memo: dict[str, str] = {}

    def __call__(self, model: str) -> str:
        label = self._memo.get(model)
        if label is None:
            label = self._resolve(model)
            if len(self._memo) >= _MODEL_MEMO_MAX:
                self._memo.clear()
            self._memo[model] = label
        return label

    def _resolve(self, model: str) -> str:
        if not model:
            return NO_MODEL
        if model in self._configured:
            return model
        key = self._prices.price_key(model) if self._prices is not None else None
        return key if key is not None else OTHER
