"""Pure retry policy of batch delivery: what to do with Segment's answer to a batch, and how
long to wait. (What an answer means and how a failure is named, which the passthrough shares,
is ``delivery.py``'s.)

Only a ``2xx`` is a delivery. The rest follows Segment's own clients (their retry rules),
except that they count any answer below 400 as success, and a proxy must not:

- ``2xx``: delivered (ACK).
- ``1xx``, ``3xx``: retried (RETRY). A redirect from the API is a configuration fault (an
  ``http://`` ``upstream.api`` that redirects to ``https://``, a captive gateway, a load
  balancer): the proxy does not follow it (it only ever talks to the configured origin), so the
  events stay queued until the fault is fixed, and the forwarder reports it loudly (a WARNING
  naming the status and ``Location``, and the fault in ``segproxy queue stats``).
- ``5xx`` except 501, 505, 511; ``408``, ``410``, ``429``, ``460``; network errors and
  timeouts: retried.
- every other ``4xx``, and 501, 505, 511: final (DEAD). A final refusal of a batch of several
  events that is about its events (:func:`splits`: not 401/403/404/405/407, which every event of
  the request shares) is split in halves until the refused events are found; only those become
  dead letters, with Segment's status and body, never silently dropped.

Backoff is "full jitter" (delay uniform in [0, min(cap, base * 2**attempt)]); a ``Retry-After``
from Segment is a floor under that delay. Every retry names its fault (``delivery.fault``):
"HTTP 503", "HTTP 301 redirect to <Location>", "network: timeout".
"""

from __future__ import annotations

import enum
import math
import random
from email.utils import parsedate_to_datetime

from segproxy.delivery import delivered

RETRYABLE_4XX = frozenset({408, 410, 429, 460})
FINAL_5XX = frozenset({501, 505, 511})
# Final refusals about the request itself, not the events in it: the credentials (the write key
# every event of the request shares) or the path. Splitting such a batch would only repeat the
# same refusal, up to 2n - 1 requests for n events.
NOT_SPLIT = frozenset({401, 403, 404, 405, 407})


class Action(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


def classify(status: int | None) -> Action:
    """``status`` None means a network error or timeout."""
    if status is None:
        return Action.RETRY
    if status < 400:
        return Action.ACK if delivered(status) else Action.RETRY
    if status >= 500:
        return Action.DEAD if status in FINAL_5XX else Action.RETRY
    return Action.RETRY if status in RETRYABLE_4XX else Action.DEAD


def splits(status: int | None) -> bool:
    """Whether a batch of several events refused with ``status`` is split to find the events
    Segment refuses (a final 4xx about the events), instead of dead-lettered whole."""
    return (
        status is not None
        and 400 <= status < 500
        and classify(status) is Action.DEAD
        and (status not in NOT_SPLIT)
    )


def parse_retry_after(value: bytes | str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if math.isnan(seconds) or seconds < 0:  # in the past
        return 0.0
    return seconds


def backoff(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 60.0,
    retry_after: float | None = None,
    max_retry_after: float = 3600.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next try after ``attempt`` failed tries (attempt >= 1)."""
    r = rng or random
    ceiling = min(cap, base * (2 ** min(max(attempt - 1, 0), 30)))
    delay = r.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_retry_after))
    return delay
