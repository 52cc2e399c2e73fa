"""The ``segproxy`` command. Thin: each subcommand maps onto one function."""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from segproxy import __version__, native
from segproxy.config import ConfigError, env_warnings, load
from segproxy.redact import mask

if TYPE_CHECKING:
    from segproxy.check import run as check_run

_WRITE_KEY = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _serve(args: argparse.Namespace) -> int:
    from segproxy.queue.base import QueueError
    from segproxy.serve import run

    config = load(args.config)
    try:
        run(config)
    except QueueError as exc:
        print(f"segproxy: cannot open the queue: {exc}", file=sys.stderr)
        return 1
    except ssl.SSLError as exc:  # an OSError too: a bad PEM is not a busy port
        print(f"segproxy: cannot load [tls] cert/key: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"segproxy: cannot listen on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _check_url(args)
    url_only = [
        flag
        for flag, given in (
            ("--write-key", args.write_key),
            ("--api", args.api),
            ("--origin", args.origin),
            ("--json", args.json),
            ("--dry-run", args.dry_run),
            ("--cafile", args.cafile),
        )
        if given
    ]
    if url_only:
        print(f"segproxy check: {', '.join(url_only)} need a URL to check", file=sys.stderr)
        return 2
    from segproxy.config.describe import describe

    config = load(args.config)
    print(f"config OK: listen {config.listen}")
    print(f"  cdn upstream: {config.upstream.cdn.origin}")
    print(f"  api upstream: {config.upstream.api.origin} (region {config.upstream.region})")
    print(f"  queue: {config.queue.backend}")
    if config.sources.write_keys:
        print(f"  write keys allowed: {len(config.sources.write_keys)}")
    else:
        print("  warning: [sources] write_keys is empty: any write key is accepted")
    for warning in env_warnings(os.environ):
        print(f"  warning: {warning}")
    print()
    print("resolved configuration:")
    for line in describe(config):
        print(f"  {line}")
    return 0


def _check_url(args: argparse.Namespace) -> int:
    """``segproxy check URL``: exit 0 when every check passed, 1 when one failed, 2 when the
    command was wrong or nothing answered at the URL (docs/check.md)."""
    from segproxy.check import report
    from segproxy.check.run import run

    options = _check_options(args)
    if options is None:
        return 2
    result = run(options)
    print(report.as_json_text(result) if args.json else report.as_text(result))
    return result.exit_code


def _check_options(args: argparse.Namespace) -> check_run.Options | None:
    from segproxy.check.probe import parse_origin
    from segproxy.check.run import Options

    problem = ""
    if args.config is not None:
        problem = "give a URL or --config, not both"
    elif not args.write_key:
        problem = "--write-key is required with a URL"
    elif not _WRITE_KEY.fullmatch(args.write_key):
        problem = "--write-key: letters, digits, '_' and '-' only"
    elif not args.timeout > 0:
        problem = "--timeout: a number of seconds above 0"
    if problem:
        print(f"segproxy check: {problem}", file=sys.stderr)
        return None
    try:
        url = parse_origin(args.url)
        api = parse_origin(args.api) if args.api else url
        page = parse_origin(args.origin) if args.origin else url
    except ValueError as exc:
        print(f"segproxy check: {exc}", file=sys.stderr)
        return None
    return Options(
        url=url,
        api=api,
        write_key=args.write_key,
        page_origin=f"{page.scheme}://{page.authority}",
        dry_run=args.dry_run,
        cafile=args.cafile,
        timeout=args.timeout,
    )


def _queue_path(args: argparse.Namespace) -> str:
    config = load(args.config)
    for warning in env_warnings(os.environ):  # stderr: stdout may be --json
        print(f"segproxy: warning: {warning}", file=sys.stderr)
    if config.queue.backend != "sqlite":
        raise ConfigError("queue.backend", config.queue.backend, '"sqlite" for queue commands')
    return config.queue.path


def _queue_stats(args: argparse.Namespace) -> int:
    from segproxy.queue import admin

    s = admin.stats(_queue_path(args))
    data = admin.stats_json(s, admin.now())
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"queued events: {s.rows} ({s.bytes} bytes), oldest {admin.age(data['oldest_age_seconds'])}"
    )
    print(f"dead letters:  {s.dead} ({s.dead_bytes} bytes)")
    if s.dead_evicted:
        print(f"dead letters evicted (oldest first, over queue.max_dead_bytes): {s.dead_evicted}")
    for key, v in data["per_key"].items():
        oldest = admin.age(v["oldest_age_seconds"])
        print(f"  {key:12} {v['rows']:>9} events {v['bytes']:>12} bytes  oldest {oldest}")
        if v["last_fault"]:
            ago = admin.age(v["last_fault_age_seconds"])
            print(f"  {'':12} last fault {ago} ago: {v['last_fault']}")
    return 0


