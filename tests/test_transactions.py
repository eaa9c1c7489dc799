"""Transaction statistics, from TransactionEnded events alone."""

import math

import pytest

from pgscout.dataplane.events import Session, TransactionEnded
from pgscout.analysis.transactions import TransactionStats

WEB = Session(conn_id=1, client_addr="127.0.0.1:5000", application_name="web")
WORKER = Session(conn_id=2, client_addr="127.0.0.1:5001", application_name="worker")


def ended(outcome, seconds, idle, session=WEB):
    return TransactionEnded(
        session=session, started_at=0.0, ended_at=seconds, outcome=outcome, idle_seconds=idle
    )


def test_outcomes_durations_and_idle_time():
    stats = TransactionStats()
    for ev in [
        ended("commit", 0.004, 0.001),
        ended("commit", 0.2, 0.15),
        ended("rollback", 2.0, 1.5, session=WORKER),
        ended("aborted", 90.0, 80.0, session=WORKER),
    ]:
        stats.on_transaction(ev)
    totals = stats.totals()
    assert totals.outcomes == {"commit": 2, "rollback": 1, "aborted": 1}
    assert totals.idle.sum == pytest.approx(81.651)
    duration = dict(totals.duration.cumulative())
    assert duration[0.005] == 1
    assert duration[0.25] == 2
    assert duration[60] == 3
    assert duration[math.inf] == 4
    assert dict(totals.idle.cumulative())[0.001] == 1


def test_per_application():
    stats = TransactionStats()
    stats.on_transaction(ended("commit", 0.01, 0.0))
    stats.on_transaction(ended("aborted", 0.5, 0.4, session=WORKER))
    per_app = stats.per_application()
    assert per_app["web"].outcomes == {"commit": 1, "rollback": 0, "aborted": 0}
    assert per_app["worker"].outcomes["aborted"] == 1
    assert per_app["worker"].idle.sum == pytest.approx(0.4)
    assert per_app["worker"].duration.count == 1


def test_application_names_are_bounded():
    stats = TransactionStats()
    for i in range(300):
        session = Session(conn_id=i, client_addr="x", application_name=f"app{i}")
        stats.on_transaction(ended("commit", 0.01, 0.0, session=session))
    per_app = stats.per_application()
    assert len(per_app) == 257
    assert per_app["other"].outcomes["commit"] == 44
    assert stats.totals().outcomes["commit"] == 300
