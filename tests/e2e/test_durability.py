"""The durable queue's promise, drilled against the real proxy process and a fake Segment.

An event answered 200 is committed to SQLite; it then reaches Segment even if the proxy is
SIGKILLed, or Segment is down, hanging or rate-limiting. Each drill is bounded in time and in
events; every wait is a poll with a deadline (the few ``time.sleep`` calls are where elapsed time
is itself the condition under test, and say so).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from segproxy.queue.journal_format import HEADER_SIZE, decode_header
from segproxy.redact import mask
from tests.support.fakes import FakeSegment, Mode, RecordedRequest, Response
from tests.support.load import (
    Client,
    Load,
    basic,
    free_port,
    iso_now,
    parse_iso,
    track,
    wait_for,
)
from tests.support.proxy import RunningProxy, run_cli, start_proxy
from tests.support.rawhttp import exchange

pytestmark = pytest.mark.e2e

KEY_A = "wkA_durable_0001"
KEY_B = "wkB_durable_0002"


# --------------------------------------------------------------------------------------------
# A fake Segment that can be slow, and answer per write key


class ScriptedSegment(FakeSegment):
    """FakeSegment plus: a fixed upstream latency, and per-write-key behaviour.

    ``per_key[key]`` answers every request authenticated as ``key`` with that response;
    ``hang_keys`` hang those requests until ``release`` is set (or the fake stops).
    The global failure modes (``api_status`` ...) still apply first, as in FakeSegment.
    """

    def __init__(self, write_keys: list[str]) -> None:
        super().__init__(write_keys)
        self.latency = 0.0
        self.per_key: dict[str, Response] = {}
        self.hang_keys: set[str] = set()
        self.release = threading.Event()
        self.in_flight = 0  # batch requests being answered right now (under latency)
        self._in_flight_lock = threading.Lock()

    def _api_handler(self, req: RecordedRequest) -> Response:
        key = req.basic_auth_user
        if key in self.hang_keys:
            while not self.release.wait(0.1):
                if self.api.state.stopping:
                    break
            return Response(503, b'{"success":false}', [("Content-Type", "application/json")])
        if key in self.per_key:
            return self.per_key[key]
        if self.latency:
            # Simulated upstream latency (the elapsed time is the point): it keeps batches in
            # flight, so a SIGKILL lands between "sent" and "acked" often.
            with self._in_flight_lock:
                self.in_flight += 1
            try:
                time.sleep(self.latency)
            finally:
                with self._in_flight_lock:
                    self.in_flight -= 1
        return super()._api_handler(req)


@pytest.fixture
def scripted() -> Iterator[ScriptedSegment]:
    fake = ScriptedSegment([KEY_A, KEY_B])
    with fake:
        try:
            yield fake
        finally:
            fake.release.set()


# --------------------------------------------------------------------------------------------
# Proxies, each stopped by its own pid at the end


class Launcher:
    """Starts proxies (fresh workdir each, shared queue file via the config) and stops them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[RunningProxy] = []

    def start(self, config: dict[str, Any]) -> RunningProxy:
        proxy = start_proxy(config, self.root / f"proxy{len(self.started)}")
        self.started.append(proxy)
        return proxy

    def logs(self, tail: int = 40) -> str:
        out = []
        for p in self.started:
            lines = p.logs().splitlines()[-tail:]
            out.append(f"--- segproxy pid {p.pid} (exit {p.proc.returncode}) ---")
            out.extend(lines)
        return "\n".join(out)

    def close(self) -> None:
        for p in self.started:
            if p.proc.poll() is None:
                p.stop()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.close()
        print(launch.logs())


