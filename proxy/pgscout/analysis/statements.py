"""Per-fingerprint statement statistics, live and per client application (like pg_stat_statements).

Owns: for each fingerprint calls, total and max seconds, a latency histogram, rows, errors by
SQLSTATE, first/last seen (wall clock), the application_names that sent it (at most
MAX_APPLICATIONS_PER_FINGERPRINT), the normalized SQL and kind; and global totals (calls, seconds,
errors by SQLSTATE, histogram, calls and seconds per application). At most `max_fingerprints`
entries are kept: past that the least recently seen one is folded into the `other()` aggregate,
which keeps counting, so no total goes down short of `reset()`. A statement the fingerprinter
could not describe (empty fingerprint) is counted under `other()` directly. Per-event work is O(1).
`reset()` is pg_stat_statements_reset(): it forgets every fingerprint and the `other()` aggregate
and sets `stats_reset`; the global totals are the process's counters (like pg_stat_database's)
and keep counting, so Prometheus rates and the status page's charts go on undisturbed.

Read interface (the Collector and the JSON API read the live objects on the event loop's thread;
treat them as read-only): `top(n, sort_by)` with sort_by in SORT_KEYS, `get(fingerprint)`,
`entries()`, `other()`, `totals()`, `evicted_total`, `stats_reset`. Histograms are read with
`Histogram.cumulative()` (Prometheus `le` buckets, +Inf last).
Must not: keep SQL text with literals, log, or import asyncio/sockets/prometheus_client.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from typing import Final

from pgscout.analysis.bus import StatementObserver
from pgscout.dataplane.events import StatementDone
from pgscout.histogram import Histogram
from pgscout.labels import MAX_APPLICATIONS, OTHER

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MAX_APPLICATIONS_PER_FINGERPRINT: Final = 16
# Compiled, a Final is a C static: `time.time()` looked the function up on the module each call.
_wall_clock: Final = time.time


class FingerprintStats:
    __slots__ = (
        "fingerprint", "normalized", "kind", "calls", "total_seconds", "max_seconds", "rows",
        "errors", "histogram", "first_seen", "last_seen", "applications",
    )

    def __init__(self, fingerprint: str, normalized: str, kind: str, now: float) -> None:
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.kind = kind
        self.calls = 0
        self.total_seconds = 0.0
        self.max_seconds = 0.0
        self.rows = 0
        self.errors: dict[str, int] = {}  # SQLSTATE -> count
        self.histogram = Histogram(LATENCY_BUCKETS)
        self.first_seen = now  # time.time()
        self.last_seen = now
        self.applications: set[str] = set()

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, duration: float, rows: int, sqlstate: str | None, application: str) -> None:
        self.calls += 1
        self.total_seconds += duration
        if duration > self.max_seconds:
            self.max_seconds = duration
        self.rows += rows
        if sqlstate is not None:
            self.errors[sqlstate] = self.errors.get(sqlstate, 0) + 1
        self.histogram.observe(duration)
        if len(self.applications) < MAX_APPLICATIONS_PER_FINGERPRINT:
            self.applications.add(application)

    def absorb(self, evicted: FingerprintStats) -> None:
        self.calls += evicted.calls
        self.total_seconds += evicted.total_seconds
        self.max_seconds = max(self.max_seconds, evicted.max_seconds)
        self.rows += evicted.rows
        for sqlstate, count in evicted.errors.items():
            self.errors[sqlstate] = self.errors.get(sqlstate, 0) + count
        self.histogram.merge(evicted.histogram)
        self.first_seen = min(self.first_seen, evicted.first_seen)
        self.last_seen = max(self.last_seen, evicted.last_seen)
        for application in evicted.applications:
            if len(self.applications) >= MAX_APPLICATIONS_PER_FINGERPRINT:
                break
            self.applications.add(application)

    def as_dict(self) -> dict:
        """JSON-ready view for the API."""
        return {
            "fingerprint": self.fingerprint,
            "normalized": self.normalized,
            "kind": self.kind,
            "calls": self.calls,
            "total_seconds": self.total_seconds,
            "mean_seconds": self.mean_seconds,
            "max_seconds": self.max_seconds,
            "rows": self.rows,
            "errors": dict(self.errors),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "applications": sorted(self.applications),
        }


class ApplicationTotals:
    """What one application_name sent: calls, seconds, a latency histogram, errors by SQLSTATE."""

    __slots__ = ("calls", "seconds", "errors", "histogram")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.errors: dict[str, int] = {}  # SQLSTATE -> count
        self.histogram = Histogram(LATENCY_BUCKETS)


class Totals:
    __slots__ = ("calls", "seconds", "errors", "per_application")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.errors: dict[str, int] = {}  # SQLSTATE -> count
        self.per_application: dict[str, ApplicationTotals] = {}

    def histogram(self) -> Histogram:
        """Latency over every application (merged at read time: one observation per statement)."""
        merged = Histogram(LATENCY_BUCKETS)
        for usage in self.per_application.values():
            merged.merge(usage.histogram)
        return merged

    def record(self, duration: float, sqlstate: str | None, application: str) -> None:
        self.calls += 1
        self.seconds += duration
        usage = self.per_application.get(application)
        if usage is None:
            if len(self.per_application) >= MAX_APPLICATIONS:
                application = OTHER
            usage = self.per_application.get(application)
            if usage is None:
                usage = self.per_application[application] = ApplicationTotals()
        usage.calls += 1
        usage.seconds += duration
        usage.histogram.observe(duration)
        if sqlstate is not None:
            self.errors[sqlstate] = self.errors.get(sqlstate, 0) + 1
            usage.errors[sqlstate] = usage.errors.get(sqlstate, 0) + 1


SORT_KEYS = {
    "total_time": lambda entry: entry.total_seconds,
    "calls": lambda entry: entry.calls,
    "mean_time": lambda entry: entry.mean_seconds,
    "errors": lambda entry: entry.error_count,
    "rows": lambda entry: entry.rows,
}


class StatementStats(StatementObserver):
    """Bus observer: aggregates StatementDone events (already enriched by the fingerprinter)."""

    def __init__(self, max_fingerprints: int) -> None:
        self.max_fingerprints = max_fingerprints
        self._entries: OrderedDict[str, FingerprintStats] = OrderedDict()  # least recent first
        # The last entry of _entries: a fingerprint seen again at once (a loop, a prepared
        # statement) needs no look-up and no move, both generic calls from compiled code.
        self._newest: FingerprintStats | None = None
        self._other = FingerprintStats(OTHER, "", "other", time.time())
        self._totals = Totals()
        self.evicted_total = 0
        self.stats_reset: float | None = None  # wall clock of the last reset()

    def reset(self) -> None:
        self._entries.clear()
        self._newest = None
        self.stats_reset = time.time()
        self._other = FingerprintStats(OTHER, "", "other", self.stats_reset)

    def on_statement(self, ev: StatementDone) -> None:
        duration = ev.duration
        application = ev.session.application_name
        self._totals.record(duration, ev.sqlstate, application)
        now = _wall_clock()
        entry = self._entry_for(ev, now)
        entry.record(duration, ev.rows, ev.sqlstate, application)
        entry.last_seen = now

    def _entry_for(self, ev: StatementDone, now: float) -> FingerprintStats:
        fingerprint = ev.fingerprint
        if not fingerprint:
            return self._other
        newest = self._newest
        if newest is not None and newest.fingerprint == fingerprint:
            return newest
        entry = self._entries.get(fingerprint)
        if entry is not None:
            self._entries.move_to_end(fingerprint)
            self._newest = entry
            return entry
        if len(self._entries) >= self.max_fingerprints:
            if not self._entries:
                return self._other
            _, evicted = self._entries.popitem(last=False)
            self._other.absorb(evicted)
            self.evicted_total += 1
        entry = self._entries[fingerprint] = self._newest = FingerprintStats(
            fingerprint, ev.normalized, ev.kind, now
        )
        return entry

    def top(self, n: int, sort_by: str = "total_time") -> list[FingerprintStats]:
        """The n largest entries by `sort_by` (a key of SORT_KEYS), largest first."""
        return heapq.nlargest(n, self._entries.values(), key=SORT_KEYS[sort_by])

    def get(self, fingerprint: str) -> FingerprintStats | None:
        return self._entries.get(fingerprint)

    def entries(self) -> list[FingerprintStats]:
        """Every tracked entry, least recently seen first."""
        return list(self._entries.values())

    def other(self) -> FingerprintStats:
        return self._other

    def totals(self) -> Totals:
        return self._totals
