"""The fault drill (issue 11, "Done when"): the promise under every fault at once.

Through the real proxy (a subprocess, the SQLite queue, its default) while clients post single
events and batches: the fake Segment API cycles, twice, through 301, 302 and 307 (with
``Location``), 413 for bodies over 2 KB (a gateway with a smaller body limit), 500, 429 with
``Retry-After``, hangs that end in a dropped connection, and resets; throughout, like Segment, it
refuses (400) every request holding a "bad" event (``properties.drill_bad``). At the start of
the second cycle the proxy is SIGKILLed and restarted on the same queue file.

When the queue has drained (``segproxy queue stats --json``), the drill counts and checks:

- lost: every acknowledged good event reached the fake, accepted (2xx), or it is lost;
- good events in the dead letters: none (a bad event never sinks the good ones it was sent with);
- every acknowledged bad event is a dead letter with Segment's status (400) and message, and
  only bad events are dead letters;
- duplicates (a messageId accepted twice) only where at-least-once allows one: an event sent by
  the killed proxy and again after the restart (in flight at the kill), an event the client had
  to post again because the kill ate the answer, or an answer the proxy could not have seen in
  time (the fake answered later than half the upstream timeout);
- nothing invented: everything at the fake or in the dead letters was posted by a client.

Phases advance by the number of upstream requests (``FakeSegment.api_cycle``), the kill by the
phase reached: the assertions never depend on timing. The only waits are polls with deadlines,
and the clients' pacing (load shape, not synchronisation).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import FakeSegment, Mode, RecordedRequest
from tests.support.load import Client, basic, free_port, track, wait_for
from tests.support.proxy import RunningProxy, run_cli, start_proxy

pytestmark = pytest.mark.e2e

KEY_A = "wkA_drill_00000001"
KEY_B = "wkB_drill_00000002"
BAD = "drill_bad"  # properties.drill_bad = true: Segment refuses the event (and its request)
UPSTREAM_TIMEOUT = 2.0
LOCATION = (("Location", "https://api.segment.invalid/v1/batch"),)  # never to be followed


def _status(code: int, times: int, **kw: Any) -> Mode:
    body = json.dumps({"success": False, "code": str(code), "message": f"drill {code}"})
    return Mode(kind="status", code=code, body=body.encode(), times=times, **kw)


# One cycle of faults, each for a few upstream requests: (label, mode).
CYCLE: list[tuple[str, Mode]] = [
    ("301", _status(301, 3, headers=LOCATION)),
    ("302", _status(302, 3, headers=LOCATION)),
    ("307", _status(307, 3, headers=LOCATION)),
    ("ok", Mode(times=4)),
    ("413 over 2 KB", _status(413, 4, min_bytes=2048)),
    ("500", _status(500, 3)),
    ("429 Retry-After 1", _status(429, 2, retry_after="1")),
    ("hang", Mode(kind="hang", hold=UPSTREAM_TIMEOUT + 0.5, times=4)),
    ("reset", Mode(kind="close", times=3)),
    ("ok", Mode(times=4)),
]
SCHEDULE: list[tuple[str, Mode]] = [("ok", Mode(times=6)), *CYCLE, *CYCLE]
KILL_AT_STEP = 1 + len(CYCLE)  # the proxy is SIGKILLed when the second cycle starts


def is_bad(event: dict[str, Any]) -> bool:
    props = event.get("properties")
    return isinstance(props, dict) and props.get(BAD) is True


# --------------------------------------------------------------------------------------------
# Clients: single events and batches, retried on 503 and on a lost answer, like real ones


@dataclass
class Posted:
    """What the clients did, under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)
    resent: set[str] = field(default_factory=set)  # posted again: the first answer was lost
    statuses: Counter[int | str] = field(default_factory=Counter)
    acked_in_step: Counter[int | None] = field(default_factory=Counter)


