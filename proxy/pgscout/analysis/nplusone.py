"""N+1 and duplicate-query detection from completed statements (rules: the NPLUSONE.md design note).

Owns: rebuilding request-shaped segments from StatementDone events per stream (a client
connection, split by W3C trace id when comments carry one), binding each child query to the owner
query whose rows it loops over, judging every closed group, and turning what it finds into
`Finding`s: the first occurrence of an (owner, child, route) key of an application is emitted at
once, later ones are rolled up and emitted once per report interval.

Read interface: `recent()` (the last `keep` findings as dicts, newest first) and `counts()`
(occurrences by kind, child fingerprint, application_name and severity, for the Collector).
The server calls `flush()` about once a second: it ends idle segments and emits due roll-ups.

Readings of the spec that the code relies on:
- The owner ring holds the last `owner_ring` distinct owner fingerprints; any execution of a
  fingerprint already in the ring counts as a new execution of that owner (opening new groups
  for its children) even when it returned fewer rows.
- A child bound to an owner that is itself a bound child (parent -> child -> grandchild) groups
  by its owner's group, that is per iteration of the outermost loop, so a grandchild loop is
  seen even when each child returned only a few rows. When such a child ran no more often than
  its owner did, it was looping over the owner's owner (two relationships per parent), and is
  reported against that one.
- A child that found no owner on its first execution binds to the first owner that runs later.
- A parameter of `= ANY(...)` is counted as a set of values: the query is a batch loader.
- Duplicates are, like N+1 loops, only reported for tight (think time) unbatched repetition;
  without an owner, only when the repeats are at least half of the group's executions.

Must not: import asyncio, sockets, prometheus_client or a logger; keep parameter values (only
their signatures); grow without bound (tracks per stream, streams per connection, counted
label sets and roll-up keys are all capped).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections import OrderedDict, deque
from typing import Callable, Final

from pgscout.dataplane.events import Session, SessionClosed, StatementDone
from pgscout.analysis.comments import trace_id

# A connection serves one request at a time unless an async app shares it; more traced streams
# than this on one connection are finished requests whose idle gap has not elapsed yet.
MAX_STREAMS_PER_CONNECTION: Final = 8
# Label sets kept by counts(); further child fingerprints are counted under "other".
MAX_COUNTED_LABEL_SETS = 4096
# Normalized texts whose shape is cached; the fingerprinter's own cache bounds the variety.
MAX_SHAPES: Final = 4096

_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
_CONFIDENCE_RANK = {"low": 0, "medium": 1, "high": 2}
_POOL_RESET_STATEMENTS: Final = frozenset({"SELECT $1", "DISCARD ALL", "RESET ALL", "DEALLOCATE ALL"})
_TRANSACTION_END_WORDS: Final = frozenset({"COMMIT", "END", "ROLLBACK", "ABORT"})
_TRANSACTION_BEGIN_WORDS: Final = frozenset({"BEGIN", "START"})
_PLACEHOLDER = re.compile(r"\$(\d+)")
_ARRAY_LOOKUP = re.compile(r"\b(?:ANY|SOME)\s*\(", re.IGNORECASE)
_NAME = r'(?:"[^"]+"|[A-Za-z_][\w$]*)'
_QUALIFIED_NAME = rf"{_NAME}(?:\s*\.\s*{_NAME})*"
_FROM_TABLE = re.compile(rf"\bFROM\s+({_QUALIFIED_NAME})", re.IGNORECASE)
_KEY_COLUMN = re.compile(
    rf"({_QUALIFIED_NAME})\s*=\s*\$\d+|\$\d+(?:\s*::\s*\w+)?\s*=\s*({_QUALIFIED_NAME})"
)


@dataclasses.dataclass(slots=True)
class Finding:
    """One reported N+1 loop or duplicate query, or a roll-up of several (`iterations`).

    Times are milliseconds summed over the iterations. For an N+1 loop `waste_ms` is the loop's
    wall time minus its slowest child (what one batched query would roughly cost); for a
    duplicate it is the time of the repeats after the first of each parameter set. `n` counts
    child executions (for a duplicate: the executions of repeated parameter sets).
    """

    kind: str  # "n_plus_one" or "duplicate"
    owner_fingerprint: str | None
    owner_sql: str | None
    child_fingerprint: str
    child_sql: str
    n: int
    iterations: int
    child_time_ms: float
    loop_time_ms: float
    waste_ms: float
    severity: str  # "info", "warning" or "critical"
    confidence: str  # "high", "medium" or "low"
    application_name: str
    user: str
    database: str
    client_addr: str
    tags: dict[str, str]
    suggestion: str
    first_seen: float  # wall clock, time.time() seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Shape:
    """What the detector needs from one normalized text, computed once per text."""

    __slots__ = ("placeholders", "array_lookup", "pool_reset", "ends_transaction",
                 "begins_transaction")

    def __init__(self, normalized: str) -> None:
        self.placeholders = len(set(_PLACEHOLDER.findall(normalized)))
        self.array_lookup = _ARRAY_LOOKUP.search(normalized) is not None
        statement = " ".join(normalized.upper().split()) if len(normalized) <= 64 else ""
        first_word = statement.split(" ", 1)[0]
        self.pool_reset = statement in _POOL_RESET_STATEMENTS
        self.ends_transaction = (first_word in _TRANSACTION_END_WORDS
                                 and " TO " not in statement and "PREPARED" not in statement)
        self.begins_transaction = first_word in _TRANSACTION_BEGIN_WORDS


class _Owner:
    """The latest execution of one owner fingerprint in a stream, with running totals."""

    __slots__ = ("fingerprint", "normalized", "exec_id", "rows", "executions", "total_rows")

    def __init__(self, fingerprint: str, normalized: str) -> None:
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.exec_id = 0
        self.rows = 0
        self.executions = 0
        self.total_rows = 0


class _Group:
    """The executions of one child fingerprint under one owner iteration (or one no-owner run)."""

    __slots__ = ("key", "owner", "outer", "owner_execs", "owner_rows", "owner_execs_seen",
                 "owner_rows_seen", "n", "pipelined", "by_params", "max_repeat", "gaps", "rows",
                 "child_time", "slowest", "first_sent", "last_done", "tags")

    def __init__(self, key: int, owner: _Owner | None, outer: _Group | None,
                 ev: StatementDone) -> None:
        self.key = key
        self.owner = owner
        self.outer = outer  # the owner's own group, when the owner is itself a bound child
        self.owner_execs = 0
        self.owner_rows = 0
        if owner is not None:
            # Count from the owner execution that opened this group.
            self.owner_execs_seen = owner.executions - 1
            self.owner_rows_seen = owner.total_rows - owner.rows
        self.n = 0
        self.pipelined = 0
        self.by_params: dict[int, list] = {}  # signature -> [count, seconds, first sent, last done]
        self.max_repeat = 0
        self.gaps: list[float] = []
        self.rows: list[int] = []
        self.child_time = 0.0
        self.slowest = 0.0
        self.first_sent = ev.sent_at
        self.last_done = ev.done_at
        self.tags = ev.tags

    def add(self, ev: StatementDone) -> None:
        duration = ev.done_at - ev.sent_at
        if self.n:
            gap = ev.sent_at - self.last_done
            self.gaps.append(gap if gap > 0.0 else 0.0)
        self.n += 1
        if ev.pipelined:
            self.pipelined += 1
        signature = ev.param_sig if ev.param_sig is not None else hash(ev.sql)
        same = self.by_params.get(signature)
        if same is None:
            self.by_params[signature] = [1, duration, ev.sent_at, ev.done_at]
            repeat = 1
        else:
            repeat = same[0] = same[0] + 1
            same[1] += duration
            same[3] = ev.done_at
        if repeat > self.max_repeat:
            self.max_repeat = repeat
        self.rows.append(ev.rows)
        self.child_time += duration
        if duration > self.slowest:
            self.slowest = duration
        if ev.done_at > self.last_done:
            self.last_done = ev.done_at

    def count_owner_executions(self, owner: _Owner) -> None:
        if owner is not self.owner:
            # The owner left the ring and came back as a new entry: count from its latest run.
            self.owner = owner
            self.owner_execs_seen = owner.executions - 1
            self.owner_rows_seen = owner.total_rows - owner.rows
        if owner.executions != self.owner_execs_seen:
            self.owner_execs += owner.executions - self.owner_execs_seen
            self.owner_rows += owner.total_rows - self.owner_rows_seen
            self.owner_execs_seen = owner.executions
            self.owner_rows_seen = owner.total_rows


class _Track:
    """One child fingerprint in a stream: its owner binding and its open group."""

    __slots__ = ("fingerprint", "normalized", "owner", "group", "last_seq")

    def __init__(self, fingerprint: str, normalized: str) -> None:
        self.fingerprint = fingerprint
        self.normalized = normalized
        self.owner: _Owner | None = None
        self.group: _Group | None = None
        self.last_seq = 0


class _Stream:
    """One segment of one stream: owner ring and child tracks, reset when the segment ends."""

    __slots__ = ("key", "trace", "session", "owners", "tracks", "seq", "owner_seq", "started_at",
                 "last_done")

    def __init__(self, key: tuple[int, str | None], trace: str | None, session: Session,
                 started_at: float) -> None:
        self.key = key
        self.trace = trace
        self.session = session
        self.owners: OrderedDict[str, _Owner] = OrderedDict()
        self.tracks: OrderedDict[str, _Track] = OrderedDict()
        self.seq = 0  # events seen in this segment; also numbers executions and groups
        self.owner_seq = 0  # seq of the latest owner execution
        self.started_at = started_at
        self.last_done = started_at


class _Connection:
    __slots__ = ("in_block", "streams")

    def __init__(self) -> None:
        self.in_block = False
        self.streams: OrderedDict[str | None, _Stream] = OrderedDict()


class _Report:
    """Emission state of one (kind, owner, child, route, application_name) key: what waits for
    the next roll-up."""

    __slots__ = ("last_emit", "first_seen", "pending")

    def __init__(self, last_emit: float, first_seen: float) -> None:
        self.last_emit = last_emit
        self.first_seen = first_seen
        self.pending: Finding | None = None


class NPlusOneDetector:
    """Bus observer: feed it StatementDone and SessionClosed; it calls `emit` with findings."""

    def __init__(self, settings_like, emit: Callable[[Finding], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reconfigure(settings_like)
        self._emit = emit
        self._clock = clock
        self._connections: dict[int, _Connection] = {}
        self._streams: OrderedDict[tuple[int, str | None], _Stream] = OrderedDict()  # by activity
        self._shapes: dict[str, _Shape] = {}
        self._reports: OrderedDict[tuple, _Report] = OrderedDict()  # by last emission
        self._recent: deque[Finding] = deque(maxlen=settings_like.keep)
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._last_traceparent: str | None = None
        self._last_trace: str | None = None

    def reconfigure(self, settings_like) -> None:
        """Apply (re)loaded thresholds; open segments and findings so far stay."""
        s = settings_like
        self._enabled = s.enabled
        self._include_writes = s.include_writes
        self._idle_gap = s.idle_gap_ms / 1000.0
        self._segment_max_events = s.segment_max_events
        self._segment_max_seconds = s.segment_max_seconds
        self._owner_ring = s.owner_ring
        self._owner_min_rows = s.owner_min_rows
        self._child_max_params = s.child_max_params
        self._min_distinct = s.min_distinct
        self._min_distinct_ratio = s.min_distinct_ratio
        self._max_pipelined_ratio = s.max_pipelined_ratio
        self._max_think = s.max_think_ms / 1000.0
        self._max_median_rows = s.max_median_rows
        self._duplicate_min = s.duplicate_min
        self._no_owner_min_run = s.no_owner_min_run
        self._max_tracks = s.max_tracks
        self._warning_loop = s.warning_loop_ms / 1000.0
        self._warning_n = s.warning_n
        self._critical_loop = s.critical_loop_ms / 1000.0
        self._critical_n = s.critical_n
        self._report_interval = s.report_interval_seconds
        self._smallest_reportable = min(self._min_distinct, self._no_owner_min_run,
                                        self._duplicate_min)

    # -- bus interface ----------------------------------------------------------------------
    def on_statement(self, ev: StatementDone) -> None:
        if not self._enabled:
            return
        conn_id = ev.session.conn_id
        conn = self._connections.get(conn_id)
        if conn is None:
            conn = self._connections[conn_id] = _Connection()
        shape = self._shape(ev.normalized)
        if shape.pool_reset or ev.tag == "EMPTY":
            self._end_connection(conn, ev.done_at)
            self._transaction_ended(conn, ev, shape)
            return
        trace = self._trace(ev.tags) if ev.tags else None
        stream = conn.streams.get(trace)
        if stream is not None and (
            ev.sent_at - stream.last_done > self._idle_gap
            or stream.seq >= self._segment_max_events
            or ev.done_at - stream.started_at > self._segment_max_seconds
        ):
            self._end_stream(conn, stream, ev.done_at)
            stream = None
        if stream is None:
            stream = self._open_stream(conn, ev, trace)
        else:
            conn.streams.move_to_end(trace)
            self._streams.move_to_end(stream.key)
        self._observe(stream, ev, shape)
        if self._transaction_ended(conn, ev, shape):
            self._end_connection(conn, ev.done_at)

    def on_session_closed(self, ev: SessionClosed) -> None:
        conn = self._connections.pop(ev.session.conn_id, None)
        if conn is not None:
            self._end_connection(conn, ev.at)

    def flush(self, now: float | None = None) -> None:
        """End segments idle for longer than the idle gap and emit the roll-ups that are due."""
        if now is None:
            now = self._clock()
        streams = self._streams
        while streams:
            stream = next(iter(streams.values()))
            if now - stream.last_done <= self._idle_gap:
                break
            self._end_stream(self._connections[stream.key[0]], stream, now)
        reports = self._reports
        while reports:
            key, report = next(iter(reports.items()))
            if now - report.last_emit < self._report_interval:
                break
            if report.pending is None:
                # Quiet for a whole interval: its next occurrence is reported at once again.
                del reports[key]
                continue
            self._publish(report.pending)
            report.pending = None
            report.last_emit = now
            reports.move_to_end(key)

    def recent(self) -> list[dict]:
        return [finding.to_dict() for finding in reversed(self._recent)]

    def counts(self) -> dict[tuple[str, str, str, str], int]:
        """Occurrences so far by (kind, child fingerprint, application_name, severity)."""
        return dict(self._counts)

    # -- segments ---------------------------------------------------------------------------
    def _shape(self, normalized: str) -> _Shape:
        shape = self._shapes.get(normalized)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[normalized] = _Shape(normalized)
        return shape

    def _trace(self, tags: dict[str, str]) -> str | None:
        # Consecutive statements of a request carry the same traceparent: validate it once.
        traceparent = tags.get("traceparent")
        if traceparent != self._last_traceparent:
            self._last_traceparent = traceparent
            self._last_trace = trace_id(tags)
        return self._last_trace

    def _open_stream(self, conn: _Connection, ev: StatementDone, trace: str | None) -> _Stream:
        if len(conn.streams) >= MAX_STREAMS_PER_CONNECTION:
            self._end_stream(conn, next(iter(conn.streams.values())), ev.done_at)
        key = (ev.session.conn_id, trace)
        stream = conn.streams[trace] = self._streams[key] = _Stream(key, trace, ev.session,
                                                                    ev.sent_at)
        return stream

    def _end_stream(self, conn: _Connection, stream: _Stream, now: float) -> None:
        del conn.streams[stream.trace]
        del self._streams[stream.key]
        for track in stream.tracks.values():
            if track.group is not None:
                self._judge(stream, track, track.group, now)

    def _end_connection(self, conn: _Connection, now: float) -> None:
        for stream in list(conn.streams.values()):
            self._end_stream(conn, stream, now)

    @staticmethod
    def _transaction_ended(conn: _Connection, ev: StatementDone, shape: _Shape) -> bool:
        """Follow the connection's transaction block; true when `ev` closed one."""
        status = ev.txn_status
        if status == "I" or (not status and ev.kind == "txn" and shape.ends_transaction):
            ended = conn.in_block
            conn.in_block = False
            return ended
        if status == "T" or status == "E" or (ev.kind == "txn" and shape.begins_transaction):
            conn.in_block = True
        return False

    # -- owners and children ----------------------------------------------------------------
    def _observe(self, stream: _Stream, ev: StatementDone, shape: _Shape) -> None:
        stream.seq += 1
        stream.last_done = ev.done_at
        kind = ev.kind
        if not ev.fingerprint:
            return
        if ((kind == "select" or (kind == "dml" and self._include_writes))
                and not shape.array_lookup
                and ev.n_params <= self._child_max_params
                and shape.placeholders <= self._child_max_params):
            self._observe_child(stream, ev)
        if kind == "select":
            self._observe_owner(stream, ev)

    def _observe_owner(self, stream: _Stream, ev: StatementDone) -> None:
        owners = stream.owners
        owner = owners.get(ev.fingerprint)
        if owner is None:
            if ev.rows < self._owner_min_rows:
                return
            if len(owners) >= self._owner_ring:
                owners.popitem(last=False)
            owner = owners[ev.fingerprint] = _Owner(ev.fingerprint, ev.normalized)
        else:
            owners.move_to_end(ev.fingerprint)
        owner.exec_id = stream.seq
        owner.rows = ev.rows
        owner.executions += 1
        owner.total_rows += ev.rows
        stream.owner_seq = stream.seq

    def _newest_owner(self, stream: _Stream, child_fingerprint: str) -> _Owner | None:
        for owner in reversed(stream.owners.values()):
            if owner.fingerprint != child_fingerprint and owner.rows >= self._owner_min_rows:
                return owner
        return None

    def _observe_child(self, stream: _Stream, ev: StatementDone) -> None:
        fingerprint = ev.fingerprint
        seq = stream.seq
        tracks = stream.tracks
        track = tracks.get(fingerprint)
        if track is None:
            if len(tracks) >= self._max_tracks:
                _, evicted = tracks.popitem(last=False)
                if evicted.group is not None:
                    self._judge(stream, evicted, evicted.group, ev.done_at)
            track = tracks[fingerprint] = _Track(fingerprint, ev.normalized)
        else:
            tracks.move_to_end(fingerprint)

        if track.owner is None and stream.owner_seq > track.last_seq:
            track.owner = self._newest_owner(stream, fingerprint)
        group = track.group
        owner = track.owner
        outer = None
        if owner is None:
            # No owner: a group is a strict run of consecutive executions.
            key = group.key if group is not None and track.last_seq == seq - 1 else -seq
        else:
            newer = stream.owners.get(owner.fingerprint)
            if newer is not None:
                owner = track.owner = newer
            owner_track = tracks.get(owner.fingerprint)
            if (owner_track is not None and owner_track.owner is not None
                    and owner_track.owner.fingerprint != fingerprint
                    and owner_track.group is not None):
                outer = owner_track.group
                key = outer.key
            else:
                key = owner.exec_id
        if group is None or group.key != key:
            if group is not None:
                self._judge(stream, track, group, ev.done_at)
            group = track.group = _Group(key, owner, outer, ev)
        group.add(ev)
        if owner is not None:
            group.count_owner_executions(owner)
        track.last_seq = seq

    # -- judging ----------------------------------------------------------------------------
    def _judge(self, stream: _Stream, track: _Track, group: _Group, now: float) -> None:
        n = group.n
        if n < self._smallest_reportable:
            return
        gaps = group.gaps
        if gaps and statistics.median(gaps) > self._max_think:
            return  # a loop doing real work between queries
        if group.pipelined > self._max_pipelined_ratio * n:
            return  # a batch: executemany or a pipeline
        if group.max_repeat >= self._duplicate_min:
            self._judge_duplicates(stream, track, group, now)

        distinct = len(group.by_params)
        owner, owner_rows = group.owner, group.owner_rows
        if (owner is not None and group.outer is not None and group.outer.owner is not None
                and n <= group.owner_execs):
            owner, owner_rows = group.outer.owner, group.outer.owner_rows
        if owner is None:
            if distinct < self._no_owner_min_run:
                return
            confidence = "low"
        else:
            if distinct < self._min_distinct or owner_rows < self._owner_min_rows:
                return
            confidence = "high" if distinct <= owner_rows else "medium"
        if distinct < self._min_distinct_ratio * n:
            return
        if statistics.median(group.rows) >= self._max_median_rows:
            return  # pagination or chunked reads
        loop_time = group.last_done - group.first_sent
        self._report(stream, "n_plus_one", owner, track, group, n, group.child_time, loop_time,
                     loop_time - group.slowest, confidence, now)

    def _judge_duplicates(self, stream: _Stream, track: _Track, group: _Group,
                          now: float) -> None:
        n = 0
        child_time = waste = 0.0
        first_sent, last_done = group.last_done, group.first_sent
        for count, seconds, sent, done in group.by_params.values():
            if count >= self._duplicate_min:
                n += count
                child_time += seconds
                waste += seconds * (count - 1) / count
                first_sent = min(first_sent, sent)
                last_done = max(last_done, done)
        if group.owner is None and 2 * n < group.n:
            # Without an owner the group is the whole segment: a few chance repeats among many
            # distinct keys (a busy connection serving independent lookups) are not a duplicate.
            return
        # Identical parameter signatures are a fact, not an inference: always high confidence.
        self._report(stream, "duplicate", group.owner, track, group, n, child_time,
                     last_done - first_sent, waste, "high", now)

    def _severity(self, n: int, loop_time: float) -> str:
        if loop_time >= self._critical_loop or n >= self._critical_n:
            return "critical"
        if loop_time >= self._warning_loop or n >= self._warning_n:
            return "warning"
        return "info"

    def _report(self, stream: _Stream, kind: str, owner: _Owner | None, track: _Track,
                group: _Group, n: int, child_time: float, loop_time: float, waste: float,
                confidence: str, now: float) -> None:
        session = stream.session
        severity = self._severity(n, loop_time)
        self._count(kind, track.fingerprint, session.application_name, severity)
        owner_fingerprint = owner.fingerprint if owner is not None else None
        # Per application too: two services running the same loop are two problems, and a
        # roll-up must not credit one service's occurrences to the other's name.
        key = (kind, owner_fingerprint, track.fingerprint, _route(group.tags),
               session.application_name)
        report = self._reports.get(key)
        if report is not None and report.pending is not None:
            pending = report.pending
            pending.iterations += 1
            pending.n += n
            pending.child_time_ms += child_time * 1000.0
            pending.loop_time_ms += loop_time * 1000.0
            pending.waste_ms += waste * 1000.0
            if _SEVERITY_RANK[severity] > _SEVERITY_RANK[pending.severity]:
                pending.severity = severity
            if _CONFIDENCE_RANK[confidence] > _CONFIDENCE_RANK[pending.confidence]:
                pending.confidence = confidence
            pending.tags = group.tags
            return
        first_seen = _wall_time(session, group.first_sent)
        finding = Finding(
            kind=kind,
            owner_fingerprint=owner_fingerprint,
            owner_sql=owner.normalized if owner is not None else None,
            child_fingerprint=track.fingerprint,
            child_sql=track.normalized,
            n=n,
            iterations=1,
            child_time_ms=child_time * 1000.0,
            loop_time_ms=loop_time * 1000.0,
            waste_ms=waste * 1000.0,
            severity=severity,
            confidence=confidence,
            application_name=session.application_name,
            user=session.user,
            database=session.database,
            client_addr=session.client_addr,
            tags=group.tags,
            suggestion=_suggestion(kind, owner.normalized if owner is not None else None,
                                   track.normalized, n),
            first_seen=first_seen,
        )
        if report is None:
            self._reports[key] = _Report(now, first_seen)
            self._publish(finding)
        else:
            finding.first_seen = report.first_seen
            report.pending = finding

    def _publish(self, finding: Finding) -> None:
        self._recent.append(finding)
        self._emit(finding)

    def _count(self, kind: str, fingerprint: str, application_name: str, severity: str) -> None:
        counts = self._counts
        label_set = (kind, fingerprint, application_name, severity)
        if label_set not in counts and len(counts) >= MAX_COUNTED_LABEL_SETS:
            label_set = (kind, "other", application_name, severity)
        counts[label_set] = counts.get(label_set, 0) + 1


