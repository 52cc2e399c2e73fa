"""CDN cache helpers: content negotiation, ETags, and the byte-bounded LRU."""

from __future__ import annotations

import gzip
from collections import OrderedDict

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.cdn.cache import (
    MIN_COMPRESS,
    LruBytes,
    Representation,
    accepted_encodings,
    choose,
    make_representation,
    not_modified,
)

JS = b"application/javascript; charset=utf-8"
SCRIPT = b"!function(){var analytics=window.analytics=[];analytics.load('__WRITE_KEY__')}();\n" * 40


@pytest.fixture
def script_rep() -> Representation:
    return make_representation(SCRIPT, JS, brotli_quality=5)


# ---------------------------------------------------------------------------------------------
# make_representation


def test_compressible_body_gets_gzip_and_brotli_that_decode_to_the_original(
    script_rep: Representation,
) -> None:
    assert script_rep.gzip is not None
    assert script_rep.br is not None
    assert gzip.decompress(script_rep.gzip) == SCRIPT
    assert brotli.decompress(script_rep.br) == SCRIPT
    assert len(script_rep.gzip) < len(SCRIPT)
    assert len(script_rep.br) < len(SCRIPT)


@pytest.mark.parametrize(
    "ctype",
    [
        b"application/json",
        b"text/javascript",
        b"Application/JavaScript",
        b"text/css",
        b"image/svg+xml",
        b"application/xml",
    ],
)
def test_text_like_types_are_compressed(ctype: bytes) -> None:
    rep = make_representation(b"x" * 1000, ctype, brotli_quality=1)
    assert rep.gzip is not None
    assert rep.br is not None


@pytest.mark.parametrize("ctype", [b"image/png", b"application/octet-stream", b""])
def test_binary_types_are_not_compressed(ctype: bytes) -> None:
    rep = make_representation(b"\x00" * 1000, ctype)
    assert rep.gzip is None
    assert rep.br is None


def test_bodies_below_the_threshold_are_not_compressed() -> None:
    def json_of(size: int) -> bytes:
        return b"{" + b" " * (size - 2) + b"}"

    small = make_representation(json_of(MIN_COMPRESS - 1), b"application/json")
    assert (small.gzip, small.br) == (None, None)
    at_limit = make_representation(json_of(MIN_COMPRESS), b"application/json")
    assert at_limit.gzip is not None


def test_gzip_output_is_deterministic_so_the_gzip_etag_stays_valid_across_refills() -> None:
    a = make_representation(SCRIPT, JS, brotli_quality=1)
    b = make_representation(SCRIPT, JS, brotli_quality=1)
    assert a.gzip == b.gzip
    assert a.etag == b.etag


def test_etag_depends_on_the_body_only() -> None:
    a = make_representation(SCRIPT, JS, brotli_quality=1)
    b = make_representation(SCRIPT + b";", JS, brotli_quality=1)
    c = make_representation(SCRIPT, b"text/plain", brotli_quality=1)
    assert a.etag != b.etag
    assert a.etag == c.etag


def test_upstream_encoded_body_is_kept_as_is_and_not_recompressed() -> None:
    gz = gzip.compress(SCRIPT, mtime=0)
    rep = make_representation(gz, JS, fixed_encoding=b"gzip")
    assert rep.body == gz
    assert (rep.gzip, rep.br) == (None, None)
    assert rep.fixed_encoding == b"gzip"


def test_representation_size_counts_every_stored_encoding(script_rep: Representation) -> None:
    assert script_rep.gzip is not None
    assert script_rep.br is not None
    assert script_rep.size == len(SCRIPT) + len(script_rep.gzip) + len(script_rep.br)


@settings(max_examples=50, deadline=None)
@given(body=st.binary(min_size=0, max_size=4096))
def test_every_encoding_decodes_back_to_the_original_bytes(body: bytes) -> None:
    rep = make_representation(body, b"application/json", brotli_quality=1)
    for accept in (b"br", b"gzip", b"identity", None):
        data, coding, _ = choose(rep, accept)
        if coding == b"br":
            data = brotli.decompress(data)
        elif coding == b"gzip":
            data = gzip.decompress(data)
        else:
            assert coding is None
        assert data == body


