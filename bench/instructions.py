"""Instructions per request, counted by Valgrind's callgrind: an A/B of two commits that the
machine's load cannot blur.

Usage: .venv/bin/python bench/instructions.py --base REV [--requests N] [--queue sqlite|none]
       [--browser] [--top K]

Wall-clock ratios on a shared 2-core VM move by ±10% (bench/README.md, "Why ratios"); a
refactor that should cost nothing needs a finer ruler. This one runs segproxy (the working
tree, then REV checked out and built in a temporary git worktree) under callgrind, sends the
same fixed number of bench track events from 50 keep-alive connections, waits until the
upstream has every event (so the forwarder's work is counted too), and reads the instructions
executed by every thread of the proxy between the warm-up and that point. Instruction counts
are not time (cache misses and syscalls are not in them) but they are repeatable to well under
1% and they say where a change added work: ``--top`` lists the functions whose instructions per
request moved most between the two trees.

Rare, expensive work must be amortised over the window, or it lands in one run and not the
other: the garbage collector's full collection comes about once per 20,000 requests, a WAL
checkpoint once per few thousand. Hence 20,000 requests by default (about a minute under
callgrind); fewer is a smoke test, not a measurement. Even so, whether a full collection falls
in the window moves a run by about 1.5% (gcmodule.c and the *_traverse functions in ``--top``
say when it did): read differences under 2% as noise unless ``--top`` names code of ours.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.common import REPO, WRITE_KEY, venv_python
from harness.fixtures import track_event_template
from harness.processes import free_port

WARMUP = 2000
BROWSER_HEADERS = (  # what Chromium sends with analytics-next's POST (besides the basics)
    "Origin: https://shop.example.com\r\nReferer: https://shop.example.com/\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36\r\nAccept: */*\r\nAccept-Language: de-DE,de;q=0.9\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\nSec-Fetch-Site: cross-site\r\n"
    "Sec-Fetch-Mode: cors\r\nSec-Fetch-Dest: empty\r\n"
    'sec-ch-ua: "Chromium";v="126", "Not/A)Brand";v="8"\r\nsec-ch-ua-mobile: ?0\r\n'
    'sec-ch-ua-platform: "Linux"\r\n'
)


class Upstream:
    """Answers every request 200 {"success":true} and counts the events that reached it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.events = 0
        self._ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True).start()
        self._ready.wait(10)

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._ready.set()
        await server.serve_forever()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await r.readexactly(int(m.group(1))) if m else b""
                self.events += body.count(b'"messageId"')
                w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 16\r\n\r\n{"success":true}')
                await w.drain()


def requests(n: int, browser: bool) -> Iterator[bytes]:
    # sentAt at a whole second: the forwarder moves it forward by the event's wait, which
    # within the same second is a few string operations and across it a date computation;
    # real sentAts are spread over the second, so either tree would pay for the rare crossing
    # at random (a template at .950 crossed in one run and not the other: a 2% swing).
    template = track_event_template(dt.datetime.now(dt.UTC).replace(microsecond=0))
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    extra = BROWSER_HEADERS if browser else ""
    for i in range(n):
        body = template.replace(b"__MESSAGE_ID__", f"ajs-next-{i:032d}".encode())
        yield (
            f"POST /v1/t HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: text/plain\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


async def load(port: int, reqs: list[bytes], connections: int = 50) -> None:
    todo = iter(reqs)

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for req in todo:
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await r.readexactly(int(m.group(1)) if m else 0)
        w.close()

    await asyncio.gather(*(one() for _ in range(connections)))


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_for(cond: object, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(src: Path, args: argparse.Namespace, tmp: Path) -> tuple[float, dict[str, float]]:
    """Instructions per request for the tree whose ``src`` is given, and per function."""
    up = Upstream()
    port = free_port()
    data = tmp / f"data-{abs(hash(src))}"
    data.mkdir()
    (data / "segproxy.toml").write_text(
        f'listen = "127.0.0.1:{port}"\nlog_level = "warning"\n'
        f'[upstream]\napi = "http://127.0.0.1:{up.port}"\ncdn = "http://127.0.0.1:{up.port}"\n'
        f'[queue]\nbackend = "{args.queue}"\npath = "{data / "q.db"}"\n'
        f'[sources]\nwrite_keys = ["{WRITE_KEY}"]\n'
    )
    out = data / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    argv += [venv_python(), "-m", "segproxy", "serve", "--config", str(data / "segproxy.toml")]
    log = (data / "log").open("wb")
    proc = subprocess.Popen(argv, cwd=data, env={"PYTHONPATH": str(src)}, stdout=log, stderr=log)
    try:
        wait_for(lambda: healthy(port), "start")
        reqs = list(requests(WARMUP + args.requests, args.browser))
        asyncio.run(load(port, reqs[:WARMUP]))
        wait_for(lambda: up.events >= WARMUP, "warm-up delivery")
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(load(port, reqs[WARMUP:]))
        wait_for(lambda: up.events >= WARMUP + args.requests, "delivery")
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(60)
    dumps = sorted(data.glob("callgrind.out.*.1"))  # the dump after the measured load
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(dumps[-1], args.keep / f"callgrind.{src.parent.name}.out")
    return per_function(dumps[-1], args.requests)


def per_function(dump: Path, n: int) -> tuple[float, dict[str, float]]:
    text = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0.0
    funcs: dict[str, float] = {}
    for line in text.split("file:function", 1)[-1].splitlines():
        m = re.match(r"\s*([\d,]+)(?: \([^)]*\))?\s+(\S.*?)(?: \[.*\])?$", line)
        if not m:
            continue
        count = int(m.group(1).replace(",", ""))
        name = re.sub(r"^[^:]*/", "", m.group(2))  # build dirs differ: keep file:function
        funcs[name] = funcs.get(name, 0.0) + count / n
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
    total = int(m.group(1).replace(",", "")) / n if m else sum(funcs.values())
    return total, funcs


@contextlib.contextmanager
def base_tree(rev: str, tmp: Path) -> Iterator[Path]:
    wt = tmp / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(wt), rev],
                   check=True)  # fmt: skip
    try:
        subprocess.run([venv_python(), "scripts/build_native.py", "--require"], cwd=wt,
                       env={"PYTHONPATH": str(wt / "src"), "PATH": "/usr/bin:/bin"},
                       check=True, capture_output=True)  # fmt: skip
        yield wt / "src"
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)],
                       check=False)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare with (built here)")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--queue", choices=("sqlite", "none"), default="sqlite")
    p.add_argument("--browser", action="store_true", help="the browser-shaped request")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--keep", type=Path, help="copy the callgrind dumps into this directory")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="segproxy-ir-") as t:
        tmp = Path(t)
        with base_tree(args.base, tmp) as base_src:
            base, base_f = measure(base_src, args, tmp)
        head, head_f = measure(REPO / "src", args, tmp)
    shape = "browser-shaped" if args.browser else "4-header"
    print(f"instructions per request ({args.queue}, {shape}, {args.requests} requests)")
    print(f"  base {args.base}: {base:,.0f}")
    print(f"  working tree: {head:,.0f}")
    print(f"  ratio working tree / base: {head / base:.3f}")
    moved = sorted(set(base_f) | set(head_f), key=lambda k: head_f.get(k, 0) - base_f.get(k, 0))
    print("functions that moved most (instructions per request, base -> working tree):")
    for k in moved[: args.top] + moved[-args.top :]:
        b, h = base_f.get(k, 0.0), head_f.get(k, 0.0)
        if abs(h - b) >= 20:
            print(f"  {h - b:+9,.0f}  {b:9,.0f} -> {h:9,.0f}  {k[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
