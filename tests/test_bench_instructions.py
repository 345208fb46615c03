"""bench/instructions.py: requests counted in instructions under callgrind, run for real against the mock."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.contenders import debian_binary, start_mock
from bench.instructions import Count, count, read_total, render, thread_totals


def test_a_dumps_total_is_its_totals_line_else_its_summary() -> None:
    assert read_total("version: 1\nevents: Ir\nsummary: 1234\n\nfn=x\n0 5\ntotals: 999\n") == 999
    assert read_total("events: Ir\nsummary: 1234\n") == 1234
    with pytest.raises(ValueError):
        read_total("events: Ir\nfn=x\n")


def test_each_threads_file_counts_for_its_thread(tmp_path: Path) -> None:
    (tmp_path / "out.1-01").write_text("summary: 10\ntotals: 10\n")
    (tmp_path / "out.1-02").write_text("totals: 7\n")
    assert thread_totals(sorted(tmp_path.glob("out.1-*"))) == {1: 10, 2: 7}


def test_the_table_divides_by_requests_and_by_the_floor() -> None:
    counts = [Count("edgeproxy", "embedded", "c1", 100, 0, 300_000_000, 150_000_000),
              Count("floor", "off", "c1", 100, 0, 100_000_000, 100_000_000)]
    table = render(counts)
    assert "| edgeproxy (log embedded) | c1 | 100 | 0 | 3000 | 1500 | 3.00× |" in table
    assert "| floor | c1 | 100 | 0 | 1000 | 1000 | 1.00× |" in table


def test_counts_repeat_and_the_gateway_costs_more_than_the_floor(tmp_path: Path) -> None:
    debian_binary("valgrind")  # `make test` installs it; elsewhere this installs it as the bench would
    mock, mock_url = start_mock(tmp_path)
    try:
        floor = [count("floor", "c1", 40, "off", tmp_path / str(run), mock_url, warmup=30) for run in (1, 2)]
        gateway = count("edgeproxy", "c1", 40, "off", tmp_path / "gateway", mock_url, warmup=30)
    finally:
        mock.stop()
    for counted in (*floor, gateway):
        assert (counted.requests, counted.errors) == (40, 0)
        # Far above a request's syscalls alone, far below a runaway loop.
        assert 100_000 < counted.per_request < 20_000_000
        assert 0 < counted.main_thread_instructions <= counted.total_instructions
    # The same requests cost the same instructions; the machine's speed does not enter.
    assert abs(floor[0].per_request - floor[1].per_request) < 0.03 * floor[0].per_request
    assert gateway.per_request > 1.1 * floor[0].per_request
