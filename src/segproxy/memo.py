"""A bounded memo: remembers computed values until it holds ``limit`` of them, then starts over.

The hot paths remember small things they would otherwise compute per request (a decoded Basic
header, a CORS header list, a formatted second). Whatever a client sends can become a key, so
every memo is bounded; starting over when full (rather than evicting the least recently used)
costs nothing per hit, and a flood of distinct keys only costs recomputation.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    __slots__ = ("items", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a memo holds at least one value")
        self.limit = limit
        self.items: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self.items.get(key)

    def put(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` (forgetting everything first when full); returns it."""
        items = self.items
        if len(items) >= self.limit:
            items.clear()
        items[key] = value
        return value

    def __len__(self) -> int:
        return len(self.items)
