"""Settings: the frozen dataclasses every component is configured with (`settings_loader` builds them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TargetKind = Literal["openai", "azure", "anthropic"]


class SettingsError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8787
    workers: int = 1
    data_dir: str = "./.edgeproxy"
    max_body_bytes: int = 32 * 1024 * 1024
    drain_seconds: float = 30.0
    # Slow clients: a connection must complete its request head within `idle_seconds` of opening
    # (or of its last response; idle keep-alive connections close then too), and its whole body
    # within `body_seconds` of the head, else it is closed (head) or answered 408 (body).
    idle_seconds: float = 60.0
    body_seconds: float = 60.0
    # Shown to clients and logs only; never used for routing.
    name: str = "edgeproxy"


@dataclass(frozen=True)
class TimeoutSettings:
    """Upstream timeouts in seconds: `first_byte` counts from request sent, `idle` between chunks."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0
    total: float = 900.0


@dataclass(frozen=True)
class PoolSettings:
    max_connections: int = 1000
    max_per_host: int = 0
    keepalive_seconds: float = 30.0


@dataclass(frozen=True)
class TargetSettings:
    """An upstream provider: `kind` picks auth header and URL shape; `api_key` is injected when set."""

    name: str
    base_url: str
    kind: TargetKind = "openai"
    api_key: str | None = None
    api_version: str | None = None


@dataclass(frozen=True)
class LogSettings:
    """Request log: ClickHouse over HTTP(S) when `clickhouse_url` is set, else embedded chDB."""

    clickhouse_url: str | None = None
    user: str = "default"
    password: str = ""
    database: str = "edgeproxy"
    table: str = "requests"
    # ClickHouse pays a fixed cost per insert (a new part: ~8 ms of CPU embedded, ~15 ms in a
    # chDB-backed server here), so at 1000-row batches that cost outweighed the rows themselves;
    # at full load this flushes about once a second, as ClickHouse advises.
    batch_rows: int = 10_000
    flush_seconds: float = 1.0
    queue_max_rows: int = 100_000
    spool_max_bytes: int = 1024 * 1024 * 1024
    ttl_days: int = 0
    body_max_bytes: int = 64 * 1024
    enabled: bool = True
    # Nice value of the embedded store's engine threads (logs/engine_threads.py); 0 leaves them
    # at the gateway's priority. 19, the lowest: the log yields the cores to serving.
    engine_nice: int = 19
    # HTTP client bounds, so a dead or hung server fails a flush fast and the batch is spooled.
    connect_timeout_seconds: float = 2.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class CacheSettings:
    """Response cache: `url` is `memory://` or `redis://host:port/db`."""

    url: str = "memory://"
    max_bytes: int = 256 * 1024 * 1024
    default_ttl_seconds: int = 7 * 24 * 3600
    max_ttl_seconds: int = 365 * 24 * 3600
    shared_namespace: bool = False
    timeout_seconds: float = 0.25
    # Prefix of every Redis key, so deployments (or tests) can share one Redis.
    key_prefix: str = "edgeproxy:"
    # Redis connections per worker; past it a call waits, within timeout_seconds, for a free one.
    max_connections: int = 64


@dataclass(frozen=True)
class RateLimitSettings:
    """Rate limits: `url` is `memory://` or `redis://…`; `fail_open` decides when Redis is down."""

    url: str = "memory://"
    fail_open: bool = True
    timeout_seconds: float = 0.25
    key_prefix: str = "edgeproxy:"
    max_connections: int = 64
    # Completion tokens reserved against budgets and cents/tokens limits when a request sets no max_tokens.
    reserve_max_tokens: int = 4096


@dataclass(frozen=True)
class AuthSettings:
    required: bool = False
    algorithm: str = "HS256"
    jwt_secret: str | None = None
    private_key_file: str | None = None
    public_key_file: str | None = None
    issuer: str = "edgeproxy"
    audience: str = "edgeproxy"
    leeway_seconds: float = 30.0
    # `file` keeps revoked key ids under data_dir; a `redis://` URL shares them across a fleet.
    revocation: str = "file"


@dataclass(frozen=True)
class AppPolicy:
    """Per-app prompt policy and limits, from `[apps.<name>]`."""

    system_prompt: str | None = None
    system_prompt_mode: Literal["prepend", "replace"] = "prepend"
    banned_patterns: tuple[str, ...] = ()
    output_guard: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    max_tokens: int | None = None
    rate_limit: str | None = None
    budget_usd: float | None = None
    budget_period: Literal["day", "week", "month"] = "month"


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None


@dataclass(frozen=True)
class Deployment:
    """One place a routed model is served: a target and the model name it knows it by."""

    target: str
    model: str
    weight: float = 1.0


@dataclass(frozen=True)
class RouteSettings:
    """A model alias spread over deployments, from `[routes."<alias>"]`.

    `strategy`: `weighted` (random by weight), `least_busy` (fewest in-flight requests) or
    `latency` (power of two choices over a peak-EWMA of response latency). A deployment that
    fails `failure_threshold` times in a row is ejected for `cooldown_seconds`, doubled on each
    failed probe up to `max_cooldown_seconds`.
    """

    deployments: tuple[Deployment, ...]
    strategy: Literal["weighted", "least_busy", "latency"] = "weighted"
    failure_threshold: int = 3
    cooldown_seconds: float = 5.0
    max_cooldown_seconds: float = 300.0


@dataclass(frozen=True)
class AdminSettings:
    admin_key: str | None = None


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    # 0 serves /metrics on the main port.
    port: int = 0


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    targets: Mapping[str, TargetSettings] = field(default_factory=dict)
    default_target: str = "openai"
    # Hosts (optionally host:port) that `Helicone-Target-URL` may name; nothing else is proxied.
    target_url_allowlist: tuple[str, ...] = ()
    logs: LogSettings = field(default_factory=LogSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    apps: Mapping[str, AppPolicy] = field(default_factory=dict)
    prices: Mapping[str, Price] = field(default_factory=dict)
    routes: Mapping[str, RouteSettings] = field(default_factory=dict)
    admin: AdminSettings = field(default_factory=AdminSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)


DEFAULT_UPSTREAM = "https://api.openai.com"
