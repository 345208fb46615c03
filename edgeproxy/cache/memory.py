"""An aiocache backend for one process: least-recently-used entries go once the byte budget is spent.

aiocache's SimpleMemoryCache has no size bound, and expires entries through a private
(name-mangled) per-key timer that a subclass cannot hook to keep a byte count. This backend
keeps aiocache's public API (so the store treats it like RedisCache) over an OrderedDict,
with expiry checked when an entry is read or evicted, so there is no timer per entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from aiocache.base import BaseCache

# Dict slot, key object and tuple around each value: a rough per-entry cost beyond its bytes.
ENTRY_OVERHEAD = 160


class BoundedMemoryCache(BaseCache):
    """Values are bytes (from the serializer); `max_bytes` bounds their sum, keys and overhead included."""

    NAME = "bounded-memory"

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", None)  # nothing here waits; skip aiocache's wait_for task
        super().__init__(**kwargs)
        self.max_bytes = max_bytes
        self.size = 0
        self.evictions = 0
        self.rejected = 0
        self._clock = clock
        # key -> (value, expires at on `clock`, or None for never)
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _cost(self, key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def _lookup(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        value, expires = found
        if expires is not None and self._clock() >= expires:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def _remove(self, key: str) -> bool:
        found = self._entries.pop(key, None)
        if found is None:
            return False
        self.size -= self._cost(key, found[0])
        return True

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> bytes | None:
        return self._lookup(key)

    async def _multi_get(self, keys: Sequence[str], encoding: str | None = None, _conn: Any = None) -> list[Any]:
        return [self._lookup(key) for key in keys]

    async def _set(
        self, key: str, value: bytes, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> bool:
        cost = self._cost(key, value)
        self._remove(key)
        if cost > self.max_bytes:
            self.rejected += 1
            return False
        while self.size + cost > self.max_bytes and self._entries:
            oldest, (old_value, _expires) = self._entries.popitem(last=False)
            self.size -= self._cost(oldest, old_value)
            self.evictions += 1
        self._entries[key] = (value, self._clock() + ttl if ttl else None)
        self.size += cost
        return True

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._lookup(key) is not None

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(self._remove(key))

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace is None:
            self._entries.clear()
            self.size = 0
        else:
            for key in [k for k in self._entries if k.startswith(namespace)]:
                self._remove(key)
        return True
