"""Pure: request bytes -> a validated payload, or an :class:`IngestError` naming the problem.

Nothing here touches the network; a rejected request never reaches the upstream. The checks
mirror Segment's own (PROTOCOL.md): JSON object bodies, 32 KB per event, 500 KB per request,
2,500 events per batch; sizes are measured on the decompressed body.

Error tree::

    IngestError(status, code, message)
      400 bad_encoding / bad_gzip / invalid_json / invalid_utf8 / not_an_object /
          bad_batch / bad_event / event_too_large / request_too_large / too_many_events
      401 missing_write_key / bad_authorization
      403 write_key_not_allowed
      415 unsupported_media_type
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from segproxy.config import LimitsConfig
from segproxy.routes import API_ENDPOINTS

JSON_TYPES = (b"application/json", b"text/plain", b"application/x-json", b"text/json")


class IngestError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class Payload:
    endpoint: str  # "t", "batch", "m", ...
    doc: dict[str, Any]  # the request's JSON object (mutated by enrich)
    events: list[dict[str, Any]] = field(default_factory=list)  # references into doc
    write_key: str | None = None
    authorization: bytes | None = None  # the client's Basic header, when the key came from it


def decode_body(
    body: bytes,
    content_type: bytes | None,
    content_encoding: bytes | None,
    limits: LimitsConfig,
) -> bytes:
    """Check the media type, undo gzip (bounded), return the JSON bytes."""
    if content_encoding is None and content_type in JSON_SEEN:  # the usual request
        if len(body) > limits.max_request_bytes:
            raise _request_too_large(len(body), limits)
        return body
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media and media not in JSON_TYPES:
            raise IngestError(
                415,
                "unsupported_media_type",
                f"Content-Type {media.decode('latin-1')!r} is not accepted: "
                "send JSON as application/json or text/plain",
            )
    coding = (content_encoding or b"").strip().lower()
    if coding in (b"", b"identity"):
        data = body
    elif coding in (b"gzip", b"x-gzip"):
        data = _gunzip(body, limits.max_decompressed_bytes)
    else:
        raise IngestError(
            400,
            "bad_encoding",
            f"Content-Encoding {coding.decode('latin-1')!r} is not supported (use gzip)",
        )
    if len(data) > limits.max_request_bytes:
        raise _request_too_large(len(data), limits)
    if content_type is not None and len(JSON_SEEN) < 64:
        JSON_SEEN.add(content_type)  # accepted: the next one with it takes the fast path
    return data


# Content-Type values already accepted (the few each client library sends), bounded.
JSON_SEEN: set[bytes | None] = {None}


def _request_too_large(size: int, limits: LimitsConfig) -> IngestError:
    return IngestError(
        400,
        "request_too_large",
        f"request body is {size} bytes; the limit is {limits.max_request_bytes}",
    )


def _gunzip(body: bytes, limit: int) -> bytes:
    """Decode every gzip member (RFC 1952 allows several), never past ``limit`` bytes."""
    out: list[bytes] = []
    total = 0
    data = body
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunk = d.decompress(data, limit + 1 - total)
        except zlib.error as exc:
            raise IngestError(400, "bad_gzip", f"the gzip body is invalid: {exc}") from exc
        total += len(chunk)
        out.append(chunk)
        if total > limit or d.unconsumed_tail:
            raise IngestError(
                400,
                "request_too_large",
                f"the gzip body decompresses to more than {limit} bytes",
            )
        if not d.eof:
            raise IngestError(400, "bad_gzip", "the gzip body is truncated")
        data = d.unused_data
        if not data:
            return b"".join(out)


_AUTH_CACHE: dict[bytes, str | None] = {}


def write_key_from_auth(authorization: bytes | None) -> str | None:
    """HTTP Basic ``base64(writeKey + ":")``; other schemes carry the key in the body."""
    if not authorization:
        return None
    cached = _AUTH_CACHE.get(authorization)
    if cached is not None:
        return cached
    key = _decode_basic(authorization)
    if key is not None:
        if len(_AUTH_CACHE) >= 1024:  # bounded: a flood of distinct headers cannot grow it
            _AUTH_CACHE.clear()
        _AUTH_CACHE[authorization] = key
    return key


def _decode_basic(authorization: bytes) -> str | None:
    scheme, _, value = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise IngestError(
            401, "bad_authorization", "the Basic Authorization header is not valid base64"
        ) from exc
    key = decoded.split(":", 1)[0]
    return key or None


def parse(
    endpoint: str,
    data: bytes,
    authorization: bytes | None,
    limits: LimitsConfig,
    allowed_keys: frozenset[str],
) -> Payload:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower() or "surrogate" in str(exc).lower():
            raise IngestError(400, "invalid_utf8", f"the body is not valid UTF-8: {exc}") from exc
        raise IngestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise IngestError(400, "not_an_object", "the body must be a JSON object")
    payload = Payload(endpoint, doc)
    if endpoint == "m":
        return payload  # browser metrics: no write key, forwarded as they are

    key = write_key_from_auth(authorization)
    if key is not None:
        payload.authorization = authorization
    else:
        body_key = doc.get("writeKey")
        key = body_key if isinstance(body_key, str) and body_key else None
    if key is None:
        raise IngestError(
            401,
            "missing_write_key",
            "no write key: send HTTP Basic auth (writeKey as user) or writeKey in the body",
        )
    if allowed_keys and key not in allowed_keys:
        raise IngestError(403, "write_key_not_allowed", "this write key is not accepted here")
    payload.write_key = key

    if API_ENDPOINTS.get(endpoint) is None:  # b, batch, import
        batch = doc.get("batch")
        if not isinstance(batch, list):
            raise IngestError(400, "bad_batch", "a batch request needs a 'batch' array of events")
        if len(batch) > limits.max_batch_events:
            raise IngestError(
                400,
                "too_many_events",
                f"a batch holds at most {limits.max_batch_events} events, got {len(batch)}",
            )
        for i, event in enumerate(batch):
            if not isinstance(event, dict):
                raise IngestError(400, "bad_event", f"batch[{i}] is not a JSON object")
            if not isinstance(event.get("type"), str):
                raise IngestError(400, "bad_event", f"batch[{i}] has no 'type'")
            _check_event(event, f"batch[{i}]", limits, None)
        payload.events = batch
    else:
        _check_event(doc, "the event", limits, len(data))
        payload.events = [doc]
    return payload


def parse_single(
    data: bytes,
    authorization: bytes | None,
    limits: LimitsConfig,
    allowed_keys: frozenset[str],
    ip: str,
) -> tuple[dict[str, Any], str] | None:
    """The usual request on its fast lane: one event from a client seen before, enriched.

    The same checks and result as :func:`parse` then :func:`enrich` for a single-event
    endpoint, in one call, for a body of plain JSON (the caller has looked at its media type
    and encoding) whose Basic Authorization header is already known. Anything else returns
    None and takes the general path, which names the problem if there is one.
    """
    size = len(data)
    if size > limits.max_event_bytes or size > limits.max_request_bytes or not authorization:
        return None
    key = _AUTH_CACHE.get(authorization)  # filled by the general path's first request
    if key is None or (allowed_keys and key not in allowed_keys):
        return None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    ctx = doc.get("context")
    if ctx is None:
        doc["context"] = {"ip": ip}
    elif type(ctx) is dict:
        if not ctx.get("ip"):
            ctx["ip"] = ip
    else:
        return None
    return doc, key


def _check_event(event: dict[str, Any], where: str, limits: LimitsConfig, raw: int | None) -> None:
    ctx = event.get("context")
    if ctx is not None and not isinstance(ctx, dict):
        raise IngestError(400, "bad_event", f"{where}: 'context' must be an object")
    # A single event's raw size bounds its serialised size; only re-measure when it may be over.
    if raw is not None and raw <= limits.max_event_bytes:
        return
    try:
        size = len(orjson.dumps(event))
    except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson writes (255)
        raise IngestError(400, "bad_event", f"{where} cannot be re-encoded: {exc}") from exc
    if size > limits.max_event_bytes:
        raise IngestError(
            400,
            "event_too_large",
            f"{where} is {size} bytes; the limit is {limits.max_event_bytes} bytes per event",
        )


def enrich(payload: Payload, ip: str) -> None:
    """Set ``context.ip`` from the real client on every event that has none."""
    for event in payload.events:
        ctx = event.get("context")
        if ctx is None:
            event["context"] = {"ip": ip}
        elif not ctx.get("ip"):
            ctx["ip"] = ip
