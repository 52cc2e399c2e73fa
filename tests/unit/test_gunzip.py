"""The one gzip reader (segproxy.gunzip): whole members only, within the caller's bounds."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.gunzip import (
    CUT_SHORT,
    INVALID,
    TOO_LARGE,
    TOO_MANY_MEMBERS,
    GzipError,
    gunzip,
)

DATA = b"analytics.track('x');" * 200


def reason(data: bytes, limit: int = 1 << 20, members: int = 16) -> str:
    with pytest.raises(GzipError) as caught:
        gunzip(data, limit, members)
    return caught.value.reason


def test_a_whole_body_decodes_to_the_original() -> None:
    assert gunzip(gzip.compress(DATA, mtime=0), 1 << 20, 16) == DATA


def test_members_decode_one_after_the_other_up_to_the_bound() -> None:
    body = gzip.compress(b"first;", mtime=0) + gzip.compress(b"second", mtime=0)
    assert gunzip(body, 1 << 20, 2) == b"first;second"
    assert reason(body, members=1) == TOO_MANY_MEMBERS
    empty = gzip.compress(b"", mtime=0)
    assert gunzip(empty * 16, 1 << 20, 16) == b""
    assert reason(empty * 17, members=16) == TOO_MANY_MEMBERS


def test_nothing_after_the_last_member_allowed_is_read() -> None:
    empty = gzip.compress(b"", mtime=0)
    assert reason(empty * 3 + b"not gzip at all", members=3) == TOO_MANY_MEMBERS


def test_the_output_never_passes_the_limit() -> None:
    assert gunzip(gzip.compress(b"0" * 1000, mtime=0), 1000, 16) == b"0" * 1000
    assert reason(gzip.compress(b"0" * 1001, mtime=0), limit=1000) == TOO_LARGE
    two = gzip.compress(b"0" * 600, mtime=0) * 2  # the limit is on all members together
    assert reason(two, limit=1000) == TOO_LARGE
    assert gunzip(two, 1200, 16) == b"0" * 1200
    bomb = gzip.compress(b"\0" * 50_000_000, mtime=0)  # 50 MB from ~50 KB
    assert reason(bomb, limit=1000) == TOO_LARGE


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_a_body_cut_short_is_an_error_not_a_shorter_body(keep: float) -> None:
    whole = gzip.compress(DATA * 50, mtime=0)
    assert reason(whole[: int(len(whole) * keep)]) == CUT_SHORT
    assert reason(whole[:-8]) == CUT_SHORT  # every data byte, no CRC-32 and length
    assert reason(b"") == CUT_SHORT


@pytest.mark.parametrize("offset", [-8, -4], ids=["crc", "length"])
def test_a_damaged_trailer_is_invalid_with_zlibs_words(offset: int) -> None:
    damaged = bytearray(gzip.compress(DATA, mtime=0))
    damaged[offset] ^= 0xFF
    with pytest.raises(GzipError) as caught:
        gunzip(bytes(damaged), 1 << 20, 16)
    assert caught.value.reason == INVALID
    assert caught.value.detail
    assert caught.value.detail in str(caught.value)


def test_foreign_bytes_are_invalid() -> None:
    assert reason(b"not gzip at all") == INVALID
    assert reason(gzip.compress(DATA, mtime=0) + b"trailing junk") == INVALID


def test_an_error_without_detail_says_its_reason() -> None:
    assert str(GzipError(TOO_LARGE)) == TOO_LARGE
    assert GzipError(TOO_LARGE).detail == ""


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=1))
def test_any_proper_prefix_is_refused_and_the_whole_is_read(data: bytes, cut: int) -> None:
    whole = gzip.compress(data, mtime=0)
    with pytest.raises(GzipError):
        gunzip(whole[: cut % len(whole)], 1 << 20, 16)
    assert gunzip(whole, len(data), 1) == data
