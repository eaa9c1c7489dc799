"""Slow-query log: thresholds, rate limit, redaction, parameters."""

import json

from pgscout.dataplane.events import Session, StatementDone
from pgscout.analysis.fingerprint import Fingerprinter
from pgscout.analysis.slowlog import SlowLog

WEB = Session(
    conn_id=1,
    client_addr="10.0.0.5:41234",
    user="app",
    database="shop",
    application_name="web",
    backend_pid=4242,
)
REPORTS = Session(conn_id=2, client_addr="10.0.0.6:41000", application_name="reports")


def done(ms, at=100.0, session=WEB, sql="SELECT * FROM orders WHERE id = 1", params=None):
    ev = StatementDone(
        session=session,
        sql=sql,
        statement_count=1,
        extended=params is not None,
        sent_at=at - ms / 1000,
        done_at=at,
        tag="SELECT 1",
        rows=1,
        sqlstate=None,
        param_sig=None,
        n_params=len(params or ()),
        params=params,
        pipelined=False,
        txn_status="I",
    )
    Fingerprinter(cache_size=10).on_statement(ev)
    return ev


def slowlog(**overrides):
    emitted = []
    settings = dict(
        threshold_ms=500, per_application={}, log_parameters=False, max_per_second=10, keep=200
    )
    settings.update(overrides)
    return SlowLog(**settings, emit=emitted.append), emitted


def test_only_statements_at_or_over_the_threshold_are_logged():
    log, emitted = slowlog()
    log.on_statement(done(499))
    log.on_statement(done(500))
    log.on_statement(done(1200))
    assert [record["duration_ms"] for record in emitted] == [500, 1200]
    assert log.slow_total == 2


def test_record_fields():
    log, emitted = slowlog()
    log.on_statement(done(800, sql="SELECT * FROM orders WHERE id = 1 /*route='%2Forders'*/"))
    (record,) = emitted
    assert record["normalized"] == "SELECT * FROM orders WHERE id = $1"
    assert len(record["fingerprint"]) == 16
    assert record["duration_ms"] == 800
    assert record["rows"] == 1
    assert record["sqlstate"] is None
    assert record["user"] == "app"
    assert record["database"] == "shop"
    assert record["application_name"] == "web"
    assert record["client_addr"] == "10.0.0.5:41234"
    assert record["backend_pid"] == 4242
    assert record["txn_status"] == "I"
    assert record["tags"] == {"route": "/orders"}
    assert "parameters" not in record
    json.dumps(record)


def test_per_application_threshold_overrides_the_global_one():
    log, emitted = slowlog(per_application={"reports": 5000, "web": 100})
    log.on_statement(done(2000, session=REPORTS))
    log.on_statement(done(150))
    assert [record["application_name"] for record in emitted] == ["web"]


def test_rate_limit_suppresses_and_reports_the_count_on_the_next_record():
    log, emitted = slowlog(max_per_second=2)
    for i in range(5):
        log.on_statement(done(600, at=100.0 + i * 0.01))
    assert len(emitted) == 2
    assert log.suppressed_total == 3
    log.on_statement(done(600, at=101.5))  # tokens refilled
    assert emitted[-1]["suppressed"] == 3
    assert "suppressed" not in emitted[0]
    log.on_statement(done(600, at=101.6))
    assert "suppressed" not in emitted[-1]
    assert log.slow_total == 7


def test_zero_rate_means_no_limit():
    log, emitted = slowlog(max_per_second=0)
    for _ in range(50):
        log.on_statement(done(600))
    assert len(emitted) == 50


def test_recent_keeps_the_last_records():
    log, _ = slowlog(keep=3, max_per_second=0)
    for ms in (600, 700, 800, 900):
        log.on_statement(done(ms))
    assert [record["duration_ms"] for record in log.recent()] == [700, 800, 900]


def test_secret_literal_never_reaches_the_log_or_the_api():
    log, emitted = slowlog()
    secrets = [
        "SELECT * FROM users WHERE password_hash = 'hunter2-secret'",
        "UPDATE users SET token = E'hunter2\\'secret' WHERE id = 1",
        "SELECT $$hunter2-secret$$",
        "COPY users FROM '/tmp/hunter2-secret.csv'",
        "selec broken 'hunter2-secret'",
        "SELECT 'hunter2-secret'; SELECT 2",
    ]
    for sql in secrets:
        log.on_statement(done(900, sql=sql, params=(b"hunter2-secret",)))
    assert len(emitted) == len(secrets)
    assert "hunter2" not in json.dumps(emitted)
    assert "hunter2" not in json.dumps(log.recent())


def test_parameters_only_when_asked_text_or_hex_and_cut():
    params = (b"alice", None, b"\x00\x00\x00\x2a", b"x" * 500, "caf\u00e9".encode())
    log, emitted = slowlog(log_parameters=True)
    log.on_statement(done(900, sql="SELECT $1, $2, $3, $4, $5", params=params))
    record = emitted[0]
    assert record["parameters"] == ["alice", None, "\\x0000002a", "x" * 200, "caf\u00e9"]
    assert record["n_params"] == 5


def test_parameters_not_kept_by_the_decoder_show_as_none():
    log, emitted = slowlog(log_parameters=True)
    log.on_statement(done(900))
    assert emitted[0]["parameters"] is None
