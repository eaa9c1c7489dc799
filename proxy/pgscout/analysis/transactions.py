"""Transaction-block statistics per client application.

Owns: counts of ended transaction blocks by outcome ("commit", "rollback", "aborted"), a histogram
of block durations and one of idle-in-transaction seconds (time the server waited on the client
inside the block), with the idle seconds' sum; overall and per application_name (at most
MAX_APPLICATIONS names, the rest under "other").

Read interface (for the Collector; live objects, read-only): `totals()` and `per_application()`
return TransactionTotals: `outcomes` (outcome -> count), `duration` and `idle`
(statements.Histogram: `cumulative()`, `sum`, `count`).
Must not: log, or import asyncio, sockets or prometheus_client.
"""

from __future__ import annotations

from pgscout.dataplane.events import TransactionEnded
from pgscout.histogram import Histogram
from pgscout.labels import MAX_APPLICATIONS, OTHER

TRANSACTION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)
OUTCOMES = ("commit", "rollback", "aborted")


class TransactionTotals:
    __slots__ = ("outcomes", "duration", "idle")

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.duration = Histogram(TRANSACTION_BUCKETS)
        self.idle = Histogram(TRANSACTION_BUCKETS)

    def record(self, ev: TransactionEnded) -> None:
        self.outcomes[ev.outcome] = self.outcomes.get(ev.outcome, 0) + 1
        self.duration.observe(ev.ended_at - ev.started_at)
        self.idle.observe(ev.idle_seconds)


class TransactionStats:
    """Bus observer of TransactionEnded events."""

    def __init__(self) -> None:
        self._totals = TransactionTotals()
        self._per_application: dict[str, TransactionTotals] = {}

    def on_transaction(self, ev: TransactionEnded) -> None:
        self._totals.record(ev)
        application = ev.session.application_name
        totals = self._per_application.get(application)
        if totals is None:
            if len(self._per_application) >= MAX_APPLICATIONS:
                application = OTHER
            totals = self._per_application.setdefault(application, TransactionTotals())
        totals.record(ev)

    def totals(self) -> TransactionTotals:
        return self._totals

    def per_application(self) -> dict[str, TransactionTotals]:
        return self._per_application
