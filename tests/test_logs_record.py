"""Log rows and body capping; the schema's columns, the record's fields and the gateway's row must agree."""

from __future__ import annotations

import dataclasses
import re

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from edgeproxy.exchange import Exchange, Identity, Usage
from edgeproxy.logs.migrate import SCHEMA_DIR
from edgeproxy.logs.record import COLUMNS, NO_PROPERTIES, LogRecord, cap_body
from edgeproxy.metrics import Metrics
from edgeproxy.observe import Observe
from edgeproxy.options import RequestOptions
from edgeproxy.pricing import PriceTable
from edgeproxy.settings import Settings, TargetSettings
from edgeproxy.targets import Route


def test_row_follows_columns_and_fields() -> None:
    fields = [f.name for f in dataclasses.fields(LogRecord)]
    assert list(COLUMNS) == fields
    record = LogRecord(request_id="r", started_at=1.5)
    for index, name in enumerate(COLUMNS):
        if name not in ("started_at", "params", "properties"):
            assert record.to_row()[index] is getattr(record, name)


def test_rows_without_properties_share_one_dict() -> None:
    index = COLUMNS.index("properties")
    rows = [LogRecord(request_id=str(n), started_at=1.0).to_row() for n in range(3)]
    assert all(row[index] is NO_PROPERTIES for row in rows)
    assert NO_PROPERTIES == {}
    tagged = LogRecord(request_id="t", started_at=1.0, properties={"team": "a"})
    assert tagged.to_row()[index] is tagged.properties


def test_schema_declares_every_column_in_order() -> None:
    sql = (SCHEMA_DIR / "0001_requests.sql").read_text()
    declared = re.findall(r"^\s{4}([a-z_]+) [A-Z]", sql, flags=re.MULTILINE)
    assert declared == list(COLUMNS)


def test_row_encodes_time_as_milliseconds_and_params_as_json() -> None:
    record = LogRecord(
        request_id="r",
        started_at=1_700_000_000.1234,
        params={"temperature": 0.2, "stream": True, "tools": ["a"], 3: "x"},  # type: ignore[dict-item]
    )
    row = record.to_row()
    assert row[COLUMNS.index("started_at")] == 1_700_000_000_123
    assert orjson.loads(row[COLUMNS.index("params")]) == {
        "temperature": 0.2,
        "stream": True,
        "tools": ["a"],
        "3": "x",
    }
    assert LogRecord(request_id="r", started_at=0).to_row()[COLUMNS.index("params")] == "{}"


def test_row_survives_a_value_json_cannot_encode() -> None:
    record = LogRecord(request_id="r", started_at=0, params={"odd": object()})
    assert orjson.loads(record.to_row()[COLUMNS.index("params")])["odd"].startswith("<object")


@pytest.mark.parametrize(
    ("body", "limit", "expected", "truncated"),
    [
        (None, 10, None, False),
        (b"", 10, "", False),
        (b"hello", 5, "hello", False),
        (b"hello", 4, "hell", True),
        ("hello", 4, "hell", True),
        ("hello", 100, "hello", False),
        ("é" * 3, 6, "é" * 3, False),
        # 'é' is 2 bytes: a cut inside it steps back to the character's start.
        ("aé", 2, "a", True),
        ("aé", 3, "aé", False),
        # '😀' is 4 bytes: each cut inside it drops the whole character.
        ("a😀b", 2, "a", True),
        ("a😀b", 3, "a", True),
        ("a😀b", 4, "a", True),
        ("a😀b", 5, "a😀", True),
        # Not UTF-8: replaced, never an error.
        (b"\xff\xfeabc", 10, "\ufffd\ufffdabc", False),
        (b"\x80\x80\x80\x80\x80\x80", 4, "\ufffd", True),
        (b"data", 0, None, True),
        (b"", 0, None, False),
    ],
)
def test_cap_body(body: bytes | str | None, limit: int, expected: str | None, truncated: bool) -> None:
    text, cut = cap_body(body, limit)
    assert (text, cut) == (expected, truncated)
    if cut and text is not None and "\ufffd" not in text:
        assert len(text.encode()) <= limit


def test_the_gateway_builds_the_row_a_record_names() -> None:
    # The hot path builds its row as a bare tuple (observe.py); column for column it must be the
    # row of the LogRecord with the same values, every field set to something distinct.
    options = RequestOptions(user_id="u-header", properties={"team": "a"}, session_id="s", session_path="/p",
                             session_name="n")
    ex = Exchange(make_mocked_request("POST", "/v1/chat/completions"), options, "id-1",
                  body=b'{"model":"m-1","temperature":0.5,"messages":[],"seed":7}')
    ex.route = Route(TargetSettings(name="mock", base_url="http://127.0.0.1:1"), "/v1/chat/completions")
    ex.started, ex.started_at = 100.0, 1_700_000_000.25
    ex.upstream_sent, ex.upstream_first_byte, ex.upstream_done, ex.client_first_byte = 100.01, 100.1, 100.2, 100.11
    ex.identity = Identity(app_id="app", key_id="key", user_id="")
    ex.status, ex.usage = 201, Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    ex.capture.add(b'{"choices":[]}')
    ex.cache_status, ex.cost_saved_usd, ex.reserved_usd = "MISS", 0.5, 0.75
    ex.attempts, ex.answered_by, ex.error, ex.outcome = 2, "mock", "boom", "upstream_error"
    settings = Settings()
    prices = PriceTable.from_settings(settings)
    observe = Observe(None, prices, Metrics.for_settings(CollectorRegistry(), settings, prices), 1000)

    row = observe.build_row(ex, 100.3, 0.125)

    expected = LogRecord(
        request_id="id-1", started_at=1_700_000_000.25, latency_ms=(100.3 - 100.0) * 1000,
        ttfb_ms=(100.11 - 100.0) * 1000, upstream_ms=(100.2 - 100.01) * 1000, gateway_ms=ex.gateway_seconds() * 1000,
        status=201, method="POST", path="/v1/chat/completions", target="mock", model="m-1", user_id="u-header",
        app_id="app", key_id="key", properties={"team": "a"}, session_id="s", session_path="/p", session_name="n",
        params={"temperature": 0.5, "seed": 7},
        request_body='{"model":"m-1","temperature":0.5,"messages":[],"seed":7}', request_truncated=False,
        response_body='{"choices":[]}', response_truncated=False, prompt_tokens=3, completion_tokens=4,
        total_tokens=7, cost_usd=0.125, cost_saved_usd=0.5, reserved_usd=0.75, cache="MISS", attempts=2,
        answered_by="mock", error="boom", outcome="upstream_error",
    ).to_row()
    assert dict(zip(COLUMNS, row, strict=True)) == dict(zip(COLUMNS, expected, strict=True))
