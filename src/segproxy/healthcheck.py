"""``python -m segproxy.healthcheck [--config FILE]``: is the proxy on this host ready?

For a container's ``HEALTHCHECK`` and a Kubernetes exec probe. It reads the configuration the
way ``segproxy serve`` does (the file, then ``SEGPROXY_*`` variables), asks ``/readyz`` on the
operator listener (``admin.listen`` when set, else the main one) over loopback, with the admin
token when one is set, and exits 0 only on ``200``: not ready (starting, stopping, the queue
full), refused, or no answer in time are each one line on stderr and exit 1.

Loopback, because the listener may be bound to every address and a probe runs beside the
process. Over TLS (the main listener with ``[tls]``) the certificate is not checked: it names
the public host, and the connection never leaves the machine.
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import sys
from collections.abc import Sequence

from segproxy.config import Config, ConfigError, load

TIMEOUT = 3.0  # seconds: well under a probe's usual period (Docker 30 s, Kubernetes 10 s)


def loopback(host: str) -> str:
    """The address to reach a listener bound to ``host`` from the same machine."""
    if host in ("0.0.0.0", ""):  # the wildcard: reach it on loopback
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def readyz(config: Config) -> tuple[int, str]:
    """``/readyz``'s status and body, asked where the running proxy serves it."""
    headers = {"Host": "localhost"}
    if config.admin.token:
        headers["Authorization"] = f"Bearer {config.admin.token}"
    conn: http.client.HTTPConnection
    if config.admin.listen is not None:
        host, port = config.admin.listen
        conn = http.client.HTTPConnection(loopback(host), port, timeout=TIMEOUT)
    elif config.tls.enabled:
        unchecked = ssl._create_unverified_context()  # noqa: S323 - loopback, see the docstring
        conn = http.client.HTTPSConnection(
            loopback(config.listen_host), config.listen_port, timeout=TIMEOUT, context=unchecked
        )
    else:
        conn = http.client.HTTPConnection(
            loopback(config.listen_host), config.listen_port, timeout=TIMEOUT
        )
    try:
        conn.request("GET", "/readyz", headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read(512).decode("utf-8", "replace").strip()
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segproxy.healthcheck", description=__doc__)
    parser.add_argument("--config", metavar="FILE", help="the TOML file segproxy serve reads")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"segproxy healthcheck: invalid configuration: {exc}", file=sys.stderr)
        return 1
    try:
        status, body = readyz(config)
    except OSError as exc:  # refused, timed out, reset
        print(f"segproxy healthcheck: no answer from /readyz: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"segproxy healthcheck: /readyz answered {status}: {body}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
