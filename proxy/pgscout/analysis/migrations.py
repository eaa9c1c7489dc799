"""Blocking migrations: DDL passing through that made other sessions queue behind its lock.

Owns: spotting the DDL operations sqlshape.risky_ddl knows; the window during which such a DDL
holds its lock (from when it was sent until its transaction ended: the statement's own end in
autocommit, else the TransactionEnded or SessionClosed of its session); a ring of the recent
statements that took at least `min_wait_ms`; and, GRACE_SECONDS after a window closed, the
verdict: the statements of *other* sessions on the same table that were sent while the lock was
held and completed only once it was released, each with its delay. A DDL with no such waiter is
not reported (nothing queued behind it: precision over recall).
Must not: parse a statement that cannot be a waiter (only ring entries of a closed window's
period are), keep more than RING_ENTRIES statements or MAX_OPEN open and MAX_OPEN closed
windows, or see raw SQL.
"""

from __future__ import annotations

from collections import deque

from pgscout.analysis import sqlshape
from pgscout.analysis.bus import StatementObserver
from pgscout.analysis.findings import Findings, application_of, cut, wall_time
from pgscout.dataplane.events import SessionClosed, StatementDone, TransactionEnded

RING_ENTRIES = 1024
MAX_OPEN = 256
MAX_WAITERS_SHOWN = 10
# A waiter's reply reaches pgscout a moment after the migration's own: wait this long (event time
# is monotonic, shared by both processes) before judging a closed window.
GRACE_SECONDS = 1.0
REPLY_ORDER_SLACK_SECONDS = 0.05
# The waiter must have completed within this long after the lock was released: a statement that
# ran on well after it was held up by something else.
RELEASE_SLACK_SECONDS = 0.5
CRITICAL_WAIT_SECONDS = 5.0
_KEYWORDS = ("INDEX", "ALTER")

RECIPES = {
    "create_index": "CREATE INDEX CONCURRENTLY (outside a transaction block) builds the index "
                    "while reads and writes go on: CREATE INDEX CONCURRENTLY {detail} ON {table} (...)",
    "add_foreign_key": "add the constraint NOT VALID (a brief lock, no scan), then validate it "
                       "separately, which lets writes go on: ALTER TABLE {table} ADD CONSTRAINT "
                       "{detail} FOREIGN KEY (...) REFERENCES ... NOT VALID; ALTER TABLE {table} "
                       "VALIDATE CONSTRAINT {detail}",
    "set_not_null": "ALTER TABLE {table} ADD CONSTRAINT {detail}_not_null CHECK ({detail} IS NOT "
                    "NULL) NOT VALID; VALIDATE CONSTRAINT {detail}_not_null; then SET NOT NULL "
                    "(PostgreSQL 12+ skips the scan given the valid check) and drop the check",
    "add_column_volatile_default": "add {detail} nullable without the volatile default, backfill "
                                   "it in batches, then make it NOT NULL through a NOT VALID "
                                   "check constraint validated apart",
    "alter_column_type": "add a new column of the new type, dual-write (trigger or application), "
                         "backfill in batches, switch reads, then drop {detail}: no table rewrite "
                         "under an exclusive lock",
}


class _Seen:
    """What the ring keeps of a statement: not the event, whose raw text may be 32 KB."""

    __slots__ = ("conn_id", "application_name", "fingerprint", "normalized", "sent_at", "done_at")

    def __init__(self, ev: StatementDone) -> None:
        self.conn_id = ev.session.conn_id
        self.application_name = ev.session.application_name
        self.fingerprint = ev.fingerprint
        self.normalized = ev.normalized
        self.sent_at = ev.sent_at
        self.done_at = ev.done_at


class _Window:
    """When the lock was held: from `start` to `end`; it was released after `released_after`
    (the reply before the one that ended the transaction)."""

    __slots__ = ("conn_id", "session", "tags", "fingerprint", "normalized", "ran", "operations",
                 "start", "end", "released_after")

    def __init__(self, ev: StatementDone, operations: list) -> None:
        self.conn_id = ev.session.conn_id
        self.session = ev.session
        self.tags = ev.tags
        self.fingerprint = ev.fingerprint
        self.normalized = ev.normalized
        self.ran = ev.duration
        self.operations = operations
        self.start = ev.sent_at
        self.end: float | None = ev.done_at if ev.txn_status == "I" else None
        # The server releases the lock a moment before its reply reaches pgscout: a waiter's
        # reply may even be relayed first.
        self.released_after = ev.done_at - REPLY_ORDER_SLACK_SECONDS if self.end else ev.done_at


