"""Which modules run compiled, and the guard that only lets a build matching its source run.

The modules on the request path are compiled to C extensions with mypyc (the same typed
Python, ``mypy --strict`` clean, run without the interpreter loop): by ``setup.py`` when a wheel
is built (``pip install .``, ``pip wheel .``), and in a checkout by ``scripts/build_native.py``,
which ``scripts/setup.sh`` runs. Either way the extensions sit next to their ``.py`` files
(gitignored in a checkout), with a manifest of the source they were built from.

The compiled modules call each other directly, not through Python, so they run all together
or not at all. :func:`select` runs when ``segproxy`` is imported, before any of them: unless
the manifest matches the source byte for byte (and this interpreter), it makes every import
of a ``segproxy`` module load the ``.py`` file. An edited source tree therefore never runs a
stale build: it runs as plain Python until the next ``scripts/setup.sh`` (or install).
``SEGPROXY_NATIVE=0`` asks for plain Python on purpose (to compare, or to debug with Python tools).

This module is never compiled itself.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
MANIFEST = PACKAGE / "native.json"
GROUP = "segproxy_native"  # the build's shared library: <GROUP>__mypyc.<tag>.so, beside segproxy/
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this interpreter's: .cpython-311-...so

# The request path (edge, routing, ingest, queue, forwarder, CDN) and what it calls per
# request. Start-up, configuration and the CLI stay interpreted: nothing to gain there.
COMPILED = (
    "app.py",
    "routes.py",
    "counters.py",
    "ratelimit.py",
    "redact.py",
    "memo.py",
    "upstream.py",
    "hosts.py",
    "clients.py",
    "cors.py",
    "delivery.py",
    "gunzip.py",
    "timestamps.py",
    "edge/http.py",
    "edge/framing.py",
    "edge/server.py",
    "ingest/parse.py",
    "ingest/prepare.py",
    "ingest/service.py",
    "queue/base.py",
    "queue/memory.py",
    "queue/packs.py",
    "queue/ledger.py",
    "queue/schema.py",
    "queue/bookkeeping.py",
    "queue/runner.py",
    "queue/checkpoint.py",
    "queue/handover.py",
    "queue/files.py",
    "queue/journal_format.py",
    "queue/journal_recovery.py",
    "queue/journal.py",
    "queue/spill.py",
    "queue/sqlite.py",
    "forward/batcher.py",
    "forward/retry.py",
    "forward/forwarder.py",
    "cdn/cache.py",
    "cdn/rewrite.py",
    "cdn/service.py",
)

# The modules that `segproxy serve` imports (serve.py, app.py and what they import) but runs
# interpreted on purpose, and why. tests/unit/test_native_modules.py holds every such module to
# be in COMPILED or here: a new module on the request path is not left interpreted by accident.
# (A package's __init__.py with no code in it runs nothing and needs no entry.)
INTERPRETED: dict[str, str] = {
    "__init__.py": "runs select() before any other segproxy module is imported",
    "native.py": "chooses between the build and the source: it cannot be part of the build",
    "serve.py": "start-up and shutdown: event loop, listeners, signals",
    "config/__init__.py": "start-up: the configuration is read and validated once",
    "config/assemble.py": "start-up: the configuration is read and validated once",
    "config/environment.py": "start-up: the configuration is read and validated once",
    "config/loading.py": "start-up: the configuration is read and validated once",
    "config/schema.py": "start-up: the configuration is read and validated once; the request "
    "path reads its frozen dataclasses' attributes, as plain Python objects",
    "config/values.py": "start-up: the configuration is read and validated once",
    "queue/__init__.py": "start-up: opens the configured queue backend once",
    "queue/admin.py": "the operator's dashboard reads dead letters and stats with it, in a "
    "worker thread: never per request",
    "edge/stream.py": "a streamed answer's body (the dashboard's live updates): runs only "
    "while an operator watches",
    "dashboard/feed.py": "the dashboard's event ring: runs only while an operator watches",
    "dashboard/service.py": "the operator's dashboard: its page, its data, once a second",
    "logs.py": "log set-up at start; the access log is opt-in, and its JSON line costs more "
    "than the call to it",
    "certs.py": "start-up: the TLS certificate's expiry is read once",
    "exposition.py": "a scrape of /metrics, off the request path; prometheus-client is "
    "plain Python",
}

# What select() found: "compiled", or why the source runs instead.
state = "not selected yet"


def source_digest() -> str:
    """The compiled modules' source and the interpreter they were built for, as one hash."""
    h = hashlib.sha256(sys.implementation.cache_tag.encode())
    for name in COMPILED:
        h.update(b"\0" + name.encode() + b"\0")
        h.update((PACKAGE / name).read_bytes())
    return h.hexdigest()


def extension_path(name: str) -> Path:
    """Where the compiled form of a module (``edge/server.py``) lives."""
    return PACKAGE / (name.removesuffix(".py") + SUFFIX)


def built() -> list[Path]:
    """The compiled files present: the modules' and the group's shared library."""
    files = [extension_path(name) for name in COMPILED]
    files.append(PACKAGE.parent / (GROUP + "__mypyc" + SUFFIX))
    return [f for f in files if f.exists()]


def _matches() -> str:
    """'compiled' if the build on disk is whole and matches the source, else why not."""
    if os.environ.get("SEGPROXY_NATIVE", "") == "0":
        return "plain Python: SEGPROXY_NATIVE=0"
    present = built()
    if not present:
        return "plain Python: not compiled (no C compiler at install: see docs/deployment.md)"
    if len(present) != len(COMPILED) + 1:
        return "plain Python: the compiled build is incomplete (run scripts/setup.sh)"
    try:
        recorded = json.loads(MANIFEST.read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return "plain Python: the compiled build has no manifest (run scripts/setup.sh)"
    if recorded != source_digest():
        return "plain Python: the source changed since it was compiled (run scripts/setup.sh)"
    return "compiled"


class _SourceOnly:
    """A meta path finder that resolves ``segproxy`` modules to their ``.py`` files only."""

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("segproxy.") or path is None:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(
                entry,
                (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            )
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def select() -> None:
    """Let the compiled build load if it matches its source; otherwise load the source."""
    global state
    state = _matches()
    if state != "compiled" and _SourceOnly not in sys.meta_path:
        sys.meta_path.insert(0, _SourceOnly)


def describe() -> str:
    """How this process runs, for logs and ``segproxy --version``."""
    return "compiled with mypyc" if compiled() else state


def compiled() -> bool:
    """True if this process runs the compiled build (select() found it whole and exact; an
    extension that then failed to load would have stopped the import)."""
    return state == "compiled"
