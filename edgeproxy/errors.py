"""One error type for everything the gateway refuses; rendered in the provider's JSON shape."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


class GatewayError(Exception):
    """An error the gateway answers itself, as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=self.headers
        )


def bad_header(name: str, expected: str, value: str) -> GatewayError:
    """A 400 that names the header, what it expects and what it got."""
    shown = value if len(value) <= 80 else value[:77] + "..."
    return GatewayError(
        400,
        f"Invalid value for header {name}: expected {expected}, got {shown!r}",
        param=name,
        code="invalid_header",
    )
