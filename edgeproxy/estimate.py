"""Worst-case size of a request before it runs, for reservations against budgets and limits.

Spend caps hold under concurrency only if each request reserves what it could cost before
it goes upstream, and settles to what it did cost after (a check that reads spend and a charge
that lands later let every concurrent request through on the same reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # exchange.py holds a WorstCase: a runtime import would be circular
    from .exchange import Exchange

# Byte-level BPE tokens average about four bytes of English; two bytes per token covers
# code, digits and most non-Latin text too, so a prompt rarely costs more than reserved.
PROMPT_BYTES_PER_TOKEN = 2
# Role markers and message framing the provider adds around the text.
PROMPT_OVERHEAD_TOKENS = 8
_NO_COMPLETION = ("/v1/embeddings", "/v1/moderations")
# Where the text the provider bills as prompt lives, across chat, completions, responses, messages.
_PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "system", "tools", "functions")


@dataclass(frozen=True, slots=True)
class WorstCase:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def worst_case(ex: Exchange, default_max_tokens: int) -> WorstCase:
    """Prompt tokens estimated from the prompt's text; completion bounded by max_tokens (or the default).

    Computed once per request: the rate-limit and budget stages both reserve it.
    """
    if ex.worst_case is None:
        ex.worst_case = _estimate(ex, default_max_tokens)
    return ex.worst_case


def _estimate(ex: Exchange, default_max_tokens: int) -> WorstCase:
    document = ex.json()
    if document is None:
        prompt_bytes = len(ex.body)
    else:
        prompt_bytes = sum(_text_bytes(document.get(key)) for key in _PROMPT_FIELDS)
    prompt = PROMPT_OVERHEAD_TOKENS + -(-prompt_bytes // PROMPT_BYTES_PER_TOKEN)
    if ex.route.path.startswith(_NO_COMPLETION):
        return WorstCase(prompt, 0)
    completion = default_max_tokens
    if document is not None:
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = document.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                completion = value
                break
        choices = document.get("n")
        if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
            completion *= choices
    return WorstCase(prompt, completion)


def _text_bytes(value: object) -> int:
    """UTF-8 bytes of every string inside a JSON value (keys and numbers are noise at this scale)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0
