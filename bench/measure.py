"""One scenario driven against one contender from a separate load process, its server sampled meanwhile."""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import orjson

from . import loadgen, wrk
from .contenders import (
    ROOT,
    Backdrop,
    Running,
    Unavailable,
    command_output,
    cpu_seconds,
    debian_binary,
    machine_ticks,
    main_thread_cpu_seconds,
    rss_bytes,
    steal_share,
)
from .loadgen import LoadResult, Scenario

SAMPLE_SECONDS = 0.5
# The memory target: RSS flat within ±10 % at full load.
RSS_FLAT_SHARE = 0.10


@dataclass(frozen=True)
class Trace:
    """Resident memory samples of one process tree: (seconds since the load began, bytes)."""

    samples: tuple[tuple[float, int], ...]

    @cached_property
    def _settled(self) -> list[int]:
        # Read by every figure below, several times per report: computed once (the trace never changes).
        # The first fifth is warm-up (pools, caches and allocator arenas filling), not growth.
        if not self.samples:
            return []
        horizon = self.samples[-1][0] * 0.2
        return [size for at, size in self.samples if at >= horizon] or [self.samples[-1][1]]

    def _quarter(self) -> int:
        # Start and end are medians over a quarter of the settled run each, not over a moment: the
        # embedded engine's merges hold ~40 MB of buffers for a few seconds every ~20 s under c64
        # (bench/README.md), and a 20 s soak's last samples fell on the first of them every time.
        return max(1, len(self._settled) // 4)

    @property
    def start_mb(self) -> float:
        settled = self._settled
        return statistics.median(settled[: self._quarter()]) / 2**20 if settled else 0.0

    @property
    def end_mb(self) -> float:
        settled = self._settled
        return statistics.median(settled[-self._quarter():]) / 2**20 if settled else 0.0

    @property
    def peak_mb(self) -> float:
        return max((size for _, size in self.samples), default=0) / 2**20

    @property
    def drift(self) -> float:
        """Relative change from the settled start to the end: 0.05 is 5 % growth."""
        return self.end_mb / self.start_mb - 1.0 if self.start_mb else 0.0

    def seconds_beyond(self, share: float) -> float:
        """How long the settled run stayed more than `share` above its start (0.10: 10 %), sample by sample."""
        if len(self.samples) < 2:
            return 0.0
        limit = self.start_mb * (1.0 + share) * 2**20
        beyond = sum(1 for size in self._settled if size > limit)
        return beyond * self.samples[-1][0] / (len(self.samples) - 1)

    def describe(self) -> str:
        peak_over = self.peak_mb / self.start_mb - 1.0 if self.start_mb else 0.0
        return (f"{self.start_mb:.1f} MB → {self.end_mb:.1f} MB ({self.drift:+.1%}), peak {self.peak_mb:.1f} MB "
                f"({peak_over:+.1%}; {self.seconds_beyond(RSS_FLAT_SHARE):.1f} s above +{RSS_FLAT_SHARE:.0%}), {len(self.samples)} samples")


@dataclass(frozen=True)
class Measurement:
    """One scenario against one contender: the client's view plus the server's memory and CPU."""

    contender: str
    scenario: str
    result: LoadResult
    rss: Trace
    server_cpu_s: float
    # The mock's CPU while a proxy ran (None for `direct`, where the mock is the server).
    mock_cpu_s: float | None
    client_cpu_s: float
    # The event-loop thread's share of server_cpu_s, for a 1-worker edgeproxy (None otherwise): its
    # writer and engine threads run beside it, and the loop's figure moves less than req/s.
    loop_cpu_s: float | None = None
    # The share of the machine's CPU time the hypervisor gave to other guests meanwhile (/proc/stat):
    # on a shared VM, the noise no figure here can correct for.
    steal: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU per request (warm-up included): efficiency that CPU contention does not distort."""
        return self._per_request(self.server_cpu_s)

    @property
    def loop_us_per_request(self) -> float | None:
        """The event-loop thread's CPU per request (warm-up included), when measured."""
        return None if self.loop_cpu_s is None else self._per_request(self.loop_cpu_s)

    def _per_request(self, cpu_s: float) -> float | None:
        sent = self.result.completed + self.result.errors + self.result.warmup
        return cpu_s / sent * 1e6 if sent else None


def measure(running: Running, chosen: Scenario, backdrop: Backdrop) -> Measurement:
    """Drive one scenario from a separate load process while sampling the contender's memory and CPU."""
    read: Callable[[bytes], LoadResult]
    if backdrop.wrk is not None and wrk.drives(chosen):
        script = backdrop.scratch / f"wrk-{chosen.name}.lua"
        script.write_text(wrk.script(chosen))
        # wrk has no warm-up of its own: an untimed run first, before the CPU figures start.
        subprocess.run(wrk.command(backdrop.wrk, running.url, chosen, script, wrk.WARMUP_SECONDS),
                       capture_output=True, check=False, timeout=120)
        command = wrk.command(backdrop.wrk, running.url, chosen, script, chosen.seconds)

        def read(out: bytes) -> LoadResult:
            return wrk.parse(out.decode(errors="replace"), chosen, running.url)
    else:
        command = loadgen.command(running.url, chosen)

        def read(out: bytes) -> LoadResult:
            return LoadResult.from_json(orjson.loads(out))
    single_loop = running.spec.kind == "edgeproxy" and running.spec.workers == 1
    loop_before = main_thread_cpu_seconds(running.pid) if single_loop else 0.0
    server_before = cpu_seconds(running.pid)
    mock_before = cpu_seconds(backdrop.mock_pid)
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks_before = machine_ticks()
    started = time.monotonic()
    load = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    deadline = started + chosen.seconds + 120.0
    while load.poll() is None:
        samples.append((time.monotonic() - started, rss_bytes(running.pid)))
        if time.monotonic() > deadline:
            load.kill()
        time.sleep(SAMPLE_SECONDS)
    out, err = load.communicate()
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steal = steal_share(ticks_before, machine_ticks())
    if load.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({load.returncode}): {err.decode()[-2000:]}")
    samples.append((time.monotonic() - started, rss_bytes(running.pid)))
    server = cpu_seconds(running.pid) - server_before
    loop = main_thread_cpu_seconds(running.pid) - loop_before if single_loop else None
    mock = cpu_seconds(backdrop.mock_pid) - mock_before
    client = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    return Measurement(
        contender=running.spec.name,
        scenario=chosen.name,
        result=read(out),
        rss=Trace(tuple(samples)),
        server_cpu_s=server,
        mock_cpu_s=None if running.pid == backdrop.mock_pid else mock,
        client_cpu_s=client,
        loop_cpu_s=loop,
        steal=steal,
    )


def find_wrk(skipped: dict[str, str], versions: dict[str, str]) -> str | None:
    """wrk for the throughput scenarios; without it bench.loadgen runs them, and the report says so."""
    try:
        binary = debian_binary("wrk")
    except Unavailable as exc:
        skipped["wrk"] = f"{exc}; bench.loadgen ran every scenario instead"
        print(f"wrk unavailable: {exc}", file=sys.stderr)
        return None
    versions["wrk"] = wrk.version(command_output([binary, "-v"]))
    return binary


def wait_until_idle(pid: int, timeout: float = 5.0, step: float = 0.25) -> None:
    """Until the process tree uses under 2% of a core over `step` seconds (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    used = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(pid)
        if now - used < 0.02 * step:
            return
        used = now
