"""The compiled request path (mypyc): the suite runs it, and only a build of the exact source
on disk ever runs; otherwise segproxy runs as plain Python, with the reason in its log."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from segproxy import __version__, native
from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import basic, track
from tests.support.proxy import RunningProxy, operator_env

SRC = Path(native.__file__).resolve().parent.parent
PROBE = (
    "import segproxy.native as n, segproxy.edge.server as s, segproxy.queue.sqlite as q\n"
    "print(n.describe()); print(s.__file__); print(q.__file__)"
)
PLAIN = os.environ.get("SEGPROXY_NATIVE") == "0"
needs_build = pytest.mark.skipif(
    PLAIN or not native.built(), reason="plain Python run (SEGPROXY_NATIVE=0 or not compiled)"
)


def probe(src: Path, **env: str) -> list[str]:
    """How a fresh interpreter importing segproxy from ``src`` runs: [describe(), files...]."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**operator_env(), "PYTHONPATH": str(src), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def said(proxy: RunningProxy, line: str) -> None:
    """The proxy logs ``line`` (right after it starts listening: poll for it)."""
    proxy.logged(re.escape(line))


@pytest.fixture
def src_copy(tmp_path: Path) -> Path:
    """A copy of src/ with its build (a digest covers content, not paths: it still matches)."""
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@needs_build
def test_the_suite_runs_the_compiled_build(proxy: RunningProxy) -> None:
    how, server, queue = probe(SRC)
    assert how == "compiled with mypyc"
    assert not server.endswith(".py") and not queue.endswith(".py")
    said(proxy, "INFO segproxy: segproxy runs compiled with mypyc")


@pytest.mark.skipif(not PLAIN, reason="only in the plain Python run (SEGPROXY_NATIVE=0)")
def test_plain_python_runs_when_asked_for(proxy: RunningProxy) -> None:
    how, server, queue = probe(SRC)
    assert how == "plain Python: SEGPROXY_NATIVE=0"
    assert server.endswith(".py") and queue.endswith(".py")
    said(proxy, "INFO segproxy: segproxy runs plain Python: SEGPROXY_NATIVE=0")


@needs_build
def test_a_source_edited_after_the_build_runs_as_plain_python(src_copy: Path) -> None:
    assert probe(src_copy)[0] == "compiled with mypyc"
    routes = src_copy / "segproxy" / "routes.py"
    routes.write_text(routes.read_text() + "\n# edited after the build\n")
    how, server, queue = probe(src_copy)
    assert how == "plain Python: the source changed since it was compiled (run scripts/setup.sh)"
    # all or nothing: the untouched modules do not run compiled either
    assert server.endswith(".py") and queue.endswith(".py")


@needs_build
def test_a_proxy_on_an_edited_source_warns_that_it_runs_plain_python(
    src_copy: Path, fake: FakeSegment, start: StartProxy
) -> None:
    routes = src_copy / "segproxy" / "routes.py"
    routes.write_text(routes.read_text() + "\n# edited after the build\n")
    proxy = start(base_config(fake), env={"PYTHONPATH": str(src_copy)})
    said(
        proxy,
        "WARNING segproxy: segproxy runs plain Python: the source changed since it was compiled",
    )
    event = orjson.dumps(track("native-edited"))
    answer = Client(proxy).post("/v1/t", event, {"Authorization": basic(WRITE_KEY)})
    assert answer.status == 200
    assert [e.message_id for e in fake.wait_for_events(1)] == ["native-edited"]


@needs_build
def test_an_incomplete_build_is_not_used(src_copy: Path) -> None:
    native_ext = native.extension_path("queue/sqlite.py")
    (src_copy / native_ext.relative_to(SRC)).unlink()
    how, server, _ = probe(src_copy)
    assert how == "plain Python: the compiled build is incomplete (run scripts/setup.sh)"
    assert server.endswith(".py")


@needs_build
def test_SEGPROXY_NATIVE_0_runs_the_source(src_copy: Path) -> None:
    how, server, queue = probe(src_copy, SEGPROXY_NATIVE="0")
    assert how == "plain Python: SEGPROXY_NATIVE=0"
    assert server.endswith(".py") and queue.endswith(".py")


def test_version_says_how_it_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "segproxy", "--version"],
        env=operator_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == f"segproxy {__version__} ({probe(SRC)[0]})"
