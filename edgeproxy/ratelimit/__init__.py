"""Rate limits: which policies apply (policies.py), sliding windows in memory (windows.py) or Redis
(redis_windows.py), and the stage that admits, refuses and settles (stage.py)."""

from __future__ import annotations

from ..cache.remote import RedisCounters
from ..settings import RateLimitSettings
from .policies import PolicyBook
from .redis_windows import RedisWindows
from .stage import RateLimitStage
from .windows import MemoryWindows, Windows


def open_windows(settings: RateLimitSettings, counters: RedisCounters | None = None) -> Windows:
    """The configured backend: exact windows in this process, or in Redis shared by a fleet."""
    if settings.url.startswith("memory://"):
        return MemoryWindows()
    return RedisWindows.open(settings, counters)


__all__ = ["MemoryWindows", "PolicyBook", "RateLimitStage", "RedisWindows", "Windows", "open_windows"]
