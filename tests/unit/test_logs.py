"""The JSON log format: one object per record, with the fields a pipeline indexes."""

from __future__ import annotations

import json
import logging
import sys

from segproxy.logs import JsonFormatter, iso_time


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord(
        {"name": "segproxy.queue", "levelno": logging.WARNING, "levelname": "WARNING"}
    )
    rec.msg, rec.args, rec.created = msg, args, 1765072815.123
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_line_of_json_with_time_level_logger_and_message() -> None:
    line = JsonFormatter().format(record("%d events kept as dead letters", 3))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2025-12-07T02:00:15.123Z",
        "level": "WARNING",
        "logger": "segproxy.queue",
        "message": "3 events kept as dead letters",
    }


def test_structured_fields_passed_by_the_code_are_kept_and_anything_becomes_json() -> None:
    line = JsonFormatter().format(record("listening", url="http://127.0.0.1:1", port=1, o=object()))
    obj = json.loads(line)
    assert obj["url"] == "http://127.0.0.1:1"
    assert obj["port"] == 1
    assert obj["o"].startswith("<object object")


def test_an_exception_s_traceback_is_one_field_of_the_same_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert len(line.splitlines()) == 1
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
