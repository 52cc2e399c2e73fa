"""A raw-socket HTTP/1.1 client for tests that need exact bytes on the wire.

Real HTTP libraries normalise what they send (they would never send a CONNECT to a proxy path,
an absolute-form target, a `..` path, or trickle headers); these tests need to.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        encoding = self.header("content-encoding")
        body = self.body
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "br":
            import brotli

            body = brotli.decompress(body)
        return body.decode()


class Conn:
    """One TCP connection; read responses one at a time with a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete response before the deadline")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_response(self, head: bool = False, timeout: float | None = None) -> RawResponse:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise ConnectionError(f"connection closed; got {self.buf!r}")
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        _, status, *rest = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            key = k.strip().lower()
            headers[key] = f"{headers[key]}, {v.strip()}" if key in headers else v.strip()
        resp = RawResponse(int(status), rest[0] if rest else "", headers)
        code = resp.status
        if head or code in (204, 304) or 100 <= code < 200:
            return resp
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self._fill(deadline):
                    raise ConnectionError("connection closed mid-body")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            raise NotImplementedError("the proxy does not send chunked responses")
        else:
            while self._fill(deadline):
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the peer has closed (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self._fill(deadline):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_bytes(
    method: str,
    target: str,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    host_header: str | None = None,
) -> RawResponse:
    """One request on a fresh connection."""
    with Conn(host, port) as conn:
        authority = f"{host}:{port}" if host_header is None else host_header
        conn.send(request_bytes(method, target, authority, headers, body))
        return conn.read_response(head=method == "HEAD")


def gzip_bytes(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()
