"""Run the real segproxy as a subprocess on 127.0.0.1, the way an operator would.

The proxy is started with ``python -m segproxy serve --config FILE`` on port 0 and announces its
address on stderr (``segproxy listening on http://127.0.0.1:PORT``); we wait for that line
with a deadline instead of sleeping. Every process started here is stopped by its own pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"segproxy listening on (https?)://([0-9.]+):(\d+)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Write a two-level dict (top-level keys and [sections]) as TOML."""
    top = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, Mapping)]
    sections = []
    for name, table in config.items():
        if isinstance(table, Mapping):
            body = "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items())
            sections.append(f"[{name}]\n{body}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


class RunningProxy:
    def __init__(self, proc: subprocess.Popen[str], scheme: str, host: str, port: int) -> None:
        self.proc = proc
        self.scheme = scheme
        self.host = host
        self.port = port
        self._log: list[str] = []
        self._log_lock = threading.Lock()
        self.pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        with self._log_lock:
            return "".join(self._log)

    def logged(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, polled for: a line the proxy has
        written may not have been read from its pipe yet."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.logs())
            if m is not None:
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} in the log after {timeout}s:\n{self.logs()}")
            time.sleep(0.02)

    def _append_log(self, line: str) -> None:
        with self._log_lock:
            self._log.append(line)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: a graceful stop. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._join_pump()

    def _join_pump(self) -> None:
        if self.pump is not None:
            self.pump.join(timeout=5)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._join_pump()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def operator_env() -> dict[str, str]:
    """This environment without SEGPROXY_* settings, except SEGPROXY_NATIVE (plain Python or
    the compiled build: the whole suite runs one or the other)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEGPROXY_") or k == "SEGPROXY_NATIVE"
    }


def start_proxy(
    config: Mapping[str, Any] | str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    startup_timeout: float = 20.0,
    command: Sequence[str] | None = None,
    drop: Sequence[str] = (),
) -> RunningProxy:
    """Start ``segproxy serve`` with ``config`` (a dict or TOML text) and wait until it listens.

    ``listen`` defaults to 127.0.0.1:0 (a free port chosen by the kernel). ``command`` runs
    another segproxy than this checkout's (an installed one: ``[venv/bin/segproxy]``), and
    ``drop`` names variables of this environment it must not see (``PYTHONPATH``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, str):
        text = config
    else:
        merged = {"listen": "127.0.0.1:0", **config}
        text = to_toml(merged)
    cfg = workdir / "segproxy.toml"
    cfg.write_text(text)
    full_env = operator_env()
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    for name in drop:
        full_env.pop(name, None)
    program = list(command) if command else [sys.executable, "-m", "segproxy"]
    cmd = [*program, "serve", "--config", str(cfg), *(args or [])]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    found: dict[str, Any] = {}
    ready = threading.Event()
    early: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        holder: RunningProxy | None = None
        for line in proc.stderr:
            if holder is None:
                early.append(line)
                m = LISTENING.search(line)
                if m:
                    holder = RunningProxy(proc, m.group(1), m.group(2), int(m.group(3)))
                    for e in early:
                        holder._append_log(e)
                    found["proxy"] = holder
                    ready.set()
            else:
                holder._append_log(line)
        proc.stderr.close()
        ready.set()

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    deadline = time.monotonic() + startup_timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("segproxy did not start in time:\n" + "".join(early))
    if "proxy" not in found:
        proc.wait()
        pump_thread.join(timeout=5)
        raise RuntimeError(f"segproxy exited with {proc.returncode}:\n" + "".join(early))
    proxy: RunningProxy = found["proxy"]
    proxy.pump = pump_thread
    return proxy


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    module: str = "segproxy",
) -> subprocess.CompletedProcess[str]:
    """``segproxy <args>`` (or ``python -m <module> <args>``) as an operator runs it: no tty,
    no inherited SEGPROXY_* variables."""
    clean = operator_env()
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


@contextmanager
def running_proxy(
    config: Mapping[str, Any] | str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    command: Sequence[str] | None = None,
    drop: Sequence[str] = (),
) -> Iterator[RunningProxy]:
    proxy = start_proxy(config, workdir, env=env, args=args, command=command, drop=drop)
    try:
        yield proxy
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()
