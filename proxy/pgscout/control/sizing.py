"""Connection sizing: does `pool_size x workers x replicas` fit the server's max_connections?

Owns: the sizing arithmetic (`check`, pure), its human report, and the `pgscout budget` command
(`add_budget_command` registers it; `budget_report` reads the real limits over pgscout's control
connection and judges them). SQLAlchemy's QueuePool holds `pool_size` connections per process and
opens up to `max_overflow` more under load (-1: without limit), so the steady demand is
`pool_size x processes` and the peak `(pool_size + max_overflow) x processes`; the verdict is
judged on the peak, since a burst that needs it ends in "too many clients already".
Verdicts: "over" when the peak does not fit, "tight" when less than 10% of the available
connections would be left at peak, else "ok". Exit codes: 0 ok or tight, 1 over, 2 no reading.
Must not: guess the server's limits (they are read, or the command fails with exit code 2).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass

from pgscout.control.limits import CONNECTION_ERRORS, connect, describe_error, read_limits
from pgscout.settings import ConfigError, Upstream, load_settings

TIGHT_HEADROOM_RATIO = 0.10
EXIT_OK = 0
EXIT_OVER = 1
EXIT_NO_READING = 2


@dataclass(frozen=True)
class Verdict:
    pool_size: int
    max_overflow: int  # -1: no limit
    workers: int
    replicas: int
    max_connections: int
    superuser_reserved: int
    reserved: int
    other_clients: int
    verdict: str  # "ok", "tight" or "over"

    @property
    def processes(self) -> int:
        return self.workers * self.replicas

    @property
    def available(self) -> int:
        """Connections left for these pools: max_connections minus reservations and other clients."""
        return self.max_connections - self.superuser_reserved - self.reserved - self.other_clients

    @property
    def steady_demand(self) -> int:
        return self.pool_size * self.processes

    @property
    def peak_demand(self) -> int | None:
        """None when max_overflow is -1 (the pools may open connections without limit)."""
        if self.max_overflow < 0:
            return None
        return (self.pool_size + self.max_overflow) * self.processes

    @property
    def steady_headroom(self) -> int:
        return self.available - self.steady_demand

    @property
    def peak_headroom(self) -> int | None:
        return None if self.peak_demand is None else self.available - self.peak_demand

    @property
    def peak_headroom_percent(self) -> float | None:
        """Peak headroom as a percentage of the available connections."""
        if self.peak_headroom is None or self.available <= 0:
            return None
        return 100.0 * self.peak_headroom / self.available

    @property
    def max_per_process(self) -> int:
        """The most connections each process may hold (pool_size + max_overflow) and still fit."""
        return max(0, self.available) // self.processes

    def text(self) -> str:
        overflow = "unlimited (-1)" if self.max_overflow < 0 else str(self.max_overflow)
        if self.peak_demand is None:
            peak = "unlimited: max_overflow -1 lets every pool grow without bound"
            peak_headroom = "none (unlimited demand)"
        else:
            peak = (f"{self.pool_size + self.max_overflow} x {self.processes} = {self.peak_demand} "
                    f"connections")
            peak_headroom = f"{self.peak_headroom:+d} connections"
            if self.peak_headroom_percent is not None:
                peak_headroom += f" ({self.peak_headroom_percent:+.1f}%)"
        other_clients = f" - other clients {self.other_clients}" if self.other_clients else ""
        lines = [
            f"Pools: {self.workers} worker(s) x {self.replicas} replica(s) = {self.processes} "
            f"process(es), each pool_size {self.pool_size} + max_overflow {overflow}",
            f"  steady demand: {self.pool_size} x {self.processes} = {self.steady_demand} connections",
            f"  peak demand:   {peak}",
            f"Server: max_connections {self.max_connections} - superuser_reserved_connections "
            f"{self.superuser_reserved} - reserved_connections {self.reserved}{other_clients} "
            f"= {self.available} available",
            f"Headroom: steady {self.steady_headroom:+d} connections, peak {peak_headroom}",
            f"Verdict: {self.verdict.upper()}: {self._explanation()}",
        ]
        return "\n".join(lines) + "\n"

    def _explanation(self) -> str:
        if self.verdict == "ok":
            return "the pools fit even when every one of them is full"
        if self.verdict == "tight":
            return (f"the pools fit, but at peak only {self.peak_headroom} connection(s) would be left; "
                    f"a rolling deploy that runs old and new replicas side by side needs more")
        fix = (f"keep pool_size + max_overflow at most {self.max_per_process} per process"
               if self.max_per_process > 0 else
               f"even one connection per process does not fit: run at most {max(0, self.available)} "
               f"processes")
        if self.peak_demand is None:
            return f"max_overflow -1 puts no bound on the pools; set a limit and {fix}"
        if self.steady_headroom >= 0:
            return (f"the pools fit while idle but a burst that fills every overflow makes the server "
                    f"refuse connections (\"too many clients already\"); {fix}")
        return f"the pools do not fit even at pool_size; {fix}"


def check(pool_size: int, max_overflow: int, workers: int, replicas: int, max_connections: int,
          superuser_reserved: int, reserved: int, other_clients: int = 0) -> Verdict:
    """Judge whether the pools fit: `(pool_size + max_overflow) x workers x replicas` must not
    exceed `max_connections - superuser_reserved - reserved - other_clients`."""
    if pool_size < 0 or max_overflow < -1 or workers < 1 or replicas < 1:
        raise ValueError("pool_size must be >= 0, max_overflow >= -1, workers and replicas >= 1")
    available = max_connections - superuser_reserved - reserved - other_clients
    if max_overflow < 0:
        verdict = "over"
    else:
        peak = (pool_size + max_overflow) * workers * replicas
        if peak > available:
            verdict = "over"
        elif available - peak < TIGHT_HEADROOM_RATIO * available:
            verdict = "tight"
        else:
            verdict = "ok"
    return Verdict(pool_size, max_overflow, workers, replicas, max_connections, superuser_reserved,
                   reserved, other_clients, verdict)


async def budget_report(upstream: Upstream | None, pool_size: int, max_overflow: int, workers: int,
                        replicas: int, *, connect_timeout: float = 5.0) -> tuple[str, int]:
    """Read the upstream's limits and judge the pools; (report text, exit code)."""
    if upstream is None:
        return ("pgscout budget: no upstream: pass --upstream URL, set proxy.upstream, DATABASE_URL "
                "or PGHOST\n", EXIT_NO_READING)
    try:
        connection = await connect(upstream, connect_timeout)
        try:
            limits = await read_limits(connection)
        finally:
            await connection.close()
    except CONNECTION_ERRORS as error:
        return (f"pgscout budget: cannot read the server's limits: {describe_error(upstream, error)}\n",
                EXIT_NO_READING)
    verdict = check(pool_size, max_overflow, workers, replicas, limits["max_connections"],
                    limits["superuser_reserved_connections"], limits["reserved_connections"])
    estimate = "" if limits["client_backends_exact"] else " (estimated: this role cannot see them all)"
    header = (f"Upstream {upstream.display()}: PostgreSQL {limits['server_version']}, "
              f"{limits['client_backends']} client connection(s) open right now{estimate}\n")
    return header + verdict.text(), EXIT_OVER if verdict.verdict == "over" else EXIT_OK


