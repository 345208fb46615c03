"""OutputGuard: redacts an app's guarded phrases from the answer, whole bodies and streams alike.

`policy.Police` compiles the app's phrases and installs a guard on the exchange as its response filter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from .streaming import EventBuffer

REDACTED = "[redacted]"


class OutputGuard:
    """Redacts guarded phrases from the text a model sends back (OpenAI and Anthropic shapes).

    A whole JSON body is rewritten at once. A stream is rewritten event by event: per choice
    the guard holds back the last `hold` characters (the longest phrase minus one), so a
    phrase split across chunks is seen whole, and releases them with the choice's finish
    (or the stream's end). Only message text is guarded; tool-call arguments pass as sent.
    """

    def __init__(self, pattern: re.Pattern[str], hold: int) -> None:
        self._pattern = pattern
        self._hold = hold
        self._events = EventBuffer()
        self._held: dict[tuple[str, int], str] = {}
        self._envelope: dict[str, Any] = {}
        self.redactions = 0

    def whole(self, body: bytes) -> bytes:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(document, dict):
            return body
        changed = False
        for holder, key in _text_slots(document):
            redacted = self._redact(holder[key])
            if redacted != holder[key]:
                holder[key], changed = redacted, True
        return orjson.dumps(document) if changed else body

    def feed(self, chunk: bytes) -> bytes:
        complete = self._events.complete(chunk)
        return b"".join(self._event(event) + b"\n\n" for event in complete.split(b"\n\n")[:-1])

    def flush(self) -> bytes:
        """The rest of a stream that ended without finishing its choices: nothing held escapes unread."""
        rest = self._events.rest()
        out = self._event(rest) + b"\n\n" if rest.strip() else b""
        return out + self._release(list(self._held))

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        before = b""
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                before += self._release(list(self._held))
                continue
            # `find`, not `in`: see UsageChunkFilter.feed.
            if not self._held and data.find(b'"content"') < 0 and data.find(b'"text"') < 0:
                continue  # no text in it and none held back: pass it on unparsed
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(payload, dict):
                rewritten, released = self._payload(payload)
                before += released
                if rewritten:
                    lines[i] = b"data: " + orjson.dumps(payload)
        return before + b"\n".join(lines)

    def _payload(self, payload: dict[str, Any]) -> tuple[bool, bytes]:
        """Rewrite one event's text in place; return (changed, events to send before it)."""
        if payload.get("type") == "content_block_stop":  # Anthropic: release the block before it ends
            return False, self._release(
                [key for key in self._held if key == ("block", payload.get("index", 0))]
            )
        if payload.get("type") == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                return self._scan_slot(("block", payload.get("index", 0)), delta, "text", False), b""
            return False, b""
        changed = False
        if payload.get("choices"):
            self._envelope = {k: payload[k] for k in ("id", "object", "created", "model") if k in payload}
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index, final = choice.get("index", 0), choice.get("finish_reason") is not None
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if final or isinstance(delta.get("content"), str):
                    delta.setdefault("content", None)
                    changed |= self._scan_slot(("delta", index), delta, "content", final)
            elif isinstance(choice.get("text"), str):
                changed |= self._scan_slot(("text", index), choice, "text", final)
        return changed, b""

    def _scan_slot(self, key: tuple[str, int], holder: dict[str, Any], field: str, final: bool) -> bool:
        original = holder[field]
        text = self._held.pop(key, "") + (original or "")
        out, held = self._scan(text, final)
        if held:
            self._held[key] = held
        if out == (original or ""):
            if original is None:
                del holder[field]  # a finish without text keeps its original shape
            return False
        holder[field] = out
        return True

    def _scan(self, text: str, final: bool) -> tuple[str, str]:
        """Redact complete phrases; keep back a tail short enough to hold only a phrase's beginning."""
        parts: list[str] = []
        pos = 0
        for match in self._pattern.finditer(text):
            parts += (text[pos : match.start()], REDACTED)
            pos = match.end()
            self.redactions += 1
        # Any phrase not yet complete starts within the last `hold` characters.
        cut = len(text) if final else max(pos, len(text) - self._hold)
        parts.append(text[pos:cut])
        return "".join(parts), text[cut:]

    def _redact(self, text: str) -> str:
        redacted, count = self._pattern.subn(REDACTED, text)
        self.redactions += count
        return redacted

    def _release(self, keys: list[tuple[str, int]]) -> bytes:
        """Events carrying held-back text (already scanned: it holds no complete phrase)."""
        out = b""
        for kind, index in keys:
            text = self._held.pop((kind, index))
            if kind == "block":
                payload: dict[str, Any] = {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": text},
                }
                out += b"event: content_block_delta\ndata: " + orjson.dumps(payload) + b"\n\n"
                continue
            choice = (
                {"index": index, "delta": {"content": text}}
                if kind == "delta"
                else {"index": index, "text": text}
            )
            payload = {**self._envelope, "choices": [{**choice, "finish_reason": None}]}
            out += b"data: " + orjson.dumps(payload) + b"\n\n"
        return out


def _text_slots(document: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(holder, key) of each text field of a non-streamed answer."""
    for choice in document.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message, "content"
        if isinstance(choice.get("text"), str):
            yield choice, "text"
    for block in document.get("content") or ():
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            yield block, "text"
