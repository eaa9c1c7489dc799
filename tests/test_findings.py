"""The findings observers from event sequences alone (the real-server tests are in
test_findings_e2e.py): which DDL is risky, which statement a missing index would serve, how a
session's statement_timeout is worked out, and the bounds of the findings table."""

from __future__ import annotations

import pytest

from pgscout.analysis import sqlshape
from pgscout.analysis.findings import MAX_FINDINGS, Findings
from pgscout.analysis.fingerprint import Fingerprinter
from pgscout.analysis.migrations import BlockingMigrations
from pgscout.analysis.timeouts import StatementTimeouts, is_zero
from pgscout.dataplane.events import Session, StatementDone, TransactionEnded


def trees(sql: str):
    return sqlshape.statements(sql, sql)


@pytest.mark.parametrize("sql, operations", [
    ("CREATE INDEX i ON orders (customer_id)", ["create_index"]),
    ("CREATE UNIQUE INDEX i ON s.orders (customer_id)", ["create_index"]),
    ("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES customers (id)", ["add_foreign_key"]),
    ("ALTER TABLE orders ALTER COLUMN c SET NOT NULL", ["set_not_null"]),
    ("ALTER TABLE orders ADD COLUMN t uuid NOT NULL DEFAULT gen_random_uuid()", ["add_column_volatile_default"]),
    ("ALTER TABLE orders ALTER COLUMN c TYPE bigint", ["alter_column_type"]),
    ("BEGIN; CREATE INDEX i ON a (x); ALTER TABLE b ALTER COLUMN y TYPE text; COMMIT",
     ["create_index", "alter_column_type"]),
    # The safe recipes:
    ("CREATE INDEX CONCURRENTLY i ON orders (customer_id)", []),
    ("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES customers (id) NOT VALID", []),
    ("ALTER TABLE orders VALIDATE CONSTRAINT fk", []),
    ("ALTER TABLE orders ADD COLUMN t int NOT NULL DEFAULT $1", []),
    ("ALTER TABLE orders ADD COLUMN t timestamptz NOT NULL DEFAULT now()", []),
    ("ALTER TABLE orders ADD COLUMN t int", []),
])
def test_risky_ddl(sql, operations):
    assert [op for op, *_ in sqlshape.risky_ddl(trees(sql))] == operations


@pytest.mark.parametrize("sql, shape", [
    ("SELECT id FROM books WHERE $1 = books.author_id", (None, "books", ("author_id",))),
    ("SELECT id FROM s.books b WHERE b.author_id = ANY($1) AND title = $2",
     ("s", "books", ("author_id", "title"))),
    ("UPDATE books SET title = $1 WHERE author_id = $2::int", (None, "books", ("author_id",))),
    ("DELETE FROM books WHERE author_id IN ($1, $2)", (None, "books", ("author_id",))),
    ("SELECT * FROM books JOIN authors ON authors.id = books.author_id WHERE name = $1", None),
    ("SELECT * FROM books WHERE author_id > $1", None),
    ("SELECT * FROM books WHERE a = $1 OR b = $2", None),
    ("SELECT 1", None),
])
def test_equality_filter(sql, shape):
    assert sqlshape.equality_filter(trees(sql)) == shape


@pytest.mark.parametrize("value, zero", [
    ("0", True), ("0ms", True), ("0 s", True), ("5s", False), ("5000", False), ("1min", False),
    ("nonsense", None), ("5 parsecs", None), (None, None)])
def test_is_zero(value, zero):
    assert is_zero(value) is zero


def statement(session, sql, sent_at=0.0, duration=0.0, txn_status="I", sqlstate=None):
    ev = StatementDone(session, sql, 1, False, sent_at, sent_at + duration, "SELECT 1", 1,
                       sqlstate, None, 0, None, False, txn_status)
    fingerprinter.on_statement(ev)
    return ev


fingerprinter = Fingerprinter(cache_size=100, display_chars=2048)


class Recorder:
    def __init__(self):
        self.logged = []
        self.findings = Findings(emit=self.logged.append)