# ---------------------------------------------------------------------------------------------
# accepted_encodings


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, set()),
        (b"", set()),
        (b"gzip", {b"gzip"}),
        (b"gzip, deflate, br, zstd", {b"gzip", b"deflate", b"br", b"zstd"}),
        (b"GZIP, BR", {b"gzip", b"br"}),
        (b"gzip;q=0, br", {b"br"}),
        (b"gzip;q=0.0, br;q=0.000", set()),
        (b"br;q=0.1, gzip;q=1.0", {b"br", b"gzip"}),
        (b"gzip; q=0.5", {b"gzip"}),
        (b"gzip;Q=0", set()),
        (b"gzip;q=bogus", set()),
        (b"*", {b"gzip", b"br"}),
        (b"*;q=0", set()),
        (b"identity", {b"identity"}),
    ],
)
def test_accepted_encodings_honour_q_values(header: bytes | None, expected: set[bytes]) -> None:
    assert accepted_encodings(header) - {b""} == expected


@pytest.mark.parametrize("header", [b"br;q=0, *", b"*, br;q=0"])
def test_explicitly_refused_coding_is_not_reinstated_by_the_wildcard(header: bytes) -> None:
    accepted = accepted_encodings(header)
    assert b"br" not in accepted
    assert b"gzip" in accepted


# ---------------------------------------------------------------------------------------------
# choose


@pytest.mark.parametrize(
    ("accept", "coding", "suffix"),
    [
        (b"gzip, deflate, br", b"br", "-br"),
        (b"gzip;q=1, br;q=0.5", b"br", "-br"),
        (b"gzip", b"gzip", "-gz"),
        (b"x-gzip", b"gzip", "-gz"),
        (b"br;q=0, gzip", b"gzip", "-gz"),
        (b"*", b"br", "-br"),
        (b"deflate", None, ""),
        (b"identity", None, ""),
        (b"gzip;q=0, br;q=0", None, ""),
        (None, None, ""),
    ],
)
def test_choose_prefers_brotli_then_gzip_then_identity(
    script_rep: Representation, accept: bytes | None, coding: bytes | None, suffix: str
) -> None:
    body, chosen, etag = choose(script_rep, accept)
    assert chosen == coding
    assert etag == script_rep.etag + suffix
    expected = {b"br": script_rep.br, b"gzip": script_rep.gzip, None: SCRIPT}[coding]
    assert body == expected


def test_uncompressed_representation_is_served_as_identity_to_everyone() -> None:
    rep = make_representation(b"{}", b"application/json")
    assert choose(rep, b"br, gzip") == (b"{}", None, rep.etag)


@pytest.mark.parametrize("accept", [b"br, gzip", b"identity", None])
def test_fixed_encoding_passes_the_upstream_bytes_through_whatever_is_accepted(
    accept: bytes | None,
) -> None:
    gz = gzip.compress(SCRIPT, mtime=0)
    rep = make_representation(gz, JS, fixed_encoding=b"gzip")
    assert choose(rep, accept) == (gz, b"gzip", rep.etag)


def test_each_encoding_has_its_own_etag(script_rep: Representation) -> None:
    tags = {choose(script_rep, a)[2] for a in (b"br", b"gzip", b"identity")}
    assert len(tags) == 3


# ---------------------------------------------------------------------------------------------
# not_modified


def test_no_if_none_match_is_never_not_modified(script_rep: Representation) -> None:
    assert not not_modified(None, script_rep)
    assert not not_modified(b"", script_rep)


@pytest.mark.parametrize("suffix", ["", "-gz", "-br"])
def test_matching_etag_of_any_encoding_is_not_modified(
    script_rep: Representation, suffix: str
) -> None:
    assert not_modified(f'"{script_rep.etag}{suffix}"'.encode(), script_rep)


def test_weak_etag_matches(script_rep: Representation) -> None:
    assert not_modified(f'W/"{script_rep.etag}-gz"'.encode(), script_rep)


