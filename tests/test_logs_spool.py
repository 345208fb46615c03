"""Spool: durable batch files, replay order, byte budget, and what a crash leaves behind."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from edgeproxy.logs.spool import Spool

ROWS = [["id-1", 1, {"k": "v"}, None, "é\nnewline"], ["id-2", 2, {}, 1.25, ""]]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", max_bytes=1_000_000)


def test_write_read_delete_round_trip(spool: Spool) -> None:
    assert spool.write("tok", ROWS)
    assert not list(spool.directory.glob("*.tmp"))
    [path] = spool.segments()
    batch = spool.read(path)
    assert batch is not None
    assert (batch.token, batch.rows, batch.complete) == ("tok", ROWS, True)
    assert spool.used_bytes == path.stat().st_size
    spool.delete(batch)
    assert spool.segments() == []
    assert spool.used_bytes == 0


def test_segments_come_back_oldest_first(spool: Spool) -> None:
    for n in range(12):
        assert spool.write(f"tok{n}", [[n]])
    tokens = []
    for path in spool.segments():
        batch = spool.read(path)
        assert batch is not None
        tokens.append(batch.token)
        spool.release(batch)
    assert tokens == [f"tok{n}" for n in range(12)]


def test_budget_refuses_a_batch_that_does_not_fit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=200)
    assert spool.write("a", [["x" * 50]])
    assert not spool.write("b", [["x" * 150]])
    assert len(spool.segments()) == 1
    # A fresh Spool over the same folder counts what is already there.
    assert Spool(tmp_path / "spool", max_bytes=200).used_bytes == spool.used_bytes


def test_file_cut_mid_line_keeps_the_rows_before_the_cut(spool: Spool) -> None:
    spool.write("tok", [["a"], ["b"], ["c"]])
    [path] = spool.segments()
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b'["c"]') + 3])
    batch = spool.read(path)
    assert batch is not None
    assert (batch.rows, batch.complete) == ([["a"], ["b"]], False)


def test_file_missing_rows_is_incomplete(spool: Spool) -> None:
    spool.write("tok", [["a"], ["b"]])
    [path] = spool.segments()
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b'["b"]')])
    batch = spool.read(path)
    assert batch is not None
    assert (batch.rows, batch.complete) == ([["a"]], False)


def test_garbage_line_stops_the_batch_without_failing(spool: Spool) -> None:
    spool.write("tok", [["a"], ["b"]])
    [path] = spool.segments()
    path.write_bytes(path.read_bytes().replace(b'["b"]', b"\x00\x00{"))
    batch = spool.read(path)
    assert batch is not None
    assert (batch.rows, batch.complete) == ([["a"]], False)


def test_file_without_a_header_is_rejected_not_fatal(spool: Spool) -> None:
    (spool.directory / "00000000000000000001-1-000000.jsonl").write_bytes(b'{"v":1,"tok')
    (spool.directory / "00000000000000000002-1-000000.jsonl").write_bytes(b"")
    for path in spool.segments():
        assert spool.read(path) is None
    assert spool.segments() == []
    assert [p.name for p in spool.rejected_dir.iterdir()] == ["00000000000000000001-1-000000.jsonl"]


def test_recover_promotes_a_dead_writers_tmp_file(spool: Spool) -> None:
    # What kill -9 mid-write leaves: a .tmp with a header, one row and half of the next.
    tmp = spool.directory / "00000000000000000001-99-000000.tmp"
    tmp.write_bytes(b'{"v":1,"token":"t","rows":3}\n["a"]\n["b')
    assert spool.recover() == 1
    [path] = spool.segments()
    batch = spool.read(path)
    assert batch is not None
    assert (batch.token, batch.rows, batch.complete) == ("t", [["a"]], False)


def test_recover_leaves_a_live_writers_tmp_file(spool: Spool) -> None:
    tmp = spool.directory / "00000000000000000001-99-000000.tmp"
    tmp.write_bytes(b'{"v":1,"token":"t","rows":1}\n')
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert spool.recover() == 0
        assert tmp.exists()
    finally:
        os.close(fd)


def test_a_batch_locked_by_another_replayer_is_skipped(spool: Spool) -> None:
    spool.write("tok", ROWS)
    [path] = spool.segments()
    other = Spool(spool.directory, max_bytes=1_000_000)
    batch = other.read(path)
    assert batch is not None
    assert spool.read(path) is None
    other.release(batch)
    again = spool.read(path)
    assert again is not None
    spool.delete(again)


def test_reject_moves_the_file_out_of_the_replay_order(spool: Spool) -> None:
    spool.write("tok", ROWS)
    [path] = spool.segments()
    batch = spool.read(path)
    assert batch is not None
    spool.reject(batch)
    assert spool.segments() == []
    assert (spool.rejected_dir / path.name).exists()
    assert spool.used_bytes > 0  # still on disk, still counted


def test_close_frees_batches_still_handed_out(spool: Spool) -> None:
    spool.write("tok", ROWS)
    [path] = spool.segments()
    assert spool.read(path) is not None
    spool.close()
    other = Spool(spool.directory, max_bytes=1_000_000)
    assert other.read(path) is not None
