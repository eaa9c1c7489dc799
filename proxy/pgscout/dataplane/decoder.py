"""Sans-IO session state machine: turns one connection's two byte streams into events.

Owns: the per-connection protocol state pgscout needs to see statements: prepared statement and
portal names, the FIFO of requests the server still owes a response to, transaction status, the
backend pid and cancel key; and the compact records (dataplane/records.py) it emits: one per
Execute, one per simple Query however many statements it holds, and the session's milestones.
One dispatch table per direction (_ClientMessages, _ServerMessages), keyed by message type.
Its work is bounded by the bytes it is fed, whatever the SQL says: texts are cut to
`max_sql_chars`, prepared statements are kept up to a character budget, the FIFO of outstanding
requests holds runs of Sync as one entry and refuses to grow past MAX_PENDING (DecoderError: the
session is then forwarded unobserved).
Must not: write to either peer, block, log, look inside SQL text beyond what the protocol needs,
or keep password/SASL messages (type 'p' has no handler, so the framer skips those bytes unread).
Reference: PostgreSQL docs, "Message Flow" (Extended Query: after an ErrorResponse the server
discards messages until Sync) and "Message Formats".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Final

from mypy_extensions import i64, mypyc_attr

from pgscout.dataplane import records, wire
from pgscout.dataplane.events import Session
from pgscout.dataplane.framer import Framer, MessageSink, int16, int32

# Request kinds in the FIFO of things the server will answer, in the order it answers them.
# Parse, Bind, Describe and Close are not queued: their answers (ParseComplete, BindComplete,
# NoData...) carry nothing pgscout reports, and an error they cause is charged to the Execute of
# their Sync group, the statement that then does not run. Skipping them keeps the hot path short.
EXECUTE: Final = 0
SYNC: Final = 1
QUERY: Final = 2
FUNCTION: Final = 3
_KIND_NAMES: Final = ("Execute", "Sync", "Query", "FunctionCall")

# A client that pipelines thousands of Executes before one Sync: report them without waiting.
_MAX_HELD_EVENTS: Final = 256
# Prepared statements kept per connection, in number and in characters of text; past either the
# oldest are forgotten (their executions show as "").
_MAX_STATEMENTS: Final = 10000
_MAX_STATEMENT_CHARS: Final = 512 * 1024
# ...and all sessions together (text decoded from ASCII takes a byte a character).
PREPARED_TEXT_BUDGET: Final = 32 * 1024 * 1024
# Outstanding requests a client may pipeline before pgscout stops observing its session.
MAX_PENDING: Final = 10000
# Answered requests a pipeline's FIFO may keep (at most as many as it holds) before dropping them.
_COMPACT_PENDING: Final = 64
DEFAULT_MAX_SQL_CHARS: Final = 32 * 1024
# ParameterStatus values the analysis needs (attribution; how string literals are lexed).
_REPORTED_PARAMETERS: Final = frozenset((b"application_name", b"standard_conforming_strings"))

_DEALLOCATE: Final = re.compile(r'\bdeallocate\s+(?:prepare\s+)?("(?:[^"]|"")+"|[\w$]+)', re.IGNORECASE)


class DecoderError(Exception):
    """The stream does not follow the protocol as pgscout understands it."""


class TextBudget:
    """Characters of prepared-statement text the decoders of all sessions keep together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = PREPARED_TEXT_BUDGET) -> None:
        self.limit = limit
        self.used = 0


# Requests and portals are made for every statement: the last one freed is reused. They are not
# declared acyclic (untracked by the cyclic GC), though they are: mypyc's deallocator of such a
# class still takes CPython's trashcan path, which, when the object is freed under 50 nested
# deallocations, links it into a list through a GC header it does not have and corrupts the heap
# (a group of the N+1 detector declared so crashed the interpreter in a test run).
@mypyc_attr(free_list_len=1)
class _Request:
    __slots__ = ("kind", "sent_at", "portal", "pipelined", "count")

    def __init__(self, kind: int, sent_at: float, portal: _Portal | None = None):
        self.kind = kind
        self.sent_at = sent_at
        self.portal = portal
        self.pipelined = False
        self.count = 1  # a run of consecutive Syncs is one entry


class _Query(_Request):
    """A simple Query. PostgreSQL sends the results of all its statements in one flush, so the
    time of each cannot be seen on the wire: the Query is reported whole, with how many
    statements completed, their rows summed and the last tag."""

    __slots__ = ("sql", "truncated", "param_sig", "statements", "rows", "tag", "sqlstate",
                 "done_at", "deallocated")

    def __init__(self, sql: str, truncated: bool, param_sig: int | None, sent_at: float):
        super().__init__(QUERY, sent_at)
        self.sql = sql
        self.truncated = truncated
        self.param_sig = param_sig
        self.statements = 0
        self.rows = 0
        self.tag = ""
        self.sqlstate: str | None = None
        self.done_at = sent_at
        self.deallocated = False  # a named DEALLOCATE ran: its names are read once, at the end


