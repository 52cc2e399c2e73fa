"""The shape of the code in src/: modules a newcomer can read, functions that fit on a screen.

The rules:

- no module is over ``MAX_MODULE_LINES`` (500) lines, counting every line;
- no function or method is over ``MAX_FUNCTION_LINES`` (60) lines, from its ``def`` line to its
  last line, not counting its docstring (explaining costs nothing here).

The exception is written where the reader needs it: a module or function whose own docstring
contains one of the ``MARKERS`` may be longer, and the rest of that sentence says why, e.g.::

    def data_received(self, data: bytes) -> None:
        \"\"\"... Long because this is the hot path (measured: one call per read, every branch
        inline; split, it costs a Python call per request).\"\"\"

``MARKERS`` are ``"Long because"`` and ``"(hot path"``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "segproxy"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MARKERS = ("Long because", "(hot path")


def says_why(node: ast.AST) -> bool:
    """True if the docstring of a module, class or function carries one of the MARKERS."""
    assert isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    doc = ast.get_docstring(node, clean=False) or ""
    return any(marker in doc for marker in MARKERS)


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end, less the docstring's."""
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
        and first.end_lineno is not None
    ):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method, nested ones included, with its qualified name."""
    out: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def too_long(name: str, source: str) -> list[str]:
    """What in one module breaks the rules without saying why: ``name`` and
    ``name::Qualified.function`` entries."""
    tree = ast.parse(source, name)
    found = []
    if len(source.splitlines()) > MAX_MODULE_LINES and not says_why(tree):
        found.append(name)
    for qualname, node in functions(tree):
        if function_lines(node) > MAX_FUNCTION_LINES and not says_why(node):
            found.append(f"{name}::{qualname}")
    return found


def src_modules() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def test_no_module_or_function_in_src_is_too_long_without_saying_why() -> None:
    found = [entry for name, text in src_modules().items() for entry in too_long(name, text)]
    assert found == []


def _function(lines: int, doc: str = "") -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 1))
    docstring = f'    """{doc}"""\n' if doc else ""
    return f"def f() -> None:\n{docstring}{body}"


def test_a_function_of_60_lines_passes_and_61_do_not() -> None:
    assert too_long("m.py", _function(60)) == []
    assert too_long("m.py", _function(61)) == ["m.py::f"]


def test_the_docstring_does_not_count() -> None:
    long_doc = "Why.\n" + "    more words\n" * 30
    assert too_long("m.py", _function(60, long_doc)) == []


@pytest.mark.parametrize("marker", MARKERS)
def test_a_docstring_with_a_marker_allows_a_long_function(marker: str) -> None:
    assert too_long("m.py", _function(61, f"{marker} it is measured.")) == []


def test_methods_and_nested_functions_are_named_and_counted() -> None:
    nested = "class C:\n    def m(self) -> None:\n" + "".join(
        "        " + line + "\n" for line in _function(61).splitlines()
    )
    assert too_long("m.py", nested) == ["m.py::C.m", "m.py::C.m.f"]


def test_a_module_of_500_lines_passes_and_501_do_not() -> None:
    assert too_long("m.py", "x = 1\n" * 500) == []
    assert too_long("m.py", "x = 1\n" * 501) == ["m.py"]
    assert too_long("m.py", '"""Long because it must."""\n' + "x = 1\n" * 500) == []