class Clients:
    """``threads`` clients posting until ``done()`` or ``max_events``; bounded by ``seconds``."""

    def __init__(
        self,
        port: int,
        step: Callable[[], int | None],
        done: Callable[[], bool],
        *,
        threads: int = 4,
        max_events: int = 6000,
        seconds: float = 120.0,
        pace: float = 0.08,
        seed: int = 0,
    ) -> None:
        self.port = port
        self.step = step
        self.done = done
        self.max_events = max_events
        self.pace = pace
        self.deadline = time.monotonic() + seconds
        self.posted = Posted()
        self.stopping = threading.Event()
        self._ids = itertools.count()
        self._ids_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i, seed + i), daemon=True)
            for i in range(threads)
        ]

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(timeout=UPSTREAM_TIMEOUT + 15)
        assert not any(t.is_alive() for t in self._threads), "drill clients did not stop"

    def _over(self) -> bool:
        return self.stopping.is_set() or self.done() or time.monotonic() > self.deadline

    def _take_ids(self, n: int) -> list[int] | None:
        with self._ids_lock:
            ids = [next(self._ids) for _ in range(n)]
        return ids if ids[-1] < self.max_events else None

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        client = Client("127.0.0.1", self.port, timeout=10.0)
        try:
            while not self._over():
                single = rng.random() < 0.5
                numbers = self._take_ids(1 if single else rng.randint(2, 12))
                if numbers is None:
                    return
                events = [self._event(n) for n in numbers]
                key = KEY_A if numbers[0] % 2 else KEY_B
                if single:
                    path, body = "/v1/t", json.dumps(events[0]).encode()
                else:
                    path, body = "/v1/batch", json.dumps({"batch": events}).encode()
                self._post(client, key, path, body, [e["messageId"] for e in events])
                self.stopping.wait(self.pace)  # pacing: the load's shape, not a synchronisation
        finally:
            client.close()

    def _event(self, n: int) -> dict[str, Any]:
        mid = f"drill-{n:06d}"
        props: dict[str, Any] = {"n": n}
        if n % 37 == 5:
            props[BAD] = True
            with self.posted.lock:
                self.posted.bad.add(mid)
        return track(mid, properties=props)

    def _post(self, client: Client, key: str, path: str, body: bytes, mids: list[str]) -> None:
        headers = {"Content-Type": "text/plain", "Authorization": basic(key)}
        p = self.posted
        with p.lock:
            p.attempted.update(mids)
        while time.monotonic() < self.deadline:
            try:
                resp = client.post(path, body, headers)
            except (OSError, ValueError):  # killed or restarting: maybe stored, never answered
                with p.lock:
                    p.statuses["no answer"] += 1
                    p.resent.update(mids)
                self.stopping.wait(0.05)  # pacing while the proxy is down
                continue
            with p.lock:
                p.statuses[resp.status] += 1
                if 200 <= resp.status < 300:
                    p.acked.update(mids)
                    p.acked_in_step[self.step()] += len(mids)
            if resp.status != 503:
                return
            self.stopping.wait(0.1)  # 503 + Retry-After: a real client waits and retries


# --------------------------------------------------------------------------------------------
# The proxy, restarted on the same port and queue file


@dataclass
class Proxies:
    root: Path
    started: list[RunningProxy] = field(default_factory=list)

    def start(self, config: dict[str, Any]) -> RunningProxy:
        proxy = start_proxy(config, self.root / f"proxy{len(self.started)}")
        self.started.append(proxy)
        return proxy

    def cli(self, *args: str) -> Any:
        config = str(self.root / "proxy0" / "segproxy.toml")
        out = run_cli(*args, "--json", "--config", config)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        for p in self.started:
            if p.proc.poll() is None:
                p.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Proxies]:
    ps = Proxies(tmp_path)
    try:
        yield ps
    finally:
        ps.close()
        for p in ps.started:
            tail = "\n".join(p.logs().splitlines()[-25:])
            print(f"--- segproxy pid {p.pid} (exit {p.proc.returncode}) ---\n{tail}")


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment([KEY_A, KEY_B]) as f:
        yield f


