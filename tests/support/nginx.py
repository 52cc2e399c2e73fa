"""A real nginx for tests, run as our own process: a temporary prefix, ``daemon off``, its pid
file in that prefix, listening on a free 127.0.0.1 port. Stopped by its pid.

The test writes what goes inside ``http { }`` (servers, cache zones) with ``{port}`` where the
listening port goes and ``{prefix}`` for the temporary directory; everything around it (pid
file, logs, temp paths, the worker's user) is written here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_MAIN = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunningNginx:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, prefix: Path) -> None:
        self.proc = proc
        self.port = port
        self.prefix = prefix

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown of the master and its worker
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_nginx(prefix: Path, http: str, timeout: float = 10.0) -> RunningNginx:
    """Write the configuration (``http`` with ``{port}`` and ``{prefix}`` filled in) and start
    nginx; return once it accepts connections (polled with a deadline)."""
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers would run as nobody otherwise
    body = http.replace("{port}", str(port)).replace("{prefix}", str(prefix))
    conf = prefix / "nginx.conf"
    conf.write_text(_MAIN.format(user=user, prefix=prefix, http=body))
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    running = RunningNginx(proc, port, prefix)
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            running.stop()
            raise RuntimeError(f"nginx did not start:\n{conf.read_text()}\n{running.error_log()}")
        time.sleep(0.02)
    return running


@contextmanager
def nginx(prefix: Path, http: str) -> Iterator[RunningNginx]:
    server = start_nginx(prefix, http)
    try:
        yield server
    finally:
        server.stop()
