"""Memory mode's hand-over as a state machine (queue/handover.py; invariants 7 and 10 in
queue/__init__.py), driven alone: no SQLite, no event loop."""

from __future__ import annotations

import random

import pytest

from segproxy.queue.base import NewRow, Row, queued_row
from segproxy.queue.handover import Handover, Switch, handed_rows
from segproxy.queue.packs import PACK_BASE

P = PACK_BASE  # a pack's events have ids from here on


def row(i: int, key: str = "wk_a", body: bytes = b"{}") -> Row:
    return queued_row(i, key, "event", 1.0 + i, 0, body, None)


def opened(max_rows: int = 100, max_bytes: int = 1 << 20) -> Handover:
    h = Handover(max_rows, max_bytes)
    h.opened(0)
    return h


def ids(rows: list[Row]) -> list[int]:
    return [r.id for r in rows]


def test_a_commits_rows_get_consecutive_ids_ending_at_its_last_id_and_keep_their_fields() -> None:
    rows = [
        NewRow("wk_a", "event", 1.5, b'{"a":1}', "2026-01-01T00:00:00.000Z"),
        NewRow("wk_b", "metrics", 2.5, b'{"b":2}'),
        NewRow("wk_c", "replay", 3.5, b'{"c":3}', None),
    ]
    handed = handed_rows(rows, 42)
    assert handed == [
        Row(40, "wk_a", "event", 1.5, 0, b'{"a":1}', "2026-01-01T00:00:00.000Z"),
        Row(41, "wk_b", "metrics", 2.5, 0, b'{"b":2}', None),
        Row(42, "wk_c", "replay", 3.5, 0, b'{"c":3}', None),
    ]
    assert handed_rows([], 7) == []


def test_a_new_hand_over_is_in_database_mode_until_opened_on_an_empty_file() -> None:
    h = Handover(10, 100)
    assert (h.max_rows, h.max_bytes) == (10, 100)
    assert not h.memory
    assert (h.lines, h.rows, h.bytes, h.leased) == ({}, 0, 0, set())
    assert h.to_database_mode() is None  # not in memory mode: nothing to switch
    h.opened(3)  # rows left in the file by a previous process: read from the file
    assert not h.memory
    h.opened(0)
    assert h.memory


def test_committed_rows_are_handed_over_per_key_oldest_first_and_counted() -> None:
    h = opened()
    assert h.commit([row(1, "wk_a", b"xx"), row(2, "wk_b", b"yyy")]) is None
    assert h.commit([row(3, "wk_a", b"z")]) is None
    assert {k: ids(list(v)) for k, v in h.lines.items()} == {"wk_a": [1, 3], "wk_b": [2]}
    assert (h.rows, h.bytes) == (3, 6)
    assert h.memory


def test_a_commit_up_to_the_row_bound_is_handed_over_and_one_past_it_switches() -> None:
    h = opened(max_rows=3)
    assert h.commit([row(1), row(2)]) is None
    assert h.commit([row(3)]) is None  # exactly at the bound: still handed over
    assert h.rows == 3
    switch = h.commit([row(4)])
    assert switch == Switch([], [])  # nothing packed, nothing leased: nothing to write
    assert not h.memory
    assert (h.lines, h.rows, h.bytes) == ({}, 0, 0)


def test_a_commit_up_to_the_byte_bound_is_handed_over_and_one_byte_past_it_switches() -> None:
    h = opened(max_bytes=5)
    assert h.commit([row(1, body=b"123")]) is None
    assert h.commit([row(2, body=b"45")]) is None  # exactly 5 bytes of bodies
    assert h.bytes == 5
    assert h.commit([row(3, body=b"6")]) == Switch([], [])
    assert not h.memory


def test_a_commit_past_the_bound_is_not_handed_over_and_its_packed_events_are_to_move() -> None:
    h = opened(max_rows=2)
    h.commit([row(P + 5, "wk_b"), row(7, "wk_b")])  # a packed event and a row, in the list
    h.commit([])  # an empty commit changes nothing
    assert h.rows == 2
    switch = h.commit([row(P + 9), row(P + 8), row(11)])  # not handed over: over the bound
    assert switch == Switch([P + 5, P + 8, P + 9], [])
    assert h.lease(10, frozenset()) == []


