"""The event loop never stalls on cheap input: ``/healthz`` stays quick under a hostile mix.

A request that costs its sender a few hundred bytes must not cost the proxy's event loop tens
of milliseconds, or a handful of them starves every other visitor. Two such inputs:

- settings asked for under ever new ``Host`` values (``public_hosts`` empty, so all are
  served): each new host is a new rendering of the settings, and compressing a large one
  (a workspace with many destinations: ~700 KB here) took ~50 ms of loop time per request;
- ``/v1/t`` bodies made of 26,214 empty gzip members (512 KB): ~185 ms of loop time each.

Each run alternates rounds of a benign load and of the hostile one, with the same number of
client threads doing the same kind of requests (benign: one host, whose rendering is memoised;
ordinary gzip events), while one more thread measures ``/healthz`` on its own connection. The
worst ``/healthz`` latency under the hostile rounds must stay within a generous factor of the
worst under the benign ones, plus a floor: a ratio within the same run, so a loaded 2-core CI
machine slows both alike, never an absolute time.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import WRITE_KEY, proxy_config
from tests.support.fakes import FakeSegment
from tests.support.load import basic, track
from tests.support.proxy import RunningProxy, running_proxy
from tests.support.rawhttp import Conn, request_bytes

pytestmark = pytest.mark.e2e

ROUNDS = 2  # benign, hostile, benign, hostile
ROUND_SECONDS = 1.5
SETTINGS_THREADS = 6
INGEST_THREADS = 2
PROBE_PACE = 0.005  # between two /healthz probes: pacing the sampling, not a synchronisation
FACTOR = 3.0  # generous: CI machines are shared and noisy
FLOOR = 0.03  # seconds added to the benign worst case, so a very quiet benign run is no trap
EMPTY_GZIP_MEMBERS = 26_214  # x 20 bytes = 524,280 bytes, just under the 512 KB body limit
PLUGINS = 2500  # ~700 KB of settings JSON
SETTINGS_PATH = f"/v1/projects/{WRITE_KEY}/settings"


def _big_settings(fake: FakeSegment) -> None:
    """Settings of a workspace with many destinations: ~700 KB of JSON, compressible like
    real ones (repeated keys, random ids)."""
    rng = random.Random(11)
    fake.settings[WRITE_KEY]["remotePlugins"] = [
        {
            "name": f"Destination {i} (Actions)",
            "creationName": f"Destination {i} (Actions)",
            "url": f"https://cdn.segment.com/next-integrations/actions/d{i}/{rng.randbytes(8).hex()}.js",
            "libraryName": f"destination{i}",
            "settings": {"apiKey": rng.randbytes(16).hex(), "region": rng.choice("abc")},
        }
        for i in range(PLUGINS)
    ]


@dataclass
class Round:
    hostile: bool
    stop: threading.Event = field(default_factory=threading.Event)
    healthz: list[float] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.answers[what] = self.answers.get(what, 0) + 1


Worker = Callable[[RunningProxy, Round, int], None]


def _settings_client(proxy: RunningProxy, rnd: Round, seed: int) -> None:
    """Benign: the proxy's own host again and again. Hostile: a new host every time."""
    n = 0
    with Conn(proxy.host, proxy.port) as conn:
        while not rnd.stop.is_set():
            n += 1
            host = f"h{seed}-{n}.example" if rnd.hostile else proxy.authority
            conn.send(request_bytes("GET", SETTINGS_PATH, host, {"Accept-Encoding": "gzip, br"}))
            resp = conn.read_response(timeout=30)
            rnd.count(f"settings {resp.status}")


def _ingest_client(proxy: RunningProxy, rnd: Round, seed: int) -> None:
    """Benign: an ordinary gzip event. Hostile: 512 KB of empty gzip members."""
    headers = {
        "Content-Type": "text/plain",
        "Content-Encoding": "gzip",
        "Authorization": basic(WRITE_KEY),
    }
    hostile = gzip.compress(b"", mtime=0) * EMPTY_GZIP_MEMBERS
    n = 0
    with Conn(proxy.host, proxy.port) as conn:
        while not rnd.stop.is_set():
            n += 1
            body = (
                hostile
                if rnd.hostile
                else gzip.compress(json.dumps(track(f"stall-{seed}-{n}")).encode())
            )
            conn.send(request_bytes("POST", "/v1/t", proxy.authority, headers, body))
            resp = conn.read_response(timeout=30)
            rnd.count(f"ingest {resp.status}")


def _probe(proxy: RunningProxy, rnd: Round) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        while not rnd.stop.is_set():
            started = time.monotonic()
            conn.send(request_bytes("GET", "/healthz", proxy.authority))
            resp = conn.read_response(timeout=30)
            rnd.healthz.append(time.monotonic() - started)
            assert resp.status == 200
            time.sleep(PROBE_PACE)


def _run_round(proxy: RunningProxy, workers: list[Worker], hostile: bool) -> Round:
    rnd = Round(hostile)
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)
                rnd.stop.set()

        return run

    threads = [threading.Thread(target=guarded(functools.partial(_probe, proxy, rnd)))]
    for i, work in enumerate(workers):
        threads.append(threading.Thread(target=guarded(functools.partial(work, proxy, rnd, i))))
    for t in threads:
        t.start()
    rnd.stop.wait(ROUND_SECONDS)  # the round's length is the point: load runs meanwhile
    rnd.stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return rnd


@pytest.fixture
def big_settings_proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with FakeSegment([WRITE_KEY]) as fake:
        _big_settings(fake)
        config = proxy_config(fake, "sqlite")  # public_hosts empty: every host is served
        with running_proxy(config, tmp_path / "proxy") as proxy:
            try:
                yield proxy
            finally:
                print(f"--- segproxy log (pid {proxy.pid}) ---\n{proxy.logs()}")


SETTINGS_CLIENTS: list[Worker] = [_settings_client] * SETTINGS_THREADS
INGEST_CLIENTS: list[Worker] = [_ingest_client] * INGEST_THREADS
MIXES: dict[str, list[Worker]] = {
    "many hosts": SETTINGS_CLIENTS,
    "empty gzip members": INGEST_CLIENTS,
    "both": SETTINGS_CLIENTS + INGEST_CLIENTS,
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_healthz_stays_quick_while_cheap_requests_ask_for_expensive_work(
    big_settings_proxy: RunningProxy, mix: str
) -> None:
    proxy = big_settings_proxy
    workers = MIXES[mix]
    warm = _run_round(proxy, workers, hostile=False)  # fills the cache, memoises the host
    assert warm.healthz
    benign: list[Round] = []
    hostile: list[Round] = []
    for _ in range(ROUNDS):
        benign.append(_run_round(proxy, workers, hostile=False))
        hostile.append(_run_round(proxy, workers, hostile=True))
    worst_benign = max(max(r.healthz) for r in benign)
    worst_hostile = max(max(r.healthz) for r in hostile)
    print(
        f"{mix}: worst /healthz benign {worst_benign * 1000:.1f} ms, "
        f"hostile {worst_hostile * 1000:.1f} ms; "
        f"answers benign {[r.answers for r in benign]}, hostile {[r.answers for r in hostile]}"
    )
    for r in hostile:  # the hostile load really ran, and was answered
        assert sum(r.answers.values()) >= len(workers)
    assert worst_hostile <= FACTOR * (worst_benign + FLOOR)
