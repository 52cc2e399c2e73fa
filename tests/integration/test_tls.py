"""TLS on the listener: real certificates (trustme), real TLS clients."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from segproxy.config import ConfigError, build
from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_proxy(
    ca: trustme.CA, fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> tuple[RunningProxy, ssl.SSLContext]:
    cert = ca.issue_cert("127.0.0.1", "analytics.example.com")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    proxy = start(base_config(fake, tls={"cert": str(cert_file), "key": str(key_file)}))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return proxy, client_ctx


@contextmanager
def https(proxy: RunningProxy, ctx: ssl.SSLContext) -> Iterator[http.client.HTTPSConnection]:
    conn = http.client.HTTPSConnection(proxy.host, proxy.port, context=ctx, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def test_the_proxy_announces_and_serves_https(
    tls_proxy: tuple[RunningProxy, ssl.SSLContext],
) -> None:
    proxy, ctx = tls_proxy
    assert proxy.scheme == "https"
    with https(proxy, ctx) as conn:
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200


def test_settings_over_tls_name_https_and_the_visitors_host(
    tls_proxy: tuple[RunningProxy, ssl.SSLContext],
) -> None:
    proxy, ctx = tls_proxy
    with https(proxy, ctx) as conn:
        conn.request(
            "GET", f"/v1/projects/{WRITE_KEY}/settings", headers={"Host": "analytics.example.com"}
        )
        sio = json.loads(conn.getresponse().read())["integrations"]["Segment.io"]
    assert sio["protocol"] == "https"
    assert sio["apiHost"] == "analytics.example.com/v1"


def test_events_over_tls_are_forwarded(
    tls_proxy: tuple[RunningProxy, ssl.SSLContext], fake: FakeSegment
) -> None:
    proxy, ctx = tls_proxy
    body = json.dumps({"writeKey": "k", "type": "track", "event": "Over TLS"})
    with https(proxy, ctx) as conn:
        conn.request("POST", "/v1/t", body=body, headers={"Content-Type": "text/plain"})
        assert conn.getresponse().status == 200
    (seen,) = fake.api_requests
    assert seen.json["event"] == "Over TLS"
    assert seen.json["context"]["ip"] == "127.0.0.1"


def test_tls_needs_both_files_and_they_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build({"tls.cert": str(tmp_path / "cert.pem")})
    assert "tls.key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build({"tls.cert": str(tmp_path / "nope.pem"), "tls.key": str(tmp_path / "nope.key")})
    assert "readable PEM file" in str(info.value)


def test_metrics_tell_the_seconds_until_the_certificate_expires(
    tls_proxy: tuple[RunningProxy, ssl.SSLContext], tmp_path: Path
) -> None:
    proxy, ctx = tls_proxy
    with https(proxy, ctx) as conn:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
    scraped_at = time.time()
    (sample,) = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "segproxy_tls_certificate_expiry_seconds"
    ]
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    expected = cert.not_valid_after_utc.timestamp() - scraped_at
    assert abs(sample.value - expected) < 60
