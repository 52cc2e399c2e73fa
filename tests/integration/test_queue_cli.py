"""``segproxy queue ...`` on a LIVE proxy's queue file: stats, dead letters, replay, purge.

The proxy keeps running (and keeps being written to) while the CLI reads and changes its queue;
every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections import Counter
from pathlib import Path

import pytest

from segproxy.redact import mask
from tests.integration.conftest import WRITE_KEY, LiveQueue, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import Client, Load, track, wait_for
from tests.support.proxy import run_cli, to_toml

OTHER_KEY = "wk_other_2"
REFUSAL = '{"success":false,"message":"Invalid event: anonymousId or userId is required"}'


@pytest.fixture
def live(fake: FakeSegment, start: StartProxy, tmp_path: Path) -> LiveQueue:
    config = base_config(
        fake,
        queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        forward={"backoff_base": 0.05, "backoff_cap": 0.5},
    )
    config_file = tmp_path / "segproxy.toml"
    config_file.write_text(to_toml({"listen": "127.0.0.1:0", **config}))
    return LiveQueue(start(config), config_file)


def delivered(fake: FakeSegment) -> Counter[str]:
    return Counter(e.message_id for e in fake.api_events() if e.message_id is not None)


def post(client: Client, mid: str, key: str = WRITE_KEY) -> None:
    resp = client.post_json("/v1/t", track(mid), key)
    assert resp.status == 200, resp.body


def test_dead_letters_are_listed_replayed_and_purged_on_a_live_proxy(
    fake: FakeSegment, live: LiveQueue
) -> None:
    fake.api_status(400, body=REFUSAL)
    client = live.client()
    ids = ["dead-1", "dead-2", "dead-3"]
    for mid in ids:
        post(client, mid)
    wait_for(lambda: live.stats()["dead"] == 3, timeout=15, what="3 dead letters")
    stats = live.stats()
    assert stats["rows"] == 0
    assert stats["dead"] == 3

    listed = live.cli("queue", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    dead = json.loads(listed.stdout)
    assert sorted(d["event"]["messageId"] for d in dead) == ids
    for d in dead:
        assert d["status"] == 400
        assert "anonymousId or userId is required" in d["reason"]
        assert d["write_key"] == mask(WRITE_KEY)
        assert d["event"]["context"]["ip"] == "127.0.0.1"
    assert WRITE_KEY not in listed.stdout, "write keys are secrets: never printed whole"
    text = live.cli("queue", "dead")
    assert text.returncode == 0
    assert "status 400" in text.stdout
    assert "dead-2" in text.stdout

    # Segment takes them now: replay puts them back in the queue, the live proxy sends them.
    fake.api_ok()
    replayed = live.cli("queue", "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 dead letters" in replayed.stdout
    t0 = time.monotonic()
    wait_for(lambda: set(ids) <= set(delivered(fake)), timeout=15, what="replayed events")
    print(f"replayed dead letters reached Segment in {time.monotonic() - t0:.2f} s")
    assert all(delivered(fake)[mid] == 1 for mid in ids)
    wait_for(
        lambda: (s := live.stats())["rows"] == 0 and s["dead"] == 0,
        timeout=10,
        what="an empty queue after the replay",
    )

    # purge: refused without --yes when there is no tty to ask on, done with --yes
    fake.api_status(400, body=REFUSAL)
    post(client, "purge-1")
    post(client, "purge-2")
    wait_for(lambda: live.stats()["dead"] == 2, timeout=15, what="2 dead letters")
    refused = live.cli("queue", "purge")
    assert refused.returncode == 1
    assert "refusing" in refused.stderr
    assert "2 dead letters" in refused.stderr
    assert live.stats()["dead"] == 2
    purged = live.cli("queue", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 queued events and 2 dead letters" in purged.stdout
    assert live.stats()["dead"] == 0

    # the proxy ran all along and still delivers
    assert live.proxy.proc.poll() is None
    fake.api_ok()
    post(client, "after-purge")
    client.close()
    fake.wait_for_events(1, timeout=10)
    wait_for(lambda: "after-purge" in delivered(fake), timeout=10, what="a new event")
    assert not {"purge-1", "purge-2"} & set(delivered(fake))


def test_stats_reads_a_live_queue_while_it_is_being_written(
    fake: FakeSegment, live: LiveQueue
) -> None:
    fake.api_status(503)  # nothing leaves the queue: its depth only grows
    proxy = live.proxy
    load = Load(
        proxy.host,
        proxy.port,
        write_keys=[WRITE_KEY, OTHER_KEY],
        threads=2,
        total=20_000,
        max_seconds=15,
        prefix="live",
    ).start()
    samples: list[int] = []
    try:
        assert load.wait_acked(50, timeout=10), load.summary()
        for _ in range(5):
            low = load.acked_count()
            stats = live.stats()
            with load.lock:
                high = len(load.attempted)
            assert load.running(), "the load ended before the stats were read"
            assert low <= stats["rows"] <= high
            assert sum(v["rows"] for v in stats["per_key"].values()) == stats["rows"]
            assert set(stats["per_key"]) == {mask(WRITE_KEY), mask(OTHER_KEY)}
            assert stats["dead"] == 0
            assert stats["oldest_age_seconds"] >= 0
            samples.append(stats["rows"])
        text = live.cli("queue", "stats")
        assert text.returncode == 0, text.stderr
        assert "queued events:" in text.stdout
        assert mask(WRITE_KEY) in text.stdout
        assert WRITE_KEY not in text.stdout
    finally:
        load.stop()
    print(f"queue depth read live: {samples}; load {load.summary()}")
    assert samples == sorted(samples)
    assert set(load.statuses) == {200}, "reading the queue must not make the proxy refuse"

    fake.api_ok()
    t0 = time.monotonic()
    wait_for(lambda: load.acked <= set(delivered(fake)), timeout=30, what="the backlog")
    print(f"backlog of {len(load.acked)} drained in {time.monotonic() - t0:.2f} s")
    wait_for(lambda: live.stats()["rows"] == 0, timeout=10, what="an empty queue")


def test_stats_per_key_keeps_keys_sharing_a_prefix_apart(
    fake: FakeSegment, live: LiveQueue
) -> None:
    fake.api_status(503)
    client = live.client()
    for i in range(2):
        post(client, f"eu-{i}", "wk_shop_eu_1")
    for i in range(3):
        post(client, f"us-{i}", "wk_shop_us_2")
    client.close()
    stats = live.stats()
    assert stats["rows"] == 5
    assert sum(v["rows"] for v in stats["per_key"].values()) == 5
    assert len(stats["per_key"]) == 2


def test_dead_letters_never_show_a_write_key_sent_in_the_event_body(
    fake: FakeSegment, live: LiveQueue
) -> None:
    # Clients without Basic auth send the key in the body; the event stored (and dead) holds it.
    fake.api_status(400, body=REFUSAL)
    client = live.client()
    event = {**track("key-in-body"), "writeKey": OTHER_KEY}
    resp = client.post("/v1/t", json.dumps(event).encode(), {"Content-Type": "text/plain"})
    assert resp.status == 200, resp.body
    client.close()
    wait_for(lambda: live.stats()["dead"] == 1, timeout=15, what="the dead letter")
    listed = live.cli("queue", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    (dead,) = json.loads(listed.stdout)
    assert dead["event"]["messageId"] == "key-in-body"
    assert dead["write_key"] == dead["event"]["writeKey"] == mask(OTHER_KEY)
    text = live.cli("queue", "dead")
    assert text.returncode == 0, text.stderr
    assert "key-in-body" in text.stdout
    for out in (listed.stdout, text.stdout):
        assert OTHER_KEY not in out, "write keys are secrets: never printed whole"


def test_dead_letters_over_their_cap_are_evicted_oldest_first_and_counted_in_stats(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    config = base_config(
        fake,
        queue={"backend": "sqlite", "path": str(tmp_path / "q.db"), "max_dead_bytes": 4000},
    )
    config_file = tmp_path / "segproxy.toml"
    config_file.write_text(to_toml({"listen": "127.0.0.1:0", **config}))
    live = LiveQueue(start(config), config_file)
    fake.api_status(400, body=REFUSAL)
    client = live.client()
    for i in range(12):  # each dead letter is ~400 bytes (event, key, Segment's reason)
        post(client, f"dead-{i}")
        n = i + 1
        wait_for(lambda: (s := live.stats())["dead"] + s["dead_evicted"] == n, timeout=15)  # noqa: B023
    client.close()
    stats = live.stats()
    assert stats["dead_evicted"] > 0
    assert stats["dead"] + stats["dead_evicted"] == 12
    assert 0 < stats["dead_bytes"] <= 4000
    kept = [d["event"]["messageId"] for d in json.loads(live.cli("queue", "dead", "--json").stdout)]
    assert kept == [f"dead-{i}" for i in range(12 - len(kept), 12)], "the newest are kept"
    text = live.cli("queue", "stats")
    assert (
        f"dead letters evicted (oldest first, over queue.max_dead_bytes): {stats['dead_evicted']}"
        in text.stdout
    )
    live.proxy.logged(r"WARNING .*evicted the \d+ oldest")
    # The queue itself is not blocked by dead letters: Segment takes events again.
    fake.api_ok()
    client = live.client()
    post(client, "after")
    client.close()
    wait_for(lambda: "after" in delivered(fake), timeout=10, what="a new event delivered")


def test_queue_stats_shows_the_last_fault_of_each_key_with_its_age(tmp_path: Path) -> None:
    # The proxy records why deliveries of a key fail; `queue stats`, another process, shows it.
    import asyncio

    from segproxy.queue.base import NewRow
    from segproxy.queue.sqlite import SqliteQueue

    path = tmp_path / "data" / "queue.db"

    async def fail_once() -> None:
        q = await SqliteQueue(
            str(path), max_rows=100, max_bytes=1 << 30, min_free_disk_bytes=0
        ).open()
        try:
            await q.put([NewRow(WRITE_KEY, "event", time.time(), b'{"messageId":"m"}')])
            rows = await q.lease(time.time(), 10)
            fault = "HTTP 301 redirect to https://api.segment.io/v1/batch"
            await q.retry_later([r.id for r in rows], time.time() + 60, fault)
        finally:
            await q.close()

    asyncio.run(fail_once())
    config_file = tmp_path / "segproxy.toml"
    config_file.write_text(to_toml({"queue": {"path": str(path)}}))
    out = run_cli("queue", "stats", "--json", "--config", str(config_file))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["per_key"][mask(WRITE_KEY)]
    assert shown["last_fault"] == "HTTP 301 redirect to https://api.segment.io/v1/batch"
    assert shown["last_fault_age_seconds"] >= 0
    text = run_cli("queue", "stats", "--config", str(config_file))
    assert "last fault" in text.stdout
    assert "HTTP 301 redirect to https://api.segment.io/v1/batch" in text.stdout
    assert WRITE_KEY not in text.stdout


def test_with_only_data_dir_set_the_queue_is_there_readable_by_its_owner_only(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    # The proxy runs in one directory, the operator's CLI in another: both find the queue in
    # data_dir. segproxy makes the directories 0700 and the files 0600 whatever the umask.
    data = tmp_path / "var" / "lib" / "segproxy"  # none of it exists yet
    config = base_config(
        fake, queue={"backend": "sqlite"}, data_dir=str(data), forward={"backoff_base": 0.05}
    )
    config_file = tmp_path / "segproxy.toml"
    config_file.write_text(to_toml({"listen": "127.0.0.1:0", **config}))
    fake.api_status(503)  # the event stays queued
    old_umask = os.umask(0)  # the most permissive: the modes must not come from it
    try:
        live = LiveQueue(start(config), config_file)
    finally:
        os.umask(old_umask)
    client = live.client()
    post(client, "kept-1")
    client.close()
    assert live.stats()["rows"] == 1  # the CLI runs from the test's directory, not the proxy's
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [
            tmp_path / "var",
            tmp_path / "var" / "lib",
            data,
            *data.iterdir(),
            *(data / "queue.db.journal").iterdir(),
        ]
    }
    assert modes == {
        "var": 0o700,
        "var/lib": 0o700,
        "var/lib/segproxy": 0o700,
        "var/lib/segproxy/queue.db": 0o600,
        "var/lib/segproxy/queue.db-wal": 0o600,
        "var/lib/segproxy/queue.db-shm": 0o600,
        "var/lib/segproxy/queue.db.lock": 0o600,
        "var/lib/segproxy/queue.db.journal": 0o700,
        "var/lib/segproxy/queue.db.journal/seg-0000": 0o600,
    }
