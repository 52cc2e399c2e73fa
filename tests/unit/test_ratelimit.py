"""The token bucket table, driven by an injected clock."""

from __future__ import annotations

import ipaddress

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segproxy.edge.http import rate_limited, retry_after
from segproxy.ratelimit import TokenBuckets, client_bucket, exempt, table


def allowed_in_a_row(buckets: TokenBuckets, key: str, now: float, limit: int = 1000) -> int:
    n = 0
    while n < limit and buckets.allow(key, now) is None:
        n += 1
    return n


def test_a_new_key_gets_its_burst_then_waits() -> None:
    b = TokenBuckets(rate=2.0, burst=5.0)
    assert allowed_in_a_row(b, "a", 100.0) == 5
    assert b.allow("a", 100.0) == pytest.approx(0.5)  # one token at 2/s


def test_burst_zero_means_twice_the_rate() -> None:
    b = TokenBuckets(rate=3.0)
    assert b.burst == 6.0
    assert allowed_in_a_row(b, "a", 0.0) == 6


def test_burst_is_never_below_one_token() -> None:
    b = TokenBuckets(rate=0.1)  # twice the rate would be 0.2: no request could ever pass
    assert b.burst == 1.0
    assert b.allow("a", 0.0) is None
    assert b.allow("a", 0.0) == pytest.approx(10.0)


def test_tokens_refill_at_the_rate_up_to_the_burst() -> None:
    b = TokenBuckets(rate=1.0, burst=3.0)
    assert allowed_in_a_row(b, "a", 0.0) == 3
    assert b.allow("a", 0.5) == pytest.approx(0.5)
    assert b.allow("a", 1.0) is None  # one token after one second
    assert b.allow("a", 1.0) is not None
    assert allowed_in_a_row(b, "a", 1000.0) == 3  # a long pause refills only the burst


def test_refused_requests_take_no_token() -> None:
    b = TokenBuckets(rate=1.0, burst=1.0)
    assert b.allow("a", 0.0) is None
    for t in (0.1, 0.2, 0.3, 0.9):
        assert b.allow("a", t) == pytest.approx(1.0 - t)
    assert b.allow("a", 1.0) is None


def test_a_clock_going_backwards_refills_nothing() -> None:
    b = TokenBuckets(rate=1.0, burst=1.0)
    assert b.allow("a", 10.0) is None
    assert b.allow("a", 5.0) == pytest.approx(1.0)
    assert b.allow("a", 11.0) is None


def test_keys_have_separate_buckets() -> None:
    b = TokenBuckets(rate=1.0, burst=2.0)
    assert allowed_in_a_row(b, "a", 0.0) == 2
    assert allowed_in_a_row(b, "b", 0.0) == 2
    assert b.allow("a", 0.0) is not None


@pytest.mark.parametrize(
    ("wait", "seconds"), [(0.0001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (9.99, 10), (30.0, 30)]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    wait: float, seconds: int
) -> None:
    assert retry_after(wait) == seconds


def test_retry_after_from_a_slow_rate() -> None:
    b = TokenBuckets(rate=0.25, burst=1.0)
    assert b.allow("a", 0.0) is None
    wait = b.allow("a", 1.0)
    assert wait == pytest.approx(3.0)
    assert wait is not None
    assert retry_after(wait) == 3


def test_the_table_is_bounded_and_drops_the_least_recently_used() -> None:
    b = TokenBuckets(rate=1.0, burst=1.0, max_tracked=100)
    assert b.allow("keep", 0.0) is None
    for i in range(10_000):
        b.allow(f"flood-{i}", 0.0)
        if i % 50 == 0:
            b.allow("keep", 0.0)  # recently used: survives the flood
        assert len(b) <= 100
    assert len(b) == 100
    assert "keep" in b
    assert "flood-0" not in b
    assert b.allow("keep", 0.0) is not None  # still limited: its bucket was kept


def test_a_dropped_key_starts_again_with_a_full_bucket() -> None:
    b = TokenBuckets(rate=1.0, burst=2.0, max_tracked=1)
    assert allowed_in_a_row(b, "a", 0.0) == 2
    assert b.allow("b", 0.0) is None  # evicts "a"
    assert "a" not in b
    assert allowed_in_a_row(b, "a", 0.0) == 2


def test_off_means_no_table_and_a_zero_rate_table_allows_everything() -> None:
    assert table(0.0, 10.0, 100) is None
    assert table(0.0, 0.0, 100) is None
    on = table(2.0, 0.0, 100)
    assert on is not None
    assert on.burst == 4.0
    off = TokenBuckets(rate=0.0)
    assert all(off.allow(f"k{i % 3}", 0.0) is None for i in range(10_000))
    assert len(off) == 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        TokenBuckets(rate=-1.0)
    with pytest.raises(ValueError, match="max_tracked"):
        TokenBuckets(rate=1.0, max_tracked=0)


def test_exempt_networks() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert exempt("10.1.2.3", nets)
    assert exempt("2001:db8::1", nets)
    assert not exempt("192.0.2.1", nets)
    assert not exempt("not-an-ip", nets)
    assert not exempt("10.1.2.3", ())


def test_the_429_response() -> None:
    resp = rate_limited(2.2, "from this address", [(b"access-control-allow-origin", b"*")])
    assert resp.status == 429
    headers = dict(resp.headers)
    assert headers[b"retry-after"] == b"3"
    assert headers[b"access-control-allow-origin"] == b"*"
    assert headers[b"content-type"] == b"application/json"
    body = orjson.loads(resp.body)
    assert body["success"] is False
    assert body["code"] == "rate_limited"
    assert "3 s" in body["message"]


@given(
    rate=st.floats(min_value=0.01, max_value=1000.0),
    burst=st.floats(min_value=0.0, max_value=1000.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=300),
    start=st.floats(min_value=0.0, max_value=1e6),
)
def test_allowed_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: float, gaps: list[float], start: float
) -> None:
    b = TokenBuckets(rate=rate, burst=burst)
    now = start
    allowed = 0
    for gap in gaps:
        now += gap
        wait = b.allow("k", now)
        if wait is None:
            allowed += 1
        else:
            assert wait > 0
        elapsed = now - start - gaps[0]  # from the first request
        assert allowed <= b.burst + rate * elapsed + 1e-6


@given(
    rate=st.floats(min_value=0.01, max_value=100.0),
    burst=st.floats(min_value=1.0, max_value=100.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=100),
)
def test_waiting_the_answered_time_is_enough(rate: float, burst: float, gaps: list[float]) -> None:
    b = TokenBuckets(rate=rate, burst=burst)
    now = 0.0
    for gap in gaps:
        now += gap
        wait = b.allow("k", now)
        if wait is not None:
            assert b.allow("k", now + wait + 1e-9) is None
            now += wait + 1e-9


@pytest.mark.parametrize(
    ("ip", "bucket"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("unix", "unix"),
    ],
)
def test_ipv4_clients_are_limited_per_address_and_ipv6_per_64(ip: str, bucket: str) -> None:
    assert client_bucket(ip) == bucket
