"""Pure: each check's answers in, its :class:`Verdict` out. No sockets here: ``run.py`` asks,
these functions judge, so every mistake is tested from the answers that show it.

What "right" means is what analytics.js (analytics-next) and Segment's other clients do:

- the browser takes the CDN for its lazy bundles from ``window.analytics._cdn``, else from an
  ``https`` ``<script src>`` ending in ``/analytics.js/v1/...``, else ``https://cdn.segment.com``;
- it sends events to ``${protocol ?? "https"}://${apiHost}/t`` with both read from the
  settings' ``integrations["Segment.io"]`` (``apiHost`` defaults to ``api.segment.io/v1``);
- since 2026-04 it sends ``Authorization`` and, on retries, ``X-Retry-Count``, so every event
  is preceded by a CORS preflight that must allow both; it honours ``Retry-After`` only when
  the answer exposes it to scripts.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

from segproxy import cors
from segproxy.check.faults import Verdict, failed, passed, refusal
from segproxy.check.probe import Answer, Certificate, Origin

SEGMENT_CDN = "https://cdn.segment.com"
SEGMENT_API_HOSTS = ("segment.io", "segment.com", "segmentapis.com")
DEFAULT_API_HOST = "api.segment.io/v1"  # what analytics.js uses when settings name none
RENEW_DAYS = 14  # a certificate this close to expiry means its renewal is not running
# A line prepended to the script that sets the CDN (segproxy's does; so may others'), read in
# the script's first bytes only: analytics.js itself reads and writes ``_cdn`` much further on.
_SETS_CDN = re.compile(rb"\._cdn\s*=\s*(?:([\"'])([^\"']+)\1)?")
_PRELUDE_BYTES = 4096
# webpack's chunk file names in analytics-next: ({50:"ajs-destination",...}[t]||t)+".bundle."
# +{50:"40628baed746e9904edc",...}[t]+".js"
_CHUNK_NAMES = re.compile(rb"\(\{([^{}]*)\}\[\w+\]\|\|\w+\)\+\"\.bundle\.\"")
_CHUNK_HASHES = re.compile(rb"\"\.bundle\.\"\+\{([^{}]*)\}\[\w+\]\+\"\.js\"")
_PAIR = re.compile(rb"(\w+):\"([A-Za-z0-9_-]+)\"")


def judge_tls(cert: Certificate, origin: Origin, now: datetime, check: str = "tls") -> Verdict:
    advice = (
        f"install a certificate for {origin.host} from a CA browsers trust, with its"
        " intermediates (a private CA: pass --cafile)"
    )
    if cert.not_after is None:
        return failed(check, "tls_invalid", f"{origin.authority}: {cert.error}", advice)
    days = math.floor((cert.not_after - now).total_seconds() / 86400)
    data = {
        "host": origin.authority,
        "names": cert.subject,
        "not_after": cert.not_after.isoformat(),
        "days_left": days,
    }
    when = f"expires {cert.not_after:%Y-%m-%d} ({days} days)"
    if days < RENEW_DAYS:
        return failed(
            check,
            "tls_expiring",
            f"{origin.authority}: valid, but {when}",
            "renew it now and check its automatic renewal (ACME clients renew 30 days ahead)",
            **data,
        )
    return passed(check, f"{origin.authority}: valid, {when}", **data)


def cdn_base(script: bytes, origin: Origin) -> tuple[str | None, str]:
    """Where the browser will load bundles from, and why; ``None`` when it is Segment's CDN."""
    m = _SETS_CDN.search(script[:_PRELUDE_BYTES])
    if m is not None and m.group(2):
        base = m.group(2).decode("utf-8", "replace").rstrip("/")
        return (None if base == SEGMENT_CDN else base), "the script sets analytics._cdn"
    if m is not None:
        return origin.base, "the script sets analytics._cdn from its own URL"
    if origin.scheme == "https":
        return origin.base, "analytics.js reads it from the https script tag's URL"
    return None, "the script does not set analytics._cdn and its URL is not https"


def judge_script(answer: Answer, origin: Origin) -> Verdict:
    check = "script"
    bad = refusal(check, answer, origin.base)
    if bad is not None:
        return bad
    if b"analytics" not in answer.body:
        return failed(
            check,
            "not_analytics_js",
            f"{answer.shown} answered {len(answer.body)} bytes that are not analytics.js",
            "route /analytics.js/* to Segment's CDN (or to segproxy) unchanged",
        )
    base, why = cdn_base(answer.body, origin)
    size = f"{len(answer.body):,} bytes"
    if base is None:
        return Verdict(
            check,
            "warn",
            f"{size}; bundles will load from {SEGMENT_CDN}, not the proxy: {why}",
            "bundles_from_segment",
            f"set analytics._cdn = '{origin.base}' in the snippet before the script loads, or"
            " serve the proxy over https (segproxy's script sets it itself)",
            {"cdn_base": SEGMENT_CDN, "bytes": len(answer.body)},
        )
    return passed(
        check, f"{size}; bundles load from {base} ({why})", cdn_base=base, bytes=len(answer.body)
    )


