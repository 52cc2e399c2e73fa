"""What talking to Segment's API means for both ways of delivering: the request's headers, what
an answer means, and how a failure is named and reported (segproxy.delivery)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segproxy.delivery import (
    MISDIRECTED,
    REPORT_EVERY,
    Throttle,
    api_headers,
    basic_authorization,
    delivered,
    fault,
    held_back,
    misdirected,
    printable,
)

# ---------------------------------------------------------------------------------------------
# The request: JSON, and Basic with the write key as the user (as Segment's libraries send it)


def test_basic_authorization_is_the_write_key_as_user_with_no_password() -> None:
    assert basic_authorization("wk_123") == b"Basic " + base64.b64encode(b"wk_123:")
    assert basic_authorization("wk_123") == b"Basic d2tfMTIzOg=="


@given(st.text(min_size=1, max_size=64))
def test_basic_authorization_reads_back_as_its_write_key(key: str) -> None:
    scheme, _, token = basic_authorization(key).partition(b" ")
    assert scheme == b"Basic"
    assert base64.b64decode(token).decode() == key + ":"


def test_api_headers_are_json_and_the_authorization_if_any() -> None:
    assert api_headers(b"Basic abc") == [
        (b"content-type", b"application/json"),
        (b"authorization", b"Basic abc"),
    ]
    assert api_headers(None) == [(b"content-type", b"application/json")]


def test_api_headers_are_a_new_list_each_time() -> None:
    first = api_headers(None)
    first.append((b"x", b"y"))
    assert api_headers(None) == [(b"content-type", b"application/json")]


# ---------------------------------------------------------------------------------------------
# The answer: only a 2xx is a delivery; below 400 and not a 2xx is the proxy misdirected


@pytest.mark.parametrize("status", range(100, 600))
def test_only_2xx_is_delivered_and_the_rest_below_400_is_misdirected(status: int) -> None:
    assert delivered(status) is (200 <= status < 300)
    assert misdirected(status) is (status < 400 and not 200 <= status < 300)
    assert not (delivered(status) and misdirected(status))


def test_the_misdirected_warning_names_it_a_configuration_fault() -> None:
    assert "configuration fault" in MISDIRECTED
    assert "upstream.api" in MISDIRECTED
    assert "not a delivery" in MISDIRECTED


# ---------------------------------------------------------------------------------------------
# The fault a retry is reported with (queue stats, logs)


@pytest.mark.parametrize(
    ("status", "location", "error", "expected"),
    [
        (503, None, "", "HTTP 503"),
        (429, None, "", "HTTP 429"),
        (
            301,
            b"https://api.segment.io/v1/batch",
            "",
            "HTTP 301 redirect to https://api.segment.io/v1/batch",
        ),
        (308, b"https://x.example/v1/batch", "", "HTTP 308 redirect to https://x.example/v1/batch"),
        (302, None, "", "HTTP 302 redirect (no Location)"),
        (None, None, "timeout", "network: timeout"),
        (None, None, "connect", "network: connect"),
    ],
)
def test_every_retry_names_its_fault(
    status: int | None, location: bytes | None, error: str, expected: str
) -> None:
    assert fault(status, location, error) == expected


def test_a_location_is_shown_printable_and_short() -> None:
    hostile = b"https://x.example/\x1b[31m\r\nFAKE LOG LINE" + b"a" * 5000
    shown = fault(301, hostile, "")
    assert shown.startswith("HTTP 301 redirect to https://x.example/")
    assert "\x1b" not in shown and "\r" not in shown and "\n" not in shown
    assert len(shown) < 300


# ---------------------------------------------------------------------------------------------
# Loud but not one line per batch: at most one log line per fault per window, with a count


def test_a_repeated_fault_is_logged_once_per_window_with_the_count_held_back() -> None:
    throttle = Throttle(every=10.0)
    assert throttle.due("HTTP 301 redirect to https://a", 100.0) == 0
    assert [throttle.due("HTTP 301 redirect to https://a", 100.0 + i) for i in range(1, 9)] == [
        None
    ] * 8
    assert throttle.due("HTTP 302 redirect to https://b", 101.0) == 0  # another fault: its own
    assert throttle.due("HTTP 301 redirect to https://a", 110.5) == 8  # the 8 held back
    assert throttle.due("HTTP 301 redirect to https://a", 111.0) is None


def test_the_throttle_remembers_a_bounded_number_of_faults() -> None:
    throttle = Throttle(every=10.0, max_keys=16)
    for i in range(1000):
        assert throttle.due(f"HTTP 301 redirect to https://h{i}", 1.0) == 0
    assert len(throttle.last) <= 16


def test_printable_keeps_short_clean_text_as_it_is() -> None:
    assert printable(b"https://x.example/v1", 200) == "https://x.example/v1"
    assert printable(b"a\x00b\x1bc", 200) == "abc"
    assert printable(b"abcdef", 4) == "abc\u2026"
    assert printable(b"abcd", 4) == "abcd"


def test_held_back_says_how_many_lines_were_not_logged() -> None:
    assert held_back(0) == ""
    assert held_back(3) == f" (3 more like it in the last {REPORT_EVERY:.0f} s)"
    assert REPORT_EVERY == 10.0


def test_the_throttle_holds_back_within_its_window_only() -> None:
    throttle = Throttle(every=5.0)
    assert throttle.due("f", 0.0) == 0
    assert throttle.due("f", 4.999) is None
    assert throttle.due("f", 5.0) == 1
