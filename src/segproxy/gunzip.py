"""Pure: the one gzip reader, for request bodies (ingest) and the CDN's answers alike.

It accepts only whole members and stops at the caller's bounds:

- **Whole members.** ``zlib`` alone returns what it could decode from a stream cut short,
  without an error. A member is whole when zlib reached its end (``eof``), which also means its
  trailer's CRC-32 and length matched. Bytes after a member must be another member (RFC 1952
  allows several).
- **Bounded output.** Never more than ``limit`` bytes are decoded, however small the input:
  a body of a few KB may decode to gigabytes.
- **Bounded members.** Each member costs a decompressor, however little it holds, so at most
  ``max_members`` are read (26,214 empty members in a 512 KB body once held the loop for
  185 ms).

A failure is a :class:`GzipError` whose ``reason`` says which bound or rule it broke; each
caller words it for its own audience (a client's ``400``, a CDN fetch that is not stored).
"""

from __future__ import annotations

import zlib

INVALID = "invalid"  # not gzip, or a damaged member (a bad CRC-32 too)
CUT_SHORT = "cut_short"  # a member without its end
TOO_LARGE = "too_large"  # more than ``limit`` bytes decoded
TOO_MANY_MEMBERS = "too_many_members"  # more than ``max_members`` members


class GzipError(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail  # zlib's own message, for INVALID


def gunzip(data: bytes, limit: int, max_members: int) -> bytes:
    """The bytes ``data`` decodes to: at most ``limit`` of them, from at most ``max_members``
    whole members; else :class:`GzipError`."""
    out: list[bytes] = []
    total = 0
    rest = data
    for _ in range(max_members):
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunk = d.decompress(rest, limit - total + 1)  # never 0: that means unbounded
        except zlib.error as exc:
            raise GzipError(INVALID, str(exc)) from exc
        total += len(chunk)
        if total > limit or d.unconsumed_tail:
            raise GzipError(TOO_LARGE)
        if not d.eof:
            raise GzipError(CUT_SHORT)
        out.append(chunk)
        rest = d.unused_data
        if not rest:
            return out[0] if len(out) == 1 else b"".join(out)
    raise GzipError(TOO_MANY_MEMBERS)