def durable_config(
    fake: FakeSegment,
    tmp_path: Path,
    *,
    port: int = 0,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "upstream": {"cdn": fake.cdn_url, "api": fake.api_url, "timeout": 5.0},
        "sources": {"write_keys": [KEY_A, KEY_B]},
        "queue": {"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        "forward": {"backoff_base": 0.1, "backoff_cap": 1.0},
    }
    for name, table in sections.items():
        config[name] = {**config.get(name, {}), **table}
    return config


def delivered(fake: FakeSegment) -> Counter[str]:
    """messageId -> how many times Segment accepted it (2xx answers only)."""
    return Counter(e.message_id for e in fake.api_events() if e.message_id is not None)


def wait_delivered(fake: FakeSegment, ids: set[str], timeout: float) -> float:
    """Poll until every id in ``ids`` was accepted upstream; returns the seconds it took."""
    t0 = time.monotonic()

    def done() -> bool:
        return ids <= set(delivered(fake))

    if not fake.api.state.wait_until(done, timeout):
        missing = ids - set(delivered(fake))
        raise AssertionError(
            f"{len(missing)} of {len(ids)} acknowledged events never reached Segment within "
            f"{timeout}s, e.g. {sorted(missing)[:5]}"
        )
    return time.monotonic() - t0


def post_one(client: Client, mid: str, key: str = KEY_A, **extra: Any) -> int:
    return client.post_json("/v1/t", track(mid, **extra), key).status


def segproxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


# --------------------------------------------------------------------------------------------
# 1. Crash drill


def journal_generations(queue_path: Path) -> tuple[int, int]:
    """The journal's segment files, and the highest generation in their headers: each new
    file and each reuse of a file takes the next generation (queue/journal.py, J7)."""
    files = sorted(Path(str(queue_path) + ".journal").glob("seg-*"))
    headers = [decode_header(f.read_bytes()[:HEADER_SIZE]) for f in files]
    return len(files), max((h.generation for h in headers if h is not None), default=0)


@pytest.mark.parametrize("moment", ["steady", "segment reuse", "spill"])
def test_crash_drill_sigkill_under_load_loses_nothing(
    scripted: ScriptedSegment, launcher: Launcher, tmp_path: Path, moment: str
) -> None:
    # "segment reuse": 1 MiB journal segments, freed and written again many times a second,
    # so the kills land while segments are reused. "spill": one batch in three is refused
    # with a 500, so events leave the journal for the file (retries, and the move when
    # memory mode ends) all along, and the kills land while they do.
    seed = int(os.environ.get("DURABILITY_DRILL_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    print(f"crash drill ({moment}) seed {seed} (DURABILITY_DRILL_SEED to repeat)")
    scripted.latency = 0.05
    port = free_port()
    queue_path = tmp_path / "data" / "queue.db"
    extra: dict[str, Any] = {}
    if moment == "segment reuse":
        extra["queue"] = {"journal_segment_bytes": 1 << 20}
    config = durable_config(scripted, tmp_path, port=port, **extra)
    if moment == "spill":
        scripted.api.set_cycle([Mode("status", 500, times=1), Mode(times=2)] * 2000)
    proxy = launcher.start(config)

    load = Load(
        "127.0.0.1", port, write_keys=[KEY_A, KEY_B], threads=4, total=12_000, max_seconds=9.0
    ).start()
    kills = 4
    restart_seconds: list[float] = []
    try:
        for n in range(kills):
            # A random moment: after a random number of further acknowledged events.
            target = load.acked_count() + rng.randint(150, 1200)
            assert load.wait_acked(target, timeout=8.0), (
                f"the load stalled before kill {len(restart_seconds) + 1}: {load.summary()}"
            )
            if n == 0:
                # The first kill always lands while a batch is in flight (leased, not acked),
                # so the lease-recovery path is exercised on every run, not by luck.
                wait_for(
                    lambda: scripted.in_flight > 0,
                    timeout=8.0,
                    interval=0.002,
                    what="a batch in flight at the fake API",
                )
            proxy.kill()
            t0 = time.monotonic()
            proxy = launcher.start(config)  # same port, same queue file
            restart_seconds.append(time.monotonic() - t0)
    finally:
        load.join(timeout=30)
    print(f"load: {load.summary()}; restarts took {[round(s, 2) for s in restart_seconds]} s")

    acked = set(load.acked)
    drain = wait_delivered(scripted, acked, timeout=30)
    counts = delivered(scripted)
    lost = acked - set(counts)
    duplicates = {mid: n for mid, n in counts.items() if n > 1}
    unsent = set(counts) - load.attempted
    unacked_but_delivered = set(counts) - acked
    resumed = [
        line
        for p in launcher.started
        for line in p.logs().splitlines()
        if "left by a previous process" in line
    ]
    print(
        f"crash drill: {kills} SIGKILLs, acked {len(acked)}, delivered {len(counts)} distinct, "
        f"lost {len(lost)}, duplicates {len(duplicates)} "
        f"(e.g. {sorted(duplicates.items())[:5]}), delivered without a 200 "
        f"{len(unacked_but_delivered)}, drain after load {drain:.2f} s"
    )
    print("\n".join(resumed))
    assert load.statuses["error"] > 0, "the kills never hit a client: the drill proved nothing"
    assert len(acked) >= 1000
    files, generation = journal_generations(queue_path)
    print(f"journal: {files} segment files, highest generation {generation}")
    if moment == "segment reuse":
        assert generation > files, "no journal segment was reused: the drill proved nothing"
    if moment == "spill":
        refused = sum(1 for r in scripted.api.requests if r.status == 500)
        assert refused > 20, "too few refused batches: nothing left the journal for the file"
    # Leases live in memory (queue/sqlite.py, invariant 7): a restart finds the rows that were
    # in flight at the kill in the file and sends them again.
    assert resumed, "no restart found events left by the killed process: recovery went untested"
    assert not lost
    assert not unsent, f"events nobody sent reached Segment: {sorted(unsent)[:5]}"
    for ev in scripted.api_events():
        assert ev.data["properties"] == {"n": ev.message_id}
        assert ev.request.path == "/v1/batch"
    assert proxy.stop() == 0


# --------------------------------------------------------------------------------------------
# 2. Outage drill: 503, then hanging, then 429 + Retry-After, then recovery


def test_outage_drill_503_hang_429_then_recovery(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    timeout = 1.0
    proxy = launcher.start(
        durable_config(fake, tmp_path, upstream={"timeout": timeout, "connect_timeout": 1.0})
    )
    client = Client(proxy.host, proxy.port)
    posted: list[str] = []
    statuses: Counter[int] = Counter()

    def post_until(what: str, cond: Callable[[], bool], limit: float) -> None:
        """Post one event per poll round until ``cond()``: clients keep posting throughout."""
        deadline = time.monotonic() + limit
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {limit}s: {fake.api_requests[-5:]}")
            mid = f"out-{len(posted):05d}"
            status = post_one(client, mid)
            statuses[status] += 1
            posted.append(mid)
            fake.api.state.wait_until(cond, 0.05)

    def since(start: int) -> list[RecordedRequest]:
        return fake.api_requests[start:]

    fake.api_status(503)
    start = len(fake.api_requests)
    post_until("3 answers 503", lambda: sum(r.status == 503 for r in since(start)) >= 3, 15)

    fake.api_hang()
    start = len(fake.api_requests)
    # with 2 sends per key in flight at most, a third hung request means one timed out
    post_until("3 hung requests", lambda: sum(r.status is None for r in since(start)) >= 3, 15)

    fake.api_status(429, retry_after=2)
    switched_to_429 = time.time()
    start = len(fake.api_requests)
    post_until(
        "2 answers 429 on fresh requests",
        lambda: (
            sum(r.status == 429 and r.received_at >= switched_to_429 for r in since(start)) >= 2
        ),
        15,
    )

    fake.api_ok()
    recovered = time.monotonic()
    for i in range(5):
        mid = f"out-after-{i}"
        statuses[post_one(client, mid)] += 1
        posted.append(mid)
    client.close()
    assert statuses == Counter({200: len(posted)}), "clients must get 200 through the outage"

    drain = wait_delivered(fake, set(posted), timeout=30)
    counts = delivered(fake)
    reqs = fake.api_requests
    print(
        f"outage drill: {len(posted)} events posted, {len(reqs)} upstream requests "
        f"{dict(Counter(r.status for r in reqs))}, all delivered {drain:.2f} s after recovery "
        f"({time.monotonic() - recovered:.2f} s)"
    )
    assert set(counts) == set(posted)
    assert max(counts.values()) == 1, {m: n for m, n in counts.items() if n > 1}

    # Retry-After: 2 was respected. A 429 reached the proxy when it was answered within the
    # proxy's timeout; hung requests released into 429 mode after that went to a closed socket.
    # A hung request is answered at the moment the mode switched, others at once.
    seen_429 = []
    for r in reqs:
        if r.status != 429:
            continue
        answered = max(r.received_at, switched_to_429)
        if answered - r.received_at < timeout * 0.9:
            seen_429.append(answered)
    assert len(seen_429) >= 2
    slack = 0.1  # a send already on its way when the 429 was answered is not a violation
    violations = [
        (round(a, 3), round(r.received_at - a, 3))
        for a in seen_429
        for r in reqs
        if a + slack < r.received_at < a + 2.0
    ]
    assert not violations, f"requests within 2 s after a 429 (answered at, delay): {violations}"


# --------------------------------------------------------------------------------------------
# 3. Timestamps: sentAt moves forward by the time held, timestamp does not move


def test_held_event_gets_sent_at_moved_forward_and_timestamp_untouched(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    proxy = launcher.start(durable_config(fake, tmp_path, forward={"backoff_cap": 0.5}))
    fake.api_status(503)
    client = Client(proxy.host, proxy.port)
    now = iso_now()
    posted_at = time.time()
    assert post_one(client, "held-1", sentAt=now, timestamp=now) == 200
    client.close()
    held = 3.0
    # The elapsed time is the condition under test: the event is held ~3 s by the outage.
    time.sleep(held)
    fake.api_ok()
    (ev,) = [e for e in fake.wait_for_events(1, timeout=10) if e.message_id == "held-1"]

    assert ev.data["timestamp"] == now
    shift = parse_iso(ev.data["sentAt"]) - parse_iso(now)
    waited = ev.request.received_at - posted_at
    print(f"held {waited:.2f} s, sentAt moved {shift:.3f} s")
    assert abs(shift - held) <= 1.5
    assert abs(shift - waited) <= 0.3
    # Every attempt (the refused ones too) carried sentAt moved by its own wait, not accumulated.
    attempts = [r for r in fake.api_requests if r.json and r.json.get("batch")]
    assert len(attempts) >= 2
    for r in attempts:
        (sent,) = r.json["batch"]
        assert sent["timestamp"] == now
        assert abs(parse_iso(sent["sentAt"]) - parse_iso(now) - (r.received_at - posted_at)) < 0.3


def test_an_odd_sent_at_is_refused_at_accept_and_never_holds_back_other_events(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    # analytics.js's shape, but with digits str.isdigit() takes and int() refuses: once made
    # the forwarder's round fail, stranding every event leased with it. Now ingest refuses it
    # (400 bad_sent_at), so such an event is never stored, and the others go through.
    odd = "2026-01-01T00:00:00.\u00b2\u00b2\u00b2Z"
    proxy = launcher.start(durable_config(fake, tmp_path))
    client = Client(proxy.host, proxy.port)
    normal = iso_now()
    assert post_one(client, "odd-1", sentAt=odd) == 400
    assert post_one(client, "normal-1", sentAt=normal) == 200
    client.close()
    got = {e.message_id: e.data for e in fake.wait_for_events(1, timeout=10)}
    assert list(got) == ["normal-1"]
    assert parse_iso(got["normal-1"]["sentAt"]) >= parse_iso(normal)


# --------------------------------------------------------------------------------------------
# 4. Backpressure: a full queue answers 503 + Retry-After, never drops


def test_full_queue_answers_503_with_retry_after_and_recovers(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    fake.api_hang()
    proxy = launcher.start(
        durable_config(fake, tmp_path, queue={"max_rows": 5}, upstream={"timeout": 1.0})
    )
    client = Client(proxy.host, proxy.port)
    acked: set[str] = set()
    for i in range(3):
        assert post_one(client, f"bp-{i}") == 200
        acked.add(f"bp-{i}")
    headers = {"Content-Type": "text/plain", "Authorization": basic(KEY_A)}

    def batch(*ids: str) -> bytes:
        return json.dumps({"batch": [track(m) for m in ids]}).encode()

    # all or none: 3 more would pass the cap, 2 fit
    over = client.post("/v1/batch", batch("bp-x1", "bp-x2", "bp-x3"), headers)
    assert over.status == 503
    assert client.post("/v1/batch", batch("bp-3", "bp-4"), headers).status == 200
    acked |= {"bp-3", "bp-4"}

    full = client.post(
        "/v1/t",
        json.dumps(track("bp-refused")).encode(),
        {**headers, "Origin": "https://shop.example"},
    )
    assert full.status == 503
    assert full.json()["code"] == "queue_full"
    assert full.json()["message"]
    assert full.header("retry-after") == "5"
    expose = [
        h.strip().lower() for h in (full.header("access-control-expose-headers") or "").split(",")
    ]
    assert "retry-after" in expose
    assert full.header("access-control-allow-origin") == "https://shop.example"
    assert client.post("/v1/t", json.dumps(track("x")).encode(), headers).status == 503
    assert exchange(proxy.host, proxy.port, "GET", "/readyz").status == 503

    fake.api_ok()
    t0 = time.monotonic()
    attempt = 0

    def accepted_again() -> bool:
        nonlocal attempt
        attempt += 1
        mid = f"bp-again-{attempt}"
        if post_one(client, mid) == 200:
            acked.add(mid)
            return True
        return False

    wait_for(accepted_again, timeout=15, what="the proxy to accept events again")
    reopened = time.monotonic() - t0
    wait_for(
        lambda: exchange(proxy.host, proxy.port, "GET", "/readyz").status == 200,
        timeout=15,
        what="/readyz 200",
    )
    client.close()
    drain = wait_delivered(fake, acked, timeout=15)
    print(f"backpressure: accepting again {reopened:.2f} s after recovery; drained {drain:.2f} s")
    assert "bp-refused" not in delivered(fake)
    assert not {"bp-x1", "bp-x2", "bp-x3"} & set(delivered(fake))


# --------------------------------------------------------------------------------------------
# 5. Batching


def test_single_events_under_load_are_batched(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    proxy = launcher.start(durable_config(fake, tmp_path))
    n = 2000
    load = Load(
        proxy.host, proxy.port, write_keys=[KEY_A, KEY_B], threads=4, total=n, max_seconds=30
    ).start()
    load.join()
    assert load.statuses == Counter({200: n}), load.summary()
    posting = load.finished - load.started
    drain = wait_delivered(fake, load.acked, timeout=20)
    counts = delivered(fake)
    reqs = fake.api_requests
    per_1000 = len(reqs) * 1000 / n
    sizes = [len(r.json["batch"]) for r in reqs if isinstance(r.json, dict) and "batch" in r.json]
    print(
        f"batching: {n} events posted in {posting:.2f} s ({n / posting:.0f}/s), "
        f"{len(reqs)} upstream requests ({per_1000:.1f} per 1,000 events), batch sizes {sizes}, "
        f"drained {drain:.2f} s after the last post"
    )
    assert per_1000 <= 20
    assert all(r.path == "/v1/batch" and r.status == 200 for r in reqs)
    key_of = {m: k for k, ids in load.acked_by_key.items() for m in ids}
    for r in reqs:
        keys = {key_of[e["messageId"]] for e in r.json["batch"]}
        assert keys == {r.basic_auth_user}, "a batch must carry one write key, its own"
    assert set(counts) == load.acked
    assert max(counts.values()) == 1


# --------------------------------------------------------------------------------------------
# 6. One slow key cannot stall the others


def _prompt_delivery(
    fake: FakeSegment, client: Client, key: str, prefix: str, waves: int, limit: float
) -> list[float]:
    """Post ``waves`` events for ``key`` one after another; each must arrive within ``limit``."""
    latencies = []
    for i in range(waves):
        mid = f"{prefix}-{i}"
        t0 = time.monotonic()
        assert post_one(client, mid, key) == 200
        wait_delivered(fake, {mid}, timeout=limit)
        latencies.append(round(time.monotonic() - t0, 3))
    return latencies


def test_a_rate_limited_key_does_not_hold_back_another(
    scripted: ScriptedSegment, launcher: Launcher, tmp_path: Path
) -> None:
    scripted.per_key[KEY_A] = Response(
        429, b'{"success":false,"message":"rate limited"}', [("Retry-After", "30")]
    )
    config = durable_config(scripted, tmp_path)
    proxy = launcher.start(config)
    client = Client(proxy.host, proxy.port)
    assert post_one(client, "slow-a-0", KEY_A) == 200
    first = scripted.wait_for_request("api", lambda r: r.status == 429, timeout=5)
    for i in range(1, 6):
        assert post_one(client, f"slow-a-{i}", KEY_A) == 200
    latencies = _prompt_delivery(scripted, client, KEY_B, "fast-b", waves=5, limit=2.0)
    client.close()
    print(f"key B delivered in {latencies} s while key A waits out Retry-After: 30")
    a_requests = [r for r in scripted.api_requests if r.basic_auth_user == KEY_A]
    late = [r for r in a_requests if r.received_at > first.received_at + 0.1]
    assert not late, "key A was sent to again before its Retry-After"
    stats = segproxy_cli(
        "queue", "stats", "--json", "--config", str(launcher.root / "proxy0" / "segproxy.toml")
    )
    assert stats.returncode == 0, stats.stderr
    per_key = json.loads(stats.stdout)["per_key"]
    assert per_key[mask(KEY_A)]["rows"] == 6


def test_rows_go_out_when_retry_after_ends_not_seconds_later(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path
) -> None:
    """Retry-After is a floor, not an excuse: when it ends, the key's rows go out at once.

    (Regression: with every ready row on a paused key, the forwarder once slept its idle 5 s.)
    """
    proxy = launcher.start(durable_config(fake, tmp_path))
    fake.api_status(429, retry_after=2, times=1)  # one 429, then Segment takes them
    client = Client(proxy.host, proxy.port)
    assert post_one(client, "ra-1") == 200
    client.close()
    wait_delivered(fake, {"ra-1"}, timeout=15)
    limited, accepted = fake.api_requests
    assert limited.status == 429
    gap = accepted.received_at - limited.received_at
    print(f"Retry-After: 2 -> sent again {gap:.2f} s after the 429")
    assert 2.0 <= gap <= 3.0


def test_a_hanging_key_with_a_backlog_does_not_take_every_slot(
    scripted: ScriptedSegment, launcher: Launcher, tmp_path: Path
) -> None:
    # Fill the queue with a backlog for key A while Segment cannot be reached at all.
    unreachable = f"http://127.0.0.1:{free_port()}"
    forward = {"backoff_base": 0.05, "backoff_cap": 0.2}
    filler = launcher.start(
        durable_config(scripted, tmp_path, upstream={"api": unreachable}, forward=forward)
    )
    client = Client(filler.host, filler.port)
    headers = {"Content-Type": "application/json", "Authorization": basic(KEY_A)}
    pad = "x" * 4000  # ~4 KB events: a 500 KB batch holds ~120 of them
    backlog = 1200
    for start in range(0, backlog, 50):
        batch = [track(f"hang-a-{i}", properties={"pad": pad}) for i in range(start, start + 50)]
        resp = client.post("/v1/batch", json.dumps({"batch": batch}).encode(), headers)
        assert resp.status == 200
    client.close()
    assert filler.stop() == 0

    # Now Segment hangs for key A only (its requests time out after 8 s); B is healthy.
    scripted.hang_keys.add(KEY_A)
    per_key_concurrency = 2
    upstream_timeout = 8.0
    proxy = launcher.start(
        durable_config(
            scripted,
            tmp_path,
            upstream={"timeout": upstream_timeout},
            forward={**forward, "per_key_concurrency": per_key_concurrency},
            limits={"shutdown_grace": 1.0},
        )
    )

    def hung_a() -> int:
        """Key A's sends hanging right now that the proxy still waits for (not timed out)."""
        live = time.time() - upstream_timeout + 0.3
        return sum(
            r.status is None and r.basic_auth_user == KEY_A and r.received_at > live
            for r in scripted.api_requests
        )

    wait_for(lambda: hung_a() >= 1, timeout=5, what="key A's first hung send")
    client = Client(proxy.host, proxy.port)
    t0 = time.monotonic()
    assert post_one(client, "fast-b-0", KEY_B) == 200
    client.close()
    most_hung = hung_a()

    def b_arrived() -> bool:
        nonlocal most_hung
        most_hung = max(most_hung, hung_a())
        return "fast-b-0" in delivered(scripted)

    try:
        wait_for(b_arrived, timeout=15, what="key B's event")
    finally:
        scripted.release.set()  # answer key A's hung sends (503), so the proxy stops at once
    latency = time.monotonic() - t0
    print(f"key B delivered after {latency:.2f} s; key A sends hanging at once: {most_hung}")
    assert most_hung <= per_key_concurrency, (
        f"{most_hung} sends of one hanging key were in flight at once "
        f"(forward.per_key_concurrency = {per_key_concurrency}); key B waited {latency:.2f} s"
    )
    assert latency < 2.0


# --------------------------------------------------------------------------------------------
# 7. Graceful shutdown with a queue


@pytest.mark.parametrize("outage", ["down", "hang"])
def test_sigterm_during_an_outage_exits_0_and_the_queue_is_sent_after_restart(
    fake: FakeSegment, launcher: Launcher, tmp_path: Path, outage: str
) -> None:
    grace = 2.0
    config = durable_config(
        fake, tmp_path, limits={"shutdown_grace": grace}, upstream={"timeout": 15.0}
    )
    proxy = launcher.start(config)
    if outage == "down":
        fake.api_down()
    else:
        fake.api_hang()
    client = Client(proxy.host, proxy.port)
    ids = {f"term-{i}" for i in range(20)}
    for mid in sorted(ids):
        assert post_one(client, mid) == 200
    client.close()
    if outage == "hang":
        wait_for(
            lambda: any(r.status is None for r in fake.api_requests),
            timeout=5,
            what="a send hanging upstream",
        )

    t0 = time.monotonic()
    code = proxy.stop(timeout=30)
    took = time.monotonic() - t0
    print(f"SIGTERM with Segment {outage}: exit {code} after {took:.2f} s (grace {grace} s)")
    assert code == 0
    assert took < (3.0 if outage == "down" else 2 * grace + 2.0)
    assert "stopped" in proxy.logs()

    if outage == "down":
        fake.api_up()
    else:
        # Answer the abandoned hung requests (their connection is gone) with a refusal first,
        # so the fake does not count them as accepted, then recover.
        fake.api_status(503)
        wait_for(
            lambda: all(r.status is not None for r in fake.api_requests),
            timeout=5,
            what="hung requests released",
        )
        fake.api_ok()
    t0 = time.monotonic()
    proxy = launcher.start(config)
    wait_delivered(fake, ids, timeout=15)
    counts = delivered(fake)
    print(f"{len(ids)} queued events arrived {time.monotonic() - t0:.2f} s after the restart")
    assert set(counts) == ids
    assert max(counts.values()) == 1
    assert proxy.stop() == 0
