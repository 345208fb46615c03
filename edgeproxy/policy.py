"""Prompt policy per app: model allowlist, parameter caps, banned input, system prompt, output guard.

The guard itself, which redacts the answer, is `output_guard.py`.

The app comes from the key (`ex.identity.app_id`). An app without its own `[apps.<name>]`
section, and a request without a key, get `[apps.default]` when it is configured. A key's
own `models` and `max_tokens` claims apply on top of its app's.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from aiohttp import web

from .errors import GatewayError
from .exchange import Exchange
from .metrics import Metrics
from .output_guard import OutputGuard
from .pipeline import Handler
from .settings import AppPolicy, SettingsError

DEFAULT_APP = "default"
_CHAT_PATH = "/v1/chat/completions"
_ANTHROPIC_PATH = "/v1/messages"
_TOKEN_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The parts of a request body that hold the prompt: chat messages, completions, embeddings, Anthropic.
_INPUT_FIELDS = ("messages", "prompt", "input", "system")


def app_policy(apps: Mapping[str, AppPolicy], app_id: str) -> tuple[str, AppPolicy] | None:
    """The policy section that governs an app: its own, else `[apps.default]`, else none."""
    if app_id and app_id in apps:
        return app_id, apps[app_id]
    if DEFAULT_APP in apps:
        return DEFAULT_APP, apps[DEFAULT_APP]
    return None


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An AppPolicy with its patterns compiled once, at startup."""

    name: str
    policy: AppPolicy
    banned: tuple[re.Pattern[str], ...]
    guard: re.Pattern[str] | None
    # A stream holds back this many characters, so a guarded phrase split across chunks is caught.
    guard_hold: int

    @classmethod
    def compile(cls, name: str, policy: AppPolicy) -> CompiledPolicy:
        banned = []
        for index, pattern in enumerate(policy.banned_patterns):
            try:
                banned.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise SettingsError(
                    f"apps.{name}.banned_patterns[{index}] is not a valid regex: {exc}"
                ) from None
        phrases = sorted({p for p in policy.output_guard if p}, key=len, reverse=True)
        # Longest first, so an alternation prefers "secret plan" to "secret" at the same spot.
        guard = re.compile("|".join(map(re.escape, phrases)), re.IGNORECASE) if phrases else None
        return cls(name, policy, tuple(banned), guard, len(phrases[0]) - 1 if phrases else 0)


class Police:
    """The police stage: refuse what the policy forbids, then rewrite the prompt and guard the answer."""

    def __init__(self, apps: Mapping[str, AppPolicy], metrics: Metrics) -> None:
        self._apps = apps
        self._metrics = metrics
        self._compiled = {name: CompiledPolicy.compile(name, policy) for name, policy in apps.items()}

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        found = app_policy(self._apps, ex.identity.app_id)
        compiled = self._compiled[found[0]] if found else None
        identity = ex.identity
        if compiled is None and not identity.models and identity.max_tokens is None:
            return call_next(ex)
        document = ex.json() if ex.body else None
        try:
            self._check_model(ex, document, compiled)
            if document is not None:
                self._check_max_tokens(ex, document, compiled)
                if compiled is not None:
                    _check_banned(ex, document, compiled)
        except GatewayError as err:
            self._metrics.policy_blocked(err.code or "policy")
            raise
        if document is not None and compiled is not None:
            _inject_system_prompt(ex, document, compiled.policy)
        if compiled is not None and compiled.guard is not None:
            ex.response_filter = OutputGuard(compiled.guard, compiled.guard_hold)
        return call_next(ex)

    @staticmethod
    def _check_model(ex: Exchange, document: dict[str, Any] | None, compiled: CompiledPolicy | None) -> None:
        rules = [(ex.identity.models, f"key {ex.identity.key_id}")]
        if compiled is not None:
            rules.append((compiled.policy.models, f"apps.{compiled.name}.models"))
        rules = [(allowed, rule) for allowed, rule in rules if allowed]
        if not rules or not ex.body:
            return
        if document is None:
            # A multipart or other non-JSON body could name any model where we cannot see it.
            raise GatewayError(
                403, "A model allowlist applies, and it needs a JSON body", code="model_not_allowed"
            )
        wanted = [document.get("model")] + [f.model for f in ex.options.fallbacks if f.model]
        for model in wanted:
            if not isinstance(model, str):
                continue
            for allowed, rule in rules:
                if not any(fnmatchcase(model, pattern) for pattern in allowed):
                    raise GatewayError(
                        403,
                        f"Model {model!r} is not allowed by {rule} (allowed: {', '.join(allowed)})",
                        param="model",
                        code="model_not_allowed",
                    )

    @staticmethod
    def _check_max_tokens(ex: Exchange, document: dict[str, Any], compiled: CompiledPolicy | None) -> None:
        caps = [(ex.identity.max_tokens, f"key {ex.identity.key_id}")]
        if compiled is not None:
            caps.append((compiled.policy.max_tokens, f"apps.{compiled.name}.max_tokens"))
        for param in _TOKEN_PARAMS:
            value = document.get(param)
            if not isinstance(value, int):
                continue
            for cap, rule in caps:
                if cap is not None and value > cap:
                    raise GatewayError(
                        400,
                        f"{param}={value} exceeds the cap of {cap} set by {rule}",
                        param=param,
                        code="max_tokens_exceeded",
                    )


def _check_banned(ex: Exchange, document: dict[str, Any], compiled: CompiledPolicy) -> None:
    if not compiled.banned:
        return
    for text in input_texts(document):
        for index, pattern in enumerate(compiled.banned):
            if pattern.search(text):
                ex.outcome = "blocked"
                # The pattern's position, not the pattern: naming it would teach a client to dodge it.
                raise GatewayError(
                    400,
                    f"Input refused by policy apps.{compiled.name}.banned_patterns (pattern {index})",
                    code="policy_violation",
                )


def input_texts(document: dict[str, Any]) -> Iterator[str]:
    """Every piece of prompt text in a request body (strings, text parts, message contents)."""
    for field in _INPUT_FIELDS:
        if field in document:
            yield from _texts(document[field], 0)


def _texts(value: Any, depth: int) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth > 8:
        return
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item, depth + 1)
    elif isinstance(value, dict):
        for key in ("content", "text"):
            if key in value:
                yield from _texts(value[key], depth + 1)


def _inject_system_prompt(ex: Exchange, document: dict[str, Any], policy: AppPolicy) -> None:
    prompt = policy.system_prompt
    if not prompt:
        return
    replace = policy.system_prompt_mode == "replace"
    if ex.route.path == _CHAT_PATH and isinstance(document.get("messages"), list):
        messages = document["messages"]
        if replace:
            # "developer" is the newer OpenAI name for the system role.
            messages = [
                m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))
            ]
        ex.replace_json({**document, "messages": [{"role": "system", "content": prompt}, *messages]})
    elif ex.route.path == _ANTHROPIC_PATH and isinstance(document.get("messages"), list):
        system = document.get("system")
        if replace or not system:
            system = prompt
        elif isinstance(system, str):
            system = f"{prompt}\n\n{system}"
        elif isinstance(system, list):
            system = [{"type": "text", "text": prompt}, *system]
        ex.replace_json({**document, "system": system})