@pytest.mark.parametrize("startup, statements, found", [
    ({}, [], True),
    ({"statement_timeout": "5s"}, [], False),
    ({"options": "-c statement_timeout=5s"}, [], False),
    ({"options": "--statement-timeout=0"}, [], True),
    ({}, ["SET statement_timeout = '5s'"], False),
    ({}, ["SET LOCAL statement_timeout = '5s'"], True),
    ({}, ["SELECT set_config('statement_timeout', '5s', false)"], False),
    ({"statement_timeout": "5s"}, ["SET statement_timeout TO 0"], True),
    ({}, ["SET statement_timeout = '5s'", "RESET ALL"], True),
    ({}, ["SET statement_timeout = '5s'; SET statement_timeout = DEFAULT"], True),
])
def test_session_statement_timeout(startup, statements, found):
    recorder = Recorder()
    timeouts = StatementTimeouts(recorder.findings, min_statement_ms=100)
    timeouts.set_defaults({("", ""): "0", ("someone", ""): "10s"})
    session = Session(conn_id=1, client_addr="x", user="app", database="app",
                      application_name="web", startup=startup)
    for sql in statements:
        timeouts.on_statement(statement(session, sql))
    timeouts.on_statement(statement(session, "SELECT pg_sleep(0.5)", duration=0.5))
    assert bool(recorder.findings.listing()) is found


def test_set_local_lasts_to_the_end_of_its_transaction():
    recorder = Recorder()
    timeouts = StatementTimeouts(recorder.findings, min_statement_ms=100)
    timeouts.set_defaults({("", ""): "0"})
    session = Session(conn_id=1, client_addr="x", application_name="web")
    for sql, duration, status in (("BEGIN", 0, "T"), ("SET LOCAL statement_timeout = '2s'", 0, "T"),
                                  ("SELECT pg_sleep(1)", 1, "T"), ("COMMIT", 0, "I")):
        timeouts.on_statement(statement(session, sql, duration=duration, txn_status=status))
    assert recorder.findings.listing() == []
    timeouts.on_statement(statement(session, "SELECT pg_sleep(1)", duration=1))
    assert len(recorder.findings.listing()) == 1


def test_no_judgement_before_the_catalog_is_read_or_for_a_role_default():
    recorder = Recorder()
    timeouts = StatementTimeouts(recorder.findings, min_statement_ms=100)
    session = Session(conn_id=1, client_addr="x", user="app", database="app")
    timeouts.on_statement(statement(session, "SELECT pg_sleep(1)", duration=1))
    timeouts.set_defaults({("", ""): "0", ("app", ""): "30s"})
    timeouts.on_statement(statement(session, "SELECT pg_sleep(1)", duration=1))
    assert recorder.findings.listing() == []


def test_a_waiter_on_the_migrated_table_makes_a_blocking_migration():
    recorder = Recorder()
    migrations = BlockingMigrations(recorder.findings, min_wait_ms=200)
    migrator = Session(conn_id=1, client_addr="x", application_name="migrate")
    writer = Session(conn_id=2, client_addr="y", application_name="web")
    bystander = Session(conn_id=3, client_addr="z", application_name="web")
    migrations.on_statement(statement(migrator, "CREATE INDEX i ON orders (c)", 10.0, 0.1, "T"))
    migrations.on_statement(statement(migrator, "SELECT pg_sleep(2)", 10.1, 2.0, "T"))
    # Queued behind the lock, released at commit (12.2): its reply may even come first.
    migrations.on_statement(statement(writer, "INSERT INTO orders VALUES (42, 'secret')", 10.5, 1.69))
    # Slow too, but on another table.
    migrations.on_statement(statement(bystander, "SELECT * FROM customers", 10.5, 1.7))
    migrations.on_transaction(TransactionEnded(migrator, 10.0, 12.2, "commit", 0.0))
    migrations.flush(12.5)
    assert recorder.findings.listing() == []  # judged only after the grace period
    migrations.flush(13.3)
    [finding] = recorder.findings.listing()
    assert finding["kind"] == "blocking_migration"
    assert finding["evidence"]["lock_held_ms"] == pytest.approx(2200)
    assert [(w["application_name"], w["statement"], w["delay_ms"])
            for w in finding["evidence"]["waiters"]] == [
        ("web", "INSERT INTO orders VALUES ($1, $2)", pytest.approx(1690))]
    assert "secret" not in repr(finding) and recorder.logged == [finding]


