"""A fast OpenAI-compatible (and minimal Anthropic) mock provider, steered per request by header or model.

Control, by header or by a dash-separated token in the model name (headers win):

    X-Mock-Status: 429           model mock-error-429      error in the provider's JSON shape
    X-Mock-Retry-After: 2        model ...-retryafter-2    adds Retry-After to injected errors
    X-Mock-Fail-First: 2         model ...-failfirst-2     first N requests per key fail (status or 500)
    X-Mock-Fail-Key: k                                     the key; defaults to the model name
    X-Mock-Delay-Ms: 300         model mock-slow-300       wait before sending headers
    X-Mock-Chunks: 20            model ...-chunks-20       content chunks / completion tokens (default 5)
    X-Mock-Chunk-Gap-Ms: 10      model ...-gap-10          pause before each content chunk
    X-Mock-Chunk-Gaps: 0,200,0                             explicit pause before content chunk i
    X-Mock-Fail-After: 3         model ...-failafter-3     reset the connection after N content chunks
    X-Mock-Hang-After: 3         model ...-hangafter-3     stop sending after N content chunks, stay open
    X-Mock-Garbage: 1            model ...-garbage         invalid SSE (or invalid JSON when not streaming)
    X-Mock-Echo: 1               model ...-echo            JSON replies carry "mock_echo" (what arrived)
    X-Mock-Set-Cookie: a=b                                 JSON replies carry Set-Cookie: a=b

Replies are deterministic: content is "echo: <last user message>" then filler words, one per chunk.
Run standalone with `python -m bench.mock_upstream --port 9999`; `GET /_mock/stats`, `POST /_mock/reset`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import hashlib
import itertools
import re
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

_FILLER = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit")
_PIECE = "@@mock-piece@@"
_DONE = b"data: [DONE]\n\n"
_GARBAGE_SSE = (
    b'data: {"id": "mock-garbage", "choices": [{\n\nthis line is not server-sent events\n\n' + _DONE
)
_GARBAGE_JSON = b'{"id": "mock-garbage", "choices": [{"message": '
_SSE_TYPE = "text/event-stream; charset=utf-8"
_MODEL_VALUE = re.compile(
    r"(?:^|-)(error|retryafter|failfirst|slow|chunks|gap|failafter|hangafter)-(\d+)(?=-|$)"
)
_MODEL_FLAG = re.compile(r"(?:^|-)(garbage|echo)(?=-|$)")
_MODEL_FIELDS = {
    "error": "status",
    "retryafter": "retry_after",
    "failfirst": "fail_first",
    "slow": "delay_ms",
    "chunks": "chunks",
    "gap": "gap_ms",
    "failafter": "fail_after",
    "hangafter": "hang_after",
}
_MODEL_IDS = ("mock-model", "mock-tool", "mock-embed", "mock-claude")


class _BadRequest(ValueError):
    """The request cannot be answered; becomes a 400 in the endpoint's error shape."""


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"negative value {value!r}")
    return number


def _millis(value: str) -> float:
    number = float(value)
    if not 0 <= number < 3_600_000:
        raise ValueError(f"out of range {value!r}")
    return number


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _gaps(value: str) -> tuple[float, ...]:
    return tuple(_millis(item) for item in value.split(",") if item.strip())


_HEADER_FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("X-Mock-Status", "status", _count),
    ("X-Mock-Retry-After", "retry_after", str),
    ("X-Mock-Fail-First", "fail_first", _count),
    ("X-Mock-Fail-Key", "fail_key", str),
    ("X-Mock-Delay-Ms", "delay_ms", _millis),
    ("X-Mock-Chunks", "chunks", _count),
    ("X-Mock-Chunk-Gap-Ms", "gap_ms", _millis),
    ("X-Mock-Chunk-Gaps", "gaps_ms", _gaps),
    ("X-Mock-Fail-After", "fail_after", _count),
    ("X-Mock-Hang-After", "hang_after", _count),
    ("X-Mock-Garbage", "garbage", _flag),
    ("X-Mock-Echo", "echo", _flag),
    ("X-Mock-Set-Cookie", "set_cookie", str),
)


@dataclass(frozen=True, slots=True)
class Control:
    """The behaviour one request asked for."""

    status: int | None = None
    retry_after: str | None = None
    fail_first: int = 0
    fail_key: str = ""
    delay_ms: float = 0.0
    chunks: int = 5
    gap_ms: float = 0.0
    gaps_ms: tuple[float, ...] = ()
    fail_after: int | None = None
    hang_after: int | None = None
    garbage: bool = False
    echo: bool = False
    set_cookie: str = ""

    def gap_before(self, index: int) -> float:
        """Seconds to pause before content chunk `index`."""
        return (self.gaps_ms[index] if index < len(self.gaps_ms) else self.gap_ms) / 1000


