"""Pure: what one check found (:class:`Verdict`), the mistakes it can name (:data:`FAULTS`),
and how an answer that is not a success reads (:func:`refusal`).

A fault id is stable (``--json`` carries it, scripts may branch on it) and docs/check.md
describes each one with its fix. The advice in a verdict is one line, written for the operator
who has to change a configuration, with the values the check saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from segproxy.check.probe import Answer

Status = Literal["pass", "fail", "warn", "skip"]

# id -> the mistake, in a few words (docs/check.md has the fix for each).
FAULTS: dict[str, str] = {
    "unreachable": "no HTTP answer (refused, reset, timed out, name unknown)",
    "tls_invalid": "the TLS certificate is not valid for this host",
    "tls_expiring": "the TLS certificate expires in less than 14 days",
    "host_forwarded": "the upstream refused the request (403): the visitor's Host was forwarded",
    "key_refused": "the proxy does not serve this write key",
    "not_found": "the path or the write key is unknown (404)",
    "redirect": "a GET was redirected",
    "post_redirected": "a request to the Tracking API (/v1/*) was redirected",
    "refused": "the proxy or the upstream refused the request",
    "not_analytics_js": "the script is not analytics.js",
    "bundles_from_segment": "bundles will load from cdn.segment.com, around the proxy",
    "settings_not_json": "the settings are not a JSON object",
    "settings_name_segment": "the settings name Segment's own API host, not the proxy",
    "settings_other_host": "the settings name another host (cached for another Host)",
    "settings_protocol": "the settings name the wrong protocol for the API",
    "cache_off": "the cache in front missed twice on the same bundle",
    "cache_keyed_on_headers": "the cache in front keys on viewer headers",
    "no_preflight": "the CORS preflight (OPTIONS) is not answered with a 2xx",
    "preflight_origin": "the preflight does not allow the page's origin",
    "preflight_methods": "the preflight does not allow POST",
    "preflight_headers": "the preflight does not allow authorization or x-retry-count",
    "retry_after_hidden": "Retry-After is not exposed to scripts",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """One check's result. ``fault`` is a key of :data:`FAULTS` (``""`` when none), ``advice``
    one line saying what to change, ``data`` the values a machine may want (``--json``)."""

    check: str
    status: Status
    detail: str
    fault: str = ""
    advice: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def passed(check: str, detail: str, **data: Any) -> Verdict:
    return Verdict(check, "pass", detail, data=data)


def failed(check: str, fault: str, detail: str, advice: str, **data: Any) -> Verdict:
    assert fault in FAULTS, fault
    return Verdict(check, "fail", detail, fault, advice, data)


def skipped(check: str, why: str) -> Verdict:
    return Verdict(check, "skip", why)


def unreachable(check: str, what: str, words: str, base: str) -> Verdict:
    return failed(
        check,
        "unreachable",
        f"{what}: {words}",
        f"make sure the proxy answers at {base} and nothing in between drops the request",
    )


def proxy_error(answer: Answer) -> tuple[str, str] | None:
    """segproxy's (and compatible) refusal body: ``{"success": false, "code", "message"}``."""
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("success") is False and isinstance(doc.get("code"), str):
        return doc["code"], str(doc.get("message", ""))
    return None


def _excerpt(answer: Answer) -> str:
    text = answer.body[:80].decode("utf-8", "replace").strip()
    return " ".join(text.split()) or "(empty body)"


def refusal(check: str, answer: Answer, base: str) -> Verdict | None:
    """The verdict on an answer that is not a ``2xx``, naming the mistake it most likely shows;
    ``None`` for a ``2xx``."""
    status = answer.status
    if 200 <= status < 300:
        return None
    what = f"{answer.method} {answer.shown} answered HTTP {status}"
    location = answer.header("location") or "(no Location)"
    if 300 <= status < 400 and answer.method in ("POST", "OPTIONS"):
        return failed(
            check,
            "post_redirected",
            f"{what} to {location}",
            "redirect only GET and HEAD (http to https), never /v1/*: Segment's clients drop a"
            " redirected POST; serve the API at the address the settings name",
        )
    if 300 <= status < 400:
        return failed(
            check,
            "redirect",
            f"{what} to {location}",
            "run the check on the address it redirects to, and use that one in the snippet",
        )
    return _refused(check, answer, what, base)


def _refused(check: str, answer: Answer, what: str, base: str) -> Verdict:
    ours = proxy_error(answer)
    if ours is not None and ours[0] == "write_key_not_allowed":
        return failed(
            check,
            "key_refused",
            f"{what}: {ours[1]}",
            "add the write key to the proxy's allowed keys (segproxy: [sources] write_keys)",
        )
    if ours is not None:
        return failed(
            check, "refused", f"{what} ({ours[0]}): {ours[1]}", "see the proxy's log for why"
        )
    if answer.status == 403:
        return failed(
            check,
            "host_forwarded",
            f"{what}: {_excerpt(answer)}",
            "send the upstream its own Host (cdn.segment.com, api.segment.io), not the"
            " visitor's: nginx without `proxy_set_header Host $host`, CloudFront without"
            " forwarding the Host or all viewer headers",
        )
    if answer.status == 404:
        return failed(
            check,
            "not_found",
            f"{what}",
            f"check the write key and the URL's path prefix ({base}): the upstream knows neither",
        )
    return failed(
        check, "refused", f"{what}: {_excerpt(answer)}", "see the proxy's and upstream's logs"
    )