def test_a_migration_nobody_waited_for_is_no_finding():
    recorder = Recorder()
    migrations = BlockingMigrations(recorder.findings, min_wait_ms=200)
    migrator = Session(conn_id=1, client_addr="x")
    writer = Session(conn_id=2, client_addr="y")
    migrations.on_statement(statement(migrator, "CREATE INDEX i ON orders (c)", 10.0, 1.0))
    migrations.on_statement(statement(writer, "INSERT INTO orders VALUES (1)", 10.2, 0.01))
    migrations.on_statement(statement(writer, "INSERT INTO orders VALUES (1)", 11.5, 0.5))
    migrations.flush(20.0)
    assert recorder.findings.listing() == []


def test_the_findings_table_is_bounded_and_repeats_update_one_entry():
    recorder = Recorder()
    for index in range(MAX_FINDINGS + 10):
        recorder.findings.record("missing_index", f"t{index}", "warning",
                                 {"application_name": "web"}, {}, "fix")
    recorder.findings.record("missing_index", f"t{MAX_FINDINGS + 9}", "critical",
                             {"application_name": "web"}, {"n": 2}, "fix")
    listed = recorder.findings.listing()
    assert len(listed) == MAX_FINDINGS
    assert listed[0]["occurrences"] == 2 and listed[0]["severity"] == "critical"
    assert len(recorder.logged) == MAX_FINDINGS + 11  # the severity rise is logged again
    assert recorder.findings.counts() == {("missing_index", "warning", "web"): MAX_FINDINGS + 10,
                                          ("missing_index", "critical", "web"): 1}


def test_a_bad_threshold_names_its_key():
    from pgscout.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"^PGSCOUT_FINDINGS_LONG_TRANSACTION_SECONDS "
                                          r"\(findings.long_transaction_seconds\): must be greater than 0"):
        load_settings(None, {"PGSCOUT_FINDINGS_LONG_TRANSACTION_SECONDS": "0"})
    with pytest.raises(ConfigError, match=r"^findings.missing_index_min_table_rows: expected an integer"):
        load_settings(None, {}, {"findings.missing_index_min_table_rows": "many"})


def test_idle_in_transaction_needs_the_server_to_say_so_for_that_very_backend():
    from pgscout.analysis.opentransactions import OpenTransactions

    recorder = Recorder()
    blocks = OpenTransactions(recorder.findings, long_seconds=60, idle_seconds=1)
    session = Session(conn_id=1, client_addr="x", user="app", application_name="web",
                      backend_pid=4242)
    blocks.on_statement(statement(session, "BEGIN", 10.0, 0.001, "T"))
    blocks.on_statement(statement(session, "UPDATE t SET a = 1 WHERE id = 2", 10.001, 0.002, "T"))
    assert blocks.idle_candidates(10.5) == {}
    candidates = blocks.idle_candidates(12.0)
    assert candidates == {4242: 1}
    row = {"state": "idle in transaction", "seconds": 2.0, "usename": "app", "application_name": "web"}
    # Still running a statement, or another backend behind a pooler that reuses the pid:
    blocks.confirm_idle(candidates, {4242: {**row, "state": "active"}}, 12.0)
    blocks.confirm_idle(candidates, {4242: {**row, "usename": "someone"}}, 12.0)
    assert recorder.findings.listing() == []
    blocks.confirm_idle(candidates, {4242: row}, 12.0)
    [finding] = recorder.findings.listing()
    assert finding["kind"] == "idle_in_transaction" and finding["severity"] == "critical"
    assert finding["evidence"]["wrote"] is True
    assert blocks.idle_candidates(13.0) == {}  # once per transaction
