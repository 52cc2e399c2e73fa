"""Every CORS header the proxy sends, from its one module (segproxy.cors)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segproxy import cors
from segproxy.cors import CDN_PREFLIGHT, FOR_CDN, FOR_EDGE, api_preflight, for_api


def test_the_api_reflects_a_well_formed_origin_and_exposes_the_retry_headers() -> None:
    assert for_api(b"https://shop.example.com") == [
        (b"access-control-allow-origin", b"https://shop.example.com"),
        (b"access-control-expose-headers", b"Retry-After, X-RateLimit-Reset"),
        (b"vary", b"Origin"),
    ]


@pytest.mark.parametrize(
    "origin",
    [b"null", b"http://localhost:3000", b"https://[::1]:8443", b"https://a-b.example"],
)
def test_well_formed_origins_are_reflected(origin: bytes) -> None:
    assert for_api(origin)[0] == (b"access-control-allow-origin", origin)


@pytest.mark.parametrize(
    "origin",
    [
        b"",
        b"ftp://shop.example.com",
        b"https://",
        b"https://shop.example.com/path",
        b"https://a b",
        b"https://shop.example.com\r\nx: y",
        b"https://" + b"a" * 261,
        b"*",
    ],
)
def test_anything_else_is_answered_with_a_star(origin: bytes) -> None:
    assert for_api(origin) == [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"Retry-After, X-RateLimit-Reset"),
        (b"vary", b"Origin"),
    ]


def test_no_origin_is_answered_with_a_star_and_never_with_credentials() -> None:
    assert for_api(None)[0] == (b"access-control-allow-origin", b"*")
    for origin in (None, b"https://shop.example.com", b"junk"):
        names = [name for name, _ in for_api(origin)]
        assert b"access-control-allow-credentials" not in names


def test_the_same_origin_gets_the_same_shared_list() -> None:
    assert for_api(b"https://a.example") is for_api(b"https://a.example")
    assert for_api(None) is for_api(None)


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=50))
def test_what_is_remembered_stays_bounded_and_right(origins: list[bytes]) -> None:
    for origin in origins:
        first = for_api(origin)
        assert for_api(origin) == first
        assert first[0][1] in (origin, b"*")
    assert len(cors._API_SEEN) <= cors._API_SEEN.limit


def test_a_flood_of_origins_is_bounded() -> None:
    for i in range(3000):
        for_api(b"https://h%d.example" % i)
    assert len(cors._API_SEEN) <= 1024


def test_the_api_preflight_allows_what_analytics_js_sends() -> None:
    headers = dict(api_preflight(b"https://shop.example.com"))
    assert headers[b"access-control-allow-origin"] == b"https://shop.example.com"
    assert headers[b"access-control-allow-methods"] == b"POST, OPTIONS"
    assert headers[b"access-control-allow-headers"] == (
        b"authorization, content-type, x-retry-count"
    )
    assert headers[b"access-control-max-age"] == b"86400"
    assert headers[b"vary"] == b"Origin"
    assert api_preflight(None)[:3] == for_api(None)


def test_the_cdn_is_public_to_every_origin() -> None:
    assert FOR_CDN == [(b"access-control-allow-origin", b"*")]
    assert CDN_PREFLIGHT == [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-methods", b"GET, HEAD, OPTIONS"),
        (b"access-control-max-age", b"86400"),
    ]


def test_the_edge_refusals_let_any_script_read_retry_after() -> None:
    assert FOR_EDGE == [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"Retry-After"),
    ]
