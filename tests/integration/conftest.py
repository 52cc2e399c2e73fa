"""Fixtures: fake Segment upstreams and the real proxy as a subprocess, both on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import FakeSegment
from tests.support.load import Client as LoadClient
from tests.support.proxy import RunningProxy, run_cli, start_proxy
from tests.support.rawhttp import RawResponse, exchange

WRITE_KEY = "wk_integration_1"

StartProxy = Callable[..., RunningProxy]


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys=[WRITE_KEY, "wk_other_2"]) as f:
        yield f


def base_config(fake: FakeSegment, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"cdn": fake.cdn_url, "api": fake.api_url},
        "queue": {"backend": "none"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    return config


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartProxy]:
    """Start proxies on demand; every one is stopped (by its pid) at the end of the test."""
    started: list[RunningProxy] = []

    def _start(config: dict[str, Any], **kwargs: Any) -> RunningProxy:
        proxy = start_proxy(config, tmp_path / f"proxy{len(started)}", **kwargs)
        started.append(proxy)
        return proxy

    yield _start
    for p in started:
        if p.proc.poll() is None:
            p.stop()


@pytest.fixture
def proxy(fake: FakeSegment, start: StartProxy) -> RunningProxy:
    return start(base_config(fake))


class Client:
    """Requests to one proxy, each on a fresh connection."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy

    def get(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> RawResponse:
        return exchange(self.proxy.host, self.proxy.port, "GET", path, headers, **kw)

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, **kw: Any
    ) -> RawResponse:
        return exchange(self.proxy.host, self.proxy.port, "POST", path, headers, body, **kw)

    def request(self, method: str, path: str, **kw: Any) -> RawResponse:
        return exchange(self.proxy.host, self.proxy.port, method, path, **kw)


@pytest.fixture
def client(proxy: RunningProxy) -> Client:
    return Client(proxy)


@dataclass
class LiveQueue:
    """A running proxy on a durable queue, and the operator's CLI on the same config."""

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

    def dead(self) -> list[dict[str, Any]]:
        out = self.cli("queue", "dead", "--json")
        assert out.returncode == 0, out.stderr
        dead: list[dict[str, Any]] = json.loads(out.stdout)
        return dead

    def client(self) -> LoadClient:
        return LoadClient(self.proxy.host, self.proxy.port)