def test_leasing_one_key_takes_its_oldest_rows_and_forgets_an_emptied_line() -> None:
    h = opened()
    h.commit([row(1, body=b"a"), row(2, body=b"bb"), row(3, body=b"ccc")])
    assert ids(h.lease(2, frozenset())) == [1, 2]
    assert (h.rows, h.bytes, h.leased) == (1, 3, {1, 2})
    assert ids(list(h.lines["wk_a"])) == [3]
    assert ids(h.lease(5, frozenset())) == [3]
    assert h.lines == {}  # no empty line left behind: nothing is ready
    assert not h.ready(frozenset())
    assert (h.rows, h.bytes, h.leased) == (0, 0, {1, 2, 3})
    assert h.lease(5, frozenset()) == []


def test_leasing_several_keys_takes_the_oldest_across_them_and_leaves_the_rest_in_order() -> None:
    h = opened()
    h.commit([row(1, "wk_b"), row(2, "wk_a"), row(3, "wk_b"), row(4, "wk_c"), row(5, "wk_a")])
    assert ids(h.lease(3, frozenset())) == [1, 2, 3]
    assert {k: ids(list(v)) for k, v in h.lines.items()} == {"wk_a": [5], "wk_c": [4]}
    assert (h.rows, h.bytes) == (2, 4)
    assert ids(h.lease(10, frozenset())) == [4, 5]
    assert h.lines == {}
    assert (h.rows, h.bytes) == (0, 0)


def test_excluded_keys_are_neither_leased_nor_ready() -> None:
    h = opened()
    h.commit([row(1, "wk_a"), row(2, "wk_b"), row(3, "wk_c"), row(4, "wk_b")])
    assert h.ready(frozenset({"wk_a"}))
    assert ids(h.lease(10, frozenset({"wk_a", "wk_c"}))) == [2, 4]  # one key left: its line
    assert ids(h.lease(10, frozenset({"wk_a"}))) == [3]
    assert not h.ready(frozenset({"wk_a"}))
    assert h.ready(frozenset())
    assert h.lease(10, frozenset({"wk_a"})) == []
    assert ids(list(h.lines["wk_a"])) == [1]
    assert (h.rows, h.bytes) == (1, 2)


def test_leaving_memory_mode_moves_the_packed_events_not_in_flight_and_marks_the_leased_rows() -> (
    None
):
    h = opened()
    h.commit([row(P + 5, "wk_b"), row(P + 6, "wk_b")])  # a pack of wk_b
    h.commit([row(8), row(1)])  # rows of events (of wk_a)
    h.commit([row(P + 2, "wk_a"), row(9, "wk_a")])
    assert ids(h.lease(3, frozenset({"wk_a"}))) == [P + 5, P + 6]  # in flight, packed
    assert ids(h.lease(1, frozenset({"wk_b"}))) == [8]  # in flight, a row
    h.settled([P + 6])
    switch = h.to_database_mode()
    # Handed over, not leased: the packed ones move (rows 1 and 9 are in the file already).
    # Leased from memory and not settled: rows are marked (P + 5 is packed: it stays packed).
    assert switch == Switch([P + 2], [8])
    assert not h.memory
    assert (h.lines, h.rows, h.bytes, h.leased) == ({}, 0, 0, set())
    assert h.to_database_mode() is None  # once only


def test_the_moving_and_leased_ids_are_sorted_whatever_the_order_they_were_held_in() -> None:
    h = opened()
    h.commit([row(P + 9, "wk_b")])
    h.commit([row(P + 3, "wk_a")])  # the lines hold P + 9 first
    h.commit([row(1, "wk_c"), row(8, "wk_c")])
    assert ids(h.lease(2, frozenset({"wk_a", "wk_b"}))) == [1, 8]
    assert list(h.leased) == [8, 1]  # a set's own order: not sorted
    assert h.to_database_mode() == Switch([P + 3, P + 9], [1, 8])


