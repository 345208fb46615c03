"""The worst-case estimate every reservation is sized by: its arithmetic, and that it is made once."""

from __future__ import annotations

import orjson
from aiohttp.test_utils import make_mocked_request

from edgeproxy.estimate import PROMPT_OVERHEAD_TOKENS, worst_case
from edgeproxy.exchange import Exchange
from edgeproxy.options import NO_OPTIONS
from edgeproxy.settings import TargetSettings
from edgeproxy.targets import Route

DEFAULT_MAX_TOKENS = 4096


def exchange(body: dict | bytes, path: str = "/v1/chat/completions") -> Exchange:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    ex = Exchange(make_mocked_request("POST", path), NO_OPTIONS, "r", body=raw)
    ex.route = Route(TargetSettings(name="mock", base_url="http://127.0.0.1:1"), path)
    return ex


def test_prompt_from_text_bytes_completion_from_max_tokens_times_n():
    # 12 bytes of text ("user" + "abcdefgh") at 2 bytes a token, plus the framing overhead.
    ex = exchange({"messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 10, "n": 3})
    estimate = worst_case(ex, DEFAULT_MAX_TOKENS)
    assert estimate.prompt_tokens == PROMPT_OVERHEAD_TOKENS + 6
    assert estimate.completion_tokens == 30


def test_defaults_without_max_tokens_and_nothing_to_complete_for_embeddings():
    assert worst_case(exchange({"messages": []}), DEFAULT_MAX_TOKENS).completion_tokens == DEFAULT_MAX_TOKENS
    embedding = worst_case(exchange({"input": "abcd"}, "/v1/embeddings"), DEFAULT_MAX_TOKENS)
    assert (embedding.prompt_tokens, embedding.completion_tokens) == (PROMPT_OVERHEAD_TOKENS + 2, 0)


def test_a_body_that_is_not_json_counts_its_bytes():
    assert worst_case(exchange(b"x" * 100), DEFAULT_MAX_TOKENS).prompt_tokens == PROMPT_OVERHEAD_TOKENS + 50


def test_made_once_per_request_and_again_after_a_rewrite():
    ex = exchange({"messages": [{"role": "user", "content": "ab"}]})
    first = worst_case(ex, DEFAULT_MAX_TOKENS)
    # A second stage reserving for the same request gets the same object, not a new walk of the body.
    assert worst_case(ex, DEFAULT_MAX_TOKENS) is first
    ex.replace_json({"messages": [{"role": "user", "content": "ab" * 50}]})
    assert worst_case(ex, DEFAULT_MAX_TOKENS).prompt_tokens > first.prompt_tokens