def bundle_name(script: bytes) -> str | None:
    """A lazily loaded bundle's file name, read from the script's webpack chunk map."""
    hashes = _CHUNK_HASHES.search(script)
    if hashes is None:
        return None
    by_id: dict[bytes, bytes] = dict(_PAIR.findall(hashes.group(1)))
    names_match = _CHUNK_NAMES.search(script)
    names: dict[bytes, bytes] = dict(_PAIR.findall(names_match.group(1))) if names_match else {}
    # A named chunk (queryString, ajs-destination...) first: the one a reader recognises.
    for chunk_id in sorted(by_id, key=lambda c: c not in names):
        name = names.get(chunk_id, chunk_id)
        return f"{name.decode()}.bundle.{by_id[chunk_id].decode()}.js"
    return None


def judge_bundle(answer: Answer, origin: Origin) -> Verdict:
    bad = refusal("bundle", answer, origin.base)
    if bad is not None:
        return bad
    return passed("bundle", f"{answer.path}: {len(answer.body):,} bytes", path=answer.path)


def expected_api_host(api: Origin) -> str:
    """What the settings must name: ``host[:port]<prefix>/v1``, no scheme (analytics.js adds
    the protocol)."""
    return f"{api.authority}{api.prefix}/v1"


def _segment_io(doc: dict[str, Any]) -> dict[str, Any]:
    integrations = doc.get("integrations")
    sio = integrations.get("Segment.io") if isinstance(integrations, dict) else None
    return sio if isinstance(sio, dict) else {}


def judge_settings(answer: Answer, origin: Origin, api: Origin) -> Verdict:
    check = "settings"
    bad = refusal(check, answer, origin.base)
    if bad is not None:
        return bad
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return failed(
            check,
            "settings_not_json",
            f"{answer.shown} is not a JSON object",
            "route /v1/projects/*/settings to Segment's CDN (or segproxy) unchanged",
        )
    sio = _segment_io(doc)
    named = sio.get("apiHost") if isinstance(sio.get("apiHost"), str) else None
    want = expected_api_host(api)
    host = (named or DEFAULT_API_HOST).strip().rstrip("/").lower()
    if host == want.lower():
        return _judge_protocol(sio.get("protocol"), api, host)
    shown = named if named is not None else f"no apiHost (so {DEFAULT_API_HOST})"
    if any(host.split("/")[0].endswith(s) for s in SEGMENT_API_HOSTS):
        return failed(
            check,
            "settings_name_segment",
            f"settings name {shown}, Segment's own API, not {want}: events go around the proxy",
            f"ask Segment support to set this source's API host to {want}, or run segproxy,"
            " which rewrites it",
            api_host=named,
        )
    return failed(
        check,
        "settings_other_host",
        f"settings name {shown}, not {want}",
        "a cache in front served settings made for another Host: add the Host to its cache key"
        " or do not cache /v1/projects/*/settings (or pass --api if that is your API's address)",
        api_host=named,
    )


def _judge_protocol(protocol: object, api: Origin, host: str) -> Verdict:
    said = protocol if isinstance(protocol, str) and protocol else "https"  # analytics.js's
    if said != api.scheme:
        return failed(
            "settings",
            "settings_protocol",
            f"settings name {host} over {said}, but the API answers {api.scheme}",
            f'set integrations["Segment.io"].protocol to "{api.scheme}" (segproxy does)',
            api_host=host,
        )
    return passed("settings", f"settings name {host} ({said}) as apiHost", api_host=host)


def cache_state(answer: Answer) -> str | None:
    """``hit``, ``miss`` or ``None`` (no cache in front says), from the headers CloudFront,
    Cloudflare, Fastly, nginx (the ``X-Cache-Status`` convention) and HTTP's ``Age`` give."""
    for name in ("x-cache-status", "cf-cache-status", "x-cache", "x-proxy-cache"):
        value = answer.header(name).lower()
        if not value:
            continue
        last = value.split(",")[-1]  # Fastly: "MISS, HIT" (shield, edge): the edge's is last
        if "hit" in last:
            return "hit"
        if any(w in last for w in ("miss", "bypass", "dynamic", "expired")):
            return "miss"
    age = answer.header("age").strip()
    if age.isdigit() and int(age) > 0:
        return "hit"
    return None


_KEYED = ("*", "user-agent", "cookie", "accept-language", "referer")


