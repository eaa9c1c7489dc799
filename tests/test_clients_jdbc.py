"""pgJDBC through pgscout: a Java service sees what it sees directly, and pgscout counts and
judges its statements as it does Python's.

Owns: running tests/clients/JdbcClient.java (Java's single-file launcher, Debian's pgJDBC jar)
directly and through pgscout and comparing what it printed; pgscout's per-fingerprint counts of
the driver's batches, retries and COPY; its N+1 verdict on a JDBC loop, which crosses from
unnamed to named server-side statements at the driver's fifth execution (prepareThreshold).
Must not: share tables between routes (each gets its own name, replaced before comparing).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from orm_models import AUTHORS, BOOKS
from pgharness import APP_DATABASE, LOOPBACK, run_client
from test_nplusone_e2e import (RAW_AUTHORS_SQL, RAW_BOOKS_SQL, api,  # noqa: F401
                               app_name, assert_loop, assert_not_flagged, bookshop, findings,
                               fingerprint, only)  # (app_name and bookshop are fixtures)

CLIENT = Path(__file__).parent / "clients" / "JdbcClient.java"
# Debian's libpostgresql-jdbc-java (.ci/run installs it with a JDK).
DRIVER_JAR = Path("/usr/share/java/postgresql.jar")
ANY_BOOKS_SQL = "SELECT id, title FROM np_books WHERE author_id = ANY($1) ORDER BY id"


def jdbc(mode: str, port: int, app: str, *args: str) -> str:
    assert shutil.which("java"), "java is missing: install Debian's default-jdk-headless (.ci/run does)"
    assert DRIVER_JAR.is_file(), \
        f"{DRIVER_JAR} is missing: install Debian's libpostgresql-jdbc-java (.ci/run does)"
    url = (f"jdbc:postgresql://{LOOPBACK}:{port}/{APP_DATABASE}?user=trust_user&sslmode=disable"
           f"&ApplicationName={app}")
    return run_client(["java", "-cp", str(DRIVER_JAR), str(CLIENT), mode, url, *args],
                      timeout=120).stdout


@pytest.fixture
def table() -> str:
    return f"jdbc_{uuid.uuid4().hex[:8]}"


def test_scenario_prints_the_same_directly_and_through_pgscout(pg, pgscout, app_name, table):
    direct = jdbc("scenario", pg.port, app_name, f"{table}_direct")
    proxied = jdbc("scenario", pgscout.port, app_name, f"{table}_proxy")
    assert proxied.replace(f"{table}_proxy", "T") == direct.replace(f"{table}_direct", "T")
    # The features ran, and ran the way the server answers them.
    assert "batch exc 23505 [" in direct
    assert direct.count("EXC PSQLException 57014 ERROR: canceling statement") == 2
    assert "copy dup 23505" in direct and "500\n10\n" in direct
    assert "jdbc_chan hello" in direct
    assert direct.endswith("== done\n")


def test_statements_are_counted_as_the_server_ran_them(pgscout, app_name, table):
    jdbc("scenario", pgscout.port, app_name, table)
    seen = {entry["fingerprint"]: entry
            for entry in api(pgscout, "/api/fingerprints?limit=1000")["fingerprints"]}

    def stats(sql: str) -> tuple[int, int, dict]:
        entry = seen[fingerprint(sql.format(t=table))]
        return entry["calls"], entry["rows"], entry["errors"]

    # 200 rows in one batch, then a batch of 10 whose 6th row is a duplicate: the server ran 5,
    # failed one and skipped the rest of that Sync.
    assert stats("insert into {t} (id, name) values ($1, $2)") == (206, 205, {"23505": 1})
    # Eight prepared executions crossing into a named statement: all one fingerprint.
    assert stats("insert into {t} values ($1, $2, $3, $4, $5, $6)") == (12, 12, {})
    # After ALTER TABLE the cached plan fails once (0A000) and the driver runs it again.
    assert stats("select * from {t} where id = $1") == (9, 8, {"0A000": 1})
    assert stats("copy {t} (id, name) from stdin") == (2, 500, {"23505": 1})


def test_jdbc_loop_is_flagged(pgscout, bookshop, app_name):
    assert jdbc("loop", pgscout.port, app_name) == f"{AUTHORS} authors, {BOOKS} books\n"
    assert_loop(only(findings(pgscout, app_name)), RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS,
                fix="author_id = ANY($1)")


def test_jdbc_array_lookup_is_not_flagged(pgscout, bookshop, app_name):
    assert jdbc("any", pgscout.port, app_name) == f"{AUTHORS} authors, {BOOKS} books\n"
    assert_not_flagged(pgscout, app_name, RAW_AUTHORS_SQL, ANY_BOOKS_SQL)
