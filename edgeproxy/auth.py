"""Gateway keys: signed JWTs issued by the CLI, verified per request, revocable across a fleet (revocation.py).

A key's claims are the tenant: `sub` is the app, `jti` the key id, and the custom claims
below narrow what it may do. Verification pins the configured algorithm, so neither
`alg: none` nor an HS256 token signed with an RS256 gateway's public key gets through
(RFC 8725 §2.1, §3.1). Refusals name the reason and never echo the token.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from .errors import GatewayError
from .exchange import Exchange, Identity
from .pipeline import Handler
from .revocation import Clock, RevocationList
from .settings import AuthSettings, SettingsError

PERIODS = ("day", "week", "month")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# HS256 keys are only as strong as the secret; 32 bytes matches the hash output (RFC 7518 §3.2).
MIN_SECRET_BYTES = 32
# Far above any key this CLI issues; stops a megabyte header from reaching the JSON parser.
MAX_TOKEN_CHARS = 8192
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp"]
_PUBLIC_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
# pyjwt's exception → (reason shown to the client, error code). Order matters: subclasses first.
_REASONS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "the key has expired", "key_expired"),
    (jwt.ImmatureSignatureError, "the key is not valid yet", "key_not_yet_valid"),
    (jwt.InvalidSignatureError, "bad signature", "invalid_signature"),
    (jwt.InvalidAudienceError, "wrong audience", "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong issuer", "wrong_issuer"),
    (jwt.InvalidAlgorithmError, "signing algorithm not accepted", "algorithm_not_allowed"),
    (jwt.MissingRequiredClaimError, "a required claim is missing", "missing_claim"),
    (jwt.DecodeError, "malformed key", "malformed_key"),
)


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a key allows; `edgeproxy keys issue` builds one from its flags."""

    app: str
    user: str | None = None
    models: tuple[str, ...] = ()
    budget_usd: float | None = None
    budget_period: str = "month"
    rate_limit: str | None = None
    max_tokens: int | None = None
    allow_user_override: bool = False
    lifetime_seconds: int = 90 * 86400

    def claims(self) -> dict[str, Any]:
        """The custom claims; absent limits are left out rather than sent as null."""
        claims: dict[str, Any] = {"user_override": self.allow_user_override}
        if self.user:
            claims["user"] = self.user
        if self.models:
            claims["models"] = list(self.models)
        if self.budget_usd is not None:
            claims["budget"] = {"usd": self.budget_usd, "period": self.budget_period}
        if self.rate_limit:
            claims["rate_limit"] = self.rate_limit
        if self.max_tokens is not None:
            claims["max_tokens"] = self.max_tokens
        return claims


class KeyIssuer:
    """Signs keys with the configured secret or private key (only the CLI holds it)."""

    def __init__(self, auth: AuthSettings, clock: Clock = time.time) -> None:
        self._auth = auth
        self._key = signing_key(auth)
        self._clock = clock

    def issue(self, grant: KeyGrant) -> tuple[str, str]:
        """Return (key, key id)."""
        key_id = secrets.token_hex(12)
        now = int(self._clock())
        payload = {
            "iss": self._auth.issuer,
            "aud": self._auth.audience,
            "sub": grant.app,
            "jti": key_id,
            "iat": now,
            "nbf": now,
            "exp": now + grant.lifetime_seconds,
            **grant.claims(),
        }
        return jwt.encode(payload, self._key, algorithm=self._auth.algorithm), key_id


class KeyVerifier:
    """Checks signature, algorithm and registered claims; turns the custom claims into an Identity."""

    def __init__(self, auth: AuthSettings) -> None:
        self._auth = auth
        self._key = verifying_key(auth)
        # One decoder with fixed options, built once: nothing about it depends on the token.
        self._decoder = jwt.PyJWT({"require": _REQUIRED_CLAIMS})

    def verify(self, token: str) -> Identity:
        """The key's Identity, or a GatewayError(401) saying why not."""
        # A JWT is ASCII; anything else (a header byte decoded with surrogateescape) would break pyjwt.
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise refused("malformed key", "malformed_key")
        try:
            claims = self._decoder.decode(
                token,
                self._key,
                algorithms=[self._auth.algorithm],
                audience=self._auth.audience,
                issuer=self._auth.issuer,
                leeway=self._auth.leeway_seconds,
            )
        except jwt.PyJWTError as exc:
            reason, code = next(
                ((r, c) for kind, r, c in _REASONS if isinstance(exc, kind)), ("invalid key", "invalid_key")
            )
            raise refused(reason, code) from None
        try:
            return identity_from_claims(claims)
        except (TypeError, ValueError, KeyError):
            raise refused("the key's claims are malformed", "malformed_claims") from None


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Map verified claims onto an Identity; a claim of the wrong type raises TypeError or ValueError."""
    models = claims.get("models", [])
    budget = claims.get("budget")
    max_tokens = claims.get("max_tokens")
    if not (isinstance(claims["sub"], str) and isinstance(claims["jti"], str)):
        raise TypeError("sub and jti must be strings")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise TypeError("models must be a list of strings")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise TypeError("max_tokens must be an integer")
    budget_usd, period = None, "month"
    if budget is not None:
        if not isinstance(budget, dict) or budget.get("period", "month") not in PERIODS:
            raise TypeError("budget must be {usd, period}")
        budget_usd, period = float(budget["usd"]), budget.get("period", "month")
    rate_limit = claims.get("rate_limit")
    user = claims.get("user", "")
    if not isinstance(user, str) or not (rate_limit is None or isinstance(rate_limit, str)):
        raise TypeError("user and rate_limit must be strings")
    return Identity(
        app_id=claims["sub"],
        key_id=claims["jti"],
        user_id=user,
        models=tuple(models),
        rate_limit=rate_limit,
        budget_usd=budget_usd,
        budget_period=period,
        user_override=claims.get("user_override") is True,
        max_tokens=max_tokens,
    )


def refused(reason: str, code: str, status: int = 401) -> GatewayError:
    """A refusal in the provider's error shape; the message carries the reason, never the key."""
    headers = {"WWW-Authenticate": 'Bearer realm="edgeproxy"'} if status == 401 else None
    return GatewayError(status, f"Gateway key refused: {reason}", code=code, headers=headers)


