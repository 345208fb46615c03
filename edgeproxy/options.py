"""RequestOptions: every `Helicone-*` header (and `Cache-Control`) parsed once, at the edge.

Below the handler nothing reads these headers again. A malformed value raises a 400
`GatewayError` naming the header and what it expects; absent headers take documented defaults.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import orjson
from yarl import URL

from .errors import bad_header
from .targets import is_base_url

Unit = Literal["request", "cents", "tokens"]

GATEWAY_PREFIX = "helicone-"
PROPERTY_PREFIX = "helicone-property-"
MAX_PROPERTIES = 32
MAX_VALUE_CHARS = 512
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*([^,\s]*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl_seconds: int | None  # None: the configured default
    bucket_max_size: int = 1
    seed: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: attempt n waits min(max, min * factor**n) ms, with jitter."""

    retries: int = 5
    factor: float = 2.0
    min_timeout_ms: int = 1000
    max_timeout_ms: int = 10000


@dataclass(frozen=True, slots=True)
class Fallback:
    target: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """`quota;w=seconds;u=unit;s=segment`: at most `quota` units per sliding `window` seconds."""

    quota: float
    window_seconds: int
    unit: Unit = "request"
    segment: str = "global"  # "user", "app", "global" or a property name

    def header_value(self) -> str:
        quota = int(self.quota) if float(self.quota).is_integer() else self.quota
        return f"{quota};w={self.window_seconds};u={self.unit};s={self.segment}"


@dataclass(frozen=True, slots=True)
class RequestOptions:
    request_id: str | None = None  # Helicone-Request-Id, when the client names the request itself
    user_id: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)
    session_id: str = ""
    session_path: str = ""
    session_name: str = ""
    target_url: str | None = None
    omit_request: bool = False
    omit_response: bool = False
    auth_token: str | None = None
    cache: CachePolicy | None = None
    retry: RetryPolicy | None = None
    fallbacks: tuple[Fallback, ...] = ()
    rate_limit: RateLimitPolicy | None = None


# The options of a request without gateway headers (nearly every one), shared: building the frozen
# dataclass (14 fields, each set through object.__setattr__) cost ~22 kIr, 2.4% of a plain request.
NO_OPTIONS = RequestOptions()


def parse_options(headers: Mapping[str, str]) -> RequestOptions:
    """Parse all gateway headers of one request; raise a 400 GatewayError on the first bad one.

    A request without any gateway header gets `NO_OPTIONS` itself.
    """
    # Most requests carry no gateway header at all. (Cache-Control alone means nothing here; it is
    # read only with Helicone-Cache-Enabled.)
    for key in headers:
        if key[: len(GATEWAY_PREFIX)].lower() == GATEWAY_PREFIX:
            break
    else:
        return NO_OPTIONS
    get = headers.get
    given_id = get("Helicone-Request-Id")
    return RequestOptions(
        request_id=None if given_id is None else _uuid(given_id, "Helicone-Request-Id"),
        user_id=_text(get("Helicone-User-Id", ""), "Helicone-User-Id"),
        properties=_properties(headers),
        session_id=_text(get("Helicone-Session-Id", ""), "Helicone-Session-Id"),
        session_path=_text(get("Helicone-Session-Path", ""), "Helicone-Session-Path"),
        session_name=_text(get("Helicone-Session-Name", ""), "Helicone-Session-Name"),
        target_url=_target_url(get("Helicone-Target-URL")),
        omit_request=_bool(get("Helicone-Omit-Request"), "Helicone-Omit-Request"),
        omit_response=_bool(get("Helicone-Omit-Response"), "Helicone-Omit-Response"),
        auth_token=_bearer(get("Helicone-Auth"), "Helicone-Auth"),
        cache=_cache(headers),
        retry=_retry(headers),
        fallbacks=_fallbacks(get("Helicone-Fallbacks")),
        rate_limit=parse_rate_limit_policy(get("Helicone-RateLimit-Policy"), "Helicone-RateLimit-Policy"),
    )


def _text(value: str, name: str) -> str:
    if len(value) > MAX_VALUE_CHARS:
        raise bad_header(name, f"at most {MAX_VALUE_CHARS} characters", value)
    # aiohttp decodes header bytes with surrogateescape; such a value would poison a whole log
    # batch (ClickHouse and the spool both refuse it), so it stops here.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_header(name, "valid UTF-8", value) from None
    return value


def _bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise bad_header(name, "true or false", value)


