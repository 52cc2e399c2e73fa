"""The request and response values handlers see; no sockets here.

Header names are lower-case bytes. A repeated header is joined with ", " (RFC 9110 5.3), except
``Host``, which the edge refuses to receive twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

import orjson

Headers = list[tuple[bytes, bytes]]

# Headers on every response: no MIME sniffing, and no server banner (we never send Server).
SECURITY_HEADERS: Headers = [(b"x-content-type-options", b"nosniff")]


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[bytes, bytes]
    body: bytes
    peer: str
    scheme: str  # "http" or "https": how the client reached us
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""


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
