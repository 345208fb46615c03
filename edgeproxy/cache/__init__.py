"""Response cache: key (key.py), stored form (entry.py), backends (memory.py, store.py), stage (stage.py)."""

from .stage import CacheStage
from .store import ResponseStore, open_store

__all__ = ["CacheStage", "ResponseStore", "open_store"]
