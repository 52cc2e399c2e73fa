"""Shared pieces of the end-to-end tests: the fake upstreams, the proxy under test, a page server
on its own origin, and drivers for the node scripts in ``js/`` (real browser, real SDKs).

Every process started here is stopped by its own pid; nothing waits by sleeping: each wait
is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.support.fakes import REPO_ROOT, FakeSegment
from tests.support.proxy import RunningProxy, running_proxy

# Every e2e test runs on both delivery modes: the durable "sqlite" queue (the default) and
# "none" (each request forwarded synchronously). SEGPROXY_E2E_QUEUE narrows it to one.
QUEUE_BACKENDS: tuple[str, ...] = tuple(
    os.environ.get("SEGPROXY_E2E_QUEUE", "sqlite,none").split(",")
)


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


WRITE_KEY = "wk_e2e_5f3c9a1b7d2e4f60"
JS_DIR = Path(__file__).resolve().parent / "js"
NODE_MODULES = REPO_ROOT / "node_modules"
CHROMIUM = os.environ.get("SEGPROXY_CHROMIUM", "/usr/bin/chromium")


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run scripts/setup.sh")
    if not (NODE_MODULES / "@segment" / "analytics-next").is_dir():
        pytest.fail("node_modules is missing: run scripts/setup.sh (npm ci)")
    return node


def proxy_config(
    fake: FakeSegment, queue_backend: str = "sqlite", **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """A proxy config pointing at ``fake``; keyword arguments add or override sections."""
    config: dict[str, Any] = {
        "upstream": {"cdn": fake.cdn_url, "api": fake.api_url},
        "sources": {"write_keys": list(fake.settings)},
        "queue": {"backend": queue_backend},
    }
    for name, table in sections.items():
        config[name] = {**config.get(name, {}), **table}
    return config


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment([WRITE_KEY]) as f:
        yield f


@pytest.fixture
def proxy(fake: FakeSegment, tmp_path: Path, queue_backend: str) -> Iterator[RunningProxy]:
    """The proxy under test, in front of ``fake``. Its log is printed when the test ends."""
    with running_proxy(proxy_config(fake, queue_backend), tmp_path / "proxy") as p:
        try:
            yield p
        finally:
            print(f"--- segproxy log (pid {p.pid}) ---\n{p.logs()}")


# --------------------------------------------------------------------------------------------
# node scripts


def run_node(script: str, options: Mapping[str, Any], timeout: float = 90.0) -> Any:
    """Run ``js/<script>`` with ``options`` as its JSON argument; return its JSON output."""
    proc = subprocess.run(
        [node_binary(), str(JS_DIR / script), json.dumps(options)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise AssertionError(
            f"{script} printed no JSON\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        ) from exc


def render_snippet(write_key: str, host: str, scheme: str = "http") -> str:
    """The official snippet (npm @segment/snippet) loading the script from ``host``."""
    proc = subprocess.run(
        [
            node_binary(),
            str(JS_DIR / "snippet.mjs"),
            json.dumps({"writeKey": write_key, "host": host, "scheme": scheme}),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


class NodeScript:
    """A script of ``tests/e2e/js`` run by node: its options as JSON in argv, tagged JSON lines
    on stdout (``TAG {...}``), commands on stdin. ``expect(tag)`` waits for a tag with a
    deadline; a ``RESULT`` line before the awaited tag means the script failed."""

    def __init__(self, script: str, options: dict[str, Any]) -> None:
        self.script = script
        self.proc = subprocess.Popen(
            [node_binary(), str(JS_DIR / script), json.dumps(options)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self.seen: list[str] = []  # stdout lines read so far (shortened), for failure messages
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for t in self._pumps:
            t.start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def expect(self, tag: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.script}: no {tag} within {timeout}s; {self._debug()}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{self.script} ended before {tag}; {self._debug()}")
            self.seen.append(line[:2000])
            if line.startswith("RESULT ") and tag != "RESULT":
                raise AssertionError(f"{self.script} failed before {tag}: {line}")
            if line.startswith(tag + " "):
                result: dict[str, Any] = json.loads(line[len(tag) + 1 :])
                return result

    def _debug(self) -> str:
        return f"stdout: {''.join(self.seen)!r}\nstderr:\n{''.join(self._stderr)}"

    def send(self, line: str, *, last: bool = False) -> None:
        """One command line to the script (``last``: then its stdin closes)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            if last:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # The pumps reach EOF now that node is gone; close the pipes only after they did.
        for t in self._pumps:
            t.join(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BrowserRun(NodeScript):
    """``js/browser.mjs``: ``ready()`` once the page is done, ``finish()`` after.

    Between the two the browser stays open, so the test can wait for the events upstream
    (batched delivery flushes on a timer) before the page goes away.
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        if not Path(CHROMIUM).exists():
            pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh")
        options = {"url": url, "timeoutMs": int(timeout * 1000), "executablePath": CHROMIUM}
        super().__init__("browser.mjs", options)

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.expect("READY", timeout)

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        self.send("done", last=True)
        result = self.expect("RESULT", timeout)
        self.proc.wait(timeout=timeout)
        return result


# --------------------------------------------------------------------------------------------
# the page's own origin


class PageServer:
    """Serves test pages on 127.0.0.1:0, an origin of its own (not the proxy's)."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                outer.requests.append(self.path)
                html = outer.pages.get(path)
                body = (html or "not found").encode()
                self.send_response(200 if html is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # browsers drop keep-alive connections freely

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server
