"""Composition root of the analysis process: records in, observers, admin answers out.

Owns: the analysis process's life (started by the data plane's AnalysisLink with one end of two
socketpairs, records and control; it ends when the records channel closes) and its garbage
collector's pace, subscribing every observer on the bus in order
(fingerprints first), replaying the record batches into events, answering the admin requests
the data plane relays (/metrics and /api, with the data plane's snapshot), the per-second tick
(N+1 segments, migration windows, open transactions, and the catalog readings the findings wait
for, run as tasks of their own and handed back to the observers), what a settings reload
changes live, and its place in the CPU scheduler: once started it runs under SCHED_IDLE, so that
it only ever uses CPU the data plane and the database leave over.
The records channel is read only while fewer than MAX_BACKLOG_BYTES of frames wait to be
analysed, so that a burst of hostile SQL backs up into the data plane, which sheds it (counted),
instead of growing this process. The control channel is always read: a request is answered once
the records sent before it are analysed, or after REQUEST_CATCH_UP_SECONDS with what is.
Must not: touch client traffic (it has none), or let an observer's failure end the process (the
bus contains it).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import math
import os
import signal
import socket
import sys
import time

import structlog

from pgscout import logs
from pgscout.analysis.bus import Bus
from pgscout.analysis.findings import Findings
from pgscout.analysis.fingerprint import Fingerprinter
from pgscout.analysis.indexes import MissingIndexes
from pgscout.analysis.migrations import BlockingMigrations
from pgscout.analysis.nplusone import NPlusOneDetector
from pgscout.analysis.opentransactions import OpenTransactions
from pgscout.analysis.replay import Replay
from pgscout.analysis.slowlog import SlowLog
from pgscout.analysis.statements import StatementStats
from pgscout.analysis.timeouts import StatementTimeouts
from pgscout.analysis.transactions import TransactionStats
from pgscout.control.catalog import Catalog
from pgscout.dataplane.events import SessionClosed, SessionsActive, TransactionEnded
from pgscout.dataplane.records import (LOG, RECORDS, REPLY, REQUEST, REQUEST_CATCH_UP_SECONDS,
                                       SETTINGS, STARTED, FrameReader, decode_payload,
                                       pickled_frame)
from pgscout.exposition import api
from pgscout.exposition.admin import Request, Response, Router
from pgscout.exposition.metrics import PgscoutCollector, Sources, build_registry
from pgscout.settings import Settings

log = structlog.get_logger("pgscout.analysis")

MAX_BACKLOG_BYTES = 16 * 1024 * 1024
# Records of one batch analysed between two looks at the channel (requests, new frames).
_SLICE_RECORDS = 200
# Collections of the youngest generation happen every this many net allocations instead of 700:
# records and events are acyclic and freed by reference counting, so most of what a collection
# would scan is already gone (a profile put the collector at 5% of this process's time, 2% so).
_GC_YOUNGEST_THRESHOLD = 10_000
# Catalog readings under way at once; the rest wait for the next tick.
_MAX_CATALOG_TASKS = 16
_CATALOG_BUGS_SEEN: set[str] = set()


class Analysis:
    """Every observer of one analysis process, fed through the bus."""

    def __init__(self, settings: Settings, control: _ControlChannel) -> None:
        self.settings = settings
        self._control = control
        self.records_analysed = 0
        self._configure_logs(settings)
        self.bus = Bus(on_error=lambda handler, exc: log.error(
            "observer_failed", observer=getattr(handler, "__qualname__", repr(handler)),
            error=f"{type(exc).__name__}: {exc}"))
        self.replay = Replay(self.bus)
        self.sources = self._wire_observers(settings)
        self.router = Router()
        collector = PgscoutCollector(self.sources, settings.metrics.top_k,
                                     settings.metrics.sql_text_max_chars)
        api.register(self.router, self.sources, build_registry(collector))

    def _wire_observers(self, settings: Settings) -> Sources:
        """Subscribe every observer; the fingerprinter first, since the others read what it adds."""
        slow = settings.slowlog
        fingerprinter = Fingerprinter(cache_size=settings.statements.fingerprint_cache_size,
                                      display_chars=settings.statements.display_chars)
        statements = StatementStats(settings.statements.max_fingerprints)
        slowlog = SlowLog(slow.threshold_ms, slow.per_application, slow.log_parameters,
                          slow.max_per_second, slow.keep,
                          emit=lambda record: log.warning("slow_query", **record))
        found = settings.findings
        findings = Findings(emit=lambda finding: log.warning("finding", **finding))
        self.migrations = BlockingMigrations(findings, found.blocking_migration_min_wait_ms)
        self.timeouts = StatementTimeouts(findings, found.no_statement_timeout_min_statement_ms)
        self.open_transactions = OpenTransactions(findings, found.long_transaction_seconds,
                                                  found.idle_in_transaction_seconds)
        self.indexes = MissingIndexes(findings, found.missing_index_min_statement_ms,
                                      found.missing_index_min_table_rows)

        def on_nplusone(finding) -> None:
            log.warning("n_plus_one", **finding.to_dict())
            findings.from_nplusone(finding)
            if finding.kind == "n_plus_one":
                self.indexes.on_nplusone(finding, time.monotonic())

        nplusone = NPlusOneDetector(settings.nplusone, emit=on_nplusone)
        transactions = TransactionStats()
        for observer in (fingerprinter, statements, slowlog, nplusone, self.migrations,
                         self.timeouts, self.open_transactions, self.indexes):
            self.bus.subscribe_statements(observer)
        for event_type, handler in (
                (TransactionEnded, transactions.on_transaction),
                (TransactionEnded, self.migrations.on_transaction),
                (TransactionEnded, self.open_transactions.on_transaction),
                (SessionClosed, nplusone.on_session_closed),
                (SessionsActive, nplusone.on_sessions_active),
                (SessionClosed, self.migrations.on_session_closed),
                (SessionClosed, self.timeouts.on_session_closed),
                (SessionClosed, self.open_transactions.on_session_closed)):
            self.bus.subscribe(event_type, handler)
        return Sources(server=None, statements=statements, fingerprinter=fingerprinter,
                       slowlog=slowlog, transactions=transactions, nplusone=nplusone,
                       connections=None, limits=None, bus=self.bus, dataplane=None,
                       findings=findings, catalog=None)

    def _configure_logs(self, settings: Settings) -> None:
        """Log lines go to the data plane, which writes them into pgscout's one log (and the
        demo's narrator sees them there)."""
        def forward(logger, level: str, event: dict) -> dict:
            self._control.send(LOG, (level, event))
            raise structlog.DropEvent

        logs.configure(settings.log.level, "json", processors=(forward,))

    def reconfigure(self, new: Settings) -> None:
        """What a reload may change live here; the data plane decided what needs a restart."""
        self._configure_logs(new)
        slow = new.slowlog
        self.sources.slowlog.reconfigure(slow.threshold_ms, slow.per_application,
                                         slow.log_parameters, slow.max_per_second)
        self.sources.nplusone.reconfigure(new.nplusone)
        found = new.findings
        self.migrations.reconfigure(found.blocking_migration_min_wait_ms)
        self.timeouts.reconfigure(found.no_statement_timeout_min_statement_ms)
        self.open_transactions.reconfigure(found.long_transaction_seconds,
                                           found.idle_in_transaction_seconds)
        self.indexes.reconfigure(found.missing_index_min_statement_ms,
                                 found.missing_index_min_table_rows)
        self.settings = new

    async def answer(self, request: Request, snapshot) -> Response:
        """Answer an admin request the data plane relayed (its credentials already checked)."""
        sources = self.sources
        sources.dataplane = snapshot
        sources.server = snapshot.server
        sources.connections = snapshot.connections
        sources.limits = snapshot.limits
        sources.findings.observe_churn(snapshot.connections.churn())
        return await self.router.respond(request)