def has_key_material(auth: AuthSettings) -> bool:
    if auth.algorithm == "HS256":
        return bool(auth.jwt_secret)
    return bool(auth.public_key_file or auth.private_key_file)


def signing_key(auth: AuthSettings) -> Any:
    if auth.algorithm == "HS256":
        return _secret(auth)
    if not auth.private_key_file:
        raise SettingsError(f"auth.private_key_file is needed to sign {auth.algorithm} keys")
    return load_pem_private_key(_read(auth.private_key_file), password=None)


def verifying_key(auth: AuthSettings) -> Any:
    """The secret (HS256) or public key; a replica that only verifies needs only the public key."""
    if auth.algorithm == "HS256":
        return _secret(auth)
    if auth.public_key_file:
        key = load_pem_public_key(_read(auth.public_key_file))
    elif auth.private_key_file:
        key = load_pem_private_key(_read(auth.private_key_file), password=None).public_key()
    else:
        raise SettingsError(f"auth.public_key_file is needed to verify {auth.algorithm} keys")
    if not isinstance(key, _PUBLIC_KEY_TYPES[auth.algorithm]):
        raise SettingsError(f"the configured key is a {type(key).__name__}, not a key for {auth.algorithm}")
    return key


def _secret(auth: AuthSettings) -> bytes:
    secret = (auth.jwt_secret or "").encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise SettingsError(
            f"auth.jwt_secret (env EDGEPROXY_JWT_SECRET) must be at least {MIN_SECRET_BYTES} bytes for HS256"
        )
    return secret


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read key file {path}: {exc.strerror}") from None


def _looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class Authenticate:
    """The authenticate stage: verify a gateway key when one is sent (or required); fill `ex.identity`.

    The key comes from `Helicone-Auth: Bearer …`, or, when the target injects the provider's
    key, from the header the client's SDK sends its api_key in (`Authorization: Bearer …`,
    `x-api-key`, `api-key`): those are then free to carry the gateway key, and are never
    forwarded. Without `auth.required`, a value there that is not JWT-shaped is taken for a
    placeholder the SDK insists on, and ignored.

    `Helicone-User-Id` names the end user only if the key allows it (`user_override`) or
    repeats the key's own user; otherwise the request is refused with 403, so a key bound
    to a user cannot spend or log as someone else.
    """

    def __init__(self, auth: AuthSettings, verifier: KeyVerifier | None, revocations: RevocationList) -> None:
        if auth.required and verifier is None:
            raise SettingsError("auth.required needs key material: auth.jwt_secret or a public key file")
        self._required = auth.required
        self._verifier = verifier
        self._revocations = revocations

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        token = self._token(ex)
        if token is not None:
            return self._with_key(ex, token, call_next)
        if self._required:
            raise refused("a gateway key is required (send Helicone-Auth: Bearer <key>)", "missing_key")
        self._name_user(ex)
        return call_next(ex)

    async def _with_key(self, ex: Exchange, token: str, call_next: Handler) -> web.StreamResponse:
        assert self._verifier is not None
        identity = self._verifier.verify(token)
        if await self._revocations.is_revoked(identity.key_id):
            raise refused("the key has been revoked", "key_revoked")
        ex.identity = identity
        self._name_user(ex)
        return await call_next(ex)

    @staticmethod
    def _name_user(ex: Exchange) -> None:
        """Apply `Helicone-User-Id` if the identity allows it; refuse with 403 if not."""
        requested = ex.options.user_id
        if requested and requested != ex.identity.user_id:
            if not ex.identity.user_override:
                raise GatewayError(
                    403,
                    "This gateway key does not allow Helicone-User-Id to name another user",
                    param="Helicone-User-Id",
                    code="user_override_not_allowed",
                )
            ex.identity.user_id = requested

    def _token(self, ex: Exchange) -> str | None:
        if self._verifier is None:
            return None  # no key material: this gateway takes no keys, so there is nothing to check
        if ex.options.auth_token is not None:
            return ex.options.auth_token
        if ex.route.target.api_key is None:
            return None  # the client's credential headers carry its provider key: not ours to read
        headers = ex.request.headers
        scheme, _, bearer = headers.get("Authorization", "").strip().partition(" ")
        # Whichever header the client's SDK puts its api_key in: OpenAI's, Anthropic's or Azure's.
        token = (bearer.strip() if scheme.lower() == "bearer" else "") or headers.get(
            "x-api-key", headers.get("api-key", "")
        ).strip()
        return token if token and (self._required or _looks_like_jwt(token)) else None
