"""The CDN cache: bytes in memory, keyed by the *upstream path* only.

The key is the validated upstream path (routes.py) and nothing from the request's headers or
query, so no visitor-controlled value (Host, X-Forwarded-*, Accept-Encoding, cookies) can make
another visitor receive a different body. What varies per visitor is computed *from* an entry:
the content-encoding chosen from Accept-Encoding, and for settings the proxy's public origin
(memoised under the origin, in a bounded table separate from the entries).

Only 200 responses become entries: an error page is never stored as a good copy, and neither
is a broken body (:func:`gunzip_whole`: a gzip stream cut short or failing its CRC; a body
shorter than its ``Content-Length`` is already an error of the upstream client).

Settings are rendered per public origin from a template made once per fill; what one entry
may cost in renders is bounded by its :class:`OriginBook`.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import brotli

from segproxy.cdn.rewrite import SettingsTemplate
from segproxy.edge.http import Response
from segproxy.gunzip import CUT_SHORT, TOO_LARGE, TOO_MANY_MEMBERS, GzipError, gunzip
from segproxy.memo import Memo

COMPRESSIBLE = (b"javascript", b"json", b"text/", b"xml", b"svg")
MIN_COMPRESS = 256


@dataclass(slots=True)
class Representation:
    """What can be served for one body: identity plus precomputed encodings."""

    body: bytes
    content_type: bytes
    etag: str  # base tag, unquoted; per encoding we serve "<etag>", "<etag>-gz", "<etag>-br"
    gzip: bytes | None = None
    br: bytes | None = None
    fixed_encoding: bytes | None = None  # upstream-encoded bytes passed through as they are
    # The service's answers built from this representation, reused while it lives (see
    # CdnService._serve); they go with it when the cache drops it.
    answers: dict[tuple[object, ...], Response] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def size(self) -> int:
        return len(self.body) + len(self.gzip or b"") + len(self.br or b"")

    def tags(self) -> tuple[str, ...]:
        return (self.etag, self.etag + "-gz", self.etag + "-br")


class OriginBook:
    """The public origins one settings entry has been rendered for, and what that cost.

    A visitor chooses the ``Host`` (with ``public_hosts`` empty, any valid one is served), and
    each new one is a new rendering: at most ``max_origins`` renderings are kept (the least
    recently used is dropped first), and at most ``max_compressed`` of them are compressed per
    fill. Past that, a new origin is served its rendering uncompressed: still right, only
    larger, and as cheap as a copy (issue 11, item 7).
    """

    __slots__ = ("compressed", "max_compressed", "max_origins", "origins")

    def __init__(self, max_origins: int, max_compressed: int) -> None:
        self.max_origins = max_origins
        self.max_compressed = max_compressed
        self.origins: OrderedDict[str, None] = OrderedDict()
        self.compressed = 0

    def touch(self, origin: str) -> str | None:
        """Record a use of ``origin``; return the origin dropped to make room for it, if any."""
        if origin in self.origins:
            self.origins.move_to_end(origin)
            return None
        self.origins[origin] = None
        if len(self.origins) > self.max_origins:
            dropped, _ = self.origins.popitem(last=False)
            return dropped
        return None

    def may_compress(self) -> bool:
        return self.compressed < self.max_compressed

    def charge_compression(self) -> None:
        self.compressed += 1


RENDER_ORIGINS = 16  # renderings kept per settings entry
RENDER_COMPRESSIONS = 16  # renderings compressed per settings entry (per fill)


@dataclass(slots=True)
class Entry:
    raw: bytes  # the upstream body, content-decoded unless rep.fixed_encoding is set
    rep: Representation  # host-independent representation (settings: of the raw JSON)
    fetched_at: float
    ttl: float
    generation: int  # changes on every refill; part of memo keys
    template: SettingsTemplate | None = None  # settings that could be rewritten
    book: OriginBook = field(
        default_factory=lambda: OriginBook(RENDER_ORIGINS, RENDER_COMPRESSIONS),
        compare=False,
        repr=False,
    )

    @property
    def size(self) -> int:
        return len(self.raw) + self.rep.size + (self.template.size if self.template else 0)


class BrokenBody(ValueError):
    """The CDN's answer is not a whole, valid body: it never becomes an entry."""


MAX_GZIP_MEMBERS = 16  # per body from the CDN (RFC 1952 allows several; it sends one)


def gunzip_whole(data: bytes, limit: int) -> bytes:
    """Decode a gzip body, accepting only whole members, at most ``limit`` bytes out.

    ``zlib`` alone returns what it could decode from a stream cut short, without an error: a
    truncated script would be cached as a good copy (issue 11, item 6). The reader
    (``gunzip.py``) accepts whole members only, a few at most; anything else is a
    :class:`BrokenBody`.
    """
    try:
        return gunzip(data, limit, MAX_GZIP_MEMBERS)
    except GzipError as exc:
        raise BrokenBody(_broken_gzip(exc, len(data), limit)) from exc


