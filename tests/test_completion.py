"""sse_payloads: events found by what they hold, wherever they sit in the captured stream."""

from __future__ import annotations

import orjson

from edgeproxy.completion import sse_payloads


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
