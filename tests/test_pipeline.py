"""chain: stages run outermost first, async or passing straight through, and a refusal reaches the outer stages."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable

import pytest
from aiohttp import web

from edgeproxy.errors import GatewayError
from edgeproxy.exchange import Exchange
from edgeproxy.pipeline import IDS_PER_READ, Handler, chain, request_ids


class Waiting:
    """An async stage: records itself before and after the rest of the chain."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def __call__(self, ex: Exchange, call_next: Handler) -> web.StreamResponse:
        self.seen.append(self.name)
        try:
            return await call_next(ex)
        finally:
            self.seen.append(f"/{self.name}")


class Passing:
    """A stage with nothing to do: hands back the next handler's awaitable, or refuses at once."""

    def __init__(self, name: str, seen: list[str], refuse: bool = False) -> None:
        self.name, self.seen, self.refuse = name, seen, refuse

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        self.seen.append(self.name)
        if self.refuse:
            raise GatewayError(429, "refused")
        return call_next(ex)


async def test_stages_run_in_order_around_the_last_handler() -> None:
    seen: list[str] = []

    async def last(ex: Exchange) -> web.StreamResponse:
        seen.append("last")
        return web.Response(status=204)

    handler = chain([Waiting("a", seen), Passing("b", seen), Waiting("c", seen), Passing("d", seen)], last)
    response = await handler(None)  # type: ignore[arg-type]
    assert response.status == 204
    assert seen == ["a", "b", "c", "d", "last", "/c", "/a"]


async def test_a_stage_that_refuses_without_awaiting_is_seen_by_the_outer_ones() -> None:
    seen: list[str] = []

    async def last(ex: Exchange) -> web.StreamResponse:
        raise AssertionError("a refused request goes no further")

    handler = chain([Waiting("a", seen), Passing("b", seen, refuse=True), Waiting("c", seen)], last)
    with pytest.raises(GatewayError):
        await handler(None)  # type: ignore[arg-type]
    assert seen == ["a", "b", "/a"]


def test_request_ids_are_distinct_canonical_version_4_uuids_across_blocks() -> None:
    ids = list(itertools.islice(request_ids(), 3 * IDS_PER_READ + 1))
    parsed = [uuid.UUID(request_id) for request_id in ids]
    assert [str(u) for u in parsed] == ids
    assert {(u.version, u.variant) for u in parsed} == {(4, uuid.RFC_4122)}
    assert len(set(ids)) == len(ids)
    # Random bits survive the version and variant: every variant digit turns up.
    assert {request_id[19] for request_id in ids} == set("89ab")
