"""The `edgeproxy` command: serve, migrate, keys, usage, requests."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .keys_cli import add_keys_command
from .settings import DEFAULT_UPSTREAM, Settings, SettingsError
from .settings_loader import load_settings
from .usage_cli import add_usage_commands

log = logging.getLogger("edgeproxy")

Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeproxy",
        description="Self-hosted LLM API gateway: point the OpenAI SDK's base_url at it.",
        epilog="Settings precedence: flag > environment (EDGEPROXY_*) > config file > default.",
    )
    parser.add_argument("--config", help="TOML config file (env EDGEPROXY_CONFIG)")
    parser.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway", description="Run the gateway.")
    serve.add_argument("--host", help="bind address (env EDGEPROXY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (env EDGEPROXY_PORT, default 8787)")
    serve.add_argument(
        "--workers", type=int, help="processes sharing the port via SO_REUSEPORT (env EDGEPROXY_WORKERS, default 1)"
    )
    serve.add_argument(
        "--upstream", help=f"base URL of the default OpenAI-compatible target (env EDGEPROXY_UPSTREAM, default {DEFAULT_UPSTREAM})"
    )
    serve.add_argument(
        "--data-dir", help="where the embedded log store and spool live (env EDGEPROXY_DATA_DIR, default ./.edgeproxy)"
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the log schema")
    migrate.add_argument("--data-dir", help="embedded store folder (env EDGEPROXY_DATA_DIR)")
    migrate.add_argument("--cluster", help="print ReplicatedMergeTree + Distributed DDL for this cluster instead")
    migrate.set_defaults(run=_migrate)
    add_keys_command(commands)
    add_usage_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    flags: dict[str, Any] = {
        key: getattr(args, key, None) for key in ("config", "host", "port", "workers", "upstream", "data_dir")
    }
    try:
        settings = load_settings(flags=flags)
    except SettingsError as exc:
        print(f"edgeproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    run: Command = args.run
    try:
        return run(args, settings)
    except SettingsError as exc:  # found while opening resources, e.g. an unreadable key file
        print(f"edgeproxy: configuration error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from .serve import serve

    return serve(settings)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .logs.migrate import cluster_ddl, migrate_sync

    if args.cluster:
        print(cluster_ddl(settings.logs, args.cluster))
        return 0
    for name in migrate_sync(settings):
        print(f"applied {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