@mypyc_attr(free_list_len=1)
class _Portal:
    """A Bind's portal: the statement text and the parameter signature it runs with."""

    __slots__ = ("sql", "truncated", "param_sig", "n_params", "params", "suspended_at",
                 "suspended_rows")

    def __init__(self, sql: str, truncated: bool, param_sig: int, n_params: int, params):
        self.sql = sql
        self.truncated = truncated
        self.param_sig = param_sig
        self.n_params = n_params
        self.params = params
        self.suspended_at = 0.0  # first Execute's send time while PortalSuspended runs continue
        self.suspended_rows = 0


# A lone Sync, the last request of almost every statement, is this one entry in every FIFO:
# it carries nothing of its own (only a run of Syncs counts, in an entry made for the run), and
# an object per statement freed with the Execute's would miss the one-object free list.
_ONE_SYNC: Final = _Request(SYNC, 0.0)


class _Pending:
    """The FIFO of requests the server still owes an answer to, oldest first: slots
    [_first, _end) of a list that is reused, not emptied. Compiled, each operation is C, where
    each of a deque's is a Python method call; and a list cleared at every ReadyForQuery freed its
    array and allocated it again at the next request. An answered slot holds _ONE_SYNC, which
    keeps nothing alive. The list shrinks when a long pipeline empties, and its answered half is
    dropped while one runs."""

    __slots__ = ("_items", "_first", "_end")

    def __init__(self) -> None:
        self._items: list[_Request] = []
        self._first = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._first

    def __bool__(self) -> bool:
        return self._end > self._first

    def __getitem__(self, index: int) -> _Request:
        """The entry `index` places from the front; negative from the back."""
        position = self._first + index if index >= 0 else self._end + index
        if position < self._first or position >= self._end:
            raise IndexError("no such request outstanding")
        return self._items[position]

    def __iter__(self) -> Iterator[_Request]:
        return iter(self._items[self._first:self._end])

    def append(self, request: _Request) -> None:
        if self._end < len(self._items):
            self._items[self._end] = request
        else:
            self._items.append(request)
        self._end += 1

    def replace_last(self, request: _Request) -> None:
        if self._end <= self._first:
            raise IndexError("no request outstanding")
        self._items[self._end - 1] = request

    def appendleft(self, request: _Request) -> None:
        if self._first:
            self._first -= 1
            self._items[self._first] = request
        else:
            self._items.insert(0, request)
            self._end += 1

    def popleft(self) -> _Request:
        items = self._items
        first = self._first
        if first >= self._end:
            raise IndexError("no request outstanding")
        request = items[first]
        items[first] = _ONE_SYNC
        first += 1
        if first == self._end:
            first = self._end = 0
            if len(items) > _COMPACT_PENDING:
                items.clear()
        elif first >= _COMPACT_PENDING and 2 * first >= self._end:
            del items[:first]
            self._end -= first
            first = 0
        self._first = first
        return request


