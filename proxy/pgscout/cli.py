"""The `pgscout` command line.

Owns: argument parsing for `pgscout run | check-config | budget | demo`, loading settings with
the flags as overrides, and the exit codes.
Must not: wire the running server (app.py does) or hold protocol or observation logic.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import structlog

from pgscout import __version__, app, logs
from pgscout.control import sizing
from pgscout.demo import command as demo
from pgscout.settings import ConfigError, Settings, effective_yaml, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return args.handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgscout",
        description="Transparent PostgreSQL sidecar proxy: statement fingerprints, slow-query log, "
                    "N+1 detection and connection budgets, exported to Prometheus.")
    parser.add_argument("--version", action="version", version=f"pgscout {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="proxy connections to the upstream and observe them",
                              description="Listen for PostgreSQL clients and relay each to its own "
                                          "upstream connection, observing the traffic.",
                              epilog=_DEFAULTS_HINT)
    run.add_argument("-c", "--config", metavar="FILE", help="YAML config file (every key: see below)")
    run.add_argument("--listen", metavar="HOST:PORT", help="client listen address (default 127.0.0.1:6434)")
    run.add_argument("--upstream", metavar="URL",
                     help="upstream libpq URL, e.g. postgresql://db:5432/app?sslmode=verify-full"
                          "&sslrootcert=ca.pem (default: DATABASE_URL, then PGHOST/PGPORT)")
    run.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP address (default 127.0.0.1:9434)")
    run.add_argument("--forward-only", action="store_true",
                     help="relay bytes without decoding or observing (to measure observation's cost)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a config file and print the effective config",
                                description="Validate FILE (plus PGSCOUT_* environment overrides) and "
                                            "print the effective configuration; exit 1 on the first error.")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_check_config)
    sizing.add_budget_command(commands)
    demo.add_demo_command(commands)
    return parser


# config/pgscout.yaml (every key, commented) is in the source repository, not in the wheel.
_DEFAULTS_HINT = ("Every setting and its default: `pgscout check-config /dev/null` prints them (an "
                  "empty file means defaults); config/pgscout.yaml in the source repository "
                  "documents each. Any key can also be set as PGSCOUT_<SECTION>_<KEY>.")


def _load(config: str | None, overrides: dict[str, str]) -> Settings | None:
    try:
        return load_settings(config, os.environ, overrides)
    except ConfigError as exc:
        print(f"pgscout: config error: {exc}", file=sys.stderr)
        return None


def _check_config(args) -> int:
    settings = _load(args.file, {})
    if settings is None:
        return 1
    sys.stdout.write(effective_yaml(settings))
    return 0


def _run(args) -> int:
    overrides = {key: value for key, value in (("proxy.listen", args.listen),
                                               ("proxy.upstream", args.upstream),
                                               ("admin.listen", args.admin)) if value}
    settings = _load(args.config, overrides)
    if settings is None:
        return 1
    if settings.proxy.upstream is None:
        print("pgscout: no upstream: pass --upstream URL, set proxy.upstream, DATABASE_URL or PGHOST",
              file=sys.stderr)
        return 1
    logs.configure(settings.log.level, settings.log.format)
    _warn_if_admin_exposed(settings)
    import uvloop

    def reload() -> Settings:
        return load_settings(args.config, os.environ, overrides)

    return uvloop.run(app.serve(settings, observing=not args.forward_only, reload=reload))


def _warn_if_admin_exposed(settings: Settings) -> None:
    """/metrics and /api/* name every application, user, database and normalized statement: on an
    address others can reach they need admin.token (the image binds 0.0.0.0, so this is common)."""
    host = settings.admin.listen.host
    if settings.admin.token or host == "localhost" or _is_loopback(host):
        return
    structlog.get_logger("pgscout").warning(
        "admin_exposed_without_token", listen=str(settings.admin.listen),
        hint="set admin.token (PGSCOUT_ADMIN_TOKEN) or bind admin.listen to 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False
