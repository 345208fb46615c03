"""Redis for tests: unique key prefixes on the shared server, and private servers a test may stop.

The shared server (127.0.0.1:6379, `make services`) is never stopped by a test; a test that
needs Redis to die and come back starts its own `redis-server` on a free port.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

SHARED_URL = "redis://127.0.0.1:6379/0"


def unique_prefix(label: str) -> str:
    return f"edgeproxy-test:{label}:{uuid.uuid4().hex[:10]}:"


async def scrub(prefix: str, url: str = SHARED_URL) -> None:
    """Delete every key under `prefix`."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port: `await start()`, `await stop()` (SIGKILL), `start()` again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 5.0) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make services)"
        self.process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self._workdir),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not await self.ping():
            assert self.process.returncode is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in time"
            await asyncio.sleep(0.02)

    async def ping(self) -> bool:
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            return bool(await client.ping())
        except (OSError, RedisError):
            return False
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), timeout=5)
        self.process = None
