"""Delivery faults through the real proxy (SQLite default): redirects and refused events.

Only a 2xx from Segment is a delivery: a redirect is retried (and named in the log as the
configuration fault it is), never counted as delivered. A batch Segment refuses for a few of
its events is split until those are found: only they become dead letters, with Segment's status
and message, and every good event arrives exactly once. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from segproxy.upstream import MAX_RESPONSE_BODY
from tests.integration.conftest import WRITE_KEY, LiveQueue, StartProxy, base_config
from tests.support.fakes import FakeSegment, RecordedRequest
from tests.support.load import Client, track, wait_for
from tests.support.proxy import to_toml


@pytest.fixture
def durable(fake: FakeSegment, start: StartProxy, tmp_path: Path) -> LiveQueue:
    config = base_config(
        fake,
        queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3},
    )
    config_file = tmp_path / "segproxy.toml"
    config_file.write_text(to_toml({"listen": "127.0.0.1:0", **config}))
    return LiveQueue(start(config), config_file)


def delivered(fake: FakeSegment) -> Counter[str]:
    return Counter(e.message_id for e in fake.api_events() if e.message_id is not None)


def answered(fake: FakeSegment, status: int) -> list[RecordedRequest]:
    return [r for r in fake.api_requests if r.status == status]


def redirected(fake: FakeSegment, status: int) -> Callable[[], bool]:
    return lambda: len(answered(fake, status)) >= 2


def test_redirects_from_the_api_are_retried_until_delivered_and_named_in_the_log(
    fake: FakeSegment, durable: LiveQueue
) -> None:
    # An http:// upstream.api that redirects to https://, a captive gateway, a load balancer:
    # the events sent meanwhile must stay queued, not be counted as delivered.
    location = f"https://{fake.api_authority}/v1/batch"
    client = durable.client()
    acked: list[str] = []
    for status in (301, 302, 307):
        fake.api_status(status, headers={"Location": location})
        for i in range(5):
            mid = f"redirected-{status}-{i}"
            resp = client.post_json("/v1/t", track(mid), WRITE_KEY)
            assert resp.status == 200, resp.body
            acked.append(mid)
        wait_for(redirected(fake, status), timeout=15, what=f"{status} answers")
        assert delivered(fake) == Counter()
    stats = durable.stats()
    assert stats["dead"] == 0
    assert stats["rows"] == len(acked)  # all still queued, none lost to a redirect
    fake.api_ok()
    client.close()

    wait_for(lambda: set(acked) <= set(delivered(fake)), timeout=20, what="every acked event")
    counts = delivered(fake)
    assert sorted(counts) == sorted(acked)
    assert set(counts.values()) == {1}, "each acknowledged event arrives exactly once"
    wait_for(lambda: durable.stats()["rows"] == 0, timeout=10, what="an empty queue")
    assert durable.stats()["dead"] == 0
    for status in (301, 302, 307):
        line = durable.proxy.logged(
            rf"WARNING.*HTTP {status} redirect to {re.escape(location)}.*configuration"
        )
        assert line is not None


def test_a_redirect_in_passthrough_mode_is_a_502_for_the_client_not_a_301(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))  # [queue] backend = "none"
    location = f"https://{fake.api_authority}/v1/t"
    fake.api_status(301, headers={"Location": location})
    client = Client(proxy.host, proxy.port)
    resp = client.post_json("/v1/t", track("passthrough-1"), WRITE_KEY)
    assert resp.status == 502  # a browser would follow a 301 or drop the event
    assert resp.header("location") is None
    assert resp.header("retry-after") is not None
    body = json.loads(resp.body)
    assert body["success"] is False
    assert body["code"] == "upstream_redirect"
    assert "configuration" in body["message"]
    # the client learns nothing about the proxy's upstream
    assert fake.api_authority not in resp.body.decode()
    assert "127.0.0.1" not in resp.body.decode()
    proxy.logged(rf"WARNING.*HTTP 301 redirect to {re.escape(location)}.*configuration")

    fake.api_ok()
    resp = client.post_json("/v1/t", track("passthrough-2"), WRITE_KEY)
    assert resp.status == 200
    client.close()
    assert set(delivered(fake)) == {"passthrough-2"}


def test_an_api_answer_too_large_to_hold_is_cut_off_and_its_events_are_sent_again(
    fake: FakeSegment, durable: LiveQueue
) -> None:
    # A 200 whose body goes on past anything Segment sends (a misbehaving gateway): the proxy
    # stops reading at its bound instead of holding it all; with the answer unread, the
    # batch's outcome is unknown, so its events stay queued and are sent again.
    fake.api_status(200, body=b" " * (MAX_RESPONSE_BODY + 1), times=1)
    client = durable.client()
    assert client.post_json("/v1/t", track("huge-answer-1"), WRITE_KEY).status == 200
    client.close()
    wait_for(lambda: delivered(fake)["huge-answer-1"] == 2, timeout=20, what="a second send")
    wait_for(lambda: durable.stats()["rows"] == 0, timeout=10, what="an empty queue")
    assert durable.stats()["dead"] == 0
    assert durable.proxy.logged(r"body passed \d+ bytes: cut off") is not None


def poisoned(mid: str) -> dict[str, Any]:
    return track(mid, properties={"n": mid, "poison": True})


def is_poison(event: dict[str, Any]) -> bool:
    props = event.get("properties")
    return isinstance(props, dict) and props.get("poison") is True


@pytest.mark.parametrize("status", [400, 413])
def test_a_batch_with_a_few_refused_events_delivers_the_others_and_keeps_only_those_dead(
    fake: FakeSegment, durable: LiveQueue, status: int
) -> None:
    fake.api_refuse(is_poison, status)
    bad = {"ev-17", "ev-18", "ev-250"}
    events = [poisoned(f"ev-{i}") if f"ev-{i}" in bad else track(f"ev-{i}") for i in range(300)]
    good = {e["messageId"] for e in events} - bad
    client = durable.client()
    resp = client.post_json("/v1/batch", {"batch": events}, WRITE_KEY)
    assert resp.status == 200, resp.body
    client.close()

    wait_for(lambda: good <= set(delivered(fake)), timeout=20, what="every good event")
    wait_for(lambda: durable.stats()["dead"] == len(bad), timeout=10, what="the dead letters")
    counts = delivered(fake)
    assert set(counts) == good, "no refused event was counted as delivered"
    assert set(counts.values()) == {1}, "each good event arrives exactly once"
    dead = durable.dead()
    assert sorted(d["event"]["messageId"] for d in dead) == sorted(bad)
    for d in dead:
        assert d["status"] == status
        assert f"event {d['event']['messageId']} is invalid" in d["reason"]  # Segment's message
    assert durable.stats()["rows"] == 0
    print(
        f"300 events, {len(bad)} refused: {len(fake.api_requests)} requests to Segment, "
        f"{len(good)} delivered, {len(dead)} dead"
    )
