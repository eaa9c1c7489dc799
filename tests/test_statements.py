"""Per-fingerprint statistics, from enriched StatementDone events alone."""

import math
import time

import pytest

from pgscout.dataplane.events import Session, StatementDone
from pgscout.analysis.statements import LATENCY_BUCKETS, StatementStats

WEB = Session(conn_id=1, client_addr="127.0.0.1:5000", application_name="web")
WORKER = Session(conn_id=2, client_addr="127.0.0.1:5001", application_name="worker")


def done(fingerprint, seconds, session=WEB, rows=1, sqlstate=None, kind="select"):
    return StatementDone(
        session=session,
        sql="ignored by this observer",
        statement_count=1,
        extended=True,
        sent_at=0.0,
        done_at=seconds,
        tag="" if sqlstate else f"SELECT {rows}",
        rows=rows,
        sqlstate=sqlstate,
        param_sig=1,
        n_params=1,
        params=None,
        pipelined=False,
        fingerprint=fingerprint,
        normalized=f"select {fingerprint} where id = $1",
        kind=kind,
    )


def feed(stats, *events):
    for ev in events:
        stats.on_statement(ev)


def test_counts_time_rows_and_errors_per_fingerprint():
    stats = StatementStats(max_fingerprints=10)
    before = time.time()
    feed(
        stats,
        done("aaaa", 0.002, rows=3),
        done("aaaa", 0.004, rows=5, session=WORKER),
        done("aaaa", 0.001, rows=0, sqlstate="57014"),
        done("bbbb", 0.3),
    )
    entry = stats.get("aaaa")
    assert entry.calls == 3
    assert entry.total_seconds == pytest.approx(0.007)
    assert entry.max_seconds == pytest.approx(0.004)
    assert entry.mean_seconds == pytest.approx(0.007 / 3)
    assert entry.rows == 8
    assert entry.errors == {"57014": 1}
    assert entry.applications == {"web", "worker"}
    assert entry.normalized == "select aaaa where id = $1"
    assert entry.kind == "select"
    assert before <= entry.first_seen <= entry.last_seen <= time.time()
    assert stats.get("missing") is None


def test_histogram_is_cumulative_with_inf_last():
    stats = StatementStats(max_fingerprints=10)
    feed(stats, done("aaaa", 0.0003), done("aaaa", 0.001), done("aaaa", 0.02), done("aaaa", 30))
    buckets = dict(stats.get("aaaa").histogram.cumulative())
    assert list(buckets) == [*LATENCY_BUCKETS, math.inf]
    assert buckets[0.0005] == 1
    assert buckets[0.001] == 2  # a value on a bound counts in that bucket (le)
    assert buckets[0.025] == 3
    assert buckets[10] == 3
    assert buckets[math.inf] == 4


def test_global_totals_and_per_application():
    stats = StatementStats(max_fingerprints=10)
    feed(
        stats,
        done("aaaa", 0.5),
        done("bbbb", 0.25, session=WORKER, sqlstate="23505"),
        done("cccc", 0.25, session=WORKER),
    )
    totals = stats.totals()
    assert totals.calls == 3
    assert totals.seconds == pytest.approx(1.0)
    assert totals.errors == {"23505": 1}
    web, worker = totals.per_application["web"], totals.per_application["worker"]
    assert (web.calls, web.seconds) == (1, pytest.approx(0.5))
    assert (worker.calls, worker.seconds) == (2, pytest.approx(0.5))
    assert web.histogram.count == 1 and worker.histogram.count == 2
    assert totals.histogram().count == 3


def test_least_recently_seen_fingerprint_is_folded_into_other():
    stats = StatementStats(max_fingerprints=2)
    feed(stats, done("old", 0.1, rows=7, sqlstate="40001"), done("mid", 0.1), done("old", 0.1))
    feed(stats, done("new", 0.1))  # "mid" is now the least recently seen
    assert {entry.fingerprint for entry in stats.entries()} == {"old", "new"}
    assert stats.other().calls == 1
    assert stats.evicted_total == 1
    feed(stats, done("mid", 0.2))  # comes back fresh; "old" is folded
    assert stats.get("mid").calls == 1
    other = stats.other()
    assert other.calls == 3
    assert other.rows == 1 + 7 + 1
    assert other.errors == {"40001": 1}
    assert other.histogram.count == 3
    everything = sum(entry.calls for entry in stats.entries()) + other.calls
    assert everything == stats.totals().calls == 5


def test_statement_without_fingerprint_counts_under_other():
    stats = StatementStats(max_fingerprints=10)
    feed(stats, done("", 0.1))
    assert stats.entries() == []
    assert stats.other().calls == 1
    assert stats.totals().calls == 1


def test_zero_max_fingerprints_counts_everything_under_other():
    stats = StatementStats(max_fingerprints=0)
    feed(stats, done("aaaa", 0.1), done("bbbb", 0.1))
    assert stats.other().calls == 2


@pytest.mark.parametrize(
    ("sort_by", "expected"),
    [
        ("total_time", ["many_fast", "one_slow", "errors"]),
        ("calls", ["many_fast", "errors", "one_slow"]),
        ("mean_time", ["one_slow", "many_fast", "errors"]),
        ("errors", ["errors", "many_fast", "one_slow"]),
        ("rows", ["one_slow", "errors", "many_fast"]),
    ],
)
def test_top_sorts_largest_first(sort_by, expected):
    stats = StatementStats(max_fingerprints=10)
    feed(stats, *[done("many_fast", 0.1, rows=0) for _ in range(20)])
    feed(stats, done("one_slow", 1.5, rows=1000))
    feed(stats, *[done("errors", 0.001, rows=1, sqlstate="42P01") for _ in range(3)])
    assert [entry.fingerprint for entry in stats.top(3, sort_by)] == expected
    assert len(stats.top(1, sort_by)) == 1


def test_top_rejects_unknown_sort_key():
    with pytest.raises(KeyError):
        StatementStats(max_fingerprints=10).top(5, "bogus")


def test_applications_per_fingerprint_are_bounded():
    stats = StatementStats(max_fingerprints=10)
    for i in range(40):
        session = Session(conn_id=i, client_addr="x", application_name=f"app{i}")
        feed(stats, done("aaaa", 0.1, session=session))
    assert len(stats.get("aaaa").applications) == 16


def test_as_dict_is_json_ready():
    stats = StatementStats(max_fingerprints=10)
    feed(stats, done("aaaa", 0.1))
    row = stats.get("aaaa").as_dict()
    assert row["fingerprint"] == "aaaa"
    assert row["calls"] == 1
    assert row["applications"] == ["web"]
