"""The servers of a benchmark run as subprocesses: the mock provider, the ClickHouse double, each contender.

Every process is started by us, in its own session, on a free loopback port, with its output in a
log file under the run's scratch folder; `stop()` ends it (and only it) by its process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from . import floor_proxy
from .loadgen import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"
# Pinned: 1.82.7 and 1.82.8 on PyPI were a credential stealer (BerriAI/litellm#24518), and later
# releases have been pulled since; 1.82.6 is the last one widely audited as clean.
LITELLM_REQUIREMENT = "litellm[proxy]==1.82.6"
NGINX_TEMPLATE = ROOT / "bench" / "nginx.conf.template"
START_SECONDS = 60.0

Kind = Literal["direct", "nginx", "litellm", "edgeproxy", "floor"]
LogMode = Literal["off", "embedded", "clickhouse"]


class Unavailable(RuntimeError):
    """A contender that cannot run here; the report says why instead of failing the whole run."""


@dataclass(frozen=True)
class ContenderSpec:
    """One thing to measure: a kind of server, with its worker count and (for edgeproxy) its log mode."""

    name: str
    kind: Kind
    workers: int = 1
    logs: LogMode = "off"


@dataclass(frozen=True)
class Backdrop:
    """What every contender stands in front of, and where it may keep files."""

    mock_url: str
    mock_pid: int
    clickhouse_url: str | None
    scratch: Path
    clickhouse_pid: int | None = None
    # The C client for the throughput scenarios (bench/wrk.py); None: bench.loadgen runs them too.
    wrk: str | None = None


class Process:
    """A subprocess we started, with its output in `log`."""

    def __init__(self, name: str, command: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            # A session of its own: signals to the terminal's group (Ctrl-C) reach us, not it.
            self._popen = subprocess.Popen(
                list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._popen.pid

    def exited(self) -> int | None:
        return self._popen.poll()

    def output(self, limit: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, deadline: float) -> re.Match[str]:
        """Poll the log until a line matches `pattern`; fail if the process exits first."""
        compiled = re.compile(pattern, re.MULTILINE)
        while True:
            match = compiled.search(self.output(64_000))
            if match:
                return match
            self._check(deadline, f"never printed {pattern!r}")
            time.sleep(0.02)

    def wait_http(self, url: str, deadline: float) -> None:
        """Poll `url` until it answers 200."""
        while not http_ok(url):
            self._check(deadline, f"{url} never answered 200")
            time.sleep(0.05)

    def _check(self, deadline: float, what: str) -> None:
        if self.exited() is not None:
            raise Unavailable(f"{self.name} exited with {self.exited()}: {self.output(1500).strip()}")
        if time.monotonic() > deadline:
            self.stop()
            raise Unavailable(f"{self.name} {what} within {START_SECONDS:g}s: {self.output(1500).strip()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to its process group if it lingers; wait for it either way."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self._popen.pid)
                self._popen.wait()
        # Workers it forked may outlive it; they share its process group, which is ours alone.
        _kill_group(self._popen.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def log_completeness(url: str, timeout: float = 20.0) -> tuple[int, int]:
    """(requests an edgeproxy finished, rows its request log holds), once they match or `timeout` passes.

    Read through the gateway itself: the requests from its Prometheus counter, the rows from its
    admin API (loopback needs no key), so it works for the embedded store and a server alike. A
    store that answers 200 and keeps fewer rows shows here and nowhere else.
    """
    served = requests_served(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/admin/v1/usage?group_by=model", timeout=10) as response:
                stored = int(json.load(response)["totals"]["requests"])
        except urllib.error.HTTPError as exc:
            # 503 while the store is not ready yet (its table is created in the background).
            if exc.code != 503 or time.monotonic() > deadline:
                raise
            stored = -1
        if stored >= served or time.monotonic() > deadline:
            return served, stored
        time.sleep(0.25)


def requests_served(url: str) -> int:
    """The sum of an edgeproxy's `edgeproxy_requests_total` over every label, from its `/metrics`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return round(sum(sample.value for family in families if family.name == "edgeproxy_requests"
                     for sample in family.samples if sample.name == "edgeproxy_requests_total"))