def drill_config(fake: FakeSegment, tmp_path: Path, port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "upstream": {
            "cdn": fake.cdn_url,
            "api": fake.api_url,
            "timeout": UPSTREAM_TIMEOUT,
            "connect_timeout": 1.0,
        },
        "sources": {"write_keys": [KEY_A, KEY_B]},
        "queue": {"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        "forward": {"backoff_base": 0.05, "backoff_cap": 0.5},
        "limits": {"shutdown_grace": 2.0},
    }


# --------------------------------------------------------------------------------------------
# Counting


def carried(req: RecordedRequest) -> list[str]:
    """The messageIds a request to the fake API carried."""
    body = req.json if isinstance(req.json, dict) else {}
    batch = body.get("batch")
    items: list[Any] = batch if isinstance(batch, list) else [body]
    return [e["messageId"] for e in items if isinstance(e, dict) and "messageId" in e]


def label(status: int | None) -> str:
    return "a hang or reset" if status is None else str(status)


@dataclass
class Tally:
    copies: dict[str, list[RecordedRequest]]  # accepted (2xx) requests carrying each id
    last_seen: dict[str, RecordedRequest]  # the last request, any answer, carrying each id
    dead: dict[str, dict[str, Any]]  # messageId -> its dead letter


def tally(fake: FakeSegment, dead_letters: list[dict[str, Any]]) -> Tally:
    copies: dict[str, list[RecordedRequest]] = defaultdict(list)
    last_seen: dict[str, RecordedRequest] = {}
    for req in fake.api_requests:
        for mid in carried(req):
            last_seen[mid] = req
            if req.status is not None and 200 <= req.status < 300:
                copies[mid].append(req)
    dead = {d["event"]["messageId"]: d for d in dead_letters}
    return Tally(dict(copies), last_seen, dead)


def per_step(fake: FakeSegment, posted: Posted) -> list[str]:
    lines = []
    by_step: dict[int | None, list[RecordedRequest]] = defaultdict(list)
    for req in fake.api_requests:
        by_step[req.step].append(req)
    for i, (name, _) in enumerate(SCHEDULE):
        reqs = by_step.get(i, [])
        statuses = dict(Counter(label(r.status) for r in reqs))
        events = sum(len(carried(r)) for r in reqs)
        kill = "  <- SIGKILL" if i == KILL_AT_STEP else ""
        lines.append(
            f"  step {i:2} {name:18} {len(reqs):3} requests, {events:5} events, "
            f"answers {statuses}; acknowledged meanwhile {posted.acked_in_step[i]}{kill}"
        )
    after = by_step.get(len(SCHEDULE), [])
    lines.append(
        f"  after the cycles       {len(after):3} requests, "
        f"{sum(len(carried(r)) for r in after):5} events"
    )
    return lines


def reach(fake: FakeSegment, step: int, timeout: float = 60.0) -> None:
    """Poll until the fake's cycle reaches ``step`` (upstream requests drive it)."""
    if not fake.api.state.wait_until(lambda: (fake.api.step or 0) >= step, timeout):
        raise AssertionError(
            f"the fake's cycle stopped at step {fake.api.step} of {len(SCHEDULE)} "
            f"(waiting for {step}) for {timeout} s: no upstream requests?"
        )


# --------------------------------------------------------------------------------------------
# The drill


def test_fault_drill_no_acknowledged_event_lost_and_only_bad_ones_dead(
    fake: FakeSegment, proxies: Proxies, tmp_path: Path
) -> None:
    fake.api_refuse(is_bad)  # Segment refuses a whole request for one bad event, always
    fake.api_cycle(mode for _, mode in SCHEDULE)
    port = free_port()
    config = drill_config(fake, tmp_path, port)
    proxy = proxies.start(config)
    started = time.monotonic()

    def step() -> int | None:
        return fake.api.step

    def cycled() -> bool:
        return (step() or 0) >= len(SCHEDULE)

    clients = Clients(port, step, cycled, seed=11).start()
    try:
        reach(fake, KILL_AT_STEP)
        proxy.kill()  # SIGKILL: no shutdown, whatever was in flight stays in flight
        killed_at = time.time()
        proxy = proxies.start(config)  # same port, same queue file
        reach(fake, len(SCHEDULE))
    finally:
        clients.stop()
    posted = clients.posted

    def drained() -> bool:
        return bool(proxies.cli("queue", "stats")["rows"] == 0)

    wait_for(drained, timeout=30, interval=0.5, what="the queue to drain")
    dead_letters = proxies.cli("queue", "dead", "--limit", "1000000")
    t = tally(fake, dead_letters)
    took = time.monotonic() - started

    good_acked = posted.acked - posted.bad
    bad_acked = posted.acked & posted.bad
    lost = {m for m in good_acked if m not in t.copies and m not in t.dead}
    lost_after = Counter(
        label(t.last_seen[m].status) if m in t.last_seen else "never sent" for m in lost
    )
    good_dead = {m: d for m, d in t.dead.items() if m not in posted.bad}
    good_dead_by = Counter(str(d["status"]) for d in good_dead.values())
    bad_not_dead = bad_acked - set(t.dead)
    bad_dead_wrong = {
        m: (d["status"], d["reason"][:120])
        for m, d in t.dead.items()
        if m in posted.bad and (d["status"] != 400 or m not in d["reason"])
    }
    invented = (set(t.copies) | set(t.dead)) - posted.attempted

    duplicates = {m: reqs for m, reqs in t.copies.items() if len(reqs) > 1}
    in_flight_at_kill = {
        m
        for m, reqs in duplicates.items()
        if any(r.received_at < killed_at for r in reqs)
        and any(r.received_at >= killed_at for r in reqs)
    }
    resent = set(duplicates) & posted.resent
    late = {
        m
        for m, reqs in duplicates.items()
        if any((r.answered_at or 0) - r.received_at >= UPSTREAM_TIMEOUT / 2 for r in reqs)
    }
    unexplained = set(duplicates) - in_flight_at_kill - resent - late

    print(
        f"fault drill ({took:.1f} s): clients' answers {dict(posted.statuses)}\n"
        f"  acknowledged: {len(good_acked)} good, {len(bad_acked)} bad "
        f"(attempted {len(posted.attempted)}, posted again after a lost answer "
        f"{len(posted.resent)})\n"
        f"  delivered (2xx at the fake): {len(t.copies)} distinct; lost {len(lost)} "
        f"{dict(lost_after)}\n"
        f"  duplicates: {len(duplicates)} (in flight at the kill {len(in_flight_at_kill)}, "
        f"posted again by a client {len(resent)}, answered too late {len(late)}, "
        f"unexplained {len(unexplained)})\n"
        f"  dead letters: {len(t.dead)} ({len(t.dead) - len(good_dead)} bad, "
        f"{len(good_dead)} good {dict(good_dead_by)}); acknowledged bad not dead "
        f"{len(bad_not_dead)}\n" + "\n".join(per_step(fake, posted))
    )

    # The drill proved something: every phase ran, with real traffic.
    assert cycled(), f"the fake's cycle stopped at step {step()} of {len(SCHEDULE)}"
    assert len(good_acked) >= 500, f"too little load to mean anything: {len(good_acked)}"
    assert len(bad_acked) >= 5, f"too few bad events acknowledged: {len(bad_acked)}"

    problems = []
    if lost:
        where = "; ".join(f"after {k}: {n}" for k, n in lost_after.most_common())
        problems.append(f"acknowledged events lost {where} (e.g. {sorted(lost)[:3]})")
    if good_dead:
        by = "; ".join(f"status {k}: {n}" for k, n in good_dead_by.most_common())
        problems.append(f"good events in the dead letters with a bad one: {len(good_dead)} ({by})")
    if bad_not_dead:
        problems.append(
            f"acknowledged bad events neither dead letters nor delivered: {len(bad_not_dead)} "
            f"(e.g. {sorted(bad_not_dead)[:3]})"
        )
    if bad_dead_wrong:
        problems.append(
            "bad events dead without Segment's status 400 and message naming them: "
            f"{len(bad_dead_wrong)} (e.g. {sorted(bad_dead_wrong.items())[:2]})"
        )
    if unexplained:
        problems.append(
            f"events accepted twice with no kill, resend or timeout to explain it: "
            f"{len(unexplained)} (e.g. {sorted(unexplained)[:3]})"
        )
    if invented:
        problems.append(f"events nobody posted: {sorted(invented)[:5]}")
    assert not problems, "fault drill:\n  " + "\n  ".join(problems)
    assert proxy.stop() == 0
