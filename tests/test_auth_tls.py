"""Authentication passed through pgscout untouched, and TLS on the pgscout->PostgreSQL leg.

Owns: trust/md5/SCRAM through the proxy compared with direct (success and the server's own
wrong-password error), and upstream sslmode behaviour (encrypted leg visible in pg_stat_ssl,
certificate checks that fail with an error naming the upstream).
Must not: depend on how the proxy implements TLS; only what a client and the server can see counts.
"""

from __future__ import annotations

import re
import statistics
import time

import asyncpg
import psycopg
import pytest
import trustme

from pgharness import APP_DATABASE, LOOPBACK, UNCERTIFIED_LOOPBACK, write_serving_certificate

USERS = ["trust_user", "md5_user", "scram_user"]
# A wrong password must come back as the server's answer, well before any client or proxy timeout.
AUTH_FAILURE_SECONDS = 5.0
TLS_FAILURE_SECONDS = 5.0


def whoami(dsn: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT current_user, current_database(),"
            " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
        ).fetchone()


async def asyncpg_whoami(dsn: str) -> tuple:
    conn = await asyncpg.connect(dsn)
    try:
        return tuple(await conn.fetchrow("SELECT current_user, current_database()"))
    finally:
        await conn.close()


def connection_error(dsn: str) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as error:
        psycopg.connect(dsn).close()
    return str(error.value), time.monotonic() - started


async def asyncpg_connection_error(dsn: str) -> tuple[asyncpg.PostgresError, float]:
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as error:
        await (await asyncpg.connect(dsn)).close()
    return error.value, time.monotonic() - started


def server_message(libpq_error: str) -> str:
    """The server's part of a libpq connection error (libpq prefixes the address it dialled)."""
    match = re.search(r"(FATAL|ERROR):.*", libpq_error, re.DOTALL)
    return match.group(0).strip() if match else libpq_error


@pytest.mark.parametrize("user", USERS)
def test_password_methods_pass_through(pg, pgscout, user):
    dsns = pg.route_dsns(pgscout, user=user)
    direct = whoami(dsns["direct"])
    assert direct == (user, APP_DATABASE, False)
    assert whoami(dsns["proxy"]) == direct


@pytest.mark.parametrize("user", USERS)
async def test_password_methods_pass_through_asyncpg(pg, pgscout, user):
    dsns = pg.route_dsns(pgscout, user=user, connect_timeout=None)
    assert await asyncpg_whoami(dsns["direct"]) == (user, APP_DATABASE)
    assert await asyncpg_whoami(dsns["proxy"]) == (user, APP_DATABASE)


@pytest.mark.parametrize("user", ["md5_user", "scram_user"])
def test_wrong_password_gives_the_servers_error(pg, pgscout, user):
    dsns = pg.route_dsns(pgscout, user=user, password="not-the-password")
    direct_message, _ = connection_error(dsns["direct"])
    proxy_message, proxy_seconds = connection_error(dsns["proxy"])
    assert f'password authentication failed for user "{user}"' in direct_message
    assert server_message(proxy_message) == server_message(direct_message)
    assert proxy_seconds < AUTH_FAILURE_SECONDS


@pytest.mark.parametrize("user", ["md5_user", "scram_user"])
async def test_wrong_password_sqlstate_is_28P01(pg, pgscout, user):
    dsns = pg.route_dsns(pgscout, user=user, password="not-the-password", connect_timeout=None)
    for route in ("direct", "proxy"):
        error, seconds = await asyncpg_connection_error(dsns[route])
        assert error.sqlstate == "28P01", f"{route}: {error!r}"
        assert seconds < AUTH_FAILURE_SECONDS, f"{route}: took {seconds:.1f} s"


def test_plaintext_upstream_leg_is_not_encrypted(pg, pgscout):
    assert whoami(pgscout.dsn("trust_user", APP_DATABASE)) == ("trust_user", APP_DATABASE, False)


@pytest.mark.parametrize("sslmode", ["prefer", "require", "verify-ca", "verify-full"])
def test_upstream_tls_leg_is_encrypted(pg, start_pgscout, sslmode):
    trust = {"sslrootcert": pg.ca_cert} if sslmode.startswith("verify") else {}
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode=sslmode, **trust))
    # The app->sidecar leg stays plaintext; pg_stat_ssl shows the sidecar->server leg.
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, sslmode="disable")) as conn:
        ssl, version = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert ssl is True
    assert version.startswith("TLS")


# A direct TLS connect on loopback takes a few ms; pgscout's hop adds about one more.
TLS_CONNECT_OVERHEAD_SECONDS = 0.02


def median_connect_seconds(dsn: str, samples: int = 7) -> float:
    times = []
    for _ in range(samples):
        started = time.monotonic()
        psycopg.connect(dsn).close()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def test_a_tls_upstream_leg_connects_about_as_fast_as_direct_tls(pg, start_pgscout):
    """Each session's TLS leg costs what a direct TLS connection costs. Found with node-postgres'
    and psycopg's own suites (test_notify's timings): pgscout built a fresh TLS context per
    session, loading the system CA store, ~50 ms on the event loop for every connect."""
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="require"))
    assert whoami(proxy.dsn("trust_user", APP_DATABASE))[2] is True  # the leg is TLS, and warm
    direct = median_connect_seconds(pg.dsn("trust_user", APP_DATABASE, sslmode="require"))
    through = median_connect_seconds(proxy.dsn("trust_user", APP_DATABASE))
    assert through < direct + TLS_CONNECT_OVERHEAD_SECONDS, (direct, through)