class _RecordsChannel(asyncio.Protocol):
    """The records socket: frames in, reading paused while the frames waiting to be analysed
    exceed MAX_BACKLOG_BYTES (the data plane then sheds)."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.waiting_bytes = 0
        self.arrived = asyncio.Event()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            self.frames.append(frame)
            self.waiting_bytes += len(frame[1])
        if self.waiting_bytes > MAX_BACKLOG_BYTES and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.arrived.set()

    def taken(self, size: int) -> None:
        self.waiting_bytes -= size
        if self.paused and self.waiting_bytes < MAX_BACKLOG_BYTES // 2:
            self.paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.arrived.set()


class _ControlChannel(asyncio.Protocol):
    """The control socket: settings and requests in, replies and log lines out. Read at all
    times, so a backlog of records never holds up a scrape."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.analysis: Analysis | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._answering: set[asyncio.Task] = set()  # the loop keeps only weak references

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            value = decode_payload(kind, payload)
            if kind == SETTINGS and self.analysis is None:
                # Built here, not where it is awaited: requests may follow in this same read.
                self.analysis = Analysis(value, self)
                self.ready.set_result(self.analysis)
            elif kind == REQUEST and self.analysis is not None:
                task = asyncio.get_running_loop().create_task(self._answer(*value))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    async def _answer(self, request_id: int, request: Request, snapshot, records_before: int) -> None:
        analysis = self.analysis
        assert analysis is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REQUEST_CATCH_UP_SECONDS
        while analysis.records_analysed < records_before and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.send(REPLY, (request_id, await analysis.answer(request, snapshot)))

    def send(self, kind: int, value: object) -> None:
        if not self.closed:
            self.transport.write(pickled_frame(kind, value))

    def connection_lost(self, exc) -> None:
        self.closed = True


