"""completion: usage asked of streams, and events found by what they hold, wherever they sit in the capture."""

from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from edgeproxy.completion import ask_for_usage, read_usage, sse_payloads
from edgeproxy.exchange import Exchange
from edgeproxy.options import NO_OPTIONS
from edgeproxy.settings import TargetSettings
from edgeproxy.targets import Route


def _event(document: dict) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def test_payloads_holding_a_needle_are_all_found_once_and_in_order() -> None:
    chunks = [_event({"i": i, "choices": [{"delta": {"content": "x"}}]}) for i in range(50)]
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 50}}
    raw = (
        _event({"i": -1, "usage": None, "note": "usage"})  # the needle twice on one line: one payload
        + b"".join(chunks)
        + b': a comment naming "usage"\r\n\r\n'  # not a data line
        + b'data: {"usage": broken}\n\n'  # malformed: skipped
        + _event(usage).replace(b"\n\n", b"\r\n\r\n")
        + b"data: [DONE]\n\n"
        + b'data: {"usage": {"last": true}}'  # no newline at the very end
    )
    assert list(sse_payloads(raw, b'"usage"')) == [
        {"i": -1, "usage": None, "note": "usage"},
        usage,
        {"usage": {"last": True}},
    ]
    assert len(list(sse_payloads(raw))) == 53  # without a needle: every well-formed data payload


def _chat(body: bytes) -> Exchange:
    ex = Exchange(make_mocked_request("POST", "/v1/chat/completions"), NO_OPTIONS, "r", body=body)
    ex.route = Route(TargetSettings(name="openai", base_url="http://upstream"), "/v1/chat/completions")
    return ex


@pytest.mark.parametrize(
    ("body", "asked"),
    [
        (b'{"model":"m","stream":true}', True),
        (b'{"model":"m","stream": true, "stream_options": {}}', True),
        # The key escaped: JSON reads it as "stream", so the body must be parsed to see it.
        (b'{"model":"m","\\u0073tream":true}', True),
        (b'{"model":"m","stream":false}', False),
        (b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', False),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', False),
    ],
)
def test_a_stream_is_asked_for_usage_however_its_key_is_spelled(body: bytes, asked: bool) -> None:
    ex = _chat(body)
    ask_for_usage(ex)
    assert ex.hide_usage_chunk is asked
    if asked:
        assert orjson.loads(ex.body)["stream_options"]["include_usage"] is True


def test_a_body_without_a_stream_key_is_not_parsed_on_the_way_upstream() -> None:
    ex = _chat(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    ask_for_usage(ex)
    assert ex.hide_usage_chunk is False
    assert ex._json_parsed is False  # the parse waits for whoever needs it (the metrics, after the answer)


def _streamed(events: list[dict], tail: bytes = b"", hid: bool = False) -> Exchange:
    ex = _chat(b'{"model":"m","stream":true}')
    ex.capture.limit = 1 << 20
    for document in events:
        ex.capture.add(_event(document))
    ex.usage_tail, ex.hide_usage_chunk = tail, hid
    return ex


def test_a_streams_usage_comes_from_the_event_the_gateway_hid() -> None:
    hidden = _event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    ex = _streamed([{"choices": [{"delta": {"content": "x"}}]}] * 3, tail=hidden, hid=True)
    usage = read_usage(ex, None)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 9, 13)


def test_with_nothing_hidden_the_usage_is_found_in_what_the_client_got() -> None:
    # A provider that put usage in its last content chunk: nothing was hidden, the capture holds it.
    last = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}
    ex = _streamed([{"choices": [{"delta": {"content": "x"}}]}, last], hid=True)
    assert (read_usage(ex, None).prompt_tokens, read_usage(ex, None).completion_tokens) == (2, 5)


@pytest.mark.parametrize("spacing", [b'"usage":{', b'"usage": {'])
def test_null_usages_are_passed_over_and_the_object_is_read_however_spaced(spacing: bytes) -> None:
    nulls = [{"choices": [{"delta": {"content": "x"}}], "usage": None}] * 50
    ex = _streamed(nulls)
    final = b'data: {"choices":[],' + spacing + b'"prompt_tokens":3,"completion_tokens":50}}\n\n'
    ex.capture.add(final)
    usage = read_usage(ex, None)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 50)
