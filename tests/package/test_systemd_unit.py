"""deploy/systemd/segproxy.service: verified by systemd-analyze, hardened, and its stop timeout
longer than segproxy's drain."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from segproxy.config import load
from segproxy.config.schema import LimitsConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "segproxy.service"
EXEC = "/opt/segproxy/bin/segproxy"  # where the unit's comment says to install segproxy


def service() -> dict[str, list[str]]:
    """The [Service] section: every key with all its values (Environment= repeats)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists (verify checks it)."""
    binary = tmp_path / "bin" / "segproxy"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    unit = tmp_path / "segproxy.service"
    unit.write_text(text.replace(EXEC, str(binary)))
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd): run scripts/setup.sh")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_analyze_verifies_the_unit_without_a_warning(installed: Path) -> None:
    done = analyze("verify", str(installed))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # an unknown value is only a warning


def test_systemd_analyze_finds_a_broken_unit(installed: Path) -> None:
    # The check above can fail: a misspelled value is reported.
    installed.write_text(installed.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert "sometimes" in analyze("verify", str(installed)).stderr


def test_the_unit_is_hardened_to_systemds_ok_exposure(installed: Path) -> None:
    done = analyze("security", "--offline=true", str(installed))
    assert done.returncode == 0, done.stderr
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout)
    assert level is not None, done.stdout
    assert level.group(2) == "OK", done.stdout  # systemd's best band, below 2.0 of 10


def test_the_unit_runs_as_its_own_user_with_the_queue_in_its_state_directory() -> None:
    s = service()
    assert s["DynamicUser"] == ["yes"]
    assert s["StateDirectory"] == ["segproxy"]
    env = dict(v.split("=", 1) for v in s["Environment"])
    config = load(None, {k: v for k, v in env.items() if k.startswith("SEGPROXY_")})
    assert config.data_dir == "/var/lib/segproxy"  # StateDirectory=segproxy is /var/lib/segproxy
    assert Path(config.queue.path).parent == Path(config.data_dir)


def test_the_unit_restarts_on_failure_and_lets_the_drain_finish() -> None:
    s = service()
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    # Requests get shutdown_grace, then the forwarder as long again (serve.py).
    assert int(s["TimeoutStopSec"][0]) > 2 * LimitsConfig().shutdown_grace
    assert s["ExecStart"] == [f"{EXEC} serve --config /etc/segproxy/segproxy.toml"]


def test_the_unit_parses_as_ini_with_the_three_sections() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