def _queue_dead(args: argparse.Namespace) -> int:
    from segproxy.queue import admin

    rows = admin.dead(_queue_path(args), args.limit)
    if args.json:
        out = [
            {
                "id": r.id,
                "write_key": mask(r.write_key),
                "status": r.status,
                "reason": r.reason,
                "died_at": r.died_at,
                "event": admin.masked_event(r.body),
            }
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print("no dead letters")
    for r in rows:
        event = admin.masked_event(r.body)
        when = datetime.fromtimestamp(r.died_at, UTC).isoformat(timespec="seconds")
        print(
            f"#{r.id} {when} key {mask(r.write_key)} status {r.status} "
            f"{event.get('type', '?')} {event.get('messageId', '')}: {r.reason[:200]}"
        )
    return 0


def _queue_replay(args: argparse.Namespace) -> int:
    from segproxy.queue import admin

    def progress(done: int, total: int) -> None:
        print("\r" + admin.progress_bar(done, total), end="", file=sys.stderr, flush=True)

    moved = admin.replay(_queue_path(args), args.id or None, progress)
    if moved:
        print(file=sys.stderr)
    print(f"replayed {moved} dead letters into the queue")
    return 0


def _queue_purge(args: argparse.Namespace) -> int:
    from segproxy.queue import admin

    path = _queue_path(args)
    s = admin.stats(path)
    what = (
        f"{s.dead} dead letters"
        if args.dead
        else f"{s.rows} queued events and {s.dead} dead letters"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"refusing to delete {what} without --yes", file=sys.stderr)
            return 1
        answer = input(f"Delete {what} for good? Type 'purge' to confirm: ")
        if answer.strip() != "purge":
            print("nothing deleted")
            return 1
    events, dead_rows = admin.purge(path, dead_only=args.dead)
    print(f"purged {events} queued events and {dead_rows} dead letters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segproxy",
        description="First-party proxy for Segment's CDN and Tracking API.",
    )
    parser.add_argument(
        "--version", action="version", version=f"segproxy {__version__} ({native.describe()})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy (embedded defaults without --config)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.set_defaults(func=_serve)
    check = sub.add_parser(
        "check",
        help="verify a deployed proxy (URL), or validate and print the configuration",
        description="With a URL: verify the proxy there as a browser and the SDKs use it "
        "(exit 0: all passed, 1: a check failed, 2: usage error or unreachable). "
        "Without one: validate the configuration and print it resolved.",
    )
    check.add_argument("url", nargs="?", help="the proxy's base URL, e.g. https://a.example.com")
    check.add_argument("--config", metavar="FILE", help="TOML configuration file to validate")
    check.add_argument("--write-key", metavar="K", help="a write key the proxy serves")
    check.add_argument("--api", metavar="URL", help="the Tracking API's base URL, if elsewhere")
    check.add_argument(
        "--origin", metavar="URL", help="the site's origin, for CORS (default: the URL's)"
    )
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.add_argument("--dry-run", action="store_true", help="send no test event")
    check.add_argument("--cafile", metavar="PEM", help="trust these CAs (a private CA)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per request (10)")
    check.set_defaults(func=_check)

    queue = sub.add_parser("queue", help="inspect and operate the durable queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    q_stats = qsub.add_parser("stats", help="depth, oldest age, per write key, dead letters")
    q_stats.add_argument("--json", action="store_true", help="machine-readable output")
    q_stats.set_defaults(func=_queue_stats)
    q_dead = qsub.add_parser("dead", help="list dead letters with Segment's reasons")
    q_dead.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    q_dead.add_argument("--json", action="store_true", help="machine-readable output")
    q_dead.set_defaults(func=_queue_dead)
    q_replay = qsub.add_parser("replay", help="send dead letters again")
    q_replay.add_argument("--id", type=int, action="append", help="only this dead letter id")
    q_replay.set_defaults(func=_queue_replay)
    q_purge = qsub.add_parser("purge", help="delete queued events and dead letters")
    q_purge.add_argument("--dead", action="store_true", help="only the dead letters")
    q_purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    q_purge.set_defaults(func=_queue_purge)
    for p in (q_stats, q_dead, q_replay, q_purge):
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"segproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"segproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
