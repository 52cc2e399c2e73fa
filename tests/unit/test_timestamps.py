"""sentAt timestamps in one place (segproxy.timestamps): the shapes clients send, and
analytics.js's own form, read and written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from segproxy import timestamps
from segproxy.timestamps import (
    JS_FORM_LENGTH,
    epoch,
    format_epoch,
    is_ms,
    js_form,
    known_second,
    parse_time,
    valid_sent_at,
)

JS = "2026-11-25T19:11:13.967Z"


def test_analytics_js_form_is_24_characters_with_a_dot_and_a_z() -> None:
    assert JS_FORM_LENGTH == len(JS) == 24
    assert js_form(JS)
    assert js_form("2026-11-25T19:11:13.abcZ")  # the layout only: digits are checked apart
    for other in ("2026-11-25T19:11:13.967+00:00", "2026-11-25T19:11:13.96Z", JS + " ", JS[:-1]):
        assert not js_form(other)
    assert not js_form("2026-11-25T19:11:13,967Z")
    assert not js_form("2026-11-25T19:11:13.967z")


@pytest.mark.parametrize(
    ("digits", "ok"),
    [("967", True), ("000", True), ("9a7", False), ("²34", False), ("٣45", False)],
)
def test_milliseconds_are_three_ascii_digits(digits: str, ok: bool) -> None:
    assert is_ms(digits) is ok


@pytest.mark.parametrize(
    "value",
    [
        JS,
        "2026-11-25T19:11:13.967123+00:00",
        "2026-11-25T19:11:13.123456789Z",
        "2026-11-25 19:11:13Z",
        "2026-11-25T19:11Z",
        "2026-11-25T19:11:13+0530",
        "2026-11-25t19:11:13,5-08:00",
        "1000-01-01T00:00:00Z",
    ],
)
def test_client_shapes_are_valid(value: str) -> None:
    assert valid_sent_at(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "2026-13-01T00:00:00.000Z",
        "2026-11-25T24:00:00.000Z",
        "3000-01-01T00:00:00.000Z",
        "2026-11-25T19:11:13.9a7Z",
        "2026-11-25T19:11:13.²34Z",
        "2026-11-25T19:11:13.1234567890Z",
        "2026-11-25",
        JS + "x",
    ],
)
def test_other_values_are_not(value: str) -> None:
    assert not valid_sent_at(value)


def test_a_second_seen_before_checks_only_the_milliseconds() -> None:
    assert valid_sent_at("2031-01-02T03:04:05.000Z")
    assert valid_sent_at("2031-01-02T03:04:05.999Z")
    assert not valid_sent_at("2031-01-02T03:04:05.9x9Z")


def test_epoch_reads_analytics_js_form_and_iso_8601() -> None:
    assert epoch("1970-01-01T00:00:01.500Z") == 1.5
    assert epoch("1970-01-01T00:00:01.5+00:00") == 1.5
    assert epoch("1970-01-01T01:00:01+01:00") == 1.0
    assert epoch("1970-01-01T00:00:01") == 1.0  # no offset: UTC
    assert epoch("2026-02-31T00:00:00.000Z") is None  # the right shape, not a date
    assert epoch("nonsense") is None


def test_parse_time_takes_only_strings() -> None:
    assert parse_time(3) is None
    assert parse_time("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)


def test_a_second_is_known_once_epoch_has_read_it() -> None:
    value = "2029-05-06T07:08:09.123Z"
    assert not known_second(value)
    assert epoch(value) == datetime(2029, 5, 6, 7, 8, 9, 123000, tzinfo=UTC).timestamp()
    assert known_second(value)
    assert known_second("2029-05-06T07:08:09.999Z")
    assert epoch("2026-02-30T00:00:00.000Z") is None
    assert not known_second("2026-02-30T00:00:00.000Z")  # read, but not a date: never known


def test_format_epoch_writes_analytics_js_form() -> None:
    assert format_epoch(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_epoch(1.5) == "1970-01-01T00:00:01.500Z"
    assert format_epoch(1.9999) == "1970-01-01T00:00:01.999Z"  # truncated, like isoformat
    assert format_epoch(1.0009999) == "1970-01-01T00:00:01.001Z"  # to the microsecond first
    assert format_epoch(0.1 + 0.2) == "1970-01-01T00:00:00.300Z"  # float error absorbed


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)))
@example(datetime(2107, 1, 1, 0, 0, 0, 99999))  # scaled whole, it came out .100
def test_format_epoch_is_isoformat_in_milliseconds(when: datetime) -> None:
    t = when.replace(tzinfo=UTC).timestamp()
    expected = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    assert format_epoch(t) == expected.replace("+00:00", "Z")
    assert js_form(format_epoch(t))
    assert valid_sent_at(format_epoch(t))
    assert epoch(format_epoch(t)) == pytest.approx(t, abs=0.001)


def test_the_memos_are_bounded() -> None:
    start = datetime(2100, 1, 1, tzinfo=UTC)
    for i in range(10_000):
        value = format_epoch((start + timedelta(seconds=i)).timestamp())
        assert valid_sent_at(value)
        assert epoch(value) is not None
    for memo in (timestamps._SHAPES_SEEN, timestamps._EPOCHS, timestamps._SECONDS):
        assert 0 < len(memo) <= 4096
