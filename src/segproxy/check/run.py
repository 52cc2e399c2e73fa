"""``segproxy check URL``: ask a deployed proxy what a browser and the SDKs ask, in their order,
and collect one :class:`Verdict` per check (judged in ``judge.py``).

The order is a visitor's: TLS, the script, the settings, a bundle (and a cache in front, if
one says), then the Tracking API: the CORS preflight, the test event, ``Retry-After``. A check
whose input is missing (no script, so no bundle name) is skipped, not failed twice.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from segproxy import __version__, cors
from segproxy.check import judge
from segproxy.check.faults import Verdict, skipped, unreachable
from segproxy.check.probe import Answer, Origin, Unreachable, certificate, fetch, tls_context
from segproxy.delivery import basic_authorization

EVENT_NAME = "segproxy check"  # the test event's name, as an operator finds it in Segment
ORDER = ("tls", "api_tls", "script", "settings", "bundle", "cache")
ORDER_API = ("preflight", "event", "retry_after")
TITLES = {
    "tls": "TLS certificate",
    "api_tls": "TLS certificate of the API host",
    "script": "analytics.js loads",
    "settings": "settings name the proxy as API host",
    "bundle": "a bundle loads",
    "cache": "caching in front of the proxy",
    "preflight": "CORS preflight for the Tracking API",
    "event": "test event accepted",
    "retry_after": "Retry-After readable by browsers",
}


def another_visitor() -> dict[str, str]:
    """A visitor no cache has seen (a new one each run, so a second run is judged as the first
    was): nothing a cache should key a bundle on differs from the check's other requests."""
    visit = uuid.uuid4().hex[:12]
    return {
        "User-Agent": f"Mozilla/5.0 (segproxy check; visitor {visit})",
        "Accept-Language": "fr-FR,fr;q=0.9",
        "Cookie": f"segproxy_check={visit}",
    }


@dataclass(frozen=True, slots=True)
class Options:
    url: Origin
    api: Origin
    write_key: str
    page_origin: str  # the Origin a page on the site sends
    dry_run: bool = False
    cafile: str | None = None
    timeout: float = 10.0


@dataclass
class Report:
    options: Options
    verdicts: list[Verdict] = field(default_factory=list)
    reached: bool = True  # False: nothing answered at the URL, nothing was checked

    @property
    def ok(self) -> bool:
        return self.reached and all(v.status != "fail" for v in self.verdicts)

    @property
    def exit_code(self) -> int:
        """0: every check passed (warnings allowed); 1: a check failed; 2: unreachable."""
        if not self.reached:
            return 2
        return 0 if self.ok else 1


class _Session:
    """The probes of one run, sharing the TLS context and the options."""

    def __init__(self, options: Options) -> None:
        self.o = options
        https = options.url.scheme == "https" or options.api.scheme == "https"
        self.context: ssl.SSLContext | None = tls_context(options.cafile) if https else None

    def get(self, origin: Origin, path: str, headers: dict[str, str] | None = None) -> Answer:
        return fetch(origin, "GET", path, headers, timeout=self.o.timeout, context=self.context)

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Answer:
        return fetch(
            self.o.api, method, path, headers, body, timeout=self.o.timeout, context=self.context
        )