def tune_collector() -> None:
    """The cyclic collector as the analysis process runs it, once its observers exist: what
    exists now (modules, settings, observers) lives as long as the process, so no collection
    need look at it again, and the youngest generation is collected less often."""
    gc.freeze()
    gc.set_threshold(_GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])


async def _serve(records_fd: int, control_fd: int) -> int:
    loop = asyncio.get_running_loop()
    control = _ControlChannel()
    await loop.create_unix_connection(lambda: control, sock=socket.socket(fileno=control_fd))
    analysis = await control.ready
    tune_collector()
    records = _RecordsChannel()
    await loop.create_unix_connection(lambda: records, sock=socket.socket(fileno=records_fd))
    catalog = None
    if analysis.settings.proxy.upstream is not None:
        catalog = Catalog(analysis.settings.proxy.upstream, log,
                          analysis.settings.proxy.connect_timeout_seconds)
        analysis.sources.catalog = catalog
    ticker = loop.create_task(_tick(analysis, catalog))
    analysis.router.start_periodic()  # the status page's history sampling
    control.send(STARTED, None)
    _yield_the_cpu_to_everyone_else()
    while True:
        if not records.frames:
            if records.closed:
                break
            records.arrived.clear()
            await records.arrived.wait()
            continue
        kind, payload = records.frames.popleft()
        if kind == SETTINGS:  # a reload, in order with the records made before it
            analysis.reconfigure(decode_payload(kind, payload))
        elif kind == RECORDS:
            batch = decode_payload(kind, payload)
            for start in range(0, len(batch), _SLICE_RECORDS):
                piece = batch[start:start + _SLICE_RECORDS]
                analysis.replay.feed(piece)
                analysis.records_analysed += len(piece)
                await asyncio.sleep(0)  # let requests and reads interleave with a long batch
        records.taken(len(payload))
    ticker.cancel()
    analysis.router.stop_periodic()
    analysis.sources.nplusone.flush()
    if catalog is not None:
        await catalog.close()
    return 0