class Decoder:
    """Feed it what each side sent (`client_data`, `server_data`); it calls `emit(event)`."""

    def __init__(self, session: Session, emit: Callable[[tuple], None], *,
                 ready: Callable[[float], None] | None = None,
                 max_message_length: int = wire.DEFAULT_MAX_MESSAGE_LENGTH,
                 keep_parameters: bool = False, max_sql_chars: int = DEFAULT_MAX_SQL_CHARS,
                 texts: TextBudget | None = None):
        self.session = session
        self.cancel_key: bytes | None = None
        self._emit = emit
        self._on_ready = ready  # the first ReadyForQuery: authentication succeeded
        self._keep_parameters = keep_parameters
        self._max_sql_chars = max_sql_chars
        self._now = 0.0
        self._pending = _Pending()
        self._statements: dict[bytes, tuple[str, bool]] = {}  # name -> (text, truncated)
        # The statement the last Bind named (or the last Parse made), and its text: a client
        # binds one statement again and again, and comparing its name in place costs less than
        # a slice and a dict look-up. None when _statements changed since.
        self._bound_name: bytes | None = None
        self._bound_text = _UNKNOWN
        self._statement_chars = 0
        self._texts = TextBudget() if texts is None else texts
        # The portal bound last (mostly the unnamed one, every statement) is kept apart from the
        # others, which wait in _portals: Bind and Execute then find it by comparing its name in
        # place, where a dict costs a slice, a hash and a look-up each.
        self._portal: _Portal | None = None
        self._portal_name = b""
        self._portals: dict[bytes, _Portal] = {}
        # Completed statement records waiting for ReadyForQuery: the first _held_count slots of
        # a list that is reused (an emitted slot holds the empty tuple), not emptied.
        self._held: list[tuple] = []
        self._held_count = 0
        self._reported_status = ""  # the records.STATUS the records emitted so far stand under
        self._discarding = False  # an extended-protocol error: the server ignores all until Sync
        self._open_executes = 0
        self._last_execute: _Request | None = None
        self._group_executes = 0  # Executes since the last Sync
        self._suspended = 0  # portals waiting for an Execute to continue them
        self._copy_in = False  # between CopyInResponse and the client's CopyDone/CopyFail
        self._ready = False
        self._work_started_at = 0.0  # first client message after the last ReadyForQuery
        self._txn_started_at = 0.0
        self._idle_since = 0.0
        self._idle_in_txn = 0.0
        self._last_tag = ""
        self._last_error = False
        self._tag_body = b""  # the last CommandComplete body, decoded as _tag, _tag_row_count
        self._tag = ""
        self._tag_row_count = 0
        self.client = Framer(_ClientMessages(self), _ClientMessages.DECODED, max_message_length,
                             runs=_ClientMessages.RUNS)
        self.server = Framer(_ServerMessages(self), _ServerMessages.DECODED, max_message_length,
                             runs=_ServerMessages.RUNS)

    # -- entry points ----------------------------------------------------------------------
    def client_data(self, data: bytes, now: float) -> None:
        self._now = now
        if self._idle_since:
            self._idle_in_txn += now - self._idle_since
            self._idle_since = 0.0
        if not self._work_started_at:
            self._work_started_at = now
        self.client.feed(data)

    def server_data(self, data: bytes, now: float) -> None:
        self._now = now
        self.server.feed(data)

    def session_state(self) -> list[tuple]:
        """What an analysis process started after this session began must be told for the
        session's next records to read as they do in the first one: its backend (once ready),
        standard_conforming_strings and the transaction status its records stand under."""
        session = self.session
        state: list[tuple] = []
        if self._ready:
            state.append((records.READY, session.conn_id, self._now, session.backend_pid))
        state.append((records.PARAMETER, session.conn_id, "standard_conforming_strings",
                      "on" if session.standard_strings else "off"))
        state.append((records.STATUS, session.conn_id, self._reported_status))
        return state

    def close(self) -> None:
        """The connection ended: report statements that completed without a ReadyForQuery after."""
        self._release(self._statement_chars)
        if self._held_count:
            self._emit_held("")

    # -- client messages (Frontend) --------------------------------------------------------
    def _push(self, request: _Request) -> None:
        if len(self._pending) >= MAX_PENDING:
            raise DecoderError(f"the client has over {MAX_PENDING} requests outstanding")
        self._pending.append(request)
        self.session.active = True

    def _cut(self, body: bytes, start: int, end: int) -> tuple[str, bool]:
        """The String at body[start:end], cut to max_sql_chars characters (bytes, as decoded
        text is never longer in characters than in bytes)."""
        limit = self._max_sql_chars
        if end - start <= limit:
            return body[start:end].decode("utf-8", "replace"), False
        return body[start:start + limit].decode("utf-8", "ignore"), True

    def _query(self, body: bytes) -> None:
        """Query: String query."""
        end = body.find(0)
        if end < 0:
            end = len(body)
        sql, truncated = self._cut(body, 0, end)
        # The analysis can only hash what it is sent: a cut text's signature is made here, from
        # the bytes, so repeats of one long statement still compare equal.
        self._push(_Query(sql, truncated, hash(body[:end]) if truncated else None, self._now))

    def _parse(self, body: bytes) -> None:
        """Parse: String name, String query, Int16 n, Int32[n] parameter type OIDs."""
        if self._discarding:
            return
        name_end = body.index(0)
        query_end = body.find(0, name_end + 1)
        name = body[:name_end]
        statements = self._statements
        if name and name in statements:
            return  # the server refuses to redefine a named statement (42P05) until it is Closed
        text = self._cut(body, name_end + 1, query_end if query_end >= 0 else len(body))
        size = len(text[0])
        self._forget_statement(name)  # also forgets the bound statement
        texts = self._texts
        while statements and (len(statements) >= _MAX_STATEMENTS
                              or self._statement_chars + size > _MAX_STATEMENT_CHARS
                              or texts.used + size > texts.limit):
            self._release(len(statements.pop(next(iter(statements)))[0]))
        if texts.used + size > texts.limit:
            return  # other sessions hold the budget: this statement's executions show as ""
        statements[name] = text
        self._statement_chars += size
        texts.used += size
        self._bound_name = name  # what the Bind that follows a Parse names
        self._bound_text = text

    def _bind(self, data: bytes, start: i64, end: i64, complete: bool) -> None:
        """Bind: String portal, String statement, Int16 nfmt, Int16[nfmt], Int16 nparams,
        (Int32 len, Byte[len])[nparams], Int16 nresfmt, Int16[nresfmt]."""
        if self._discarding:
            return
        portal_end = _string_end(data, start, end)
        statement_end = _string_end(data, portal_end + 1, end)
        pos = statement_end + 1
        n_formats = _int16_before(data, pos, end)
        if n_formats < 0:
            raise DecoderError(f"Bind with {n_formats} parameter format codes")
        pos += 2 + 2 * n_formats
        n_params = _int16_before(data, pos, end)
        # Keyed hash (Python's per-process salted hash): equal values give equal signatures,
        # the values themselves are never kept.
        values = data[pos:end]
        signature = hash(values) if complete else hash((values, "incomplete"))
        params = (_bind_values(data[start:end], pos - start, n_params)
                  if self._keep_parameters and complete else None)
        bound = self._bound_name
        if bound is None or not _equal_at(data, portal_end + 1, statement_end, bound):
            bound = data[portal_end + 1:statement_end]
            self._bound_name = bound
            self._bound_text = self._statements.get(bound, _UNKNOWN)
        sql, truncated = self._bound_text
        old = self._portal
        if old is None or not _equal_at(data, start, portal_end, self._portal_name):
            if old is not None:
                self._portals[self._portal_name] = old
            name = data[start:portal_end]
            old = self._portals.pop(name, None)
            self._portal_name = name
        if old is not None and old.suspended_at:  # rebinding a suspended portal ends what ran of it
            self._finish_suspended(old)
        self._portal = _Portal(sql, truncated, signature, n_params, params)

    def _execute(self, data: bytes, start: i64, end: i64) -> None:
        """Execute: String portal, Int32 maximum rows (0 = no limit)."""
        if self._discarding:
            return
        name_end = _string_end(data, start, end)
        portal = self._portal
        if portal is None or not _equal_at(data, start, name_end, self._portal_name):
            portal = self._portals.get(data[start:name_end])
        if portal is None:  # pgscout did not see the Bind (e.g. evicted): time it anyway
            portal = _Portal("", False, 0, 0, None)
        request = _Request(EXECUTE, self._now, portal)
        if self._open_executes:
            request.pipelined = True
            if self._last_execute is not None:
                self._last_execute.pipelined = True
        self._open_executes += 1
        self._group_executes += 1
        self._last_execute = request
        self._push(request)

    def _close(self, body: bytes) -> None:
        """Close: Byte1 'S' (statement) or 'P' (portal), String name."""
        if self._discarding:
            return
        name = body[1:body.index(0, 1)]
        if body[0] == 0x53:  # 'S'
            self._forget_statement(name)
        else:
            portal = self._take_portal(name)
            if portal is not None and portal.suspended_at:
                self._finish_suspended(portal)

    def _sync(self) -> None:
        """Sync: no body."""
        if self._copy_in:
            return  # the server ignores Sync in copy-in mode
        self._discarding = False
        if self._group_executes > 1:
            self._mark_group_pipelined()
        self._group_executes = 0
        pending = self._pending
        if pending and pending[-1].kind == SYNC:
            # Sync after Sync: one entry counts them, so a flood of Syncs costs no memory.
            self._add_syncs(1)
            self.session.active = True
            return
        self._push(_ONE_SYNC)

    def _sync_run(self, count: int) -> None:
        """`count` Syncs in a row: the first as any Sync, the rest join its FIFO entry."""
        self._sync()
        if count > 1 and not self._copy_in:
            self._add_syncs(count - 1)

    def _add_syncs(self, count: int) -> None:
        """`count` more Syncs join the run last in the FIFO; a lone Sync's shared entry is
        replaced by one of the run's own first."""
        pending = self._pending
        run = pending[-1]
        if run is _ONE_SYNC:
            run = _Request(SYNC, self._now)
            pending.replace_last(run)
        run.count += count

    def _function_call(self) -> None:
        """FunctionCall: Int32 function OID, then its arguments: only its answer is waited for."""
        self._push(_Request(FUNCTION, self._now))

    def _copy_done(self) -> None:
        """CopyDone or CopyFail from the client: copy-in mode ends."""
        self._copy_in = False

    # -- server messages (Backend) ---------------------------------------------------------
    def _expect(self, kind: int) -> _Request:
        if not self._pending:
            raise DecoderError(f"server answered a {_KIND_NAMES[kind]} nobody sent")
        request = self._pending.popleft()
        if request.kind != kind:
            raise DecoderError(f"server answered a {_KIND_NAMES[kind]} while a "
                               f"{_KIND_NAMES[request.kind]} was first in line")
        return request

    def _command_complete(self, data: bytes, start: i64, end: i64) -> None:
        """CommandComplete: String tag ("SELECT 5", "INSERT 0 1", "UPDATE 3", "BEGIN"...)."""
        # Sessions mostly repeat one tag (pgbench: "SELECT 1"): it is decoded when it changes.
        if not _equal_at(data, start, end, self._tag_body):
            body = data[start:end]
            self._tag_body = body
            self._tag = body[:-1].decode("ascii", "replace")
            self._tag_row_count = _tag_rows(body[:-1])
        self._statement_done(self._tag, self._tag_row_count, None)

    def _empty_query_response(self) -> None:
        """EmptyQueryResponse: no body; it answers an empty query string in place of CommandComplete."""
        self._statement_done("EMPTY", 0, None)

    def _portal_suspended(self) -> None:
        """PortalSuspended: the Execute's row limit was reached; a later Execute continues it."""
        request = self._expect(EXECUTE)
        self._open_executes -= 1
        portal = request.portal
        assert portal is not None  # every Execute request carries its portal
        if not portal.suspended_at:
            portal.suspended_at = request.sent_at
            self._suspended += 1
        portal.suspended_rows += self.server.data_rows
        self.server.data_rows = 0

    def _copy_in_response(self) -> None:
        """CopyInResponse: the server now ignores Sync until CopyDone or CopyFail. libpq sends
        Parse/Bind/Execute/Sync in one go, so that Sync is already queued: drop it."""
        self._copy_in = True
        pending = self._pending
        if pending and pending[0].kind == EXECUTE:
            head = pending.popleft()
            while pending and pending[0].kind == SYNC:
                pending.popleft()
            pending.appendleft(head)

    def _error_response(self, body: bytes) -> None:
        """ErrorResponse: (Byte1 field code, String value)* then a zero byte; 'C' is the SQLSTATE."""
        sqlstate = _error_field(body, b"C")
        self._copy_in = False
        if not self._pending:
            # A Parse/Bind/Describe failed before the client sent Sync (or a FATAL at startup
            # or shutdown): nothing to charge; the server now discards until Sync.
            self._discarding = self._ready
            return
        head = self._pending[0]
        if head.kind == QUERY:
            self._statement_done("", 0, sqlstate)
            return
        # Extended protocol: charge the error to the Execute of this Sync group (that is the
        # statement that did not run), then drop what the server will skip until Sync.
        execute = next((r for r in self._pending if r.kind in (EXECUTE, SYNC)), None)
        while self._pending and self._pending[0].kind not in (SYNC, QUERY, FUNCTION):
            request = self._pending.popleft()
            if request.kind == EXECUTE:
                self._open_executes -= 1
                if request is execute and request.portal is not None:
                    self._finish(request.portal, request.sent_at, True, request.pipelined,
                                 "", 0, sqlstate)
        if not self._pending:
            self._discarding = True  # the client has not sent its Sync yet
        self.server.data_rows = 0

    def _ready_for_query(self, data: bytes, start: i64, end: i64) -> None:
        """ReadyForQuery: Byte1 status: 'I' idle, 'T' in a transaction block, 'E' failed block."""
        if end <= start:
            raise DecoderError("ReadyForQuery without a status")
        status = _CHARS[data[start]]
        idle = status == "I"
        # The startup's ReadyForQuery answers no request: a client may have sent its first
        # statements before it arrived, and they are still owed.
        pending = self._pending
        while self._ready and pending:
            head = pending[0]
            if head.kind == SYNC and head.count > 1:
                head.count -= 1
                break
            pending.popleft()
            if head.kind == EXECUTE:  # its reply was skipped after an error
                self._open_executes -= 1
                continue
            if isinstance(head, _Query):
                self._query_done(head)
            break
        session = self.session
        previous = session.txn_status
        session.txn_status = status
        session.active = bool(pending)
        if not pending:
            self._open_executes = 0
            self._last_execute = None
        if idle and self._suspended:
            # Leaving the transaction destroys its portals, suspended ones included.
            for name in [n for n, p in self._portals.items() if p.suspended_at]:
                self._finish_suspended(self._portals.pop(name))
            current = self._portal
            if current is not None and current.suspended_at:
                self._portal = None
                self._finish_suspended(current)
        if self._held_count:
            self._emit_held(status)
        if not self._ready:
            self._ready = True
            self._emit((records.READY, session.conn_id, self._now, session.backend_pid))
            if self._on_ready is not None:
                self._on_ready(self._now)
        elif not idle and previous in ("I", ""):
            self._txn_started_at = self._work_started_at or self._now
            self._idle_in_txn = 0.0
        elif idle and previous in ("T", "E"):
            self._end_transaction(previous)
        if not idle:
            self._idle_since = self._now
        self._work_started_at = 0.0

    def _ready_run(self, data: bytes, start: i64, end: i64, count: int) -> None:
        """`count` identical ReadyForQuery in a row: past the first, those that answer a run of
        Syncs change nothing but the run's count (same status, nothing completed between)."""
        self._ready_for_query(data, start, end)
        remaining = count - 1
        pending = self._pending
        if remaining and self._ready and pending and pending[0].kind == SYNC and not self._held_count:
            taken = min(remaining, pending[0].count - 1)
            if taken > 0:  # a lone Sync's entry is shared: never written
                pending[0].count -= taken
                remaining -= taken
        for _ in range(remaining):
            self._ready_for_query(data, start, end)

    def _backend_key_data(self, body: bytes) -> None:
        """BackendKeyData: Int32 pid, then the secret key (4 bytes before protocol 3.2, up to 256)."""
        self.session.backend_pid = int32(body, 0)
        self.cancel_key = body[4:]

    def _parameter_status(self, body: bytes) -> None:
        """ParameterStatus: String name, String value (sent at startup and when a GUC_REPORT changes)."""
        name_end = body.index(0)
        name = body[:name_end]
        if name in _REPORTED_PARAMETERS:
            value = _text(body[name_end + 1:])
            if name == b"application_name":
                self.session.application_name = value
            else:  # standard_conforming_strings, for session_state
                self.session.standard_strings = value == "on"
            self._emit((records.PARAMETER, self.session.conn_id, name.decode(), value))

    # -- statement completion --------------------------------------------------------------
    def _statement_done(self, tag: str, rows: int, sqlstate: str | None) -> None:
        if not self._pending:
            raise DecoderError("server completed a statement nobody sent")
        head = self._pending[0]
        data_rows = self.server.data_rows
        self.server.data_rows = 0
        if isinstance(head, _Query):
            self._query_statement_done(head, tag, rows, sqlstate)
            return
        request = self._expect(EXECUTE)
        self._open_executes -= 1
        assert request.portal is not None  # every Execute request carries its portal
        self._finish(request.portal, request.sent_at, True, request.pipelined, tag, rows, sqlstate,
                     data_rows)

    def _query_statement_done(self, query: _Query, tag: str, rows: int, sqlstate: str | None) -> None:
        query.statements += 1
        query.rows += rows
        query.tag = tag
        query.done_at = self._now
        if sqlstate is not None:
            query.sqlstate = sqlstate  # the server skips the rest of the Query string
        elif tag == "DEALLOCATE":
            query.deallocated = True
        else:
            self._track_pool_statements("", tag, sqlstate)

    def _query_done(self, query: _Query) -> None:
        """ReadyForQuery ended a simple Query: one record for all its statements."""
        if query.deallocated:
            self._track_pool_statements(query.sql, "DEALLOCATE", None)
        if not query.statements:
            return  # answered by an error before any statement (e.g. a FATAL): nothing ran
        self._hold((records.STATEMENT, self.session.conn_id, query.sql, query.statements, False,
                    query.sent_at, query.done_at, query.tag, query.rows, query.sqlstate,
                    query.param_sig, 0, None, query.statements > 1, query.truncated))

    def _finish(self, portal: _Portal, sent_at: float, extended: bool, pipelined: bool, tag: str,
                rows: int, sqlstate: str | None, data_rows: int = 0) -> None:
        if portal.suspended_at:
            sent_at = portal.suspended_at
            rows = portal.suspended_rows + (rows or data_rows)
            self._suspended -= 1
            portal.suspended_at = 0.0
            portal.suspended_rows = 0
        self._hold((records.STATEMENT, self.session.conn_id, portal.sql, 1, extended, sent_at,
                    self._now, tag, rows, sqlstate, portal.param_sig, portal.n_params,
                    portal.params, pipelined, portal.truncated))
        self._track_pool_statements(portal.sql, tag, sqlstate)

    def _finish_suspended(self, portal: _Portal) -> None:
        """A portal closed before running to completion: report what ran of it."""
        self._finish(portal, portal.suspended_at, True, False, "", 0, None)

    def _hold(self, record: tuple) -> None:
        self._last_tag = record[records.S_TAG]
        self._last_error = record[records.S_SQLSTATE] is not None
        held = self._held
        count = self._held_count
        if count < len(held):
            held[count] = record
        else:
            held.append(record)
        self._held_count = count + 1
        if count + 1 >= _MAX_HELD_EVENTS:
            if self._group_executes > 1:
                self._mark_group_pipelined()  # the Sync that will end them comes after
            self._emit_held("")

    def _mark_group_pipelined(self) -> None:
        """Executes sharing one Sync are a batch (executemany, pipelines), not a loop: those
        still owed, and those already answered (a pipeline that Flushes and reads each), whose
        records are held (tuples: rebuilt)."""
        owed = 0
        for request in self._pending:
            if request.kind == EXECUTE:
                request.pipelined = True
                owed += 1
        answered = self._group_executes - owed
        held = self._held
        for index in range(max(0, self._held_count - answered), self._held_count):
            record = held[index]
            if record[records.S_EXTENDED] and not record[records.S_PIPELINED]:
                held[index] = (*record[:records.S_PIPELINED], True, *record[records.S_PIPELINED + 1:])

    def _emit_held(self, status: str) -> None:
        """Emit the held statement records, after the status they stand under when it is not
        the one the session's records were last sent with."""
        if status != self._reported_status:
            self._reported_status = status
            self._emit((records.STATUS, self.session.conn_id, status))
        held = self._held
        for index in range(self._held_count):
            record = held[index]
            held[index] = ()
            self._emit(record)
        self._held_count = 0

    def _track_pool_statements(self, sql: str, tag: str, sqlstate: str | None) -> None:
        """SQL-level DEALLOCATE and DISCARD ALL drop protocol-level prepared statements too."""
        # Most tags do not start with "D": one compiled comparison, where startswith is a call.
        if (sqlstate is not None or not tag or tag[0] != "D"
                or not (tag.startswith("DEALLOCATE") or tag.startswith("DISCARD"))):
            return
        if tag in ("DEALLOCATE ALL", "DISCARD ALL"):
            self._statements.clear()
            self._bound_name = None
            self._release(self._statement_chars)
            if tag == "DISCARD ALL":
                self._portals.clear()
                self._portal = None
                self._suspended = 0
            return
        if tag == "DEALLOCATE":
            for match in _DEALLOCATE.finditer(sql):
                name = match.group(1)
                if name.startswith('"'):
                    name = name[1:-1].replace('""', '"')
                else:
                    name = name.lower()
                self._forget_statement(name.encode())

    def _forget_statement(self, name: bytes) -> None:
        self._bound_name = None
        text = self._statements.pop(name, None)
        if text is not None:
            self._release(len(text[0]))

    def _take_portal(self, name: bytes) -> _Portal | None:
        """Remove the portal `name` (Close), wherever it is kept."""
        if self._portal is not None and name == self._portal_name:
            portal = self._portal
            self._portal = None
            return portal
        return self._portals.pop(name, None)

    def _release(self, size: int) -> None:
        self._statement_chars -= size
        self._texts.used -= size

    def _end_transaction(self, previous: str) -> None:
        if previous == "E" or self._last_error:
            outcome = "aborted"
        elif self._last_tag == "ROLLBACK":
            outcome = "rollback"
        else:
            outcome = "commit"
        self._emit((records.TRANSACTION, self.session.conn_id, self._txn_started_at, self._now,
                    outcome, self._idle_in_txn))
        self._idle_in_txn = 0.0


