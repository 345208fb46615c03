"""Gateway keys end to end: issued by the CLI, verified per request, refused with their reason, revoked."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from redis import asyncio as aioredis

from edgeproxy.auth import KeyGrant, KeyIssuer
from edgeproxy.settings import AuthSettings

from .conftest import GatewayFactory, RunningGateway, wait_until

SECRET = "test-secret-" + "k" * 60
ENV = {"EDGEPROXY_JWT_SECRET": SECRET}
REQUIRED = "[auth]\nrequired = true\n"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello auth"}]}
REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"


def issuer(clock: Callable[[], float] = time.time, **auth: str) -> KeyIssuer:
    return KeyIssuer(AuthSettings(jwt_secret=auth.pop("jwt_secret", SECRET), **auth), clock)  # type: ignore[arg-type]


def key(grant: KeyGrant | None = None, **auth: str) -> str:
    return issuer(**auth).issue(grant or KeyGrant(app="billing"))[0]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict, claims: dict, secret: bytes) -> str:
    """A token signed outside pyjwt (which rightly refuses to HMAC with a PEM key)."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def valid_claims() -> dict:
    now = int(time.time())
    return {
        "iss": "edgeproxy",
        "aud": "edgeproxy",
        "sub": "billing",
        "jti": "k1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }


async def post(
    gateway: RunningGateway, headers: dict[str, str], body: dict | None = None
) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.base_url + "/chat/completions", json=body or CHAT, headers=headers) as r,
    ):
        return r.status, await r.json()


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `python -m edgeproxy …` as a user would, without blocking the gateway's event loop."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPROXY_", "OPENAI_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeproxy",
        *args,
        cwd=REPO,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    return process.returncode or 0, out.decode().strip(), err.decode()


def tampered() -> str:
    header, _, signature = key().split(".")
    claims = {**valid_claims(), "sub": "admin"}
    return f"{header}.{b64(orjson.dumps(claims))}.{signature}"


REFUSALS: list[tuple[str, Callable[[], str], str]] = [
    ("forged signature", lambda: key(jwt_secret="another-secret-" + "x" * 40), "invalid_signature"),
    ("tampered claims", tampered, "invalid_signature"),
    ("alg none", lambda: jwt.encode(valid_claims(), None, algorithm="none"), "algorithm_not_allowed"),
    ("HS512", lambda: jwt.encode(valid_claims(), SECRET, algorithm="HS512"), "algorithm_not_allowed"),
    (
        "expired",
        lambda: issuer(lambda: time.time() - 7200).issue(KeyGrant(app="billing", lifetime_seconds=3600))[0],
        "key_expired",
    ),
    (
        "not yet valid",
        lambda: issuer(lambda: time.time() + 3600).issue(KeyGrant(app="billing"))[0],
        "key_not_yet_valid",
    ),
    ("wrong audience", lambda: key(audience="someone-else"), "wrong_audience"),
    ("wrong issuer", lambda: key(issuer="someone-else"), "wrong_issuer"),
    (
        "missing exp",
        lambda: jwt.encode({k: v for k, v in valid_claims().items() if k != "exp"}, SECRET),
        "missing_claim",
    ),
    ("garbage", lambda: "eyJhbGciOi.not-base64!.x", "malformed_key"),
    (
        "bad claim type",
        lambda: jwt.encode({**valid_claims(), "models": "gpt-4o"}, SECRET),
        "malformed_claims",
    ),
]


