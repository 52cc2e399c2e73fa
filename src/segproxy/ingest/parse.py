"""Pure: request bytes -> a validated payload, or an :class:`IngestError` naming the problem.

Nothing here touches the network; a rejected request never reaches the upstream. The checks
mirror Segment's own (docs/architecture.md): JSON object bodies, 500 KB per request, 2,500
events per batch, measured on the decompressed body. Segment's 32 KB per event is checked
on the event as it will be sent, once the proxy has added to it (``ingest/prepare.py``).

What one request may cost is bounded here too: a write key is at most 256 bytes (it is stored
with every event and sent in a header), a gzip body has at most 16 members (each costs a
decompressor), and a ``sentAt`` must be a timestamp (the forwarder rewrites it per event).

Error tree::

    IngestError(status, code, message)
      400 bad_encoding / bad_gzip / too_many_gzip_members / invalid_json / invalid_utf8 /
          not_an_object / bad_batch / bad_event / bad_sent_at / write_key_too_long /
          request_too_large / too_many_events
          (and from prepare.py: event_too_large / merged_too_large)
      401 missing_write_key / bad_authorization
      403 write_key_not_allowed
      415 unsupported_media_type
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from segproxy.config import LimitsConfig
from segproxy.gunzip import CUT_SHORT, TOO_LARGE, TOO_MANY_MEMBERS, GzipError, gunzip
from segproxy.memo import Memo
from segproxy.routes import API_ENDPOINTS
from segproxy.timestamps import valid_sent_at

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
    size: int = 0  # the decompressed body's bytes (what the client sent, for prepare's bound)


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


# Gzip members decoded per body, at most. RFC 1952 allows several and real clients send one;
# each costs a decompressor whatever it holds, so 26,214 empty members in a 512 KB body once
# held the loop for 185 ms. A few are still read, for a client that appends members.
MAX_GZIP_MEMBERS = 16


def _gunzip(body: bytes, limit: int) -> bytes:
    """Decode the gzip members (at most :data:`MAX_GZIP_MEMBERS`), never past ``limit`` bytes."""
    try:
        return gunzip(body, limit, MAX_GZIP_MEMBERS)
    except GzipError as exc:
        raise _gzip_refusal(exc, limit) from exc


def _gzip_refusal(exc: GzipError, limit: int) -> IngestError:
    reason = exc.reason
    if reason == TOO_MANY_MEMBERS:
        return IngestError(
            400,
            "too_many_gzip_members",
            f"the gzip body has more than {MAX_GZIP_MEMBERS} members; send it as one",
        )
    if reason == TOO_LARGE:
        return IngestError(
            400, "request_too_large", f"the gzip body decompresses to more than {limit} bytes"
        )
    if reason == CUT_SHORT:
        return IngestError(400, "bad_gzip", "the gzip body is truncated")
    return IngestError(400, "bad_gzip", f"the gzip body is invalid: {exc.detail}")


# Basic Authorization header -> its write key (checked for length). Bounded: a flood of
# distinct headers cannot grow it.
_AUTH_CACHE: Memo[bytes, str] = Memo(1024)

# A write key's bytes, at most. Segment's are 32 characters; every event stores its key and
# the forwarder sends it in each request's Authorization header, so a longer one is refused
# before anything is stored (a 100 KB key once cost 120 MB of queue file for one request).
MAX_WRITE_KEY_BYTES = 256


def _check_key_length(key: str) -> None:
    size = len(key) if len(key) > MAX_WRITE_KEY_BYTES else len(key.encode())
    if size > MAX_WRITE_KEY_BYTES:
        raise IngestError(
            400,
            "write_key_too_long",
            f"the write key is {size} bytes; a write key is at most {MAX_WRITE_KEY_BYTES}",
        )


def write_key_from_auth(authorization: bytes | None) -> str | None:
    """HTTP Basic ``base64(writeKey + ":")``; other schemes carry the key in the body."""
    if not authorization:
        return None
    cached = _AUTH_CACHE.get(authorization)
    if cached is not None:
        return cached
    key = _decode_basic(authorization)
    if key is not None:
        _check_key_length(key)  # before the cache: the fast lane trusts what it holds
        _AUTH_CACHE.put(authorization, key)
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
    payload = Payload(endpoint, doc, size=len(data))
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
    _check_key_length(key)
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
        check_sent_at(doc.get("sentAt"), "the batch's sentAt")
        for i, event in enumerate(batch):
            if not isinstance(event, dict):
                raise IngestError(400, "bad_event", f"batch[{i}] is not a JSON object")
            if not isinstance(event.get("type"), str):
                raise IngestError(400, "bad_event", f"batch[{i}] has no 'type'")
            _check_event(event, f"batch[{i}]", f"batch[{i}].sentAt")
        payload.events = batch
    else:
        _check_event(doc, "the event", "the event's sentAt")
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
    None and takes the general path, which names the problem if there is one. (The event's
    size as it will be sent is checked by the caller, on the bytes it encodes anyway.)
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
    sent_at = doc.get("sentAt")
    if sent_at is not None and (type(sent_at) is not str or not valid_sent_at(sent_at)):
        return None
    if not stamp(doc, ip):
        return None
    return doc, key


def _check_event(event: dict[str, Any], where: str, sent_at_where: str) -> None:
    ctx = event.get("context")
    if ctx is not None and not isinstance(ctx, dict):
        raise IngestError(400, "bad_event", f"{where}: 'context' must be an object")
    check_sent_at(event.get("sentAt"), sent_at_where)


def check_sent_at(value: object, where: str) -> None:
    """A ``sentAt`` is absent, null, or a timestamp of a client's shape; else ``bad_sent_at``.

    The forwarder moves each event's sentAt forward by the time it waited, so a value that is
    not a timestamp would be sent as it came, and one of any length would be stored and sent
    with every event of its batch.
    """
    if value is None or (isinstance(value, str) and valid_sent_at(value)):
        return
    got = orjson.dumps(value[:40]).decode() if isinstance(value, str) else "not a string"
    raise IngestError(
        400,
        "bad_sent_at",
        f"{where} is not an ISO 8601 timestamp like 2026-01-01T00:00:00.000Z ({got})",
    )


def enrich(payload: Payload, ip: str) -> None:
    """Set ``context.ip`` from the real client on every event that has none (nor its batch),
    and a messageId.

    An event without a ``messageId`` (or with an empty or non-string one) gets a random one
    here, at accept time: it is stored with the event, so every retry and a resend after a
    crash carry the same one, and Segment de-duplicates on it.
    """
    # A batch's own context.ip stands for its events, as an event's own does: the client
    # said where they came from (and Segment would merge it into each).
    shared = payload.doc.get("context") if payload.doc.get("batch") is payload.events else None
    batch_ip = shared.get("ip") if isinstance(shared, dict) else None
    fill = batch_ip if batch_ip else ip
    for event in payload.events:
        stamp(event, fill)  # (parse() has checked that each context is an object)


def stamp(event: dict[str, Any], ip: object) -> bool:
    """Give one event the ``context.ip`` and ``messageId`` it lacks: the one place both are set,
    for the fast lane and the general path alike. False (and no messageId) when its
    ``context`` is not an object: the general path refuses that event.

    ``ip`` is the client's address, or a batch's own ``context.ip`` as the client sent it
    (any JSON value: it is the client's word, copied as it came, so not typed ``str``)."""
    ctx = event.get("context")
    if ctx is None:
        event["context"] = {"ip": ip}
    elif type(ctx) is dict:
        if not ctx.get("ip"):
            ctx["ip"] = ip
    else:
        return False
    mid = event.get("messageId")
    if type(mid) is not str or not mid:
        event["messageId"] = str(uuid.uuid4())
    return True
