"""One host grammar (segproxy.hosts) for public_hosts entries and the hosts requests name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.clients import PublicOrigin, host_allowed, public_origin
from segproxy.config import ConfigError, load
from segproxy.hosts import MAX_AUTHORITY, MAX_NAME, valid_authority, valid_name


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "localhost",
        "shop.example.com",
        "x-y.example",
        "a1.b2.c3",
        "0.example",
        "127.0.0.1",
        "xn--bcher-kva.example",
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3) + "." + "a" * 61,  # 253 characters
    ],
)
def test_dns_names_are_names(name: str) -> None:
    assert valid_name(name)
    assert valid_authority(name)
    assert valid_authority(name + ":8443")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-a.example",
        "a-.example",
        "a.-b.example",  # config.py took a label starting with '-' after the first
        "a.b-.example",
        "a..b",  # clients.py took empty labels
        "a.",
        ".a",
        "a" * 64 + ".example",  # a label over 63
        ".".join(["a" * 63] * 3) + "." + "a" * 62,  # 254 characters
        "a_b.example",
        "a b",
        "a\n",
        "é.example",
        "[::1]",
    ],
)
def test_anything_else_is_not_a_name(name: str) -> None:
    assert not valid_name(name)


@pytest.mark.parametrize(
    "authority",
    ["[::1]", "[::1]:8080", "[2001:db8::1]:443", "[::ffff:1.2.3.4]", "a.example:1", "a:65535"],
)
def test_authorities_take_ipv6_literals_and_ports(authority: str) -> None:
    assert valid_authority(authority)


@pytest.mark.parametrize(
    "authority",
    [
        "a.example:",
        "a.example:0",
        "a.example:65536",
        "a.example:123456",
        "a.example:abc",
        "::1",
        "[::1",
        "[zz::1]",
        "[1:2:3:4:5:6:7:8:9]",
        "a@b",
        "a/b",
        "a.example\n",
        "a.example:80\n",
        "a" * 64,
        "a..b:80",
    ],
)
def test_malformed_authorities_are_refused(authority: str) -> None:
    assert not valid_authority(authority)


def test_a_long_value_is_refused_before_the_pattern() -> None:
    name = ".".join(["a" * 63] * 3) + "." + "a" * 61
    assert len(name) == MAX_NAME
    assert valid_authority(name + ":65535")
    assert len(name + ":65535") == MAX_AUTHORITY
    assert not valid_authority(name + "a:6553")  # a 254-character name, whatever its port
    assert not valid_authority("a" * 100_000)


# ---------------------------------------------------------------------------------------------
# Both sides read by it: what config accepts is what a request can name


def public_hosts(*entries: str) -> frozenset[str]:
    return load(None, {"SEGPROXY_PUBLIC_HOSTS": ",".join(entries)}).public_hosts


@pytest.mark.parametrize(
    "entry", ["a.-b.example", "a..b", "a.example:0", "a.example:99999", "a_b.example"]
)
def test_config_refuses_an_entry_no_request_could_name(entry: str) -> None:
    with pytest.raises(ConfigError, match="host names"):
        public_hosts(entry)


def test_config_takes_ipv6_literals_as_a_request_names_them() -> None:
    hosts = public_hosts("[2001:db8::1]", "[::1]:8443", "[::2]:443")
    assert hosts == {"[2001:db8::1]", "[::1]:8443", "[::2]"}
    assert host_allowed(PublicOrigin("https", "[2001:db8::1]:8443"), hosts)
    assert host_allowed(PublicOrigin("https", "[::1]:8443"), hosts)
    assert not host_allowed(PublicOrigin("https", "[::1]"), hosts)


labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.one_of(st.none(), st.integers(min_value=1, max_value=65535))


@settings(max_examples=200, deadline=None)
@given(name=names, port=ports)
def test_every_host_config_accepts_is_one_a_request_can_name_and_match(
    name: str, port: int | None
) -> None:
    entry = name if port is None else f"{name}:{port}"
    (kept,) = public_hosts(entry)
    origin = public_origin("203.0.113.7", "https", {b"host": entry.encode()}, ())
    assert origin is not None
    assert valid_authority(origin.host)
    assert host_allowed(origin, frozenset({kept}))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab-.:[]1_ ", max_size=12))
def test_config_and_requests_agree_on_every_value(text: str) -> None:
    """A value is a public_hosts entry exactly when a request's Host may hold it."""
    value = text.strip().lower()
    if not value or "," in value:
        return
    try:
        public_hosts(value)
        accepted = True
    except ConfigError:
        accepted = False
    entry = value.removesuffix(":443").removesuffix(":80")
    assert accepted is valid_authority(entry)
