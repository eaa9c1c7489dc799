"""The five things a benchmark client can connect to, and the database behind them.

Owns: starting (or adopting, with --upstream) PostgreSQL, loading the benchmark data (pgbench
tables, a 100,000-row table for large results, a COPY sink, the ORM tables), starting PgBouncer,
the bare uvloop forwarder (bare.py), pgscout observing and pgscout --forward-only in front of it,
and stopping all of them again.
Must not: measure anything (workloads do), or start a proxy differently from how a user does
(`python -m pgscout run`, through tests/pgharness.py).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgharness import (LOOPBACK, PgCluster, Pgscout, free_port, make_dsn, run_client,
                       wait_listening)

import orm_nplusone
import pgbouncer
from report import BARE, DIRECT, FORWARD_ONLY, PGBOUNCER, PGSCOUT

BENCH_DATABASE = "bench"
PGBENCH_SCALE = 1
LARGE_TABLE_ROWS = 100_000
# The idle-session test's server connections (PgBouncer keeps its own pooled until it stops) plus
# everything the other proxies and the benchmark's clients hold at the same time.
SERVER_HEADROOM_CONNECTIONS = 100
BARE_FORWARDER = Path(__file__).resolve().parent / "bare.py"
BARE_START_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    user: str
    password: str | None
    database: str
    pid: int | None  # the proxy process; None for direct
    # pgscout's analysis work runs in a child of `pid`; its CPU is reported apart from the data plane's.
    has_analysis_process: bool = False

    def url(self, scheme: str = "postgresql") -> str:
        url = make_dsn(self.host, self.port, self.user, self.database, self.password,
                       sslmode="disable", connect_timeout=10)
        return url.replace("postgresql://", f"{scheme}://", 1)


class ForwardOnlyPgscout(Pgscout):
    @property
    def argv(self) -> list[str]:
        return [*super().argv, "--forward-only"]


class BareForwarder:
    """bare.py as a subprocess on a free loopback port, its output kept for failure reports."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.upstream = f"{upstream_host}:{upstream_port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="pgscout-bench-bare-"))
        self.output_file = self.workdir / "output.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BareForwarder:
        argv = [sys.executable, str(BARE_FORWARDER), "--listen", f"{self.host}:{self.port}",
                "--upstream", self.upstream]
        with open(self.output_file, "wb") as output:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT)
        if not wait_listening(self.process, self.host, self.port, BARE_START_TIMEOUT_SECONDS):
            self.stop()
            raise RuntimeError(f"the bare forwarder did not listen on {self.host}:{self.port}\n{self.output()}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "the bare forwarder was never started"
        return self.process.pid

    def output(self) -> str:
        try:
            return "--- bare forwarder output ---\n" + self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return "--- bare forwarder output ---\n(none)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class BenchEnvironment:
    """Everything the workloads run against; `close()` stops what this process started."""

    def __init__(self, upstream_url: str | None, max_clients: int) -> None:
        self.cluster: PgCluster | None = None
        self.bouncer: pgbouncer.PgBouncer | None = None
        self.bare: BareForwarder | None = None
        self.proxies: list[Pgscout] = []
        self.max_clients = max_clients
        if upstream_url is None:
            self.cluster = PgCluster()
            self.pgscout_upstream = self.cluster.upstream_url()
            self.host, self.port, self.user, self.password, self.database = (
                LOOPBACK, self.cluster.port, "postgres", None, BENCH_DATABASE)
        else:
            parsed = urllib.parse.urlsplit(upstream_url)
            self.pgscout_upstream = upstream_url
            self.host = parsed.hostname or LOOPBACK
            self.port = parsed.port or 5432
            self.user = urllib.parse.unquote(parsed.username or "postgres")
            self.password = urllib.parse.unquote(parsed.password) if parsed.password else None
            self.database = parsed.path.lstrip("/") or self.user
        self.targets: list[Target] = []

    def start(self) -> BenchEnvironment:
        try:
            if self.cluster is not None:
                self._start_cluster()
            self._load_data()
            self._start_proxies()
        except BaseException:
            self.close()
            raise
        return self

    def _start_cluster(self) -> None:
        cluster = self.cluster
        cluster.create()
        # The test harness logs every connection; here that would make churn measure the log writer.
        cluster.psql("-c", f"ALTER SYSTEM SET max_connections = {2 * self.max_clients + SERVER_HEADROOM_CONNECTIONS}",
                     "-c", "ALTER SYSTEM SET log_connections = off",
                     "-c", "ALTER SYSTEM SET log_disconnections = off",
                     "-c", f"CREATE DATABASE {BENCH_DATABASE}")
        cluster.restart()

    @property
    def direct(self) -> Target:
        return Target(DIRECT, self.host, self.port, self.user, self.password, self.database, None)

    def psql(self, sql: str) -> str:
        return run_client([self.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
                           self.direct.url()], timeout=600).stdout.strip()

    def bin(self, name: str) -> str:
        if self.cluster is not None:
            return self.cluster.bin(name)
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        return str(Path(bindir) / name)

    def _load_data(self) -> None:
        run_client([self.bin("pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE), self.direct.url()], timeout=600)
        self.psql(
            "DROP TABLE IF EXISTS bench_rows, copy_sink;"
            "CREATE TABLE bench_rows (id int PRIMARY KEY, payload text NOT NULL);"
            f"INSERT INTO bench_rows SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, {LARGE_TABLE_ROWS}) i;"
            "CREATE UNLOGGED TABLE copy_sink (id int NOT NULL, payload text NOT NULL);"
        )
        self.psql("VACUUM ANALYZE bench_rows")
        orm_nplusone.create_schema(self.direct.url("postgresql+psycopg"))

    def _start_proxies(self) -> None:
        self.bouncer = self._new_bouncer()
        self.bare = BareForwarder(self.host, self.port).start()
        observed, forward_only = Pgscout(self.pgscout_upstream), ForwardOnlyPgscout(self.pgscout_upstream)
        for proxy in (observed, forward_only):
            self.proxies.append(proxy)
            proxy.start()
        self.targets = [self.direct, self._target(PGBOUNCER, self.bouncer.host, self.bouncer.port, self.bouncer.pid),
                        self._target(BARE, self.bare.host, self.bare.port, self.bare.pid),
                        self._pgscout_target(PGSCOUT, observed), self._pgscout_target(FORWARD_ONLY, forward_only)]

    @contextlib.contextmanager
    def fresh_proxy(self, name: str) -> Iterator[Target]:
        """A newly started proxy like target `name`, stopped afterwards: memory measurements need a
        heap that earlier workloads have not grown (new sessions would reuse it unseen)."""
        if name == PGBOUNCER:
            bouncer = self._new_bouncer()
            try:
                yield self._target(PGBOUNCER, bouncer.host, bouncer.port, bouncer.pid)
            finally:
                bouncer.stop()
            return
        if name == BARE:
            bare = BareForwarder(self.host, self.port).start()
            try:
                yield self._target(BARE, bare.host, bare.port, bare.pid)
            finally:
                bare.cleanup()
            return
        proxy = (Pgscout if name == PGSCOUT else ForwardOnlyPgscout)(self.pgscout_upstream)
        try:
            yield self._pgscout_target(name, proxy.start())
        except Exception:
            print(proxy.output(), file=sys.stderr)
            raise
        finally:
            proxy.cleanup()

    def _new_bouncer(self) -> pgbouncer.PgBouncer:
        # Every idle test session holds a server connection in session mode; leave room for the rest.
        return pgbouncer.PgBouncer(self.host, self.port, self.database, self.user, self.password,
                                   max_clients=self.max_clients + SERVER_HEADROOM_CONNECTIONS).start()

    def _pgscout_target(self, name: str, proxy: Pgscout) -> Target:
        return self._target(name, proxy.host, proxy.port, proxy.process.pid, has_analysis_process=True)

    def _target(self, name: str, host: str, port: int, pid: int, has_analysis_process: bool = False) -> Target:
        return Target(name, host, port, self.user, self.password, self.database, pid, has_analysis_process)

    def failure_report(self) -> str:
        sections = [proxy.output() for proxy in self.proxies]
        if self.bare is not None:
            sections.append(self.bare.output())
        if self.bouncer is not None:
            sections.append("--- PgBouncer log (tail) ---\n" + self.bouncer.log_tail())
        if self.cluster is not None:
            sections.append("--- postgres log (tail) ---\n" + self.cluster.log_tail())
        return "\n".join(sections)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.cleanup()
        if self.bare is not None:
            self.bare.cleanup()
        if self.bouncer is not None:
            self.bouncer.stop()
        if self.cluster is not None:
            self.cluster.destroy()
