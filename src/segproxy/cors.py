"""Pure: every CORS header the proxy sends, and the rules that choose them.

Browsers call the proxy from the site's own pages (analytics.js on the site's origin), so every
answer a page's script may read carries CORS headers, and the three kinds of answer differ:

- **The Tracking API** (:func:`for_api`, :func:`api_preflight`): a well-formed ``Origin`` is
  reflected (``null`` too: sandboxed frames), anything else is answered ``*``; never with
  credentials (analytics.js sends none: the write key is in the body or a Basic header the
  script sets). ``Retry-After`` and ``X-RateLimit-Reset`` are exposed, so that a script can
  honour a ``429`` or a ``503``. ``Vary: Origin`` since the answer depends on it.
- **The CDN** (:data:`FOR_CDN`, :data:`CDN_PREFLIGHT`): ``*`` for every origin: the script,
  settings and bundles are public (the settings' ``Vary`` is the CDN service's).
- **The edge's own refusals**, before any route is known (:data:`FOR_EDGE`: the memory budget's
  ``503``): ``*``, with ``Retry-After`` exposed.

The header lists returned are shared: callers copy them (``[*cors, ...]``), never mutate them.
"""

from __future__ import annotations

import re

from segproxy.edge.http import Headers
from segproxy.memo import Memo

ALLOW_HEADERS = b"authorization, content-type, x-retry-count"  # what analytics.js sends
EXPOSE_HEADERS = b"Retry-After, X-RateLimit-Reset"
MAX_AGE = b"86400"  # a day: browsers cap it lower anyway
_ORIGIN_RE = re.compile(rb"^(?:null|https?://[A-Za-z0-9.:\[\]-]{1,260})$")

_API_ANY: Headers = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", EXPOSE_HEADERS),
    (b"vary", b"Origin"),
]
# Origin header -> its CORS headers: a site's pages send one or two values. Bounded: a flood of
# made-up origins costs recomputation, not memory.
_API_SEEN: Memo[bytes, Headers] = Memo(1024)


def for_api(origin: bytes | None) -> Headers:
    """The Tracking API's CORS headers for a request's ``Origin``; the first is always
    ``access-control-allow-origin`` (the ingest service keys its answers on it)."""
    if origin is None:
        return _API_ANY
    cors = _API_SEEN.get(origin)
    if cors is None:
        allow = origin if _ORIGIN_RE.match(origin) else b"*"
        cors = _API_SEEN.put(
            origin,
            [
                (b"access-control-allow-origin", allow),
                (b"access-control-expose-headers", EXPOSE_HEADERS),
                (b"vary", b"Origin"),
            ],
        )
    return cors


def api_preflight(origin: bytes | None) -> Headers:
    """The headers of the Tracking API's answer to a preflight (``OPTIONS``)."""
    return [
        *for_api(origin),
        (b"access-control-allow-methods", b"POST, OPTIONS"),
        (b"access-control-allow-headers", ALLOW_HEADERS),
        (b"access-control-max-age", MAX_AGE),
    ]


FOR_CDN: Headers = [(b"access-control-allow-origin", b"*")]
CDN_PREFLIGHT: Headers = [
    *FOR_CDN,
    (b"access-control-allow-methods", b"GET, HEAD, OPTIONS"),
    (b"access-control-max-age", MAX_AGE),
]

FOR_EDGE: Headers = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", b"Retry-After"),
]

# What a browser's preflight for the Tracking API asks and reads, by name: `segproxy check`
# sends the same preflight to any proxy (ours or another) and judges its answer by these.
PREFLIGHT_ASKS_METHOD = "access-control-request-method"
PREFLIGHT_ASKS_HEADERS = "access-control-request-headers"
ALLOW_ORIGIN = "access-control-allow-origin"
ALLOW_METHODS = "access-control-allow-methods"
ALLOW_HEADERS_NAME = "access-control-allow-headers"
EXPOSE_HEADERS_NAME = "access-control-expose-headers"
