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
from .logs.record import NO_PROPERTIES, Row, cap_body, datetime64_ms, params_json
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


class RowSink(Protocol):
    def submit(self, row: Row) -> bool: ...


class Observe:
    """Renders GatewayErrors, survives anything else, and records every request exactly once."""

    def __init__(self, sink: RowSink | None, prices: PriceTable, metrics: Metrics, body_max_bytes: int) -> None:
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
            # Without a log, no row: the metrics read the exchange (a row costs the loop ~10 µs under load).
            if self._sink is not None:
                self._sink.submit(self.build_row(ex, now, cost))
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

    def build_row(self, ex: Exchange, now: float, cost: float | None) -> Row:
        """The request's log row: a plain tuple in `COLUMNS` order (logs/record.py says why not a LogRecord)."""
        options = ex.options
        body = ex.body
        request_body, request_truncated = (None, False)
        if body and not options.omit_request:
            request_body, request_truncated = cap_body(body, self._body_max_bytes)
        response_body, response_truncated = (None, False)
        capture = ex.capture
        if not options.omit_response and (capture.chunks or capture.truncated):
            raw = capture.body()
            if ex.streamed and not capture.truncated:
                raw = orjson.dumps(assemble_stream(raw))
            response_body, response_truncated = cap_body(raw, self._body_max_bytes)
            response_truncated = response_truncated or capture.truncated
        document = ex.json() if body else None
        ttfb = ex.first_byte_seconds()
        upstream = ex.upstream_seconds(now)
        gateway = ex.gateway_seconds()
        identity = ex.identity
        usage = ex.usage
        return (
            ex.request_id,
            datetime64_ms(ex.started_at),
            (now - ex.started) * 1000.0,  # latency_ms
            None if ttfb is None else ttfb * 1000.0,
            None if upstream is None else upstream * 1000.0,
            None if gateway is None else gateway * 1000.0,
            ex.status,
            ex.request.method,
            ex.logged_path,
            ex.route.target.name,
            ex.model,
            identity.user_id or options.user_id,
            identity.app_id,
            identity.key_id,
            dict(options.properties) if options.properties else NO_PROPERTIES,
            options.session_id,
            options.session_path,
            options.session_name,
            params_json({k: v for k, v in document.items() if k in LOGGED_PARAMS} if document else None),
            request_body,
            request_truncated,
            response_body,
            response_truncated,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            cost,  # cost_usd
            ex.cost_saved_usd,
            ex.reserved_usd,
            ex.cache_status,  # cache
            ex.attempts,
            ex.answered_by,
            ex.error,
            ex.outcome,
        )
