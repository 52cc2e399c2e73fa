from __future__ import annotations

import pytest

from segproxy.memo import Memo


def test_a_memo_returns_what_it_was_given_and_nothing_it_was_not() -> None:
    memo: Memo[str, int] = Memo(4)
    assert memo.get("a") is None
    assert memo.put("a", 1) == 1
    assert memo.get("a") == 1
    assert memo.get("b") is None


def test_a_full_memo_starts_over_so_a_flood_of_keys_never_grows_it() -> None:
    memo: Memo[int, int] = Memo(3)
    for i in range(1000):
        memo.put(i, i * i)
        assert len(memo) <= 3
    assert memo.get(999) == 999 * 999
    assert memo.get(0) is None


def test_a_memo_must_hold_something() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Memo[int, int](0)
