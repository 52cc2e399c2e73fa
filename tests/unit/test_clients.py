"""The real client address and public origin, believing forwarded headers only from trusted hops."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.clients import (
    Network,
    PublicOrigin,
    host_allowed,
    is_trusted,
    parse_forwarded,
    public_origin,
)
from segproxy.clients import client_ip as client_ip_of
from segproxy.hosts import valid_authority

TRUSTED: tuple[Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
)
LB = "10.0.0.5"  # a trusted load balancer
VISITOR = "203.0.113.7"


def client_ip(
    peer: str, xff: bytes | None, trusted: tuple[Network, ...], forwarded: bytes | None = None
) -> str:
    headers = {}
    if xff is not None:
        headers[b"x-forwarded-for"] = xff
    if forwarded is not None:
        headers[b"forwarded"] = forwarded
    return client_ip_of(peer, headers, trusted)


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
    forwarded: bytes | None = None,
    xff: bytes | None = None,
) -> PublicOrigin | None:
    named = {
        b"host": host,
        b"x-forwarded-host": fwd_host,
        b"x-forwarded-proto": fwd_proto,
        b"forwarded": forwarded,
        b"x-forwarded-for": xff,
    }
    headers = {k: v for k, v in named.items() if v is not None}
    return public_origin(peer, scheme, headers, TRUSTED)


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
    assert not valid_authority("shop.example.com\n")
    assert origin(b"shop.example.com\n") is None


def test_forwarded_host_and_proto_from_an_untrusted_peer_are_ignored() -> None:
    result = origin(b"proxy.internal:8080", fwd_host=b"evil.example", fwd_proto=b"https")
    assert result == PublicOrigin("http", "proxy.internal:8080")


def test_forwarded_host_and_proto_from_a_trusted_peer_are_used() -> None:
    result = origin(
        b"segproxy.internal:8080", peer=LB, fwd_host=b"Shop.Example.com", fwd_proto=b"HTTPS"
    )
    assert result == PublicOrigin("https", "shop.example.com")


def test_the_rightmost_forwarded_host_and_proto_are_used_the_ones_the_nearest_hop_wrote() -> None:
    # An appending balancer (Envoy, HAProxy add-header): the visitor's values come first.
    result = origin(
        b"internal",
        peer=LB,
        fwd_host=b"evil.example, shop.example.com:443",
        fwd_proto=b"http, https",
    )
    assert result == PublicOrigin("https", "shop.example.com")


def test_unknown_forwarded_proto_keeps_the_connection_scheme() -> None:
    result = origin(b"shop.example.com", peer=LB, scheme="https", fwd_proto=b"ftp")
    assert result == PublicOrigin("https", "shop.example.com")


def test_trusted_peer_without_forwarded_host_falls_back_to_host() -> None:
    assert origin(b"shop.example.com", peer=LB) == PublicOrigin("http", "shop.example.com")


@pytest.mark.parametrize(
    "junk", [b"evil.example\r\nx: y", b"a@b", b"", b"shop.example.com, ", b"evil.example, a b"]
)
def test_junk_forwarded_host_from_a_trusted_peer_falls_back_to_the_host_header(
    junk: bytes,
) -> None:
    assert origin(b"shop.example.com", peer=LB, fwd_host=junk) == PublicOrigin(
        "http", "shop.example.com"
    )


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


# ---------------------------------------------------------------------------------------------
# Forwarded (RFC 7239)


def test_forwarded_elements_and_parameters_are_read_with_quotes_and_escapes() -> None:
    value = (
        b'For="[2001:db8:cafe::17]:4711";proto=HTTPS;by=_lb1, for=192.0.2.60;host="a.example:8080"'
        b', ;; , for=unknown;ext="x\\"y\\\\z, w;v"'
    )
    assert parse_forwarded(value) == [
        {"for": "[2001:db8:cafe::17]:4711", "proto": "HTTPS", "by": "_lb1"},
        {"for": "192.0.2.60", "host": "a.example:8080"},
        {"for": "unknown", "ext": 'x"y\\z, w;v'},
    ]


@pytest.mark.parametrize(
    "value",
    [
        b'for="192.0.2.60',  # an unbalanced quote
        b"for=",
        b"for",
        b"=x",
        b"for=a b",
        b"for=[2001:db8::1]",  # brackets and colons are not token characters: must be quoted
        b"for=a;for=b",  # a parameter twice in one element
        b'for="a"b',
        b"for=a\x00",
        b'host="a\x7f"',
    ],
)
def test_a_malformed_forwarded_header_is_no_value(value: bytes) -> None:
    assert parse_forwarded(value) is None
    assert client_ip(LB, None, TRUSTED, forwarded=value) == LB
    assert origin(b"shop.example.com", peer=LB, forwarded=value) == PublicOrigin(
        "http", "shop.example.com"
    )


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (b"for=203.0.113.7", VISITOR),
        (b'for="203.0.113.7:5123"', VISITOR),
        (b'for="[2001:DB8::7]"', "2001:db8::7"),
        (b'for="[2001:db8::7]:4711"', "2001:db8::7"),
        (b'for="[2001:db8::7]:_port"', "2001:db8::7"),
        (b'for=8.8.8.8, for="203.0.113.7", for=10.0.0.9', VISITOR),  # trusted hops skipped
        (b"for=10.0.0.3, for=10.0.0.2", "10.0.0.3"),  # all trusted: the leftmost
        (b"for=203.0.113.7, for=unknown", LB),  # who connected is not said: the peer
        (b"for=203.0.113.7, for=_hidden", LB),  # obfuscated: not an address
        (b'for=203.0.113.7, for="_hidden:_port"', LB),
        (b"for=203.0.113.7, proto=https", LB),  # the nearest element names no client
        (b'for="203.0.113.7:8o"', LB),  # a port is digits or an obfuscated _name
        (b'for="[203.0.113.7]"', LB),
        (b'for="2001:db8::7"', LB),  # IPv6 without brackets is malformed
    ],
)
def test_forwarded_for_is_walked_from_the_right_like_x_forwarded_for(
    forwarded: bytes, expected: str
) -> None:
    assert client_ip(LB, None, TRUSTED, forwarded=forwarded) == expected
    assert client_ip(VISITOR, None, TRUSTED, forwarded=forwarded) == VISITOR


def test_forwarded_host_and_proto_come_from_the_rightmost_element() -> None:
    forwarded = (
        b"for=1.2.3.4;host=evil.example;proto=http, "
        b'for=203.0.113.7;host="Shop.Example.com:443";proto=https'
    )
    result = origin(b"internal", peer=LB, forwarded=forwarded)
    assert result == PublicOrigin("https", "shop.example.com")


def test_the_rightmost_element_without_host_or_proto_falls_back_to_the_connection() -> None:
    forwarded = b"for=1.2.3.4;host=evil.example;proto=https, for=203.0.113.7"
    assert origin(b"shop.example.com", peer=LB, forwarded=forwarded) == PublicOrigin(
        "http", "shop.example.com"
    )


def test_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    forwarded = b"for=1.2.3.4;host=evil.example;proto=https"
    assert client_ip(VISITOR, None, TRUSTED, forwarded=forwarded) == VISITOR
    assert origin(b"shop.example.com", forwarded=forwarded) == PublicOrigin(
        "http", "shop.example.com"
    )


# -- both families: a value is believed only where they agree


def test_both_families_agreeing_are_believed() -> None:
    forwarded = b"for=203.0.113.7;host=shop.example.com;proto=https"
    result = origin(
        b"internal",
        peer=LB,
        forwarded=forwarded,
        fwd_host=b"shop.example.com",
        fwd_proto=b"https",
        xff=b"203.0.113.7",
    )
    assert result == PublicOrigin("https", "shop.example.com")
    assert client_ip(LB, b"203.0.113.7", TRUSTED, forwarded=forwarded) == VISITOR


def test_a_visitors_forwarded_header_passed_on_by_an_x_forwarded_balancer_is_not_believed() -> None:
    # The balancer writes X-Forwarded-For/-Proto but no -Host (as some cloud balancers do) and
    # passes the visitor's Forwarded header on.
    forwarded = b"for=1.2.3.4;host=evil.example;proto=https"
    result = origin(
        b"shop.example.com", peer=LB, forwarded=forwarded, fwd_proto=b"https", xff=b"203.0.113.7"
    )
    assert result == PublicOrigin("https", "shop.example.com")
    assert client_ip(LB, b"203.0.113.7", TRUSTED, forwarded=forwarded) == LB


def test_a_visitors_x_forwarded_host_passed_on_by_a_forwarded_balancer_is_not_believed() -> None:
    forwarded = b"for=203.0.113.7;host=shop.example.com;proto=https"
    result = origin(b"internal", peer=LB, forwarded=forwarded, fwd_host=b"evil.example")
    assert result == PublicOrigin("http", "internal")
    assert client_ip(LB, b"1.2.3.4", TRUSTED, forwarded=forwarded) == LB


# -- properties


_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
ports = st.integers(1, 65535).map(str)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
obfuscated = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).map(lambda s: "_" + s)
nodes = st.one_of(
    st.tuples(
        st.one_of(v4, v6, obfuscated, st.just("unknown")), st.one_of(st.none(), ports, obfuscated)
    ).map(lambda t: t[0] if t[1] is None else f"{t[0]}:{t[1]}")
)
host_names = st.sampled_from(
    ["shop.example.com", "a.example:8443", "[2001:db8::1]:443", "x-y.example"]
)
any_values = st.text(
    alphabet=st.characters(min_codepoint=9, max_codepoint=255), max_size=12
).filter(lambda s: all(c == "\t" or 32 <= ord(c) != 127 for c in s))
param_names = st.text(alphabet=_TCHAR, min_size=1, max_size=6)
elements = st.dictionaries(
    st.one_of(st.sampled_from(["for", "by", "host", "proto"]), param_names.map(str.lower)),
    st.one_of(nodes, host_names, st.sampled_from(["http", "https"]), any_values),
    min_size=1,
    max_size=4,
)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def written_forwarded(draw: st.DrawFn, parsed: list[dict[str, str]]) -> bytes:
    """``parsed`` written the ways proxies write it: names in any case, values quoted when they
    must be (or when the writer likes), optional whitespace, several header lines."""
    written = []
    for element in parsed:
        pairs = []
        for name, value in element.items():
            token = bool(value) and all(c in _TCHAR for c in value)
            shown = value if token and draw(st.booleans()) else _quoted(value)
            pairs.append(draw(st.sampled_from([name, name.upper(), name.title()])) + "=" + shown)
        written.append(draw(st.sampled_from([";", " ;", "; "])).join(pairs))
    lines: list[str] = []
    for text in written:
        if lines and not draw(st.booleans()):
            lines[-1] += draw(st.sampled_from([",", ", ", " ,\t"])) + text
        else:
            lines.append(text)
    return ", ".join(lines).encode("latin-1")  # how the edge joins repeated header lines


@settings(max_examples=300, deadline=None)
@given(data=st.data(), parsed=st.lists(elements, min_size=1, max_size=4))
def test_any_forwarded_header_a_proxy_writes_is_read_back_exactly(
    data: st.DataObject, parsed: list[dict[str, str]]
) -> None:
    assert parse_forwarded(data.draw(written_forwarded(parsed))) == parsed


def _node(ip: str, port: str | None) -> str:
    shown = f"[{ip}]" if ":" in ip else ip
    return shown if port is None else f"{shown}:{port}"


visitors = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: ip not in TRUSTED[0]),
    st.ip_addresses(v=6).filter(lambda ip: ip not in TRUSTED[1]),
).map(str)
junk = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from(
        [b"evil.example", b"evil.example:443", b"https", b"8.8.8.8", b'"', b",", b"\\"]
    ),
)
visitor_forwarded = st.one_of(
    st.none(),
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"for=8.8.8.8;host=evil.example;proto=http",
            b'for="8.8.8.8";host="evil.example:443";proto=https,',
            b'host="',
            b"for=8.8.8.8;host=evil.example;proto=https;",
        ]
    ),
)
INTERNAL = b"lb.internal:8080"  # the Host header the balancer sends: the fallback


def _balancer_or_connection(
    result: PublicOrigin | None, ip: str, expected: PublicOrigin, visitor: str, *, exact: bool
) -> None:
    """What the balancer saw (``exact``: nothing the visitor sent interferes), or else, value
    by value, either that or the connection's own: never a value of the visitor's choosing."""
    if exact:
        assert result == expected
        assert ip == visitor
        return
    assert result is not None
    assert result.host in (expected.host, INTERNAL.decode())
    assert result.scheme in (expected.scheme, "http")
    assert ip in (visitor, LB)


@settings(max_examples=300, deadline=None)
@given(
    visitor=visitors,
    public=host_names,
    proto=st.sampled_from(["http", "https"]),
    appends_proto=st.booleans(),
    sent_xff=junk,
    sent_host=junk,
    sent_proto=junk,
    sent_forwarded=visitor_forwarded,
)
def test_a_visitor_behind_an_appending_x_forwarded_balancer_never_chooses_host_scheme_or_address(
    visitor: str,
    public: str,
    proto: str,
    appends_proto: bool,
    sent_xff: bytes | None,
    sent_host: bytes | None,
    sent_proto: bytes | None,
    sent_forwarded: bytes | None,
) -> None:
    def appended(sent: bytes | None, own: str) -> bytes:
        return own.encode() if sent is None else sent + b", " + own.encode()

    headers = {
        b"host": INTERNAL,
        b"x-forwarded-for": appended(sent_xff, visitor),
        b"x-forwarded-host": appended(sent_host, public),
        b"x-forwarded-proto": appended(sent_proto, proto) if appends_proto else proto.encode(),
    }
    if sent_forwarded is not None:
        headers[b"forwarded"] = sent_forwarded
    result = public_origin(LB, "http", headers, TRUSTED)
    ip = client_ip_of(LB, headers, TRUSTED)
    expected = origin(public.encode(), scheme=proto)  # what the balancer saw
    assert expected is not None
    # the families disagree unless the visitor guessed right: then the connection's own
    _balancer_or_connection(result, ip, expected, visitor, exact=sent_forwarded is None)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    visitor=visitors,
    port=st.one_of(st.none(), ports),
    public=host_names,
    proto=st.sampled_from(["http", "https"]),
    sent_xff=junk,
    sent_host=junk,
    sent_forwarded=st.one_of(
        st.none(), st.binary(max_size=60), st.lists(elements, min_size=1, max_size=3)
    ),
)
def test_a_visitor_behind_a_forwarded_balancer_never_chooses_host_scheme_or_address(
    data: st.DataObject,
    visitor: str,
    port: str | None,
    public: str,
    proto: str,
    sent_xff: bytes | None,
    sent_host: bytes | None,
    sent_forwarded: bytes | list[dict[str, str]] | None,
) -> None:
    own = {"for": _node(visitor, port), "host": public, "proto": proto}
    mine = data.draw(written_forwarded([own]))
    sent = sent_forwarded
    if isinstance(sent, list):
        sent = data.draw(written_forwarded(sent))
    headers = {b"host": INTERNAL, b"forwarded": mine if sent is None else sent + b", " + mine}
    if sent_xff is not None:
        headers[b"x-forwarded-for"] = sent_xff
    if sent_host is not None:
        headers[b"x-forwarded-host"] = sent_host
    result = public_origin(LB, "http", headers, TRUSTED)
    ip = client_ip_of(LB, headers, TRUSTED)
    expected = origin(public.encode(), scheme=proto)
    assert expected is not None
    well_formed = not isinstance(sent_forwarded, bytes)
    exact = well_formed and sent_xff is None and sent_host is None
    _balancer_or_connection(result, ip, expected, visitor, exact=exact)


@settings(max_examples=300, deadline=None)
@given(
    peer=st.sampled_from([LB, VISITOR, "unix", "fd00::1"]),
    values=st.lists(st.one_of(st.none(), st.binary(max_size=50)), min_size=5, max_size=5),
)
def test_any_forwarded_headers_give_a_safe_origin_and_an_address_never_an_error(
    peer: str, values: list[bytes | None]
) -> None:
    names = [b"host", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"forwarded"]
    headers = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    result = public_origin(peer, "https", headers, TRUSTED)
    if result is not None:
        assert result.scheme in ("http", "https")
        assert valid_authority(result.host)
    ip = client_ip_of(peer, headers, TRUSTED)
    if ip != peer:
        ipaddress.ip_address(ip)
    if not is_trusted(peer, TRUSTED):
        assert ip == peer
        assert result == public_origin(peer, "https", {b"host": values[0] or b""}, TRUSTED)
