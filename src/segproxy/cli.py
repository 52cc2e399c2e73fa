"""The ``segproxy`` command. Thin: each subcommand maps onto one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from segproxy import __version__
from segproxy.config import ConfigError, load


def _serve(args: argparse.Namespace) -> int:
    from segproxy.serve import run

    config = load(args.config)
    run(config)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load(args.config)
    print(f"config OK: listen {config.listen}")
    print(f"  cdn upstream: {config.upstream.cdn.origin}")
    print(f"  api upstream: {config.upstream.api.origin} (region {config.upstream.region})")
    print(f"  queue: {config.queue.backend}")
    if config.sources.write_keys:
        print(f"  write keys allowed: {len(config.sources.write_keys)}")
    else:
        print("  warning: [sources] write_keys is empty: any write key is accepted")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segproxy",
        description="First-party proxy for Segment's CDN and Tracking API.",
    )
    parser.add_argument("--version", action="version", version=f"segproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy (embedded defaults without --config)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check", help="validate the configuration and print it")
    check.add_argument("--config", metavar="FILE", help="TOML configuration file")
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"segproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
