"""Capture the request head a real browser sends with analytics.js's POST /v1/t.

Usage (from the repo root, after scripts/setup.sh; starts Debian chromium once):

    PYTHONPATH=$PWD/src:$PWD .venv/bin/python bench/capture_browser_request.py \
        > bench/fixtures/chromium-post-track.txt

It reuses the end-to-end test's pieces (tests/e2e): the fake Segment, segproxy as a
subprocess in front of it, a page on its own origin with the official snippet, and Chromium
driven by playwright-core. The snippet's host is a byte-for-byte TCP relay in front of the
proxy, so what is captured is what Chromium wrote on the socket (names, case, order, values),
not what a DevTools API reconstructs. The first POST /v1/t's head is printed as the bench
fixture (bench/README.md, "Request shapes"); Content-Length and Host are filled in per request
by bench/wrk/post_track.lua.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.e2e.conftest import (
    CHROMIUM,
    NODE_MODULES,
    WRITE_KEY,
    BrowserRun,
    PageServer,
    proxy_config,
    render_snippet,
)
from tests.support.fakes import FakeSegment
from tests.support.proxy import running_proxy

# One track call once analytics.js is ready; the page reports done after it was delivered.
PAGE_SCRIPT = """
window.__segproxyTest = {sent: [], done: false, errors: []};
analytics.ready(async function () {
  try {
    await window.analytics.track("Product Added", {sku: "G-32", price: 18.99});
  } catch (e) {
    window.__segproxyTest.errors.push(String(e));
  }
  window.__segproxyTest.done = true;
});
"""


class Relay:
    """127.0.0.1:<port> -> the proxy, keeping every byte each client connection sent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.streams: list[bytearray] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            seen = bytearray()
            with self._lock:
                self.streams.append(seen)
            threading.Thread(target=_pump, args=(client, upstream, seen), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, None), daemon=True).start()

    def heads(self, request_line: bytes) -> list[bytes]:
        """Every request head (up to the blank line) starting with ``request_line``."""
        with self._lock:
            data = [bytes(s) for s in self.streams]
        pattern = re.compile(re.escape(request_line) + rb".*?\r\n\r\n", re.DOTALL)
        return [m.group(0) for stream in data for m in pattern.finditer(stream)]

    def close(self) -> None:
        self._sock.close()


def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            if keep is not None:
                keep.extend(chunk)
            dst.sendall(chunk)
    # Either side closing ends both directions (the browser drops idle keep-alives freely).
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def page(relay_authority: str) -> str:
    snippet = render_snippet(WRITE_KEY, relay_authority, scheme="http")
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"<title>capture</title>\n<script>{snippet}</script>\n<script>{PAGE_SCRIPT}</script>\n"
        "</head><body></body></html>\n"
    )


def versions() -> tuple[str, str, str]:
    chromium = subprocess.run(
        [CHROMIUM, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()

    def npm(name: str) -> str:
        meta = json.loads((NODE_MODULES / name / "package.json").read_text())
        return str(meta["version"])

    return chromium, npm("@segment/analytics-next"), npm("playwright-core")


def capture() -> bytes:
    with FakeSegment([WRITE_KEY]) as fake, tempfile.TemporaryDirectory() as tmp:
        config = proxy_config(fake, "none")
        with running_proxy(config, Path(tmp) / "proxy") as proxy, PageServer() as pages:
            relay = Relay(proxy.port)
            try:
                pages.pages["/"] = page(f"127.0.0.1:{relay.port}")
                with BrowserRun(f"{pages.origin}/", timeout=30) as browser:
                    ready = browser.ready(timeout=40)
                    if not ready.get("ok") or ready["page"]["errors"]:
                        raise SystemExit(f"the page did not finish: {ready}")
                    fake.wait_for_events(2, timeout=20)  # the snippet's page() and the track
                    browser.finish()
                heads = relay.heads(b"POST /v1/t HTTP/1.1\r\n")
            finally:
                relay.close()
    if not heads:
        raise SystemExit("the browser sent no POST /v1/t through the relay")
    return heads[0]


def main() -> int:
    head = capture().decode("latin-1")
    chromium, ajs, playwright = versions()
    lines = head.rstrip("\r\n").split("\r\n")
    captured = dt.datetime.now(dt.UTC).date().isoformat()
    print("# The request head Chromium sent with analytics.js's POST /v1/t, byte for byte")
    print("# (header names, case, order and values; the body is the bench's own event).")
    print(f"# Browser: {chromium}, headless,")
    print(f"# driven by playwright-core {playwright}.")
    print(f"# SDK: @segment/analytics-next {ajs} (standard delivery, one event per request),")
    print("# loaded with the official snippet from a page on another origin (127.0.0.1, a")
    print("# second port, hence Sec-Fetch-Site: same-site), through segproxy. Captured on")
    print(f"# {captured} by bench/capture_browser_request.py with a TCP relay between the")
    print("# browser and the proxy. Authorization is the SDK's Basic auth of the e2e tests'")
    print("# write key (the key is in the body too, as writeKey).")
    print("# bench/wrk/post_track.lua sends these lines in this order, with Host set to the")
    print("# target, Content-Length to the body's length and Authorization to the bench's key.")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
