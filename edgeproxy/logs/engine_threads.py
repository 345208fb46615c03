"""The embedded engine's threads at a low CPU priority, so the request log yields the cores to serving.

chDB runs ClickHouse inside the gateway's process, on threads of its own: the insert pipeline,
merges, housekeeping (tens of threads). At the default priority each of them preempts the event
loop whenever it wakes on the loop's core: at c64 the loop was preempted about twice as often
with the embedded log on as with it off; with these threads lowered, as often as with it off
(bench/README.md, "The embedded engine's threads").

Linux lets a process raise the nice value of its own threads without privilege (lowering it
again needs CAP_SYS_NICE), so a thread stays where it was put. Left alone: the threads Python
started (the event loop, the executors, the log writer, whose GIL the loop waits on) and libuv's
workers (uvloop's DNS lookups), whose work is the gateway's own. Every other thread is lowered:
chDB's, and those of the libraries it loads (numpy's). chDB starts threads as it needs them, so
`lower()` runs after every write and looks at the threads it has not seen yet.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("edgeproxy.logs")

TASKS = "/proc/self/task"
# The name libuv gives the threads of its pool (uvloop's getaddrinfo and file calls).
LIBUV_WORKER = "libuv-worker"


class EngineThreads:
    """Gives the embedded engine's threads of this process the nice value `nice` (0: leaves them be)."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._seen: set[int] = set()
        self._warned = False

    def lower(self) -> None:
        """Lower the engine threads started since the last call. Never raises."""
        if self.nice <= 0:
            return
        try:
            current = {int(name) for name in os.listdir(TASKS)}
        except OSError:
            return  # no /proc: not Linux
        python = {thread.native_id for thread in threading.enumerate()}
        fresh = current - self._seen - python
        for tid in fresh:
            try:
                with open(f"{TASKS}/{tid}/comm") as comm:
                    if comm.read().strip() == LIBUV_WORKER:
                        continue
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except (FileNotFoundError, ProcessLookupError):
                continue  # the thread ended meanwhile
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("could not lower the embedded log store's thread priority: %s", exc)
        # Ended threads are forgotten: the kernel reuses their ids.
        self._seen = (self._seen | fresh) & current
