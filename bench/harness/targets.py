"""The processes under test and around them: the upstream nginx, the reference nginx, and
segproxy (pass-through, and the durable segproxy-sqlite), each checked once before the load."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import http.client
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import (
    BENCH,
    BROWSER_ACCEPT_ENCODING,
    DURABLE,
    INGEST_PATH,
    SCRIPT_PATH,
    SEGPROXY,
    SHAPES,
    WRITE_KEY,
    BenchError,
    venv_python,
)
from harness.fixtures import (
    load_bundle,
    render,
    request_head,
    settings_json,
    track_event_template,
    write_head,
)
from harness.processes import (
    Processes,
    affinity,
    decode_body,
    free_port,
    http_request,
    pid_tree,
    tail,
    wait_port,
)


@dataclass
class Target:
    # "segproxy", "segproxy-sqlite" (durable ingest), "nginx" (the reference) or "nginx-b"
    # (self-test target)
    label: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path | None = None  # segproxy's TOML (the queue CLI reads it)


class Harness:
    def __init__(self, tmp: Path, procs: Processes, *, load_core: int, target_core: int) -> None:
        self.tmp = tmp
        self.procs = procs
        self.load_core = load_core
        self.target_core = target_core
        self.user_line = "user root;" if os.geteuid() == 0 else ""
        self.upstream_port = 0
        self.event_file = tmp / "track-event.json"
        # Per request shape: its headers, and the file wrk/post_track.lua reads them from.
        self.heads = {shape: request_head(shape) for shape in SHAPES}
        self.head_files = {shape: tmp / f"head-{shape}.txt" for shape in SHAPES}
        self.bundle, self.bundle_source = load_bundle()
        self.env = dict(os.environ)

    def pinned(self, core: int, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", str(core), *argv]

    def prepare(self, now: dt.datetime) -> None:
        for d in ("tmp", "cache", "cdn", "logs"):
            (self.tmp / d).mkdir()
        self.event_file.write_bytes(track_event_template(now))
        for shape, head in self.heads.items():
            write_head(self.head_files[shape], head)
        cdn = self.tmp / "cdn"
        (cdn / "analytics.min.js").write_bytes(self.bundle)
        # Pre-compressed once, as a CDN does (gzip_static serves it to gzip-accepting clients).
        (cdn / "analytics.min.js.gz").write_bytes(gzip.compress(self.bundle, 9, mtime=0))

    def start_nginx(self, name: str, template: str, core: int, values: dict[str, str]) -> Target:
        port = free_port()
        conf = self.tmp / f"{name}.conf"
        render(
            BENCH / "nginx" / template,
            conf,
            {"PREFIX": str(self.tmp), "NAME": name, "PORT": str(port), "USER": self.user_line}
            | values,
        )
        log = self.tmp / "logs" / f"{name}.out"
        argv = self.pinned(
            core,
            ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / f"{name}.err")],
        )
        proc = self.procs.start(name, argv, cwd=self.tmp, log=log, env=self.env)
        wait_port(port, proc, log, 10)
        return Target(name, port, proc, log)

    def start_upstream(self) -> Target:
        up = self.start_nginx(
            "upstream",
            "upstream.conf.in",
            self.load_core,
            {"WRITE_KEY": WRITE_KEY, "SETTINGS_JSON": settings_json()},
        )
        self.upstream_port = up.port
        return up

    def start_reference(self, name: str) -> Target:
        ref = self.start_nginx(
            name,
            "reference.conf.in",
            self.target_core,
            {"UPSTREAM_PORT": str(self.upstream_port)},
        )
        ref.label = "nginx" if name == "reference" else "nginx-b"
        return ref

    def start_segproxy(self, deadline_s: float, queue: str, label: str = SEGPROXY) -> Target:
        """One segproxy process with its own port and data dir (config, queue file)."""
        port = free_port()
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        data = self.tmp / label
        data.mkdir()
        config = data / "segproxy.toml"
        queue_path = f'path = "{data / "queue.db"}"\n' if queue == "sqlite" else ""
        config.write_text(
            f'listen = "127.0.0.1:{port}"\n\n'
            f'[upstream]\napi = "{upstream}"\ncdn = "{upstream}"\n\n'
            f'[queue]\nbackend = "{queue}"\n{queue_path}\n'
            f'[sources]\nwrite_keys = ["{WRITE_KEY}"]\n'
        )
        log = self.tmp / "logs" / f"{label}.out"
        env = self.env | {"PYTHONUNBUFFERED": "1"}
        argv = self.pinned(
            self.target_core, [venv_python(), "-m", "segproxy", "serve", "--config", str(config)]
        )
        proc = self.procs.start(label, argv, cwd=data, log=log, env=env)
        deadline = time.monotonic() + deadline_s
        announced = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"segproxy exited with {proc.returncode}:\n{tail(log)}")
            announced = announced or "segproxy listening on" in log.read_text(errors="replace")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_request(port, "GET", "/healthz", timeout=1).status == 200:
                    return Target(label, port, proc, log, config)
            time.sleep(0.1)
        raise BenchError(
            f"segproxy did not answer GET /healthz with 200 within {deadline_s:.0f}s "
            f"(announced: {announced}):\n{tail(log)}"
        )


@dataclass
class Lineup:
    """Everything running for one bench: the upstream, the reference nginx, the target (segproxy
    or, for the self-test, a second nginx) and the durable segproxy-sqlite, if measured."""

    harness: Harness
    upstream: Target
    reference: Target
    target: Target
    durable: Target | None

    @property
    def targets(self) -> list[Target]:
        return [t for t in (self.target, self.durable) if t is not None]

    @property
    def ports(self) -> set[int]:
        return {self.upstream.port, self.reference.port, *(t.port for t in self.targets)}

    def pins(self) -> dict[str, dict[str, list[int]]]:
        """The CPU affinity of every process of every target, as applied."""
        return {
            t.label: {str(p): affinity(p) for p in pid_tree(t.proc.pid)}
            for t in (self.upstream, self.reference, *self.targets)
        }


def start_lineup(
    h: Harness, *, target: str, only: str | None, queue: str, startup_timeout: float
) -> Lineup:
    """Start the upstream, the reference and the targets, in that order."""
    upstream = h.start_upstream()
    reference = h.start_reference("reference")
    if target == "segproxy":
        measured = h.start_segproxy(startup_timeout, queue)
    else:
        measured = h.start_reference("target")
    # Durable ingest: a second segproxy (own port, own data dir, [queue] backend = "sqlite",
    # same upstream, same core), idle except during its own runs and their drains.
    durable: Target | None = None
    if target == "segproxy" and only in (None, "durable"):
        durable = h.start_segproxy(startup_timeout, "sqlite", label=DURABLE)
    return Lineup(h, upstream, reference, measured, durable)


def check_ingest(t: Target, body: bytes, head: list[tuple[str, str]]) -> dict[str, Any]:
    """One POST with a request shape's headers (http.client adds Host and Content-Length)."""
    headers = {k: v for k, v in head if k.lower() not in ("host", "content-length")}
    try:
        r = http_request(t.port, "POST", INGEST_PATH, body=body, headers=headers)
    except (OSError, http.client.HTTPException) as exc:
        return {"error": repr(exc)}
    return {"status": r.status, "body": r.body[:200].decode(errors="replace")}


