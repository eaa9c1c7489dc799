"""The bus: every StatementDone reaches the observers in subscription order, and an observer
that raises is contained: counted under its name, reported once, the later observers still run."""

from pgscout.analysis.bus import Bus
from pgscout.analysis.findings import Findings
from pgscout.analysis.fingerprint import Fingerprinter
from pgscout.analysis.statements import StatementStats
from pgscout.analysis.timeouts import StatementTimeouts
from pgscout.dataplane.events import Session, StatementDone


def slow_statement(session: Session) -> StatementDone:
    return StatementDone(session, "SELECT pg_sleep(1)", 1, False, 0.0, 1.0, "SELECT 1", 1, None,
                         None, 0, None, False, "I")


def test_an_observer_that_raises_is_counted_reported_once_and_the_later_ones_still_run():
    def broken_log(finding):
        raise RuntimeError("the log sink is gone")

    reported = []
    bus = Bus(on_error=lambda handler, exc: reported.append((handler.__qualname__, str(exc))))
    timeouts = StatementTimeouts(Findings(emit=broken_log), min_statement_ms=0)
    timeouts.set_defaults({("", ""): "0"})  # the server has no statement_timeout: a finding
    stats = StatementStats(max_fingerprints=10)
    for observer in (Fingerprinter(cache_size=10, display_chars=100), timeouts, stats):
        bus.subscribe_statements(observer)
    # Three applications: three findings, each logged at once, so the observer raises three times.
    events = [slow_statement(Session(conn_id=n, client_addr="127.0.0.1:5000",
                                     application_name=f"app{n}")) for n in range(3)]
    for event in events:
        bus.publish(event)

    assert reported == [("StatementTimeouts.on_statement", "the log sink is gone")]
    assert dict(bus.errors) == {"StatementTimeouts.on_statement": 3}
    # The fingerprinter (first) enriched every event, and the statistics (after the failing
    # observer) counted every one.
    assert all(event.fingerprint for event in events)
    assert stats.totals().calls == 3
