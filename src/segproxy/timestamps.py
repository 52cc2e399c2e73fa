"""Pure: ``sentAt`` timestamps: the shapes clients send, and analytics.js's own form.

ingest checks that a ``sentAt`` has a client's shape (:func:`valid_sent_at`); the forwarder
reads it and writes it back moved forward by the time the event waited (:func:`epoch`,
:func:`format_epoch`), always in analytics.js's form: ``2026-11-25T19:11:13.967Z``, 24
characters, UTC, milliseconds (:func:`js_form`). Most events arrive in that form, and the
events of one second share its first 19 characters, so each reader remembers the seconds it has
read (bounded memos) and handles the rest with a few string operations.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from segproxy.memo import Memo

JS_FORM_LENGTH = 24  # len("2026-11-25T19:11:13.967Z")
_SECONDS_KEPT = 4096  # seconds remembered per memo: more than a backlog's spread, bounded

# sentAt as Segment's libraries write it: an ISO 8601 / RFC 3339 date and time, the seconds,
# their fraction (1-9 digits) and the offset optional. analytics.js, analytics-node and the
# mobile SDKs write "2026-11-25T19:11:13.967Z"; analytics-python "...13.967123+00:00"; Go and
# .NET up to nine digits. Years 1000-2999: the forwarder moves it forward, which must not
# leave the years datetime can write. At most 35 characters.
_SENT_AT = re.compile(
    r"[12]\d{3}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])[Tt ](?:[01]\d|2[0-3]):[0-5]\d"
    r"(?::[0-5]\d(?:[.,]\d{1,9})?)?(?:Z|[+-](?:[01]\d|2[0-3])(?::?[0-5]\d)?)?",
    re.ASCII,
)


def js_form(value: str) -> bool:
    """Whether ``value`` is laid out like analytics.js's form (its digits not checked)."""
    return len(value) == JS_FORM_LENGTH and value[19] == "." and value[23] == "Z"


def is_ms(digits: str) -> bool:
    """Three ASCII digits (``str.isdigit`` alone also takes "²", which ``int`` refuses)."""
    return digits.isascii() and digits.isdigit()


# "YYYY-MM-DDTHH:MM:SS" of values in analytics.js's form that matched _SENT_AT.
_SHAPES_SEEN: Memo[str, bool] = Memo(_SECONDS_KEPT)


def valid_sent_at(value: str) -> bool:
    """The value is a timestamp of a shape clients send (:data:`_SENT_AT`)."""
    if js_form(value):
        if _SHAPES_SEEN.get(value[:19]) is not None:
            return is_ms(value[20:23])
        if _SENT_AT.fullmatch(value) is None:
            return False
        _SHAPES_SEEN.put(value[:19], True)
        return True
    return _SENT_AT.fullmatch(value) is not None


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 timestamp (UTC if it names no offset), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# "YYYY-MM-DDTHH:MM:SS" (UTC) -> unix seconds, for values in analytics.js's form read before.
_EPOCHS: Memo[str, float] = Memo(_SECONDS_KEPT)


def epoch(value: str) -> float | None:
    """Unix time of an ISO 8601 timestamp; analytics.js's own form without datetime."""
    # "2026-11-25T19:11:13.967Z": what analytics.js and most SDKs send; one per event here.
    if js_form(value) and is_ms(value[20:23]):
        second = _EPOCHS.get(value[:19])
        if second is None:
            parsed = parse_time(value[:19])
            if parsed is None:
                return None
            second = _EPOCHS.put(value[:19], parsed.timestamp())
        return second + int(value[20:23]) / 1000
    parsed = parse_time(value)
    return None if parsed is None else parsed.timestamp()


def known_second(value: str) -> bool:
    """Whether :func:`epoch` has read the second of ``value`` (its first 19 characters), which
    therefore parses: moving it within that second needs no datetime."""
    return _EPOCHS.get(value[:19]) is not None


_SECONDS: Memo[int, str] = Memo(_SECONDS_KEPT)  # whole second -> "YYYY-MM-DDTHH:MM:SS" (UTC)


def format_epoch(t: float) -> str:
    """Unix time ``t`` in analytics.js's form: ISO 8601 UTC with milliseconds and a Z.

    The forwarder formats one per event; events sent together share their second, so the
    date part comes from a memo and only the milliseconds are formatted each time.
    """
    # Microseconds first (absorbs float error), then truncated to milliseconds, like
    # datetime.isoformat(timespec="milliseconds"). The fraction is taken apart from the whole
    # seconds before it is scaled, as datetime does: t * 1e6 whole loses the last digit of a
    # far timestamp (2107-01-01T00:00:00.099999 came out .100).
    whole = math.floor(t)
    us = round((t - whole) * 1_000_000)
    second, ms = divmod(whole * 1000 + us // 1000, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        prefix = _SECONDS.put(second, text)
    return f"{prefix}.{ms:03d}Z"