class _ClientMessages(MessageSink):
    """The frontend dispatch table: each client message type the decoder reads, to its handler."""

    DECODED: Final = (wire.F_QUERY, wire.F_PARSE, wire.F_BIND, wire.F_EXECUTE, wire.F_CLOSE,
                      wire.F_SYNC, wire.F_FUNCTION_CALL, wire.F_COPY_DONE, wire.F_COPY_FAIL)
    RUNS: Final = (wire.F_SYNC,)

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder

    # Compiled, each branch is a direct call of the decoder's method. The messages of every
    # statement are read in place; the others get their body as bytes of its own.
    def message(self, typ: int, data: bytes, start: i64, end: i64, complete: bool) -> None:
        decoder = self._decoder
        if typ == wire.F_BIND:
            decoder._bind(data, start, end, complete)
        elif typ == wire.F_EXECUTE:
            decoder._execute(data, start, end)
        elif typ == wire.F_SYNC:
            decoder._sync()
        elif typ == wire.F_PARSE:
            decoder._parse(data[start:end])
        elif typ == wire.F_QUERY:
            decoder._query(data[start:end])
        elif typ == wire.F_CLOSE:
            decoder._close(data[start:end])
        elif typ == wire.F_FUNCTION_CALL:
            decoder._function_call()
        elif typ == wire.F_COPY_DONE or typ == wire.F_COPY_FAIL:
            decoder._copy_done()

    def run(self, typ: int, data: bytes, start: i64, end: i64, count: int) -> None:
        self._decoder._sync_run(count)