def test_packed_means_from_pack_base_on_in_the_list_the_commit_and_the_leases() -> None:
    h = opened(max_rows=3)
    h.commit([row(P - 1), row(P)])
    assert ids(h.lease(2, frozenset())) == [P - 1, P]
    h.commit([row(P - 2), row(P + 1)])
    assert h.commit([row(P - 3), row(P)]) == Switch([P, P + 1], [P - 1])
    h.caught_up()
    h.commit([row(P), row(P - 4)])
    assert h.to_database_mode() == Switch([P], [])


def test_the_hand_over_holds_nothing_but_its_own_state() -> None:
    h = opened()
    with pytest.raises(AttributeError):
        h.extra = 1  # type: ignore[attr-defined]


def test_settled_rows_are_not_marked_leased_when_memory_mode_ends() -> None:
    h = opened()
    h.commit([row(1), row(2), row(3)])
    h.lease(3, frozenset())
    h.settled([1, 3, 77])  # 77: never leased from memory, ignored
    assert h.leased == {2}
    assert h.to_database_mode() == Switch([], [2])


def test_journal_events_in_flight_are_left_where_they_are_when_memory_mode_ends() -> None:
    # Only rows of the file are marked leased at a switch; a journal event in flight stays in
    # the journal until its outcome (invariant 12), so a lease need not remember it.
    h = opened()
    h.commit([row(1), row(P + 1), row(P + 2)])
    assert ids(h.lease(2, frozenset())) == [1, P + 1]
    assert h.leased == {1}
    assert h.to_database_mode() == Switch([P + 2], [1])


def test_catching_up_goes_back_to_memory_mode_with_nothing_remembered_from_before() -> None:
    h = opened()
    h.commit([row(1), row(P + 1)])
    h.lease(1, frozenset())
    assert h.to_database_mode() == Switch([P + 1], [1])
    h.caught_up()
    assert h.memory
    assert h.commit([row(5)]) is None
    assert ids(h.lease(5, frozenset())) == [5]
    assert h.to_database_mode() == Switch([], [5])  # 1 was forgotten with the switch


def test_random_hand_overs_match_a_model() -> None:
    # After any mix of commits, leases, settlements, switches and catch-ups, a model of the
    # list agrees: each handed-over row is leased once, oldest first; a switch moves exactly
    # the packed events still in the list and marks exactly the unsettled rows leased from
    # it. (Ids grow as SQLite gives them: packs with NORMAL, rows with FULL.)
    for seed in range(20):
        rng = random.Random(seed)
        base = P if seed % 2 else 0
        h = opened(max_rows=12, max_bytes=60)
        listed: list[Row] = []  # the model: handed over, not leased
        leased: set[int] = set()
        next_id = 1
        for _ in range(300):
            op = rng.random()
            if op < 0.4 and h.memory:
                commit = [
                    row(base + next_id + i, rng.choice("ab"), b"x" * rng.randint(0, 9))
                    for i in range(rng.randint(0, 4))
                ]
                next_id += len(commit)
                kept = listed + commit
                switch = h.commit(commit)
                if len(kept) > 12 or sum(len(r.body) for r in kept) > 60:
                    want = Switch(
                        sorted(r.id for r in kept if r.id >= P), sorted(i for i in leased if i < P)
                    )
                    assert switch == want
                    listed, leased = [], set()
                else:
                    assert switch is None
                    listed = kept
            elif op < 0.7 and h.memory:
                exclude = frozenset(rng.sample("ab", rng.randint(0, 2)))
                most = rng.randint(1, 5)
                got = h.lease(most, exclude)
                assert got == [r for r in listed if r.write_key not in exclude][:most]
                listed = [r for r in listed if r not in got]
                leased |= {r.id for r in got}
            elif op < 0.85:
                done = rng.sample(sorted(leased), min(len(leased), rng.randint(0, 3)))
                h.settled(done)
                leased -= set(done)
            elif op < 0.95:
                switch = h.to_database_mode()
                if switch is not None:
                    want = Switch(
                        sorted(r.id for r in listed if r.id >= P),
                        sorted(i for i in leased if i < P),
                    )
                    assert switch == want
                listed, leased = [], set()
            else:
                h.caught_up()
            assert (h.rows, h.bytes) == (len(listed), sum(len(r.body) for r in listed))
            assert h.leased == {i for i in leased if i < P}  # journal events: not needed
            assert h.ready(frozenset()) == bool(listed)
