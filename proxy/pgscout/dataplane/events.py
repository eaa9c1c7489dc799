"""The session's live state, and the events observers consume.

Owns: `Session` (one client connection; the data plane keeps its live fields current, and the
analysis process keeps its own copy rebuilt from records) and the plain event classes the
analysis replays from the data plane's records (analysis/replay.py) for its observers.
Must not: import asyncio, sockets or prometheus_client, or hold behaviour beyond field defaults.
Times named `*_at` are `time.monotonic()` seconds unless a field says wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(slots=True, eq=False)
class Session:
    """One client connection, shared by reference by every event of that connection.

    The decoder keeps the live fields current (`application_name` follows ParameterStatus,
    `txn_status` follows ReadyForQuery, `active` is true while the server owes a response).
    """

    conn_id: int
    client_addr: str
    user: str = ""
    database: str = ""
    application_name: str = ""
    replication: bool = False
    opened_at: float = 0.0  # monotonic
    opened_wall: float = 0.0  # time.time(), for display
    backend_pid: int | None = None
    txn_status: str = ""  # "" before the first ReadyForQuery, then "I", "T" or "E"
    active: bool = False
    standard_strings: bool = True  # standard_conforming_strings, from ParameterStatus
    bytes_from_client: int = 0  # set when the session closes (Relay.bytes_relayed counts them)
    bytes_from_server: int = 0
    # StartupMessage parameters the analysis judges by (records.STARTUP_PARAMETERS), as sent.
    startup: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class SessionOpened:
    """A StartupMessage arrived (user and database are known); emitted before auth completes."""

    session: Session


@dataclass(slots=True, eq=False)
class SessionReady:
    """The server sent its first ReadyForQuery: authentication succeeded, backend_pid is set."""

    session: Session
    at: float


# The tags of a statement without a comment, shared by all of them: an event's tags are replaced
# (the fingerprinter sets the dict it parsed), never written to, and a dict of its own per
# statement was an allocation and a deallocation each.
NO_TAGS: Final[dict[str, str]] = {}


@dataclass(slots=True, eq=False, init=False)
class StatementDone:
    """One completed statement execution.

    Extended protocol: one per Execute run to completion (PortalSuspended continuations of the
    same portal are merged: `sent_at` is the first Execute, `rows` is cumulative). Simple protocol:
    one per Query, however many statements it holds (`statement_count`): PostgreSQL sends their
    results in one flush, so the time of each is not on the wire; `rows` is their sum and `tag`
    the last one's. `sql` is cut to the configured length when `truncated`.

    The decoder fills the wire fields. The fingerprint observer, which runs first on the bus,
    fills the enrichment fields before any other observer sees the event.
    """

    session: Session
    sql: str  # the client's text: Query string, or the prepared statement's Parse text
    statement_count: int  # statements the server completed: >1 for a multi-statement Query
    extended: bool
    sent_at: float
    done_at: float
    tag: str  # CommandComplete tag ("SELECT 3"), "EMPTY" for EmptyQueryResponse, "" on error
    rows: int
    sqlstate: str | None  # set when the statement ended with ErrorResponse
    param_sig: int | None  # keyed hash of the Bind parameter bytes; None for simple Query
    n_params: int
    params: tuple[bytes | None, ...] | None  # only when the decoder is asked to keep them
    pipelined: bool  # sent while another statement was outstanding, or shared a Sync/Query
    txn_status: str = ""  # ReadyForQuery status that followed ("" if none came)
    truncated: bool = False
    # Enrichment (fingerprint observer):
    fingerprint: str = ""
    normalized: str = ""
    kind: str = ""  # "select", "dml", "utility", "txn", "ddl" or "other"
    # False for a query or write whose text calls no set_config (the only way such a one changes
    # a setting); True until the fingerprinter says so, and for every other kind.
    may_change_settings: bool = True
    tags: dict[str, str] = field(default_factory=dict)  # parsed sqlcommenter/marginalia comment

    # Written out, not generated: compiled by mypyc, a dataclass keeps the interpreted __init__
    # that `dataclasses` generates (about 0.35 us more per statement).
    def __init__(self, session: Session, sql: str, statement_count: int, extended: bool,
                 sent_at: float, done_at: float, tag: str, rows: int, sqlstate: str | None,
                 param_sig: int | None, n_params: int, params: tuple[bytes | None, ...] | None,
                 pipelined: bool, txn_status: str = "", truncated: bool = False,
                 fingerprint: str = "",
                 normalized: str = "", kind: str = "", may_change_settings: bool = True,
                 tags: dict[str, str] | None = None) -> None:
        self.session = session
        self.sql = sql
        self.statement_count = statement_count
        self.extended = extended
        self.sent_at = sent_at
        self.done_at = done_at
        self.tag = tag
        self.rows = rows
        self.sqlstate = sqlstate
        self.param_sig = param_sig
        self.n_params = n_params
        self.params = params
        self.pipelined = pipelined
        self.txn_status = txn_status
        self.truncated = truncated
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.kind = kind
        self.may_change_settings = may_change_settings
        self.tags = NO_TAGS if tags is None else tags

    @property
    def duration(self) -> float:
        return self.done_at - self.sent_at


@dataclass(slots=True, eq=False)
class TransactionEnded:
    """A transaction block ended (ReadyForQuery went from T or E back to I)."""

    session: Session
    started_at: float
    ended_at: float
    outcome: str  # "commit", "rollback" or "aborted" (the block had failed: status E)
    idle_seconds: float  # time the server waited on the client inside the block


@dataclass(slots=True, eq=False)
class SessionsActive:
    """These sessions had a request outstanding, and count as waiting on the server until
    `until` (monotonic): the data plane looks again before then."""

    until: float
    conn_ids: tuple[int, ...]


@dataclass(slots=True, eq=False)
class SessionClosed:
    session: Session
    at: float
    reason: str  # "client", "server", "error: ...", "drain"