class _ServerMessages(MessageSink):
    """The backend dispatch table: each server message type the decoder reads, to its handler."""

    DECODED: Final = (wire.B_COMMAND_COMPLETE, wire.B_EMPTY_QUERY_RESPONSE, wire.B_PORTAL_SUSPENDED,
                      wire.B_ERROR_RESPONSE, wire.B_COPY_IN_RESPONSE, wire.B_READY_FOR_QUERY,
                      wire.B_BACKEND_KEY_DATA, wire.B_PARAMETER_STATUS)
    RUNS: Final = (wire.B_READY_FOR_QUERY,)

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder

    def message(self, typ: int, data: bytes, start: i64, end: i64, complete: bool) -> None:
        decoder = self._decoder
        if typ == wire.B_COMMAND_COMPLETE:
            decoder._command_complete(data, start, end)
        elif typ == wire.B_READY_FOR_QUERY:
            decoder._ready_for_query(data, start, end)
        elif typ == wire.B_ERROR_RESPONSE:
            decoder._error_response(data[start:end])
        elif typ == wire.B_EMPTY_QUERY_RESPONSE:
            decoder._empty_query_response()
        elif typ == wire.B_PORTAL_SUSPENDED:
            decoder._portal_suspended()
        elif typ == wire.B_COPY_IN_RESPONSE:
            decoder._copy_in_response()
        elif typ == wire.B_PARAMETER_STATUS:
            decoder._parameter_status(data[start:end])
        elif typ == wire.B_BACKEND_KEY_DATA:
            decoder._backend_key_data(data[start:end])

    def run(self, typ: int, data: bytes, start: i64, end: i64, count: int) -> None:
        self._decoder._ready_run(data, start, end, count)


