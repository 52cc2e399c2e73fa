"""The forwarder against a real fake Segment API, through a real UpstreamPool and real queues.

Each test runs the forwarder inside ``asyncio.run`` under a deadline and polls (never sleeps)
for what it waits for. The fake runs in background threads, so its records are read directly.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from segproxy.config import ForwardConfig, Upstream
from segproxy.forward.forwarder import Forwarder
from segproxy.queue.base import DeadRow, NewRow, Queue
from segproxy.queue.memory import MemoryQueue
from segproxy.queue.sqlite import SqliteQueue
from segproxy.upstream import UpstreamPool
from tests.support.fakes import ApiEvent, FakeSegment, RecordedRequest

KEY_A = "wk_forward_a"
KEY_B = "wk_forward_b"
SENT_AT = "2026-01-01T00:00:00.000Z"

FAST = ForwardConfig(max_delay=0.01, backoff_base=0.05, backoff_cap=0.2, max_retry_after=30.0)

QueueFactory = Callable[[], Awaitable[Queue]]
Scenario = Callable[[Queue, Forwarder], Awaitable[None]]


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment([KEY_A, KEY_B]) as f:
        yield f


def memory() -> QueueFactory:
    async def make() -> Queue:
        return MemoryQueue()

    return make


def sqlite_at(path: Path) -> QueueFactory:
    async def make() -> Queue:
        return await SqliteQueue(
            str(path), max_rows=1 << 30, max_bytes=1 << 40, min_free_disk_bytes=0
        ).open()

    return make


class FaultLog:
    """A real queue, with the fault of every ``retry_later`` written down (what ``segproxy
    queue stats`` shows). Composition, not a subclass: the queues may run compiled."""

    def __init__(self, inner: Queue) -> None:
        self.inner = inner
        self.faults: list[str] = []

    async def retry_later(self, ids: list[int], not_before: float, fault: str = "") -> None:
        self.faults.append(fault)
        await self.inner.retry_later(ids, not_before, fault)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def with_faults(factory: QueueFactory) -> QueueFactory:
    async def make() -> Queue:
        return cast(Queue, FaultLog(await factory()))

    return make


def faults(q: Queue) -> list[str]:
    assert isinstance(q, FaultLog)
    return q.faults


def dead_rows(q: Queue) -> Awaitable[list[DeadRow]]:
    async def read() -> list[DeadRow]:
        inner = q.inner if isinstance(q, FaultLog) else q
        if isinstance(inner, SqliteQueue):
            return await inner.dead_rows()
        assert isinstance(inner, MemoryQueue)
        return list(inner.dead)

    return read()


def forward(
    fake: FakeSegment,
    scenario: Scenario,
    *,
    queue: QueueFactory | None = None,
    settings: ForwardConfig = FAST,
    deadline: float = 20.0,
) -> None:
    """Run ``scenario`` with a queue, a pool on the fake API and a (not yet started) forwarder."""

    async def main() -> None:
        q = await (queue or memory())()
        pool = UpstreamPool(Upstream("http", "127.0.0.1", fake.api.port), timeout=5.0)
        fwd = Forwarder(q, pool, settings)
        try:
            async with asyncio.timeout(deadline):
                await scenario(q, fwd)
        finally:
            await fwd.stop(0.5)
            await pool.close()
            await q.close()
            await asyncio.sleep(0.01)  # let closed transports run connection_lost

    asyncio.run(main())


async def until(
    check: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10.0
) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def event(key: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "messageId": f"{key}-{n}", **extra}


def queued(
    key: str, n: int, *, received_at: float | None = None, sent_at: str | None = SENT_AT
) -> NewRow:
    """A row as ingest stores it: sentAt kept beside the body."""
    return NewRow(
        key,
        "event",
        time.time() if received_at is None else received_at,
        orjson.dumps(event(key, n)),
        sent_at,
    )


def batch_requests(fake: FakeSegment, key: str | None = None) -> list[RecordedRequest]:
    return [
        r
        for r in fake.api_requests
        if r.path == "/v1/batch" and (key is None or r.basic_auth_user == key)
    ]


def accepted(fake: FakeSegment, key: str | None = None) -> list[ApiEvent]:
    return [e for e in fake.api_events() if key is None or e.request.basic_auth_user == key]


def ids_of(events: list[ApiEvent]) -> list[str]:
    return [e.message_id or "" for e in events]


def empty(q: Queue) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await q.stats()).rows == 0

    return check


# ---------------------------------------------------------------------------------------------
# Delivery


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_events_go_as_one_batch_per_key_with_basic_auth(
    fake: FakeSegment, tmp_path: Path, backend: str
) -> None:
    factory = memory() if backend == "memory" else sqlite_at(tmp_path / "q.db")

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), queued(KEY_B, 0), queued(KEY_A, 1)])
        await q.put([queued(KEY_B, 1), queued(KEY_A, 2)])
        fwd.start()
        await until(empty(q), "the queue to drain")
        assert fwd.counters.events_sent == 5
        assert fwd.counters.failures == 0

    forward(fake, scenario, queue=factory)
    reqs = fake.api_requests
    assert [r.path for r in reqs] == ["/v1/batch", "/v1/batch"]  # one request per key
    by_key = {r.basic_auth_user: r for r in reqs}
    assert set(by_key) == {KEY_A, KEY_B}
    for key, n in ((KEY_A, 3), (KEY_B, 2)):
        req = by_key[key]
        assert req.method == "POST"
        assert req.status == 200
        assert req.headers["content-type"] == "application/json"
        assert req.headers["authorization"].startswith("Basic ")
        assert req.headers["host"] == fake.api_authority
        assert isinstance(req.json, dict)
        assert list(req.json) == ["batch"]  # no batch-level sentAt or writeKey
        sent = req.json["batch"]
        assert [e["messageId"] for e in sent] == [f"{key}-{i}" for i in range(n)]
        assert all(e["type"] == "track" and "sentAt" in e for e in sent)
    assert sorted(ids_of(fake.api_events())) == sorted(
        [f"{KEY_A}-{i}" for i in range(3)] + [f"{KEY_B}-{i}" for i in range(2)]
    )


def test_a_batch_of_hundreds_of_kilobytes_arrives_whole(fake: FakeSegment) -> None:
    # Big bodies go out as head + body in one writev, each event a view of its stored JSON.
    pad = "x" * 2000
    rows = [
        NewRow(KEY_A, "event", time.time(), orjson.dumps(event(KEY_A, i, pad=pad)), SENT_AT)
        for i in range(150)
    ]

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put(rows)
        fwd.start()
        await until(empty(q), "the queue to drain")

    forward(fake, scenario)
    (req,) = batch_requests(fake)
    assert len(req.body) > 300_000
    assert int(req.headers["content-length"]) == len(req.body)
    sent = req.json["batch"]
    assert [e["messageId"] for e in sent] == [f"{KEY_A}-{i}" for i in range(150)]
    assert all(e["pad"] == pad and e["sentAt"] >= SENT_AT for e in sent)


def test_sent_at_is_moved_forward_by_the_time_spent_queued(fake: FakeSegment) -> None:
    async def scenario(q: Queue, fwd: Forwarder) -> None:
        now = time.time()
        legacy = NewRow(
            KEY_A, "event", now - 60, orjson.dumps(event(KEY_A, 2, sentAt=SENT_AT)), None
        )
        await q.put(
            [
                queued(KEY_A, 0, received_at=now - 30),
                queued(KEY_A, 1, received_at=now - 30, sent_at="not a time"),
                legacy,
                NewRow(KEY_A, "event", now - 30, orjson.dumps(event(KEY_A, 3)), None),
            ]
        )
        fwd.start()
        await until(empty(q), "the queue to drain")

    forward(fake, scenario)
    got = {e.message_id: e.data for e in fake.api_events()}
    base = datetime(2026, 1, 1, tzinfo=UTC)

    def moved(value: str) -> float:
        return (datetime.fromisoformat(value) - base).total_seconds()

    assert 30.0 <= moved(got[f"{KEY_A}-0"]["sentAt"]) < 32.0
    assert got[f"{KEY_A}-0"]["sentAt"].endswith("Z")
    assert got[f"{KEY_A}-1"]["sentAt"] == "not a time"
    assert 60.0 <= moved(got[f"{KEY_A}-2"]["sentAt"]) < 62.0
    assert "sentAt" not in got[f"{KEY_A}-3"]


def test_metrics_rows_go_to_v1_m_as_is(fake: FakeSegment) -> None:
    body = b'{"series":[{"type":"Counter","metric":"analytics_js.invoke","value":1,"tags":{}}]}'

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([NewRow("", "metrics", time.time() - 100, body), queued(KEY_A, 0)])
        await q.put([NewRow("", "metrics", time.time(), body + b" ")])
        fwd.start()
        await until(empty(q), "the queue to drain")

    forward(fake, scenario)
    metrics = [r for r in fake.api_requests if r.path == "/v1/m"]
    assert sorted(r.body for r in metrics) == sorted([body, body + b" "])  # byte for byte
    assert all(r.status == 200 for r in metrics)
    assert all("authorization" not in r.headers for r in metrics)
    assert all(r.headers["content-type"] == "application/json" for r in metrics)
    assert len(batch_requests(fake, KEY_A)) == 1


# ---------------------------------------------------------------------------------------------
# Failures


def test_503_is_retried_and_delivered_after_recovery(fake: FakeSegment) -> None:
    fake.api_status(503, times=3)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, i) for i in range(3)])
        fwd.start()
        await until(empty(q), "delivery after the 503s")
        assert fwd.counters.events_sent == 3
        assert fwd.counters.events_retried == 9
        assert (await q.stats()).dead == 0

    forward(fake, scenario)
    reqs = batch_requests(fake, KEY_A)
    assert [r.status for r in reqs] == [503, 503, 503, 200]
    # the same events every time (Segment de-duplicates on messageId)
    for r in reqs:
        assert isinstance(r.json, dict)
        assert [e["messageId"] for e in r.json["batch"]] == [f"{KEY_A}-{i}" for i in range(3)]
    assert ids_of(fake.api_events()) == [f"{KEY_A}-{i}" for i in range(3)]


def test_network_errors_are_retried(fake: FakeSegment) -> None:
    fake.api_down()

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(lambda: fwd.counters.failures >= 2, "failed attempts while the API is down")
        assert (await q.stats()).rows == 1
        await asyncio.to_thread(fake.api_up)
        await until(empty(q), "delivery once the API is back")

    forward(fake, scenario)
    assert ids_of(fake.api_events()) == [f"{KEY_A}-0"]


def test_a_dropped_connection_is_retried(fake: FakeSegment) -> None:
    fake.api_close(times=1)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(empty(q), "delivery after a dropped connection")

    forward(fake, scenario)
    assert [r.status for r in batch_requests(fake)] == [None, 200]


def test_400_is_dead_lettered_with_status_and_body(fake: FakeSegment, tmp_path: Path) -> None:
    refusal = '{"success":false,"message":"Invalid event: properties too large"}'
    fake.api_status(400, body=refusal)  # every request, whatever it holds

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), queued(KEY_A, 1)])
        fwd.start()
        await until(lambda: fwd.counters.events_dead == 2, "the dead letters")
        s = await q.stats()
        assert (s.rows, s.dead) == (0, 2)
        dead = await dead_rows(q)
        assert [(d.write_key, d.status, d.reason) for d in dead] == [(KEY_A, 400, refusal)] * 2
        assert sorted(orjson.loads(d.body)["messageId"] for d in dead) == [
            f"{KEY_A}-0",
            f"{KEY_A}-1",
        ]
        await asyncio.sleep(0.2)  # long enough for any (wrong) retry at this backoff
        # the pair, then each event alone (each refused for itself), and nothing more
        assert len(batch_requests(fake)) == 3

    forward(fake, scenario, queue=sqlite_at(tmp_path / "q.db"))
    assert fake.api_events() == []


def poisoned(key: str, n: int) -> NewRow:
    return NewRow(
        key, "event", time.time(), orjson.dumps(event(key, n, properties={"poison": True})), SENT_AT
    )


def is_poison(e: dict[str, Any]) -> bool:
    props = e.get("properties")
    return isinstance(props, dict) and props.get("poison") is True


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_one_refused_event_is_the_only_dead_letter_and_the_others_are_delivered(
    fake: FakeSegment, tmp_path: Path, backend: str
) -> None:
    # Segment refuses a whole batch for one invalid event: the batch is split until the
    # refused event is found; it alone becomes a dead letter, with Segment's status and body.
    fake.api_refuse(is_poison)
    rows = [queued(KEY_A, i) for i in range(64)]
    rows[37] = poisoned(KEY_A, 37)
    factory = memory() if backend == "memory" else sqlite_at(tmp_path / "q.db")

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put(rows)
        fwd.start()
        await until(empty(q), "the queue to drain")
        (dead,) = await dead_rows(q)
        assert orjson.loads(dead.body)["messageId"] == f"{KEY_A}-37"
        assert dead.status == 400
        assert f"event {KEY_A}-37 is invalid" in dead.reason  # Segment's own message
        assert fwd.counters.events_dead == 1
        assert fwd.counters.events_sent == 63

    forward(fake, scenario, queue=factory)
    assert sorted(ids_of(accepted(fake))) == sorted(f"{KEY_A}-{i}" for i in range(64) if i != 37)
    # one bad event in 64 costs about 2 * log2(64) extra requests, not one per event
    assert len(batch_requests(fake)) <= 1 + 2 * 6


def test_each_of_a_few_refused_events_is_found_and_good_ones_go_exactly_once(
    fake: FakeSegment,
) -> None:
    fake.api_refuse(is_poison, 413)
    bad = {3, 4, 150}
    rows = [poisoned(KEY_A, i) if i in bad else queued(KEY_A, i) for i in range(200)]

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put(rows)
        fwd.start()
        await until(empty(q), "the queue to drain")
        dead = await dead_rows(q)
        assert sorted(orjson.loads(d.body)["messageId"] for d in dead) == sorted(
            f"{KEY_A}-{i}" for i in bad
        )
        assert {d.status for d in dead} == {413}

    forward(fake, scenario)
    assert sorted(ids_of(accepted(fake))) == sorted(
        f"{KEY_A}-{i}" for i in range(200) if i not in bad
    )


def test_a_retryable_answer_while_splitting_retries_only_that_part(fake: FakeSegment) -> None:
    # The first refusal makes the fake answer the next request (one of the halves) 503: that
    # half is retried with its fault, the split goes on, and the end is the same.
    tripped: list[bool] = []

    def refuse(e: dict[str, Any]) -> bool:
        if is_poison(e) and not tripped:
            tripped.append(True)
            fake.api_status(503, times=1)
        return is_poison(e)

    fake.api_refuse(refuse)
    rows = [queued(KEY_A, i) for i in range(16)]
    rows[5] = poisoned(KEY_A, 5)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put(rows)
        fwd.start()
        await until(empty(q), "the queue to drain")
        assert "HTTP 503" in faults(q)
        (dead,) = await dead_rows(q)
        assert (orjson.loads(dead.body)["messageId"], dead.status) == (f"{KEY_A}-5", 400)

    forward(fake, scenario, queue=with_faults(memory()))
    statuses = [r.status for r in batch_requests(fake)]
    assert statuses[0] == 400
    assert statuses.count(503) == 1  # one of the halves (sent together, in either order)
    assert sorted(ids_of(accepted(fake))) == sorted(f"{KEY_A}-{i}" for i in range(16) if i != 5)


def test_a_refused_write_key_is_not_split_into_a_request_per_event(fake: FakeSegment) -> None:
    # 401/403 are about the credentials every event of the request shares: splitting would
    # only repeat the same refusal up to 2n - 1 times.
    fake.api_status(401, body='{"success":false,"message":"Unauthorized"}')

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, i) for i in range(50)])
        fwd.start()
        await until(lambda: fwd.counters.events_dead == 50, "the dead letters")

    forward(fake, scenario)
    assert len(batch_requests(fake)) == 1


def test_a_key_being_split_does_not_hold_back_another_key(fake: FakeSegment) -> None:
    # KEY_A's whole batch is refused at once; its halves are then held by the fake (in
    # KEY_A's send slots) while KEY_B's events, queued after the split began, must still go.
    gate = threading.Event()
    refused_whole: list[bool] = []

    def refuse(e: dict[str, Any]) -> bool:
        if not is_poison(e):
            return False
        if refused_whole:
            gate.wait(15.0)
        refused_whole.append(True)
        return True

    fake.api_refuse(refuse)
    settings = ForwardConfig(
        max_delay=0.01, backoff_base=0.05, backoff_cap=0.2, concurrency=3, per_key_concurrency=2
    )

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([poisoned(KEY_A, i) for i in range(40)])
        fwd.start()
        try:
            await until(lambda: any(r.status == 400 for r in fake.api_requests), "the refusal")
            await until(lambda: len(batch_requests(fake, KEY_A)) >= 3, "two halves being sent")
            await q.put([queued(KEY_B, i) for i in range(5)])
            fwd.notify()
            await until(lambda: len(accepted(fake, KEY_B)) == 5, "the other key's events")
            assert fwd.counters.events_dead == 0  # KEY_A's split is still held
        finally:
            gate.set()
        await until(empty(q), "the queue to drain", 20.0)
        assert fwd.counters.events_dead == 40

    forward(fake, scenario, settings=settings, deadline=40.0)


# ---------------------------------------------------------------------------------------------
# Redirects


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_retried_not_counted_as_delivered(fake: FakeSegment, status: int) -> None:
    location = f"https://{fake.api_authority}/v1/batch"
    fake.api_status(status, headers={"Location": location}, times=2)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, i) for i in range(3)])
        fwd.start()
        await until(empty(q), "delivery after the redirects")
        assert faults(q) == [f"HTTP {status} redirect to {location}"] * 2
        assert (await q.stats()).dead == 0
        assert fwd.counters.events_sent == 3

    forward(fake, scenario, queue=with_faults(memory()))
    assert [r.status for r in batch_requests(fake)] == [status, status, 200]
    assert sorted(ids_of(accepted(fake))) == [f"{KEY_A}-{i}" for i in range(3)]


def test_every_retry_passes_its_fault_to_the_queue(fake: FakeSegment) -> None:
    # Each failure mode holds until its fault was seen (a retry may meet it more than once).
    fake.api_status(429, retry_after="0")
    seen: list[str] = []

    def saw(q: Queue, prefix: str) -> Callable[[], bool]:
        return lambda: any(f.startswith(prefix) for f in faults(q))

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(saw(q, "HTTP 429"), "the 429")
        fake.api_status(503)
        await until(saw(q, "HTTP 503"), "the 503")
        await asyncio.to_thread(fake.api_down)
        await until(saw(q, "network: "), "the network error")
        fake.api_ok()
        await asyncio.to_thread(fake.api_up)
        await until(empty(q), "delivery")
        seen.extend(faults(q))

    forward(fake, scenario, queue=with_faults(memory()))
    firsts = list(dict.fromkeys(f if not f.startswith("network: ") else "network" for f in seen))
    assert firsts == ["HTTP 429", "HTTP 503", "network"]
    # the kind of network error: connect (refused), protocol (dropped), or timeout
    assert {f for f in seen if f.startswith("network: ")} <= {
        "network: connect",
        "network: protocol",
        "network: timeout",
    }


# ---------------------------------------------------------------------------------------------
# Replayed dead letters


def test_a_replayed_dead_letter_is_sent_alone_and_refused_alone(fake: FakeSegment) -> None:
    fake.api_refuse(is_poison)
    replay = NewRow(
        KEY_A,
        "replay",
        time.time(),
        orjson.dumps(event(KEY_A, 99, properties={"poison": True})),
        SENT_AT,
    )

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), replay, queued(KEY_A, 1)])
        fwd.start()
        await until(empty(q), "the queue to drain")
        (dead,) = await dead_rows(q)
        assert orjson.loads(dead.body)["messageId"] == f"{KEY_A}-99"

    forward(fake, scenario)
    sent = sorted([e["messageId"] for e in r.json["batch"]] for r in batch_requests(fake, KEY_A))
    assert sent == [[f"{KEY_A}-0", f"{KEY_A}-1"], [f"{KEY_A}-99"]]  # no split was needed
    assert sorted(ids_of(accepted(fake))) == [f"{KEY_A}-0", f"{KEY_A}-1"]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_row_that_cannot_be_prepared_is_a_dead_letter_and_the_others_go(
    fake: FakeSegment, tmp_path: Path, backend: str
) -> None:
    # Not valid JSON, with a sentAt inside to move: building its batch raises. (Ingest never
    # stores one; a damaged queue file could hold one.) It must not hold back the others.
    damaged = NewRow(KEY_A, "event", time.time() - 5, b'{"sentAt":"2026-01-01T00:00:00Z",', None)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), damaged, queued(KEY_A, 1), queued(KEY_B, 2)])
        fwd.start()
        await until(lambda: len(accepted(fake)) == 3, "the three other events")
        await until(empty(q), "an empty queue")
        assert fwd.counters.events_dead == 1
        assert (await q.stats()).dead == 1
        if isinstance(q, SqliteQueue):
            (dead,) = await q.dead_rows()
        else:
            assert isinstance(q, MemoryQueue)
            (dead,) = q.dead
        assert dead.status == 0
        assert dead.reason.startswith("segproxy could not prepare the event for sending: ")
        assert dead.body == damaged.body

    queue = memory() if backend == "memory" else sqlite_at(tmp_path / "q.db")
    forward(fake, scenario, queue=queue)
    assert sorted(ids_of(accepted(fake))) == [f"{KEY_A}-0", f"{KEY_A}-1", f"{KEY_B}-2"]


@pytest.mark.parametrize("status", [401, 403, 404, 413, 422, 501])
def test_final_statuses_are_dead_lettered_at_once(fake: FakeSegment, status: int) -> None:
    fake.api_status(status)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(lambda: fwd.counters.events_dead == 1, "the dead letter")
        assert isinstance(q, MemoryQueue)
        assert [d.status for d in q.dead] == [status]

    forward(fake, scenario)
    assert len(batch_requests(fake)) == 1


def test_429_retry_after_blocks_only_that_key(fake: FakeSegment) -> None:
    fake.api_status(429, retry_after="1", times=1)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), queued(KEY_A, 1)])
        fwd.start()
        await until(lambda: any(r.status == 429 for r in fake.api_requests), "the 429")
        await until(lambda: fwd.counters.events_retried == 2, "the 429 to be handled")
        # new rows for both keys while KEY_A is told to wait
        await q.put([queued(KEY_B, 0), queued(KEY_A, 2), queued(KEY_B, 1)])
        fwd.notify()
        await until(lambda: len(accepted(fake, KEY_B)) == 2, "the other key's events")
        await until(lambda: len(accepted(fake, KEY_A)) == 3, "the blocked key's events", 5.0)
        await until(empty(q), "the queue to drain")

    forward(fake, scenario)
    (limited,) = [r for r in fake.api_requests if r.status == 429]
    assert limited.basic_auth_user == KEY_A
    free_at = limited.received_at + 1.0
    b_reqs = batch_requests(fake, KEY_B)
    assert b_reqs
    assert all(r.received_at < free_at for r in b_reqs)  # not held back by KEY_A
    later_a = [r for r in batch_requests(fake, KEY_A) if r is not limited]
    assert later_a
    assert all(r.received_at >= free_at for r in later_a)  # nothing for KEY_A before Retry-After
    assert sorted(ids_of(accepted(fake, KEY_A))) == [f"{KEY_A}-{i}" for i in range(3)]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_backlog_goes_out_back_to_back_without_max_delay_pauses(
    fake: FakeSegment, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rounds of 40 rows, one key: the next round is leased while the key's batches are in
    # flight, and max_delay (long here) is only a batching wait after a lull, never a pause
    # between the rounds of a backlog (which once capped one key at ~20k events/s).
    monkeypatch.setattr("segproxy.forward.forwarder.LEASE_ROWS", 40)
    monkeypatch.setattr("segproxy.forward.forwarder.MAX_WAITING_ROWS", 40)
    monkeypatch.setattr("segproxy.forward.forwarder.BUSY_ROUND", 20)
    settings = ForwardConfig(max_delay=5.0, backoff_base=0.05, backoff_cap=0.2)
    factory = memory() if backend == "memory" else sqlite_at(tmp_path / "q.db")

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, i) for i in range(400)])
        fwd.start()
        await until(lambda: len(accepted(fake, KEY_A)) == 400, "the backlog to arrive", 15.0)

    forward(fake, scenario, queue=factory, settings=settings, deadline=30.0)
    times = sorted(r.received_at for r in batch_requests(fake, KEY_A))
    assert len(times) >= 10  # one request per round of 40
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < settings.max_delay / 2, gaps
    assert sorted(ids_of(accepted(fake, KEY_A))) == sorted(f"{KEY_A}-{i}" for i in range(400))


def test_retry_after_is_capped_by_max_retry_after(fake: FakeSegment) -> None:
    fake.api_status(503, retry_after="3600", times=1)
    settings = ForwardConfig(max_delay=0.01, backoff_base=0.05, max_retry_after=0.3)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(empty(q), "delivery after the capped wait", 5.0)

    forward(fake, scenario, settings=settings)
    first, second = batch_requests(fake)
    assert (first.status, second.status) == (503, 200)
    assert 0.3 <= second.received_at - first.received_at < 3.0


# ---------------------------------------------------------------------------------------------
# Stop


def test_stop_when_idle_returns_promptly(fake: FakeSegment) -> None:
    async def scenario(q: Queue, fwd: Forwarder) -> None:
        fwd.start()
        await asyncio.sleep(0.05)  # the loop is now waiting (up to 5 s) for work
        started = time.monotonic()
        await fwd.stop(5.0)
        assert time.monotonic() - started < 0.5

    forward(fake, scenario)
    assert fake.api_requests == []


def test_stop_returns_promptly_and_undelivered_rows_are_sent_after_restart(
    fake: FakeSegment, tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    fake.api_hang()

    async def first_run(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), queued(KEY_A, 1)])
        fwd.start()
        await until(lambda: len(fake.api_requests) == 1, "the hanging request")
        started = time.monotonic()
        await fwd.stop(0.2)
        assert time.monotonic() - started < 1.5
        assert not fwd.tasks
        s = await q.stats()
        assert (s.rows, s.dead) == (2, 0)

    forward(fake, first_run, queue=sqlite_at(path))
    hung = fake.api_requests[0]
    fake.api_ok()  # lets the abandoned request finish server-side

    async def second_run(q: Queue, fwd: Forwarder) -> None:
        fwd.start()
        await until(empty(q), "the rows left by the first run")

    forward(fake, second_run, queue=sqlite_at(path))
    resent = [r for r in batch_requests(fake, KEY_A) if r is not hung and r.status == 200]
    assert resent
    assert [e["messageId"] for r in resent for e in r.json["batch"]] == [
        f"{KEY_A}-0",
        f"{KEY_A}-1",
    ]


def test_stop_leaves_undelivered_rows_in_a_memory_queue(fake: FakeSegment) -> None:
    fake.api_hang()

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0)])
        fwd.start()
        await until(lambda: len(fake.api_requests) == 1, "the hanging request")
        await fwd.stop(0.1)
        assert (await q.stats()).rows == 1

    forward(fake, scenario)


def test_stop_while_waiting_for_a_send_slot_leaks_no_coroutine(fake: FakeSegment) -> None:
    fake.api_hang()
    settings = ForwardConfig(max_delay=0.01, concurrency=1)

    async def scenario(q: Queue, fwd: Forwarder) -> None:
        await q.put([queued(KEY_A, 0), queued(KEY_B, 0)])  # two batches, one slot
        fwd.start()
        await until(lambda: len(fake.api_requests) == 1, "the first (hanging) request")
        await asyncio.sleep(0.05)  # the loop now waits in _spawn for the slot
        await fwd.stop(0.1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward(fake, scenario, settings=settings)
        gc.collect()
    leaked = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert leaked == []
