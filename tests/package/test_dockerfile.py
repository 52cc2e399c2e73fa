"""The Dockerfile: a build stage that makes the wheel, a slim runtime stage that runs it as a
non-root user with the queue on a volume, a health check on /readyz, configured by SEGPROXY_*.

No Docker engine runs here: the file is parsed and its properties checked; its build and install
steps are run outside Docker by test_wheel.py."""

from __future__ import annotations

from pathlib import Path

from segproxy.config import load
from segproxy.config.schema import LimitsConfig
from tests.package.dockerfile import ROOT, exec_form, healthcheck, parser, stages


def test_the_image_is_built_in_one_stage_and_run_from_another_without_the_compiler() -> None:
    build, runtime = stages()
    assert (build.name, runtime.name) == ("build", "runtime")
    assert "gcc" in build.run_with("apt-get install")  # mypyc's C compiler, in the build only
    wheel = build.run_with("pip wheel")
    assert "SEGPROXY_NATIVE=1" in wheel  # compiled, or the image does not build
    assert build.one("COPY") == ". ."
    assert runtime.one("COPY").startswith("--from=build ")
    assert not any("apt-get" in run or "gcc" in run for run in runtime.values("RUN"))
    install = runtime.run_with("pip install")
    assert "--no-index" in install  # only the wheels made in the build stage
    assert runtime.base.endswith("-slim")


def test_the_proxy_runs_as_a_user_that_is_not_root() -> None:
    runtime = stages()[-1]
    user = runtime.one("USER").split(":")[0]
    assert user not in ("root", "0")
    assert "--uid 10001 --user-group" in runtime.run_with("useradd")
    assert user in runtime.run_with("useradd").split()


def test_the_queue_is_on_a_volume_owned_by_that_user() -> None:
    runtime = stages()[-1]
    config = load(None, parser().envs)  # the image's configuration, read as segproxy reads it
    volumes = exec_form(runtime.one("VOLUME"))
    assert config.data_dir in volumes
    assert Path(config.queue.path).parent == Path(config.data_dir)
    assert config.queue.backend == "sqlite"
    made = runtime.run_with("install -d")
    assert f"-o segproxy -g segproxy -m 0700 {config.data_dir}" in made


def test_the_image_listens_on_the_port_it_exposes_on_every_address() -> None:
    runtime = stages()[-1]
    config = load(None, parser().envs)
    assert config.listen_host == "0.0.0.0"
    assert runtime.one("EXPOSE") == str(config.listen_port)
    assert exec_form(runtime.one("ENTRYPOINT")) == ["segproxy"]
    assert exec_form(runtime.one("CMD")) == ["serve"]  # configured by SEGPROXY_* variables


def test_the_health_check_asks_readyz_with_the_proxys_own_configuration() -> None:
    options, command = healthcheck(stages()[-1].one("HEALTHCHECK"))
    assert command == ["python", "-m", "segproxy.healthcheck"]  # tests/integration runs it
    assert options["timeout"] == "5s" and options["interval"] == "30s"
    assert (ROOT / "src" / "segproxy" / "healthcheck.py").exists()


def test_the_stop_signal_drains() -> None:
    runtime = stages()[-1]
    assert runtime.one("STOPSIGNAL") == "SIGTERM"
    # The drain takes up to twice limits.shutdown_grace (requests, then the forwarder's last
    # batches): the file tells how long to give `docker stop`, which is not a Dockerfile field.
    needed = 2 * LimitsConfig().shutdown_grace
    text = (ROOT / "Dockerfile").read_text()
    assert f"docker stop -t {int(needed) + 10}" in text


def test_the_build_context_leaves_local_builds_and_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "node_modules", "build", "**/*.so", "segproxy-data"):
        assert entry in ignored
    assert "src/segproxy/native.json" in ignored  # a checkout's manifest must not mark a wheel
