"""The embedded store's engine threads run at `logs.engine_nice`; the gateway's own threads keep their priority.

Each case runs in a fresh interpreter: chDB's threads live as long as the process, so in this
one an earlier test's store could have lowered them already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from edgeproxy.settings import SettingsError
from edgeproxy.settings_loader import load_settings

# Opens the embedded store as a 1-worker gateway does (`store`), or serves it as the log owner of a
# multi-worker one does (`owner`), writes a row, and prints every thread: [kind, name, nice].
SCRIPT = """
import asyncio, json, os, sys, threading, time, urllib.request
from pathlib import Path
from edgeproxy.logs.embedded_server import EmbeddedServer
from edgeproxy.logs.engine_threads import LIBUV_WORKER
from edgeproxy.logs.migrate import migrate
from edgeproxy.logs.record import LogRecord
from edgeproxy.logs.store import embedded_folder, open_log_store
from edgeproxy.settings import LogSettings

mode, nice, data_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

async def write_a_row(url):
    store = open_log_store(LogSettings(clickhouse_url=url, engine_nice=nice), data_dir)
    await migrate(store)
    await store.insert([LogRecord(request_id="0b8f6a4e-34a1-4f7e-9d52-41d2b0d8a2c1", started_at=time.time()).to_row()])
    return store

def threads():
    python = {t.native_id for t in threading.enumerate()}
    found = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as comm:
            name = comm.read().strip()
        kind = "python" if int(tid) in python else "libuv" if name == LIBUV_WORKER else "engine"
        found.append([kind, name, os.getpriority(os.PRIO_PROCESS, int(tid))])
    return found

async def main():
    server = None
    if mode == "owner":
        server = EmbeddedServer(embedded_folder(data_dir), engine_nice=nice)
        server.start()
    store = await write_a_row(server.url if server else None)
    print(json.dumps(threads()))
    await store.close()
    if server:
        server.stop()

asyncio.run(main())
"""


def threads_after_an_insert(mode: str, nice: int, data_dir: Path) -> list[tuple[str, str, int]]:
    """(kind, name, nice) of every thread of a fresh process that opened the embedded store and inserted a row."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(nice), str(data_dir)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [tuple(thread) for thread in orjson.loads(done.stdout)]  # type: ignore[misc]


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are read from /proc")
@pytest.mark.parametrize("mode", ["store", "owner"])
def test_the_engines_threads_are_lowered_and_the_gateways_are_not(tmp_path: Path, mode: str) -> None:
    threads = threads_after_an_insert(mode, 19, tmp_path)
    engine = [t for t in threads if t[0] == "engine"]
    assert len(engine) >= 3, threads  # chDB's pools: merges, schedules, inserts
    assert {t[2] for t in engine} == {19}, engine
    python = [t for t in threads if t[0] == "python"]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert python and {t[2] for t in python} == {base}, python  # the loop, the log writer, the executors


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are read from /proc")
def test_engine_nice_0_leaves_the_engines_threads_as_they_start(tmp_path: Path) -> None:
    engine = [t for t in threads_after_an_insert("store", 0, tmp_path) if t[0] == "engine"]
    assert engine and max(t[2] for t in engine) <= os.getpriority(os.PRIO_PROCESS, 0), engine


@pytest.mark.parametrize("value", [-1, 20])
def test_an_engine_nice_outside_0_to_19_is_refused_by_name(tmp_path: Path, value: int) -> None:
    config = tmp_path / "edgeproxy.toml"
    config.write_text(f"[logs]\nengine_nice = {value}\n")
    with pytest.raises(SettingsError, match="logs.engine_nice must be 0..19"):
        load_settings(config, env={})
