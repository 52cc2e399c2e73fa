"""Segment's real server-side SDKs send through the proxy: every event arrives upstream once.

- ``segment-analytics-python`` (PyPI) with ``host=`` the proxy's origin, gzip on and off,
  batched by its consumer thread and in ``sync_mode``;
- ``@segment/analytics-node`` (npm) with ``host`` = the proxy's origin and ``path`` = /v1/batch,
  driven by ``js/node_sdk.mjs``.

Each event carries distinct properties; some set ``context.ip`` themselves (it must survive),
the others must get the client's address (127.0.0.1) from the proxy. The write key travels as
HTTP Basic auth and must reach the upstream intact.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from segment.analytics.client import Client

from tests.e2e.conftest import WRITE_KEY, run_node
from tests.support.fakes import ApiEvent, FakeSegment
from tests.support.proxy import RunningProxy

pytestmark = pytest.mark.e2e

N = 200
OWN_IP = "198.51.100.23"


def assert_each_once(events: list[ApiEvent], message_ids: list[str]) -> dict[str, ApiEvent]:
    """Every sent messageId arrived exactly once, and nothing else arrived."""
    counts = Counter(e.message_id for e in events)
    dupes = {m: c for m, c in counts.items() if c > 1}
    missing = set(message_ids) - set(counts)
    extra = set(counts) - set(message_ids)
    assert not dupes and not missing and not extra, (
        f"duplicates: {dupes}; missing {len(missing)}: {sorted(missing)[:5]}; "
        f"unexpected {len(extra)}: {sorted(map(str, extra))[:5]}"
    )
    return {e.message_id: e for e in events if e.message_id is not None}


def assert_upstream_requests(fake: FakeSegment) -> None:
    """The proxy spoke to the API as the API expects, with the write key as Basic auth."""
    reqs = fake.api_requests
    assert reqs, "nothing reached the fake API"
    for r in reqs:
        assert r.method == "POST"
        assert r.headers.get("host") == fake.api_authority
        assert r.basic_auth_user == WRITE_KEY, (r.path, r.headers.get("authorization"))
        assert r.status == 200, (r.path, r.status)


def python_client(proxy: RunningProxy, errors: list[Any], **kwargs: Any) -> Any:
    def on_error(error: Exception, batch: Any) -> None:
        errors.append(error)

    return Client(
        write_key=WRITE_KEY,
        host=proxy.url,
        on_error=on_error,
        max_retries=2,
        timeout=10,
        **kwargs,
    )


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_python_sdk_batched(gzip: bool, fake: FakeSegment, proxy: RunningProxy) -> None:
    errors: list[Any] = []
    client = python_client(proxy, errors, gzip=gzip, upload_size=100, upload_interval=0.1)
    run = uuid.uuid4().hex[:8]
    sent: dict[str, dict[str, Any]] = {}
    try:
        for i in range(N):
            properties = {"i": i, "label": f"py-{i}", "gzip": gzip, "tags": ["a", i % 3]}
            context = {"ip": OWN_IP} if i % 3 == 0 else {}
            mid = f"py-{run}-{i}"
            if i % 10 == 0:
                ok, _ = client.identify(
                    user_id=f"py-user-{i % 5}", traits=properties, context=context, message_id=mid
                )
            else:
                ok, _ = client.track(
                    user_id=f"py-user-{i % 5}",
                    event="Python Event",
                    properties=properties,
                    context=context,
                    message_id=mid,
                )
            assert ok
            sent[mid] = {"i": i, "properties": properties, "ip": context.get("ip")}
        client.flush()
    finally:
        client.join()
    assert errors == []

    events = fake.wait_for_events(N, timeout=30)
    by_id = assert_each_once(events, list(sent))
    for mid, want in sent.items():
        e = by_id[mid].data
        payload = e["traits"] if e["type"] == "identify" else e["properties"]
        assert payload == want["properties"], mid
        assert e["context"]["ip"] == (want["ip"] or "127.0.0.1"), (mid, e["context"])
        assert e["context"]["library"]["name"] == "analytics-python"
        assert e["userId"] == f"py-user-{want['i'] % 5}"
        assert by_id[mid].write_key == WRITE_KEY
    assert {e.path for e in events} == {"/v1/batch"}
    assert_upstream_requests(fake)


def test_python_sdk_sync_mode(fake: FakeSegment, proxy: RunningProxy) -> None:
    """sync_mode posts each call and raises on any non-2xx (3xx included): all must be 200."""
    errors: list[Any] = []
    client = python_client(proxy, errors, sync_mode=True, gzip=True)
    ids = []
    for i in range(20):
        ok, msg = client.track(
            anonymous_id=f"anon-{i}",
            event="Sync Event",
            properties={"i": i},
            context={"ip": OWN_IP} if i % 2 else {},
        )
        assert ok
        ids.append(msg["messageId"])
    assert errors == []
    by_id = assert_each_once(fake.wait_for_events(20, timeout=15), ids)
    for i, mid in enumerate(ids):
        e = by_id[mid].data
        assert e["properties"] == {"i": i}
        assert e["anonymousId"] == f"anon-{i}"
        assert e["context"]["ip"] == (OWN_IP if i % 2 else "127.0.0.1")
    assert_upstream_requests(fake)


def test_node_sdk(fake: FakeSegment, proxy: RunningProxy) -> None:
    out = run_node(
        "node_sdk.mjs",
        {"writeKey": WRITE_KEY, "host": proxy.url, "path": "/v1/batch", "n": N},
        timeout=90,
    )
    assert out["errors"] == []
    sent = out["sent"]
    assert len(sent) == N
    ids = [s["messageId"] for s in sent]
    assert all(isinstance(m, str) and m for m in ids)

    events = fake.wait_for_events(N, timeout=30)
    by_id = assert_each_once(events, ids)
    for s in sent:
        i = s["i"]
        e = by_id[s["messageId"]].data
        want = {"i": i, "label": f"node-{i}", "nested": {"even": i % 2 == 0, "list": [i, "x"]}}
        assert e["type"] == s["type"]
        payload = e["traits"] if e["type"] == "identify" else e["properties"]
        assert payload == want, s
        assert e["userId"] == f"node-user-{i % 7}"
        assert e["context"]["ip"] == ("203.0.113.9" if i % 2 else "127.0.0.1"), e["context"]
        assert e["context"]["library"]["name"] == "@segment/analytics-node"
        assert by_id[s["messageId"]].write_key == WRITE_KEY
    assert {e.path for e in events} == {"/v1/batch"}
    assert_upstream_requests(fake)