def _int(value: str, name: str, low: int, high: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise bad_header(name, f"an integer from {low} to {high}", value) from None
    if not low <= number <= high:
        raise bad_header(name, f"an integer from {low} to {high}", value)
    return number


def _uuid(value: str, name: str) -> str:
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise bad_header(name, "a UUID", value) from None


def _bearer(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or not token.isascii():
        # Never echo a credential back: name the header, not its value.
        raise bad_header(name, "'Bearer <key>'", "<redacted>")
    return token.strip()


def _properties(headers: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in headers.items():
        if key.lower().startswith(PROPERTY_PREFIX):
            name = key[len(PROPERTY_PREFIX) :]
            if not name:
                raise bad_header(key, "Helicone-Property-<Name>", value)
            found[name] = _text(value, key)
    if len(found) > MAX_PROPERTIES:
        raise bad_header("Helicone-Property-*", f"at most {MAX_PROPERTIES} properties", str(len(found)))
    return found


def _target_url(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip()
    try:
        parts = urlsplit(text)
        # The allowlist is checked on urlsplit's reading, the request made with yarl's: both must
        # name the same host and port (a backslash or user info can make them differ).
        parsed = URL(text)
        agree = parsed.host == parts.hostname and parsed.explicit_port == parts.port
    except ValueError:  # an unparseable port or IPv6 literal
        agree = False
    if not agree or not is_base_url(text) or "@" in parts.netloc:
        # User info may be a password: the error (which is also logged) does not repeat it.
        shown = "<redacted>" if "@" in text else value
        raise bad_header("Helicone-Target-URL", "an absolute http(s) URL without user info, query or fragment", shown)
    return text.rstrip("/")


# Companion headers are validated even when their feature is off: a typo must not pass silently.
def _cache(headers: Mapping[str, str]) -> CachePolicy | None:
    enabled = _bool(headers.get("Helicone-Cache-Enabled"), "Helicone-Cache-Enabled")
    bucket = headers.get("Helicone-Cache-Bucket-Max-Size")
    seed = headers.get("Helicone-Cache-Seed", "")
    policy = CachePolicy(
        ttl_seconds=None,
        bucket_max_size=1 if bucket is None else _int(bucket, "Helicone-Cache-Bucket-Max-Size", 1, 20),
        seed=_text(seed, "Helicone-Cache-Seed"),
    )
    if not enabled:
        return None
    control = headers.get("Cache-Control")
    match = _MAX_AGE.search(control) if control is not None else None
    if match:  # Cache-Control has other uses; it is read only when caching is on
        ttl = _int(match.group(1), "Cache-Control", 0, 10 * 365 * 24 * 3600)
        policy = CachePolicy(ttl, policy.bucket_max_size, policy.seed)
    return policy


def _retry(headers: Mapping[str, str]) -> RetryPolicy | None:
    enabled = _bool(headers.get("Helicone-Retry-Enabled"), "Helicone-Retry-Enabled")
    default = RetryPolicy()
    num = headers.get("Helicone-Retry-Num")
    factor_text = headers.get("Helicone-Retry-Factor")
    low = headers.get("Helicone-Retry-Min-Timeout")
    high = headers.get("Helicone-Retry-Max-Timeout")
    factor = default.factor
    if factor_text is not None:
        try:
            factor = float(factor_text)
        except ValueError:
            factor = math.nan
        if not 1.0 <= factor <= 10.0:
            raise bad_header("Helicone-Retry-Factor", "a number from 1 to 10", factor_text)
    policy = RetryPolicy(
        retries=default.retries if num is None else _int(num, "Helicone-Retry-Num", 0, 10),
        factor=factor,
        min_timeout_ms=default.min_timeout_ms if low is None else _int(low, "Helicone-Retry-Min-Timeout", 0, 600_000),
        max_timeout_ms=default.max_timeout_ms if high is None else _int(high, "Helicone-Retry-Max-Timeout", 0, 600_000),
    )
    if policy.max_timeout_ms < policy.min_timeout_ms:
        raise bad_header("Helicone-Retry-Max-Timeout", "a value not below Helicone-Retry-Min-Timeout", high or "")
    return policy if enabled else None


def _fallbacks(value: str | None) -> tuple[Fallback, ...]:
    if value is None:
        return ()
    expected = 'a JSON list of target names or {"target": name, "model": override} objects'
    try:
        items = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise bad_header("Helicone-Fallbacks", expected, value) from None
    if not isinstance(items, list) or len(items) > 8:
        raise bad_header("Helicone-Fallbacks", expected + " (at most 8)", value)
    fallbacks = []
    for item in items:
        if isinstance(item, str) and _SEGMENT.match(item):
            fallbacks.append(Fallback(item))
        elif (
            isinstance(item, dict)
            and set(item) <= {"target", "model"}
            and isinstance(item.get("target"), str)
            and _SEGMENT.match(item["target"])
            and isinstance(item.get("model", ""), str)
        ):
            fallbacks.append(Fallback(item["target"], item.get("model") or None))
        else:
            raise bad_header("Helicone-Fallbacks", expected, value)
    return tuple(fallbacks)


def parse_rate_limit_policy(value: str | None, name: str) -> RateLimitPolicy | None:
    """Parse `quota;w=seconds[;u=request|cents|tokens][;s=user|app|global|<property>]`."""
    if value is None:
        return None
    expected = "'<quota>;w=<seconds>[;u=request|cents|tokens][;s=user|app|global|<property>]'"
    parts = [p.strip() for p in value.split(";")]
    try:
        quota = float(parts[0])
    except ValueError:
        raise bad_header(name, expected, value) from None
    if not (quota >= 0 and math.isfinite(quota)):
        raise bad_header(name, expected, value)
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, val = part.partition("=")
        if not eq or key not in ("w", "u", "s") or key in fields:
            raise bad_header(name, expected, value)
        fields[key] = val
    if "w" not in fields:
        raise bad_header(name, expected + " (w is required)", value)
    window = _int(fields["w"], name, 1, 366 * 24 * 3600)
    unit = fields.get("u", "request")
    if unit not in ("request", "cents", "tokens"):
        raise bad_header(name, expected, value)
    segment = fields.get("s", "global")
    if not _SEGMENT.match(segment):
        raise bad_header(name, expected, value)
    return RateLimitPolicy(quota=quota, window_seconds=window, unit=unit, segment=segment)  # type: ignore[arg-type]
