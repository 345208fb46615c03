"""EmbeddedServer: the embedded chDB store served over ClickHouse's HTTP protocol.

Only one process may open a chDB folder, so a gateway with several workers and no ClickHouse
URL gives the folder to its master, which serves it here on 127.0.0.1; the workers log to it as
to any ClickHouse server (`logs.clickhouse_url`). It speaks what clickhouse-connect's HTTP
client sends: `GET /ping`; `POST /` with the SQL in the body or the `query=` parameter,
settings and `param_*` bindings as URL parameters, results in the format the SQL names
(`FORMAT Native` from the client); inserts as `INSERT … FORMAT Native` followed by the data,
compressed per `Content-Encoding` (lz4, zstd, gzip, deflate). Errors come back as HTTP 500 with
`Code: N. DB::Exception: …`, like the real server. It is not a general ClickHouse server: one
statement runs at a time, and sessions, progress headers and external tables are ignored.

Usage::

    server = EmbeddedServer(data_dir / "clickhouse", password=secrets.token_urlsafe())
    server.start()              # listening on 127.0.0.1:<ephemeral>, served from a thread
    url = server.url            # http://default:<password>@127.0.0.1:<port>
    server.stop()
"""

from __future__ import annotations

import base64
import gzip
import hmac
import re
import signal
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from .engine_threads import EngineThreads

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
USER = "default"
# ClickHouse's AUTHENTICATION_FAILED.
AUTH_FAILED = b"Code: 516. DB::Exception: default: Authentication failed: password is incorrect.\n"


def decompress(body: bytes, encoding: str) -> bytes:
    """A request body decoded per its Content-Encoding, every frame of it.

    clickhouse-connect compresses each Native block of an insert as a frame of its own (blocks of
    ~2 MB: about 4000 log rows), and the body is the frames back to back. The one-shot lz4 and
    zlib decoders stop after the first frame without a word, which dropped the rest of the rows.
    """
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)  # reads every member
    if encoding == "deflate":
        return _every_frame(body, zlib.decompressobj)
    if encoding == "lz4":
        import lz4.frame

        return _every_frame(body, lz4.frame.LZ4FrameDecompressor)
    if encoding == "zstd":
        from backports import zstd

        return bytes(zstd.decompress(body))  # reads every frame
    raise ValueError(f"Code: 1. DB::Exception: unsupported Content-Encoding {encoding}")


def _every_frame(body: bytes, decoder: Callable[[], Any]) -> bytes:
    """Concatenated frames decoded one after another, a fresh decoder each (zlib's and lz4's work alike)."""
    out = bytearray()
    rest = body
    while rest:
        frame = decoder()
        out += frame.decompress(rest)
        if not frame.eof:
            raise ValueError("Code: 1. DB::Exception: the request body ends inside a compressed frame")
        rest = frame.unused_data
    return bytes(out)


class Engine:
    """One chDB connection shared by all request threads, one statement at a time.

    `engine_nice` > 0 lowers chDB's threads after every statement (engine_threads.py): the log
    owner of a multi-worker gateway shares the cores with its workers. The test double keeps 0.
    """

    def __init__(self, folder: Path, engine_nice: int = 0) -> None:
        import chdb

        folder.mkdir(parents=True, exist_ok=True)
        self._conn = chdb.connect(str(folder))
        self._lock = threading.Lock()
        self._engine_threads = EngineThreads(engine_nice)

    def run(self, sql: bytes, params: dict[str, str], settings: dict[str, str], database: str | None) -> bytes:
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
                self._engine_threads.lower()

    def close(self) -> None:
        """Release the folder, so another process (or engine) may open it."""
        with self._lock:
            self._conn.close()

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
        return bytes(self._conn.query(sql.decode(), fmt, params=params).bytes())


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _password_of(headers: Message, params: Mapping[str, str]) -> str | None:
    """The password a request offers: Basic auth (clickhouse-connect), X-ClickHouse-Key or `password=`."""
    authorization = headers.get("Authorization", "")
    if authorization[:6].lower() == "basic ":
        try:
            return base64.b64decode(authorization[6:].strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return headers.get("X-ClickHouse-Key", params.get("password"))


def _handler(engine: Engine, password: str | None) -> type[BaseHTTPRequestHandler]:
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
            if password is not None:
                offered = _password_of(self.headers, params)
                if offered is None or not hmac.compare_digest(offered.encode(), password.encode()):
                    self._reply(403, AUTH_FAILED, {"X-ClickHouse-Exception-Code": "516"})
                    return
            query_id = params.get("query_id") or str(uuid.uuid4())
            try:
                body = decompress(body, self.headers.get("Content-Encoding", "").strip().lower())
                sql = params.get("query", "").encode()
                if sql and body:
                    sql += b"\n" + body
                elif body:
                    sql = body
                bindings = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
                settings = {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")}
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
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-ClickHouse-Summary", '{"read_rows":"0","written_rows":"0"}')
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting (its timeout); nobody reads this

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class EmbeddedServer:
    """A chDB folder served over ClickHouse's HTTP protocol from a thread of this process."""

    def __init__(
        self,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        engine_nice: int = 0,
    ) -> None:
        self.folder = folder
        self.engine_nice = engine_nice
        self.host = host
        self.port = port
        # Request bodies live in the log: anyone on the host could read them without it.
        self.password = password
        self._engine: Engine | None = None
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL to give clients, credentials included when a password is set."""
        auth = f"{USER}:{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"http://{auth}{self.host}:{self.port}"

    def start(self) -> None:
        """Open the folder and listen; raises if another process holds the folder or the port is taken."""
        self._engine = Engine(self.folder, self.engine_nice)
        try:
            self._http = ThreadingHTTPServer((self.host, self.port), _handler(self._engine, self.password))
        except BaseException:
            self._engine.close()
            raise
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="edgeproxy-embedded-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening, wait for the serving thread, and release the folder."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def serve_until_terminated(folder: Path, port: int = 0) -> None:
    """Serve `folder` without a password in the foreground until SIGTERM; prints `port N` once listening."""
    server = EmbeddedServer(folder, port=port)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print(f"port {server.port}", flush=True)
    try:
        stopped.wait()
    finally:
        server.stop()
