"""Price lookup (exact, dated, provider prefix, wildcard) and cost arithmetic."""

from __future__ import annotations

import pytest

from edgeproxy.pricing import PriceTable, shipped_prices
from edgeproxy.settings import Price, Settings


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.shipped()


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        # A snapshot with a price of its own beats its base name.
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("gpt-4.1", "gpt-4.1"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o1-2024-12-17", "o1"),
        ("o1-mini-2024-09-12", "o1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106"),
        ("text-embedding-3-small", "text-embedding-3-small"),
        ("text-embedding-ada-002", "text-embedding-ada-002"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        # Provider prefixes and case are ignored.
        ("openai/gpt-4o", "gpt-4o"),
        ("openai/gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("anthropic/claude-3-haiku-20240307", "claude-3-haiku"),
        ("GPT-4o", "gpt-4o"),
        (" gpt-4o ", "gpt-4o"),
        # The mock provider's models share one made-up wildcard price.
        ("mock-fast", "mock-*"),
        ("mock-slow-2024-01-01", "mock-*"),
        # Unknown: no price rather than a neighbour's.
        ("gpt-4o-audio-preview", None),
        ("gpt-4oxyz", None),
        ("gpt-4o-mini-tts-ish", None),
        ("ft:gpt-4o-mini-2024-07-18:org::abc", None),
        ("llama-3-70b", None),
        ("mock", None),
        ("", None),
        ("openai/", None),
    ],
)
def test_price_key(prices: PriceTable, model: str, key: str | None) -> None:
    assert prices.price_key(model) == key
    if key is None:
        assert prices.lookup(model) is None
    else:
        assert prices.lookup(model) is prices.lookup(key)


def test_dated_variant_prices_like_its_base(prices: PriceTable) -> None:
    assert prices.lookup("gpt-4o-mini-2024-07-18") == Price(input=0.15, output=0.60, cached_input=0.075)
    assert prices.lookup("gpt-4o-2024-08-06") == Price(input=2.50, output=10.00, cached_input=1.25)


def test_shipped_file_is_well_formed() -> None:
    table = shipped_prices()
    assert len(table) > 40
    for model, price in table.items():
        assert model == model.lower(), model
        assert price.input >= 0 and price.output >= 0, model
        assert price.cached_input is None or price.cached_input <= price.input, model


@pytest.mark.parametrize(
    ("prompt", "completion", "cached", "expected"),
    [
        # mock-*: input 1.00, output 2.00, cached_input 0.50 USD per million tokens.
        (1_000_000, 0, None, 1.00),
        (0, 1_000_000, None, 2.00),
        (1000, 500, None, (1000 * 1.00 + 500 * 2.00) / 1e6),
        (1000, 500, 200, (800 * 1.00 + 200 * 0.50 + 500 * 2.00) / 1e6),
        (1000, 500, 0, (1000 * 1.00 + 500 * 2.00) / 1e6),
        # More cached than prompt tokens cannot make the prompt cheaper than all-cached.
        (100, 0, 500, 100 * 0.50 / 1e6),
        (0, 0, None, 0.0),
    ],
)
def test_cost_arithmetic(
    prices: PriceTable, prompt: int, completion: int, cached: int | None, expected: float
) -> None:
    assert prices.cost_usd("mock-fast", prompt, completion, cached) == pytest.approx(expected, rel=1e-12)


def test_cached_tokens_at_full_price_when_no_cached_rate() -> None:
    table = PriceTable({"plain": Price(input=10.0, output=20.0)})
    assert table.cost_usd("plain", 1000, 0, cached_tokens=400) == pytest.approx(1000 * 10.0 / 1e6)


def test_real_model_cost(prices: PriceTable) -> None:
    cost = prices.cost_usd("gpt-4o-2024-08-06", 10_000, 2_000, cached_tokens=4_000)
    assert cost == pytest.approx((6_000 * 2.50 + 4_000 * 1.25 + 2_000 * 10.00) / 1e6)


@pytest.mark.parametrize(
    ("model", "prompt", "completion"),
    [
        ("no-such-model", 100, 100),
        ("gpt-4o", None, 100),
        ("gpt-4o", 100, None),
        ("gpt-4o", None, None),
    ],
)
def test_unknown_cost_is_none_not_zero(
    prices: PriceTable, model: str, prompt: int | None, completion: int | None
) -> None:
    assert prices.cost_usd(model, prompt, completion) is None


def test_embeddings_need_no_completion_count(prices: PriceTable) -> None:
    assert prices.cost_usd("text-embedding-3-small", 1_000_000, None) == pytest.approx(0.02)


def test_settings_override_wins_and_reaches_dated_variants() -> None:
    settings = Settings(
        prices={
            "gpt-4o": Price(input=100.0, output=200.0),
            "my-finetune": Price(input=3.0, output=4.0),
            "Local-*": Price(input=0.0, output=0.0),
        }
    )
    table = PriceTable.from_settings(settings)
    assert table.lookup("gpt-4o") == Price(input=100.0, output=200.0)
    assert table.price_key("gpt-4o-2024-08-06") == "gpt-4o"
    assert table.cost_usd("gpt-4o-2024-08-06", 1000, 1000, cached_tokens=500) == pytest.approx(0.3)
    assert table.cost_usd("my-finetune", 1_000_000, 1_000_000) == pytest.approx(7.0)
    assert table.cost_usd("local-llama", 5000, 5000) == 0.0
    # Entries not overridden keep the shipped price.
    assert table.lookup("gpt-4o-mini") == Price(input=0.15, output=0.60, cached_input=0.075)


def test_longest_wildcard_wins() -> None:
    table = PriceTable({"mock-*": Price(1.0, 2.0), "mock-slow-*": Price(5.0, 6.0)})
    assert table.price_key("mock-slow-1") == "mock-slow-*"
    assert table.price_key("mock-fast") == "mock-*"
    assert "mock-*" in table.keys


def test_lookup_memo_stays_bounded() -> None:
    table = PriceTable.shipped()
    for i in range(10_000):
        assert table.price_key(f"unknown-{i}") is None
    assert table.price_key("gpt-4o-2024-08-06") == "gpt-4o"
    assert len(table._memo) <= 4096
