"""Every command a user or the README runs answers `--help`: argparse formats help text only when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    ["edgeproxy"],
    ["edgeproxy", "serve"],
    ["edgeproxy", "migrate"],
    ["edgeproxy", "keys"],
    ["edgeproxy", "usage"],
    ["edgeproxy", "requests"],
    ["bench.compare"],
    ["bench.loadgen"],
    ["bench.mock_upstream"],
    ["bench.instructions"],
    ["bench.log_insert"],
    ["bench.floor_proxy"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_the_command_prints_its_usage(command: list[str]) -> None:
    module, *subcommand = command
    done = subprocess.run(
        [sys.executable, "-m", module, *subcommand, "--help"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
