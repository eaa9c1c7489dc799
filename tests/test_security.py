"""What pgscout keeps and shows: no secret from the traffic, and the admin API behind a token."""

from __future__ import annotations

import re
import time
import urllib.request

import asyncio

import asyncpg
import psycopg

from pgharness import SUPERUSER, wait_until

SECRET = "hunter2-Sw0rdf1sh-pgscout"


def _everything_pgscout_shows(proxy, headers: dict[str, str] | None = None) -> str:
    shown = [proxy.stdout()]
    for path in ("/metrics", "/api/fingerprints?limit=1000", "/api/nplusone", "/api/slow",
                 "/api/connections", "/api/overview"):
        request = urllib.request.Request(f"http://{proxy.host}:{proxy.admin_port}{path}",
                                         headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as response:
            shown.append(response.read().decode())
    return "\n".join(shown)


def test_a_secret_in_literals_passwords_and_parameters_appears_nowhere(start_pgscout):
    # Everything slow, so every statement also goes through the slow log.
    proxy = start_pgscout(env={"PGSCOUT_SLOWLOG_THRESHOLD_MS": "0", "PGSCOUT_SLOWLOG_MAX_PER_SECOND": "0"})
    with psycopg.connect(proxy.dsn(SUPERUSER), autocommit=True) as conn:
        conn.execute("create temp table vault (owner text, secret text)")
        conn.execute(f"insert into vault values ('alice', '{SECRET}')")
        conn.execute(f"select * from vault where secret = '{SECRET}'")
        conn.execute(f"select * from vault where secret = $${SECRET}$$")
        conn.execute("select * from vault where secret = %s", (SECRET,))  # bound parameter
        conn.execute(f"alter role trust_user password '{SECRET}'")
        conn.execute(f"select 1 /* note='{SECRET}' */")
        try:
            conn.execute(f"select * from vault where secret = '{SECRET}' and nonsense(")
        except psycopg.errors.SyntaxError:
            pass
        conn.execute("create sequence vault_seq start with 90210")
        conn.execute("alter sequence vault_seq restart with 90210")
        # With standard_conforming_strings off, a backslash escapes the quote: one literal.
        conn.execute("set standard_conforming_strings = off")
        conn.execute(f"select * from vault where owner = 'O\\'Brien {SECRET}'")
        conn.execute("set standard_conforming_strings = on")
        for _ in range(12):  # a burst, so the N+1 detector looks at it too
            conn.execute("select * from vault where owner = %s", (f"{SECRET}-{_}",))
        conn.execute("alter role trust_user password null")

    async def bound_through_asyncpg() -> None:
        connection = await asyncpg.connect(proxy.dsn(SUPERUSER, connect_timeout=None))
        await connection.fetch("select $1::text", SECRET)
        await connection.close()
    asyncio.run(bound_through_asyncpg())

    assert wait_until(lambda: b"slow_query" in proxy.stdout().encode(), 5)
    time.sleep(1.5)  # let the N+1 detector's idle gap close its segment
    shown = _everything_pgscout_shows(proxy)
    assert "slow_query" in shown and "pgscout_statements_total" in shown
    assert SECRET not in shown
    assert "hunter2" not in shown
    # Numbers in DDL are literals too. As a number of its own: timings such as
    # 2.902100095525384e-05 may hold the same digits.
    assert not re.search(r"(?<![\d.])90210(?!\d)", shown)


def test_the_admin_token_guards_metrics_and_the_api_but_not_health(start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_ADMIN_TOKEN": "s3cret-token"})
    for path in ("/metrics", "/api/overview", "/api/fingerprints"):
        status, body = proxy.admin_get(path)
        assert status == 401, (path, status)
        assert "s3cret-token" not in body
    assert proxy.admin_get("/healthz")[0] == 200
    assert proxy.admin_get("/readyz")[0] == 200
    shown = _everything_pgscout_shows(proxy, {"Authorization": "Bearer s3cret-token"})
    assert "pgscout_build_info" in shown
    wrong = urllib.request.Request(f"http://{proxy.host}:{proxy.admin_port}/metrics",
                                   headers={"Authorization": "Bearer nope"})
    try:
        urllib.request.urlopen(wrong, timeout=5)
        raise AssertionError("a wrong token was accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 401
    assert "s3cret-token" not in proxy.stdout()


def test_the_admin_server_binds_loopback_by_default():
    from pgscout.settings import load_settings
    settings = load_settings(None, {})
    assert settings.admin.listen.host == "127.0.0.1"
    assert settings.proxy.listen.host == "127.0.0.1"
