"""Which rate-limit policies apply to a request, and whose bucket each one charges.

Three sources, all enforced: the app's configured policy (`[apps.<name>] rate_limit`), the
policy carried by the caller's gateway key, and the `Helicone-RateLimit-Policy` header.
Each has its own buckets, so a header can add a tighter limit but never loosen another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import GatewayError
from ..exchange import Exchange
from ..options import RateLimitPolicy, parse_rate_limit_policy
from ..settings import AppPolicy, SettingsError

Source = Literal["app", "key", "header"]
_KEY_POLICY_MEMO = 1024


@dataclass(frozen=True, slots=True)
class Applied:
    """One policy applied to one request: the bucket it charges and the amount due at admission."""

    policy: RateLimitPolicy
    source: Source
    bucket: str  # a digest naming (source, scope, unit, window, segment, subject)

    @property
    def admission_amount(self) -> float:
        """A request is charged on admission; cents and tokens only once the answer is known."""
        return 1.0 if self.policy.unit == "request" else 0.0

    @property
    def segment_kind(self) -> str:
        segment = self.policy.segment
        return segment if segment in ("user", "app", "global") else "property"


class PolicyBook:
    """Resolves the policies of a request; app policies are parsed once, key policies memoised."""

    def __init__(self, apps: Mapping[str, AppPolicy]) -> None:
        self._apps: dict[str, RateLimitPolicy] = {}
        for name, app in apps.items():
            try:
                policy = parse_rate_limit_policy(app.rate_limit, f"apps.{name}.rate_limit")
            except GatewayError as err:
                raise SettingsError(err.message) from None
            if policy is not None:
                self._apps[name] = policy
        self._key_policies: dict[str, RateLimitPolicy | None] = {}

    def applicable(self, ex: Exchange) -> list[Applied]:
        identity = ex.identity
        found: list[Applied] = []
        app_policy = self._apps.get(identity.app_id) if identity.app_id else None
        if app_policy is not None:
            found.append(_applied(ex, app_policy, "app", identity.app_id))
        if identity.rate_limit:
            key_policy = self._key_policy(identity.rate_limit)
            if key_policy is not None:
                found.append(_applied(ex, key_policy, "key", f"{identity.app_id}/{identity.key_id}"))
        if ex.options.rate_limit is not None:
            found.append(_applied(ex, ex.options.rate_limit, "header", identity.app_id))
        return found

    def _key_policy(self, text: str) -> RateLimitPolicy | None:
        if text not in self._key_policies:
            try:
                policy = parse_rate_limit_policy(text, "rate_limit")
            except GatewayError:
                # A signed key with a bad policy is the issuer's mistake; refusing beats ignoring it.
                raise GatewayError(
                    500, "The gateway key carries a malformed rate_limit claim", type="gateway_error"
                ) from None
            if len(self._key_policies) >= _KEY_POLICY_MEMO:
                self._key_policies.clear()
            self._key_policies[text] = policy
        return self._key_policies[text]


def subject_of(ex: Exchange, segment: str) -> str:
    """Who a policy counts: the user, the app, everyone (''), or one value of a property."""
    if segment == "user":
        return ex.identity.user_id or ex.options.user_id
    if segment == "app":
        return ex.identity.app_id
    if segment == "global":
        return ""
    wanted = segment.lower()
    for name, value in ex.options.properties.items():
        if name.lower() == wanted:
            return value
    return ""  # requests without the property share one bucket rather than escape the limit


def _applied(ex: Exchange, policy: RateLimitPolicy, source: Source, scope: str) -> Applied:
    subject = subject_of(ex, policy.segment)
    parts = (source, scope, policy.unit, str(policy.window_seconds), policy.segment.lower(), subject)
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return Applied(policy, source, digest.hexdigest())
