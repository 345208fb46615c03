"""Spool: batches the store could not take, kept on disk until a replay lands them.

Layout under `<data_dir>/spool/`: one file per batch, `<time_ns>-<pid>-<seq>.jsonl`, so names sort
oldest first. Line one is a header `{"v":1,"token":…,"rows":N}`, then one orjson array per row.
A batch is written to `<name>.tmp`, fsynced, renamed to `.jsonl` and the folder fsynced: only
then is it safe, and only a `.jsonl` is replayed. Files are deleted only after their insert
succeeded.

Crash safety: a `.tmp` left by a killed writer (kill -9 mid-write) is promoted by `recover()`;
reading any file stops at the first line that is cut short or does not parse, keeps the rows
before it and reports the batch incomplete, never fails. A file without a readable header holds
no rows and is moved to `rejected/`, like a batch the store refuses for its content.

Processes sharing the folder (several gateway workers) coordinate with `flock`: a writer locks
its `.tmp` until renamed, a replayer locks the batch it is sending, and a file locked by a live
process is skipped. The byte budget is counted per process, so it is approximate across workers.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("edgeproxy.logs")

VERSION = 1


@dataclass(slots=True)
class SpooledBatch:
    """A batch read back from the spool, locked against other replayers until released."""

    path: Path
    token: str
    rows: list[list[Any]]
    # False when the file was cut short: `rows` are the ones that survived.
    complete: bool
    fd: int
    size: int


class Spool:
    """Append-only batch files with a byte budget. Not thread-safe: call it from one thread."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.rejected_dir = directory / "rejected"
        self.max_bytes = max_bytes
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        # Lock fds of batches handed out and not yet released, so close() can free them.
        self._held: set[int] = set()
        self._bytes = sum(
            _size(p) for p in (*directory.iterdir(), *self.rejected_dir.iterdir()) if p.is_file()
        )

    @property
    def used_bytes(self) -> int:
        """Bytes held, including rejected batches (they count against the budget until removed)."""
        return self._bytes

    def write(self, token: str, rows: Sequence[Sequence[Any]]) -> bool:
        """Store a batch durably; False (and nothing written) when it would exceed the budget."""
        lines = [orjson.dumps({"v": VERSION, "token": token, "rows": len(rows)})]
        lines.extend(orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS) for row in rows)
        data = b"\n".join(lines) + b"\n"
        if self._bytes + len(data) > self.max_bytes:
            return False
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}"
        tmp = self.directory / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.rename(tmp, self.directory / f"{name}.jsonl")
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        # The rename is durable only once the folder's entry is on disk.
        _fsync_dir(self.directory)
        self._bytes += len(data)
        return True

    def segments(self) -> list[Path]:
        """Batch files waiting for replay, oldest first."""
        return sorted(self.directory.glob("*.jsonl"))

    def recover(self) -> int:
        """Promote `.tmp` files whose writer died (unlocked) so their surviving rows replay; returns count."""
        promoted = 0
        for tmp in sorted(self.directory.glob("*.tmp")):
            fd = _lock(tmp)
            if fd is None:
                continue  # a live writer, or already renamed
            try:
                os.rename(tmp, tmp.with_suffix(".jsonl"))
                promoted += 1
            finally:
                os.close(fd)
        if promoted:
            _fsync_dir(self.directory)
            log.warning("log spool: recovered %d partially written batch file(s) from a crash", promoted)
        return promoted

    def read(self, path: Path) -> SpooledBatch | None:
        """Lock and parse one batch file; None when another process holds it, it vanished, or it is unreadable."""
        fd = _lock(path)
        if fd is None:
            return None
        try:
            stat = os.fstat(fd)
            if stat.st_nlink == 0:
                os.close(fd)
                return None  # deleted by another replayer after we opened it
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        except BaseException:
            os.close(fd)
            raise
        header, rows, complete = _parse(data)
        batch = SpooledBatch(path, "", rows, complete, fd, len(data))
        self._held.add(fd)
        if header is None and not data:
            self.delete(batch)  # created, then killed before a byte was written
            return None
        if header is None:
            log.warning("log spool: %s has no readable header; moved to %s", path.name, self.rejected_dir)
            self.reject(batch)
            return None
        batch.token = str(header.get("token", ""))
        if complete and header.get("rows") != len(rows):
            batch.complete = False
        if not batch.complete:
            log.warning(
                "log spool: %s was cut short; replaying the %d rows that survived", path.name, len(rows)
            )
        return batch

    def delete(self, batch: SpooledBatch) -> None:
        """Remove a batch that landed in the store."""
        batch.path.unlink(missing_ok=True)
        self._release(batch)

    def reject(self, batch: SpooledBatch) -> None:
        """Move a batch the store refuses to `rejected/`, out of the replay order but kept for an operator."""
        os.replace(batch.path, self.rejected_dir / batch.path.name)
        self._release(batch, keep_bytes=True)

    def release(self, batch: SpooledBatch) -> None:
        """Give a batch back for a later replay (its insert failed)."""
        self._release(batch, keep_bytes=True)

    def close(self) -> None:
        """Release every batch still handed out (a replay cancelled mid-flight)."""
        for fd in self._held:
            os.close(fd)
        self._held.clear()

    def _release(self, batch: SpooledBatch, keep_bytes: bool = False) -> None:
        if batch.fd in self._held:
            self._held.discard(batch.fd)
            os.close(batch.fd)
        if not keep_bytes:
            self._bytes = max(0, self._bytes - batch.size)


def _parse(data: bytes) -> tuple[dict[str, Any] | None, list[list[Any]], bool]:
    """Header, the rows up to the first damaged line, and whether none was damaged."""
    lines = data.split(b"\n")
    # A whole file ends with a newline, leaving an empty last item; anything else there was cut.
    complete = lines[-1] == b""
    body: Iterable[bytes] = lines[:-1]
    header: dict[str, Any] | None = None
    rows: list[list[Any]] = []
    for line in body:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            return header, rows, False
        if header is None:
            if not isinstance(value, dict) or value.get("v") != VERSION:
                return None, rows, False
            header = value
        elif isinstance(value, list):
            rows.append(value)
        else:
            return header, rows, False
    return header, rows, complete


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when it is locked elsewhere or gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