def test_verify_ca_does_not_check_the_host_name(pg, start_pgscout):
    proxy = start_pgscout(
        upstream=pg.upstream_url(host=UNCERTIFIED_LOOPBACK, sslmode="verify-ca", sslrootcert=pg.ca_cert)
    )
    assert whoami(proxy.dsn("trust_user", APP_DATABASE)) == ("trust_user", APP_DATABASE, True)


def test_verify_full_rejects_a_certificate_for_another_host(pg, start_pgscout):
    # libpq's own verdict on the same server, for reference: the name check is what fails.
    direct_message, _ = connection_error(
        pg.dsn("trust_user", APP_DATABASE, host=UNCERTIFIED_LOOPBACK, sslmode="verify-full", sslrootcert=pg.ca_cert)
    )
    assert "does not match host name" in direct_message

    proxy = start_pgscout(
        upstream=pg.upstream_url(host=UNCERTIFIED_LOOPBACK, sslmode="verify-full", sslrootcert=pg.ca_cert)
    )
    message, seconds = connection_error(proxy.dsn("trust_user", APP_DATABASE))
    assert UNCERTIFIED_LOOPBACK in message, message
    assert re.search(r"certificate|verif|host ?name|match", message, re.IGNORECASE), message
    assert seconds < TLS_FAILURE_SECONDS


async def test_verify_full_failure_is_a_connection_exception(pg, start_pgscout):
    proxy = start_pgscout(
        upstream=pg.upstream_url(host=UNCERTIFIED_LOOPBACK, sslmode="verify-full", sslrootcert=pg.ca_cert)
    )
    error, seconds = await asyncpg_connection_error(proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None))
    assert error.sqlstate.startswith("08"), repr(error)
    assert seconds < TLS_FAILURE_SECONDS


def test_verify_full_rejects_an_unknown_ca(pg, start_pgscout, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=other_ca))
    message, seconds = connection_error(proxy.dsn("trust_user", APP_DATABASE))
    assert f"{LOOPBACK}" in message, message
    assert re.search(r"certificate|verif", message, re.IGNORECASE), message
    assert seconds < TLS_FAILURE_SECONDS


def test_sslrootcert_is_the_only_trusted_ca(pg, start_pgscout, tmp_path):
    """libpq: with sslrootcert=FILE only that file's CAs are trusted, not the system store. Here
    the system store (OpenSSL's SSL_CERT_FILE) holds the server's CA and sslrootcert another:
    libpq refuses the server, and so must pgscout, else a public CA's certificate for the host
    would pass verify-full."""
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    direct_message, _ = connection_error(
        pg.dsn("trust_user", APP_DATABASE, sslmode="verify-full", sslrootcert=other_ca))
    assert re.search(r"certificate|verif", direct_message, re.IGNORECASE), direct_message
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=other_ca),
                          env={"SSL_CERT_FILE": str(pg.ca_cert)})
    message, seconds = connection_error(proxy.dsn("trust_user", APP_DATABASE))
    assert re.search(r"certificate|verif", message, re.IGNORECASE), message
    assert seconds < TLS_FAILURE_SECONDS


def test_an_unreadable_sslrootcert_is_logged_at_start_and_fails_connects(pg, start_pgscout, tmp_path):
    """The upstream TLS context is built at start: a missing CA file is said then, in the log,
    not only to the first client, and connects fail as they would directly (libpq: "could not
    read root certificate file")."""
    missing = tmp_path / "missing-ca.pem"
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=missing))
    errors = [line for line in proxy.logs() if line.get("event") == "upstream_tls_unusable"]
    assert errors and f'could not read root certificate file "{missing}"' in errors[0]["error"], \
        proxy.output()
    message, _ = connection_error(proxy.dsn("trust_user", APP_DATABASE))
    assert f'could not read root certificate file "{missing}": No such file' in message, message


@pytest.mark.parametrize("user", ["scram_user", "md5_user"])
def test_password_auth_over_a_tls_upstream_leg(pg, start_pgscout, user):
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=pg.ca_cert))
    assert whoami(proxy.dsn(user, APP_DATABASE)) == (user, APP_DATABASE, True)
    wrong_password_message, _ = connection_error(proxy.dsn(user, APP_DATABASE, password="not-the-password"))
    assert f'password authentication failed for user "{user}"' in wrong_password_message


async def test_scram_over_a_tls_upstream_leg_asyncpg(pg, start_pgscout):
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=pg.ca_cert))
    dsn = proxy.dsn("scram_user", APP_DATABASE, connect_timeout=None)
    assert await asyncpg_whoami(dsn) == ("scram_user", APP_DATABASE)


def test_client_tls_termination_with_a_configured_certificate(tmp_path, start_pgscout):
    """proxy.client_tls_cert/key: pgscout answers SSLRequest with S and clients verify it."""
    cert, key, ca_file = write_serving_certificate(tmp_path)
    proxy = start_pgscout(env={"PGSCOUT_PROXY_CLIENT_TLS_CERT": str(cert),
                               "PGSCOUT_PROXY_CLIENT_TLS_KEY": str(key)})
    dsn = proxy.dsn("scram_user", "app", sslmode="verify-full", sslrootcert=str(ca_file))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)
        assert conn.pgconn.ssl_in_use
    # Plaintext clients are still served.
    with psycopg.connect(proxy.dsn("trust_user", "app", sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