@functools.lru_cache(maxsize=1024)
def _model_control(model: str) -> Control:
    """Control from model-name tokens; cached because benchmarks repeat a handful of names."""
    fields: dict[str, Any] = {"fail_key": model}
    lowered = model.lower()
    for token, value in _MODEL_VALUE.findall(lowered):
        name = _MODEL_FIELDS[token]
        fields[name] = value if name == "retry_after" else int(value)
    for token in _MODEL_FLAG.findall(lowered):
        fields[token] = True
    return Control(**fields)


def parse_control(headers: CIMultiDictProxy[str], model: str) -> Control:
    """Model-name control overridden by X-Mock-* headers."""
    base = _model_control(model)
    fields: dict[str, Any] = {}
    for header, name, convert in _HEADER_FIELDS:
        value = headers.get(header)
        if value is not None:
            try:
                fields[name] = convert(value)
            except ValueError as exc:
                raise _BadRequest(f"mock: bad {header} header: {exc}") from None
    return dataclasses.replace(base, **fields) if fields else base


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as it reached the mock."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes
    received: float

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A client that went away before its response was complete."""

    path: str
    nonce: str
    at: float


@dataclass(frozen=True, slots=True)
class Turn:
    """One admitted request as the reply builders see it."""

    body: dict[str, Any]
    control: Control
    seq: int
    nonce: str
    created: int


@dataclass(frozen=True, slots=True)
class Frames:
    """A streamed reply: head and tail written whole, body frames paced and interruptible."""

    head: bytes
    body: list[bytes]
    tail: bytes


Reply = dict[str, Any] | Frames


# --- request reading -------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text")) for part in content if isinstance(part, dict))
    return ""


def _words(content: Any) -> int:
    return len(_text(content).split())


def _last_user(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
    return ""


def _prompt_nonce(body: dict[str, Any]) -> str:
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], str):
        return prompt[-1]
    return prompt if isinstance(prompt, str) else ""


def _form_nonce(body: dict[str, Any]) -> str:
    return str(body["fields"].get("prompt") or body["fields"].get("purpose") or "")


def _read_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"mock: body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("mock: body must be a JSON object")
    return body


async def _read_form(headers: CIMultiDictProxy[str], raw: bytes) -> dict[str, Any]:
    """Every part of a multipart body, described by size and sha256 so tests can prove it intact."""
    if not headers.get("Content-Type", "").startswith("multipart/form-data"):
        raise _BadRequest("mock: expected multipart/form-data")
    loop = asyncio.get_running_loop()
    # The raw body was already read for recording, so the parser is fed from those bytes.
    stream = StreamReader(BaseProtocol(loop), max(2**16, len(raw)), loop=loop)
    stream.feed_data(raw)
    stream.feed_eof()
    parts: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    try:
        reader = MultipartReader(headers, stream)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _BadRequest("mock: nested multipart is not supported")
            data = await part.read()
            parts.append(
                {
                    "name": part.name,
                    "filename": part.filename,
                    "content_type": part.headers.get("Content-Type"),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            if part.filename is None and part.name and len(data) <= 4096:
                fields[part.name] = data.decode("utf-8", "replace")
    except (ValueError, AssertionError) as exc:
        raise _BadRequest(f"mock: bad multipart body: {exc}") from None
    return {"model": fields.get("model", ""), "parts": parts, "fields": fields}


# --- reply building --------------------------------------------------------------------------------


def _sse(obj: Any, event: str | None = None) -> bytes:
    lead = b"event: " + event.encode() + b"\n" if event else b""
    return lead + b"data: " + orjson.dumps(obj) + b"\n\n"


def _fill(template: dict[str, Any], pieces: list[str], event: str | None = None) -> list[bytes]:
    """One SSE frame per piece, from a template serialised once with a placeholder for the piece."""
    pre, post = _sse(template, event).split(orjson.dumps(_PIECE))
    return [pre + orjson.dumps(piece) + post for piece in pieces]


def _content_pieces(nonce: str, chunks: int) -> list[str]:
    if chunks <= 0:
        return []
    return ["echo: " + nonce, *(_FILLER[i % len(_FILLER)] for i in range(chunks - 1))]


def _argument_pieces(nonce: str, chunks: int) -> list[str]:
    text = orjson.dumps({"echo": nonce, "chunks": chunks}).decode()
    size = -(-len(text) // max(1, min(chunks, len(text))))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _tool_name(body: dict[str, Any]) -> str | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name"))
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        function = tools[0].get("function")
        return str(function.get("name")) if isinstance(function, dict) else "tool"
    return None


def _model(body: dict[str, Any], default: str = "mock-model") -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat(turn: Turn) -> Reply:
    body, model = turn.body, _model(turn.body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest("mock: 'messages' must be a list")
    prompt = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
    tool = _tool_name(body) if "tool" in model.lower() else None
    chunks = turn.control.chunks
    pieces = _argument_pieces(turn.nonce, chunks) if tool else _content_pieces(turn.nonce, chunks)
    finish = "tool_calls" if tool else "stop"
    call = {"id": f"call_mock{turn.seq}", "type": "function", "function": {"name": tool, "arguments": ""}}
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        if tool:
            call["function"]["arguments"] = "".join(pieces)  # type: ignore[index]
            message.update(content=None, tool_calls=[call])
        return {
            "id": f"chatcmpl-mock{turn.seq}",
            "object": "chat.completion",
            "created": turn.created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(prompt, len(pieces)),
            "system_fingerprint": "fp_mock",
        }
    base = {
        "id": f"chatcmpl-mock{turn.seq}",
        "object": "chat.completion.chunk",
        "created": turn.created,
        "model": model,
        "system_fingerprint": "fp_mock",
    }
    with_usage = _include_usage(body)
    # OpenAI sends "usage": null on every chunk once include_usage is asked for.
    extra = {"usage": None} if with_usage else {}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {**base, "choices": [choice], **extra}

    if tool:
        first = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}], "refusal": None}
        delta: dict[str, Any] = {"tool_calls": [{"index": 0, "function": {"arguments": _PIECE}}]}
    else:
        first, delta = {"role": "assistant", "content": "", "refusal": None}, {"content": _PIECE}
    tail = _sse(chunk({}, finish))
    if with_usage:
        tail += _sse({**base, "choices": [], "usage": _usage(prompt, len(pieces))})
    return Frames(_sse(chunk(first)), _fill(chunk(delta), pieces), tail + _DONE)


def _completion(turn: Turn) -> Reply:
    body, model = turn.body, _model(turn.body)
    prompt = body.get("prompt")
    items = prompt if isinstance(prompt, list) else [prompt]
    tokens = sum(
        _words(item) if isinstance(item, str) else len(item) if isinstance(item, list) else 1
        for item in items
    )
    pieces = _content_pieces(turn.nonce, turn.control.chunks)
    base = {
        "id": f"cmpl-mock{turn.seq}",
        "object": "text_completion",
        "created": turn.created,
        "model": model,
        "system_fingerprint": "fp_mock",
    }
    if not body.get("stream"):
        choice = {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}
        return {**base, "choices": [choice], "usage": _usage(tokens, len(pieces))}
    with_usage = _include_usage(body)
    extra = {"usage": None} if with_usage else {}

    def chunk(text: str, reason: str | None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            **extra,
        }

    tail = _sse(chunk("", "stop"))
    if with_usage:
        tail += _sse({**base, "choices": [], "usage": _usage(tokens, len(pieces))})
    return Frames(b"", _fill(chunk(_PIECE, None), pieces), tail + _DONE)


def _vector(text: str, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    return [round(v / 32767.5 - 1.0, 6) for v in struct.unpack(f"<{dimensions}H", raw)]


def _embedding(turn: Turn) -> Reply:
    body = turn.body
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _BadRequest("mock: 'input' must be a string, a list of strings or token lists")
    dimensions = body.get("dimensions") or 8
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
        raise _BadRequest("mock: 'dimensions' must be an integer in 1..4096")
    as_base64 = body.get("encoding_format") == "base64"
    data, tokens = [], 0
    for index, item in enumerate(value):
        text = item if isinstance(item, str) else " ".join(map(str, item))
        tokens += len(text.split())
        vector: Any = _vector(text, dimensions)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": _model(body, "mock-embed"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _models(turn: Turn) -> Reply:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}
            for name in _MODEL_IDS
        ],
    }


def _anthropic(turn: Turn) -> Reply:
    body, model = turn.body, _model(turn.body, "mock-claude")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest("mock: 'messages' must be a list")
    tokens = _words(body.get("system")) + sum(
        _words(m.get("content")) for m in messages if isinstance(m, dict)
    )
    pieces = _content_pieces(turn.nonce, turn.control.chunks)
    message = {
        "id": f"msg_mock{turn.seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": tokens, "output_tokens": len(pieces)},
    }
    if not body.get("stream"):
        return message
    opening = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": tokens, "output_tokens": 1},
    }
    head = (
        _sse({"type": "message_start", "message": opening}, "message_start")
        + _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        )
        + _sse({"type": "ping"}, "ping")
    )
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _PIECE}}
    tail = (
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        + _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
            "message_delta",
        )
        + _sse({"type": "message_stop"}, "message_stop")
    )
    return Frames(head, _fill(delta, pieces, "content_block_delta"), tail)


def _transcription(turn: Turn) -> Reply:
    return {"text": "echo: " + turn.nonce, "parts": turn.body["parts"]}


def _file(turn: Turn) -> Reply:
    parts = turn.body["parts"]
    named = next((part for part in parts if part["filename"] is not None), None)
    return {
        "id": f"file-mock{turn.seq}",
        "object": "file",
        "bytes": named["size"] if named else 0,
        "created_at": turn.created,
        "filename": named["filename"] if named else "",
        "purpose": turn.body["fields"].get("purpose", ""),
        "status": "processed",
        "parts": parts,
    }


_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error body for `status`."""
    kind, code = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body for `status`."""
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one route reads its request, names its nonce, replies and fails."""

    build: Callable[[Turn], Reply]
    nonce: Callable[[dict[str, Any]], str] = _last_user
    error: Callable[[int, str], dict[str, Any]] = openai_error
    multipart: bool = False