@pytest.mark.parametrize(
    "token_of, code", [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS]
)
async def test_bad_keys_refused_with_their_reason(
    mock,
    start_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    token_of: Callable[[], str],
    code: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await start_gateway(REQUIRED, ENV)
    token = token_of()
    status, body = await post(gateway, {"Helicone-Auth": f"Bearer {token}"})
    assert (status, body["error"]["code"]) == (401, code)
    assert body["error"]["message"].startswith("Gateway key refused: ")
    assert token not in orjson.dumps(body).decode() and token not in caplog.text
    assert mock.requests == []


async def test_required_key_missing_and_optional_key_still_verified(
    mock, start_gateway: GatewayFactory
) -> None:
    required = await start_gateway(REQUIRED, ENV)
    status, body = await post(required, {})
    assert (status, body["error"]["code"]) == (401, "missing_key")
    assert (await post(required, {"Helicone-Auth": f"Bearer {key()}"}))[0] == 200

    optional = await start_gateway("", ENV)
    assert (await post(optional, {}))[0] == 200
    status, body = await post(optional, {"Helicone-Auth": "Bearer " + key(jwt_secret="wrong-" + "x" * 40)})
    assert (status, body["error"]["code"]) == (401, "invalid_signature")
    assert len(mock.requests) == 2


@pytest.mark.parametrize("algorithm", ["RS256", "EdDSA"])
async def test_asymmetric_keys_and_no_algorithm_confusion(
    mock, start_gateway: GatewayFactory, tmp_path: Path, algorithm: str
) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else (ed25519.Ed25519PrivateKey.generate())
    )
    private_file, public_file = tmp_path / "signing.pem", tmp_path / "verifying.pem"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_file.write_bytes(public_pem)
    # The verifying replica holds only the public key.
    gateway = await start_gateway(f'{REQUIRED}algorithm = "{algorithm}"\npublic_key_file = "{public_file}"\n')
    signer = KeyIssuer(AuthSettings(algorithm=algorithm, private_key_file=str(private_file)))
    good, _ = signer.issue(KeyGrant(app="billing"))
    assert (await post(gateway, {"Helicone-Auth": f"Bearer {good}"}))[0] == 200

    confused = hand_signed({"alg": "HS256", "typ": "JWT"}, valid_claims(), public_pem)
    status, body = await post(gateway, {"Helicone-Auth": f"Bearer {confused}"})
    assert (status, body["error"]["code"]) == (401, "algorithm_not_allowed")
    hs_key = key()  # a perfectly good HS256 key is still the wrong algorithm here
    assert (await post(gateway, {"Helicone-Auth": f"Bearer {hs_key}"}))[1]["error"][
        "code"
    ] == "algorithm_not_allowed"
    assert len(mock.requests) == 1


@pytest.mark.parametrize("revocation", ["file", REDIS_URL])
async def test_cli_key_works_with_the_sdk_then_revoke(
    mock, start_gateway: GatewayFactory, tmp_path: Path, revocation: str
) -> None:
    config = f'{REQUIRED}revocation = "{revocation}"\n'
    data_dir = str(tmp_path / "data")
    env = {**ENV, "EDGEPROXY_DATA_DIR": data_dir, "EDGEPROXY_AUTH_REVOCATION": revocation}
    gateway = await start_gateway(config, ENV, data_dir=data_dir)
    code, token, err = await cli(
        "keys",
        "issue",
        "--app",
        "billing",
        "--user",
        "alice",
        "--models",
        "mock-*",
        "--budget-usd",
        "5/day",
        "--rate-limit",
        "100;w=60",
        "--max-tokens",
        "500",
        "--expires",
        "1d",
        env=env,
    )
    assert code == 0, err
    key_id = err.split("key id ")[1].split()[0]
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key="sk-provider",
        max_retries=0,
        default_headers={"Helicone-Auth": f"Bearer {token}"},
    )
    reply = await client.chat.completions.create(**CHAT)
    assert "hello auth" in (reply.choices[0].message.content or "")

    code, shown, err = await cli("keys", "inspect", token, env=env)
    claims = orjson.loads(shown)
    assert code == 0 and claims["app_id"] == "billing" and claims["user_id"] == "alice"
    assert claims["models"] == ["mock-*"] and claims["budget_usd"] == 5.0 and claims["budget_period"] == "day"
    assert (
        claims["rate_limit"] == "100;w=60"
        and claims["max_tokens"] == 500
        and claims["user_override"] is False
    )

    code, _, err = await cli("keys", "revoke", key_id, env=env)
    assert code == 0, err

    async def refused() -> bool:
        try:
            await client.chat.completions.create(**CHAT)
        except openai.AuthenticationError as exc:
            assert exc.code == "key_revoked"
            return True
        return False

    await wait_until(refused, timeout=5, interval=0.1)
    if revocation.startswith("redis"):
        async with aioredis.from_url(REDIS_URL) as client:
            await client.delete(f"edgeproxy:revoked:{key_id}")


