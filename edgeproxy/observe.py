"""The outermost stage: every outcome is timed, rendered, counted and logged, in one `finally`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import orjson
from aiohttp import web

from .completion import assemble_stream
from .errors import GatewayError
from .exchange import Exchange
from .logs.record import LogRecord, cap_body
from .metric_labels import endpoint_of
from .metrics import Metrics
from .pipeline import Handler
from .pricing import PriceTable

log = logging.getLogger("edgeproxy.observe")

# Request parameters worth keeping as columns of their own in the log (the body has the rest).
LOGGED_PARAMS = frozenset({
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "n",
    "seed",
    "response_format",
    "tool_choice",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "user",
})
_OUTCOME_BY_STATUS = {401: "unauthorized", 403: "forbidden", 413: "rejected", 429: "rate_limited"}


class RecordSink(Protocol):
    def submit(self, record: LogRecord) -> bool: ...


class Observe:
    """Renders GatewayErrors, survives anything else, and records every request exactly once."""

    def __init__(self, sink: RecordSink | None, prices: PriceTable, metrics: Metrics, body_max_bytes: int) -> None:
        self._sink = sink
        self._prices = prices
        self._metrics = metrics
        self._body_max_bytes = body_max_bytes

    async def __call__(self, ex: Exchange, call_next: Handler) -> web.StreamResponse:
        self._metrics.request_started()
        try:
            response = await call_next(ex)
            if not ex.status:
                ex.status = response.status
            return response
        except GatewayError as err:
            return self._refuse(ex, err)
        except asyncio.CancelledError:
            ex.outcome = "cancelled"
            ex.error = ex.error or "client disconnected"
            raise
        except Exception as exc:  # the gateway answers, whatever broke inside it
            log.exception("request %s failed inside the gateway", ex.request_id)
            ex.error = f"internal error: {type(exc).__name__}"
            return self._refuse(ex, GatewayError(500, "Internal gateway error", type="gateway_error"))
        finally:
            self._finish(ex)

    def _refuse(self, ex: Exchange, err: GatewayError) -> web.Response:
        ex.status = err.status
        ex.error = ex.error or err.message
        if ex.outcome == "ok":
            if err.type == "upstream_error":
                ex.outcome = "upstream_error"
            else:
                ex.outcome = _OUTCOME_BY_STATUS.get(err.status, "rejected" if err.status < 500 else "gateway_error")
        response = err.response()
        response.headers.update(ex.response_headers)
        response.headers["Helicone-Id"] = ex.request_id
        return response

    def _finish(self, ex: Exchange) -> None:
        if ex.outcome == "cancelled" and not ex.status:
            ex.status = 499  # nginx's "client closed request": the client left before an answer
        try:
            record = self.build_record(ex)
            if self._sink is not None:
                self._sink.submit(record)
            self._count(ex, record)
        except Exception:
            log.exception("could not record request %s", ex.request_id)
        finally:
            self._metrics.request_finished()

    def _count(self, ex: Exchange, record: LogRecord) -> None:
        seconds = 0.001
        self._metrics.observe_request(
            target=record.target,
            model=record.model,
            endpoint=endpoint_of(record.path),
            status=record.status,
            cache=record.cache,
            outcome=record.outcome,
            duration_s=record.latency_ms * seconds,
            ttfb_s=None if record.ttfb_ms is None else record.ttfb_ms * seconds,
            upstream_s=None if record.upstream_ms is None else record.upstream_ms * seconds,
            overhead_s=None if record.gateway_ms is None else record.gateway_ms * seconds,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cached_tokens=ex.usage.cached_tokens,
            cost_usd=record.cost_usd,
            cost_saved_usd=record.cost_saved_usd,
        )

    def build_record(self, ex: Exchange) -> LogRecord:
        now = time.perf_counter()
        options = ex.options
        document = ex.json() if ex.body else None
        usage = ex.usage
        cost = None
        if usage.prompt_tokens is not None and ex.cache_status != "HIT":
            cost = self._prices.cost_usd(
                ex.model, usage.prompt_tokens, usage.completion_tokens or 0, usage.cached_tokens
            )
        elif ex.cache_status == "HIT":
            cost = 0.0
        # Bodies only matter to the log: without one, skip decoding and assembling them.
        keep_bodies = self._sink is not None
        request_body, request_truncated = (None, False)
        if keep_bodies and not options.omit_request and ex.body:
            request_body, request_truncated = cap_body(ex.body, self._body_max_bytes)
        response_body, response_truncated = (None, False)
        if keep_bodies and not options.omit_response and (ex.capture.chunks or ex.capture.truncated):
            raw = ex.capture.body()
            if ex.streamed and not ex.capture.truncated:
                raw = orjson.dumps(assemble_stream(raw))
            response_body, response_truncated = cap_body(raw, self._body_max_bytes)
            response_truncated = response_truncated or ex.capture.truncated
        upstream_ms = None
        if ex.upstream_sent is not None:
            upstream_ms = ((ex.upstream_done or now) - ex.upstream_sent) * 1000.0
        ttfb = ex.client_first_byte or ex.upstream_first_byte
        return LogRecord(
            request_id=ex.request_id,
            started_at=ex.started_at,
            latency_ms=(now - ex.started) * 1000.0,
            ttfb_ms=None if ttfb is None else (ttfb - ex.started) * 1000.0,
            upstream_ms=upstream_ms,
            gateway_ms=ex.gateway_ms(),
            status=ex.status,
            method=ex.request.method,
            path=ex.route.path or ex.request.path[:256],
            target=ex.route.target.name,
            model=ex.model,
            user_id=ex.identity.user_id or options.user_id,
            app_id=ex.identity.app_id,
            key_id=ex.identity.key_id,
            properties=dict(options.properties),
            session_id=options.session_id,
            session_path=options.session_path,
            session_name=options.session_name,
            params={k: v for k, v in document.items() if k in LOGGED_PARAMS} if document else {},
            request_body=request_body,
            request_truncated=request_truncated,
            response_body=response_body,
            response_truncated=response_truncated,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost_usd=cost,
            cost_saved_usd=ex.cost_saved_usd,
            reserved_usd=ex.reserved_usd,
            cache=ex.cache_status,
            attempts=ex.attempts,
            answered_by=ex.answered_by,
            error=ex.error,
            outcome=ex.outcome,
        )
