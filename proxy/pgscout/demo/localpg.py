"""A throwaway PostgreSQL server from the locally installed server binaries, for `pgscout demo`.

Owns: finding the server binaries (`pg_config --bindir`, else the newest
/usr/lib/postgresql/*/bin), creating a trust-auth cluster in a temp dir on a free loopback port
(its unix socket in that dir too), starting it (as the `postgres` OS user via runuser when running
as root, since PostgreSQL refuses to run as root), and stopping it and removing the dir.
Must not: import from tests/ or from the rest of pgscout (it is product code with no pgscout
logic), keep any data, or leave a server or a dir behind once `stop()` has run.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
SUPERUSER = "postgres"
SERVER_TIMEOUT_SECONDS = 60


class LocalPgError(RuntimeError):
    """The local server cannot be found, created or started; the message says what to do."""


def as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run a server tool as the postgres OS user then."""
    return ["runuser", "-u", SUPERUSER, "--", *argv] if os.geteuid() == 0 else argv


def append_settings(data_dir: Path, heading: str, settings: dict[str, str]) -> None:
    """Add `key = value` lines to a cluster's postgresql.conf, under a comment."""
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(f"\n# {heading}\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    versioned = [Path(path) for path in glob.glob("/usr/lib/postgresql/*/bin")]
    versioned.sort(key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else -1,
                   reverse=True)
    candidates += versioned
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise LocalPgError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via `pg_config --bindir` "
        "or /usr/lib/postgresql/*/bin. Install them (Debian/Ubuntu: apt-get install postgresql; "
        "macOS: brew install postgresql) or point pgscout at a server you have: --upstream URL")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class LocalPostgres:
    """`start()` creates and starts the server; `stop()` stops it and removes its dir (idempotent)."""

    def __init__(self, on_step: Callable[[str], None] = lambda step: None) -> None:
        self._on_step = on_step
        self._as_postgres = os.geteuid() == 0
        self._bindir: Path | None = None
        self.base: Path | None = None
        self.port = 0

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        """A libpq URL for the superuser over TCP (trust auth, no TLS)."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/postgres?sslmode=disable"

    def start(self) -> LocalPostgres:
        """initdb, configure and start; on any failure (or Ctrl-C) nothing is left behind."""
        self._on_step("looking for the PostgreSQL server binaries")
        bindir = self._bindir = find_bindir()
        if self._as_postgres and shutil.which("runuser") is None:
            raise LocalPgError("running as root needs `runuser` to start PostgreSQL as the postgres "
                               "user; run pgscout demo as an ordinary user instead")
        self.base = Path(tempfile.mkdtemp(prefix="pgscout-demo-pg-"))
        try:
            if self._as_postgres:
                try:
                    shutil.chown(self.base, SUPERUSER, SUPERUSER)
                except LookupError:
                    raise LocalPgError("running as root needs a `postgres` OS user to own the server "
                                       "(PostgreSQL refuses to run as root)") from None
            self._on_step(f"creating a throwaway cluster in {self.base} (initdb)")
            self._run(bindir / "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
            self.port = free_port()
            self._configure()
            self._on_step(f"starting PostgreSQL on {HOST}:{self.port}")
            self._run(bindir / "pg_ctl", "start", "-w", "-t", str(SERVER_TIMEOUT_SECONDS),
                      "-D", str(self.data_dir), "-l", str(self.base / "postgres.log"))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server at once (there is nothing to keep) and remove its dir."""
        if self.base is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(self._command(self._bindir / "pg_ctl", "stop", "-w", "-m", "immediate",
                                         "-t", str(SERVER_TIMEOUT_SECONDS), "-D", str(self.data_dir)),
                           cwd=self.base, capture_output=True, timeout=SERVER_TIMEOUT_SECONDS,
                           start_new_session=True)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def _configure(self) -> None:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "50",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        append_settings(self.data_dir, "pgscout demo: a throwaway server", settings)

    def _command(self, tool: Path, *args: str) -> list[str]:
        return as_server_user([str(tool), *args])

    def _run(self, tool: Path, *args: str) -> None:
        argv = self._command(tool, *args)
        # A session of its own: Ctrl-C in the terminal reaches pgscout, which stops the server in
        # order, instead of the server shutting down under the proxy's feet.
        result = subprocess.run(argv, cwd=self.base, capture_output=True, text=True,
                                timeout=SERVER_TIMEOUT_SECONDS * 2, start_new_session=True)
        if result.returncode != 0:
            log = self.base / "postgres.log"
            server_log = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise LocalPgError(f"{tool.name} failed (exit {result.returncode}):\n"
                               f"{result.stderr.strip() or result.stdout.strip()}\n{server_log}".rstrip())
