"""pgscout beside PgBouncer, both ways round, as the README describes it.

Owns: that the same client work gives the same answers through pgscout in front of PgBouncer
(app -> pgscout -> PgBouncer -> PostgreSQL) and behind it (app -> PgBouncer -> pgscout ->
PostgreSQL), what pgscout observes in each case, that backend pids are then PgBouncer's, and SCRAM
over TLS in front of a PgBouncer that offers no channel binding.
Must not: tune PgBouncer (benchmarks/pgbouncer.py runs it as a session-mode deployment does).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import psycopg
import pytest

from pgharness import APP_DATABASE, PASSWORDS, REPO_ROOT, wait_until, write_serving_certificate

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from pgbouncer import PgBouncer  # noqa: E402

APPLICATION = "bouncer-app"


@pytest.fixture
def bouncer_factory():
    started: list[PgBouncer] = []

    def start(host: str, port: int) -> PgBouncer:
        bouncer = PgBouncer(host, port, APP_DATABASE, "trust_user", None, max_clients=20)
        started.append(bouncer)
        return bouncer.start()

    yield start
    for bouncer in started:
        bouncer.stop()


def api(proxy, path: str) -> dict:
    status, body = proxy.admin_get(path)
    assert status == 200, body
    return json.loads(body)


def work(dsn: str) -> tuple[int, list]:
    with psycopg.connect(dsn) as connection:
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        rows = connection.execute("SELECT g FROM generate_series(1, %s) g WHERE g %% 2 = 0", (6,)).fetchall()
    return pid, rows


def test_in_front_of_pgbouncer(pg, start_pgscout, bouncer_factory):
    bouncer = bouncer_factory(pg.host, pg.port)
    proxy = start_pgscout(upstream=f"postgresql://trust_user@{bouncer.host}:{bouncer.port}/{APP_DATABASE}"
                                   f"?sslmode=disable")
    dsn = proxy.dsn("trust_user", APP_DATABASE, application_name=APPLICATION)
    pid, rows = work(dsn)
    assert rows == [(2,), (4,), (6,)]
    assert wait_until(lambda: any("generate_series" in f["normalized"]
                                  for f in api(proxy, "/api/fingerprints")["fingerprints"]), timeout=5)
    assert proxy.admin_get("/readyz")[0] == 200
    # The pid pgscout logs is the one PgBouncer handed the client, not the server's backend.
    assert wait_until(lambda: [line for line in proxy.logs() if line.get("event") == "connection_closed"],
                      timeout=5)
    closed, = [line for line in proxy.logs() if line.get("event") == "connection_closed"]
    assert closed["backend_pid"] != pid
    # The control connection reads the real server's limits through PgBouncer.
    assert wait_until(lambda: api(proxy, "/api/connections")["upstream"]["max_connections"] == 200, timeout=10)


def test_behind_pgbouncer(pg, start_pgscout, bouncer_factory):
    proxy = start_pgscout()
    bouncer = bouncer_factory(proxy.host, proxy.port)
    dsn = (f"postgresql://trust_user@{bouncer.host}:{bouncer.port}/{APP_DATABASE}"
           f"?sslmode=disable&application_name={APPLICATION}")
    _, rows = work(dsn)
    assert rows == [(2,), (4,), (6,)]
    # pgscout sees PgBouncer's server connection, with the application_name PgBouncer passes on.
    assert wait_until(lambda: any("generate_series" in f["normalized"] and APPLICATION in f["applications"]
                                  for f in api(proxy, "/api/fingerprints")["fingerprints"]), timeout=5)
    live = api(proxy, "/api/connections")["live"]
    assert sum(row["count"] for row in live) == 1, live  # PgBouncer keeps its server connection


class TlsScramBouncer(PgBouncer):
    """PgBouncer terminating client TLS and authenticating clients with SCRAM itself: over TLS it
    offers SCRAM-SHA-256 alone (no -PLUS, no channel binding), so libpq's channel_binding=prefer
    answers with gs2 flag 'y', which PgBouncer accepts."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port, APP_DATABASE, "scram_user", PASSWORDS["scram_user"],
                         max_clients=20)
        cert, key, self.ca_file = write_serving_certificate(self.workdir)
        users = self.workdir / "users.txt"
        users.write_text(f'"scram_user" "{PASSWORDS["scram_user"]}"\n')
        key.chmod(0o600)
        ini = self.ini_file.read_text().replace("auth_type = any\n", (
            "auth_type = scram-sha-256\n"
            f"auth_file = {users}\n"
            "client_tls_sslmode = require\n"
            f"client_tls_cert_file = {cert}\n"
            f"client_tls_key_file = {key}\n"))
        self.ini_file.write_text(ini)
        if os.getuid() == 0:  # start() runs PgBouncer as postgres then
            for path in (cert, key, users):
                shutil.chown(path, "postgres", "postgres")


def test_scram_over_two_tls_legs_in_front_of_pgbouncer_without_channel_binding(pg, start_pgscout, tmp_path):
    """Directly, libpq over TLS to PgBouncer sends 'y' (no -PLUS offered) and PgBouncer accepts it.
    pgscout with TLS on both legs refuses 'y' only when the server offered -PLUS, so the same
    client gets in through it too."""
    bouncer = TlsScramBouncer(pg.host, pg.port).start()
    try:
        direct = (f"postgresql://scram_user:{PASSWORDS['scram_user']}@{bouncer.host}:{bouncer.port}/"
                  f"{APP_DATABASE}?sslmode=require")
        with psycopg.connect(direct) as conn:
            assert conn.execute("select current_user").fetchone() == ("scram_user",)
        cert, key, ca_file = write_serving_certificate(tmp_path)
        proxy = start_pgscout(upstream=f"postgresql://scram_user:{PASSWORDS['scram_user']}@{bouncer.host}:"
                                       f"{bouncer.port}/{APP_DATABASE}?sslmode=require",
                              env={"PGSCOUT_PROXY_CLIENT_TLS_CERT": str(cert),
                                   "PGSCOUT_PROXY_CLIENT_TLS_KEY": str(key)})
        dsn = proxy.dsn("scram_user", APP_DATABASE, sslmode="verify-full", sslrootcert=ca_file)
        with psycopg.connect(dsn) as conn:  # channel_binding=prefer: gs2 flag 'y'
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select current_user").fetchone() == ("scram_user",)
    finally:
        bouncer.stop()
