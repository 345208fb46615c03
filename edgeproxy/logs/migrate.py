"""Schema migrations: numbered SQL files in `schema/`, applied once each, in order, per table.

Each file is a `string.Template` (`${database}`, `${table}`, `${engine}`, `${on_cluster}`,
`${ttl}`, `${settings}`) of `;`-separated statements, each idempotent (`IF NOT EXISTS`) so a
crash between a statement and its bookkeeping row is harmless. `<database>.schema_migrations`
records what ran for which table. The TTL (following `ttl_days`) and the merge and part-cleanup
settings (those the server knows) are brought up to date on every run, not only at creation.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from ..settings import LogSettings, Settings
from .store import IDENTIFIER, LogStore, open_log_store

log = logging.getLogger("edgeproxy.logs")

SCHEMA_DIR = Path(__file__).with_name("schema")

# Merge parts column by column: a horizontal merge of this ~35-column table held ~200 MB of read
# buffers at once, a vertical one ~40 MB; the embedded store pays that inside the gateway's process.
VERTICAL_MERGES = (
    "vertical_merge_algorithm_min_rows_to_activate = 1, vertical_merge_algorithm_min_columns_to_activate = 1"
)
# Delete merged-away parts every 5 s instead of after ClickHouse's backoff of up to 5 minutes. Until
# then each one held ~0.85 MB of memory (embedded: in the gateway's process; 110 of them held ~100 MB)
# and its disk. A server still keeps them for its `old_parts_lifetime` first. Replicated tables keep
# the default: there every cleanup round also talks to Keeper.
PROMPT_CLEANUP = "cleanup_delay_period = 5, max_cleanup_delay_period = 5, cleanup_delay_period_random_add = 0"
# Merge up to ~20 parts at a time rather than ~5, so each row is rewritten fewer times. Over 900 000
# rows in 3000-row inserts (bench/log_insert.py --setting merge_selector_base=5 for the default),
# the merge threads spent ~6 µs per row against ~14, with at most 27 live parts against 12.
# Embedded, those threads share the gateway's cores. Exposed by ClickHouse 24.11; an older server
# keeps its default (see _known).
WIDE_MERGES = "merge_selector_base = 20"
# (label, settings) set at CREATE and brought up to date on existing tables, by kind of table.
Kept = tuple[tuple[str, str], ...]
KEPT_REPLICATED: Kept = (("vertical merges", VERTICAL_MERGES),)
KEPT_LOCAL: Kept = (*KEPT_REPLICATED, ("prompt cleanup", PROMPT_CLEANUP), ("wide merges", WIDE_MERGES))
BASE_SETTINGS = "index_granularity = 8192, ttl_only_drop_parts = 1"
# Part-level dedup: a spooled batch replayed with the insert token it was first sent with is
# dropped by the server even before ReplacingMergeTree merges. Replicated tables deduplicate
# inserts by default (replicated_deduplication_window).
LOCAL_BASE = f"{BASE_SETTINGS}, non_replicated_deduplication_window = 1000"


def settings_clause(base: str, kept: Kept) -> str:
    """The CREATE's SETTINGS: `base` and every kept setting."""
    return ", ".join((base, *(settings for _, settings in kept)))


