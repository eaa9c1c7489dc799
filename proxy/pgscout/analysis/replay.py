"""Turns the data plane's records back into sessions and events for the analysis observers.

Owns: the analysis side's table of live sessions (its own copies, kept current from OPENED,
READY, PARAMETER, STATUS and CLOSED records) and building the event each record stands for
(PARAMETER and STATUS only update a session), published on the bus in the order the records
were made.
Must not: drop or reorder records, or do any work of its own beyond rebuilding the event (the
observers on the bus do the analysis).
"""

from __future__ import annotations

from pgscout.analysis.bus import Bus
from pgscout.dataplane import records as r
from pgscout.dataplane.events import (Session, SessionClosed, SessionOpened, SessionReady,
                                      SessionsActive, StatementDone, TransactionEnded)


class Replay:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.sessions: dict[int, Session] = {}

    def feed(self, batch: list[tuple]) -> None:
        # Compiled, each branch is a native call, where a table of bound methods is a Python-level call.
        for record in batch:
            kind: int = record[0]
            if kind == r.STATEMENT:
                self._statement(record)
            elif kind == r.TRANSACTION:
                self._transaction(record)
            elif kind == r.STATUS:
                self._session(record[1]).txn_status = record[2]
            elif kind == r.ACTIVE:
                # The next look comes ACTIVE_SECONDS later, and its record up to a flush after
                # that: one period of slack.
                self._bus.publish(SessionsActive(record[1] + 2 * r.ACTIVE_SECONDS, record[2]))
            elif kind == r.OPENED:
                self._opened(record)
            elif kind == r.READY:
                self._ready(record)
            elif kind == r.PARAMETER:
                self._parameter(record)
            elif kind == r.CLOSED:
                self._closed(record)
            else:
                raise KeyError(kind)

    def _session(self, conn_id: int) -> Session:
        session = self.sessions.get(conn_id)
        if session is None:  # OPENED is never shed, but a restarted analysis process missed it
            session = self.sessions[conn_id] = Session(conn_id=conn_id, client_addr="")
        return session

    def _opened(self, record: tuple) -> None:
        _, conn_id, client_addr, user, database, application_name, replication, opened_at, \
            opened_wall, startup = record
        session = Session(conn_id=conn_id, client_addr=client_addr, user=user, database=database,
                          application_name=application_name, replication=replication,
                          opened_at=opened_at, opened_wall=opened_wall, startup=startup)
        self.sessions[conn_id] = session
        self._bus.publish(SessionOpened(session))

    def _ready(self, record: tuple) -> None:
        session = self._session(record[1])
        session.backend_pid = record[3]
        self._bus.publish(SessionReady(session, record[2]))

    def _parameter(self, record: tuple) -> None:
        session = self._session(record[1])
        name, value = record[2], record[3]
        if name == "application_name":
            session.application_name = value
        elif name == "standard_conforming_strings":
            session.standard_strings = value == "on"

    def _statement(self, record: tuple) -> None:
        session = self._session(record[r.S_CONN])
        self._bus.publish_statement(StatementDone(
            session, record[r.S_SQL], record[r.S_COUNT],
            record[r.S_EXTENDED], record[r.S_SENT_AT], record[r.S_DONE_AT], record[r.S_TAG],
            record[r.S_ROWS], record[r.S_SQLSTATE], record[r.S_PARAM_SIG], record[r.S_N_PARAMS],
            record[r.S_PARAMS], record[r.S_PIPELINED], session.txn_status,
            record[r.S_TRUNCATED]))

    def _transaction(self, record: tuple) -> None:
        _, conn_id, started_at, ended_at, outcome, idle_seconds = record
        self._bus.publish(TransactionEnded(self._session(conn_id), started_at, ended_at, outcome,
                                       idle_seconds))

    def _closed(self, record: tuple) -> None:
        session = self.sessions.pop(record[1], None)
        if session is not None:
            self._bus.publish(SessionClosed(session, record[2], record[3]))
