"""The request log: records batched into ClickHouse (server or embedded chDB), spooled to disk when it is down."""

from .batcher import LogBatcher, LogStats
from .migrate import cluster_ddl, migrate, migrate_sync
from .record import COLUMNS, LogRecord, cap_body
from .spool import Spool
from .store import LogStore, open_log_store

__all__ = [
    "COLUMNS",
    "LogBatcher",
    "LogRecord",
    "LogStats",
    "LogStore",
    "Spool",
    "cap_body",
    "cluster_ddl",
    "migrate",
    "migrate_sync",
    "open_log_store",
]