def check_targets(
    targets: Sequence[Target],
    event: bytes,
    bundle: bytes,
    heads: dict[str, list[tuple[str, str]]],
    *,
    ingest_only: Sequence[Target] = (),
) -> dict[str, Any]:
    """One ingest POST per target and request shape, and a look at a script cache hit (except
    ingest_only ones: the durable proxy is only measured on ingest, so its cache and RSS stay
    as they are)."""
    report: dict[str, Any] = {}
    for t in [*targets, *ingest_only]:
        entry: dict[str, Any] = {}
        for shape, head in heads.items():
            body = event.replace(b"__MESSAGE_ID__", f"ajs-next-sanity-check-{shape}".encode())
            entry["ingest" if shape == "4-header" else f"ingest_{shape}"] = check_ingest(
                t, body, head
            )
        if t in ingest_only:
            report[t.label] = entry
            continue
        # Warm the cache (the first request fetches from the upstream), then look at a hit.
        script: dict[str, Any] = {}
        try:
            for _ in range(3):
                r = http_request(
                    t.port, "GET", SCRIPT_PATH, headers={"Accept-Encoding": BROWSER_ACCEPT_ENCODING}
                )
                time.sleep(0.1)
            enc = r.headers.get("content-encoding", "identity")
            script = {
                "status": r.status,
                "content_encoding": enc,
                "content_type": r.headers.get("content-type", ""),
                "wire_bytes": len(r.body),
                "cache_status": r.headers.get("x-cache-status", ""),
            }
            try:
                plain = decode_body(r.body, enc)
                script["decoded_bytes"] = len(plain)
                script["identical_to_upstream"] = plain == bundle
                # A proxy may prepend/patch a little (e.g. the CDN base): look for the tail.
                script["contains_bundle"] = bundle[-256:] in plain
            except Exception as exc:
                script["decode_error"] = repr(exc)
        except (OSError, http.client.HTTPException) as exc:
            script = {"error": repr(exc)}
        entry["script"] = script
        report[t.label] = entry
    return report
