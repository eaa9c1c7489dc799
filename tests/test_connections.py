"""Connection tracking, churn and budgets, from session events alone (in the server's order:
SessionOpened, then the admission check, then SessionReady or, when refused, SessionClosed)."""

import itertools
import math

import pytest

from pgscout.dataplane.events import Session, SessionClosed, SessionOpened, SessionReady
from pgscout.dataplane.connections import ConnectionTracker
from pgscout.settings import Budget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A tracker plus a fake server that drives it the way proxy/server.py and pipe.py do."""

    def __init__(self, *budgets: Budget) -> None:
        self.clock = Clock()
        self.warnings: list[dict] = []
        self.tracker = ConnectionTracker(budgets, self.warnings.append, clock=self.clock)
        self._ids = itertools.count(1)

    def connect(self, application_name="web", user="app", database="shop", ready=True):
        """Open a session; returns (session, refusal)."""
        session = Session(conn_id=next(self._ids), client_addr="127.0.0.1:40000", user=user,
                          database=database, application_name=application_name,
                          opened_at=self.clock.now)
        self.tracker.on_opened(SessionOpened(session))
        refusal = self.tracker.admission(session)
        if refusal is not None:
            self.tracker.on_closed(SessionClosed(session, self.clock.now, "error: refused"))
        elif ready:
            session.txn_status = "I"
            self.tracker.on_ready(SessionReady(session, self.clock.now))
        return session, refusal

    def close(self, session):
        self.tracker.on_closed(SessionClosed(session, self.clock.now, "client"))

    def events(self, name):
        return [record for record in self.warnings if record["event"] == name]

    def budget(self, name):
        return next(entry for entry in self.tracker.budgets() if entry["name"] == name)


def test_states_are_read_from_the_live_sessions():
    world = World()
    starting, _ = world.connect(ready=False)
    idle, _ = world.connect()
    busy, _ = world.connect()
    in_transaction, _ = world.connect()
    failed_transaction, _ = world.connect()
    busy.active = True
    in_transaction.txn_status = "T"
    failed_transaction.txn_status = "E"
    assert world.tracker.live() == {
        ("web", "app", "shop", "starting"): 1,
        ("web", "app", "shop", "idle"): 1,
        ("web", "app", "shop", "active"): 1,
        ("web", "app", "shop", "idle in transaction"): 1,
        ("web", "app", "shop", "idle in transaction (aborted)"): 1,
    }
    # A statement running inside a transaction block is active, not idle in transaction.
    in_transaction.active = True
    assert world.tracker.live()[("web", "app", "shop", "active")] == 2


def test_counts_per_application_user_and_database_and_closing_removes():
    world = World()
    web, _ = world.connect("web")
    world.connect("web")
    world.connect("worker", user="jobs")
    world.connect("web", database="reports")
    assert world.tracker.live() == {
        ("web", "app", "shop", "idle"): 2,
        ("worker", "jobs", "shop", "idle"): 1,
        ("web", "app", "reports", "idle"): 1,
    }
    world.close(web)
    assert world.tracker.live()[("web", "app", "shop", "idle")] == 1


def test_application_name_change_moves_the_session_to_the_new_application():
    world = World(Budget(name="web", application_name="web", max_connections=10),
                  Budget(name="celery", application_name="celery", max_connections=10))
    session, _ = world.connect("web")
    session.application_name = "celery"  # SET application_name, reported by ParameterStatus
    assert world.tracker.live() == {("celery", "app", "shop", "idle"): 1}
    assert world.budget("web")["current"] == 0
    assert world.budget("celery")["current"] == 1


def test_replication_sessions_are_reported_as_such():
    world = World()
    session = Session(conn_id=99, client_addr="127.0.0.1:1", user="repl", database="shop",
                      application_name="standby", replication=True)
    world.tracker.on_opened(SessionOpened(session))
    assert world.tracker.live() == {("standby", "repl", "shop", "replication"): 1}


def test_budget_counts_matching_sessions_only():
    world = World(Budget(name="web", application_name="web", max_connections=20),
                  Budget(name="everyone-on-shop", database="shop", max_connections=100))
    for _ in range(3):
        world.connect("web")
    world.connect("worker")
    world.connect("web", database="reports")
    web = world.budget("web")
    assert web == {"name": "web", "application_name": "web", "user": None, "database": None,
                   "max_connections": 20, "current": 4, "usage": 0.2, "over_budget": False,
                   "enforce": False, "refused_total": 0}
    assert world.budget("everyone-on-shop")["current"] == 4


def test_enforced_budget_refuses_at_its_limit_with_sqlstate_53300():
    world = World(Budget(name="web", application_name="web", max_connections=20, enforce=True))
    for _ in range(20):
        _, refusal = world.connect("web")
        assert refusal is None
    session, refusal = world.connect("web")
    assert refusal == ("53300", 'pgscout: budget "web" allows 20 connections for '
                                "application_name=web, 20 are open")
    # The refused session never counts, and other applications are not affected.
    assert world.budget("web")["current"] == 20
    assert world.budget("web")["refused_total"] == 1
    assert world.tracker.refused_total == 1
    assert sum(world.tracker.live().values()) == 20
    _, other = world.connect("worker")
    assert other is None
    exceeded = world.events("budget_exceeded")
    assert len(exceeded) == 1
    assert exceeded[0]["budget"] == "web" and exceeded[0]["current"] == 20
    assert exceeded[0]["max_connections"] == 20


def test_a_freed_slot_admits_again():
    world = World(Budget(name="web", application_name="web", max_connections=2, enforce=True))
    first, _ = world.connect()
    world.connect()
    assert world.connect()[1] is not None
    world.close(first)
    assert world.connect()[1] is None


def test_budget_without_enforce_admits_and_says_it_is_over():
    world = World(Budget(name="web", application_name="web", max_connections=2))
    for _ in range(2):
        assert world.connect()[1] is None
    assert world.budget("web")["over_budget"] is False
    assert not world.events("budget_exceeded")
    for _ in range(2):
        assert world.connect()[1] is None
    assert world.budget("web")["current"] == 4
    assert world.budget("web")["usage"] == 2.0
    assert world.budget("web")["over_budget"] is True
    exceeded = world.events("budget_exceeded")
    # Once for passing the limit; the fourth session is within the minute.
    assert [(e["current"], e["over_by"], e["enforce"]) for e in exceeded] == [(3, 1, False)]
    world.clock.now += 61
    world.connect()
    assert [e["current"] for e in world.events("budget_exceeded")] == [3, 5]


def test_refusal_records_are_rate_limited_and_count_what_they_hid():
    world = World(Budget(name="web", application_name="web", max_connections=1, enforce=True))
    world.connect()
    for _ in range(5):
        assert world.connect()[1] is not None
    assert len(world.events("budget_exceeded")) == 1
    world.clock.now += 61
    world.connect()
    exceeded = world.events("budget_exceeded")
    assert len(exceeded) == 2
    assert exceeded[1]["refused"] == 5  # four hidden since the first record, plus this one
    assert exceeded[1]["refused_total"] == 6


def test_warns_at_80_percent_and_again_at_95_percent():
    world = World(Budget(name="web", application_name="web", max_connections=20))
    for _ in range(15):
        world.connect()
    assert world.events("budget_warning") == []
    world.connect()  # 16 of 20: 80%
    warnings = world.events("budget_warning")
    assert len(warnings) == 1
    assert warnings[0] == {"event": "budget_warning", "budget": "web", "match": "application_name=web",
                           "max_connections": 20, "current": 16, "usage": 0.8, "enforce": False}
    for _ in range(2):
        world.connect()  # 17 and 18: still the same level, no new record
    assert len(world.events("budget_warning")) == 1
    world.connect()  # 19 of 20: 95%, reported at once although a minute has not passed
    warnings = world.events("budget_warning")
    assert len(warnings) == 2
    assert warnings[1]["current"] == 19


def test_budget_warning_at_most_once_a_minute_when_usage_flaps():
    world = World(Budget(name="web", application_name="web", max_connections=10))
    sessions = [world.connect()[0] for _ in range(8)]
    assert len(world.events("budget_warning")) == 1
    for _ in range(3):
        world.close(sessions.pop())
        sessions.append(world.connect()[0])
    assert len(world.events("budget_warning")) == 1
    world.close(sessions.pop())
    world.clock.now += 61
    world.connect()
    assert len(world.events("budget_warning")) == 2


def test_budget_matching_user_and_database_names_them_in_the_refusal():
    world = World(Budget(name="reports", user="analyst", database="dw", max_connections=1, enforce=True))
    world.connect("psql", user="analyst", database="dw")
    _, refusal = world.connect("metabase", user="analyst", database="dw")
    assert refusal[1] == ('pgscout: budget "reports" allows 1 connections for user=analyst '
                          "database=dw, 1 are open")


def churn(world, application, opens_per_second, lifetime, seconds):
    """Open and close `opens_per_second` short connections every second for `seconds` seconds."""
    for _ in range(seconds):
        for _ in range(opens_per_second):
            session, _ = world.connect(application)
            world.clock.now += lifetime
            world.close(session)
            world.clock.now -= lifetime
        world.clock.now += 1


def test_churn_detects_an_application_that_is_not_pooling():
    world = World()
    churn(world, "cron", opens_per_second=10, lifetime=0.05, seconds=5)
    for _ in range(5):
        world.connect("web")
    [report] = world.tracker.churn()
    assert report["application_name"] == "cron"
    assert report["opens_per_second"] > 5
    assert report["median_lifetime_seconds"] < 1
    warnings = world.events("connection_churn")
    assert len(warnings) == 1 and warnings[0]["application_name"] == "cron"
    assert world.tracker.opens_per_second()["web"] < 5


def test_frequent_but_long_lived_connections_are_not_churn():
    world = World()
    churn(world, "batch", opens_per_second=10, lifetime=5.0, seconds=5)
    assert world.tracker.churn() == []
    assert world.events("connection_churn") == []


def test_churn_warns_again_only_after_it_stopped_and_short_bursts_are_not_churn():
    world = World()
    churn(world, "cron", opens_per_second=10, lifetime=0.05, seconds=40)
    assert len(world.events("connection_churn")) == 1
    world.clock.now += 120  # a quiet while: the window empties
    assert world.tracker.churn() == []
    # 10 opens/s sustained for 40 s is more than 5/s averaged over the sliding minute.
    churn(world, "cron", opens_per_second=10, lifetime=0.05, seconds=40)
    assert len(world.events("connection_churn")) == 2
    world.clock.now += 120
    churn(world, "cron", opens_per_second=10, lifetime=0.05, seconds=3)
    assert world.tracker.churn() == []  # a short burst is not a habit
    assert len(world.events("connection_churn")) == 2


def test_lifetime_histogram_per_application():
    world = World()
    session, _ = world.connect("web")
    world.clock.now += 42.0
    world.close(session)
    never_ready, _ = world.connect("web", ready=False)  # e.g. authentication failed
    world.close(never_ready)
    histogram = world.tracker.lifetimes()["web"]
    assert histogram.count == 1
    assert histogram.sum == pytest.approx(42.0)
    cumulative = dict(histogram.cumulative())
    assert cumulative[30] == 0 and cumulative[60] == 1 and cumulative[math.inf] == 1

