"""pgscout as an operator runs it: a dead upstream, health endpoints, SIGTERM drain, connection logs.

Owns: what a client, an orchestrator (probes, signals, exit code) and a log reader observe over a
proxy process's life.
Must not: read the proxy's internals; every check goes through a socket, a signal or stdout.
"""

from __future__ import annotations

import signal
import time

import asyncpg
import psycopg
import pytest

from pgharness import APP_DATABASE, LOOPBACK, accepts_tcp, free_port, wait_until

CONNECT_TIMEOUT_SECONDS = 2
DRAIN_TIMEOUT_SECONDS = 10


def dead_upstream_url() -> tuple[str, int]:
    port = free_port()
    return f"postgresql://{LOOPBACK}:{port}/postgres?sslmode=disable", port


async def test_dead_upstream_gives_08006_quickly(start_pgscout):
    upstream, port = dead_upstream_url()
    proxy = start_pgscout(upstream=upstream, env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)})
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as error:
        await asyncpg.connect(proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None), timeout=10)
    elapsed = time.monotonic() - started
    assert error.value.sqlstate == "08006", repr(error.value)
    assert f"{port}" in str(error.value), f"the error should name the upstream: {error.value}"
    assert elapsed < CONNECT_TIMEOUT_SECONDS + 1


def test_dead_upstream_error_reaches_libpq_clients(start_pgscout):
    upstream, port = dead_upstream_url()
    proxy = start_pgscout(upstream=upstream, env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)})
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as error:
        psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
    assert f"{LOOPBACK}:{port}" in str(error.value) or f"port {port}" in str(error.value), str(error.value)
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS + 1


def test_health_endpoints_with_a_live_upstream(pgscout):
    assert pgscout.admin_get("/healthz")[0] == 200
    assert pgscout.admin_get("/readyz")[0] == 200


def test_readyz_is_503_while_the_upstream_is_down(start_pgscout):
    upstream, _ = dead_upstream_url()
    proxy = start_pgscout(upstream=upstream, env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)})
    assert proxy.admin_get("/healthz")[0] == 200
    assert proxy.admin_get("/readyz")[0] == 503


def test_readyz_follows_the_upstream_going_down_and_up(pg, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)})
    assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 200, timeout=5)
    pg.stop()
    try:
        assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 503, timeout=10), "still ready with the server down"
        assert proxy.admin_get("/healthz")[0] == 200
    finally:
        pg.start()
    assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 200, timeout=10), "not ready again after the server came back"
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sigterm_drains_an_open_transaction(pg, start_pgscout):
    table = "drained_rows"
    pg.psql("-c", f"DROP TABLE IF EXISTS {table}", "-c", f"CREATE TABLE {table} (note text)",
            dsn=pg.dsn("trust_user", APP_DATABASE))
    proxy = start_pgscout(env={"PGSCOUT_PROXY_DRAIN_TIMEOUT_SECONDS": str(DRAIN_TIMEOUT_SECONDS)})
    conn = psycopg.connect(proxy.dsn("trust_user", APP_DATABASE))
    try:
        conn.execute(f"INSERT INTO {table} VALUES ('written during drain')")
        assert proxy.admin_get("/readyz")[0] == 200

        proxy.send_signal(signal.SIGTERM)
        assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 503, timeout=1.0), "/readyz did not go 503 at once"
        assert proxy.admin_get("/healthz")[0] == 200
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, connect_timeout=3)).close()

        conn.execute(f"INSERT INTO {table} VALUES ('second write')")
        conn.commit()
    finally:
        conn.close()
    started = time.monotonic()
    assert proxy.wait(timeout=DRAIN_TIMEOUT_SECONDS + 5) == 0
    assert time.monotonic() - started < DRAIN_TIMEOUT_SECONDS, "the process waited for the drain timeout with no session left"
    rows = pg.psql("-c", f"SELECT note FROM {table} ORDER BY note", dsn=pg.dsn("trust_user", APP_DATABASE)).stdout
    assert rows == "second write\nwritten during drain\n"


def test_drain_timeout_closes_idle_sessions_and_exits_0(start_pgscout):
    drain_seconds = 2
    proxy = start_pgscout(env={"PGSCOUT_PROXY_DRAIN_TIMEOUT_SECONDS": str(drain_seconds)})
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as conn:
        conn.execute("SELECT 1")
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=drain_seconds + 5) == 0
        assert time.monotonic() - started >= drain_seconds - 0.5, "exited before the drain timeout with a session open"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert not accepts_tcp(LOOPBACK, proxy.port)


def test_connection_log_lines(start_pgscout):
    proxy = start_pgscout()
    result_bytes = 100_000
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, application_name="lifecycle-probe")) as conn:
        assert len(conn.execute("SELECT repeat('x', %s)", (result_bytes,)).fetchone()[0]) == result_bytes

    def closed_lines():
        return [line for line in proxy.logs() if line.get("event") == "connection_closed"
                and line.get("application_name") == "lifecycle-probe"]

    assert wait_until(closed_lines, timeout=5), f"no connection_closed line:\n{proxy.stdout()}"
    opened = [line for line in proxy.logs() if line.get("event") == "connection_opened"]
    assert [(line.get("user"), line.get("database")) for line in opened] == [("trust_user", APP_DATABASE)], opened
    assert opened[0].get("client_addr", "").startswith(LOOPBACK), opened[0]
    assert opened[0].get("application_name") == "lifecycle-probe", opened[0]

    (closed,) = closed_lines()
    assert (closed["user"], closed["database"]) == ("trust_user", APP_DATABASE)
    assert closed["client_addr"].startswith(LOOPBACK)
    assert closed["bytes_from_server"] > result_bytes
    assert 0 < closed["bytes_from_client"] < 10_000
    assert 0 < closed["duration_seconds"] < 30
    # psycopg's close says Terminate: the client ended the session, though the server hangs up first.
    assert closed["reason"] == "client"


def test_connection_closed_by_the_server_says_so(pg, start_pgscout):
    proxy = start_pgscout()
    conn = psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, application_name="terminated-probe"))
    pid = conn.info.backend_pid
    with psycopg.connect(pg.dsn()) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()

    def closed_lines():
        return [line for line in proxy.logs() if line.get("event") == "connection_closed"
                and line.get("application_name") == "terminated-probe"]

    assert wait_until(closed_lines, timeout=5), f"no connection_closed line:\n{proxy.stdout()}"
    assert [line["reason"] for line in closed_lines()] == ["server"]
