"""Upstream: one keep-alive pool per target, attempts with retries and fallbacks, the relay back."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from .completion import ask_for_usage, read_usage
from .errors import GatewayError
from .exchange import Exchange
from .metrics import Metrics
from .options import RetryPolicy
from .routing import DeploymentState, Route, Router
from .settings import Settings, TargetSettings
from .streaming import error_event, relay, send_eof, send_whole, within_stall
from .targets import client_headers, upstream_headers, upstream_url

log = logging.getLogger("edgeproxy.upstream")

# Milliseconds the gateway itself added to this response (upstream time excluded).
OVERHEAD_HEADER = "Edgeproxy-Overhead-Ms"
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)


class Upstreams:
    """A pooled aiohttp session per configured target, plus one for allowlisted ad-hoc URLs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, target: TargetSettings) -> aiohttp.ClientSession:
        key = target.name if target.name in self._settings.targets else "<ad-hoc>"
        session = self._sessions.get(key)
        if session is None or session.closed:
            pool, timeouts = self._settings.pool, self._settings.timeouts
            connector = aiohttp.TCPConnector(
                limit=pool.max_connections,
                limit_per_host=pool.max_per_host,
                keepalive_timeout=pool.keepalive_seconds,
                ttl_dns_cache=300,
            )
            timeout = aiohttp.ClientTimeout(
                total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.idle
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                # Every tenant shares this session: a cookie one upstream reply set must never ride
                # along on another's request. Set-Cookie still reaches the client that got the reply.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[key] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def backoff_seconds(policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff between min and max, never shorter than Retry-After."""
    ceiling = min(policy.max_timeout_ms, policy.min_timeout_ms * policy.factor**attempt) / 1000.0
    delay = random.uniform(min(policy.min_timeout_ms / 1000.0, ceiling), ceiling)
    return max(delay, retry_after or 0.0)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from LLM providers; fall back to our own backoff


@dataclass(slots=True)
class Candidate:
    """One place to send the request: a target, a model override, and its routing state."""

    target: TargetSettings
    model: str | None = None
    route: Route | None = None
    deployment: DeploymentState | None = None

    @property
    def name(self) -> str:
        return f"{self.target.name}/{self.model}" if self.model else self.target.name


@dataclass(slots=True)
class NextAttempt:
    """Whether another attempt follows a failed one, decided once its Retry-After is known.

    A retry of the same candidate must fit before the total deadline; when it does not (or the
    retries are spent) the next candidate is tried at once, and when there is none the failed
    attempt's own answer (the provider's 429 with its Retry-After, or the timeout) is the reply.
    """

    policy: RetryPolicy | None
    attempt: int
    tries: int
    deadline: float
    more_candidates: bool
    wait: float | None = None  # seconds before retrying this candidate; None: move on

    def follows(self, retry_after: float | None) -> bool:
        if self.policy is not None and self.attempt < self.tries - 1:
            delay = backoff_seconds(self.policy, self.attempt, retry_after)
            if time.monotonic() + delay <= self.deadline:
                self.wait = delay
                return True
        return self.more_candidates


class Forwarder:
    """The last stage: send the request upstream, retrying and falling back, and relay the answer.

    Candidates are the routed deployments (healthy ones, best first) or the path's target, then
    the `Helicone-Fallbacks`; each gets the retry policy's attempts, and the next candidate is
    tried at once. Nothing is retried once the client has received a byte.
    """

    def __init__(self, settings: Settings, upstreams: Upstreams, router: Router, metrics: Metrics) -> None:
        self._settings = settings
        self._upstreams = upstreams
        self._router = router
        self._metrics = metrics

    async def __call__(self, ex: Exchange) -> web.StreamResponse:
        ask_for_usage(ex)
        candidates = self._candidates(ex)
        policy = ex.options.retry
        tries = 1 + (policy.retries if policy else 0)
        deadline = time.monotonic() + self._settings.timeouts.total
        for index, candidate in enumerate(candidates):
            body = ex.body if candidate.model is None else _with_model(ex, candidate.model)
            for attempt in range(tries):
                ex.attempts += 1
                if ex.attempts > 1:
                    self._metrics.retried(candidate.target.name)
                ex.answered_by = candidate.name
                after = NextAttempt(policy, attempt, tries, deadline, index < len(candidates) - 1)
                response = await self._attempt(ex, candidate, body, after)
                if response is not None:
                    return response
                if after.wait is None:
                    break  # next candidate, at once: it is another provider
                await asyncio.sleep(after.wait)
        raise GatewayError(502, "No upstream attempt succeeded", type="upstream_error", code="upstream_failed")

    async def _attempt(
        self, ex: Exchange, candidate: Candidate, body: bytes, after: NextAttempt
    ) -> web.StreamResponse | None:
        """One attempt: the relayed response, or None after a retryable failure another attempt follows."""
        if candidate.route and candidate.deployment:
            candidate.route.started(candidate.deployment)
        ok, latency = False, None
        try:
            try:
                response = await self._send(ex, candidate.target, body, candidate.model)
            except GatewayError as err:
                self._metrics.upstream_failed(candidate.target.name, err.code or "error")
                if not after.follows(None):
                    raise
                log.info("attempt %d to %s failed: %s", ex.attempts, candidate.name, err.message)
                return None
            latency = (ex.upstream_first_byte or 0.0) - (ex.upstream_sent or 0.0)
            ok = response.status not in RETRYABLE_STATUS
            if ok or not after.follows(parse_retry_after(response.headers.get("Retry-After"))):
                return await self._respond(ex, response)
            await _discard(response)
            log.info("attempt %d to %s answered %d", ex.attempts, candidate.name, response.status)
            return None
        finally:
            if candidate.route and candidate.deployment:
                candidate.route.finished(candidate.deployment, ok, latency)
                self._metrics.set_circuit_state(candidate.deployment.name, candidate.deployment.circuit.value)

    def _candidates(self, ex: Exchange) -> list[Candidate]:
        targets = self._settings.targets
        # The model (a parse of the body) is read only when routes could apply.
        routed = bool(self._router.routes) and not ex.route.ad_hoc and ex.route.target.name == self._settings.default_target
        route = self._router.route_for(ex.model) if routed else None
        if route is None:
            candidates = [Candidate(ex.route.target)]
        else:
            plan = route.plan()
            candidates = [Candidate(targets[s.deployment.target], s.deployment.model, route, s) for s in plan]
            if not candidates and not ex.options.fallbacks:
                raise GatewayError(
                    503,
                    f"Every deployment of {route.alias!r} is ejected after failures; retry shortly",
                    type="upstream_error",
                    code="no_healthy_deployment",
                )
        for fallback in ex.options.fallbacks:
            target = targets.get(fallback.target)
            if target is None:
                raise GatewayError(
                    400, f"Helicone-Fallbacks names unknown target {fallback.target!r}", param="Helicone-Fallbacks"
                )
            candidates.append(Candidate(target, fallback.model))
        return candidates

    async def _send(
        self, ex: Exchange, target: TargetSettings, body: bytes, model: str | None
    ) -> aiohttp.ClientResponse:
        request = ex.request
        if model is None and target.kind == "azure":
            model = ex.model  # only Azure's URL names the model: no other target needs the body parsed here
        url = upstream_url(target, ex.route.path, request.query_string, model or "")
        headers = upstream_headers(target, request.headers)
        session = self._upstreams.session(target)
        ex.upstream_sent = time.perf_counter()
        timeouts = self._settings.timeouts
        sending = session.request(request.method, url, data=body or None, headers=headers, allow_redirects=False)
        try:
            # Once the request is sent, aiohttp's sock_read (= idle) bounds the wait for the head; a
            # timer of our own (asyncio.timeout: 7.7 µs a request on a slow CPU) only for a shorter first_byte.
            if timeouts.first_byte < timeouts.idle:
                async with asyncio.timeout(timeouts.first_byte):
                    response = await sending
            else:
                response = await sending
        except TimeoutError:
            raise GatewayError(
                504,
                # The shorter limit ended the wait (both are positive: settings_loader).
                f"Upstream {target.name} sent no response within {min(timeouts.first_byte, timeouts.idle):g}s",
                type="upstream_error",
                code="upstream_timeout",
            ) from None
        except _CONNECTION_ERRORS as exc:
            raise GatewayError(
                502,
                f"Upstream {target.name} unreachable: {type(exc).__name__}",
                type="upstream_error",
                code="upstream_unreachable",
            ) from None
        ex.upstream_first_byte = time.perf_counter()
        return response

    async def _respond(self, ex: Exchange, response: aiohttp.ClientResponse) -> web.StreamResponse:
        ex.status = response.status
        headers = client_headers(response.headers)
        headers.update(ex.response_headers)
        try:
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._relay_stream(ex, response, headers)
            try:
                body = await response.read()
            except (TimeoutError, *_CONNECTION_ERRORS) as exc:
                raise GatewayError(
                    502, f"Upstream response broke off: {type(exc).__name__}", type="upstream_error"
                ) from None
            ex.upstream_done = time.perf_counter()
            if ex.response_filter is not None:
                body = ex.response_filter.whole(body)
            ex.capture.add(body)
            if ex.status >= 400:
                ex.outcome = "upstream_error"
            whole = web.Response(status=response.status, body=body, headers=headers)
            try:
                return await self._send_whole(ex, whole, self._settings.timeouts.idle)
            finally:
                # Once the answer is on its way, so the client does not wait for it; in a `finally`,
                # so a client gone mid-send is still charged for what the upstream answered.
                ex.usage = read_usage(ex, body)
        finally:
            # A body not read to the end closes the connection instead of pooling it (no stale reply
            # can reach the next request), which is also what a cancelled client leaves behind.
            response.release()

    async def _relay_stream(
        self, ex: Exchange, response: aiohttp.ClientResponse, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        ex.streamed = True
        client = web.StreamResponse(status=response.status, headers=headers)
        client.headers[OVERHEAD_HEADER] = _overhead_ms(ex, ex.upstream_first_byte)
        await client.prepare(ex.request)
        stall = self._settings.timeouts.idle
        try:
            # One setting bounds both a client that accepts nothing and an upstream that sends nothing.
            ex.usage_tail = await relay(ex, response, client, stall_seconds=stall, idle_seconds=stall)
        except (TimeoutError, *_CONNECTION_ERRORS) as exc:
            transport = ex.request.transport
            if transport is None or transport.is_closing():
                ex.outcome = "cancelled"
                ex.error = ex.error or "client disconnected mid-stream"
                response.close()
                return client
            response.close()
            ex.outcome = "upstream_error"
            timed_out = isinstance(exc, TimeoutError)
            ex.error = "upstream stream idle timeout" if timed_out else f"upstream stream broke: {type(exc).__name__}"
            code = "upstream_timeout" if timed_out else "upstream_stream_error"
            try:
                await within_stall(ex, client.write(error_event(ex.error, code)), stall)
            except (ConnectionError, RuntimeError):
                pass
        ex.upstream_done = time.perf_counter()
        ex.usage = read_usage(ex, None)
        if ex.status >= 400 and ex.outcome == "ok":
            ex.outcome = "upstream_error"
        try:
            await send_eof(ex, client, stall)
        except ConnectionError:
            ex.outcome = "cancelled"
        return client

    @staticmethod
    async def _send_whole(ex: Exchange, client: web.Response, stall_seconds: float) -> web.Response:
        """Send now, so the stages after this one (cache, limits, log) cost the client nothing."""
        client.headers[OVERHEAD_HEADER] = _overhead_ms(ex, ex.upstream_done)
        return await send_whole(ex, client, stall_seconds)


def _overhead_ms(ex: Exchange, upstream_ready: float | None) -> str:
    """The gateway's own time so far: before the upstream call, and since the upstream answered."""
    added = (ex.upstream_sent or ex.started) - ex.started
    if upstream_ready is not None:
        added += time.perf_counter() - upstream_ready
    return f"{added * 1000.0:.3f}"


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read a small error body so the connection can go back to the pool, then release it."""
    try:
        await asyncio.wait_for(response.read(), timeout=5)
    except (TimeoutError, *_CONNECTION_ERRORS):
        response.close()
    finally:
        response.release()


def _with_model(ex: Exchange, model: str) -> bytes:
    document = ex.json()
    if document is None:
        return ex.body
    return orjson.dumps({**document, "model": model})
