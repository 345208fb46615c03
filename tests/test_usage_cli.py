"""`edgeproxy usage` and `edgeproxy requests` as subprocesses, over rows written by real requests.

Three ways to the same rows: the embedded store read directly (once the gateway that holds the
chDB folder has stopped), a ClickHouse server read directly while the gateway runs, and a running
gateway's admin API (`--url`). The first and the last must print the very same tables.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from bench.mock_upstream import MockUpstream
from tests.admin_traffic import ADMIN_KEY, Sent, send_traffic, serve_gateway, wait_for_rows


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    """`python -m edgeproxy ARGS` with only the EDGEPROXY_* variables given here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeproxy",
        "--log-level",
        "WARNING",
        *args,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return Run(proc.returncode or 0, out.decode(), err.decode())


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """Parse an aligned table back into dicts; fails unless every line keeps to the same columns.

    Columns are the stretches between gaps of two or more spaces that run through every line,
    header included: a misaligned cell closes a gap, and the column count no longer matches.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        block.append(line)
    width = max(len(line) for line in block)
    padded = [line.ljust(width) for line in block]
    blank = "".join(" " if all(line[i] == " " for line in padded) else "x" for i in range(width))
    spans = [m.span() for m in re.finditer(r"x+(?: x+)*", blank)]
    names = re.split(r" {2,}", block[0].strip())
    assert len(spans) == len(names), "columns not aligned:\n" + "\n".join(block)
    return [{name: line[a:b].strip() for name, (a, b) in zip(names, spans)} for line in padded[1:]]


def check_usage_table(text: str, sent: list[Sent]) -> None:
    rows = {row["USER"]: row for row in table(text, "USER")}
    users = {s.call.user or "(none)" for s in sent}
    assert rows.keys() == users | {"TOTAL"}
    for user in users:
        mine = [s for s in sent if (s.call.user or "(none)") == user]
        assert int(rows[user]["REQUESTS"]) == len(mine)
        assert int(rows[user]["PROMPT TOK"]) == sum(s.prompt_tokens or 0 for s in mine)
        assert float(rows[user]["COST USD"]) == pytest.approx(sum(s.cost or 0 for s in mine), abs=1e-6)
    assert int(rows["TOTAL"]["REQUESTS"]) == len(sent)
    assert rows["bob"]["ERRORS"] == "1 (50.0%)"
    assert rows["carol"]["CACHE HIT"] == "50.0%"


def check_requests_table(text: str, sent: list[Sent], user: str) -> None:
    rows = table(text, "TIME (UTC)")
    mine = [s for s in reversed(sent) if s.call.user == user]
    assert [r["REQUEST ID"] for r in rows] == [s.request_id for s in mine]
    assert all(r["USER"] == user for r in rows)
    assert [int(r["STATUS"]) for r in rows] == [s.status for s in mine]


@pytest.fixture
async def mock_url() -> str:
    upstream = MockUpstream()
    await upstream.start()
    try:
        yield upstream.url  # type: ignore[misc]
    finally:
        await upstream.stop()


async def test_embedded_store_and_admin_api_print_the_same(mock_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    since, until = "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z"
    window = ["--since", since, "--until", until]
    commands = {
        "usage": ["usage", "--by", "user", *window],
        "requests": ["requests", "--user", "alice", "--last", "20"],
    }
    async with serve_gateway(mock_url, data_dir, {"EDGEPROXY_ADMIN_KEY": ADMIN_KEY}) as gateway:
        sent = await send_traffic(gateway.url)
        await wait_for_rows(gateway.url, len(sent), ADMIN_KEY)
        # Through the API: the key from the environment, as an operator would keep it.
        api_env = {"EDGEPROXY_ADMIN_URL": gateway.url, "EDGEPROXY_ADMIN_KEY": ADMIN_KEY}
        *runs, refused, bad_group, too_many = await asyncio.gather(
            *(cli(*args, env=api_env) for args in commands.values()),
            cli("requests", "--url", gateway.url, "--admin-key", "wrong"),
            cli("usage", "--by", "team", env=api_env),
            cli("requests", "--last", "501", env=api_env),
        )
        over_api = dict(zip(commands, runs))
    # The gateway has let go of the chDB folder: now the CLI may open it itself.
    direct = {name: await cli(*args, "--data-dir", str(data_dir)) for name, args in commands.items()}

    for name in commands:
        assert over_api[name].code == 0, over_api[name].err
        assert direct[name].code == 0, direct[name].err
        assert over_api[name].out == direct[name].out, name
    check_usage_table(direct["usage"].out, sent)
    assert direct["usage"].out.startswith("usage by user, 2000-01-01 00:00:00 to 2100-01-01 00:00:00 UTC")
    check_requests_table(direct["requests"].out, sent, "alice")
    assert refused.code == 1 and "401" in refused.err
    # The API's 400s come back as usage errors that name the parameter.
    assert bad_group.code == 2 and "group_by" in bad_group.err
    assert too_many.code == 2 and "limit" in too_many.err


async def test_server_store_read_directly_while_the_gateway_runs(
    mock_url: str, tmp_path: Path, clickhouse_url: str
) -> None:
    env = {"EDGEPROXY_LOGS_CLICKHOUSE_URL": clickhouse_url, "EDGEPROXY_LOGS_DATABASE": f"t_{uuid.uuid4().hex[:12]}"}
    async with serve_gateway(mock_url, tmp_path / "data", env) as gateway:
        sent = await send_traffic(gateway.url)
        await wait_for_rows(gateway.url, len(sent))
        usage, requests, one, as_json = await asyncio.gather(
            cli("usage", "--by", "user", "--since", "1h", env=env),
            cli("requests", "--user", "alice", "--last", "20", env=env),
            cli("requests", "--id", sent[0].request_id, env=env),
            cli("usage", "--by", "model", "--json", env=env),
        )
    assert usage.code == 0, usage.err
    check_usage_table(usage.out, sent)
    assert requests.code == 0, requests.err
    check_requests_table(requests.out, sent, "alice")
    assert one.code == 0, one.err
    assert ["request_id", sent[0].request_id] in [line.split() for line in one.out.splitlines()]
    assert "--- request_body ---" in one.out and sent[0].call.prompt in one.out
    assert '"temperature": 0.25' in one.out
    assert as_json.code == 0, as_json.err
    by_model = {g["key"]: g["requests"] for g in orjson.loads(as_json.out)["groups"]}
    assert by_model == {"mock-gpt": 5, "mock-fast": 1, "mock-error-500": 1}


async def test_bad_input_is_reported(tmp_path: Path) -> None:
    (tmp_path / "empty" / "clickhouse").mkdir(parents=True)
    empty = str(tmp_path / "empty")
    missing, bad_since, bad_group = await asyncio.gather(
        cli("requests", "--data-dir", str(tmp_path / "nowhere")),
        cli("usage", "--since", "0d", "--data-dir", empty),
        # Direct reads validate with the API's parsers, before any query.
        cli("usage", "--by", "team", "--data-dir", empty),
    )
    assert missing.code == 1 and "no embedded request log" in missing.err
    assert not (tmp_path / "nowhere").exists()
    assert bad_since.code == 2 and "--since" in bad_since.err
    assert bad_group.code == 2 and "group_by" in bad_group.err
