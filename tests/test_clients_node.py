"""node-postgres and Sequelize through pgscout: a Node service sees what it sees directly, and
pgscout judges its ORM's loops.

Owns: running tests/clients/node/pg_scenario.js directly and through pgscout and comparing what
it printed, pgscout's counts of its statements, and the N+1 verdicts on Sequelize's lazy loads,
eager include and a many-to-one loaded per row (tests/clients/node/sequelize_books.js).
Must not: share tables between routes (each gets its own name, replaced before comparing), or
install packages (.ci/run runs `npm ci` in tests/clients/node).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from orm_models import AUTHORS, BOOKS
from pgharness import APP_DATABASE, LOOPBACK, run_client
from test_nplusone_e2e import (api, app_name, bookshop, findings, fingerprint,  # noqa: F401
                               only)  # (app_name and bookshop are fixtures)

CLIENTS = Path(__file__).parent / "clients" / "node"


def node(script: str, *args: str) -> str:
    assert shutil.which("node"), "node is missing: install Debian's nodejs and npm (.ci/run does)"
    assert (CLIENTS / "node_modules" / "sequelize").is_dir(), \
        f"{CLIENTS}/node_modules is missing: run `npm ci --prefix {CLIENTS}` (.ci/run does)"
    return run_client(["node", str(CLIENTS / script), *args], timeout=120).stdout


def url(port: int) -> str:
    return f"postgresql://trust_user@{LOOPBACK}:{port}/{APP_DATABASE}"


@pytest.fixture
def table() -> str:
    return f"node_{uuid.uuid4().hex[:8]}"


def test_pg_scenario_prints_the_same_directly_and_through_pgscout(pg, pgscout, table):
    direct = node("pg_scenario.js", url(pg.port), f"{table}_direct")
    proxied = node("pg_scenario.js", url(pgscout.port), f"{table}_proxy")
    assert proxied.replace(f"{table}_proxy", "T") == direct.replace(f"{table}_direct", "T")
    assert "ERR 57014 canceling statement due to statement timeout" in direct
    assert "dup 23505\naborted 25P02" in direct
    assert "node_chan hello" in direct and "2499\tc2499\n" in direct
    assert direct.endswith("== done\n")


def test_pg_statements_are_counted_as_the_server_ran_them(pgscout, table):
    node("pg_scenario.js", url(pgscout.port), table)
    seen = {entry["fingerprint"]: entry
            for entry in api(pgscout, "/api/fingerprints?limit=1000")["fingerprints"]}

    def stats(sql: str) -> tuple[int, int, dict]:
        entry = seen[fingerprint(sql.format(t=table))]
        return entry["calls"], entry["rows"], entry["errors"]

    assert stats("insert into {t} values ($1, $2, $3, $4, $5, $6)") == (8, 8, {})
    # A named statement: parsed once, bound six times.
    assert stats("select id, name, amount, at, data, tags from {t} where id = $1") == (6, 6, {})
    assert stats("copy {t} (id, name) from stdin") == (1, 500, {})
    # Both duplicate keys (1 in the aborted transaction, 100 under the savepoint): one shape.
    assert stats("insert into {t} (id) values (1)") == (2, 0, {"23505": 2})


def test_sequelize_lazy_loads_are_flagged_with_its_fix(pgscout, bookshop, app_name):
    assert node("sequelize_books.js", str(pgscout.port), app_name, "lazy") == f"{AUTHORS} {BOOKS}\n"
    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"], finding["stack"]) == ("n_plus_one", AUTHORS, "sequelize")
    assert 'FROM "np_authors"' in finding["owner_sql"] and 'FROM "np_books"' in finding["child_sql"]
    assert "Sequelize include" in finding["suggestion"]


def test_sequelize_include_is_not_flagged(pgscout, bookshop, app_name):
    assert node("sequelize_books.js", str(pgscout.port), app_name, "include") == f"{AUTHORS} {BOOKS}\n"
    assert findings(pgscout, app_name) == []


def test_sequelize_author_per_book_is_a_duplicate_of_few_keys(pgscout, bookshop, app_name):
    assert node("sequelize_books.js", str(pgscout.port), app_name,
                "per-book-author") == f"{BOOKS} {BOOKS}\n"
    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"]) == ("duplicate", BOOKS)
    assert f"ran {BOOKS} times for only {AUTHORS} distinct parameter sets" in finding["suggestion"]
    assert "Sequelize include" in finding["suggestion"]
