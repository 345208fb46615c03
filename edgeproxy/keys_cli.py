"""`edgeproxy keys`: issue, revoke and inspect gateway keys.

    edgeproxy keys issue --app billing --user alice --models 'gpt-4o-mini,gpt-4o*' \\
        --budget-usd 50/month --rate-limit '1000;w=3600' --expires 90d
    edgeproxy keys revoke 3f9c…              # the key id `issue` printed
    edgeproxy keys inspect "$KEY"             # verify a key and print its claims

`issue` prints only the key on stdout (so `KEY=$(edgeproxy keys issue …)` works) and the
key id on stderr. The secret comes from `EDGEPROXY_JWT_SECRET` (HS256) or the private key
file (RS256/EdDSA), as in the gateway's own settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from .auth import KEY_ID, PERIODS, KeyGrant, KeyIssuer, KeyVerifier
from .cache.remote import BACKEND_ERRORS
from .errors import GatewayError
from .options import parse_rate_limit_policy
from .revocation import open_revocations
from .settings import Settings

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BUDGET = re.compile(r"^(\d+(?:\.\d+)?)(?:/(\w+))?$")


def add_keys_command(commands: Any) -> None:
    """Register `keys issue|revoke|inspect` on the CLI's subcommand parser."""
    keys = commands.add_parser("keys", help="issue, revoke and inspect gateway keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    issue = actions.add_parser("issue", help="print a new signed key")
    issue.add_argument(
        "--app", required=True, help="the tenant the key belongs to (its [apps.<name>] policy)"
    )
    issue.add_argument("--user", help="bind the key to one end user")
    issue.add_argument("--models", type=_models, default=(), help="comma-separated allowlist; * wildcards")
    issue.add_argument("--budget-usd", type=_budget, help="spend cap, e.g. 50/month, 5/day, 20/week")
    issue.add_argument(
        "--rate-limit", type=_rate_limit, help="e.g. '1000;w=3600' (Helicone-RateLimit-Policy syntax)"
    )
    issue.add_argument("--max-tokens", type=int, help="cap on max_tokens per request")
    issue.add_argument(
        "--expires", type=_duration, default=_duration("90d"), help="lifetime: 30m, 12h, 90d, 2w"
    )
    issue.add_argument(
        "--allow-user-override",
        action="store_true",
        help="let Helicone-User-Id name the end user per request",
    )
    issue.set_defaults(run=_issue)

    revoke = actions.add_parser("revoke", help="revoke a key by its id, for every gateway sharing the list")
    revoke.add_argument("key_id", type=_key_id)
    revoke.set_defaults(run=_revoke)

    inspect = actions.add_parser(
        "inspect", help="verify a key (or '-' to read it from stdin) and print its claims"
    )
    inspect.add_argument("key")
    inspect.set_defaults(run=_inspect)

    for action in (issue, revoke, inspect):
        action.add_argument(
            "--data-dir", help="where the file revocation list lives (env EDGEPROXY_DATA_DIR)"
        )


def _issue(args: argparse.Namespace, settings: Settings) -> int:
    budget_usd, period = args.budget_usd or (None, "month")
    grant = KeyGrant(
        app=args.app,
        user=args.user,
        models=args.models,
        budget_usd=budget_usd,
        budget_period=period,
        rate_limit=args.rate_limit,
        max_tokens=args.max_tokens,
        allow_user_override=args.allow_user_override,
        lifetime_seconds=args.expires,
    )
    key, key_id = KeyIssuer(settings.auth).issue(grant)  # main() reports a SettingsError
    print(key)
    expires = datetime.fromtimestamp(time.time() + args.expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"key id {key_id} for app {args.app!r}, expires {expires}", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def revoke() -> None:
        revocations = open_revocations(settings)
        try:
            await revocations.revoke(args.key_id)
        finally:
            await revocations.close()

    try:
        asyncio.run(revoke())
    except BACKEND_ERRORS as exc:
        print(f"edgeproxy: could not revoke {args.key_id}: {type(exc).__name__}", file=sys.stderr)
        return 1
    # The Redis URL may hold a password: name the kind of list, not the URL.
    where = settings.data_dir / "revoked_keys" if settings.auth.revocation == "file" else "the Redis list"
    print(f"revoked {args.key_id} in {where}", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace, settings: Settings) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    try:
        identity = KeyVerifier(settings.auth).verify(key)
    except GatewayError as exc:
        print(f"edgeproxy: {exc.message}", file=sys.stderr)
        return 1
    print(orjson.dumps(dataclasses.asdict(identity), option=orjson.OPT_INDENT_2).decode())
    return 0


def _duration(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 12h, 90d or 2w, got {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _budget(text: str) -> tuple[float, str]:
    match = _BUDGET.match(text.strip())
    period = (match.group(2) or "month") if match else ""
    if not match or period not in PERIODS:
        raise argparse.ArgumentTypeError(f"expected USD[/day|/week|/month], e.g. 50/month, got {text!r}")
    return float(match.group(1)), period


def _models(text: str) -> tuple[str, ...]:
    return tuple(model.strip() for model in text.split(",") if model.strip())


def _rate_limit(text: str) -> str:
    try:
        parse_rate_limit_policy(text, "--rate-limit")
    except GatewayError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def _key_id(text: str) -> str:
    if not KEY_ID.match(text):
        raise argparse.ArgumentTypeError(f"not a key id: {text!r}")
    return text
