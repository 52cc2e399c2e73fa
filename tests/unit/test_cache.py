"""CDN cache helpers: content negotiation, ETags, the byte-bounded LRU, whole gzip bodies and the
bounds on settings renderings."""

from __future__ import annotations

import gzip
from collections import OrderedDict

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.cdn.cache import (
    MAX_GZIP_MEMBERS,
    MIN_COMPRESS,
    RENDER_COMPRESSIONS,
    RENDER_ORIGINS,
    BrokenBody,
    Entry,
    LruBytes,
    OriginBook,
    Representation,
    accepted_encodings,
    choose,
    gunzip_whole,
    make_representation,
    not_modified,
    render_etag,
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


# ---------------------------------------------------------------------------------------------
# gunzip_whole: only whole gzip bodies become entries

LIMIT = 16 * 1024 * 1024


def test_a_whole_gzip_body_decodes_to_the_original() -> None:
    assert gunzip_whole(gzip.compress(SCRIPT, mtime=0), LIMIT) == SCRIPT


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_a_gzip_body_cut_short_is_broken_not_a_shorter_body(keep: float) -> None:
    whole = gzip.compress(SCRIPT * 50, mtime=0)
    with pytest.raises(BrokenBody, match="cut short"):
        gunzip_whole(whole[: int(len(whole) * keep)], LIMIT)


def test_a_gzip_body_without_its_trailer_is_broken() -> None:
    whole = gzip.compress(SCRIPT, mtime=0)
    with pytest.raises(BrokenBody):
        gunzip_whole(whole[:-8], LIMIT)  # every data byte, no CRC-32 and length


@pytest.mark.parametrize("offset", [-8, -4], ids=["crc", "length"])
def test_a_gzip_body_failing_its_crc_or_length_is_broken(offset: int) -> None:
    damaged = bytearray(gzip.compress(SCRIPT, mtime=0))
    damaged[offset] ^= 0xFF
    with pytest.raises(BrokenBody, match="invalid gzip data"):
        gunzip_whole(bytes(damaged), LIMIT)


@pytest.mark.parametrize("body", [b"", b"not gzip at all", b"\x1f\x8b"])
def test_an_empty_or_foreign_body_is_broken(body: bytes) -> None:
    with pytest.raises(BrokenBody):
        gunzip_whole(body, LIMIT)


def test_several_whole_members_decode_one_after_the_other() -> None:
    body = gzip.compress(b"first;", mtime=0) + gzip.compress(b"second", mtime=0)
    assert gunzip_whole(body, LIMIT) == b"first;second"


def test_bytes_after_a_member_must_be_a_whole_member() -> None:
    whole = gzip.compress(SCRIPT, mtime=0)
    with pytest.raises(BrokenBody):
        gunzip_whole(whole + b"trailing junk", LIMIT)
    with pytest.raises(BrokenBody, match="cut short"):
        gunzip_whole(whole + whole[:40], LIMIT)


def test_many_empty_members_are_refused_after_a_few() -> None:
    with pytest.raises(BrokenBody, match="members"):
        gunzip_whole(gzip.compress(b"", mtime=0) * (MAX_GZIP_MEMBERS + 1), LIMIT)
    assert gunzip_whole(gzip.compress(b"", mtime=0) * MAX_GZIP_MEMBERS, LIMIT) == b""


def test_a_body_decoding_past_the_limit_is_broken() -> None:
    body = gzip.compress(b"0" * 1001, mtime=0)
    with pytest.raises(BrokenBody, match="more than 1000 bytes"):
        gunzip_whole(body, 1000)
    assert gunzip_whole(gzip.compress(b"0" * 1000, mtime=0), 1000) == b"0" * 1000


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=1))
def test_any_proper_prefix_of_a_gzip_body_is_broken(data: bytes, cut: int) -> None:
    whole = gzip.compress(data, mtime=0)
    prefix = whole[: cut % len(whole)]
    with pytest.raises(BrokenBody):
        gunzip_whole(prefix, LIMIT)
    assert gunzip_whole(whole, LIMIT) == data


# ---------------------------------------------------------------------------------------------
# OriginBook: what one settings entry may cost in renderings


def test_an_entry_keeps_and_compresses_a_bounded_number_of_origins() -> None:
    book = OriginBook(max_origins=3, max_compressed=4)
    dropped = [book.touch(f"https://h{i}.example") for i in range(5)]
    assert dropped == [None, None, None, "https://h0.example", "https://h1.example"]
    assert list(book.origins) == [f"https://h{i}.example" for i in (2, 3, 4)]
    for _ in range(4):
        assert book.may_compress()
        book.charge_compression()
    assert not book.may_compress()  # past the budget: served uncompressed until the next fill


def test_a_recently_used_origin_is_kept_over_older_ones() -> None:
    book = OriginBook(max_origins=2, max_compressed=2)
    book.touch("https://shop.example")
    book.touch("https://h1.example")
    assert book.touch("https://shop.example") is None  # used again: now the most recent
    assert book.touch("https://h2.example") == "https://h1.example"


def test_a_fresh_entry_starts_with_an_empty_book_of_the_default_bounds() -> None:
    rep = make_representation(b"{}", b"application/json")
    entry = Entry(b"{}", rep, 0.0, 60.0, 1)
    assert list(entry.book.origins) == []
    assert (entry.book.max_origins, entry.book.max_compressed) == (
        RENDER_ORIGINS,
        RENDER_COMPRESSIONS,
    )
    assert Entry(b"{}", rep, 0.0, 60.0, 2).book is not entry.book


def test_a_rendering_etag_depends_on_the_base_and_every_part() -> None:
    base = render_etag("abc", "shop.example/v1", "https")
    assert base == render_etag("abc", "shop.example/v1", "https")
    assert base != render_etag("abd", "shop.example/v1", "https")
    assert base != render_etag("abc", "shop.example/v1", "http")
    assert base != render_etag("abc", "shop.example/v2", "https")
    assert make_representation(b"x" * 300, JS, etag=base).etag == base
