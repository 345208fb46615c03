"""Known traffic for the observability tests: real requests through a real gateway into its log.

Shared by test_admin_api, test_usage_cli, test_admin_page and test_dashboards: apps and users
come from gateway keys, properties from `Helicone-Property-Env`, a cache hit from sending one
question twice, a failure from the mock's `mock-error-500`, and one prompt carries markup that
must stay text wherever it is shown.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from edgeproxy.app import create_app
from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.settings import AuthSettings
from edgeproxy.settings_loader import load_settings
from tests.conftest import RunningGateway, wait_until

SECRET = "observability-tests-secret-" + "x" * 32
ADMIN_KEY = "admin-" + "k" * 26
CONFIG = f'[auth]\njwt_secret = "{SECRET}"\n'
# Flush fast so rows land within a test's patience.
LOG_ENV = {"EDGEPROXY_LOGS_FLUSH_SECONDS": "0.05"}
# The price table's made-up price of `mock-*`, USD per million tokens.
MOCK_INPUT, MOCK_OUTPUT = 1.0, 2.0
TEMPERATURE = 0.25
MARKUP = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


@dataclass(frozen=True)
class Call:
    app: str
    user: str
    model: str
    env: str | None
    prompt: str
    cache: bool = False


@dataclass(frozen=True)
class Sent:
    """One request sent and what its log row must say."""

    call: Call
    request_id: str
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cache: str

    @property
    def cost(self) -> float | None:
        if self.prompt_tokens is None:
            return None
        if self.cache == "HIT":
            return 0.0
        return (self.prompt_tokens * MOCK_INPUT + (self.completion_tokens or 0) * MOCK_OUTPUT) / 1e6


CALLS: tuple[Call, ...] = (
    Call("billing", "alice", "mock-gpt", "prod", "hello from alice one"),
    Call("billing", "alice", "mock-fast", "dev", "hello from alice two words more"),
    Call("billing", "bob", "mock-gpt", "prod", "bob asks something"),
    Call("search", "carol", "mock-gpt", "prod", "carol asks a cached question", cache=True),
    Call("search", "carol", "mock-gpt", "prod", "carol asks a cached question", cache=True),
    Call("billing", "bob", "mock-error-500", None, "this one fails"),
    Call("", "", "mock-gpt", None, "anonymous " + MARKUP),
)


def gateway_key(app: str, user: str) -> str:
    return KeyIssuer(AuthSettings(jwt_secret=SECRET)).issue(KeyGrant(app=app, user=user or None))[0]


async def send_traffic(base_url: str, calls: Sequence[Call] = CALLS) -> list[Sent]:
    """Send `calls` one after another (so start times are ordered) and note what each got."""
    keys = {(c.app, c.user): gateway_key(c.app, c.user) for c in calls if c.app}
    sent = []
    async with aiohttp.ClientSession() as session:
        for call in calls:
            headers = {"Authorization": "Bearer sk-placeholder"}
            if call.app:
                headers["Helicone-Auth"] = f"Bearer {keys[call.app, call.user]}"
            if call.env:
                headers["Helicone-Property-Env"] = call.env
            if call.cache:
                headers["Helicone-Cache-Enabled"] = "true"
            body = {"model": call.model, "messages": [{"role": "user", "content": call.prompt}], "temperature": TEMPERATURE}
            async with session.post(f"{base_url}/v1/chat/completions", json=body, headers=headers) as response:
                reply = await response.json()
                usage = reply.get("usage") or {}
                sent.append(
                    Sent(
                        call,
                        response.headers["Helicone-Id"],
                        response.status,
                        usage.get("prompt_tokens"),
                        usage.get("completion_tokens"),
                        response.headers.get("Helicone-Cache", ""),
                    )
                )
            # The log keeps start times to the millisecond: two requests within one would tie,
            # and "newest first" could not tell them apart (a cache hit takes well under 1 ms).
            await asyncio.sleep(0.002)
    return sent


async def wait_for_rows(base_url: str, count: int, admin_key: str | None = None, timeout: float = 15.0) -> None:
    """Poll the admin API until the log holds `count` requests."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def enough() -> bool:
            async with session.get(f"{base_url}/admin/v1/requests", params={"limit": "500"}) as response:
                return response.status == 200 and len((await response.json())["data"]) >= count

        await wait_until(enough, timeout=timeout, interval=0.05)


@asynccontextmanager
async def serve_gateway(
    upstream: str, data_dir: Path, env: Mapping[str, str], config: str = CONFIG
) -> AsyncIterator[RunningGateway]:
    """A gateway built as the conftest's `start_gateway` builds one, for fixtures wider than a test."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / f"edgeproxy-{uuid.uuid4().hex[:8]}.toml"
    config_file.write_text(config)
    settings = load_settings(config_file, env={**LOG_ENV, **env}, flags={"upstream": upstream, "data_dir": str(data_dir)})
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield RunningGateway(settings, app, runner, f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()


def now_ms() -> int:
    return int(time.time() * 1000)
