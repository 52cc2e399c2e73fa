"""Pure retry policy: what to do with an upstream answer, and how long to wait.

Follows Segment's own clients (PROTOCOL.md "Client retry rules"): success is < 400; retried
are 5xx except 501, 505 and 511, and 408, 410, 429, 460, and network errors or timeouts; every other
4xx is final (dead-lettered with Segment's status and body, never silently dropped).
Backoff is "full jitter" (delay uniform in [0, min(cap, base * 2**attempt)]); a ``Retry-After``
from Segment is a floor under that delay.
"""

from __future__ import annotations

import enum
import math
import random
from email.utils import parsedate_to_datetime

RETRYABLE_4XX = frozenset({408, 410, 429, 460})
FINAL_5XX = frozenset({501, 505, 511})


class Action(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


def classify(status: int | None) -> Action:
    """``status`` None means a network error or timeout."""
    if status is None:
        return Action.RETRY
    if status < 400:
        return Action.ACK
    if status >= 500:
        return Action.DEAD if status in FINAL_5XX else Action.RETRY
    return Action.RETRY if status in RETRYABLE_4XX else Action.DEAD


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
