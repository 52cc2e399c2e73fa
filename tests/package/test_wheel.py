"""A wheel built from a clean copy of the repository runs compiled, and a proxy started from a
fresh virtual environment it is installed in serves requests.

The build and install commands are the Dockerfile's own RUN steps, run here with sh outside
Docker (no engine runs where the tests do): what this test proves is what the image does. A
clean copy: the files git tracks or would track, nothing built (no .so, no manifest, no venv).

Slow (mypyc compiles the request path: a minute or two): marked ``package``; scripts/test runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.integration.conftest import WRITE_KEY, Client, base_config
from tests.package.dockerfile import ROOT, stages
from tests.support.fakes import FakeSegment
from tests.support.load import basic, track
from tests.support.proxy import operator_env, running_proxy

pytestmark = [pytest.mark.package, pytest.mark.timeout(1200)]

# This checkout's interpreter and pip stand for the image's `python`.
BIN = str(Path(sys.executable).parent)
NOT_FROM_HERE = ("PYTHONPATH", "SEGPROXY_NATIVE")  # the installed package runs, as it is


def clean_copy(target: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if name.split("/")[0] == "node_modules" or not source.is_file():
            continue  # (a developer's node_modules link; a file deleted but not yet staged)
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)
    return target


def docker_run(step: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """One Dockerfile RUN step, in sh as Docker runs it, with the stage's ARGs as variables."""
    clean = {k: v for k, v in operator_env().items() if k not in NOT_FROM_HERE}
    clean["PATH"] = f"{BIN}{os.pathsep}{clean.get('PATH', '')}"
    done = subprocess.run(
        ["sh", "-c", step],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert done.returncode == 0, f"{step}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def build_and_install(tmp: Path, build_env: dict[str, str] | None = None) -> Path:
    """The Dockerfile's build stage (the wheels), then its runtime install; the venv."""
    build, runtime = stages()
    source = clean_copy(tmp / "src")
    wheels, venv = tmp / "wheels", tmp / "venv"
    step = build.run_with("pip wheel")
    if build_env is not None:  # the plain Python case: what the build is asked, and pip -v
        step = step.replace("SEGPROXY_NATIVE=1 ", "").replace("pip wheel", "pip wheel -v")
    built = docker_run(step, source, WHEELS=str(wheels), **(build_env or {}))
    (tmp / "build.log").write_text(built.stdout + built.stderr)
    docker_run(runtime.run_with("pip install"), tmp, WHEELS=str(wheels), VENV=str(venv))
    return venv


def version(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "segproxy"), "--version"],
        env={k: v for k, v in operator_env().items() if k not in NOT_FROM_HERE},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return " ".join(done.stdout.split())  # (argparse wraps --version at the terminal's width)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_and_install(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_from_a_clean_copy_runs_compiled(compiled: Path) -> None:
    assert version(compiled) == "segproxy 0.1.0 (compiled with mypyc)"
    site = next((compiled / "lib").glob("python3*/site-packages"))
    assert (site / "segproxy" / "native.json").is_file()
    assert not (site / "segproxy" / "app.py").with_suffix(".json").exists()


def test_a_proxy_from_the_installed_wheel_serves_events(compiled: Path, tmp_path: Path) -> None:
    with (
        FakeSegment(write_keys=[WRITE_KEY]) as fake,
        running_proxy(
            base_config(fake),
            tmp_path,
            command=[str(compiled / "bin" / "segproxy")],
            drop=NOT_FROM_HERE,
        ) as proxy,
    ):
        proxy.logged(r"INFO segproxy: segproxy runs compiled with mypyc")
        event = orjson.dumps(track("from-the-wheel"))
        answer = Client(proxy).post("/v1/t", event, {"Authorization": basic(WRITE_KEY)})
        assert answer.status == 200
        assert [e.message_id for e in fake.wait_for_events(1)] == ["from-the-wheel"]


def test_without_a_c_compiler_the_wheel_is_plain_python_and_says_so(tmp_path: Path) -> None:
    venv = build_and_install(tmp_path, {"CC": str(tmp_path / "no-such-cc")})
    log = (tmp_path / "build.log").read_text()
    assert "segproxy: building plain Python (same behaviour, slower): no C compiler" in log
    assert version(venv) == (
        "segproxy 0.1.0 (plain Python: not compiled (no C compiler at install: see "
        "docs/deployment.md))"
    )
