"""A ClickHouse HTTP-protocol test double backed by chDB, run in its own process.

It serves what clickhouse-connect's HTTP client sends: `GET /ping`, `POST /` with the SQL in the
body or the `query=` parameter, settings and `param_*` bindings as URL parameters, results in the
format the SQL asks (`FORMAT Native` from the client), and inserts as `INSERT … FORMAT Native`
followed by the data (lz4/zstd/gzip/deflate per `Content-Encoding`). Errors come back as HTTP 500
with `Code: N. DB::Exception: …`, like the real server.

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
import gzip
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ENV_URL = "CLICKHOUSE_URL"

# URL parameters that steer the HTTP transport rather than the query (the real server eats them too).
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "enable_http_compression",
        "wait_end_of_query",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "buffer_size",
        "client_protocol_version",
        "role",
        "quota_key",
        "user",
        "password",
    }
)
INSERT_HEAD = re.compile(rb"^\s*(INSERT\s+INTO\s+[^\n]*?)\s+FORMAT\s+(\w+)[ \t]*\r?\n?", re.IGNORECASE)
ERROR_CODE = re.compile(r"Code: (\d+)")


def clickhouse_url() -> str | None:
    """The real server the tests should use instead of the double, if the environment names one."""
    return os.environ.get(ENV_URL) or None


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.decompress(body))
    if encoding == "zstd":
        from backports import zstd

        return bytes(zstd.decompress(body))
    raise ValueError(f"Code: 1. DB::Exception: unsupported Content-Encoding {encoding}")


class Engine:
    """One chDB connection shared by all request threads, one statement at a time."""

    def __init__(self, folder: str) -> None:
        import chdb

        self._conn = chdb.connect(folder)
        self._lock = threading.Lock()

    def run(
        self, sql: bytes, params: dict[str, str], settings: dict[str, str], database: str | None
    ) -> bytes:
        """Execute one statement with per-request settings and database, restoring both afterwards."""
        with self._lock:
            fmt = settings.pop("default_format", "TabSeparated")
            for name, value in settings.items():
                self._conn.query(f"SET {name} = '{_quote(value)}'")
            try:
                if database:
                    self._conn.query(f"USE `{database}`")
                return self._execute(sql, params, fmt)
            finally:
                for name in settings:
                    self._conn.query(f"SET {name} = DEFAULT")
                if database:
                    self._conn.query("USE default")

    def _execute(self, sql: bytes, params: dict[str, str], fmt: str) -> bytes:
        head = INSERT_HEAD.match(sql)
        if head:
            statement, fmt = head.group(1).decode(), head.group(2).decode()
            with self._conn.send_insert(statement, fmt) as inserter:
                data = sql[head.end() :]
                if data:
                    inserter.append(data)
                inserter.finish()
            return b""
        text = sql.decode()
        return bytes(self._conn.query(text, fmt, params=params).bytes())


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if urlsplit(self.path).path in ("/ping", "/ping/"):
                self._reply(200, b"Ok.\n")
                return
            self._query(b"")

        def do_POST(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._query(self._read_chunked())
                return
            length = int(self.headers.get("Content-Length") or 0)
            self._query(self.rfile.read(length) if length else b"")

        def _read_chunked(self) -> bytes:
            # Streamed inserts arrive chunked (the client sends a generator).
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()

        def _query(self, body: bytes) -> None:
            params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
            query_id = params.get("query_id") or str(uuid.uuid4())
            try:
                body = _decompress(body, self.headers.get("Content-Encoding", "").strip().lower())
                sql = params.get("query", "").encode()
                if sql and body:
                    sql += b"\n" + body
                elif body:
                    sql = body
                bindings = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
                settings = {
                    k: v
                    for k, v in params.items()
                    if k not in TRANSPORT_PARAMS and not k.startswith("param_")
                }
                result = engine.run(sql, bindings, settings, params.get("database"))
            except Exception as exc:  # noqa: BLE001 - every engine error becomes the server's error reply
                message = str(exc)
                match = ERROR_CODE.search(message)
                code = match.group(1) if match else "1000"
                if not match:
                    message = f"Code: {code}. DB::Exception: {message}"
                self._reply(500, message.encode() + b"\n", {"X-ClickHouse-Exception-Code": code})
                return
            self._reply(200, result, {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": "UTC"})

        def _reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-ClickHouse-Summary", '{"read_rows":"0","written_rows":"0"}')
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(port: int, data: str) -> None:
    """Run the double until SIGTERM; print `port N` once listening."""
    Path(data).mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(Engine(data)))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


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

    def stop(self, *, kill: bool = False) -> None:
        """Stop the subprocess (SIGKILL when `kill`, else SIGTERM) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
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
    serve(args.port, args.data)
