"""A throwaway PgBouncer in session mode, the baseline pgscout is compared against.

Owns: writing its ini file (session pooling, no client auth, a pool as large as the benchmark's
largest client count), starting it as the `postgres` OS user (it refuses to run as root) and
stopping it.
Must not: tune PgBouncer beyond what a session-mode deployment in front of one database needs;
the comparison is against PgBouncer as people run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pgharness import LOOPBACK, free_port, wait_listening

START_TIMEOUT_SECONDS = 10.0


class PgBouncer:
    def __init__(self, upstream_host: str, upstream_port: int, database: str, user: str,
                 password: str | None, max_clients: int) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="pgscout-bench-pgbouncer-"))
        self.ini_file = self.workdir / "pgbouncer.ini"
        self.log_file = self.workdir / "pgbouncer.log"
        # auth_type=any logs every client in as the user named on the database line.
        server_login = f"user={user}" + (f" password={password}" if password else "")
        self.ini_file.write_text(
            "[databases]\n"
            f"{database} = host={upstream_host} port={upstream_port} dbname={database} {server_login}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            "pool_mode = session\n"
            f"max_client_conn = {max_clients}\n"
            f"default_pool_size = {max_clients}\n"
            # Connection log lines cost PgBouncer a write per connect; production setups that care
            # about churn turn them off, and so does the benchmark.
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.log_file}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        argv = ["pgbouncer", str(self.ini_file)]
        if os.getuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            shutil.chown(self.ini_file, "postgres", "postgres")
            # -u switches to the user itself, so the Popen pid is PgBouncer's own (for its RSS).
            argv = ["pgbouncer", "-u", "postgres", str(self.ini_file)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, cwd=self.workdir)
        if not wait_listening(self.process, self.host, self.port, START_TIMEOUT_SECONDS):
            self.stop()
            raise RuntimeError(f"PgBouncer did not start listening on {self.host}:{self.port}\n{self.log_tail()}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "PgBouncer was never started"
        return self.process.pid

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-40:])
        except FileNotFoundError:
            return "(no log file)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def version() -> str:
    result = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0].strip() if result.stdout else "unknown"
