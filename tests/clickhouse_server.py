"""A ClickHouse HTTP-protocol test double: the package's chDB-backed EmbeddedServer, in its own process.

`edgeproxy/logs/embedded_server.py` serves what clickhouse-connect's HTTP client sends (see its
docstring); this module runs it as a subprocess that tests can stop and start again on the same
port and folder.

It is a double for the wire, not proof of wire compatibility: set `CLICKHOUSE_URL`
(e.g. `http://default:@127.0.0.1:8123`) and the log tests use that real server instead
(`clickhouse_url()` below); the fault tests that stop and restart ClickHouse keep using the
double, since a shared server cannot be stopped from a test.

Why a subprocess: chDB hosts one data folder per process, and the test process may itself hold
the embedded store. Run it alone with `python tests/clickhouse_server.py --port 0 --data DIR`;
it prints `port N` once it listens.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ENV_URL = "CLICKHOUSE_URL"


def clickhouse_url() -> str | None:
    """The real server the tests should use instead of the double, if the environment names one."""
    return os.environ.get(ENV_URL) or None


class ClickHouseServer:
    """Starts the double in a subprocess on a free port; `stop()` and `start()` keep port and folder."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the subprocess and wait until `/ping` answers."""
        deadline = time.monotonic() + timeout
        # The same port on restart: clients configured with the URL must find it again.
        command = [sys.executable, __file__, "--port", str(self.port), "--data", str(self.data)]
        self._proc = proc = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            _poll(deadline, proc.poll, "clickhouse double exited before listening")
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                line += os.read(proc.stdout.fileno(), 64)
        self.port = int(line.split()[1])
        while not self.ping():
            _poll(deadline, proc.poll, "clickhouse double never answered /ping")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1.0) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the subprocess (SIGSTOP): the kernel still accepts connections, nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused subprocess run again (SIGCONT)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the subprocess (SIGKILL when `kill`, else SIGTERM) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused process would hold SIGTERM pending
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _poll(deadline: float, exited: Callable[[], int | None], message: str) -> None:
    if exited() is not None:
        raise RuntimeError(message)
    if time.monotonic() > deadline:
        raise TimeoutError(message)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    # Imported here: the tests import this module without wanting chDB loaded.
    from edgeproxy.logs.embedded_server import serve_until_terminated

    serve_until_terminated(Path(args.data), args.port)
