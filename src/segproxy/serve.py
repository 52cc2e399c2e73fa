"""Run the proxy: event loop, listener, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl

from segproxy import native
from segproxy.app import App
from segproxy.config import Config, env_warnings
from segproxy.edge.server import EdgeServer
from segproxy.logs import AccessLog, open_access_log, setup_logging
from segproxy.queue.files import private_dir

log = logging.getLogger("segproxy")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A server context from [tls] cert/key (TLS 1.2+), or None for plain HTTP."""
    if not config.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.cert, config.tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def warn_at_start(config: Config) -> None:
    """Log what is allowed but probably not meant: unknown variables, an open door."""
    for warning in env_warnings(os.environ):  # never fatal: see config.env_warnings
        log.warning("%s", warning)
    if not config.sources.write_keys:
        log.warning(
            "[sources] write_keys is empty: any write key is accepted and proxied; "
            "list your keys to refuse others"
        )
    if config.trusted_proxies and not config.public_hosts:
        # Then the host the settings name comes from a header the balancer wrote (or passed
        # on): one misconfigured hop is enough to serve a host of a visitor's choosing.
        log.warning(
            "trusted_proxies is set and public_hosts is empty: the settings name whatever "
            "host the trusted proxies forward (X-Forwarded-Host, Forwarded, Host); list your "
            "public host names in public_hosts"
        )


async def serve(config: Config, access: AccessLog | None = None) -> None:
    warn_at_start(config)
    loop = asyncio.get_running_loop()
    app = App(config)
    await app.start()
    on_answer = access.answered if access is not None else None
    edge = EdgeServer(app, config.limits, loop, tls_context(config), app.requests, on_answer)
    host, port = (await edge.start(config.listen_host, config.listen_port))[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.tls.enabled else "http"
    log.info(
        "segproxy listening on %s://%s:%d (cdn %s, api %s, queue %s)",
        scheme,
        shown,
        port,
        config.upstream.cdn.origin,
        config.upstream.api.origin,
        config.queue.backend,
        extra={"url": f"{scheme}://{shown}:{port}", "queue": config.queue.backend},
    )
    how = native.describe()
    # Plain Python by accident (no compiler, an edit since the build) is worth a warning.
    quiet = native.compiled() or os.environ.get("SEGPROXY_NATIVE") == "0"
    log.log(logging.INFO if quiet else logging.WARNING, "segproxy runs %s", how)
    admin: EdgeServer | None = None
    if config.admin.listen is not None:
        admin = EdgeServer(app.admin, config.limits, loop, None, app.requests, on_answer)
        a_host, a_port = (await admin.start(*config.admin.listen))[:2]
        a_shown = f"[{a_host}]" if ":" in a_host else a_host
        log.info("segproxy admin listening on http://%s:%d", a_shown, a_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new connections, finishing in-flight requests")
    app.ready = False
    await edge.shutdown(config.limits.shutdown_grace)
    if admin is not None:
        await admin.shutdown(1.0)
    await app.close(config.limits.shutdown_grace)
    if access is not None:
        access.close()
    log.info("stopped")


def run(config: Config) -> None:
    setup_logging(config.log_level, config.log_format)
    private_dir(config.data_dir)  # 0700 when segproxy makes it: it holds events
    access = open_access_log(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep a plain fallback
        asyncio.run(serve(config, access))
    else:
        uvloop.run(serve(config, access))
