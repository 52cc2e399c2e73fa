"""The I/O of ``segproxy check``: one HTTP exchange at a time, and one TLS handshake.

Synchronous stdlib HTTP (``http.client`` + ``ssl``): the check is a command an operator runs,
not the request path. Redirects are never followed: a redirect is something to report (a
browser drops a redirected ``POST``). Every exchange opens its own connection, as the first
request of a new visitor does, so a cache in front sees independent requests.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import ssl
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from segproxy.redact import redact_path

MAX_BODY = 16 * 1024 * 1024  # the largest answer read (analytics.min.js is a few hundred KB)
USER_AGENT = "segproxy-check (+https://github.com/segproxy)"


class Unreachable(Exception):
    """No HTTP answer at all: refused, reset, timed out, a name that does not resolve, or a
    TLS handshake that failed. The message says which, in a few words."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a proxy answers: scheme, host, port and the path prefix it is mounted under."""

    scheme: str
    host: str
    port: int
    prefix: str  # "" or "/seg": no trailing slash

    @property
    def authority(self) -> str:
        """``host[:port]`` as a browser sends it in ``Host`` (the default port left out)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def base(self) -> str:
        """``scheme://authority/prefix``: what every path is appended to."""
        return f"{self.scheme}://{self.authority}{self.prefix}"


def parse_origin(url: str) -> Origin:
    """An ``http(s)://host[:port][/prefix]`` URL, or ``ValueError`` saying what is wrong."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{url!r}: give the proxy's base URL, without query or user")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer: status, headers (names lower-case, repeated ones joined by ", "),
    the body (gzip or deflate undone) and what was asked."""

    method: str
    path: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    @property
    def shown(self) -> str:
        """The path as reports show it: a write key in it masked (a key is a secret in
        output that may be pasted into a ticket)."""
        return redact_path(self.path)


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """The system's trust store, or a PEM file of CAs (a private CA) instead."""
    return ssl.create_default_context(cafile=cafile)


def _connection(
    origin: Origin, timeout: float, context: ssl.SSLContext | None
) -> http.client.HTTPConnection:
    if origin.scheme == "https":
        return http.client.HTTPSConnection(
            origin.host, origin.port, timeout=timeout, context=context or tls_context(None)
        )
    return http.client.HTTPConnection(origin.host, origin.port, timeout=timeout)


def fetch(
    origin: Origin,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    *,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """``method`` ``origin.prefix + path`` on a new connection; raises :class:`Unreachable`."""
    conn = _connection(origin, timeout, context)
    sent = {"User-Agent": USER_AGENT, "Accept": "*/*", **(headers or {})}
    try:
        conn.request(method, origin.prefix + path, body=body, headers=sent)
        resp = conn.getresponse()
        raw = resp.read(MAX_BODY)
    except ssl.SSLError as tls_exc:
        raise Unreachable(f"TLS failed: {tls_exc.reason or tls_exc}") from tls_exc
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(_network_words(exc)) from exc
    finally:
        conn.close()
    joined: dict[str, str] = {}
    for name, value in resp.getheaders():
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    decoded = _decoded(raw, joined.get("content-encoding", ""))
    return Answer(method, path, resp.status, joined, decoded)


def _decoded(raw: bytes, encoding: str) -> bytes:
    try:
        if encoding.strip().lower() == "gzip":
            return gzip.decompress(raw)
        if encoding.strip().lower() == "deflate":
            return zlib.decompress(raw)
    except (OSError, EOFError, zlib.error):
        return b""
    return raw


def _network_words(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"the name does not resolve ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer in time"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the connection closed without an answer"
    return f"network error: {exc}"


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the TLS handshake showed: a verified certificate's expiry, or why it failed."""

    not_after: datetime | None  # None when the handshake or the verification failed
    error: str = ""
    subject: str = ""  # the names it is valid for (DNS and IP subjectAltNames), shortened


def certificate(origin: Origin, context: ssl.SSLContext, timeout: float = 10.0) -> Certificate:
    """Handshake with ``origin`` as a browser does (SNI, verified chain and name)."""
    try:
        with (
            socket.create_connection((origin.host, origin.port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=origin.host) as tls,
        ):
            peer = tls.getpeercert()
    except ssl.SSLCertVerificationError as bad:
        return Certificate(None, f"the certificate is not valid: {bad.verify_message}")
    except ssl.SSLError as tls_exc:
        return Certificate(None, f"the TLS handshake failed: {tls_exc.reason or tls_exc}")
    except OSError as exc:
        raise Unreachable(_network_words(exc)) from exc
    if not peer or "notAfter" not in peer:
        return Certificate(None, "the server showed no certificate")
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(peer["notAfter"])), UTC)
    sans: Any = peer.get("subjectAltName", ())
    names = [str(v) for kind, v in sans if kind in ("DNS", "IP Address")]
    return Certificate(expires, subject=", ".join(names[:4]))