def free_port() -> int:
    """A port free right now; for servers that cannot be told to bind port 0 and report it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(root_pid: int) -> set[int]:
    """A process and all its descendants (a multi-worker server's workers included), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: fields resume after the last ")".
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def rss_bytes(root_pid: int) -> int:
    """Resident memory of a process tree."""
    total = 0
    for pid in process_tree(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def cpu_seconds(root_pid: int) -> float:
    """User plus system CPU time used so far by a process tree's live members."""
    total = 0.0
    for pid in process_tree(root_pid):
        try:
            total += stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by one process's main thread (its task whose id is the pid)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat").read_text())


def stat_cpu_seconds(stat: str) -> float:
    """User plus system CPU seconds from the text of a `/proc/<pid>/stat` (or `…/task/<tid>/stat`)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_ticks() -> tuple[int, int]:
    """(stolen, total) CPU ticks of the whole machine so far, from /proc/stat."""
    return stat_steal_ticks(Path("/proc/stat").read_text())


def stat_steal_ticks(stat: str) -> tuple[int, int]:
    """(steal, total) from the text of /proc/stat: its first line sums every CPU."""
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user already.
    fields = [int(value) for value in stat.splitlines()[0].split()[1:9]]
    return fields[7], sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time between two `machine_ticks()` that the hypervisor gave elsewhere."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_") and k != "OPENAI_API_KEY"}
    # Anything that tries the network goes to a closed loopback port instead of leaving the machine.
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")
    env.update(extra)
    return env


# --- the shared backdrop ------------------------------------------------------------------------------


def start_mock(scratch: Path) -> tuple[Process, str]:
    """The mock provider in its own process; returns it and its base URL."""
    proc = Process("mock", [sys.executable, "-m", "bench.mock_upstream", "--host", "127.0.0.1", "--port", "0"],
                   scratch / "mock.log", env=child_env())
    url = proc.wait_for_line(r"^(http://127\.0\.0\.1:\d+)$", time.monotonic() + START_SECONDS).group(1)
    proc.wait_http(url + "/v1/models", time.monotonic() + START_SECONDS)
    return proc, url


def start_clickhouse(scratch: Path) -> tuple[Process, str]:
    """The chDB-backed ClickHouse HTTP server (tests/clickhouse_server.py) in its own process."""
    data = scratch / "clickhouse"
    script = ROOT / "tests" / "clickhouse_server.py"
    if not script.exists():
        raise Unavailable(f"{script} is missing")
    proc = Process("clickhouse", [sys.executable, str(script), "--port", "0", "--data", str(data)],
                   scratch / "clickhouse.log", env=child_env())
    port = proc.wait_for_line(r"^port (\d+)$", time.monotonic() + START_SECONDS).group(1)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/ping", time.monotonic() + START_SECONDS)
    return proc, url


# --- contenders -----------------------------------------------------------------------------------------


@dataclass
class Running:
    """A started contender: where to send load, which process to watch, what version it is."""

    spec: ContenderSpec
    url: str
    process: Process | None
    version: str
    # The process whose memory and CPU count as this contender's: the mock itself for `direct`.
    pid: int

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    """Start one contender in front of the mock; raises Unavailable with the reason when it cannot."""
    starters: dict[str, Callable[[ContenderSpec, Backdrop], Running]] = {
        "direct": _direct,
        "nginx": _nginx,
        "litellm": _litellm,
        "edgeproxy": _edgeproxy,
        "floor": _floor,
    }
    return starters[spec.kind](spec, backdrop)


def _direct(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    return Running(spec, backdrop.mock_url, None, "mock", backdrop.mock_pid)


def _edgeproxy(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    folder = backdrop.scratch / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    extra: dict[str, str] = {}
    if spec.logs == "off":
        extra["EDGEPROXY_LOGS_ENABLED"] = "false"
    elif spec.logs == "clickhouse":
        if backdrop.clickhouse_url is None:
            raise Unavailable("the ClickHouse server double did not start")
        extra["EDGEPROXY_LOGS_CLICKHOUSE_URL"] = backdrop.clickhouse_url
        # Each contender its own database, so row counts are its own.
        extra["EDGEPROXY_LOGS_DATABASE"] = "bench_" + spec.name.replace("-", "_")
    command = edgeproxy_command(port, backdrop.mock_url, folder / "data", spec.workers)
    proc = Process(spec.name, command, folder / "edgeproxy.log", env=child_env(**extra))
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/readyz", time.monotonic() + START_SECONDS)
    return Running(spec, url, proc, edgeproxy_version(), proc.pid)


def edgeproxy_command(port: int, upstream: str, data_dir: Path, workers: int) -> list[str]:
    """The command line that runs edgeproxy on `port` in front of `upstream`, its data under `data_dir`."""
    return [
        sys.executable, "-m", "edgeproxy", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--upstream", upstream, "--data-dir", str(data_dir), "--workers", str(workers),
    ]


def _floor(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    """The aiohttp floor (bench/floor_proxy.py): what aiohttp's server and client cost a proxy alone."""
    folder = backdrop.scratch / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = Process(spec.name, floor_proxy.command(port, backdrop.mock_url), folder / "floor.log", env=child_env())
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/v1/models", time.monotonic() + START_SECONDS)
    return Running(spec, url, proc, "aiohttp floor", proc.pid)


def edgeproxy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("edgeproxy")
    except PackageNotFoundError:  # not installed as a package: the source tree is still runnable
        release = "source"
    commit = command_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "status", "--porcelain", "edgeproxy"])
    suffix = "+uncommitted" if dirty else ""
    return f"{release} ({commit or 'no git'}{suffix})"