_UNKNOWN: Final = ("", False)
# A byte as a one-character str: indexing this is compiled, a call of chr() is not.
_CHARS: Final = bytes(range(256)).decode("latin-1")


def _text(raw: bytes) -> str:
    """A String field without its terminator; invalid UTF-8 is replaced, never raised."""
    end = raw.find(0)
    if end >= 0:
        raw = raw[:end]
    return raw.decode("utf-8", "replace")


def _string_end(data: bytes, start: i64, end: i64) -> i64:
    """Where the String at data[start] ends (its zero byte), before the body's end. Names are
    short: a compiled loop (over native integers) costs less than a call of bytes.index; an
    unterminated one raises IndexError."""
    pos = start
    while pos < end and data[pos]:
        pos += 1
    if pos >= end:
        raise IndexError("unterminated String")
    return pos


def _int16_before(data: bytes, pos: i64, end: i64) -> i64:
    """The Int16 at data[pos], which must lie before the body's end."""
    if pos + 2 > end:
        raise IndexError("message ends inside an Int16")
    return int16(data, pos)


def _equal_at(data: bytes, start: i64, end: i64, other: bytes) -> bool:
    """data[start:end] == other, compared in place (compiled: no slice, no call)."""
    size = end - start
    if size != len(other):
        return False
    i: i64 = 0
    while i < size:
        if data[start + i] != other[i]:
            return False
        i += 1
    return True


def _tag_rows(tag: bytes) -> int:
    """The row count that ends SELECT/INSERT/UPDATE/DELETE/MERGE/COPY/FETCH/MOVE tags: the
    digits after the last space, read byte by byte (compiled, no str and no int() call)."""
    start = len(tag)
    while start and 0x30 <= tag[start - 1] <= 0x39:
        start -= 1
    if start == len(tag) or not start or tag[start - 1] != 0x20:
        return 0
    rows = 0
    for pos in range(start, len(tag)):
        rows = rows * 10 + tag[pos] - 0x30
    return rows


def _error_field(body: bytes, code: bytes) -> str | None:
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(0, pos + 1)
        if body[pos:pos + 1] == code:
            return body[pos + 1:end].decode("ascii", "replace")
        pos = end + 1
    return None


def _bind_values(body: bytes, pos: int, n_params: int) -> tuple[bytes | None, ...]:
    pos += 2
    values: list[bytes | None] = []
    for _ in range(n_params):
        length = int32(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    return tuple(values)