def judge_cache(first: Answer, again: Answer, other: Answer) -> Verdict:
    """``first`` and ``again`` are the same request for a bundle; ``other`` is it again from
    another visitor (another User-Agent, language and cookie)."""
    check = "cache"
    vary = {v.strip().lower() for v in first.header("vary").split(",") if v.strip()}
    keyed = sorted(vary & set(_KEYED))
    advice_keyed = (
        "key the cache on the path only: forward no viewer headers (User-Agent, Cookie,"
        " Accept-Language) and no Vary on them for /analytics.js/*, /analytics-next/*"
    )
    if keyed:
        return failed(
            check,
            "cache_keyed_on_headers",
            f"bundles answer Vary: {first.header('vary')}: a shared cache keeps one copy per"
            " visitor, or none",
            advice_keyed,
        )
    states = (cache_state(first), cache_state(again), cache_state(other))
    data = {"states": list(states)}
    if states[1] is None:
        return passed(check, "no cache in front reports hits or misses", **data)
    if states[1] == "miss":
        return failed(
            check,
            "cache_off",
            f"the same bundle missed the cache twice ({first.header('x-cache-status') or 'miss'})",
            "cache GET /analytics.js/*, /analytics-next/* and /next-integrations/* by path,"
            " honouring the CDN's Cache-Control (bundles are immutable)",
            **data,
        )
    if states[2] == "miss":
        return failed(
            check,
            "cache_keyed_on_headers",
            "a repeat hit the cache, the same bundle for another visitor missed it",
            advice_keyed,
            **data,
        )
    return passed(check, "a cache in front serves the same bundle to every visitor", **data)


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


NEEDED_HEADERS = ("authorization", "x-retry-count")  # what analytics.js adds since 2026-04


def judge_preflight(answer: Answer, page_origin: str, api: Origin) -> Verdict:
    check = "preflight"
    if not 200 <= answer.status < 300:
        bad = refusal(check, answer, api.base)
        if bad is not None and bad.fault == "post_redirected":
            return bad
        return failed(
            check,
            "no_preflight",
            f"OPTIONS {answer.path} answered HTTP {answer.status}",
            "answer OPTIONS on /v1/* (or pass it to Segment, with Segment's own Host): without"
            " a 2xx preflight answer browsers send no events",
        )
    allowed_origin = answer.header(cors.ALLOW_ORIGIN).strip()
    if allowed_origin not in ("*", page_origin):
        return failed(
            check,
            "preflight_origin",
            f"the preflight allows origin {allowed_origin or '(none)'}, not {page_origin}",
            f"answer with Access-Control-Allow-Origin: {page_origin} (or *)",
        )
    methods = _tokens(answer.header(cors.ALLOW_METHODS))
    if methods and not methods & {"post", "*"}:
        return failed(
            check,
            "preflight_methods",
            f"the preflight allows {answer.header(cors.ALLOW_METHODS)}, not POST",
            "allow POST (Access-Control-Allow-Methods: POST, OPTIONS)",
        )
    headers = _tokens(answer.header(cors.ALLOW_HEADERS_NAME))
    # "*" allows any header but Authorization, which must be named (the Fetch standard).
    missing = [
        h
        for h in NEEDED_HEADERS
        if h not in headers and (h == "authorization" or "*" not in headers)
    ]
    if missing:
        return failed(
            check,
            "preflight_headers",
            f"the preflight does not allow {', '.join(missing)}",
            f"answer with Access-Control-Allow-Headers: {cors.ALLOW_HEADERS.decode()}"
            " (analytics.js sends Authorization, and X-Retry-Count on retries)",
        )
    return passed(check, f"allows POST with {', '.join(NEEDED_HEADERS)} from {page_origin}")


def judge_retry_after(answer: Answer) -> Verdict:
    """``answer``: the test event's (an actual answer is what browsers read exposure from), or
    the preflight's with ``--dry-run``."""
    exposed = _tokens(answer.header(cors.EXPOSE_HEADERS_NAME))
    where = f"{answer.method} {answer.path}"
    if "retry-after" in exposed or "*" in exposed:
        return passed("retry_after", f"{where} exposes Retry-After to scripts")
    return failed(
        "retry_after",
        "retry_after_hidden",
        f"{where} does not expose Retry-After (Access-Control-Expose-Headers:"
        f" {answer.header(cors.EXPOSE_HEADERS_NAME) or 'none'})",
        "add Access-Control-Expose-Headers: Retry-After to /v1/* answers, so browsers wait as"
        " told after a 429 or 503",
    )


def judge_event(answer: Answer, api: Origin, message_id: str) -> Verdict:
    bad = refusal("event", answer, api.base)
    if bad is not None:
        return bad
    return passed(
        "event",
        f'track "segproxy check" accepted (HTTP {answer.status}, messageId {message_id})',
        message_id=message_id,
    )
