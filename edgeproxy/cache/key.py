"""The cache key: what makes two requests the same question, asked by the same tenant."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from ..exchange import Exchange
from ..options import CachePolicy

# The tenant recorded on entries of a namespace shared by every caller (`cache.shared_namespace`).
SHARED_TENANT = "*"


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: str  # hex; every slot of the bucket is `<digest>:<index>`
    tenant: str

    def slot(self, index: int) -> str:
        return f"{self.digest}:{index}"


def tenant_of(ex: Exchange) -> str:
    """The caller's namespace: its app and gateway key (empty for anonymous callers)."""
    return f"{ex.identity.app_id}/{ex.identity.key_id}"


def canonical_body(ex: Exchange) -> bytes:
    """A JSON object re-dumped with sorted keys (order and whitespace don't matter); other bodies raw."""
    document = ex.json()
    if document is None:
        return ex.body
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def cache_key(ex: Exchange, policy: CachePolicy, *, shared: bool) -> CacheKey:
    """Hash of method, target, path and query, canonical body, seed and (unless shared) tenant."""
    tenant = SHARED_TENANT if shared else tenant_of(ex)
    target = ex.route.target
    parts = (
        ex.request.method,
        target.name,
        target.base_url,
        ex.route.path,
        ex.request.query_string,
        policy.seed,
        tenant,
    )
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        encoded = part.encode()
        # Length-prefixed, so no two different field lists hash the same bytes.
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    digest.update(canonical_body(ex))
    return CacheKey(digest.hexdigest(), tenant)
