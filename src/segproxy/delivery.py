"""Pure: talking to Segment's Tracking API, as both ways of delivering events do.

Events reach Segment either in batches (``forward/``, after the queue) or one request at a
time, relayed as they came (``ingest/`` with ``[queue] backend = "none"``). Both authorise a
request the same way and read Segment's answer the same way, so that much lives here, below
both (neither imports the other):

- **The request**: JSON, and HTTP Basic with the write key as the user and no password, as
  Segment's own libraries send it (:func:`api_headers`, :func:`basic_authorization`).
- **The answer**: only a ``2xx`` is a delivery (:func:`delivered`). An answer below 400 that is
  not a ``2xx`` (a redirect, a stray ``1xx``) is not Segment refusing or failing but the proxy
  pointed at the wrong address (:func:`misdirected`, :data:`MISDIRECTED`): an ``http://``
  ``upstream.api`` that redirects to ``https://``, a captive gateway, a load balancer. The
  proxy never follows it (it talks only to the configured origin).
- **The report**: every failure is named in a few words (:func:`fault`: "HTTP 503", "HTTP 301
  redirect to <Location>", "network: timeout"), for the log and ``segproxy queue stats``, and
  logged loudly but at most once per fault every 10 s (:class:`Throttle`, :func:`held_back`).

What the batch path does next (retry, split, dead-letter) is ``forward/retry.py``'s.
"""

from __future__ import annotations

import base64

Headers = list[tuple[bytes, bytes]]

LOCATION_SHOWN = 200  # characters of a Location kept in a fault (logs, queue stats)
REPORT_EVERY = 10.0  # seconds between two WARNINGs about the same fault
# What a redirect from the API means, for the WARNING that reports it.
MISDIRECTED = (
    "a configuration fault (is upstream.api an http:// address that redirects to https://?"
    " set it to the address it redirects to); not a delivery"
)
_JSON = (b"content-type", b"application/json")


def basic_authorization(write_key: str) -> bytes:
    """The ``Authorization`` value for a write key: ``Basic base64(writeKey + ":")``."""
    return b"Basic " + base64.b64encode(write_key.encode() + b":")


def api_headers(authorization: bytes | None) -> Headers:
    """The headers of a request to the API: JSON, and the ``Authorization`` value if any
    (a browser's metrics carry none)."""
    if authorization is None:
        return [_JSON]
    return [_JSON, (b"authorization", authorization)]


def delivered(status: int) -> bool:
    """Only a ``2xx`` is a delivery."""
    return 200 <= status < 300


def misdirected(status: int) -> bool:
    """An answer below 400 that is not a ``2xx``: the proxy's configuration fault (see above)."""
    return status < 400 and not 200 <= status < 300


def fault(status: int | None, location: bytes | None = None, error: str = "") -> str:
    """Why a delivery failed, in a few words: "HTTP 503", "HTTP 301 redirect to <Location>",
    "network: <error kind>" (``status`` None: no answer). Shown in logs and
    ``segproxy queue stats``."""
    if status is None:
        return f"network: {error or 'error'}"
    if 300 <= status < 400:
        if not location:
            return f"HTTP {status} redirect (no Location)"
        return f"HTTP {status} redirect to {printable(location, LOCATION_SHOWN)}"
    return f"HTTP {status}"


def printable(value: bytes, limit: int) -> str:
    """``value`` as text safe for one log line: control characters dropped, cut at ``limit``."""
    text = value[: limit * 4].decode("utf-8", "replace")
    clean = "".join(c for c in text if c.isprintable())
    return clean if len(clean) <= limit else clean[: limit - 1] + "\u2026"


class Throttle:
    """Loud but bounded: at most one log line per key (a fault) every ``every`` seconds.

    ``due(key, now)`` is None when the line is to be held back (and counted), else how many
    were held back since the key's last line. Remembers at most ``max_keys`` keys, so faults
    naming ever new Locations cannot grow it.
    """

    __slots__ = ("every", "held", "last", "max_keys")

    def __init__(self, every: float = REPORT_EVERY, max_keys: int = 256) -> None:
        self.every = every
        self.max_keys = max_keys
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def due(self, key: str, now: float) -> int | None:
        last = self.last.get(key)
        if last is not None and now - last < self.every:
            self.held[key] = self.held.get(key, 0) + 1
            return None
        if last is None and len(self.last) >= self.max_keys:
            self.last.clear()
            self.held.clear()
        self.last[key] = now
        return self.held.pop(key, 0)


def held_back(count: int) -> str:
    """The end of a throttled WARNING: how many like it were not logged."""
    return f" ({count} more like it in the last {REPORT_EVERY:.0f} s)" if count else ""
