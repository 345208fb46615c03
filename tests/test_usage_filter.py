"""UsageChunkFilter: the usage the gateway asked for is hidden from a client that did not ask, byte for byte."""

from __future__ import annotations

import orjson
import pytest

from edgeproxy.streaming import UsageChunkFilter


def _event(document: dict) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def _chunk(i: int, usage: object = None) -> dict:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i}"}}], "usage": usage}


def _asked_and_not(n: int) -> tuple[bytes, bytes]:
    """A stream as a provider sends it when usage is asked for, and as the client would have had it."""
    final = {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
    asked = b"".join(_event(_chunk(i)) for i in range(n)) + _event(final) + b"data: [DONE]\n\n"
    plain = b"".join(_event({k: v for k, v in _chunk(i).items() if k != "usage"}) for i in range(n))
    return asked, plain + b"data: [DONE]\n\n"


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    return [*pieces, data[at:]]


@pytest.mark.parametrize("cutting", ["one event per chunk", "all at once", "split mid-event", "a byte at a time"])
def test_the_client_gets_what_it_would_have_without_the_gateways_ask(cutting: str) -> None:
    asked, plain = _asked_and_not(6)
    events = [event + b"\n\n" for event in asked.split(b"\n\n")[:-1]]
    chunks = {
        "one event per chunk": events,
        "all at once": [asked],
        "split mid-event": _cut(asked, [10, 150, 3, 200, 70]),
        "a byte at a time": [asked[i : i + 1] for i in range(len(asked))],
    }[cutting]
    usage_filter = UsageChunkFilter()
    sent = b"".join(usage_filter.feed(chunk) for chunk in chunks) + usage_filter.flush()
    assert sent == plain
    assert [orjson.loads(event[6:])["usage"] for event in usage_filter.hidden] == [
        {"prompt_tokens": 3, "completion_tokens": 6}
    ]


def test_a_usage_null_that_is_not_the_last_key_is_dropped_too() -> None:
    event = b'data: {"id":"c","usage":null,"choices":[{"delta":{}}],"x":1}\n\n'
    assert UsageChunkFilter().feed(event) == b'data: {"id":"c","choices":[{"delta":{}}],"x":1}\n\n'
    spaced = b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n'
    assert UsageChunkFilter().feed(spaced) == spaced  # text that only looks like it stays


@pytest.mark.parametrize("at_once", [True, False])
def test_an_event_without_choices_but_without_usage_reaches_the_client(at_once: bool) -> None:
    """Azure opens a stream with `"choices":[]` and its prompt filter results: not the usage event."""
    azure_first = _event({"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]})
    asked, plain = _asked_and_not(3)
    stream = azure_first + asked
    chunks = [stream] if at_once else [event + b"\n\n" for event in stream.split(b"\n\n")[:-1]]
    usage_filter = UsageChunkFilter()
    sent = b"".join(usage_filter.feed(chunk) for chunk in chunks) + usage_filter.flush()
    assert sent == azure_first + plain
    assert len(usage_filter.hidden) == 1 and b'"completion_tokens":3' in usage_filter.hidden[0]
