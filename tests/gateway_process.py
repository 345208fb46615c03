"""`python -m edgeproxy serve` as a test's subprocess, a load to run through it, and its log read back.

Everything here waits with `await`, never by blocking: the mock provider usually runs on the
test's own event loop, and a blocked loop would stall the gateway's upstream calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on now (the gateway binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """One `edgeproxy serve` subprocess over `data_dir`; output goes to `<data_dir>.log`."""

    def __init__(self, data_dir: Path, upstream: str, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.upstream = upstream
        self.workers = workers
        self.env = env or {}
        self.port = 0
        self.log_path = data_dir.with_name(data_dir.name + ".log")
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        """Start on a free port and wait until it answers `/readyz`."""
        self.port = free_port()
        command = [
            "-m", "edgeproxy", "serve",
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--upstream", self.upstream,
            "--workers", str(self.workers),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    async with session.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway not ready within {timeout}s:\n{self.output()}")
                await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the process has exited."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"gateway still running after {timeout}s:\n{self.output()}") from None

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; a gateway that outlives `timeout` is killed and the test fails."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        finally:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL, if still running."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


@dataclass
class Load:
    """Concurrent chat requests, every third one streamed, each with its own Helicone-Request-Id.

    `answered` maps the id of every request whose whole response arrived to the monotonic time it
    did; requests that failed (connection refused, reset, cut-off stream) count in `failed`.
    """

    url: str
    concurrency: int = 16
    answered: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until_answered(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answered) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.answered)} of {count} answered ({self.failed} failed)")
            await asyncio.sleep(0.01)

    async def run_for(self, seconds: float) -> None:
        """Keep the load going `seconds` longer (a phase of a fault test), failing if nothing gets answered."""
        answered = len(self.answered)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.answered) > answered, f"no request answered in {seconds}s ({self.failed} failed)"

    async def _worker(self, index: int) -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(1_000_000):
                if self._stop.is_set():
                    return
                request_id = str(uuid.uuid4())
                stream = (index + n) % 3 == 0
                body = {"model": "mock-model", "messages": [{"role": "user", "content": f"load {request_id}"}]}
                if stream:
                    body["stream"] = True
                try:
                    async with session.post(
                        f"{self.url}/v1/chat/completions",
                        data=orjson.dumps(body),
                        headers={"Content-Type": "application/json", "Helicone-Request-Id": request_id},
                    ) as response:
                        data = await response.read()
                    whole = response.status == 200 and (not stream or data.endswith(b"data: [DONE]\n\n"))
                except (aiohttp.ClientError, OSError):
                    whole = False
                if whole:
                    self.answered[request_id] = time.monotonic()
                else:
                    self.failed += 1
                    await asyncio.sleep(0.005)


_COUNT_ROWS = """
import sys, clickhouse_connect, orjson
folder, table = sys.argv[1], sys.argv[2]
client = clickhouse_connect.get_client(dsn=f"chdb://{folder}")
rows = client.query(f"SELECT toString(request_id), count() FROM {table} GROUP BY 1").result_rows
sys.stdout.write(orjson.dumps(dict(rows)).decode())
"""


async def rows_in_folder(folder: Path, table: str = "edgeproxy.requests") -> dict[str, int]:
    """Request id → stored copies (no FINAL: a duplicate shows), read from an embedded folder in a subprocess.

    A subprocess, because this process may hold another chDB folder and a process opens only one.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _COUNT_ROWS, str(folder), table, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    counts: dict[str, int] = orjson.loads(out)
    return counts