def test_etag_anywhere_in_a_list_matches(script_rep: Representation) -> None:
    header = f'"stale", W/"older" ,  "{script_rep.etag}-br"'.encode()
    assert not_modified(header, script_rep)


def test_wildcard_if_none_match_is_not_modified(script_rep: Representation) -> None:
    assert not_modified(b"*", script_rep)


def test_etag_of_another_body_is_modified(script_rep: Representation) -> None:
    other = make_representation(SCRIPT + b"//v2", JS, brotli_quality=1)
    assert not not_modified(f'"{other.etag}", W/"{other.etag}-gz"'.encode(), script_rep)
    assert not not_modified(f'"{script_rep.etag}-zz"'.encode(), script_rep)
    assert not not_modified(f'"{script_rep.etag[:-1]}"'.encode(), script_rep)


# ---------------------------------------------------------------------------------------------
# LruBytes


def test_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    lru: LruBytes[str, str] = LruBytes(max_bytes=100, max_items=10)
    lru.put("a", "A", 40)
    lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # "b" is now the least recently used
    lru.put("c", "C", 40)
    assert lru.get("b") is None
    assert lru.get("a") == "A"
    assert lru.get("c") == "C"
    assert lru.bytes == 80


def test_lru_is_bounded_by_count() -> None:
    lru: LruBytes[int, int] = LruBytes(max_bytes=10_000, max_items=3)
    for i in range(5):
        lru.put(i, i, 1)
    assert len(lru) == 3
    assert [lru.get(i) for i in range(5)] == [None, None, 2, 3, 4]


def test_replacing_a_key_updates_the_byte_count() -> None:
    lru: LruBytes[str, bytes] = LruBytes(max_bytes=100, max_items=10)
    lru.put("a", b"old", 60)
    lru.put("a", b"new", 30)
    assert lru.get("a") == b"new"
    assert (len(lru), lru.bytes) == (1, 30)


def test_value_larger_than_the_whole_cache_is_not_stored_and_drops_the_old_copy() -> None:
    lru: LruBytes[str, str] = LruBytes(max_bytes=100, max_items=10)
    lru.put("keep", "K", 50)
    lru.put("big", "old", 10)
    lru.put("big", "huge", 101)
    assert lru.get("big") is None
    assert lru.get("keep") == "K"
    assert lru.bytes == 50


def test_pop_returns_the_value_and_frees_its_bytes() -> None:
    lru: LruBytes[str, str] = LruBytes(max_bytes=100, max_items=10)
    lru.put("a", "A", 70)
    assert lru.pop("a") == "A"
    assert lru.pop("a") is None
    assert (len(lru), lru.bytes) == (0, 0)
    lru.put("b", "B", 100)
    assert lru.get("b") == "B"


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 6), st.integers(0, 60)),
        st.tuples(st.just("get"), st.integers(0, 6), st.just(0)),
        st.tuples(st.just("pop"), st.integers(0, 6), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, max_bytes=st.integers(0, 150), max_items=st.integers(1, 5))
def test_lru_behaves_like_a_model_lru(
    ops: list[tuple[str, int, int]], max_bytes: int, max_items: int
) -> None:
    lru: LruBytes[int, str] = LruBytes(max_bytes, max_items)
    model: OrderedDict[int, tuple[str, int]] = OrderedDict()
    for n, (op, key, size) in enumerate(ops):
        if op == "put":
            value = f"v{n}"
            lru.put(key, value, size)
            model.pop(key, None)
            if size <= max_bytes:
                model[key] = (value, size)
                while sum(s for _, s in model.values()) > max_bytes or len(model) > max_items:
                    model.popitem(last=False)
        elif op == "get":
            hit = model.get(key)
            assert lru.get(key) == (hit[0] if hit else None)
            if hit:
                model.move_to_end(key)
        else:
            hit = model.pop(key, None)
            assert lru.pop(key) == (hit[0] if hit else None)
        assert len(lru) == len(model) <= max_items
        assert lru.bytes == sum(s for _, s in model.values()) <= max_bytes
        assert list(lru.items) == list(model)