def command_output(command: Sequence[str]) -> str:
    """What a short command printed (stdout, else stderr), stripped; "" when it cannot run."""
    try:
        done = subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def debian_binary(package: str) -> str:
    """The binary of a Debian package of the same name, installed with apt-get when missing.

    Debian puts some in /usr/sbin, outside a non-root PATH; a package's system service, if it
    brings one, is never used: our servers run from their own prefixes.
    """
    def found() -> str | None:
        return shutil.which(package) or (f"/usr/sbin/{package}" if Path(f"/usr/sbin/{package}").exists() else None)

    binary = found()
    if binary:
        return binary
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise Unavailable(f"{package} is not installed and cannot be installed here (needs root and apt-get)")
    install = subprocess.run(
        f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}",
        shell=True, capture_output=True, text=True, check=False,
    )
    binary = found()
    if install.returncode != 0 or not binary:
        raise Unavailable(f"apt-get install {package} failed: {install.stderr.strip()[-500:]}")
    return binary


def render_nginx_conf(prefix: Path, port: int, upstream: str, workers: int) -> str:
    """The plain reverse proxy config from bench/nginx.conf.template."""
    host_port = upstream.removeprefix("http://").rstrip("/")
    template = string.Template(NGINX_TEMPLATE.read_text())
    return template.substitute(prefix=str(prefix), port=port, upstream=host_port, workers=workers)


def _nginx(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    binary = debian_binary("nginx")
    prefix = backdrop.scratch / spec.name
    prefix.mkdir(parents=True, exist_ok=True)
    # nginx's workers drop to an unprivileged user and must reach their temp folders under the prefix.
    prefix.chmod(0o755)
    backdrop.scratch.chmod(0o755)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(prefix, port, backdrop.mock_url, spec.workers))
    command = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = Process(spec.name, command, prefix / "nginx.out", env=child_env())
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/v1/models", time.monotonic() + START_SECONDS)
    version = command_output([binary, "-v"]).removeprefix("nginx version: nginx/")
    return Running(spec, url, proc, version, proc.pid)


def litellm_python() -> Path:
    """The LiteLLM venv's python, creating the venv and installing the pinned proxy into it if needed."""
    python = LITELLM_VENV / "bin" / "python"
    if (LITELLM_VENV / "bin" / "litellm").exists():
        return python
    steps = [
        [sys.executable, "-m", "venv", str(LITELLM_VENV)],
        [str(python), "-m", "pip", "install", "-q", LITELLM_REQUIREMENT],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise Unavailable(f"installing {LITELLM_REQUIREMENT} failed: {done.stderr.strip()[-500:]}")
    return python


def _litellm(spec: ContenderSpec, backdrop: Backdrop) -> Running:
    python = litellm_python()
    folder = backdrop.scratch / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": backdrop.mock_url + "/v1", "api_key": "sk-bench"},
            }
            for name in sorted({s.model_name() for s in SCENARIOS})
        ],
        "litellm_settings": {"drop_params": True, "num_retries": 0, "request_timeout": 60},
    }
    # JSON is YAML, so LiteLLM reads it and we need no YAML writer.
    (folder / "config.yaml").write_text(json.dumps(config, indent=2))
    port = free_port()
    command = [
        str(LITELLM_VENV / "bin" / "litellm"), "--config", str(folder / "config.yaml"), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", str(spec.workers), "--telemetry", "False",
    ]
    # LITELLM_LOCAL_MODEL_COST_MAP: otherwise it fetches its price list from the internet at import.
    env = child_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", DISABLE_ADMIN_UI="True")
    proc = Process(spec.name, command, folder / "litellm.log", env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health/liveliness", time.monotonic() + START_SECONDS)
    version = command_output([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
    return Running(spec, url, proc, version or "unknown", proc.pid)