def _broken_gzip(exc: GzipError, received: int, limit: int) -> str:
    """Why a gzip body from the CDN is not stored, for the log."""
    reason = exc.reason
    if reason == TOO_LARGE:
        return f"the gzip body decodes to more than {limit} bytes"
    if reason == CUT_SHORT:
        return f"the gzip stream is cut short ({received} bytes received)"
    if reason == TOO_MANY_MEMBERS:
        return f"more than {MAX_GZIP_MEMBERS} gzip members"
    return f"invalid gzip data: {exc.detail}"


def make_representation(
    body: bytes,
    content_type: bytes,
    *,
    fixed_encoding: bytes | None = None,
    brotli_quality: int = 11,
    etag: str | None = None,
) -> Representation:
    """Precompute gzip and brotli for compressible bodies (CPU-heavy: call off the loop).

    ``etag`` (unquoted) when the caller knows one already; else a hash of ``body``."""
    rep = Representation(body, content_type, etag or body_etag(body), fixed_encoding=fixed_encoding)
    if fixed_encoding is None and compressible(body, content_type):
        rep.gzip = gzip.compress(body, compresslevel=9, mtime=0)
        rep.br = brotli.compress(body, quality=brotli_quality)
    return rep


def body_etag(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12).hexdigest()


def compressible(body: bytes, content_type: bytes) -> bool:
    ctype = content_type.lower()
    return len(body) >= MIN_COMPRESS and any(t in ctype for t in COMPRESSIBLE)


def render_etag(base: str, *parts: str) -> str:
    """The tag of a body made from the body tagged ``base`` and ``parts`` (a settings rendering
    from its upstream settings and the origin): no need to hash the rendered bytes."""
    seed = "\x00".join((base, *parts)).encode()
    return hashlib.blake2b(seed, digest_size=12).hexdigest()


# Accept-Encoding value -> the codings it accepts. Bounded: arbitrary values cannot grow it.
_ACCEPTED: Memo[bytes, frozenset[bytes]] = Memo(256)


def accepted_encodings(header: bytes | None) -> frozenset[bytes]:
    """Codings from Accept-Encoding with q > 0; memoised, as browsers send a handful of values."""
    if not header:
        return frozenset()
    hit = _ACCEPTED.get(header)
    if hit is None:
        hit = _ACCEPTED.put(header, frozenset(_parse_accept_encoding(header)))
    return hit


def _parse_accept_encoding(header: bytes) -> set[bytes]:
    """``*`` matches only codings not named explicitly (RFC 9110 12.5.3)."""
    out: set[bytes] = set()
    refused: set[bytes] = set()
    wildcard = False
    for item in header.lower().split(b","):
        name, _, params = item.strip().partition(b";")
        q = 1.0
        for p in params.split(b";"):
            k, _, v = p.strip().partition(b"=")
            if k == b"q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        name = name.strip()
        if name == b"*":
            wildcard = q > 0
        elif q > 0:
            out.add(name)
        else:
            refused.add(name)
    if wildcard:  # "*" matches only the codings not named explicitly (RFC 9110 12.5.3)
        out.update({b"gzip", b"br"} - refused)
    return out


def choose(rep: Representation, accept_encoding: bytes | None) -> tuple[bytes, bytes | None, str]:
    """Return (body, content-encoding, etag) for a client."""
    if rep.fixed_encoding is not None:
        return rep.body, rep.fixed_encoding, rep.etag
    if rep.gzip is None and rep.br is None:
        return rep.body, None, rep.etag
    accepted = accepted_encodings(accept_encoding)
    if rep.br is not None and b"br" in accepted:
        return rep.br, b"br", rep.etag + "-br"
    if rep.gzip is not None and (b"gzip" in accepted or b"x-gzip" in accepted):
        return rep.gzip, b"gzip", rep.etag + "-gz"
    return rep.body, None, rep.etag


def not_modified(if_none_match: bytes | None, rep: Representation) -> bool:
    if not if_none_match:
        return False
    tags = set(rep.tags())
    for raw in if_none_match.decode("latin-1").split(","):
        tag = raw.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') in tags:
            return True
    return False


K = TypeVar("K")
V = TypeVar("V")


class LruBytes(Generic[K, V]):
    """An LRU map bounded by total size (``sizeof(value)``) and by entry count."""

    def __init__(self, max_bytes: int, max_items: int) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: K) -> V | None:
        hit = self.items.get(key)
        if hit is None:
            return None
        self.items.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V, size: int) -> None:
        self.pop(key)
        if size > self.max_bytes:
            return
        self.items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.items) > self.max_items:
            _, (_, old) = self.items.popitem(last=False)
            self.bytes -= old

    def pop(self, key: K) -> V | None:
        hit = self.items.pop(key, None)
        if hit is None:
            return None
        self.bytes -= hit[1]
        return hit[0]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held, without making it recently used."""
        return key in self.items
