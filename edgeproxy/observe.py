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
            now = time.perf_counter()
            cost = self._cost(ex)
            # Without a log, no record: the metrics read the exchange (a record cost ~30 µs a request).
            if self._sink is not None:
                self._sink.submit(self.build_record(ex, now, cost))
            self._count(ex, now, cost)
        except Exception:
            log.exception("could not record request %s", ex.request_id)
        finally:
            self._metrics.request_finished()

    def _cost(self, ex: Exchange) -> float | None:
        """List price of the request, 0 for a cache hit, None when unknown (no usage, or no price)."""
        if ex.cache_status == "HIT":
            return 0.0
        usage = ex.usage
        if usage.prompt_tokens is None:
            return None
        return self._prices.cost_usd(ex.model, usage.prompt_tokens, usage.completion_tokens or 0, usage.cached_tokens)

    def _count(self, ex: Exchange, now: float, cost: float | None) -> None:
        usage = ex.usage
        self._metrics.observe_request(
            target=ex.route.target.name,
            model=ex.model,
            endpoint=endpoint_of(ex.logged_path),
            status=ex.status,
            cache=ex.cache_status,
            outcome=ex.outcome,
            duration_s=now - ex.started,
            ttfb_s=ex.first_byte_seconds(),
            upstream_s=ex.upstream_seconds(now),
            overhead_s=ex.gateway_seconds(),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cost_usd=cost,
            cost_saved_usd=ex.cost_saved_usd,
        )

    def build_record(self, ex: Exchange, now: float, cost: float | None) -> LogRecord:
        options = ex.options
        document = ex.json() if ex.body else None
        usage = ex.usage
        request_body, request_truncated = (None, False)
        if not options.omit_request and ex.body:
            request_body, request_truncated = cap_body(ex.body, self._body_max_bytes)
        response_body, response_truncated = (None, False)
        if not options.omit_response and (ex.capture.chunks or ex.capture.truncated):
            raw = ex.capture.body()
            if ex.streamed and not ex.capture.truncated:
                raw = orjson.dumps(assemble_stream(raw))
            response_body, response_truncated = cap_body(raw, self._body_max_bytes)
            response_truncated = response_truncated or ex.capture.truncated
        ttfb = ex.first_byte_seconds()
        upstream = ex.upstream_seconds(now)
        gateway = ex.gateway_seconds()
        return LogRecord(
            request_id=ex.request_id,
            started_at=ex.started_at,
            latency_ms=(now - ex.started) * 1000.0,
            ttfb_ms=None if ttfb is None else ttfb * 1000.0,
            upstream_ms=None if upstream is None else upstream * 1000.0,
            gateway_ms=None if gateway is None else gateway * 1000.0,
            status=ex.status,
            method=ex.request.method,
            path=ex.logged_path,
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
