"""``segproxy queue ...`` on a LIVE proxy's queue file: stats, dead letters, replay, purge.

The proxy keeps running (and keeps being written to) while the CLI reads and changes its queue;
every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from segproxy.redact import mask
from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import Client, Load, track, wait_for
from tests.support.proxy import RunningProxy, run_cli, to_toml

OTHER_KEY = "wk_other_2"
REFUSAL = '{"success":false,"message":"Invalid event: anonymousId or userId is required"}'


@dataclass
class LiveQueue:
    proxy: RunningProxy
    config_file: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``segproxy <args> --config F``, with no tty on stdin (as in CI or a cron job)."""
        return run_cli(*args, "--config", str(self.config_file))

    def stats(self) -> dict[str, Any]:
        out = self.cli("queue", "stats", "--json")
        assert out.returncode == 0, out.stderr
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def client(self) -> Client:
        return Client(self.proxy.host, self.proxy.port)


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
