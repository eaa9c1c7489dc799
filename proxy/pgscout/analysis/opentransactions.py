"""Long transactions and idle in transaction, while they happen.

Owns: per session whose last statement left it inside a transaction block (ReadyForQuery T or
E), when the block began (the first statement of it was sent), the statements it ran (normalized,
the last MAX_STATEMENTS, consecutive repeats counted) and whether it wrote or locked rows; the
periodic check `flush(now)`: a block open for `long_seconds` is a long_transaction occurrence
(once per block); and the candidates for idle in transaction (`idle_candidates(now)`: blocks
whose last statement ended `idle_seconds` ago, by backend pid), which the composition root
confirms with pg_stat_activity over the catalog connection (a statement still running looks the
same from the wire) and hands back to `confirm_idle`.
Must not: judge idleness from the wire alone, keep a block after its session left it, or keep
more than MAX_SESSIONS blocks.
"""

from __future__ import annotations

import re
from collections import deque

from pgscout.analysis.bus import StatementObserver
from pgscout.analysis.findings import Findings, application_of, cut
from pgscout.dataplane.events import Session, SessionClosed, StatementDone, TransactionEnded

MAX_SESSIONS = 10_000
MAX_STATEMENTS = 10
CRITICAL_FACTOR = 10  # open or idle ten times the threshold
_WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "CREATE", "ALTER", "DROP", "TRUNCATE",
           "LOCK")
_LOCKING_READ = re.compile(r"\bFOR\s+(NO\s+KEY\s+)?(UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)
LONG_SUGGESTION = ("keep transactions short: do slow work (remote calls, file IO, user input) "
                   "before BEGIN or after COMMIT, and batch large changes in several "
                   "transactions; an open transaction holds its locks and keeps VACUUM from "
                   "removing dead rows. idle_in_transaction_session_timeout and "
                   "transaction_timeout (PostgreSQL 17) bound the damage")
IDLE_SUGGESTION = ("the application left a transaction open while doing something else: commit "
                   "or roll back before waiting (a missing commit, or a driver in autocommit-off "
                   "mode that began a transaction on a read); set "
                   "idle_in_transaction_session_timeout for the role so an abandoned one ends")


class _Block:
    __slots__ = ("session", "started_at", "last_done_at", "statements", "wrote", "locked_rows",
                 "tags", "long_reported", "idle_reported")

    def __init__(self, ev: StatementDone) -> None:
        self.session = ev.session
        self.started_at = ev.sent_at
        self.last_done_at = ev.done_at
        self.statements: deque[list] = deque(maxlen=MAX_STATEMENTS)  # [normalized, count]
        self.wrote = False
        self.locked_rows = False
        self.tags = ev.tags
        self.long_reported = False
        self.idle_reported = False

    def add(self, ev: StatementDone) -> None:
        self.last_done_at = ev.done_at
        if self.statements and self.statements[-1][0] == ev.normalized:
            self.statements[-1][1] += 1
        else:
            self.statements.append([ev.normalized, 1])
        if ev.tags:
            self.tags = ev.tags
        head = ev.normalized.lstrip()[:12].upper()
        tag = ev.tag.split(" ", 1)[0]
        if tag in _WRITES or ev.kind == "ddl" or head.startswith(_WRITES):
            self.wrote = True
        elif ev.kind == "select" and _LOCKING_READ.search(ev.normalized):
            self.locked_rows = True


class OpenTransactions(StatementObserver):
    def __init__(self, findings: Findings, long_seconds: float, idle_seconds: float) -> None:
        self._findings = findings
        self.reconfigure(long_seconds, idle_seconds)
        self._blocks: dict[int, _Block] = {}

    def reconfigure(self, long_seconds: float, idle_seconds: float) -> None:
        self._long = long_seconds
        self._idle = idle_seconds

    def on_statement(self, ev: StatementDone) -> None:
        conn_id = ev.session.conn_id
        if ev.txn_status not in ("T", "E"):
            if conn_id in self._blocks:  # `in` is a native operation, dict.pop a generic call
                del self._blocks[conn_id]
            return
        block = self._blocks.get(conn_id)
        if block is None:
            if len(self._blocks) >= MAX_SESSIONS:
                return
            block = self._blocks[conn_id] = _Block(ev)
        block.add(ev)

    def on_transaction(self, ev: TransactionEnded) -> None:
        self._blocks.pop(ev.session.conn_id, None)

    def on_session_closed(self, ev: SessionClosed) -> None:
        self._blocks.pop(ev.session.conn_id, None)

    def flush(self, now: float) -> None:
        for block in self._blocks.values():
            open_for = now - block.started_at
            if not block.long_reported and open_for >= self._long:
                block.long_reported = True
                self._record("long_transaction", block, open_for, now, LONG_SUGGESTION,
                             CRITICAL_FACTOR * self._long)

    def idle_candidates(self, now: float) -> dict[int, int]:
        """backend pid -> conn_id of the blocks whose last statement ended `idle_seconds` ago."""
        return {block.session.backend_pid: conn_id for conn_id, block in self._blocks.items()
                if not block.idle_reported and block.session.backend_pid is not None
                and now - block.last_done_at >= self._idle}

    def confirm_idle(self, candidates: dict[int, int], activity: dict[int, dict],
                     now: float) -> None:
        """`activity`: pid -> its pg_stat_activity row (state, seconds since its state_change,
        usename, application_name). A row of another user or application is another backend
        with that pid (a pooler in front of the server hands out pids of its own)."""
        for pid, conn_id in candidates.items():
            block = self._blocks.get(conn_id)
            row = activity.get(pid)
            if block is None or row is None or block.idle_reported or block.session.backend_pid != pid:
                continue
            session = block.session
            if (row["usename"], row["application_name"]) != (session.user, session.application_name):
                continue
            idle_for = row["seconds"]
            if row["state"].startswith("idle in transaction") and idle_for >= self._idle:
                block.idle_reported = True
                self._record("idle_in_transaction", block, idle_for, now, IDLE_SUGGESTION,
                             CRITICAL_FACTOR * self._idle, idle=True)

    def _record(self, kind: str, block: _Block, seconds: float, now: float, suggestion: str,
                critical_at: float, idle: bool = False) -> None:
        session: Session = block.session
        evidence = {
            "open_seconds": round(now - block.started_at, 3),
            "statements": [{"statement": cut(text), "count": count}
                           for text, count in block.statements],
            "wrote": block.wrote,
            "locked_rows": block.locked_rows,
            "threshold_seconds": self._idle if idle else self._long,
            "backend_pid": session.backend_pid,
        }
        if idle:
            evidence["idle_seconds"] = round(seconds, 3)
        # A block that wrote or locked rows holds locks others may queue behind.
        severity = "critical" if seconds >= critical_at or (idle and (block.wrote or block.locked_rows)) \
            else "warning"
        key = f"{session.application_name}/{session.user}/{session.database}"
        self._findings.record(kind, key, severity, application_of(session, block.tags), evidence,
                              suggestion)