class BlockingMigrations(StatementObserver):
    def __init__(self, findings: Findings, min_wait_ms: float) -> None:
        self._findings = findings
        self.reconfigure(min_wait_ms)
        self._ring: deque[_Seen] = deque(maxlen=RING_ENTRIES)
        self._open: dict[int, list[_Window]] = {}  # conn_id -> windows awaiting their end
        self._closed: list[_Window] = []

    def reconfigure(self, min_wait_ms: float) -> None:
        self._min_wait = min_wait_ms / 1000

    def on_statement(self, ev: StatementDone) -> None:
        if ev.duration >= self._min_wait:
            self._ring.append(_Seen(ev))
        if ev.txn_status in ("T", "E"):  # the transaction goes on: its locks are still held
            for window in self._open.get(ev.session.conn_id, ()):
                window.released_after = ev.done_at
        # A query or a write alone is no DDL: only their text of other kinds (or of several
        # statements) is looked at.
        if ev.sqlstate is None and (ev.kind not in ("select", "dml") or ev.statement_count > 1) \
                and any(word in ev.normalized.upper() for word in _KEYWORDS):
            trees = sqlshape.statements(ev.fingerprint, ev.normalized)
            operations = sqlshape.risky_ddl(trees) if trees else []
            if operations:
                window = _Window(ev, operations)
                if window.end is not None:
                    self._closed.append(window)
                    del self._closed[:-MAX_OPEN]
                elif sum(map(len, self._open.values())) < MAX_OPEN:
                    self._open.setdefault(window.conn_id, []).append(window)

    def on_transaction(self, ev: TransactionEnded) -> None:
        self._close(ev.session.conn_id, ev.ended_at)

    def on_session_closed(self, ev: SessionClosed) -> None:
        self._close(ev.session.conn_id, ev.at)

    def _close(self, conn_id: int, at: float) -> None:
        for window in self._open.pop(conn_id, ()):
            window.end = at
            self._closed.append(window)
        del self._closed[:-MAX_OPEN]  # a burst of migrations: the newest are judged

    def flush(self, now: float) -> None:
        """Judge the windows closed at least GRACE_SECONDS ago."""
        due = [window for window in self._closed
               if window.end is not None and window.end + GRACE_SECONDS <= now]
        if due:
            self._closed = [window for window in self._closed if window not in due]
        for window in due:
            self._judge(window)

    def _judge(self, window: _Window) -> None:
        end = window.end
        assert end is not None  # only closed windows are judged
        tables = {table for _, _, table, _ in window.operations}
        waiters = []
        for ev in self._ring:
            if (ev.conn_id == window.conn_id or not window.start <= ev.sent_at < end
                    or not window.released_after <= ev.done_at <= end + RELEASE_SLACK_SECONDS):
                continue
            delay = min(ev.done_at, end) - ev.sent_at
            if delay < self._min_wait:
                continue
            trees = sqlshape.statements(ev.fingerprint, ev.normalized)
            if trees is None or not {name for _, name in sqlshape.relations(trees)} & tables:
                continue
            waiters.append((delay, ev))
        if not waiters:
            return
        waiters.sort(key=lambda item: -item[0])
        _, schema, table, _ = window.operations[0]
        qualified = f"{schema}.{table}" if schema else table
        longest = waiters[0][0]
        evidence = {
            "statement": cut(window.normalized),
            "operations": [op for op, *_ in window.operations],
            "table": qualified,
            "ran_ms": round(window.ran * 1000, 1),
            "lock_held_ms": round((end - window.start) * 1000, 1),
            "waiting_sessions": len({ev.conn_id for _, ev in waiters}),
            "waited_total_ms": round(sum(delay for delay, _ in waiters) * 1000, 1),
            "waiters": [{"statement": cut(ev.normalized), "application_name": ev.application_name,
                         "delay_ms": round(delay * 1000, 1)}
                        for delay, ev in waiters[:MAX_WAITERS_SHOWN]],
        }
        suggestion = "; ".join(dict.fromkeys(
            RECIPES[op].format(table=qualified if t == table else t, detail=d or "…")
            for op, _, t, d in window.operations))
        self._findings.record(
            "blocking_migration", f"{window.fingerprint}/{window.session.database}",
            "critical" if longest >= CRITICAL_WAIT_SECONDS else "warning",
            application_of(window.session, window.tags), evidence, suggestion,
            at=wall_time(window.session, window.start))
