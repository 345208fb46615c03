"""Completion semantics: ask a stream for usage, read usage back, assemble a streamed answer.

Captured bytes are decoded once, after the response is finished, never per chunk, so a
multibyte character split across chunks is read whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from .exchange import Exchange, Usage

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def ask_for_usage(ex: Exchange) -> None:
    """Make an OpenAI-style stream report usage; remember to hide that chunk if the client didn't ask."""
    if ex.route.target.kind == "anthropic" or ex.route.path not in COMPLETION_PATHS:
        return
    if ex.body.find(b'"stream"') < 0 and ex.body.find(b"\\u") < 0:
        return  # no stream key, spelled plainly or escaped: not a stream, and no parse on the way upstream
    document = ex.json()
    if document is None or document.get("stream") is not True:
        return
    stream_options = document.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, dict) or stream_options.get("include_usage") is True:
        return
    ex.replace_json({**document, "stream_options": {**stream_options, "include_usage": True}})
    ex.hide_usage_chunk = True


def sse_payloads(raw: bytes, containing: bytes = b"") -> Iterator[Any]:
    """Yield each JSON `data:` payload of an SSE byte string that holds `containing`; skip [DONE] and malformed ones."""
    for line in _lines_with(raw, containing) if containing else raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            yield orjson.loads(data)
        except orjson.JSONDecodeError:
            continue


def _lines_with(raw: bytes, needle: bytes) -> Iterator[bytes]:
    """The lines of `raw` that hold `needle`, found by C-level searches: a stream's usage is in one
    event of ~50, and walking every line in Python cost ~90 µs per stream on a slow core."""
    at = raw.find(needle)
    while at >= 0:
        start = raw.rfind(b"\n", 0, at) + 1
        end = raw.find(b"\n", at)
        if end < 0:
            end = len(raw)
        yield raw[start:end]
        at = raw.find(needle, end)


def read_usage(ex: Exchange, response_body: bytes | None) -> Usage:
    """Token usage from a JSON body or from a stream's events (OpenAI and Anthropic shapes)."""
    usage = Usage()
    if response_body is not None:
        try:
            document = orjson.loads(response_body)
        except orjson.JSONDecodeError:
            return usage
        if isinstance(document, dict):
            _merge(usage, document.get("usage"))
        return usage
    if ex.hide_usage_chunk and not ex.capture.truncated:
        # The usage event the gateway asked for and hid is in the tail: read it alone first.
        usage = stream_usage(ex.usage_tail)
        if usage.prompt_tokens is not None:
            return usage
    return stream_usage(ex.usage_tail if ex.capture.truncated else ex.capture.body() + ex.usage_tail)


def stream_usage(raw: bytes) -> Usage:
    """Token usage from a stream's events (OpenAI's final usage chunk, Anthropic's start and delta)."""
    usage = Usage()
    # Asked for usage, OpenAI puts `"usage":null` in every event but the last: an object is looked
    # for first (compact JSON, as OpenAI sends it), any mention only when there is none.
    for needle in (b'"usage":{', b'"usage"'):
        if raw.find(needle) >= 0:
            break
    else:
        return usage
    # Only events that name "usage" can carry it; decoding all ~50 events of a stream to find it cost ~3× more.
    for payload in sse_payloads(raw, needle):
        if isinstance(payload, dict):
            _merge(usage, payload.get("usage"))
            message = payload.get("message")
            if isinstance(message, dict):  # Anthropic's message_start
                _merge(usage, message.get("usage"))
    if usage.total_tokens is None and usage.prompt_tokens is not None and usage.completion_tokens is not None:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


def _merge(usage: Usage, found: Any) -> None:
    if not isinstance(found, dict):
        return
    prompt = found.get("prompt_tokens")
    if prompt is None and isinstance(found.get("input_tokens"), int):
        # Anthropic counts cache reads and writes apart from input_tokens; OpenAI includes them.
        prompt = found["input_tokens"] + sum(
            found.get(k) or 0 for k in ("cache_read_input_tokens", "cache_creation_input_tokens")
        )
    completion = found.get("completion_tokens", found.get("output_tokens"))
    if isinstance(prompt, int):
        usage.prompt_tokens = prompt
    if isinstance(completion, int):
        usage.completion_tokens = completion
    total = found.get("total_tokens")
    if isinstance(total, int):
        usage.total_tokens = total
    details = found.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else found.get("cache_read_input_tokens")
    if isinstance(cached, int):
        usage.cached_tokens = cached


def assemble_stream(raw: bytes) -> dict[str, Any]:
    """The answer a stream spelled out, shaped like a non-streamed response's choices."""
    choices: dict[int, dict[str, Any]] = {}
    blocks: dict[int, dict[str, Any]] = {}
    for payload in sse_payloads(raw):
        if not isinstance(payload, dict):
            continue
        if payload.get("type") == "content_block_delta":  # Anthropic
            _anthropic_delta(blocks, payload)
            continue
        for choice in payload.get("choices") or ():
            if isinstance(choice, dict):
                _choice_delta(choices.setdefault(int(choice.get("index") or 0), {}), choice)
    if blocks:
        return {"content": [blocks[i] for i in sorted(blocks)]}
    for choice in choices.values():
        calls = choice.get("message", {}).get("tool_calls")
        if calls:  # gathered by index while streaming; a list, as in a non-streamed message
            choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"choices": [{"index": i, **choices[i]} for i in sorted(choices)]}


def _choice_delta(into: dict[str, Any], choice: dict[str, Any]) -> None:
    if choice.get("finish_reason"):
        into["finish_reason"] = choice["finish_reason"]
    if "text" in choice:  # legacy completions
        into["text"] = into.get("text", "") + (choice["text"] or "")
        return
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    message = into.setdefault("message", {"role": "assistant", "content": ""})
    if delta.get("role"):
        message["role"] = delta["role"]
    if delta.get("content"):
        message["content"] += delta["content"]
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        calls = message.setdefault("tool_calls", {})
        slot = calls.setdefault(
            int(call.get("index") or 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""


def _anthropic_delta(blocks: dict[int, dict[str, Any]], payload: dict[str, Any]) -> None:
    delta = payload.get("delta") or {}
    block = blocks.setdefault(int(payload.get("index") or 0), {"type": "text", "text": ""})
    if delta.get("type") == "input_json_delta":
        block["type"] = "tool_use"
        block["input_json"] = block.get("input_json", "") + (delta.get("partial_json") or "")
    else:
        block["text"] = block.get("text", "") + (delta.get("text") or "")
