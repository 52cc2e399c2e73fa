"""Retry policy: which upstream answers are acked, retried or dead-lettered, and for how long."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segproxy.forward.retry import (
    Action,
    backoff,
    classify,
    parse_retry_after,
    splits,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z

# ---------------------------------------------------------------------------------------------
# classify: only 2xx is delivery (docs/architecture.md, the durable path, step 7: Segment's
# clients' retry rules, except that a redirect is retried instead of counted as success)

RETRYABLE_5XX = [s for s in range(500, 600) if s not in (501, 505, 511)]

# Every status class, with what the forwarder does with a batch answered with it.
STATUS_TABLE = [
    # 1xx: never a final answer from a sound upstream; not a delivery
    (100, Action.RETRY),
    (101, Action.RETRY),
    (103, Action.RETRY),
    (199, Action.RETRY),
    # 2xx: delivered
    (200, Action.ACK),
    (201, Action.ACK),
    (202, Action.ACK),
    (204, Action.ACK),
    (206, Action.ACK),
    (299, Action.ACK),
    # 3xx: a redirect is a configuration fault, not a delivery
    (300, Action.RETRY),
    (301, Action.RETRY),
    (302, Action.RETRY),
    (303, Action.RETRY),
    (304, Action.RETRY),
    (307, Action.RETRY),
    (308, Action.RETRY),
    (399, Action.RETRY),
    # 4xx: retryable ones, then final ones
    (408, Action.RETRY),
    (410, Action.RETRY),
    (429, Action.RETRY),
    (460, Action.RETRY),
    (400, Action.DEAD),
    (401, Action.DEAD),
    (403, Action.DEAD),
    (404, Action.DEAD),
    (413, Action.DEAD),
    (422, Action.DEAD),
    (499, Action.DEAD),
    # 5xx: retried except 501, 505, 511
    (500, Action.RETRY),
    (502, Action.RETRY),
    (503, Action.RETRY),
    (504, Action.RETRY),
    (599, Action.RETRY),
    (501, Action.DEAD),
    (505, Action.DEAD),
    (511, Action.DEAD),
]


@pytest.mark.parametrize(("status", "action"), STATUS_TABLE)
def test_every_status_class_has_its_action(status: int, action: Action) -> None:
    assert classify(status) is action


@pytest.mark.parametrize("status", [200, 201, 202, 204, 206, 299])
def test_2xx_is_acked(status: int) -> None:
    assert classify(status) is Action.ACK


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 307, 308, 399])
def test_a_redirect_is_retried_not_counted_as_delivered(status: int) -> None:
    assert classify(status) is Action.RETRY


@pytest.mark.parametrize("status", [100, 101, 102, 103, 150, 199])
def test_1xx_is_not_a_delivery(status: int) -> None:
    assert classify(status) is Action.RETRY


@pytest.mark.parametrize("status", RETRYABLE_5XX)
def test_5xx_is_retried(status: int) -> None:
    assert classify(status) is Action.RETRY


@pytest.mark.parametrize("status", [408, 410, 429, 460])
def test_retryable_4xx_is_retried(status: int) -> None:
    assert classify(status) is Action.RETRY


def test_network_error_or_timeout_is_retried() -> None:
    assert classify(None) is Action.RETRY


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 411, 413, 415, 422, 451, 499])
def test_other_4xx_is_final(status: int) -> None:
    assert classify(status) is Action.DEAD


@pytest.mark.parametrize("status", [501, 505])
def test_501_and_505_are_final(status: int) -> None:
    assert classify(status) is Action.DEAD


def test_511_is_final_like_segment_clients() -> None:
    assert classify(511) is Action.DEAD


@given(st.integers(min_value=100, max_value=999))
def test_classify_is_total_and_only_2xx_is_delivery(status: int) -> None:
    action = classify(status)
    retried_4xx_5xx = status in (408, 410, 429, 460) or (
        status >= 500 and status not in (501, 505, 511)
    )
    if 200 <= status < 300:
        assert action is Action.ACK
    elif status < 400 or retried_4xx_5xx:  # 1xx/3xx: not a delivery
        assert action is Action.RETRY
    else:
        assert action is Action.DEAD


# ---------------------------------------------------------------------------------------------
# Which refusals are about the events (split to find them) and which about the request


@pytest.mark.parametrize("status", [400, 409, 413, 415, 422, 451, 499])
def test_a_refusal_about_the_events_is_split_to_find_them(status: int) -> None:
    assert splits(status)


@pytest.mark.parametrize("status", [401, 403, 404, 405, 407, 501, 505, 511])
def test_a_refusal_of_the_credentials_or_the_path_is_not_split(status: int) -> None:
    # Every event of the request shares its write key and path: splitting would only
    # multiply the same refusal (up to 2n - 1 requests for n events).
    assert not splits(status)


@pytest.mark.parametrize("status", [200, 301, 408, 429, 503])
def test_only_final_answers_are_split(status: int) -> None:
    assert not splits(status)


# ---------------------------------------------------------------------------------------------
# Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (b"120", 120.0),
        ("  7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
    ],
)
def test_retry_after_delta_seconds(value: str | bytes, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date_in_the_future() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True)
    assert when.endswith("GMT")
    assert parse_retry_after(when, NOW) == pytest.approx(90.0)
    assert parse_retry_after(when.encode("latin-1"), NOW) == pytest.approx(90.0)


def test_retry_after_rfc850_and_asctime_dates() -> None:
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", NOW) == pytest.approx(60.0)
    assert parse_retry_after("Thu Jan  1 00:02:00 2026", NOW) is not None


def test_retry_after_http_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", ["-1", "-3600", b"-0.5"])
def test_negative_retry_after_means_now(value: str | bytes) -> None:
    assert parse_retry_after(value, NOW) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "12abc", "Thursday", b"\xff\xfe", "1 2", "0x10"]
)
def test_garbage_or_missing_retry_after_is_none(value: str | bytes | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_nan_retry_after_is_not_a_delay() -> None:
    assert parse_retry_after("nan", NOW) == 0.0


# ---------------------------------------------------------------------------------------------
# backoff


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 12, 40, 10_000])
def test_full_jitter_stays_within_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(60.0, 0.5 * 2 ** min(attempt - 1, 200))
    delays = [backoff(attempt, rng=rng) for _ in range(300)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # it is jitter, not a constant: the draws spread over the window
    assert max(delays) - min(delays) > ceiling / 4


def test_first_attempt_is_within_base() -> None:
    rng = random.Random(1)
    assert all(0.0 <= backoff(1, base=2.0, cap=100.0, rng=rng) <= 2.0 for _ in range(200))


def test_cap_bounds_large_attempts() -> None:
    rng = random.Random(2)
    assert all(backoff(64, base=1.0, cap=5.0, rng=rng) <= 5.0 for _ in range(200))


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(3)
    for _ in range(200):
        assert backoff(1, base=0.5, cap=60.0, retry_after=30.0, rng=rng) == 30.0
    # a larger jittered delay wins over a small Retry-After
    delays = [backoff(10, base=0.5, cap=60.0, retry_after=1.0, rng=rng) for _ in range(200)]
    assert all(1.0 <= d <= 60.0 for d in delays)
    assert max(delays) > 1.0


def test_retry_after_above_the_jitter_cap_still_holds() -> None:
    assert backoff(1, cap=60.0, retry_after=120.0, rng=random.Random(4)) == 120.0


def test_retry_after_is_capped_by_max_retry_after() -> None:
    rng = random.Random(5)
    assert backoff(1, retry_after=10_000.0, max_retry_after=300.0, rng=rng) == 300.0
    assert backoff(1, retry_after=float("inf"), max_retry_after=300.0, rng=rng) == 300.0


def test_retry_after_zero_is_no_floor() -> None:
    rng = random.Random(6)
    assert all(0.0 <= backoff(3, retry_after=0.0, rng=rng) <= 2.0 for _ in range(100))


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=0.001, max_value=3600.0),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=1e6),
    max_retry_after=st.floats(min_value=0.0, max_value=7200.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_property(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None,
    max_retry_after: float,
    seed: int,
) -> None:
    delay = backoff(
        attempt,
        base=base,
        cap=cap,
        retry_after=retry_after,
        max_retry_after=max_retry_after,
        rng=random.Random(seed),
    )
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    if retry_after is None:
        assert 0.0 <= delay <= ceiling
    else:
        floor = min(retry_after, max_retry_after)
        assert delay >= floor
        assert delay <= max(ceiling, floor)
