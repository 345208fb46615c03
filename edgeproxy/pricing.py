"""Prices: which list price applies to a model name, and what a request's tokens cost.

The table is the shipped `data/prices.toml` with the config's `[prices.<model>]` on top.
A model name is matched, after lower-casing, in this order (first with the name as given,
then without a provider prefix such as `openai/`):

1. an exact key (`gpt-4o-mini`);
2. the longest key followed only by version suffixes — dates, `MMDD`, `latest`, `v1:0` —
   so `gpt-4o-2024-08-06` is `gpt-4o` and `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`,
   while `gpt-4o-audio-preview` matches nothing rather than borrow gpt-4o's price;
3. the longest wildcard key (`mock-*`) the name starts with.

An unknown model or unknown token counts give no cost at all (None), never a guess or 0.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from importlib import resources

from .settings import Price, Settings

_PER_TOKEN = 1e-6  # prices are per million tokens
# What may follow a base name in a snapshot of the same model, at the same price.
_VERSION_SUFFIX = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest|v\d+(?::\d+)?))+")
_SUFFIX_START = "-@"
_MEMO_MAX = 4096


def shipped_prices() -> dict[str, Price]:
    """The price list shipped inside the package (`edgeproxy/data/prices.toml`)."""
    text = resources.files(__package__).joinpath("data", "prices.toml").read_text(encoding="utf-8")
    return {model: _price(model, table) for model, table in tomllib.loads(text).items()}


def _price(model: str, table: object) -> Price:
    if not isinstance(table, Mapping):
        raise TypeError(f"prices.toml: {model!r} must be a table")
    try:
        return Price(**table)
    except TypeError as exc:
        raise ValueError(f"prices.toml: {model!r}: {exc}") from None


class PriceTable:
    """Model → Price, with dated-variant and provider-prefix matching.

    >>> prices = PriceTable.from_settings(settings)
    >>> prices.cost_usd("gpt-4o-2024-08-06", prompt_tokens=1000, completion_tokens=200)
    """

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._exact: dict[str, Price] = {}
        self._wildcards: dict[str, Price] = {}
        for key, price in prices.items():
            key = key.strip().lower()
            if key.endswith("*"):
                self._wildcards[key] = price
            else:
                self._exact[key] = price
        # Longest first, so `mock-slow-*` wins over `mock-*`.
        self._wildcard_order = sorted(self._wildcards, key=len, reverse=True)
        # Model name → key, for the names seen most; cleared when full so odd names cannot grow it.
        self._memo: dict[str, str | None] = {}

    @classmethod
    def shipped(cls, overrides: Mapping[str, Price] | None = None) -> PriceTable:
        """The shipped list, with `overrides` replacing or adding entries."""
        prices = shipped_prices()
        prices.update({key.strip().lower(): price for key, price in (overrides or {}).items()})
        return cls(prices)

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceTable:
        return cls.shipped(settings.prices)

    @property
    def keys(self) -> frozenset[str]:
        """Every key of the table (exact names and `prefix*` wildcards)."""
        return frozenset(self._exact) | frozenset(self._wildcards)

    def price_key(self, model: str) -> str | None:
        """The table key that prices `model`, or None when nothing does."""
        try:
            return self._memo[model]
        except KeyError:
            pass
        key = self._match(model)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[model] = key
        return key

    def _match(self, model: str) -> str | None:
        name = model.strip().lower()
        if not name:
            return None
        names = (name, name.rpartition("/")[2]) if "/" in name else (name,)
        for candidate in names:
            key = self._versioned_key(candidate)
            if key is not None:
                return key
        for candidate in names:
            for prefix in self._wildcard_order:
                if candidate.startswith(prefix[:-1]):
                    return prefix
        return None

    def _versioned_key(self, name: str) -> str | None:
        if name in self._exact:
            return name
        # Cut at each `-`/`@` from the right: the longest base name is tried first.
        end = len(name)
        while True:
            cut = max(name.rfind(sep, 0, end) for sep in _SUFFIX_START)
            if cut <= 0:
                return None
            base = name[:cut]
            if base in self._exact and _VERSION_SUFFIX.fullmatch(name, cut):
                return base
            end = cut

    def lookup(self, model: str) -> Price | None:
        """The Price of `model`, or None when the table does not know it."""
        key = self.price_key(model)
        if key is None:
            return None
        return self._wildcards[key] if key.endswith("*") else self._exact[key]

    def cost_usd(
        self,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
    ) -> float | None:
        """USD for one request, or None when the model or the token counts are unknown.

        `prompt_tokens` counts every prompt token, cached ones included (OpenAI's meaning);
        `cached_tokens` of them are billed at `cached_input` when the price has one.
        A model with no output price (embeddings) needs no completion count.
        """
        price = self.lookup(model)
        if price is None or prompt_tokens is None:
            return None
        if completion_tokens is None:
            if price.output:
                return None
            completion_tokens = 0
        cached = min(max(cached_tokens or 0, 0), prompt_tokens)
        if price.cached_input is None:
            cached = 0
        cached_cost = cached * price.cached_input if cached and price.cached_input is not None else 0.0
        uncached_cost = (prompt_tokens - cached) * price.input
        return (uncached_cost + cached_cost + completion_tokens * price.output) * _PER_TOKEN
