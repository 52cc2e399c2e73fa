"""The real client address and public origin, believing forwarded headers only from trusted hops."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.edge.forwarded import (
    Network,
    PublicOrigin,
    client_ip,
    host_allowed,
    is_trusted,
    public_origin,
    valid_host,
)

TRUSTED: tuple[Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
)
LB = "10.0.0.5"  # a trusted load balancer
VISITOR = "203.0.113.7"


# ---------------------------------------------------------------------------------------------
# client_ip


def test_without_forwarded_for_the_peer_is_the_client() -> None:
    assert client_ip(LB, None, TRUSTED) == LB
    assert client_ip(VISITOR, None, TRUSTED) == VISITOR


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_ip(VISITOR, b"1.2.3.4", TRUSTED) == VISITOR


def test_forwarded_for_is_ignored_when_no_proxies_are_trusted() -> None:
    assert client_ip(LB, b"1.2.3.4", ()) == LB


def test_forwarded_for_from_a_trusted_peer_names_the_client() -> None:
    assert client_ip(LB, VISITOR.encode(), TRUSTED) == VISITOR


def test_chain_is_walked_right_to_left_skipping_trusted_hops() -> None:
    chain = b"198.51.100.1, 203.0.113.7, 10.0.0.9, 10.1.2.3"
    assert client_ip(LB, chain, TRUSTED) == VISITOR


def test_a_visitor_cannot_forge_its_address_by_sending_forwarded_for_itself() -> None:
    # The visitor sent "X-Forwarded-For: 8.8.8.8"; the trusted LB appended the real address.
    assert client_ip(LB, b"8.8.8.8, " + VISITOR.encode(), TRUSTED) == VISITOR


def test_ipv6_hops_are_understood_and_normalised() -> None:
    assert client_ip("fd00::1", b"2001:DB8:0::1, fd00::2", TRUSTED) == "2001:db8::1"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert client_ip(LB, b"10.0.0.3, 10.0.0.2", TRUSTED) == "10.0.0.3"


@pytest.mark.parametrize(
    "chain",
    [
        b"",
        b"unknown",
        b"203.0.113.7, garbage",
        b"203.0.113.7:5555",
        b"[2001:db8::1]",
        b"203.0.113.7,,10.0.0.2",
        b"203.0.113.7\xff",
        b"999.1.1.1",
    ],
)
def test_malformed_chain_falls_back_to_the_peer(chain: bytes) -> None:
    assert client_ip(LB, chain, TRUSTED) == LB


def test_is_trusted_refuses_non_addresses() -> None:
    assert is_trusted("10.1.1.1", TRUSTED)
    assert not is_trusted("unix", TRUSTED)
    assert not is_trusted("", TRUSTED)
    assert not is_trusted("11.0.0.1", TRUSTED)


untrusted_peers = st.ip_addresses(v=4).filter(lambda ip: ip not in TRUSTED[0]).map(str)


@settings(max_examples=200, deadline=None)
@given(peer=untrusted_peers, chain=st.one_of(st.none(), st.binary(max_size=80)))
def test_untrusted_peer_is_the_client_whatever_it_sends(peer: str, chain: bytes | None) -> None:
    assert client_ip(peer, chain, TRUSTED) == peer


ip_text = st.ip_addresses().map(str)
chains = st.one_of(
    st.binary(max_size=80),
    st.lists(st.one_of(ip_text, st.sampled_from(["10.0.0.1", "fd00::9", "x", ""])), max_size=6).map(
        lambda hops: ", ".join(hops).encode()
    ),
)


@settings(max_examples=200, deadline=None)
@given(chain=chains)
def test_client_ip_is_always_the_peer_or_an_ip_address(chain: bytes) -> None:
    result = client_ip(LB, chain, TRUSTED)
    if result != LB:
        ipaddress.ip_address(result)  # raises if it is not an address


@settings(max_examples=200, deadline=None)
@given(visitor=st.ip_addresses(v=4).filter(lambda ip: ip not in TRUSTED[0]), hops=st.integers(0, 4))
def test_any_number_of_trusted_hops_is_skipped(visitor: ipaddress.IPv4Address, hops: int) -> None:
    chain = ", ".join([str(visitor)] + [f"10.0.0.{i + 1}" for i in range(hops)]).encode()
    assert client_ip(LB, chain, TRUSTED) == str(visitor)


# ---------------------------------------------------------------------------------------------
# public_origin


def origin(
    host: bytes | None,
    *,
    peer: str = VISITOR,
    scheme: str = "http",
    fwd_host: bytes | None = None,
    fwd_proto: bytes | None = None,
) -> PublicOrigin | None:
    return public_origin(peer, scheme, host, fwd_host, fwd_proto, TRUSTED)


def test_host_header_gives_the_public_origin_in_lower_case() -> None:
    result = origin(b"Shop.Example.COM:8080")
    assert result == PublicOrigin("http", "shop.example.com:8080")
    assert result is not None
    assert result.origin == "http://shop.example.com:8080"


@pytest.mark.parametrize(
    ("scheme", "host", "expected"),
    [
        ("https", b"shop.example.com:443", "shop.example.com"),
        ("http", b"shop.example.com:80", "shop.example.com"),
        ("https", b"shop.example.com:80", "shop.example.com:80"),
        ("http", b"shop.example.com:443", "shop.example.com:443"),
        ("https", b"shop.example.com:8443", "shop.example.com:8443"),
        ("https", b"[2001:db8::1]:443", "[2001:db8::1]"),
        ("http", b"[::1]:8080", "[::1]:8080"),
        ("http", b"127.0.0.1:8080", "127.0.0.1:8080"),
    ],
)
def test_default_port_for_the_scheme_is_dropped(scheme: str, host: bytes, expected: str) -> None:
    assert origin(host, scheme=scheme) == PublicOrigin(scheme, expected)


@pytest.mark.parametrize(
    "host",
    [
        None,
        b"",
        b"exa mple.com",
        b" shop.example.com",
        b"shop.example.com\r\nX-Evil: 1",
        b"shop.example.com\r",
        b"a@b",
        b"user:pw@shop.example.com",
        b"shop.example.com/path",
        b"shop.example.com?x",
        b"http://shop.example.com",
        b"shop.example.com:",
        b"shop.example.com:abc",
        b"shop.example.com:0",
        b"shop.example.com:65536",
        b"[::1",
        b"[zz::1]",
        b"[1:2:3:4:5:6:7:8:9]",
        b"::1",
        b"\xffexample.com",
        b"<script>",
        b'x"onload="y',
    ],
)
def test_junk_host_gives_no_public_origin(host: bytes | None) -> None:
    assert origin(host) is None


def test_host_with_a_trailing_newline_is_rejected() -> None:
    assert not valid_host("shop.example.com\n")
    assert origin(b"shop.example.com\n") is None


def test_forwarded_host_and_proto_from_an_untrusted_peer_are_ignored() -> None:
    result = origin(b"proxy.internal:8080", fwd_host=b"evil.example", fwd_proto=b"https")
    assert result == PublicOrigin("http", "proxy.internal:8080")


def test_forwarded_host_and_proto_from_a_trusted_peer_are_used() -> None:
    result = origin(
        b"segproxy.internal:8080", peer=LB, fwd_host=b"Shop.Example.com", fwd_proto=b"HTTPS"
    )
    assert result == PublicOrigin("https", "shop.example.com")


def test_first_forwarded_host_and_proto_of_a_list_are_used() -> None:
    result = origin(
        b"internal",
        peer=LB,
        fwd_host=b"shop.example.com:443, lb.internal",
        fwd_proto=b"https, http",
    )
    assert result == PublicOrigin("https", "shop.example.com")


def test_unknown_forwarded_proto_keeps_the_connection_scheme() -> None:
    result = origin(b"shop.example.com", peer=LB, scheme="https", fwd_proto=b"ftp")
    assert result == PublicOrigin("https", "shop.example.com")


def test_trusted_peer_without_forwarded_host_falls_back_to_host() -> None:
    assert origin(b"shop.example.com", peer=LB) == PublicOrigin("http", "shop.example.com")


def test_junk_forwarded_host_from_a_trusted_peer_gives_no_origin() -> None:
    assert origin(b"shop.example.com", peer=LB, fwd_host=b"evil.example\r\nx: y") is None
    assert origin(b"shop.example.com", peer=LB, fwd_host=b"a@b") is None


@settings(max_examples=200, deadline=None)
@given(host=st.binary(max_size=40), fwd=st.one_of(st.none(), st.binary(max_size=40)))
def test_any_public_origin_is_a_safe_host(host: bytes, fwd: bytes | None) -> None:
    for peer in (VISITOR, LB):
        result = origin(host, peer=peer, fwd_host=fwd, fwd_proto=fwd)
        if result is None:
            continue
        assert result.scheme in ("http", "https")
        assert result.host == result.host.lower()
        assert result.host.isascii()
        for bad in ("@", "/", "\\", " ", "\r", "\t", ",", "?", "#"):
            assert bad not in result.host


# ---------------------------------------------------------------------------------------------
# host_allowed


def test_empty_allow_list_allows_any_host() -> None:
    assert host_allowed(PublicOrigin("https", "anything.example"), frozenset())


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("shop.example.com", True),
        ("shop.example.com:8443", True),  # a bare entry allows any port
        ("cdn.example.com:8443", True),
        ("cdn.example.com", False),  # an entry with a port allows only that port
        ("cdn.example.com:9000", False),
        ("evil.example", False),
        ("shop.example.com.evil.example", False),
        ("evil-shop.example.com", False),
        ("example.com", False),
    ],
)
def test_allow_list_matches_hosts_with_or_without_port(host: str, allowed: bool) -> None:
    hosts = frozenset({"shop.example.com", "cdn.example.com:8443"})
    assert host_allowed(PublicOrigin("https", host), hosts) is allowed