def _yield_the_cpu_to_everyone_else() -> None:
    """Run from now on only when no ordinary task of the machine (or the container) wants the CPU.

    At nice 0 a wake-up of the data plane or of a database backend waits for the analysis
    process's running slice to end (EEVDF lets a task run to parity), which showed as the p99 of
    one client's statements: 0.7 ms against 0.25-0.3 ms with this process under SCHED_IDLE, whose
    tasks every wake-up of an ordinary one preempts. Nice 19 does not do this: its slices still
    run to their end. Analysis that finds no spare CPU for long falls behind, its channel fills and
    the data plane sheds records, counted (pgscout_analysis_records_shed_total, alerted on) but
    never delaying a client. Called after start-up, which an idle process would make slow on a
    busy machine; nothing here needs to go back (leaving SCHED_IDLE takes CAP_SYS_NICE).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a seccomp profile that refuses it: analysis still works, at nice 0
        log.warning("sched_idle_refused", error=str(exc))


async def _tick(analysis: Analysis, catalog: Catalog | None) -> None:
    """Once a second: end idle N+1 segments and emit the per-minute roll-ups that are due; judge
    closed migration windows and open transactions; start the catalog readings the findings
    wait for (tasks of their own: a slow catalog never holds up the analysis)."""
    reading: set[asyncio.Task] = set()  # the loop keeps only weak references
    defaults_read_at = -math.inf
    while True:
        now = time.monotonic()
        analysis.sources.nplusone.flush()
        analysis.migrations.flush(now)
        analysis.open_transactions.flush(now)
        if catalog is not None and len(reading) < _MAX_CATALOG_TASKS:
            # Until a first reading succeeds no session's timeout is known: try every tick.
            every = analysis.settings.control.refresh_seconds if analysis.timeouts.has_defaults else 1.0
            if now - defaults_read_at >= every:
                defaults_read_at = now
                _spawn(reading, _read_timeout_defaults(analysis, catalog))
            candidates = analysis.open_transactions.idle_candidates(now)
            if candidates:
                _spawn(reading, _confirm_idle(analysis, catalog, candidates))
            for key in analysis.indexes.requests():
                _spawn(reading, _look_up_table(analysis, catalog, key))
        await asyncio.sleep(1.0)


def _spawn(tasks: set[asyncio.Task], coroutine) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    tasks.add(task)
    task.add_done_callback(_catalog_reading_done)
    task.add_done_callback(tasks.discard)


def _catalog_reading_done(task: asyncio.Task) -> None:
    """Connection failures are the catalog's to report; anything else is a bug, said once per kind."""
    if not task.cancelled() and (error := task.exception()) is not None:
        if type(error).__name__ not in _CATALOG_BUGS_SEEN:
            _CATALOG_BUGS_SEEN.add(type(error).__name__)
            log.error("catalog_reading_failed", error=f"{type(error).__name__}: {error}")


async def _read_timeout_defaults(analysis: Analysis, catalog: Catalog) -> None:
    defaults = await catalog.timeout_defaults()
    if defaults is not None:
        analysis.timeouts.set_defaults(defaults)


async def _confirm_idle(analysis: Analysis, catalog: Catalog, candidates: dict[int, int]) -> None:
    activity = await catalog.activity(list(candidates))
    if activity is not None:
        analysis.open_transactions.confirm_idle(candidates, activity, time.monotonic())


async def _look_up_table(analysis: Analysis, catalog: Catalog, key) -> None:
    database, schema, table, columns = key
    tables = None
    try:
        tables = await catalog.tables(database, schema, table, columns)
    finally:  # whatever happened, the look-up is no longer in flight
        analysis.indexes.resolve(key, tables, time.monotonic())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The data plane decides when this process ends (by closing the channel, after its drain):
    # a Ctrl-C or SIGTERM sent to the whole process group must not end analysis first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import uvloop

    return uvloop.run(_serve(int(args[0]), int(args[1])))


if __name__ == "__main__":
    sys.exit(main())
