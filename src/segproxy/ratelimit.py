"""Pure token buckets: one table per limit (client IP, write key), bounded in memory.

Each key has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second; a request
takes one token or is refused with the seconds until one is there. The clock is passed in
(``now``, any monotonic seconds), so the table never reads time itself and tests drive it.

The table keeps at most ``max_tracked`` buckets: the least recently used one is dropped to make
room, so a flood of distinct addresses costs bounded memory (a dropped key simply starts again
with a full bucket). Every call is O(1): one dict lookup and a move to the end of the order.

Client addresses are bucketed by :func:`client_bucket`: an IPv4 address on its own, an IPv6
address by its /64 (one subscriber or host usually holds a whole /64, so per-address buckets
would let it rotate addresses past the limit).

A rate of 0 turns a limit off; :func:`table` then returns None so the caller holds None and the
hot path pays one ``is not None`` check, nothing more. The 429 a refused request gets is built
with the other responses, in ``edge/http.py`` (``rate_limited``).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence

from segproxy.clients import Network, is_trusted


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TokenBuckets:
    """``allow(key, now)``: None when the request may pass, else the seconds to wait."""

    __slots__ = ("_buckets", "burst", "max_tracked", "rate")

    def __init__(self, rate: float, burst: float = 0.0, max_tracked: int = 100_000) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        if max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self.rate = rate
        # 0 = twice the rate; never below one token, or no request could ever pass.
        self.burst = max(burst if burst > 0 else 2.0 * rate, 1.0)
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def allow(self, key: str, now: float) -> float | None:
        rate = self.rate
        if rate <= 0:
            return None  # off (callers normally hold None instead of a table)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_tracked:
                buckets.popitem(last=False)
            buckets[key] = _Bucket(self.burst - 1.0, now)
            return None
        buckets.move_to_end(key)
        elapsed = now - bucket.stamp
        tokens = bucket.tokens
        if elapsed > 0:  # a clock that goes backwards refills nothing
            tokens = min(self.burst, tokens + elapsed * rate)
            bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return None
        bucket.tokens = tokens  # a refused request takes no token
        return (1.0 - tokens) / rate


def table(rate: float, burst: float, max_tracked: int) -> TokenBuckets | None:
    """The table for one limit, or None when the limit is off (rate 0)."""
    if rate <= 0:
        return None
    return TokenBuckets(rate, burst, max_tracked)


def client_bucket(ip: str) -> str:
    """The per-IP bucket of a client: the IPv4 address, or the /64 of an IPv6 one."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip  # not an address (a unix socket peer, say): its own bucket
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def exempt(ip: str, networks: Sequence[Network]) -> bool:
    """Whether ``ip`` is in one of the exempt networks (a non-address never is)."""
    return is_trusted(ip, networks)  # the same membership test as for trusted proxies
