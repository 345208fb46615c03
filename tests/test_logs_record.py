"""LogRecord rows and body capping; the schema's column list and the record's must agree."""

from __future__ import annotations

import dataclasses
import re

import orjson
import pytest

from edgeproxy.logs.migrate import SCHEMA_DIR
from edgeproxy.logs.record import COLUMNS, NO_PROPERTIES, LogRecord, cap_body


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
