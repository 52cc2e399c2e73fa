"""Operator endpoints (everything beyond /healthz) can need a token and/or live elsewhere."""

from __future__ import annotations

import pytest

from segproxy.config import ConfigError, build
from tests.integration.conftest import Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import exchange

TOKEN = "s3cret-operator-token-0123"


def admin_port(proxy: RunningProxy) -> int:
    return int(proxy.logged(r"segproxy admin listening on http://127\.0\.0\.1:(\d+)").group(1))


def test_readiness_needs_the_token_when_one_is_set(fake: FakeSegment, start: StartProxy) -> None:
    client = Client(start(base_config(fake, admin={"token": TOKEN})))
    assert client.get("/healthz").status == 200  # liveness stays open for load balancers
    missing = client.get("/readyz")
    assert missing.status == 401
    assert "Bearer" in missing.json()["message"]
    assert client.get("/readyz", {"Authorization": "Bearer wrong-token-wrong-token"}).status == 401
    assert client.get("/readyz", {"Authorization": f"Bearer {TOKEN}"}).json() == {"status": "ready"}


def test_operator_endpoints_can_live_on_their_own_listener(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, admin={"listen": "127.0.0.1:0"}))
    public = Client(proxy)
    assert public.get("/readyz").status == 404
    assert public.get("/healthz").status == 200
    port = admin_port(proxy)
    assert exchange(proxy.host, port, "GET", "/readyz").json() == {"status": "ready"}
    assert exchange(proxy.host, port, "GET", "/healthz").status == 200
    refused = exchange(proxy.host, port, "POST", "/v1/t", body=b'{"writeKey":"k"}')
    assert refused.status == 404
    assert fake.api_requests == []


def test_a_short_admin_token_is_refused_at_start_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        build({"admin.token": "short"})
    assert "admin.token" in str(info.value)
    assert "short" not in str(info.value)