REPLICATED_SETTINGS = settings_clause(BASE_SETTINGS, KEPT_REPLICATED)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS ${database}.schema_migrations ${on_cluster}
(
    table_name String,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ${engine}
ORDER BY (table_name, name)
"""


@dataclass(frozen=True)
class Migration:
    name: str
    template: str

    def statements(self, **values: str) -> list[str]:
        """The rendered statements, comments dropped, one per `;`."""
        text = Template(self.template).substitute(values)
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
        return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def migrations() -> list[Migration]:
    """Every migration, in the order its numbered file name gives."""
    return [Migration(path.stem, path.read_text()) for path in sorted(SCHEMA_DIR.glob("[0-9]*.sql"))]


def ttl_clause(ttl_days: int) -> str:
    return f"TTL toDateTime(started_at) + INTERVAL {ttl_days} DAY" if ttl_days > 0 else ""


async def migrate(store: LogStore, *, ttl_days: int | None = None) -> list[str]:
    """Bring `store`'s database and table up to date; returns what was applied (empty when current).

    `ttl_days` (settings.logs.ttl_days; 0 = keep forever) is enforced on every run; None leaves it be.
    """
    database, table = store.database, store.table
    await store.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    await store.command(
        Template(MIGRATIONS_TABLE).substitute(database=database, on_cluster="", engine="ReplacingMergeTree")
    )
    rows = await store.query(
        f"SELECT name FROM {database}.schema_migrations FINAL WHERE table_name = {{t:String}}", {"t": table}
    )
    done = {row["name"] for row in rows}
    kept = await _known(store, KEPT_LOCAL)
    applied: list[str] = []
    for migration in migrations():
        if migration.name in done:
            continue
        values = {
            "database": database,
            "table": table,
            "on_cluster": "",
            "engine": "ReplacingMergeTree",
            "ttl": ttl_clause(ttl_days or 0),
            "settings": settings_clause(LOCAL_BASE, kept),
        }
        for statement in migration.statements(**values):
            await store.command(statement)
        await store.command(
            f"INSERT INTO {database}.schema_migrations (table_name, name) VALUES ({{t:String}}, {{n:String}})",
            {"t": table, "n": migration.name},
        )
        applied.append(migration.name)
    applied += await _sync_table(store, ttl_days, kept)
    return applied


def migrate_sync(settings: Settings) -> list[str]:
    """For `edgeproxy migrate`: migrate the configured store (server or embedded) and close it."""

    async def run() -> list[str]:
        store = open_log_store(settings.logs, settings.data_dir)
        try:
            return await migrate(store, ttl_days=settings.logs.ttl_days)
        finally:
            await store.close()

    return asyncio.run(run())


async def _known(store: LogStore, kept: Kept) -> Kept:
    """The entries of `kept` whose every setting the server has; an older server keeps its defaults."""
    rows = await store.query(
        "SELECT name FROM system.merge_tree_settings WHERE name IN {names:Array(String)}",
        {"names": [name for _, settings in kept for name in _names(settings)]},
    )
    known = {row["name"] for row in rows}
    usable = []
    for label, settings in kept:
        if known.issuperset(_names(settings)):
            usable.append((label, settings))
        else:
            log.info("log store %s: the server does not know %s; its default stays", store.name, settings)
    return tuple(usable)


def _names(settings: str) -> list[str]:
    """`a = 1, b = 2` -> `["a", "b"]`."""
    return [setting.split(" = ")[0] for setting in settings.split(", ")]


async def _sync_table(store: LogStore, ttl_days: int | None, kept_local: Kept) -> list[str]:
    """Bring an existing table's TTL (when `ttl_days` is given) and merge settings up to date; what changed."""
    rows = await store.query(
        "SELECT engine, engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
        {"d": store.database, "t": store.table},
    )
    if not rows or not rows[0]["engine"].endswith("MergeTree"):
        return []  # a Distributed table: its local tables carry the TTL and settings
    engine, engine_full = rows[0]["engine"], rows[0]["engine_full"]
    changed = []
    # Tables created before a setting existed get it here; a fresh one has it from CREATE.
    # A replicated table keeps fewer settings; which of them the server knows, kept_local already says.
    kept = tuple(entry for entry in kept_local if entry in KEPT_REPLICATED) if engine.startswith("Replicated") else kept_local
    for label, settings in kept:
        if any(setting not in engine_full for setting in settings.split(", ")):
            await store.command(f"ALTER TABLE {store.qualified} MODIFY SETTING {settings}")
            changed.append(label)
    if ttl_days is None:
        return changed
    current = re.search(r"\bTTL toDateTime\(started_at\) \+ toIntervalDay\((\d+)\)", engine_full)
    has_ttl = " TTL " in f" {engine_full} "
    if ttl_days > 0 and not (current and int(current.group(1)) == ttl_days):
        await store.command(f"ALTER TABLE {store.qualified} MODIFY {ttl_clause(ttl_days)}")
        changed.append(f"ttl={ttl_days}d")
    elif ttl_days <= 0 and has_ttl:
        await store.command(f"ALTER TABLE {store.qualified} REMOVE TTL")
        changed.append("ttl=off")
    return changed


def cluster_ddl(settings: LogSettings, cluster: str) -> str:
    """SQL for a cluster: a replicated `<table>_local` on every shard and a Distributed `<table>` over it.

    Rows shard by request_id, so a replayed row lands where its first copy did and collapses with it.
    """
    for what, value in (("database", settings.database), ("table", settings.table), ("cluster", cluster)):
        if not IDENTIFIER.match(value):
            raise ValueError(f"{what} must be a plain identifier, got {value!r}")
    database, table, local = settings.database, settings.table, f"{settings.table}_local"
    on_cluster = f"ON CLUSTER {cluster}"
    out = [f"CREATE DATABASE IF NOT EXISTS {database} {on_cluster}"]
    out.append(
        Template(MIGRATIONS_TABLE)
        .substitute(
            database=database,
            on_cluster=on_cluster,
            engine=_replicated(database, "schema_migrations"),
        )
        .strip()
    )
    for migration in migrations():
        values = {
            "database": database,
            "table": local,
            "on_cluster": on_cluster,
            "engine": _replicated(database, local),
            "ttl": ttl_clause(settings.ttl_days),
            "settings": REPLICATED_SETTINGS,
        }
        out.extend(migration.statements(**values))
    out.append(
        f"CREATE TABLE IF NOT EXISTS {database}.{table} {on_cluster} AS {database}.{local}\n"
        f"ENGINE = Distributed({cluster}, {database}, {local}, cityHash64(request_id))"
    )
    names = ", ".join(m.name for m in migrations())
    header = f"-- edgeproxy request log for cluster {cluster}; migrations: {names}\n"
    return header + "".join(f"{statement};\n\n" for statement in out)


def _replicated(database: str, table: str) -> str:
    # {shard} and {replica} are the server's macros, filled per node.
    return f"ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{database}/{table}', '{{replica}}')"
