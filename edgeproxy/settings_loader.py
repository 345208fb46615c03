"""load_settings: Settings read from TOML, then environment, then flags; validated once.

Precedence is flag > environment > config file > default. Every scalar setting has an
environment variable `EDGEPROXY_<SECTION>_<FIELD>` (e.g. `EDGEPROXY_LOGS_CLICKHOUSE_URL`);
the operator shortcuts `EDGEPROXY_HOST`, `_PORT`, `_WORKERS`, `_UPSTREAM`, `_DATA_DIR`
and `_CONFIG` exist too. Unknown keys anywhere are an error that names them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from .settings import (
    DEFAULT_UPSTREAM,
    AdminSettings,
    AppPolicy,
    AuthSettings,
    CacheSettings,
    LogSettings,
    MetricsSettings,
    PoolSettings,
    Price,
    RateLimitSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    SettingsError,
    TargetSettings,
    TimeoutSettings,
)
from .targets import is_base_url

# Operator shortcuts: (environment variable, section, field).
SHORTCUTS = {
    "host": ("EDGEPROXY_HOST", "server", "host"),
    "port": ("EDGEPROXY_PORT", "server", "port"),
    "workers": ("EDGEPROXY_WORKERS", "server", "workers"),
    "data_dir": ("EDGEPROXY_DATA_DIR", "server", "data_dir"),
    "jwt_secret": ("EDGEPROXY_JWT_SECRET", "auth", "jwt_secret"),
    "admin_key": ("EDGEPROXY_ADMIN_KEY", "admin", "admin_key"),
}

_SECTIONS = {
    "server": ServerSettings,
    "timeouts": TimeoutSettings,
    "pool": PoolSettings,
    "logs": LogSettings,
    "cache": CacheSettings,
    "ratelimit": RateLimitSettings,
    "auth": AuthSettings,
    "admin": AdminSettings,
    "metrics": MetricsSettings,
}
_MAPPINGS = {"targets": TargetSettings, "apps": AppPolicy, "prices": Price, "routes": RouteSettings}
_TOP_SCALARS = {"default_target", "target_url_allowlist"}

T = TypeVar("T")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and CLI flags (in rising precedence)."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config_file = flags.pop("config", None) or config_file or env.get("EDGEPROXY_CONFIG")
    raw: dict[str, Any] = {}
    if config_file:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config_file}: {exc}") from exc
    unknown = set(raw) - set(_SECTIONS) - set(_MAPPINGS) - _TOP_SCALARS
    if unknown:
        raise SettingsError(f"unknown config key(s): {', '.join(sorted(unknown))}")

    values: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        table = dict(_table(raw, section))
        for f in dataclasses.fields(cls):
            name = f"EDGEPROXY_{section.upper()}_{f.name.upper()}"
            if name in env:
                table[f.name] = env[name]
        values[section] = table
    for key, (var, section, fname) in SHORTCUTS.items():
        if var in env:
            values[section][fname] = env[var]
        if key in flags:
            values[section][fname] = flags[key]
    for key in _TOP_SCALARS:
        if key in raw:
            values[key] = raw[key]
    if "EDGEPROXY_TARGET_URL_ALLOWLIST" in env:
        values["target_url_allowlist"] = env["EDGEPROXY_TARGET_URL_ALLOWLIST"]

    built: dict[str, Any] = {name: _build(cls, values[name], name) for name, cls in _SECTIONS.items()}
    targets = _targets(raw, env, flags)
    apps = {k: _build(AppPolicy, v, f"apps.{k}") for k, v in _table(raw, "apps").items()}
    prices = {k: _build(Price, v, f"prices.{k}") for k, v in _table(raw, "prices").items()}
    routes = {k: _build(RouteSettings, v, f"routes.{k}") for k, v in _table(raw, "routes").items()}
    settings = Settings(
        targets=targets,
        apps=apps,
        prices=prices,
        routes=routes,
        default_target=_convert(values.get("default_target", "openai"), str, "default_target"),
        target_url_allowlist=_convert(
            values.get("target_url_allowlist", ()), tuple[str, ...], "target_url_allowlist"
        ),
        **built,
    )
    _validate(settings)
    return settings


def _targets(raw: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, TargetSettings]:
    tables = {k: dict(v) for k, v in _table(raw, "targets").items()}
    openai = tables.setdefault("openai", {})
    openai.setdefault("base_url", DEFAULT_UPSTREAM)
    upstream = flags.get("upstream") or env.get("EDGEPROXY_UPSTREAM")
    if upstream:
        openai["base_url"] = upstream
    # OPENAI_API_KEY is the variable every OpenAI user already has; inject it when set.
    if "api_key" not in openai and env.get("OPENAI_API_KEY"):
        openai["api_key"] = env["OPENAI_API_KEY"]
    for name, table in tables.items():
        prefix = f"EDGEPROXY_TARGETS_{name.upper()}_"
        for f in dataclasses.fields(TargetSettings):
            if prefix + f.name.upper() in env:
                table[f.name] = env[prefix + f.name.upper()]
        table.setdefault("name", name)
        if table["name"] != name:
            raise SettingsError(f"targets.{name}.name must equal the table name")
    return {name: _build(TargetSettings, table, f"targets.{name}") for name, table in tables.items()}


def _validate(s: Settings) -> None:
    for alias, route in s.routes.items():
        if not route.deployments:
            raise SettingsError(f"routes.{alias} needs at least one deployment")
        for i, deployment in enumerate(route.deployments):
            if deployment.target not in s.targets:
                raise SettingsError(f"routes.{alias}.deployments[{i}].target {deployment.target!r} is not a configured target")
            if deployment.weight <= 0:
                raise SettingsError(f"routes.{alias}.deployments[{i}].weight must be positive")
    if s.default_target not in s.targets:
        raise SettingsError(f"default_target {s.default_target!r} is not a configured target")
    for name, target in s.targets.items():
        if not is_base_url(target.base_url):
            raise SettingsError(
                f"targets.{name}.base_url must be an http(s) URL with a host, without query or fragment, "
                f"got {target.base_url!r}"
            )
        if not name.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"target name {name!r} may hold only letters, digits, - and _")
    if s.server.workers < 1:
        raise SettingsError("server.workers must be at least 1")
    for f in dataclasses.fields(s.timeouts):
        # 0 would not mean "no limit": the relay and the client-stall check would cut at once.
        if not getattr(s.timeouts, f.name) > 0:
            raise SettingsError(f"timeouts.{f.name} must be a positive number of seconds")
    if not 0 <= s.server.port < 65536:
        raise SettingsError("server.port must be 0..65535")
    if not 0 <= s.logs.engine_nice <= 19:
        raise SettingsError("logs.engine_nice must be 0..19 (0 leaves the embedded store's threads at the gateway's priority)")
    if s.auth.algorithm not in ("HS256", "RS256", "EdDSA"):
        raise SettingsError("auth.algorithm must be HS256, RS256 or EdDSA")
    for url, where in ((s.cache.url, "cache.url"), (s.ratelimit.url, "ratelimit.url")):
        if not url.startswith(("memory://", "redis://", "rediss://")):
            raise SettingsError(f"{where} must be memory:// or redis://…, got {url!r}")


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise SettingsError(f"config key {key} must be a table")
    return value


def _build(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    if not isinstance(table, Mapping):
        raise SettingsError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - names
    if unknown:
        raise SettingsError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SettingsError(f"{where}: {exc}") from exc


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Coerce a TOML value or an environment string to the field's type, or say why not."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise SettingsError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where} must be a list")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except ValueError:
        raise SettingsError(f"{where} must be {hint.__name__}, got {value!r}") from None
    return value