# --- the server ------------------------------------------------------------------------------------


class MockUpstream:
    """The mock provider: `async with MockUpstream() as mock:` then point a client at `mock.url + "/v1"`."""

    def __init__(self, *, record_limit: int = 100_000) -> None:
        self.requests: list[ReceivedRequest] = []
        self.cancellations: list[Cancellation] = []
        self._record_limit = record_limit
        self._by_path: dict[str, int] = {}
        self._dropped = 0
        self._cancelled_total = 0
        self._failures: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._url = ""
        self._stopping = False

    @property
    def url(self) -> str:
        """Base URL, `http://127.0.0.1:PORT`, without `/v1`."""
        if not self._url:
            raise RuntimeError("MockUpstream is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 picks a free port)."""
        app = web.Application(client_max_size=256 * 2**20)
        routes = (
            ("POST", "/v1/chat/completions", Endpoint(_chat)),
            ("POST", "/v1/completions", Endpoint(_completion, nonce=_prompt_nonce)),
            ("POST", "/v1/embeddings", Endpoint(_embedding, nonce=_prompt_nonce)),
            ("GET", "/v1/models", Endpoint(_models)),
            ("POST", "/v1/messages", Endpoint(_anthropic, error=anthropic_error)),
            ("POST", "/v1/audio/transcriptions", Endpoint(_transcription, _form_nonce, multipart=True)),
            ("POST", "/v1/files", Endpoint(_file, _form_nonce, multipart=True)),
        )
        for method, path, endpoint in routes:
            app.router.add_route(method, path, functools.partial(self._drive, endpoint=endpoint))
        app.router.add_get("/_mock/stats", self._stats_handler)
        app.router.add_post("/_mock/reset", self._reset_handler)
        app.router.add_route("*", "/v1/{tail:.*}", self._not_found)
        # handler_cancellation makes a client disconnect cancel the handler at once, which is what
        # lets us record a Cancellation within milliseconds; short shutdown so hung streams don't stall stop().
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self._runner, self._stopping = runner, False
        bound = runner.addresses[0]
        self._url = f"http://{bound[0] if ':' not in bound[0] else f'[{bound[0]}]'}:{bound[1]}"

    async def stop(self) -> None:
        """Close the listener and every open connection."""
        if self._runner is not None:
            self._stopping = True
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget recorded requests, cancellations, counters and fail-first state."""
        self.requests.clear()
        self.cancellations.clear()
        self._by_path.clear()
        self._failures.clear()
        self._dropped = self._cancelled_total = 0

    def stats(self) -> dict[str, Any]:
        """Counts since the last reset."""
        return {
            "requests": sum(self._by_path.values()),
            "by_path": dict(self._by_path),
            "recorded": len(self.requests),
            "dropped": self._dropped,
            "cancellations": self._cancelled_total,
        }

    def _record(self, request: web.Request, raw: bytes, received: float) -> None:
        path = request.path
        self._by_path[path] = self._by_path.get(path, 0) + 1
        if len(self.requests) < self._record_limit:
            self.requests.append(
                ReceivedRequest(request.method, path, request.query_string, request.headers, raw, received)
            )
        else:
            self._dropped += 1

    def _cancelled(self, path: str, nonce: str) -> None:
        if self._stopping:
            return
        self._cancelled_total += 1
        if len(self.cancellations) < self._record_limit:
            self.cancellations.append(Cancellation(path, nonce, time.monotonic()))

    def _injected_status(self, control: Control) -> int | None:
        if control.fail_first:
            seen = self._failures[control.fail_key] = self._failures.get(control.fail_key, 0) + 1
            return (control.status or 500) if seen <= control.fail_first else None
        return control.status

    async def _drive(self, request: web.Request, *, endpoint: Endpoint) -> web.StreamResponse:
        received = time.monotonic()
        raw = await request.read()
        self._record(request, raw, received)
        seq = next(self._seq)
        try:
            body = await _read_form(request.headers, raw) if endpoint.multipart else _read_json(raw)
            model = body.get("model")
            control = parse_control(request.headers, model if isinstance(model, str) else "")
            nonce = endpoint.nonce(body)
        except _BadRequest as exc:
            return _error_response(endpoint.error(400, str(exc)), 400, None)
        try:
            if control.delay_ms:
                await asyncio.sleep(control.delay_ms / 1000)
            status = self._injected_status(control)
            if status:
                message = f"mock: injected status {status}"
                return _error_response(endpoint.error(status, message), status, control.retry_after)
            try:
                reply = endpoint.build(Turn(body, control, seq, nonce, int(time.time())))
            except _BadRequest as exc:
                return _error_response(endpoint.error(400, str(exc)), 400, None)
            if isinstance(reply, Frames):
                return await self._stream(request, reply, control, nonce, seq)
            if control.echo:
                reply["mock_echo"] = {
                    "method": request.method,
                    "path": request.path,
                    "query": dict(request.query),
                    "headers": {str(k): v for k, v in request.headers.items()},
                    "body": raw.decode("utf-8", "replace"),
                }
            payload = _GARBAGE_JSON if control.garbage else orjson.dumps(reply)
            headers = {"x-request-id": f"req_mock{seq}"}
            if control.set_cookie:
                headers["Set-Cookie"] = control.set_cookie
            return web.Response(body=payload, content_type="application/json", headers=headers)
        except asyncio.CancelledError:
            self._cancelled(request.path, nonce)
            raise

    async def _stream(
        self, request: web.Request, frames: Frames, control: Control, nonce: str, seq: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": _SSE_TYPE, "Cache-Control": "no-cache", "x-request-id": f"req_mock{seq}"}
        )
        try:
            await response.prepare(request)
            if frames.head:
                await response.write(frames.head)
            if control.garbage:
                await response.write(_GARBAGE_SSE)
                return response
            for index in range(len(frames.body) + 1):
                if index == control.fail_after:
                    _reset_connection(request)
                    return response
                if index == control.hang_after:
                    await asyncio.Event().wait()  # until the client (or stop()) gives up
                if index == len(frames.body):
                    break
                gap = control.gap_before(index)
                if gap:
                    await asyncio.sleep(gap)
                await response.write(frames.body[index])
            await response.write(frames.tail)
        except ConnectionResetError:
            # The write noticed the disconnect before the handler was cancelled.
            self._cancelled(request.path, nonce)
        return response

    async def _not_found(self, request: web.Request) -> web.Response:
        self._record(request, await request.read(), time.monotonic())
        message = f"Invalid URL ({request.method} {request.path})"
        return _error_response(openai_error(404, message), 404, None)

    async def _stats_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _reset_handler(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=b'{"reset":true}', content_type="application/json")


def _error_response(body: dict[str, Any], status: int, retry_after: str | None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _reset_connection(request: web.Request) -> None:
    """Abort with a TCP RST (SO_LINGER 0) so the client sees a transport failure, not a clean end."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _serve(host: str, port: int, record_limit: int) -> None:
    mock = MockUpstream(record_limit=record_limit)
    await mock.start(host, port)
    print(mock.url, flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await mock.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the mock until SIGINT/SIGTERM, printing its URL."""
    parser = argparse.ArgumentParser(prog="python -m bench.mock_upstream", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--record-limit", type=int, default=0, help="requests kept for introspection")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args.host, args.port, args.record_limit))


if __name__ == "__main__":
    main()
