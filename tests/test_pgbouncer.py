"""pgscout beside PgBouncer, both ways round, as the README describes it.

Owns: that the same client work gives the same answers through pgscout in front of PgBouncer
(app -> pgscout -> PgBouncer -> PostgreSQL) and behind it (app -> PgBouncer -> pgscout ->
PostgreSQL), what pgscout observes in each case, and that backend pids are then PgBouncer's.
Must not: tune PgBouncer (benchmarks/pgbouncer.py runs it as a session-mode deployment does).
"""

from __future__ import annotations

import json
import sys

import psycopg
import pytest

from pgharness import APP_DATABASE, REPO_ROOT, wait_until

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
