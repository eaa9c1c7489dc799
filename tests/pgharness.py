"""Throwaway PostgreSQL clusters and pgscout processes for the integration tests.

Owns: finding the installed server binaries, creating a cluster (TLS, roles, pg_hba) in a temp dir,
starting/stopping it as the `postgres` OS user, running psql/pgbench, and running
`python -m proxy run` as a subprocess with free ports.
Must not: import anything from `proxy` (the proxy is tested from the outside, as a user runs it),
skip when a binary is missing (a missing server is a broken test machine, so it fails loudly),
or leave a server or a temp dir behind.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import trustme

from pgscout.demo import localpg

REPO_ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"
# A second loopback address the server also listens on but the server certificate does not
# name: verify-full against it must fail on the hostname check, not on the connection.
UNCERTIFIED_LOOPBACK = "127.0.0.2"

SUPERUSER = "postgres"
PASSWORDS = {"md5_user": "md5-secret", "scram_user": "scram-secret"}
AUTH_METHODS = {
    "postgres": "trust",
    "trust_user": "trust",
    "md5_user": "md5",
    "scram_user": "scram-sha-256",
}
APP_DATABASE = "app"

PROXY_START_TIMEOUT_SECONDS = 10.0
OUTPUT_TAIL_LINES = 200


class HarnessError(AssertionError):
    """The test machine cannot provide what the integration tests need."""


# Below the kernel's ephemeral range (32768-60999 by default): a port picked there can be taken
# as the source port of an outgoing connection before the server binds it, which connection
# storms (the resource and fault tests) make likely.
_LISTEN_PORTS = range(20000, 32768)


def free_port(*hosts: str) -> int:
    """A TCP port nothing uses at any of `hosts` right now, outside the ephemeral range."""
    hosts = hosts or (LOOPBACK,)
    for _ in range(200):
        port = random.choice(_LISTEN_PORTS)
        if all(_port_is_free(host, port) for host in hosts):
            return port
    raise HarnessError(f"no TCP port free on all of {hosts}")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def accepts_tcp(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(process: subprocess.Popen, host: str, port: int, timeout: float) -> bool:
    """Wait until `process` accepts TCP on host:port; False if it exited or `timeout` passed.
    Each probe opens (and at once closes) a connection, which a proxy or server shrugs off."""
    deadline = time.monotonic() + timeout
    while not accepts_tcp(host, port, timeout=0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def write_serving_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A new CA and a certificate it issued for 127.0.0.1 and localhost, written to `directory`:
    (certificate, key, CA file), for a pgscout that terminates client TLS."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = directory / "pgscout.crt", directory / "pgscout.key", directory / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


def make_dsn(host: str, port: int, user: str, db: str, password: str | None, **params: object) -> str:
    credentials = urllib.parse.quote(user, safe="")
    if password is not None:
        credentials += ":" + urllib.parse.quote(password, safe="")
    # None drops a default (asyncpg, for one, sends unknown URL parameters to the server as GUCs).
    query = urllib.parse.urlencode({key: str(value) for key, value in params.items() if value is not None})
    return f"postgresql://{credentials}@{host}:{port}/{db}" + (f"?{query}" if query else "")


def find_bindir() -> Path:
    """The server binaries, found the way `pgscout demo` finds them; missing is a failure."""
    try:
        return localpg.find_bindir()
    except localpg.LocalPgError as error:
        raise HarnessError(f"{error} (see .ci/run)") from None


def rss_bytes(pid: int) -> int:
    """A process's resident set size with its children's (pgscout's analysis process), from /proc."""
    total = 0
    for member in [pid, *child_pids(pid)]:
        try:
            with open(f"/proc/{member}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status
                              if line.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration):
            if member == pid:
                raise AssertionError(f"no VmRSS for {pid}") from None
    return total


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def _tail(path: Path, lines: int = OUTPUT_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class PgCluster:
    """One PostgreSQL cluster in a temp dir, listening on 127.0.0.1 and 127.0.0.2 with TLS on.

    Roles: `postgres` (superuser), `trust_user`, `md5_user`, `scram_user` (auth methods in
    AUTH_METHODS, passwords in PASSWORDS); database `app` owned by `trust_user`.
    The server certificate names `localhost` and 127.0.0.1 only; `ca_cert` is its CA for sslrootcert.
    """

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.run_as_postgres = os.getuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="pgscout-pg-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_file = self.base / "postgres.log"
        self.ca_cert = self.base / "ca.pem"
        self.port = free_port(LOOPBACK, UNCERTIFIED_LOOPBACK)
        self.host = LOOPBACK
        self._destroyed = False
        atexit.register(self.destroy)

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self) -> PgCluster:
        """initdb, configure, start and provision roles; destroys the dir again if any step fails."""
        try:
            self.socket_dir.mkdir()
            if self.run_as_postgres:
                shutil.chown(self.base, "postgres", "postgres")
                shutil.chown(self.socket_dir, "postgres", "postgres")
            self._run_server_tool(
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )
            self._write_tls_files()
            self._write_config()
            self.start()
            self._provision()
        except BaseException:
            self.destroy()
            raise
        return self

    def start(self) -> None:
        self._run_server_tool(
            "pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data_dir), "-l", str(self.log_file),
            timeout=60,
        )

    def stop(self) -> None:
        self._run_server_tool("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.data_dir), timeout=60)

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def destroy(self) -> None:
        """Stop the server (immediate, nothing to keep) and remove the dir; safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        if self.is_running():
            subprocess.run(
                localpg.as_server_user([str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "30", "-m", "immediate",
                                   "-D", str(self.data_dir)]),
                cwd=self.base, capture_output=True, timeout=60,
            )
        shutil.rmtree(self.base, ignore_errors=True)

    # -- addresses ---------------------------------------------------------------------------

    def dsn(self, user: str = SUPERUSER, db: str = "postgres", password: str | None = None,
            host: str = LOOPBACK, **params: object) -> str:
        """A direct libpq URL; the role's own password is filled in unless `password` is given."""
        params.setdefault("sslmode", "disable")
        params.setdefault("connect_timeout", 10)
        return make_dsn(host, self.port, user, db, password if password is not None else PASSWORDS.get(user), **params)

    def route_dsns(self, proxy: Pgscout, user: str = "trust_user", db: str = APP_DATABASE,
                   **params: object) -> dict[str, str]:
        """{"direct": ..., "proxy": ...}: the same connection settings, straight and through `proxy`."""
        return {"direct": self.dsn(user, db, **params), "proxy": proxy.dsn(user, db, **params)}

    def upstream_url(self, host: str = LOOPBACK, sslmode: str = "disable", **params: object) -> str:
        """The `--upstream` URL for pgscout. Its user is only for pgscout's own control connection
        (limits and backend counts): every client authenticates as itself, untouched."""
        query = urllib.parse.urlencode({"sslmode": sslmode, **{key: str(value) for key, value in params.items()}})
        return f"postgresql://{SUPERUSER}@{host}:{self.port}/postgres?{query}"

    def bin(self, name: str) -> str:
        path = self.bindir / name
        if not path.is_file():
            raise HarnessError(f"{name} not found in {self.bindir}")
        return str(path)

    # -- clients -----------------------------------------------------------------------------

    def psql(self, *args: str, dsn: str | None = None, input: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run psql against `dsn` (default: direct as the superuser) without reading ~/.psqlrc."""
        return run_client(
            [self.bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", dsn or self.dsn(), *args],
            input=input, check=check, timeout=timeout,
        )

    def pgbench(self, *args: str, dsn: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_client([self.bin("pgbench"), *args, dsn], check=check, timeout=timeout)

    def log_tail(self) -> str:
        return _tail(self.log_file)

    def failure_report(self) -> list[tuple[str, str]]:
        return [(f"postgres log ({self.log_file})", _tail(self.log_file, lines=60))]

    # -- setup steps -------------------------------------------------------------------------

    def _run_server_tool(self, name: str, *args: str, timeout: float = 120) -> None:
        argv = localpg.as_server_user([self.bin(name), *args])
        result = subprocess.run(argv, cwd=self.base, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )

    def _write_tls_files(self) -> None:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_cert))
        server_cert = ca.issue_cert("localhost", LOOPBACK)
        cert_file = self.data_dir / "server.crt"
        key_file = self.data_dir / "server.key"
        server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
        server_cert.private_key_pem.write_to_path(str(key_file))
        # The server refuses a key file readable by anyone but its owner.
        key_file.chmod(0o600)
        if self.run_as_postgres:
            for path in (cert_file, key_file):
                shutil.chown(path, "postgres", "postgres")

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": f"'{LOOPBACK},{UNCERTIFIED_LOOPBACK}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
            "password_encryption": "'scram-sha-256'",
            "log_line_prefix": "'%m [%p] %q%u@%d %a '",
            "log_min_messages": "warning",
            "log_min_error_statement": "error",
            "log_connections": "on",
            "log_disconnections": "on",
        }
        localpg.append_settings(self.data_dir, "pgscout test harness", settings)
        # Replication connections (walsender) for the tests that relay them through pgscout.
        hba_lines = ["local all all trust", f"host replication {SUPERUSER} 127.0.0.0/8 trust"]
        # hostssl lines first so a TLS connection is matched explicitly; host covers the rest.
        for connection_type in ("hostssl", "host"):
            for user, method in AUTH_METHODS.items():
                hba_lines.append(f"{connection_type} all {user} 127.0.0.0/8 {method}")
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba_lines) + "\n")

    def _provision(self) -> None:
        self.psql(
            "-c", "CREATE ROLE trust_user LOGIN",
            "-c", "SET password_encryption = 'md5'",
            "-c", f"CREATE ROLE md5_user LOGIN PASSWORD '{PASSWORDS['md5_user']}'",
            "-c", "SET password_encryption = 'scram-sha-256'",
            "-c", f"CREATE ROLE scram_user LOGIN PASSWORD '{PASSWORDS['scram_user']}'",
            "-c", f"CREATE DATABASE {APP_DATABASE} OWNER trust_user",
            dsn=self._socket_dsn(),
        )

    def _socket_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@/postgres?host={urllib.parse.quote(str(self.socket_dir), safe='')}&port={self.port}"


def run_client(argv: list[str], input: str | None = None, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a client program; on `check`, a non-zero exit fails with its whole output."""
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


class Pgscout:
    """One `python -m proxy run` subprocess on free loopback ports, output captured to files."""

    def __init__(self, upstream: str, env: dict[str, str] | None = None, config: str | Path | None = None,
                 workdir: Path | None = None) -> None:
        self.upstream = upstream
        self.env_overrides = dict(env or {})
        self.config = config
        self.host = LOOPBACK
        self.port = free_port()
        self.admin_port = free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pgscout-proxy-"))
        self.stdout_file = self.workdir / "stdout.log"
        self.stderr_file = self.workdir / "stderr.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "pgscout", "run",
            "--listen", f"{self.host}:{self.port}",
            "--upstream", self.upstream,
            "--admin", f"{self.host}:{self.admin_port}",
        ]
        if self.config is not None:
            argv += ["-c", str(self.config)]
        return argv

    def start(self) -> Pgscout:
        """Start and wait until the listen and admin ports accept TCP (the admin listener opens
        just after the proxy's); fail with the output otherwise."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env_overrides}
        with open(self.stdout_file, "wb") as stdout, open(self.stderr_file, "wb") as stderr:
            self.process = subprocess.Popen(
                self.argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + PROXY_START_TIMEOUT_SECONDS
        while not (accepts_tcp(self.host, self.port, timeout=0.2)
                   and accepts_tcp(self.host, self.admin_port, timeout=0.2)):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"pgscout exited {self.process.returncode} before listening\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"pgscout did not listen on {self.host}:{self.port} within "
                    f"{PROXY_START_TIMEOUT_SECONDS:.0f} s\n{self.output()}"
                )
            time.sleep(0.05)
        return self

    def dsn(self, user: str = SUPERUSER, db: str = "postgres", password: str | None = None, **params: object) -> str:
        """A client URL pointing at the proxy (plaintext app->sidecar, as an app would connect)."""
        params.setdefault("sslmode", "disable")
        params.setdefault("connect_timeout", 10)
        return make_dsn(self.host, self.port, user, db, password if password is not None else PASSWORDS.get(user), **params)

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET on the admin listener; returns (status, body) for any HTTP status."""
        url = f"http://{self.host}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.process is not None, "pgscout was never started"
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None, "pgscout was never started"
        return self.process.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal and wait; SIGKILL if it outlives `timeout`. Returns the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stdout(self) -> str:
        return self.stdout_file.read_text(errors="replace") if self.stdout_file.exists() else ""

    def logs(self) -> list[dict]:
        """The JSON log lines written to stdout so far (lines that are not JSON objects are left out)."""
        events = []
        for line in self.stdout().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def output(self) -> str:
        return (
            f"command: {' '.join(self.argv)}\nenv overrides: {self.env_overrides}\n"
            f"--- stdout (tail) ---\n{_tail(self.stdout_file)}\n--- stderr (tail) ---\n{_tail(self.stderr_file)}"
        )

    def failure_report(self) -> list[tuple[str, str]]:
        return [(f"pgscout :{self.port}", self.output())]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class PgscoutFactory:
    """`start_pgscout(...)`: starts proxies on demand and stops every one of them at teardown."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.started: list[Pgscout] = []

    def __call__(self, upstream: str | None = None, env: dict[str, str] | None = None,
                 config: str | Path | None = None) -> Pgscout:
        proxy = Pgscout(upstream or self.cluster.upstream_url(), env=env, config=config)
        self.started.append(proxy)
        return proxy.start()

    def failure_report(self) -> list[tuple[str, str]]:
        return [section for proxy in self.started for section in proxy.failure_report()]

    def cleanup(self) -> None:
        for proxy in self.started:
            proxy.cleanup()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it returns truthy or `timeout` passes; returns its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def interrupt_on_termination() -> None:
    """Treat SIGTERM/SIGHUP like Ctrl-C, so pytest runs every fixture teardown (servers, proxies)
    instead of dying and leaving them behind."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, signal.default_int_handler)
