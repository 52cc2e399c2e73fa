"""The request and response values handlers see, and the responses every layer shares; no
sockets here.

Header names are lower-case bytes. A repeated header is joined with ", " (RFC 9110 5.3), except
``Host``, which the edge refuses to receive twice.

The refusals more than one place gives are built here, once: the 413 for a body over
``limits.max_body_bytes``, the 503s for too many connections and for the memory budget, and the
429 of the rate limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson

Headers = list[tuple[bytes, bytes]]

# Headers on every response: no MIME sniffing, and no server banner (we never send Server).
SECURITY_HEADERS: Headers = [(b"x-content-type-options", b"nosniff")]


class Request:
    """One request as the edge read it (a plain class, not a dataclass: compiled, its
    constructor is native; a dataclass's generated ``__init__`` runs interpreted)."""

    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "method",
        "peer",
        "route_class",
        "scheme",
        "start",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[bytes, bytes],
        body: bytes,
        peer: str,
        scheme: str,  # "http" or "https": how the client reached us
        keep_alive: bool = True,
        start: float = 0.0,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.peer = peer
        self.scheme = scheme
        self.keep_alive = keep_alive
        # For the counters (counters.py): when its first byte was read (time.monotonic), and
        # what the app routed it to (counters.ROUTE_CLASSES; "rejected" until it is routed).
        self.start = start
        self.route_class = 0

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    """Treat as immutable once answered: the edge keeps its header bytes (``head``) for reuse."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    head: bytes | None = field(default=None, compare=False, repr=False)


# A stream's producer: called with a writer, it writes chunks until it returns; the writer
# answers False once the client is gone (or reads too slowly), and the producer then stops.
StreamWriter = Callable[[bytes], bool]


class Stream:
    """A response whose body is written as it is produced (server-sent events for the
    operator's dashboard), from a coroutine's result only: never on the ingest path.

    The edge writes the status and headers with ``connection: close`` (the body ends when the
    connection does), runs ``produce(write)`` as a task, and closes the connection when it
    returns; the task is cancelled when the client goes away or the server stops.
    """

    __slots__ = ("headers", "produce", "status")

    def __init__(
        self,
        status: int,
        headers: Headers,
        produce: Callable[[StreamWriter], Coroutine[Any, Any, None]],
    ) -> None:
        self.status = status
        self.headers = headers
        self.produce = produce


class Deferred:
    """A response that is not ready yet, resolved synchronously by whatever produces it.

    Cheaper than a Future on the hot path: no event-loop hop between the producer (an upstream
    response, a queue commit) and the edge writing the answer.
    """

    __slots__ = ("_callback", "_response")

    def __init__(self) -> None:
        self._response: Response | None = None
        self._callback: Callable[[Response], None] | None = None

    def resolve(self, response: Response) -> None:
        if self._response is not None:
            return  # first answer wins
        self._response = response
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(response)

    def then(self, callback: Callable[[Response], None]) -> None:
        if self._response is not None:
            callback(self._response)
        else:
            self._callback = callback

    @property
    def response(self) -> Response | None:
        """The response if already resolved, else None."""
        return self._response


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def json_response(status: int, payload: object, headers: Headers | None = None) -> Response:
    hdrs: Headers = [(b"content-type", b"application/json")]
    if headers:
        hdrs.extend(headers)
    return Response(status, hdrs, orjson.dumps(payload))


def error_response(
    status: int, code: str, message: str, headers: Headers | None = None
) -> Response:
    """Every rejection: the status plus a JSON body that names the problem."""
    return json_response(
        status, {"success": False, "code": code, "message": message}, headers=headers
    )


def body_too_large(limit: int) -> Response:
    """413: a request body over ``limits.max_body_bytes`` (declared, or as it arrives)."""
    return error_response(413, "body_too_large", f"request body is over {limit} bytes")


# Over ``limits.max_connections``: answered at accept, then the connection is closed.
TOO_MANY_CONNECTIONS = error_response(
    503,
    "too_many_connections",
    "the server has too many open connections; retry",
    [(b"retry-after", b"1")],
)


def server_busy(cors: Headers) -> Response:
    """503 over the memory budget for request bodies; ``cors`` (``cors.FOR_EDGE``) lets a
    browser's script read the ``Retry-After``."""
    return error_response(
        503,
        "server_busy",
        "the server is receiving too many request bodies at once; retry",
        [(b"retry-after", b"1"), *cors],
    )


def retry_after(wait: float) -> int:
    """Whole seconds for ``Retry-After``: rounded up, at least 1."""
    return max(1, math.ceil(wait))


def rate_limited(wait: float, what: str, headers: Headers) -> Response:
    """``429`` with ``Retry-After``; ``headers`` carries the route's CORS headers."""
    seconds = retry_after(wait)
    return error_response(
        429,
        "rate_limited",
        f"too many requests {what}; retry after {seconds} s",
        [*headers, (b"retry-after", str(seconds).encode()), (b"cache-control", b"no-store")],
    )
