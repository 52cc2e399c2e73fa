"""Pure: a :class:`Report` as a person reads it (one line per check, ✓/✗, one line of advice
per fault) and as a machine does (``--json``, schema 1, described in docs/check.md)."""

from __future__ import annotations

import json
from typing import Any

from segproxy.check.run import TITLES, Report
from segproxy.redact import mask

SCHEMA = 1
MARKS = {"pass": "✓", "fail": "✗", "warn": "!", "skip": "-"}


def as_text(report: Report) -> str:
    o = report.options
    lines = [f"segproxy check {o.url.base} (write key {mask(o.write_key)})"]
    if o.api != o.url:
        lines[0] += f", API at {o.api.base}"
    for v in report.verdicts:
        lines.append(f"{MARKS[v.status]} {TITLES.get(v.check, v.check)}: {v.detail}")
        if v.advice:
            lines.append(f"    fix: {v.advice}")
    failed = sum(v.status == "fail" for v in report.verdicts)
    warned = sum(v.status == "warn" for v in report.verdicts)
    if not report.reached:
        lines.append("not reachable: nothing was checked")
    elif failed:
        lines.append(f"{failed} check{'s' if failed > 1 else ''} failed")
    else:
        lines.append("all checks passed" + (f" ({warned} warning)" if warned == 1 else ""))
        if warned > 1:
            lines[-1] = f"all checks passed ({warned} warnings)"
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    o = report.options
    return {
        "schema": SCHEMA,
        "url": o.url.base,
        "api": o.api.base,
        "write_key": mask(o.write_key),
        "dry_run": o.dry_run,
        "reached": report.reached,
        "ok": report.ok,
        "exit_code": report.exit_code,
        "checks": [
            {
                "id": v.check,
                "title": TITLES.get(v.check, v.check),
                "status": v.status,
                "detail": v.detail,
                "fault": v.fault or None,
                "advice": v.advice or None,
                "data": v.data,
            }
            for v in report.verdicts
        ],
    }


def as_json_text(report: Report) -> str:
    return json.dumps(as_json(report), indent=2, ensure_ascii=False)
