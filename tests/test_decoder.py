"""The decoder, driven with the byte streams of realistic client/server conversations.

Owns: checking the exact events (StatementDone, SessionReady, TransactionEnded) and the live
session fields for each protocol flow, that the events do not depend on read boundaries, and that
arbitrary bytes raise nothing the pipe does not catch.
Must not: open sockets or start PostgreSQL (the integration tests do), or look at decoder internals.
The server replies below are what PostgreSQL 15 sends for each request (Message Flow docs).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wirebuild as w
from pgscout.analysis.bus import Bus
from pgscout.analysis.replay import Replay
from pgscout.dataplane.decoder import (DEFAULT_MAX_SQL_CHARS, MAX_PENDING, Decoder, DecoderError,
                                       TextBudget)
from pgscout.dataplane.events import Session, SessionReady, StatementDone, TransactionEnded
from pgscout.dataplane.framer import DECODE_LIMIT

BACKEND_PID = 4321
CANCEL_KEY = b"\x0a\x0b\x0c\x0d"
STATEMENT_FIELDS = ("sql", "statement_count", "extended", "sent_at", "done_at", "tag", "rows", "sqlstate",
                    "n_params", "params", "pipelined", "txn_status")


class EventLog(Bus):
    """A bus that keeps what it is given, in order, for the assertions."""

    def __init__(self) -> None:
        super().__init__(on_error=None)
        self.events: list[object] = []

    def publish(self, event: object) -> None:
        self.events.append(event)

    def publish_statement(self, event: StatementDone) -> None:
        self.events.append(event)


class Conversation:
    """One session: each step is what one side sent in one read, one second after the previous step."""

    def __init__(self, keep_parameters: bool = False):
        self.session = Session(conn_id=1, client_addr="t")
        # The decoder's records are replayed into events the way the analysis process does.
        log = EventLog()
        self.events = log.events
        replay = Replay(log)
        self.decoder = Decoder(self.session, lambda record: replay.feed([record]),
                               keep_parameters=keep_parameters)
        self.now = 100.0
        self.steps: list[tuple[str, float, bytes]] = []
        self._taken = 0

    def client(self, *messages: bytes, after: float = 1.0) -> float:
        return self._step("client", messages, after)

    def server(self, *messages: bytes, after: float = 1.0) -> float:
        return self._step("server", messages, after)

    def _step(self, side: str, messages: tuple[bytes, ...], after: float) -> float:
        self.now += after
        data = b"".join(messages)
        self.steps.append((side, self.now, data))
        feed = self.decoder.client_data if side == "client" else self.decoder.server_data
        feed(data, self.now)
        return self.now

    def take(self) -> list[tuple[str, dict]]:
        """The events emitted since the last take, in the comparable form of `observed`."""
        new = self.events[self._taken:]
        self._taken = len(self.events)
        assert all(event.session.conn_id == self.session.conn_id for event in new)
        return [observed(event) for event in new]

    def statements(self) -> list[StatementDone]:
        return [event for event in self.events if isinstance(event, StatementDone)]


def observed(event) -> tuple[str, dict]:
    if isinstance(event, StatementDone):
        fields = {name: getattr(event, name) for name in STATEMENT_FIELDS}
        # The signature's value is a salted hash: tests compare signatures with each other.
        fields["param_sig"] = None if event.param_sig is None else type(event.param_sig).__name__
        return "StatementDone", fields
    if isinstance(event, SessionReady):
        return "SessionReady", {"at": event.at}
    if isinstance(event, TransactionEnded):
        return "TransactionEnded", {"started_at": event.started_at, "ended_at": event.ended_at,
                                    "outcome": event.outcome, "idle_seconds": event.idle_seconds}
    return type(event).__name__, {}


def done(sql: str, sent_at: float, done_at: float, tag: str = "", rows: int = 0, *, count: int = 1,
         extended: bool = False, sqlstate: str | None = None, n_params: int = 0, params=None,
         pipelined: bool = False, txn_status: str = "I") -> tuple[str, dict]:
    return "StatementDone", {
        "sql": sql, "statement_count": count, "extended": extended, "sent_at": sent_at,
        "done_at": done_at, "tag": tag, "rows": rows, "sqlstate": sqlstate, "n_params": n_params,
        "params": params, "pipelined": pipelined, "txn_status": txn_status,
        "param_sig": "int" if extended else None,
    }


def ready(at: float) -> tuple[str, dict]:
    return "SessionReady", {"at": at}


def ended(started_at: float, ended_at: float, outcome: str, idle_seconds: float) -> tuple[str, dict]:
    return "TransactionEnded", {"started_at": started_at, "ended_at": ended_at, "outcome": outcome,
                                "idle_seconds": idle_seconds}


def select_rows(n: int) -> list[bytes]:
    return [w.data_row([str(i).encode()]) for i in range(n)]


# -- scenarios: each starts and ends with the session idle, so they also chain into one session ----
def startup(conv: Conversation) -> None:
    conv.server(w.auth_cleartext_password())
    conv.client(w.password(b"hunter2\0"))
    at = conv.server(w.auth_ok(), w.parameter_status("application_name", "billing"),
                     w.parameter_status("server_version", "15.8"),
                     w.backend_key_data(BACKEND_PID, CANCEL_KEY), w.ready_for_query("I"))
    assert conv.take() == [ready(at)]
    assert conv.session.backend_pid == BACKEND_PID
    assert conv.decoder.cancel_key == CANCEL_KEY
    assert conv.session.application_name == "billing"
    assert conv.session.txn_status == "I"
    assert not conv.session.active


def simple_query(conv: Conversation) -> None:
    sent = conv.client(w.query("select id from users"))
    assert conv.session.active
    at = conv.server(w.row_description(1), *select_rows(3), w.command_complete("SELECT 3"),
                     w.ready_for_query("I"))
    assert conv.take() == [done("select id from users", sent, at, "SELECT 3", 3)]
    assert not conv.session.active


def empty_query(conv: Conversation) -> None:
    sent = conv.client(w.query(""))
    at = conv.server(w.empty_query_response(), w.ready_for_query("I"))
    assert conv.take() == [done("", sent, at, "EMPTY", 0)]


def multi_statement_query(conv: Conversation) -> None:
    sql = "insert into t values (1); update t set a = 2; select a from t"
    sent = conv.client(w.query(sql))
    first = conv.server(w.command_complete("INSERT 0 1"))
    second = conv.server(w.command_complete("UPDATE 2"))
    assert conv.take() == []  # held until ReadyForQuery gives the transaction status
    third = conv.server(w.row_description(1), *select_rows(2), w.command_complete("SELECT 2"))
    at = conv.server(w.ready_for_query("I"))
    # Their results came in one flush: the Query is one statement record, timed whole.
    assert conv.take() == [done(sql, sent, third, "SELECT 2", 5, count=3, pipelined=True)]
    assert at > third and not conv.session.active


def error_in_multi_statement_query(conv: Conversation) -> None:
    sql = "select 1; select 1/0; select 3"
    sent = conv.client(w.query(sql))
    first = conv.server(w.row_description(1), *select_rows(1), w.command_complete("SELECT 1"))
    failed = conv.server(w.row_description(1), w.error_response("22012", "division by zero"),
                         w.ready_for_query("I"))
    assert first < failed
    assert conv.take() == [done(sql, sent, failed, "", 1, count=2, sqlstate="22012", pipelined=True)]
    assert not conv.session.active


def extended_unnamed(conv: Conversation) -> None:
    sql = "select name from users where id = $1"
    sent = conv.client(w.parse("", sql), w.bind("", "", [b"7"]), w.describe("P", ""),
                       w.execute(""), w.sync())
    assert conv.session.active
    at = conv.server(w.parse_complete(), w.bind_complete(), w.row_description(1), *select_rows(1),
                     w.command_complete("SELECT 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "SELECT 1", 1, extended=True, n_params=1)]
    assert not conv.session.active


def extended_named_with_describe_statement(conv: Conversation) -> None:
    sql = "select * from orders where user_id = $1 and state = $2"
    conv.client(w.parse("s_orders", sql, (23, 25)), w.describe("S", "s_orders"), w.sync())
    conv.server(w.parse_complete(), w.parameter_description(2), w.row_description(3),
                w.ready_for_query("I"))
    assert conv.take() == [] and not conv.session.active

    times = []
    for params in ([b"1", b"open"], [b"2", b"open"], [b"1", b"open"]):
        sent = conv.client(w.bind("", "s_orders", params, (0,), (1,)), w.execute(""), w.sync())
        at = conv.server(w.bind_complete(), *select_rows(2), w.command_complete("SELECT 2"),
                         w.ready_for_query("I"))
        times.append((sent, at))
    assert conv.take() == [done(sql, sent, at, "SELECT 2", 2, extended=True, n_params=2)
                           for sent, at in times]
    first, second, third = (event.param_sig for event in conv.statements()[-3:])
    assert first != second
    assert first == third


def describe_portal_no_data(conv: Conversation) -> None:
    sql = "insert into audit(msg) values ($1)"
    sent = conv.client(w.parse("", sql), w.bind("", "", [b"hi"]), w.describe("P", ""), w.execute(""),
                       w.sync())
    at = conv.server(w.parse_complete(), w.bind_complete(), w.no_data(),
                     w.command_complete("INSERT 0 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "INSERT 0 1", 1, extended=True, n_params=1)]


def describe_statement_no_data(conv: Conversation) -> None:
    conv.client(w.parse("s_upd", "update t set a = $1"), w.describe("S", "s_upd"), w.sync())
    conv.server(w.parse_complete(), w.parameter_description(1), w.no_data(), w.ready_for_query("I"))
    assert conv.take() == [] and not conv.session.active


def pipeline_one_sync(conv: Conversation) -> None:
    sql = "insert into t values ($1)"
    sent = conv.client(w.parse("s_ins", sql),
                       *[m for v in (b"1", b"2", b"3") for m in (w.bind("", "s_ins", [v]), w.execute(""))],
                       w.sync())
    first = conv.server(w.parse_complete(), w.bind_complete(), w.command_complete("INSERT 0 1"))
    second = conv.server(w.bind_complete(), w.command_complete("INSERT 0 1"))
    third = conv.server(w.bind_complete(), w.command_complete("INSERT 0 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "INSERT 0 1", 1, extended=True, n_params=1,
                                pipelined=True) for at in (first, second, third)]


def pipeline_flushed_one_at_a_time(conv: Conversation) -> None:
    """psycopg's pipeline() read row by row: each Execute is Flushed and answered before the
    next is sent, and one Sync ends them all; sharing it, they are a batch all the same."""
    sql = "select * from items where id = $1"
    sent = conv.client(w.parse("s_flushed", sql), w.bind("", "s_flushed", [b"1"]), w.execute(""),
                       w.flush())
    sent_at = [sent]
    answers = [conv.server(w.parse_complete(), w.bind_complete(), *select_rows(1),
                           w.command_complete("SELECT 1"))]
    for value in (b"2", b"3"):
        sent_at.append(conv.client(w.bind("", "s_flushed", [value]), w.execute(""), w.flush()))
        answers.append(conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1")))
    conv.client(w.sync())
    conv.server(w.ready_for_query("I"))
    assert conv.take() == [done(sql, at_sent, at, "SELECT 1", 1, extended=True, n_params=1,
                                pipelined=True) for at_sent, at in zip(sent_at, answers)]


def separate_syncs_one_at_a_time(conv: Conversation) -> None:
    sql = "select * from items where id = $1"
    conv.client(w.parse("s_item", sql), w.sync())
    conv.server(w.parse_complete(), w.ready_for_query("I"))
    expected = []
    for value in (b"1", b"2"):
        sent = conv.client(w.bind("", "s_item", [value]), w.execute(""), w.sync())
        at = conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                         w.ready_for_query("I"))
        expected.append(done(sql, sent, at, "SELECT 1", 1, extended=True, n_params=1))
    assert conv.take() == expected


def separate_syncs_sent_together(conv: Conversation) -> None:
    """libpq pipeline mode: each Execute has its Sync, but all are sent before any answer."""
    sql = "select * from items where id = $1"
    sent = conv.client(w.parse("s_item2", sql),
                       *[m for v in (b"1", b"2") for m in (w.bind("", "s_item2", [v]), w.execute(""),
                                                             w.sync())])
    first = conv.server(w.parse_complete(), w.bind_complete(), *select_rows(1),
                        w.command_complete("SELECT 1"),
                        w.ready_for_query("I"))
    assert conv.session.active  # the second Execute is still owed
    second = conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                         w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "SELECT 1", 1, extended=True, n_params=1,
                                pipelined=True) for at in (first, second)]
    assert not conv.session.active


def error_in_pipeline(conv: Conversation) -> None:
    sql = "insert into uniq values ($1)"
    sent = conv.client(w.parse("s_uniq", sql),
                       *[m for v in (b"1", b"1", b"2") for m in (w.bind("", "s_uniq", [v]), w.execute(""))],
                       w.sync())
    first = conv.server(w.parse_complete(), w.bind_complete(), w.command_complete("INSERT 0 1"))
    failed = conv.server(w.bind_complete(), w.error_response("23505", "duplicate key"))
    conv.server(w.ready_for_query("I"))  # the third Bind/Execute were skipped by the server
    assert conv.take() == [
        done(sql, sent, first, "INSERT 0 1", 1, extended=True, n_params=1, pipelined=True),
        done(sql, sent, failed, "", 0, extended=True, n_params=1, pipelined=True, sqlstate="23505"),
    ]
    assert not conv.session.active
    sent = conv.client(w.bind("", "s_uniq", [b"3"]), w.execute(""), w.sync())
    at = conv.server(w.bind_complete(), w.command_complete("INSERT 0 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "INSERT 0 1", 1, extended=True, n_params=1)]


def error_before_sync(conv: Conversation) -> None:
    """The client flushes without Sync, sees the error, and keeps sending until its Sync."""
    sent = conv.client(w.parse("", "selec 1"), w.bind("", "", []), w.execute(""), w.flush())
    failed = conv.server(w.error_response("42601", "syntax error"))
    # The server discards all of this until the Sync: none of it may be counted or remembered.
    conv.client(w.parse("s_discarded", "select 2"), w.bind("", "s_discarded", []), w.execute(""),
                w.close("S", "s_discarded"), w.sync())
    conv.server(w.ready_for_query("I"))
    assert conv.take() == [done("selec 1", sent, failed, "", 0, extended=True, sqlstate="42601")]
    assert not conv.session.active
    sent = conv.client(w.bind("", "s_discarded", []), w.execute(""), w.sync())
    failed = conv.server(w.error_response("26000", 'prepared statement "s_discarded" does not exist'),
                         w.ready_for_query("I"))
    assert conv.take() == [done("", sent, failed, "", 0, extended=True, sqlstate="26000")]


def error_before_sync_without_execute(conv: Conversation) -> None:
    """asyncpg-style prepare: Parse + Describe + Flush fails; what the client sends before its
    Sync is discarded by the server, so a Parse in it prepares nothing."""
    conv.client(w.parse("s_bad", "selec 1"), w.describe("S", "s_bad"), w.flush())
    conv.server(w.error_response("42601", "syntax error"))
    conv.client(w.parse("s_never", "select 2"), w.sync())
    conv.server(w.ready_for_query("I"))
    assert conv.take() == [] and not conv.session.active
    sent = conv.client(w.bind("", "s_never", []), w.execute(""), w.sync())
    failed = conv.server(w.error_response("26000", 'prepared statement "s_never" does not exist'),
                         w.ready_for_query("I"))
    assert conv.take() == [done("", sent, failed, "", 0, extended=True, sqlstate="26000")]


def duplicate_parse_is_rejected(conv: Conversation) -> None:
    """Parse of a name already prepared fails (42P05) and leaves the old statement in place."""
    conv.client(w.parse("s_dup", "select 'old'"), w.sync())
    conv.server(w.parse_complete(), w.ready_for_query("I"))
    conv.client(w.parse("s_dup", "select 'new'"), w.bind("", "s_dup", []), w.execute(""), w.sync())
    conv.server(w.error_response("42P05", 'prepared statement "s_dup" already exists'),
                w.ready_for_query("I"))
    conv.take()
    sent = conv.client(w.bind("", "s_dup", []), w.execute(""), w.sync())
    at = conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                     w.ready_for_query("I"))
    assert conv.take() == [done("select 'old'", sent, at, "SELECT 1", 1, extended=True)]


def portal_suspended_in_transaction(conv: Conversation) -> None:
    """JDBC-style fetch size: Execute with a row limit, continued by later Executes of the portal."""
    begin_sent = conv.client(w.query("BEGIN"))
    begin_done = conv.server(w.command_complete("BEGIN"), w.ready_for_query("T"))
    sql = "select generate_series(1, 5)"
    sent = conv.client(w.parse("", sql), w.bind("cursor1", "", []), w.execute("cursor1", 2), w.sync())
    conv.server(w.parse_complete(), w.bind_complete(), *select_rows(2), w.portal_suspended(),
                w.ready_for_query("T"))
    conv.client(w.execute("cursor1", 2), w.sync())
    conv.server(*select_rows(2), w.portal_suspended(), w.ready_for_query("T"))
    assert conv.take() == [done("BEGIN", begin_sent, begin_done, "BEGIN", txn_status="T")]
    conv.client(w.execute("cursor1", 2), w.sync())
    at = conv.server(*select_rows(1), w.command_complete("SELECT 1"), w.ready_for_query("T"))
    assert conv.take() == [done(sql, sent, at, "SELECT 1", 5, extended=True, txn_status="T")]
    commit_sent = conv.client(w.query("COMMIT"))
    commit_done = conv.server(w.command_complete("COMMIT"), w.ready_for_query("I"))
    events = conv.take()
    assert events[0] == done("COMMIT", commit_sent, commit_done, "COMMIT")
    assert events[1][1]["outcome"] == "commit"


def portal_suspended_then_closed(conv: Conversation) -> None:
    conv.client(w.query("BEGIN"))
    conv.server(w.command_complete("BEGIN"), w.ready_for_query("T"))
    sql = "select * from big"
    sent = conv.client(w.parse("s_big", sql), w.bind("c2", "s_big", []), w.execute("c2", 3), w.flush())
    conv.server(w.parse_complete(), w.bind_complete(), *select_rows(3), w.portal_suspended())
    closed = conv.client(w.close("P", "c2"), w.sync())
    conv.server(w.close_complete(), w.ready_for_query("T"))
    events = conv.take()
    assert events[1] == done(sql, sent, closed, "", 3, extended=True, txn_status="T")
    conv.client(w.query("COMMIT"))
    conv.server(w.command_complete("COMMIT"), w.ready_for_query("I"))
    conv.take()


def close_statement_and_portal(conv: Conversation) -> None:
    conv.client(w.parse("s_close", "select 1"), w.sync())
    conv.server(w.parse_complete(), w.ready_for_query("I"))
    conv.client(w.close("S", "s_close"), w.close("P", "no_such_portal"), w.sync())
    conv.server(w.close_complete(), w.close_complete(), w.ready_for_query("I"))
    assert conv.take() == [] and not conv.session.active
    # The statement is gone: an Execute of it is not attributed to its old text.
    sent = conv.client(w.bind("", "s_close", []), w.execute(""), w.sync())
    failed = conv.server(w.error_response("26000", 'prepared statement "s_close" does not exist'),
                         w.ready_for_query("I"))
    assert conv.take() == [done("", sent, failed, extended=True, sqlstate="26000")]


def deallocate_and_discard_all(conv: Conversation) -> None:
    conv.client(w.parse("s_a", "select 'a'"), w.parse("s_b", "select 'b'"), w.parse("S_Mixed", "select 'm'"),
                w.sync())
    conv.server(w.parse_complete(), w.parse_complete(), w.parse_complete(), w.ready_for_query("I"))
    sent = conv.client(w.query('DEALLOCATE s_a; DEALLOCATE "S_Mixed"'))
    first = conv.server(w.command_complete("DEALLOCATE"))
    second = conv.server(w.command_complete("DEALLOCATE"), w.ready_for_query("I"))
    assert first < second
    assert conv.take() == [
        done('DEALLOCATE s_a; DEALLOCATE "S_Mixed"', sent, second, "DEALLOCATE", count=2, pipelined=True)]
    sent = conv.client(w.bind("", "s_a", []), w.execute(""), w.sync(),
                       w.bind("", "S_Mixed", []), w.execute(""), w.sync(),
                       w.bind("", "s_b", []), w.execute(""), w.sync())
    a = conv.server(w.error_response("26000", "no s_a"), w.ready_for_query("I"))
    m = conv.server(w.error_response("26000", "no S_Mixed"), w.ready_for_query("I"))
    b = conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                    w.ready_for_query("I"))
    assert conv.take() == [
        done("", sent, a, extended=True, sqlstate="26000", pipelined=True),
        done("", sent, m, extended=True, sqlstate="26000", pipelined=True),
        done("select 'b'", sent, b, "SELECT 1", 1, extended=True, pipelined=True),
    ]
    discard_sent = conv.client(w.query("DISCARD ALL"))
    discard_done = conv.server(w.command_complete("DISCARD ALL"), w.ready_for_query("I"))
    sent = conv.client(w.bind("", "s_b", []), w.execute(""), w.sync())
    failed = conv.server(w.error_response("26000", "no s_b"), w.ready_for_query("I"))
    assert conv.take() == [
        done("DISCARD ALL", discard_sent, discard_done, "DISCARD ALL"),
        done("", sent, failed, extended=True, sqlstate="26000"),
    ]


def copy_simple(conv: Conversation) -> None:
    sql_in = "copy t from stdin"
    sent = conv.client(w.query(sql_in))
    conv.server(w.copy_in_response(2))
    conv.client(w.copy_data(b"1\tone\n"), w.copy_data(b"2\ttwo\n"))
    conv.client(w.copy_data(b"3\tthree\n"), w.copy_done())
    at = conv.server(w.command_complete("COPY 3"), w.ready_for_query("I"))
    assert conv.take() == [done(sql_in, sent, at, "COPY 3", 3)]

    sql_out = "copy t to stdout"
    sent = conv.client(w.query(sql_out))
    conv.server(w.copy_out_response(2), w.copy_data(b"1\tone\n"), w.copy_data(b"2\ttwo\n"))
    at = conv.server(w.copy_data(b"3\tthree\n"), w.copy_done(), w.command_complete("COPY 3"),
                     w.ready_for_query("I"))
    assert conv.take() == [done(sql_out, sent, at, "COPY 3", 3)]

    sent = conv.client(w.query(sql_in))
    conv.server(w.copy_in_response(2))
    conv.client(w.copy_data(b"1\tone\n"), w.copy_fail("client gave up"))
    failed = conv.server(w.error_response("57014", "COPY from stdin failed"), w.ready_for_query("I"))
    assert conv.take() == [done(sql_in, sent, failed, sqlstate="57014")]
    assert not conv.session.active


def copy_extended(conv: Conversation) -> None:
    sql_out = "copy (select 1) to stdout"
    sent = conv.client(w.parse("", sql_out), w.bind("", "", []), w.execute(""), w.sync())
    at = conv.server(w.parse_complete(), w.bind_complete(), w.copy_out_response(1),
                     w.copy_data(b"1\n"), w.copy_done(), w.command_complete("COPY 1"),
                     w.ready_for_query("I"))
    assert conv.take() == [done(sql_out, sent, at, "COPY 1", 1, extended=True)]

    sql_in = "copy t from stdin"
    sent = conv.client(w.parse("", sql_in), w.bind("", "", []), w.execute(""), w.flush())
    conv.server(w.parse_complete(), w.bind_complete(), w.copy_in_response(2))
    conv.client(w.copy_data(b"1\tone\n"), w.copy_done(), w.sync())
    at = conv.server(w.command_complete("COPY 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql_in, sent, at, "COPY 1", 1, extended=True)]
    assert not conv.session.active


def copy_extended_libpq_style(conv: Conversation) -> None:
    """libpq sends Sync right after Execute and again after CopyDone; the server ignores the
    first one (Sync and Flush are ignored in copy-in mode), so only one ReadyForQuery comes."""
    sql = "copy t from stdin"
    sent = conv.client(w.parse("", sql), w.bind("", "", []), w.describe("P", ""), w.execute(""),
                       w.sync())
    conv.server(w.parse_complete(), w.bind_complete(), w.no_data(), w.copy_in_response(2))
    conv.client(w.copy_data(b"1\tone\n"), w.copy_done(), w.sync())
    at = conv.server(w.command_complete("COPY 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "COPY 1", 1, extended=True)]
    assert not conv.session.active
    sent = conv.client(w.query("select 1"))
    at = conv.server(w.row_description(1), *select_rows(1), w.command_complete("SELECT 1"),
                     w.ready_for_query("I"))
    assert conv.take() == [done("select 1", sent, at, "SELECT 1", 1)]


def transaction_commit(conv: Conversation) -> None:
    begin_sent = conv.client(w.query("BEGIN"))
    begin_done = conv.server(w.command_complete("BEGIN"), w.ready_for_query("T"))
    select_sent = conv.client(w.query("select 1"), after=3.0)  # 3 s idle in transaction
    select_done = conv.server(w.row_description(1), *select_rows(1), w.command_complete("SELECT 1"),
                              w.ready_for_query("T"))
    commit_sent = conv.client(w.query("COMMIT"), after=4.0)  # 4 s more
    commit_done = conv.server(w.command_complete("COMMIT"), w.ready_for_query("I"))
    assert conv.take() == [
        done("BEGIN", begin_sent, begin_done, "BEGIN", txn_status="T"),
        done("select 1", select_sent, select_done, "SELECT 1", 1, txn_status="T"),
        done("COMMIT", commit_sent, commit_done, "COMMIT", txn_status="I"),
        ended(begin_sent, commit_done, "commit", 7.0),
    ]
    assert conv.session.txn_status == "I"


def transaction_rollback(conv: Conversation) -> None:
    begin_sent = conv.client(w.query("BEGIN; insert into t values (1)"))
    conv.server(w.command_complete("BEGIN"), w.command_complete("INSERT 0 1"), w.ready_for_query("T"))
    assert conv.session.txn_status == "T"
    conv.client(w.query("ROLLBACK"), after=2.0)
    at = conv.server(w.command_complete("ROLLBACK"), w.ready_for_query("I"))
    assert conv.take()[-1] == ended(begin_sent, at, "rollback", 2.0)


def transaction_aborted(conv: Conversation) -> None:
    begin_sent = conv.client(w.parse("", "BEGIN"), w.bind("", "", []), w.execute(""), w.sync())
    conv.server(w.parse_complete(), w.bind_complete(), w.command_complete("BEGIN"), w.ready_for_query("T"))
    sent = conv.client(w.query("select * from missing"))
    failed = conv.server(w.error_response("42P01", "relation does not exist"), w.ready_for_query("E"))
    assert conv.session.txn_status == "E"
    conv.client(w.query("select 1"))
    conv.server(w.error_response("25P02", "current transaction is aborted"), w.ready_for_query("E"))
    conv.client(w.query("ROLLBACK"))
    at = conv.server(w.command_complete("ROLLBACK"), w.ready_for_query("I"))
    events = conv.take()
    assert events[1] == done("select * from missing", sent, failed, sqlstate="42P01", txn_status="E")
    assert events[-1] == ended(begin_sent, at, "aborted", 3.0)


def application_name_changes(conv: Conversation) -> None:
    conv.client(w.query("set application_name = 'reports'"))
    conv.server(w.command_complete("SET"), w.parameter_status("application_name", "reports"),
                w.ready_for_query("I"))
    assert conv.session.application_name == "reports"
    conv.take()


def asynchronous_messages(conv: Conversation) -> None:
    """Notices, notifications and ParameterStatus may arrive at any time and answer nothing."""
    conv.server(w.notification(999, "jobs", "42"), w.notice_response("idle notice"))
    sent = conv.client(w.query("listen jobs; select 1"))
    at = conv.server(w.command_complete("LISTEN"), w.notice_response("hi"), w.row_description(1),
                     *select_rows(1), w.notification(999, "jobs", "43"), w.command_complete("SELECT 1"),
                     w.parameter_status("TimeZone", "UTC"), w.ready_for_query("I"))
    assert [(event[1]["tag"], event[1]["statement_count"]) for event in conv.take()] == [("SELECT 1", 2)]
    assert at > sent
    conv.client(w.typed(b"F", b"\0\0\x04\xd2\0\0\0\0\0\0"))  # FunctionCall: answered, not a statement
    conv.server(w.typed(b"V", b"\0\0\0\x01\x31"), w.ready_for_query("I"))
    assert conv.take() == [] and not conv.session.active


def interleaved_portals_and_a_statement_prepared_again(conv: Conversation) -> None:
    """Two open cursors fetched in turn (JDBC with two result sets open), then one statement
    closed and prepared again under its name with another text, as a statement cache does."""
    conv.client(w.query("BEGIN"))
    conv.server(w.command_complete("BEGIN"), w.ready_for_query("T"))
    conv.client(w.parse("s_x", "select x from a"), w.parse("s_y", "select y from b"),
                w.bind("c_x", "s_x", []), w.bind("c_y", "s_y", []), w.sync())
    conv.server(w.parse_complete(), w.parse_complete(), w.bind_complete(), w.bind_complete(),
                w.ready_for_query("T"))
    x_sent = conv.client(w.execute("c_x", 2), w.sync())
    conv.server(*select_rows(2), w.portal_suspended(), w.ready_for_query("T"))
    y_sent = conv.client(w.execute("c_y", 2), w.sync())
    y_done = conv.server(*select_rows(1), w.command_complete("SELECT 1"), w.ready_for_query("T"))
    conv.client(w.execute("c_x", 2), w.sync())
    x_done = conv.server(*select_rows(1), w.command_complete("SELECT 1"), w.ready_for_query("T"))
    assert conv.take()[1:] == [
        done("select y from b", y_sent, y_done, "SELECT 1", 1, extended=True, txn_status="T"),
        done("select x from a", x_sent, x_done, "SELECT 1", 3, extended=True, txn_status="T"),
    ]
    conv.client(w.close("S", "s_x"), w.parse("s_x", "select x2 from a"), w.sync())
    conv.server(w.close_complete(), w.parse_complete(), w.ready_for_query("T"))
    sent = conv.client(w.bind("", "s_y", []), w.execute(""), w.bind("", "s_x", []), w.execute(""),
                       w.sync())
    at = conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                     w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"),
                     w.ready_for_query("T"))
    assert [(event[1]["sql"], event[1]["done_at"]) for event in conv.take()] == [
        ("select y from b", at), ("select x2 from a", at)]
    assert sent < at
    conv.client(w.query("COMMIT"))
    conv.server(w.command_complete("COMMIT"), w.ready_for_query("I"))
    conv.take()


SCENARIOS = [
    simple_query, empty_query, multi_statement_query, error_in_multi_statement_query,
    extended_unnamed, extended_named_with_describe_statement, describe_portal_no_data,
    describe_statement_no_data, pipeline_one_sync, pipeline_flushed_one_at_a_time,
    separate_syncs_one_at_a_time,
    separate_syncs_sent_together, error_in_pipeline, error_before_sync, error_before_sync_without_execute,
    duplicate_parse_is_rejected,
    portal_suspended_in_transaction, portal_suspended_then_closed, close_statement_and_portal,
    interleaved_portals_and_a_statement_prepared_again,
    deallocate_and_discard_all, copy_simple, copy_extended, copy_extended_libpq_style, transaction_commit,
    transaction_rollback, transaction_aborted, application_name_changes, asynchronous_messages,
]


@pytest.fixture
def conv() -> Conversation:
    conversation = Conversation()
    startup(conversation)
    return conversation


def test_startup_reports_session_ready_with_backend_pid_and_application_name():
    startup(Conversation())


def test_startup_with_protocol_3_2_long_cancel_key():
    conv = Conversation()
    key = bytes(range(32))
    at = conv.server(w.auth_ok(), w.backend_key_data(77, key), w.ready_for_query("I"))
    assert conv.take() == [ready(at)]
    assert (conv.session.backend_pid, conv.decoder.cancel_key) == (77, key)


def test_fatal_error_at_startup_emits_nothing():
    conv = Conversation()
    conv.server(w.error_response("28P01", "password authentication failed", "FATAL"))
    assert conv.take() == [] and conv.session.backend_pid is None


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.__name__ for scenario in SCENARIOS])
def test_scenario(conv, scenario):
    scenario(conv)
    assert not conv.session.active


def test_session_active_follows_outstanding_requests(conv):
    assert not conv.session.active
    conv.client(w.parse("", "select pg_sleep(10)"), w.bind("", "", []), w.execute(""), w.sync())
    assert conv.session.active
    conv.server(w.parse_complete(), w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"))
    assert conv.session.active  # the Sync is still owed its ReadyForQuery
    conv.server(w.ready_for_query("I"))
    assert not conv.session.active


def test_portal_abandoned_by_sync_outside_a_transaction_is_reported_at_that_sync(conv):
    """Outside a transaction block Sync commits and drops the suspended portal: its rows so far
    are all the client will get, and the event belongs to that ReadyForQuery."""
    sql = "select * from big"
    sent = conv.client(w.parse("", sql), w.bind("", "", []), w.execute("", 2), w.sync())
    at = conv.server(w.parse_complete(), w.bind_complete(), *select_rows(2), w.portal_suspended(),
                     w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "", 2, extended=True)]


def test_oversized_messages_are_reported_from_their_first_bytes(conv):
    big_sql = "select '" + "x" * DECODE_LIMIT + "'"
    sent = conv.client(w.query(big_sql))
    at = conv.server(w.row_description(1), *select_rows(1), w.command_complete("SELECT 1"),
                     w.ready_for_query("I"))
    # Cut to the text length analysis gets; the whole text's signature is made by the decoder.
    expected = done(big_sql[:DEFAULT_MAX_SQL_CHARS], sent, at, "SELECT 1", 1)
    expected[1]["param_sig"] = "int"
    assert conv.take() == [expected]
    assert conv.statements()[-1].truncated
    blob = b"\xff" * DECODE_LIMIT
    sql = "insert into blobs values ($1)"
    sent = conv.client(w.parse("", sql), w.bind("", "", [blob]), w.execute(""), w.sync())
    at = conv.server(w.parse_complete(), w.bind_complete(), w.command_complete("INSERT 0 1"),
                     w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "INSERT 0 1", 1, extended=True, n_params=1)]


def test_keep_parameters_keeps_bind_values():
    conv = Conversation(keep_parameters=True)
    startup(conv)
    sql = "select $1::int, $2::text, $3::bytea"
    sent = conv.client(w.parse("", sql), w.bind("", "", [b"5", None, b"\x00\xff"], (0, 0, 1)),
                       w.execute(""), w.sync())
    at = conv.server(w.parse_complete(), w.bind_complete(), *select_rows(1),
                     w.command_complete("SELECT 1"), w.ready_for_query("I"))
    assert conv.take() == [done(sql, sent, at, "SELECT 1", 1, extended=True, n_params=3,
                                params=(b"5", None, b"\x00\xff"))]


def test_parameters_are_not_kept_by_default(conv):
    conv.client(w.parse("", "select $1"), w.bind("", "", [b"secret"]), w.execute(""), w.sync())
    conv.server(w.parse_complete(), w.bind_complete(), *select_rows(1),
                w.command_complete("SELECT 1"), w.ready_for_query("I"))
    (event,) = conv.statements()
    assert event.params is None
    assert event.n_params == 1


# -- read boundaries ---------------------------------------------------------------------------
def full_record(event) -> tuple:
    return (type(event).__name__,) + tuple(
        getattr(event, f.name) for f in dataclasses.fields(event) if f.name != "session")


@functools.cache
def whole_conversation() -> Conversation:
    conv = Conversation()
    startup(conv)
    for scenario in SCENARIOS:
        scenario(conv)
    return conv


def whole_events() -> list[tuple]:
    return [full_record(event) for event in whole_conversation().events]


def replay(steps: list[tuple[str, float, bytes]], chunk) -> list[tuple]:
    conv = Conversation()
    for side, now, data in steps:
        feed = conv.decoder.client_data if side == "client" else conv.decoder.server_data
        for piece in chunk(data):
            feed(piece, now)
    return [full_record(event) for event in conv.events]


def test_whole_conversation_in_one_session_gives_every_event():
    kinds = [record[0] for record in whole_events()]
    assert kinds.count("SessionReady") == 1
    assert kinds.count("TransactionEnded") == 6
    assert kinds.count("StatementDone") == len(whole_conversation().statements()) > 50


def test_one_byte_at_a_time_gives_the_same_events():
    events = replay(whole_conversation().steps, lambda data: [data[i:i + 1] for i in range(len(data))])
    # param_sig is a hash of the Bind bytes: equal across replays in one process.
    assert events == whole_events()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12))
def test_any_chunking_gives_the_same_events(sizes):
    cycle = itertools.cycle(sizes)

    def chunk(data: bytes) -> list[bytes]:
        pieces, pos = [], 0
        while pos < len(data):
            size = next(cycle)
            pieces.append(data[pos:pos + size])
            pos += size
        return pieces
    assert replay(whole_conversation().steps, chunk) == whole_events()


# -- arbitrary input --------------------------------------------------------------------------
def feed_ignoring_ordinary_errors(steps) -> None:
    """What the pipe does: FramingError and any other Exception end observation of the session.
    Anything else (KeyboardInterrupt-like BaseExceptions) escapes and fails the test."""
    conv = Conversation()
    try:
        for now, (to_server, data) in enumerate(steps, start=1):
            (conv.decoder.client_data if to_server else conv.decoder.server_data)(data, float(now))
    except Exception:
        pass


CLIENT_TYPES = b"QPBDECSFHdcfXp"
SERVER_TYPES = b"123tTnCIsEZKSDdGHNAR"
framed_message = st.builds(lambda t, body: w.typed(bytes([t]), body),
                           st.sampled_from(CLIENT_TYPES + SERVER_TYPES), st.binary(max_size=24))


@settings(max_examples=300, deadline=2000)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=64)), max_size=8))
def test_arbitrary_bytes_raise_only_what_the_pipe_catches(steps):
    feed_ignoring_ordinary_errors(steps)


@settings(max_examples=300, deadline=2000)
@given(st.lists(st.tuples(st.booleans(), st.lists(framed_message, max_size=6).map(b"".join)),
                max_size=10))
def test_well_framed_arbitrary_messages_raise_only_what_the_pipe_catches(steps):
    feed_ignoring_ordinary_errors(steps)


def test_a_flushed_pipeline_longer_than_the_held_records_is_a_batch_throughout(conv):
    """Records are held until ReadyForQuery but no more than _MAX_HELD_EVENTS: those sent on
    before the Sync came were part of the batch it ends too."""
    conv.client(w.parse("s_long", "select $1"), w.flush())
    conv.server(w.parse_complete())
    for value in range(300):
        conv.client(w.bind("", "s_long", [str(value).encode()]), w.execute(""), w.flush())
        conv.server(w.bind_complete(), *select_rows(1), w.command_complete("SELECT 1"))
    conv.client(w.sync())
    conv.server(w.ready_for_query("I"))
    statements = [fields for name, fields in conv.take() if name == "StatementDone"]
    assert len(statements) == 300
    assert all(fields["pipelined"] for fields in statements)


def test_a_flood_of_syncs_costs_no_memory_and_each_is_answered(conv):
    conv.client(w.sync() * 100_000)
    assert len(conv.decoder._pending) == 1
    conv.server(w.ready_for_query("I") * 99_999)
    assert conv.session.active
    conv.server(w.ready_for_query("I"))
    assert not conv.session.active
    simple_query(conv)


def test_runs_of_syncs_in_one_session_leave_another_sessions_lone_sync_as_it_was():
    lone, runs = Conversation(), Conversation()
    startup(lone)
    startup(runs)
    lone.client(w.sync())
    runs.client(w.sync())
    runs.client(w.sync())  # joins the first one's entry, from another chunk
    runs.client(w.sync() * 3)  # a run the framer hands over at once
    lone.server(w.ready_for_query("I"))  # one Sync, one answer
    assert not lone.session.active
    runs.server(w.ready_for_query("I") * 4)
    assert runs.session.active
    runs.server(w.ready_for_query("I"))
    assert not runs.session.active
    simple_query(lone)
    simple_query(runs)


def test_statements_reported_before_their_ready_for_query_have_no_status_and_later_ones_do(conv):
    """A pipeline longer than the decoder holds is reported as it completes: those statements
    know no ReadyForQuery yet; the ones after it stand under the status it brought."""
    conv.client(w.query("BEGIN"))
    conv.server(w.command_complete("BEGIN"), w.ready_for_query("T"))
    sql = "insert into t values ($1)"
    conv.client(w.parse("s_ins", sql),
                *[m for v in range(300) for m in (w.bind("", "s_ins", [b"%d" % v]), w.execute(""))],
                w.sync())
    conv.server(w.parse_complete(), *[m for _ in range(300)
                                      for m in (w.bind_complete(), w.command_complete("INSERT 0 1"))],
                w.ready_for_query("T"))
    conv.client(w.query("COMMIT"))
    conv.server(w.command_complete("COMMIT"), w.ready_for_query("I"))
    conv.client(w.query("select 1"))
    conv.server(*select_rows(1), w.command_complete("SELECT 1"), w.ready_for_query("I"))
    statuses = [(event.sql, event.txn_status) for event in conv.statements()]
    assert statuses == ([("BEGIN", "T")] + [(sql, "")] * 256 + [(sql, "T")] * 44
                        + [("COMMIT", "I"), ("select 1", "I")])


def test_past_max_pending_requests_the_session_is_no_longer_observed(conv):
    with pytest.raises(DecoderError):
        conv.client((w.query("select 1")) * (MAX_PENDING + 1))


def test_prepared_statement_texts_share_one_budget_across_sessions():
    budget = TextBudget(limit=1000)
    first, second = Conversation(), Conversation()
    for conv in (first, second):
        conv.decoder = Decoder(conv.session, lambda record: None, texts=budget)
    first.client(*(w.parse(f"s{i}", "select " + "x" * 90) for i in range(10)))
    assert budget.used <= 1000
    second.client(w.parse("mine", "select 1"))
    assert budget.used <= 1000
    first.decoder.close()
    assert budget.used == len("select 1")
