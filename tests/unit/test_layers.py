"""The layers point one way: the import graph of src/segproxy, checked against the arrows allowed.

The five rooms of the request and event paths are ``edge/`` (HTTP framing), ``ingest/`` (the
Tracking API), ``cdn/`` (Segment's CDN), ``queue/`` (the durable queue) and ``forward/`` (batch
delivery). Between them only these arrows are allowed; everything they share sits in top-level
modules below them (client addresses, CORS, talking to Segment's API, timestamps, gzip, host
names, the upstream pool, routing), and ``app.py`` wires them, imported by nobody but the
process that serves it.

Every import counts: at module level, inside functions (the CLI's lazy ones) and under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "segproxy"
ROOMS = ("edge", "ingest", "cdn", "queue", "forward", "dashboard")

# The HTTP types every layer may see: the request and response values, no sockets.
HTTP_TYPES = "segproxy.edge.http"

# room -> what it may import of the other rooms (a room, or one module of it).
ROOM_ARROWS: dict[str, frozenset[str]] = {
    "edge": frozenset(),
    "queue": frozenset(),
    "ingest": frozenset({HTTP_TYPES, "queue"}),  # answers are HTTP; accepted events are queued
    "cdn": frozenset({HTTP_TYPES}),
    "forward": frozenset({"queue"}),  # leases what the queue holds
    # The operator's dashboard: HTTP answers, the queue file's stats and dead letters (the
    # CLI's queue/admin.py), and an event's sentAt moved forward as the forwarder's batcher
    # sends it. Nothing imports it but the wiring (app.py).
    "dashboard": frozenset({HTTP_TYPES, "queue", "segproxy.forward.batcher"}),
}
# The wiring and the process around it: imported by nobody below them.
WIRING = {"segproxy.app": {"segproxy.serve"}, "segproxy.serve": {"segproxy.cli"}}
NOT_SHARED = ("segproxy.app", "segproxy.serve", "segproxy.cli", "segproxy.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """The segproxy modules ``path`` imports (``from segproxy import cors`` is segproxy.cors)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("segproxy"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("segproxy"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def allowed_between_rooms(source: str, target: str) -> bool:
    mine, theirs = room_of(source), room_of(target)
    if theirs is None or theirs == mine:
        return True
    if mine is None:  # a top-level module: only the HTTP types, unless it is the wiring
        return target == HTTP_TYPES or source in NOT_SHARED
    arrows = ROOM_ARROWS[mine]
    return theirs in arrows or target in arrows


def arrows() -> list[tuple[str, str]]:
    return [(s, t) for s, targets in graph().items() for t in sorted(targets)]


def test_the_graph_is_read() -> None:
    g = graph()
    assert "segproxy.ingest.service" in g
    assert "segproxy.edge.http" in g["segproxy.ingest.service"]
    assert "segproxy.cors" in g["segproxy.edge.framing"]  # a `from segproxy.x import y` arrow
    assert "segproxy.queue.admin" in g["segproxy.cli"]  # one inside a function


def test_no_upward_or_sideways_arrows_between_the_rooms() -> None:
    wrong = [f"{s} -> {t}" for s, t in arrows() if not allowed_between_rooms(s, t)]
    assert wrong == []


def test_the_wiring_is_imported_only_by_what_runs_it() -> None:
    wrong = [f"{s} -> {t}" for s, t in arrows() if t in WIRING and s not in WIRING[t] and s != t]
    assert wrong == []


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("segproxy.ingest.service", "segproxy.forward.retry", False),  # ingest -> forward
        ("segproxy.ingest.service", "segproxy.edge.server", False),  # only the HTTP types
        ("segproxy.ingest.service", "segproxy.edge.http", True),
        ("segproxy.ingest.service", "segproxy.queue.base", True),
        ("segproxy.cdn.service", "segproxy.edge.http", True),
        ("segproxy.cdn.service", "segproxy.ingest.parse", False),
        ("segproxy.cdn.service", "segproxy.queue.base", False),
        ("segproxy.forward.forwarder", "segproxy.queue.base", True),
        ("segproxy.forward.forwarder", "segproxy.ingest.prepare", False),
        ("segproxy.edge.server", "segproxy.ingest.service", False),
        ("segproxy.edge.server", "segproxy.queue.base", False),
        ("segproxy.queue.sqlite", "segproxy.forward.batcher", False),
        ("segproxy.clients", "segproxy.edge.server", False),  # shared modules stay below
        ("segproxy.cors", "segproxy.edge.http", True),
        ("segproxy.app", "segproxy.forward.forwarder", True),  # the wiring sees every room
        ("segproxy.edge.server", "segproxy.config", True),
    ],
)
def test_the_rule_itself(source: str, target: str, *, allowed: bool) -> None:
    assert allowed_between_rooms(source, target) is allowed


# ---------------------------------------------------------------------------------------------
# One place per concept: the words that only one module may say


@pytest.mark.parametrize(
    ("word", "home"),
    [
        ("access-control-", "segproxy/cors.py"),  # every CORS header
        ('b"Basic "', "segproxy/delivery.py"),  # the one Basic-auth builder
        ("decompressobj", "segproxy/gunzip.py"),  # the one gzip reader
        ('"%Y-%m-%dT', "segproxy/timestamps.py"),  # the one timestamp writer
    ],
)
def test_a_concept_lives_in_one_module(word: str, home: str) -> None:
    holders = sorted(
        str(p.relative_to(SRC)) for p in PACKAGE.rglob("*.py") if word in p.read_text()
    )
    assert holders == [home]
