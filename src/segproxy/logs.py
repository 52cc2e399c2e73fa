"""Logs for pipelines: the proxy's own log as text or JSON lines, and the optional access log.

``log_format = "json"``: each record is one JSON object on one line of stderr, with ``time``
(ISO-8601, UTC, milliseconds), ``level``, ``logger``, ``message``, and any structured fields the
code passes (``extra=``); an exception's traceback is in ``exception``.

``access_log``: one JSON line per request answered (``AccessLog``), off by default. Off, the
edge pays one ``is not None`` check per request. On, the lines of one round of the event loop
are written together, with one ``write`` and one ``flush``. A line never holds an event body,
a query string or a whole write key: the path is the request's without its query, with a write
key in a CDN path masked (``redact.redact_path``), cut at 256 characters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from segproxy.clients import Network, client_ip
from segproxy.config import Config, ConfigError
from segproxy.counters import ROUTE_CLASSES
from segproxy.edge.http import Request, Response
from segproxy.redact import redact_path

log = logging.getLogger("segproxy")

# A LogRecord's own attributes: whatever else a record carries came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_PATH_CHARS = 256


def iso_time(unix: float) -> str:
    """``2026-12-07T02:00:15.123Z``."""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


class AccessLog:
    """Writes one JSON line per answered request to ``stream``, once per round of the loop."""

    def __init__(self, stream: IO[bytes], trusted: Sequence[Network], owned: bool = False) -> None:
        self.stream = stream
        self.trusted = trusted
        self.owned = owned  # a file we opened (closed with us), not stdout/stderr
        self.pending: list[bytes] = []
        self.failed = False

    def answered(self, req: Request, resp: Response, seconds: float) -> None:
        """The edge's hook (``EdgeServer(on_answer=...)``), once per answer."""
        status = resp.status
        sent = 0 if req.method == "HEAD" or status in (204, 304) else len(resp.body)
        line = {
            "time": iso_time(_now()),
            "route": ROUTE_CLASSES[req.route_class],
            "method": req.method,
            "path": redact_path(req.target.split("?", 1)[0])[:_PATH_CHARS],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client_ip": client_ip(req.peer, req.headers, self.trusted),
            "bytes_in": len(req.body),
            "bytes_out": sent,
        }
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(orjson.dumps(line))

    def flush(self) -> None:
        if not self.pending:
            return
        data = b"\n".join(self.pending) + b"\n"
        self.pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # a full disk, a closed pipe: say so once
            if not self.failed:
                self.failed = True
                log.error("cannot write the access log: %s", exc)
            return
        self.failed = False

    def close(self) -> None:
        self.flush()
        if self.owned:
            self.stream.close()


def _now() -> float:
    return datetime.now(UTC).timestamp()


def open_access_log(config: Config) -> AccessLog | None:
    """The configured access log, or None when it is off. A file is opened for appending
    (created ``0600``: it holds client addresses), and must be, at start."""
    where = config.access_log
    if where == "off":
        return None
    if where in ("stdout", "stderr"):
        stream = sys.stdout.buffer if where == "stdout" else sys.stderr.buffer
        return AccessLog(stream, config.trusted_proxies)
    try:
        fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(
            "access_log", where, f"a file segproxy can append to ({exc.strerror})"
        ) from None
    return AccessLog(os.fdopen(fd, "ab"), config.trusted_proxies, owned=True)
