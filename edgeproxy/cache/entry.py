"""A cached response and its wire form: an orjson header line, then the body bytes as sent."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiocache.serializers import BaseSerializer

from ..exchange import Usage

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """What a client was sent, with the key and tenant it was written for (checked on every read)."""

    key: str
    tenant: str
    status: int
    content_type: str
    streamed: bool
    # The chunks exactly as the client received them, so a stream replays frame for frame.
    chunks: tuple[bytes, ...]
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    stored_at: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.total_tokens, self.cached_tokens)


class EntrySerializer(BaseSerializer):
    """aiocache serializer: bytes in, bytes out; anything unreadable reads as a missing entry.

    The body stays raw bytes after the header line (no base64, and a multibyte character split
    across stream chunks is never decoded); orjson escapes newlines, so the first one ends the header.
    """

    DEFAULT_ENCODING = None

    def dumps(self, value: CachedResponse) -> bytes:  # type: ignore[override]
        header = {
            "v": FORMAT_VERSION,
            "key": value.key,
            "tenant": value.tenant,
            "status": value.status,
            "content_type": value.content_type,
            "streamed": value.streamed,
            "chunks": [len(chunk) for chunk in value.chunks],
            "model": value.model,
            "usage": [value.prompt_tokens, value.completion_tokens, value.total_tokens, value.cached_tokens],
            "stored_at": value.stored_at,
        }
        return orjson.dumps(header) + b"\n" + value.body

    def loads(self, value: bytes | None) -> CachedResponse | None:  # type: ignore[override]
        if value is None:
            return None
        head, newline, body = bytes(value).partition(b"\n")
        try:
            header = orjson.loads(head) if newline else None
            if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION:
                return None
            lengths = header["chunks"]
            if sum(lengths) != len(body):
                return None
            chunks, offset = [], 0
            for length in lengths:
                chunks.append(body[offset : offset + length])
                offset += length
            prompt, completion, total, cached = header["usage"]
            return CachedResponse(
                key=str(header["key"]),
                tenant=str(header["tenant"]),
                status=int(header["status"]),
                content_type=str(header["content_type"]),
                streamed=bool(header["streamed"]),
                chunks=tuple(chunks),
                model=str(header["model"]),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=total,
                cached_tokens=cached,
                stored_at=float(header["stored_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