def add_budget_command(subparsers) -> None:
    """Register `pgscout budget` on the CLI's subparsers."""
    command = subparsers.add_parser(
        "budget", help="check that the application's connection pools fit the server's max_connections",
        description="Read max_connections and the reserved connections from the upstream and check "
                    "that pool_size x workers x replicas fits, and that (pool_size + max_overflow) x "
                    "workers x replicas does at peak. Exit 0 when it fits, 1 when it does not, "
                    "2 when the limits could not be read.")
    command.add_argument("--pool-size", type=_count(0), default=5, metavar="N",
                         help="connections each process's pool keeps (SQLAlchemy pool_size; default 5)")
    command.add_argument("--max-overflow", type=_count(-1), default=10, metavar="N",
                         help="extra connections a pool opens under load (SQLAlchemy max_overflow, "
                              "-1 for no limit; default 10)")
    command.add_argument("--workers", type=_count(1), default=1, metavar="N",
                         help="processes per replica, each with its own pool (default 1)")
    command.add_argument("--replicas", type=_count(1), default=1, metavar="N",
                         help="replicas (pods, instances) of the application (default 1)")
    command.add_argument("--upstream", metavar="URL",
                         help="the database as a libpq URL, with a user (and password) for pgscout's "
                              "own connection (default: proxy.upstream, DATABASE_URL, then PG*)")
    command.add_argument("-c", "--config", metavar="FILE",
                         help="YAML config file (`pgscout check-config /dev/null` prints every key)")
    command.set_defaults(handler=_run_budget)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _run_budget(args) -> int:
    overrides = {"proxy.upstream": args.upstream} if args.upstream else {}
    try:
        settings = load_settings(args.config, os.environ, overrides)
    except ConfigError as error:
        print(f"pgscout: config error: {error}", file=sys.stderr)
        return EXIT_NO_READING
    text, exit_code = asyncio.run(budget_report(
        settings.proxy.upstream, args.pool_size, args.max_overflow, args.workers, args.replicas,
        connect_timeout=settings.proxy.connect_timeout_seconds))
    (sys.stderr if exit_code == EXIT_NO_READING else sys.stdout).write(text)
    return exit_code
