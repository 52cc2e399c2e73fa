"""Every module that `segproxy serve` runs is compiled, or interpreted on purpose, with a reason.

The modules are found by walking the import graph from ``serve.py`` (which builds the App and
starts the edge) and ``app.py``: every ``import`` and ``from ... import`` of a ``segproxy``
module, at module level or inside a function (``queue.open_queue`` imports the configured
backend only when it opens it), and the packages around each module. Imports under
``if TYPE_CHECKING:`` never run and are left out. Each module found must be in
``native.COMPILED`` or in ``native.INTERPRETED``, except a package ``__init__.py`` with no code.
"""

from __future__ import annotations

import ast

import pytest

from segproxy import native

PACKAGE = native.PACKAGE
ROOTS = ("serve.py", "app.py")


def module_file(name: str) -> str | None:
    """``segproxy.edge.server`` -> ``edge/server.py`` (relative to the package), if it exists."""
    parts = name.split(".")
    if parts[0] != "segproxy":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(PACKAGE))
    if base.with_suffix(".py").is_file():
        return str(base.with_suffix(".py").relative_to(PACKAGE))
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.Module) -> set[str]:
    """The dotted module names a module's code imports (also a submodule named in
    ``from package import submodule``; a name that is no module is dropped later)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def with_packages(name: str) -> list[str]:
    """``segproxy.a.b`` -> its packages, then itself: importing it runs each __init__."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def run_time_modules(roots: tuple[str, ...] = ROOTS) -> set[str]:
    """The files (relative to the package) that importing the roots can run."""
    todo = [f"segproxy.{root.removesuffix('.py').replace('/', '.')}" for root in roots]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        for each in with_packages(name):
            path = module_file(each)
            if path is None or path in seen:
                continue
            seen.add(path)
            tree = ast.parse((PACKAGE / path).read_text(), path)
            todo.extend(n for n in imported_names(tree) if n.startswith("segproxy."))
    return seen


def runs_code(path: str) -> bool:
    """False for a module that is at most a docstring (an empty package marker)."""
    body = ast.parse((PACKAGE / path).read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def test_every_module_serve_runs_is_compiled_or_interpreted_with_a_reason() -> None:
    found = run_time_modules()
    unlisted = sorted(
        path
        for path in found
        if path not in native.COMPILED and path not in native.INTERPRETED and runs_code(path)
    )
    assert unlisted == [], (
        "add these to native.COMPILED (the request path) or to native.INTERPRETED with why"
    )


def test_the_walk_finds_the_request_path_and_the_lazily_imported_backends() -> None:
    found = run_time_modules()
    # imported inside open_queue(), only for the configured backend
    assert {"queue/sqlite.py", "queue/memory.py"} <= found
    assert {"edge/server.py", "app.py", "routes.py", "config/schema.py"} <= found
    assert "cli.py" not in found  # the CLI imports serve.py, not the other way round


def test_imports_under_type_checking_do_not_count() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import segproxy.routes\n"
        "if TYPE_CHECKING:\n"
        "    from segproxy.queue import admin\n"
        "def f() -> None:\n"
        "    from segproxy.queue.memory import MemoryQueue\n"
    )
    names = imported_names(tree)
    assert "segproxy.routes" in names
    assert "segproxy.queue.memory" in names
    assert "segproxy.queue.admin" not in names


@pytest.mark.parametrize("name", [*native.COMPILED, *native.INTERPRETED])
def test_every_listed_module_exists(name: str) -> None:
    assert (PACKAGE / name).is_file()


def test_no_module_is_both_compiled_and_interpreted() -> None:
    assert set(native.COMPILED).isdisjoint(native.INTERPRETED)
    assert all(reason.strip() for reason in native.INTERPRETED.values())


def test_no_module_is_listed_twice_which_would_fail_the_build() -> None:
    # mypyc refuses a module given twice ("Duplicate module"): the build would fail and
    # segproxy would run as plain Python everywhere.
    assert sorted(native.COMPILED) == sorted(set(native.COMPILED))


def test_the_hot_path_helpers_are_compiled() -> None:
    assert "memo.py" in native.COMPILED


def test_a_package_marker_without_code_needs_no_entry() -> None:
    markers = [p for p in run_time_modules() if p.endswith("__init__.py") and not runs_code(p)]
    assert "edge/__init__.py" in markers
    assert not runs_code("edge/__init__.py")
    assert runs_code("queue/__init__.py")