def run(options: Options, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Report:
    report = Report(options)
    session = _Session(options)
    try:
        if not _tls(session, report, now()):
            return _skip_rest(report, "not checked: the TLS certificate is not valid")
        script = session.get(options.url, f"/analytics.js/v1/{options.write_key}/analytics.min.js")
    except Unreachable as exc:  # the URL itself: nothing can be checked
        report.reached = False
        first = "tls" if options.url.scheme == "https" else "script"
        report.verdicts.append(unreachable(first, options.url.base, str(exc), options.url.base))
        return report
    _cdn(session, report, script)
    _api(session, report)
    return report


def _tls(session: _Session, report: Report, now: datetime) -> bool:
    """The certificate of each https host (the URL's, the API's if it is another): False when
    one is not valid (nothing else can be trusted over it)."""
    o = session.o
    hosts = [("tls", o.url)]
    if (o.api.host, o.api.port) != (o.url.host, o.url.port):
        hosts.append(("api_tls", o.api))
    for check, origin in hosts:
        if origin.scheme != "https" or session.context is None:
            continue
        try:
            cert = certificate(origin, session.context, o.timeout)
        except Unreachable as exc:
            if check == "tls":
                raise
            # The API's host alone: the CDN's checks still run; the API's report it again.
            report.verdicts.append(unreachable(check, origin.base, str(exc), origin.base))
            continue
        verdict = judge.judge_tls(cert, origin, now, check)
        report.verdicts.append(verdict)
        if verdict.fault == "tls_invalid":
            return False
    return True


def _skip_rest(report: Report, why: str) -> Report:
    done = {v.check for v in report.verdicts}
    for check in (*ORDER, *ORDER_API):
        if check not in done and check not in ("tls", "api_tls"):
            report.verdicts.append(skipped(check, why))
    return report


def _guarded(report: Report, check: str, base: str, probe: Callable[[], Verdict]) -> None:
    try:
        report.verdicts.append(probe())
    except Unreachable as exc:
        report.verdicts.append(unreachable(check, base, str(exc), base))


def _cdn(session: _Session, report: Report, script: Answer) -> None:
    o = session.o
    report.verdicts.append(judge.judge_script(script, o.url))
    settings_path = f"/v1/projects/{o.write_key}/settings"
    _guarded(
        report,
        "settings",
        o.url.base,
        lambda: judge.judge_settings(session.get(o.url, settings_path), o.url, o.api),
    )
    name = judge.bundle_name(script.body) if 200 <= script.status < 300 else None
    if name is None:
        why = "no script" if script.status >= 300 else "no bundle name in the script"
        report.verdicts.append(skipped("bundle", f"not checked: {why}"))
        report.verdicts.append(skipped("cache", "not checked: no bundle"))
        return
    path = f"/analytics-next/bundles/{name}"
    try:
        first = session.get(o.url, path)
    except Unreachable as exc:
        report.verdicts.append(unreachable("bundle", o.url.base, str(exc), o.url.base))
        return
    report.verdicts.append(judge.judge_bundle(first, o.url))
    if not 200 <= first.status < 300:
        report.verdicts.append(skipped("cache", "not checked: the bundle did not load"))
        return
    _guarded(
        report,
        "cache",
        o.url.base,
        lambda: judge.judge_cache(
            first, session.get(o.url, path), session.get(o.url, path, another_visitor())
        ),
    )


def _api(session: _Session, report: Report) -> None:
    o = session.o
    preflight: Answer | None = None
    try:
        preflight = session.send(
            "OPTIONS",
            "/v1/t",
            {
                "Origin": o.page_origin,
                cors.PREFLIGHT_ASKS_METHOD: "POST",
                cors.PREFLIGHT_ASKS_HEADERS: cors.ALLOW_HEADERS.decode(),
            },
            None,
        )
        report.verdicts.append(judge.judge_preflight(preflight, o.page_origin, o.api))
    except Unreachable as exc:
        report.verdicts.append(unreachable("preflight", o.api.base, str(exc), o.api.base))
    answer = preflight
    if o.dry_run:
        report.verdicts.append(skipped("event", "not sent: --dry-run"))
    else:
        answer = _event(session, report) or preflight
    if answer is None:
        report.verdicts.append(skipped("retry_after", "not checked: the API did not answer"))
    elif 300 <= answer.status < 400:  # said already; the redirect's headers are not the API's
        report.verdicts.append(skipped("retry_after", "not checked: the API redirects"))
    else:
        report.verdicts.append(judge.judge_retry_after(answer))


def _event(session: _Session, report: Report) -> Answer | None:
    o = session.o
    message_id = f"segproxy-check-{uuid.uuid4()}"
    body = event_body(o.write_key, message_id, o.url.base, datetime.now(UTC))
    headers = {
        "Origin": o.page_origin,
        "Content-Type": "text/plain",  # what analytics.js sends (no preflight for the type)
        "Authorization": basic_authorization(o.write_key).decode(),
    }
    try:
        answer = session.send("POST", "/v1/t", headers, body)
    except Unreachable as exc:
        report.verdicts.append(unreachable("event", o.api.base, str(exc), o.api.base))
        return None
    report.verdicts.append(judge.judge_event(answer, o.api, message_id))
    return answer


def event_body(write_key: str, message_id: str, url: str, at: datetime) -> bytes:
    """A track event an operator recognises in Segment's debugger: named "segproxy check",
    from the anonymous visitor "segproxy-check", saying which proxy sent it."""
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = {
        "type": "track",
        "event": EVENT_NAME,
        "anonymousId": "segproxy-check",
        "messageId": message_id,
        "properties": {"proxy": url},
        "context": {"library": {"name": "segproxy check", "version": __version__}},
        "timestamp": stamp,
        "sentAt": stamp,
        "writeKey": write_key,
    }
    return json.dumps(event).encode()
