"""IdleWatch: one timer per relayed stream for the upstream's idle limit, not one per chunk."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from edgeproxy.streaming import IdleWatch

from .conftest import GatewayFactory

STREAM = {"model": "mock-model-chunks-30-gap-3", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


class _Content:
    """Stands in for the upstream's StreamReader: records the exception that ends its reads."""

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.exception = exc


async def test_a_stream_of_paced_chunks_arms_the_read_timer_a_few_times_not_per_chunk(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start_gateway()
    loop = asyncio.get_running_loop()
    armed: list[str] = []
    call_later = loop.call_later

    def counting(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        armed.append(getattr(callback, "__qualname__", repr(callback)))
        return call_later(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", counting)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/v1/chat/completions", json=STREAM) as response,
    ):
        body = await response.read()
    assert response.status == 200 and body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") >= 32
    # aiohttp's own sock_read timer is armed for the request and the head, then left to IdleWatch;
    # re-armed on every read, it was ~30 here (chunks 3 ms apart arrive in reads of their own).
    assert armed.count("ResponseHandler._on_read_timeout") <= 3, armed
    assert armed.count("IdleWatch._check") >= 1


async def test_the_watch_rearms_while_reads_come_and_times_out_after_idle_seconds() -> None:
    content = _Content()
    watch = IdleWatch(SimpleNamespace(content=content, connection=None), 0.1)  # type: ignore[arg-type]
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.35:  # reads every 40 ms: more than three idle limits in all
            watch.touch()
            await asyncio.sleep(0.04)
        assert content.exception is None
        quiet = time.monotonic()
        deadline = quiet + 2.0
        while content.exception is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert isinstance(content.exception, TimeoutError)  # what the relay turns into its idle error
        assert 0.05 <= time.monotonic() - quiet < 0.5
    finally:
        watch.cancel()


async def test_a_cancelled_watch_never_fires() -> None:
    content = _Content()
    watch = IdleWatch(SimpleNamespace(content=content, connection=None), 0.02)  # type: ignore[arg-type]
    watch.cancel()
    await asyncio.sleep(0.1)
    assert content.exception is None