async def test_authorization_carries_the_gateway_key_when_the_gateway_injects_the_provider_key(
    mock, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = REQUIRED + '[targets.openai]\napi_key = "sk-provider-secret"\n'
    gateway = await start_gateway(config, ENV)
    token = key()
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=token, max_retries=0)
    await client.chat.completions.create(**CHAT)
    seen = mock.requests[-1].headers
    assert seen["Authorization"] == "Bearer sk-provider-secret"
    assert token not in str(dict(seen))
    with pytest.raises(openai.AuthenticationError) as refused:
        await openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key="sk-not-a-key", max_retries=0
        ).models.list()
    assert refused.value.code == "malformed_key"
    assert "sk-provider-secret" not in caplog.text and token not in caplog.text and SECRET not in caplog.text

    # The Anthropic SDK sends its api_key as x-api-key: there too it is the gateway key.
    claude = (
        REQUIRED
        + f'[targets.claude]\nbase_url = "{mock.url}"\nkind = "anthropic"\napi_key = "sk-ant-secret"\n'
    )
    anthropic_gateway = await start_gateway(claude, ENV)
    message = {"model": "mock-claude", "max_tokens": 10, "messages": CHAT["messages"]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            anthropic_gateway.url + "/claude/v1/messages", json=message, headers={"x-api-key": token}
        ) as r,
    ):
        assert r.status == 200
    assert mock.requests[-1].headers["x-api-key"] == "sk-ant-secret"

    # Not required: the SDK's placeholder api_key is not mistaken for a gateway key.
    optional = await start_gateway('[targets.openai]\napi_key = "sk-provider-secret"\n', ENV)
    placeholder = openai.AsyncOpenAI(base_url=optional.base_url, api_key="unused", max_retries=0)
    assert (await placeholder.chat.completions.create(**CHAT)).choices


async def test_user_id_header_only_where_the_key_allows_it(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(REQUIRED, ENV)
    bound = key(KeyGrant(app="billing", user="alice"))
    free = key(KeyGrant(app="billing", user="alice", allow_user_override=True))
    status, body = await post(gateway, {"Helicone-Auth": f"Bearer {bound}", "Helicone-User-Id": "bob"})
    assert (status, body["error"]["code"]) == (403, "user_override_not_allowed")
    assert (await post(gateway, {"Helicone-Auth": f"Bearer {bound}", "Helicone-User-Id": "alice"}))[0] == 200
    assert (await post(gateway, {"Helicone-Auth": f"Bearer {free}", "Helicone-User-Id": "bob"}))[0] == 200
    assert len(mock.requests) == 2


async def test_key_model_allowlist(mock, start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(REQUIRED, ENV)
    auth = {"Helicone-Auth": "Bearer " + key(KeyGrant(app="billing", models=("mock-*",)))}
    assert (await post(gateway, auth))[0] == 200
    status, body = await post(gateway, auth, {**CHAT, "model": "gpt-4o"})
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert "gpt-4o" in body["error"]["message"]
    # A fallback must not smuggle in a model the key may not use.
    fallback = {
        **auth,
        "Helicone-Fallbacks": orjson.dumps([{"target": "openai", "model": "gpt-4o"}]).decode(),
    }
    assert (await post(gateway, fallback))[0] == 403
    assert len(mock.requests) == 1
