"""Targets: which provider a request goes to, and how its URL and credentials are shaped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .errors import GatewayError
from .settings import Settings, TargetSettings

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed or replaced by the gateway on the way upstream.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
# Framing and the upstream's server identity are the gateway's own on the way back.
_NOT_RETURNED = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}
_CREDENTIALS = frozenset({"authorization", "api-key", "x-api-key"})
ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the target, the path under it, and whether it came from a header."""

    target: TargetSettings
    path: str  # always starts with /v1/
    ad_hoc: bool = False


def resolve_route(settings: Settings, path: str, target_url: str | None) -> Route:
    """Pick the target from the path prefix (`/<target>/v1/…`) or an allowlisted Target-URL header."""
    if path.startswith("/v1/") or path == "/v1":
        name, rest = settings.default_target, path
    else:
        name, _, tail = path[1:].partition("/")
        rest = "/" + tail
        if not (rest.startswith("/v1/") or rest == "/v1"):
            raise GatewayError(404, f"Unknown path {path!r}: expected /v1/… or /<target>/v1/…", code="not_found")
        if name not in settings.targets:
            known = ", ".join(sorted(settings.targets))
            raise GatewayError(400, f"Unknown target {name!r}; configured targets: {known}", code="unknown_target")
    if _climbs(rest):
        raise GatewayError(400, "Path segments '.' and '..' are not allowed", code="invalid_path")
    if target_url is not None:
        if name != settings.default_target or not path.startswith("/v1"):
            raise GatewayError(
                400, "Helicone-Target-URL cannot be combined with a /<target>/ prefix", param="Helicone-Target-URL"
            )
        return Route(_ad_hoc_target(settings, target_url), rest, ad_hoc=True)
    return Route(settings.targets[name], rest)


def is_base_url(text: str) -> bool:
    """An absolute http(s) URL with a host and no query or fragment, which a path appended to it would swallow."""
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "?" not in text and "#" not in text


def _climbs(path: str) -> bool:
    """A `.` or `..` segment: the upstream client would resolve it and leave the target's base path.

    The path arrives decoded once, and the client decodes `%2e` once more, so both readings count.
    """
    if "." not in path and "%" not in path:
        return False  # nearly every path: no segment can read as a dot
    readings = (path, unquote(path))
    return any(segment in (".", "..") for text in readings for segment in text.replace("\\", "/").split("/"))


def _ad_hoc_target(settings: Settings, url: str) -> TargetSettings:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    netloc = f"{host}:{parts.port}" if parts.port is not None else host  # `:0` is a port, not the default
    allowed = {entry.lower() for entry in settings.target_url_allowlist}
    # An entry without a port admits only the scheme's default port, so an allowed host
    # cannot be used to reach another service on the same machine.
    if netloc not in allowed and not (parts.port is None and host in allowed):
        raise GatewayError(
            400,
            f"Helicone-Target-URL host {netloc!r} is not on the gateway's target_url_allowlist",
            param="Helicone-Target-URL",
            code="target_not_allowed",
        )
    return TargetSettings(name=f"url:{netloc}", base_url=url, kind="openai")


def upstream_url(target: TargetSettings, path: str, query: str, model: str) -> str:
    """Full upstream URL for a /v1/… path, in the target kind's own URL shape."""
    base = target.base_url.rstrip("/")
    if target.kind == "azure":
        rest = path[len("/v1") :]
        deployment_paths = ("/chat/completions", "/completions", "/embeddings", "/audio/", "/images/")
        if model and rest.startswith(deployment_paths):
            rest = f"/deployments/{model}{rest}"
        version = f"api-version={target.api_version}" if target.api_version and "api-version=" not in query else ""
        query = "&".join(part for part in (query, version) if part)
        url = f"{base}/openai{rest}"
    else:
        # OpenAI-compatible servers are often configured with a base URL that already ends in /v1.
        url = base + (path[3:] if base.endswith("/v1") else path)
    return f"{url}?{query}" if query else url


def upstream_headers(target: TargetSettings, client: Mapping[str, str]) -> dict[str, str]:
    """Client headers minus hop-by-hop, gateway and (when the gateway injects a key) credential headers."""
    inject = target.api_key is not None
    headers: dict[str, str] = {}
    for key, value in client.items():
        lowered = key.lower()
        if lowered in _NOT_FORWARDED or lowered.startswith("helicone-"):
            continue
        if inject and lowered in _CREDENTIALS:
            continue
        headers[key] = value
    # Identity keeps captured bytes readable and lets the client's stream pass through unchanged.
    headers["Accept-Encoding"] = "identity"
    if inject:
        if target.kind == "azure":
            headers["api-key"] = target.api_key or ""
        elif target.kind == "anthropic":
            headers["x-api-key"] = target.api_key or ""
        else:
            headers["Authorization"] = f"Bearer {target.api_key}"
    if target.kind == "anthropic" and not any(k.lower() == "anthropic-version" for k in headers):
        headers["anthropic-version"] = ANTHROPIC_VERSION
    return headers


def client_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Upstream response headers safe to pass to the client (framing is the gateway's own)."""
    return {key: value for key, value in upstream.items() if key.lower() not in _NOT_RETURNED}