def _route(tags: dict[str, str]) -> str:
    route = tags.get("route")
    if route:
        return route
    controller, action = tags.get("controller", ""), tags.get("action", "")
    return f"{controller}#{action}" if controller or action else ""


def _wall_time(session: Session, monotonic_at: float) -> float:
    if session.opened_wall:
        return session.opened_wall + (monotonic_at - session.opened_at)
    return time.time()


def _table(normalized: str | None) -> str | None:
    if not normalized:
        return None
    match = _FROM_TABLE.search(normalized)
    return match.group(1) if match else None


def _key_column(normalized: str) -> str | None:
    match = _KEY_COLUMN.search(normalized)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).rsplit(".", 1)[-1].strip()


def _suggestion(kind: str, owner_sql: str | None, child_sql: str, n: int) -> str:
    child_table = _table(child_sql) or "the child table"
    if kind == "duplicate":
        return (f"The same query on {child_table} ran {n} times with identical parameters: run it "
                f"once and reuse the result (move it out of the loop or cache it per request).")
    column = _key_column(child_sql) or "id"
    owner_table = _table(owner_sql)
    per = f"one per {owner_table} row" if owner_table else "one per key"
    return (f"{n} queries on {child_table} ran {per}: eager-load them with SQLAlchemy "
            f"selectinload()/joinedload() or Django prefetch_related()/select_related(), or fetch "
            f"them in one query: SELECT ... FROM {child_table} WHERE {column} = ANY($1) with all "
            f"the keys.")
