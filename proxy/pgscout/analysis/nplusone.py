"""N+1 and duplicate-query detection from completed statements (rules: the NPLUSONE.md design note).

Owns: rebuilding request-shaped segments from StatementDone events per stream (a client
connection, split by W3C trace id when comments carry one) and per application (its connections
together, for async apps that gather one child per row over a pool), binding each child query to
the owner query whose rows it loops over, judging every closed group, and turning what it finds
into `Finding`s: the first occurrence of an (owner, child, route) key of an application is
emitted at once, later ones are rolled up and emitted once per report interval.

Read interface: `recent()` (the last `keep` findings as dicts, newest first) and `counts()`
(occurrences by kind, child fingerprint, application_name and severity, for the Collector).
The server calls `flush(now)` about once a second: it ends idle segments and emits due roll-ups.
A segment is not idle while a connection of its waits on the server (`on_sessions_active`: the
data plane says each second which sessions have a request outstanding), so a statement slower
than the idle gap does not end the loop it is part of.
Every other timing decision uses the events' own `sent_at` / `done_at`, so events that arrive
late (the analysis runs apart from the forwarding loop) are judged as they happened.

Readings of the spec that the code relies on:
- Soft boundaries (transaction statements, pool check-out and reset statements, the empty
  query) end nothing: owners and open groups survive them, so pools that check out per query are
  followed. They do break a strict no-owner run, and a group whose children are separated by them
  is only reported when the owner's rows account for all its distinct children (high
  confidence) and, when most of them are, its median think time is at most
  `boundary_max_think_ms`, one or two numbers of statements separate most consecutive children and
  there are children for at least 80% of the owner's rows: a check-out per query is
  quick and a loop body repeats itself, while unrelated requests on a busy pooled connection are
  the other explanation.
- The owner ring holds the last `owner_ring` distinct owner fingerprints; any execution of a
  fingerprint already in the ring counts as a new execution of that owner (opening new groups
  for its children) even when it returned fewer rows.
- A child bound to an owner that is itself a bound child (parent -> child -> grandchild) groups
  by its owner's group, that is per iteration of the outermost loop, so a grandchild loop is
  seen even when each child returned only a few rows. When such a child ran no more often than
  its owner did, it was looping over the owner's owner (two relationships per parent), and is
  reported against that one. Only a loop step is such a child: one whose statement takes
  parameters and whose latest execution had parameters new to its group. A statement without
  parameters cannot vary with its owner's rows, and a repeat is a new request running the same
  lookup (a pooled connection: the top-level query of each request, bound as a child of some
  other page's multi-row query earlier in the segment); each of their executions opens a new
  group for their children, or one connection's requests would merge into one group.
- A child that found no owner on its first execution binds to the first owner that runs later.
- A parameter of `= ANY(...)` is counted as a set of values: the query is a batch loader; so is
  an IN list of parameters when no equality on a parameter sits beside it.
- A locking read (FOR UPDATE / FOR SHARE) repeated with the same parameters claims a new row each
  time (a queue worker): never a duplicate.
- Statements that read only the system catalogs (driver type introspection, psql's \\d) are
  invisible unless `include_catalog`; statements that read no relation at all (`SELECT $1::int`,
  `SELECT now()`) are neither owners nor children: there is nothing to batch.
- A cursor walk (keyset or offset pagination: a LIMIT query keyed by a range comparison or an
  OFFSET on a parameter, in any of the executions of its fingerprint, since a paginator's first
  page has no OFFSET) takes its parameter from its own previous result; without an equality key
  it is never a loop, with one (a tenant filter) it is when its pages come back full.
- Owners whose rows come in chunks: a server-side cursor (known by name) is an owner from its
  first FETCH, with one row already (its FETCHes' rows add up), keyed and shown as its
  DECLARE; its later FETCHes add rows to that execution. A query whose Executes hand out chunks
  (PortalSuspended) is recorded when its last chunk completes, so the no-owner groups of the
  children run since it was sent become its group, and once that group has a child per row the
  next child starts the run its next execution will adopt.
- Repeats with steady gaps of at least `poll_min_interval_ms` and nothing else between them are
  polling (sleep in a loop): never a duplicate, and not a loop unless its distinct parameters
  fit the owner's rows (a loop with steady work per row under `max_think_ms` is still a loop).
- Across connections (`correlate_connections`): every statement is also observed in its
  application's stream (application_name, user, database and client host, split by trace id).
  A group there is judged only when at least a fifth of its children ran on other connections
  with no owner of their own; then it replaces the per-connection groups it is made of. Without
  a trace id it must also start within `max_think_ms` of the owner, keep its gaps under it,
  run on connections that run nothing else meanwhile, and run for at least 80% of the owner's
  rows (and no more distinct ones).
- Duplicates are, like N+1 loops, only reported for tight (think time) unbatched repetition;
  without an owner, only when the repeats are at least half of the group's executions.

Memory: statements are known by fingerprint; the shape table keeps, per fingerprint and hash
of the normalized text, only that text cut at `sql_text_max_chars` and a few flags. Everything retained is counted in
estimated bytes against `max_memory_bytes`: shapes may use a quarter, open segments half (the
least recently active are judged early when over), roll-up keys the last quarter.

Must not: import asyncio, sockets, prometheus_client or a logger; keep parameter values (only
their signatures) or whole statement texts; grow past its byte budget.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from collections import OrderedDict, deque
from typing import Callable, Final


from pglast import parser as pg

from pgscout.analysis.bus import StatementObserver
from pgscout.dataplane.events import Session, SessionClosed, SessionsActive, StatementDone
from pgscout.analysis.comments import trace_id

# A connection serves one request at a time unless an async app shares it; more traced streams
# than this on one connection are finished requests whose idle gap has not elapsed yet.
MAX_STREAMS_PER_CONNECTION: Final = 8
# An application serves many traced requests at once over its pool.
MAX_STREAMS_PER_APPLICATION: Final = 64
# Label sets kept by counts(); further child fingerprints are counted under "other".
MAX_COUNTED_LABEL_SETS = 4096
# Connections a group remembers by id (only "more than one" matters).
MAX_GROUP_CONNECTIONS: Final = 16
# Statements longer than this are classified with regular expressions instead of a parse, on
# their head only (asyncpg's type introspection, the longest driver query, is about 6,500).
MAX_PARSED_CHARS: Final = 10_000
# How a statement is written (ORM style, table, key column) is read from its head.
STYLE_HEAD_CHARS: Final = 2_000
# A cross-connection group may have this share of gaps over the think time (a GC pause).
CROSS_MAX_LONG_GAP_RATIO: Final = 0.1
# Share of a group's children that must run on connections without their own owner for the
# group to be judged per application.
CROSS_MIN_FOREIGN_RATIO: Final = 0.2
# Without a trace id, share of a cross-connection group's children whose connection ran nothing
# else since the owner or its previous child: gathered tasks (or a FIFO pool's check-outs, one
# per row) hold their connections for the loop, a busy pool mixes requests.
CROSS_MIN_DEDICATED_RATIO: Final = 0.75
# Across soft boundaries, share of the children that must follow the previous one after one of
# two numbers of other statements (a loop body repeats itself, an inner loop's children see the
# outer child between them once per round; unrelated requests are irregular).
BOUNDARY_MIN_REGULAR_RATIO: Final = 0.8
# A loop inferred across soft boundaries or connections runs a child for at least this share of
# the owner's rows (one per row); a few lookups after a listing are unrelated requests.
LOOP_MIN_ROW_COVERAGE: Final = 0.8
# Share of gaps that must sit near the median for a repeat to be periodic (polling).
POLL_STEADY_RATIO: Final = 0.8

# Estimated retained bytes (CPython 3.11, 64-bit), calibrated with tracemalloc in the tests.
SHAPE_BYTES: Final = 700  # plus the kept text
EVENT_BYTES: Final = 320  # a gap, a row count and a parameter-signature entry
TRACK_BYTES: Final = 900  # a track and its open group
OWNER_BYTES: Final = 300
CURSOR_BYTES: Final = 200  # a cursor's entry (its DECLARE's shape is counted with the shapes)
STREAM_BYTES: Final = 1200
REPORT_BYTES: Final = 1500  # plus two kept texts

_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
_CONFIDENCE_RANK = {"low": 0, "medium": 1, "high": 2}
# Pool check-out and reset statements (upper case, single spaces): asyncpg's release script
# (one simple Query: `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`),
# PgBouncer's server_reset_query, pre-ping queries.
_POOL_RESET_STATEMENTS: Final = frozenset({
    "SELECT $1", "SELECT 1", "DISCARD ALL", "DISCARD PLANS", "DISCARD SEQUENCES",
    "DISCARD TEMP", "RESET ALL", "DEALLOCATE ALL", "CLOSE ALL", "UNLISTEN *",
    "SELECT PG_ADVISORY_UNLOCK_ALL()", "SET SESSION AUTHORIZATION DEFAULT",
    "RESET SESSION AUTHORIZATION", "ROLLBACK", "COMMIT", "BEGIN",
})
_RESET_TEXT_MAX_CHARS: Final = 400
_CATALOG_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
_PLACEHOLDER = re.compile(r"\$(\d+)")
_ARRAY_LOOKUP = re.compile(r"\b(?:ANY|SOME)\s*\(", re.IGNORECASE)
_IN_LIST = re.compile(r"\bIN\s*\(\s*\$\d+\s*,", re.IGNORECASE)
# A server-side cursor (Django's iterator(), psycopg named cursors, SQLAlchemy yield_per over
# them): DECLARE opens it, each FETCH hands the client a chunk of its rows.
_DECLARE_CURSOR = re.compile(r'\s*DECLARE\s+("(?:[^"]|"")+"|[^\s;]+)', re.IGNORECASE)
_FETCH_CURSOR = re.compile(r'\s*FETCH\b.*?("(?:[^"]|"")+"|[^\s;"]+)\s*;?\s*$',
                           re.IGNORECASE | re.DOTALL)
MAX_CURSORS_PER_STREAM: Final = 16
# Row locks: a claim of the next queue row repeats its parameters and gets another row each time.
_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE)\b", re.IGNORECASE)
_JSON_STRING = r'"((?:[^"\\]|\\.)*)"'
# A relation in pglast's JSON: a RangeVar, or the bare `relation` of INSERT/UPDATE/DELETE.
_RANGE_VAR = re.compile(r'\{(?:"catalogname":"(?:[^"\\]|\\.)*",)?'
                        rf'(?:"schemaname":{_JSON_STRING},)?"relname":{_JSON_STRING}')
_CTE_NAME = re.compile(rf'"ctename":{_JSON_STRING}')
_NAME = r'(?:"[^"]+"|[A-Za-z_][\w$]*)'
_QUALIFIED_NAME = rf"{_NAME}(?:\s*\.\s*{_NAME})*"
_FROM_TABLE = re.compile(rf"\bFROM\s+({_QUALIFIED_NAME})", re.IGNORECASE)
_RELATION = re.compile(rf"\b(?:FROM|JOIN|INTO|UPDATE)\s+({_QUALIFIED_NAME})", re.IGNORECASE)
_KEY_COLUMN = re.compile(
    rf"({_QUALIFIED_NAME})\s*=\s*\$\d+|\$\d+(?:\s*::\s*\w+)?\s*=\s*({_QUALIFIED_NAME})"
)
# Cursor walks: a LIMIT keyed by a range comparison with a parameter (`id > $1`,
# `(created_at, id) < ($1, $2)`, `$1 < t.id`) or an OFFSET parameter.
_LIMIT = re.compile(r"\b(?:LIMIT|FETCH\s+(?:FIRST|NEXT))\b", re.IGNORECASE)
_RANGE_PARAM = re.compile(
    r"(?<![<>=!~\-#@|&])(?:<=|>=|<(?![<>=])|>(?![>=]))\s*\(?\s*\$\d+"
    r"|\$\d+(?:\s*::\s*\w+)?\s*(?:<=|>=|<(?![<>=@])|>(?![>=]))")
_OFFSET_PARAM = re.compile(r"\bOFFSET\s+\$\d+", re.IGNORECASE)
_EQUALITY_PARAM = re.compile(r"(?<![<>=!])=\s*\(?\s*\$\d+|\$\d+(?:\s*::\s*\w+)?\s*=(?![=>])")
# A child that asks one number or one yes/no per key (`author.books.count()`, `.exists()`): its
# fix is one grouped query or an annotation on the parent query, not eager-loading the rows.
# Django's exists() is `SELECT 1 AS "a" ... LIMIT 1`, SQLAlchemy's `SELECT EXISTS (...)`.
_AGGREGATE = re.compile(r"^\s*SELECT\s+(COUNT|SUM|MIN|MAX|AVG)\s*\(", re.IGNORECASE)
_EXISTS = re.compile(r'^\s*SELECT\s+(?:EXISTS\s*\(|(?:\$\d+|1)\s+AS\s+"?a"?\s+FROM\b)',
                     re.IGNORECASE)
_GROUP_BY = re.compile(r"\bGROUP\s+BY\b", re.IGNORECASE)
# What known ORMs' statements look like, most distinctive first.
_STYLES: Final = (
    ("hibernate", re.compile(r"\b[a-z][a-z]*\d+_\d*\.\w")),  # b1_0.id (6), book0_.id (5)
    # Knex and Drizzle write their keywords in lower case and quote every identifier.
    ("knex", re.compile(r'^\s*select (?:distinct )?(?:\*|"\w+")[^;]*? from "\w+"')),
    ("prisma", re.compile(r'"public"\."\w+"\."\w+"')),
    ("typeorm", re.compile(r'"(\w+)"\."\w+" AS "\1_\w+"')),
    # peewee aliases every table t1, t2...; Sequelize by its model's name.
    ("peewee", re.compile(r'\bFROM "\w+" AS "t\d+"')),
    ("sequelize", re.compile(r'\bFROM "\w+" AS "\w+"', re.IGNORECASE)),
    ("rails", re.compile(r'^\s*SELECT (?:DISTINCT )?"\w+"\.\*', re.IGNORECASE)),
    ("gorm", re.compile(r'^\s*SELECT \* FROM "\w+" WHERE "\w+"\."\w+"', re.IGNORECASE)),
    ("django", re.compile(r'^\s*SELECT (?:DISTINCT )?"\w+"\."\w+"(?:, "\w+"\."\w+")* FROM "\w+"',
                          re.IGNORECASE)),
    ("sqlalchemy", re.compile(r"\$\d+(?:::[A-Z][A-Z ]*)? = \w+\.\w+|\b\w+\.(\w+) AS \w+_\1\b"
                              r"|::(?:INTEGER|VARCHAR|BIGINT)\b")),
)
# Words in application_name and sqlcommenter tags that name a stack.
_STACK_WORDS: Final = {
    "sqlalchemy": "sqlalchemy", "django": "django",
    "rails": "rails", "activerecord": "rails", "active_record": "rails", "ruby": "rails",
    "sidekiq": "rails", "puma": "rails",
    "hibernate": "hibernate", "spring": "hibernate", "jpa": "hibernate",
    "jdbc": "jdbc", "java": "jdbc",
    "prisma": "prisma", "sequelize": "sequelize", "typeorm": "typeorm", "peewee": "peewee",
    "node": "node", "nodejs": "node", "express": "node", "nestjs": "node", "koa": "node",
    "fastify": "node", "knex": "knex", "drizzle": "knex", "postgres_js": "node",
    "gorm": "gorm", "go": "go", "golang": "go", "pgx": "go", "sqlx": "go", "sqlc": "go",
    "psycopg": "driver", "psycopg2": "driver", "psycopg3": "driver", "asyncpg": "driver",
    "psql": "driver", "libpq": "driver",
}
_WORD = re.compile(r"[a-z0-9_]+")


@dataclasses.dataclass(slots=True)
class Finding:
    """One reported N+1 loop or duplicate query, or a roll-up of several (`iterations` loops).

    Per-loop figures (means over the loops of a roll-up): `n` (child executions in a loop; for a
    duplicate, the executions of repeated parameter sets), `child_time_ms` (the children's own
    execution time), `loop_time_ms` (first child sent to last child done) and `waste_ms`.
    For an N+1 loop `waste_ms` is the loop's wall time minus its slowest child: what the loop
    costs beyond the one batched query that would replace it. It includes `app_time_ms`, the
    application's own time between the children, which batching saves only in part. For a
    duplicate `waste_ms` is the repeats' own execution time (after the first run of each
    parameter set), which severity is judged by. Totals: `n_max` (largest loop), `n_total`,
    `waste_total_ms`. `connections` is how many connections the children ran on (more than one
    when an async app gathered them over its pool). `stack` is the client stack the suggestion
    is written for ("" when it could not be told).
    """

    kind: str  # "n_plus_one" or "duplicate"
    owner_fingerprint: str | None
    owner_sql: str | None
    child_fingerprint: str
    child_sql: str
    n: int
    iterations: int
    n_max: int
    n_total: int
    child_time_ms: float
    loop_time_ms: float
    waste_ms: float
    app_time_ms: float
    waste_total_ms: float
    connections: int
    severity: str  # "info", "warning" or "critical"
    confidence: str  # "high", "medium" or "low"
    application_name: str
    user: str
    database: str
    client_addr: str
    tags: dict[str, str]
    stack: str
    suggestion: str
    first_seen: float  # wall clock, time.time() seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Shape:
    """What the detector needs from one statement text, computed once per (fingerprint, text)."""

    __slots__ = ("text", "placeholders", "array_lookup", "soft_boundary", "reads", "page_walk",
                 "equality_key", "locking", "style", "table", "key_column", "asks",
                 "declares_cursor", "fetches_cursor", "cursor_name", "bytes")

    def __init__(self, ev: StatementDone, text_max_chars: int) -> None:
        full = ev.normalized
        self.text = full[:text_max_chars - 1] + "…" if len(full) > text_max_chars else full
        # A bulk statement's head says what it is; scanning all of it would cost per character.
        normalized = full[:MAX_PARSED_CHARS + 1]
        self.placeholders = len(set(_PLACEHOLDER.findall(normalized)))
        self.equality_key = _EQUALITY_PARAM.search(normalized) is not None
        # `= ANY($1)`, or an IN list of parameters as the only key: a batch loader (chunks of
        # keys), not a per-row lookup.
        self.array_lookup = _ARRAY_LOOKUP.search(normalized) is not None or (
            not self.equality_key and _IN_LIST.search(normalized) is not None)
        self.locking = _LOCKING.search(normalized) is not None
        self.soft_boundary = _is_pool_reset(ev.sql if len(ev.sql) <= _RESET_TEXT_MAX_CHARS
                                            else normalized)
        # From the client's text when it is whole: the normalized one is cut for display.
        self.reads = _reads(ev.sql if not ev.truncated and len(ev.sql) <= MAX_PARSED_CHARS
                            else normalized)
        self.page_walk = _LIMIT.search(normalized) is not None and (
            _RANGE_PARAM.search(normalized) is not None
            or _OFFSET_PARAM.search(normalized) is not None)
        head = normalized[:STYLE_HEAD_CHARS]
        self.style = next((name for name, pattern in _STYLES if pattern.search(head)), "")
        self.table = _table(head)
        self.key_column = _key_column(head)
        self.asks = _asks(head)
        declared = _DECLARE_CURSOR.match(head) if ev.kind == "utility" else None
        fetched = _FETCH_CURSOR.match(head) if ev.kind == "utility" and declared is None else None
        self.declares_cursor = declared is not None
        self.fetches_cursor = fetched is not None
        named = declared if declared is not None else fetched
        self.cursor_name = named.group(1) if named is not None else ""
        self.bytes = SHAPE_BYTES + 2 * len(self.text)


class _Owner:
    """The latest execution of one owner fingerprint in a stream, with running totals."""

    __slots__ = ("fingerprint", "shape", "exec_id", "rows", "executions", "total_rows",
                 "conn_id", "done_at", "chunked", "streamed")

    def __init__(self, fingerprint: str, shape: _Shape) -> None:
        self.fingerprint = fingerprint
        self.shape = shape
        self.exec_id = 0
        self.rows = 0
        self.executions = 0
        self.total_rows = 0
        self.conn_id = 0
        self.done_at = 0.0
        self.chunked = False  # a cursor's: its FETCHes add rows to its execution
        # Recorded after its first chunks' children (see _adopt_streamed_children); its next
        # execution's children come before it is recorded again.
        self.streamed = False


class _Cursor:
    """A cursor DECLAREd in a stream: the owner its FETCHes' rows belong to."""

    __slots__ = ("fingerprint", "shape", "fetched")

    def __init__(self, fingerprint: str, shape: _Shape) -> None:
        self.fingerprint = fingerprint  # the DECLARE's (or, declared unseen, the FETCH's)
        self.shape = shape
        self.fetched = False


class _Executions:
    """A group's executions with one parameter signature: one allocation with unboxed fields
    (where a list of four would be five), made for almost every child statement."""

    __slots__ = ("count", "seconds", "first_sent", "last_done")

    def __init__(self, seconds: float, first_sent: float, last_done: float) -> None:
        self.count = 1
        self.seconds = seconds
        self.first_sent = first_sent
        self.last_done = last_done


class _Group:
    """The executions of one child fingerprint under one owner iteration (or one no-owner run)."""

    __slots__ = ("key", "owner", "outer", "owner_execs", "owner_rows", "owner_execs_seen",
                 "owner_rows_seen", "n", "pipelined", "by_params", "max_repeat", "gaps", "rows",
                 "child_time", "slowest", "first_sent", "last_done", "tags", "lead",
                 "boundary_mark", "crossed", "conns", "foreign", "app_group", "owner_conn",
                 "owner_done", "statement_mark", "interleaved", "adjacent", "between", "last_conn",
                 "dedicated", "deferred", "verdict", "busy_mark", "last_new", "page_walk")

    def __init__(self, key: int, owner: _Owner | None, outer: _Group | None,
                 ev: StatementDone, boundaries: int) -> None:
        self.key = key
        self.owner = owner
        self.outer = outer  # the owner's own group, when the owner is itself a bound child
        self.owner_execs = 0
        self.owner_rows = 0
        if owner is not None:
            # Count from the owner execution that opened this group.
            self.owner_execs_seen = owner.executions - 1
            self.owner_rows_seen = owner.total_rows - owner.rows
            self.lead = ev.sent_at - owner.done_at  # owner done -> first child sent
            self.owner_conn = owner.conn_id
            self.owner_done = owner.done_at
        else:
            self.lead = 0.0
            self.owner_conn = 0
            self.owner_done = 0.0
        self.n = 0
        self.pipelined = 0
        self.by_params: dict[object, _Executions] = {}  # by parameter signature
        self.max_repeat = 0
        self.gaps: list[float] = []
        self.rows: list[int] = []
        self.child_time = 0.0
        self.slowest = 0.0
        self.first_sent = ev.sent_at
        self.last_done = ev.done_at
        self.tags = ev.tags
        self.boundary_mark = boundaries  # soft boundaries seen in the stream at the last child
        self.crossed = 0  # children separated from the previous one by a soft boundary
        self.conns: set[int] = set()
        self.last_conn = -1  # the connection of the latest child: `conns` has it
        self.foreign = 0  # children on another connection than the owner's, with no owner there
        self.app_group: _Group | None = None  # the application stream's group of the same child
        self.statement_mark = 0  # statements seen in the stream at the last child
        self.interleaved = 0  # children with other statements between them and the previous one
        # Statements between consecutive children -> times: none between them (`adjacent`, the
        # common case, counted apart from the dict), or a number of them.
        self.adjacent = 0
        self.between: dict[int, int] = {}
        # Children whose connection ran nothing else since the owner or its previous child.
        self.dedicated = 0
        # An application group: the per-connection groups waiting for its verdict, and that
        # verdict once judged (True: reported as one loop over the connections).
        self.deferred: list[tuple[_Stream, _Track, _Group]] = []
        self.verdict: bool | None = None
        self.busy_mark = 0.0  # the stream's busy time when the previous child completed
        # The latest child ran with parameters not seen before in the group: a step of a loop
        # over the owner's rows (a repeat is the same lookup again, a request's or a duplicate).
        self.last_new = True
        # A child's shape was a cursor walk: one fingerprint covers `LIMIT n` and `LIMIT n
        # OFFSET m`, and a paginator's first page has no OFFSET.
        self.page_walk = False

    def add(self, ev: StatementDone, boundaries: int, statements: int, busy: float) -> None:
        """`busy`: the stream's server time before `ev`; the think time between two children
        is the gap less the other statements run in it (an inner loop, a reset)."""
        duration = ev.done_at - ev.sent_at
        if self.n:
            gap = ev.sent_at - self.last_done - (busy - self.busy_mark)
            self.gaps.append(gap if gap > 0.0 else 0.0)
            if boundaries != self.boundary_mark:
                self.crossed += 1
            between = statements - self.statement_mark - 1
            if between:
                self.interleaved += 1
                self.between[between] = self.between.get(between, 0) + 1
            else:
                self.adjacent += 1
        self.boundary_mark = boundaries
        self.statement_mark = statements
        self.busy_mark = busy + duration
        self.n += 1
        if ev.pipelined:
            self.pipelined += 1
        # Kept as the event holds it (a boxed int): unboxed, it would be boxed again for the dict.
        signature: object = ev.param_sig
        if signature is None:
            signature = hash(ev.sql)
        same = self.by_params.get(signature)
        if same is None:
            self.by_params[signature] = _Executions(duration, ev.sent_at, ev.done_at)
            repeat = 1
        else:
            repeat = same.count = same.count + 1
            same.seconds += duration
            same.last_done = ev.done_at
        self.last_new = repeat == 1
        if repeat > self.max_repeat:
            self.max_repeat = repeat
        self.rows.append(ev.rows)
        self.child_time += duration
        if duration > self.slowest:
            self.slowest = duration
        if ev.done_at > self.last_done:
            self.last_done = ev.done_at
        conn_id = ev.session.conn_id
        if conn_id != self.last_conn and len(self.conns) < MAX_GROUP_CONNECTIONS:
            self.conns.add(conn_id)
            self.last_conn = conn_id

    def adopt(self, owner: _Owner) -> None:
        """Its children ran while `owner` (just completed) streamed its rows to the client."""
        self.key = owner.exec_id
        self.owner = owner
        self.owner_execs_seen = owner.executions - 1
        self.owner_rows_seen = owner.total_rows - owner.rows
        self.owner_conn = owner.conn_id
        self.owner_done = owner.done_at
        self.count_owner_executions(owner)

    def count_owner_executions(self, owner: _Owner) -> None:
        if owner is not self.owner:
            # The owner left the ring and came back as a new entry: count from its latest run.
            self.owner = owner
            self.owner_execs_seen = owner.executions - 1
            self.owner_rows_seen = owner.total_rows - owner.rows
        # (A cursor's later FETCHes add rows to the same execution.)
        if owner.executions != self.owner_execs_seen or owner.total_rows != self.owner_rows_seen:
            self.owner_execs += owner.executions - self.owner_execs_seen
            self.owner_rows += owner.total_rows - self.owner_rows_seen
            self.owner_execs_seen = owner.executions
            self.owner_rows_seen = owner.total_rows

    def spans_connections(self) -> bool:
        """Children ran on other connections, with no owner there: an async fan-out."""
        return len(self.conns) > 1 and self.foreign >= CROSS_MIN_FOREIGN_RATIO * self.n


class _Track:
    """One child fingerprint in a stream: its owner binding and its open group."""

    __slots__ = ("fingerprint", "shape", "owner", "group", "last_seq")

    def __init__(self, fingerprint: str, shape: _Shape) -> None:
        self.fingerprint = fingerprint
        self.shape = shape  # its first execution's
        self.owner: _Owner | None = None
        self.group: _Group | None = None
        self.last_seq = 0


class _Scope:
    """A client connection, or an application's connections taken together (`shared`)."""

    __slots__ = ("key", "shared", "streams", "newest", "last_fingerprint", "last_done",
                 "application", "application_session", "application_name")

    def __init__(self, key: int | tuple, shared: bool) -> None:
        self.key = key
        self.shared = shared
        self.streams: OrderedDict[str | None, _Stream] = OrderedDict()
        # The last of `streams` (None when it is gone): the stream of the scope's previous
        # statement, almost always that of the next one, found without a generic call.
        self.newest: _Stream | None = None
        # A connection's last statement (soft boundaries and catalog reads aside).
        self.last_fingerprint = ""
        self.last_done = 0.0
        # A connection's application scope, and the session and application_name it was
        # looked up for.
        self.application: _Scope | None = None
        self.application_session: Session | None = None
        self.application_name = ""


class _Stream:
    """One segment of one stream: owner ring and child tracks, reset when the segment ends."""

    __slots__ = ("scope", "trace", "session", "owners", "tracks", "seq", "owner_seq",
                 "started_at", "last_done", "active_at", "queued_done", "boundaries", "statements",
                 "busy", "cursors", "bytes")

    def __init__(self, scope: _Scope, trace: str | None, session: Session,
                 started_at: float) -> None:
        self.scope = scope
        self.trace = trace
        self.session = session
        self.owners: OrderedDict[str, _Owner] = OrderedDict()
        self.tracks: OrderedDict[str, _Track] = OrderedDict()
        self.seq = 0  # events seen in this segment; also numbers executions and groups
        self.owner_seq = 0  # seq of the latest owner execution
        self.started_at = started_at
        self.last_done = started_at
        # Until when a connection of the stream counts as waiting on the server
        # (SessionsActive): a statement running longer than the idle gap is not the client
        # gone idle.
        self.active_at = started_at
        self.queued_done = started_at  # last_active() when last put at the end of the activity order
        self.boundaries = 0  # soft boundaries seen
        self.statements = 0  # statements observed (soft boundaries and catalog reads aside)
        self.busy = 0.0  # seconds the server spent on this stream's statements, boundaries too
        # The cursors DECLAREd in the segment, by name (the latest MAX_CURSORS_PER_STREAM).
        self.cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self.bytes = STREAM_BYTES

    def last_active(self) -> float:
        return self.last_done if self.last_done > self.active_at else self.active_at


class _Report:
    """Emission state of one (kind, owner, child, route, application_name) key: what waits for
    the next roll-up."""

    __slots__ = ("last_emit", "first_seen", "pending")

    def __init__(self, last_emit: float, first_seen: float) -> None:
        self.last_emit = last_emit
        self.first_seen = first_seen
        self.pending: Finding | None = None


class NPlusOneDetector(StatementObserver):
    """Bus observer: feed it StatementDone and SessionClosed; it calls `emit` with findings."""

    # The thresholds, declared: taken from an untyped settings object they would be Any, and
    # every comparison with them a generic, boxing call in the compiled module.
    _enabled: bool
    _include_writes: bool
    _include_catalog: bool
    _correlate: bool
    _idle_gap: float
    _segment_max_events: int
    _segment_max_seconds: float
    _owner_ring: int
    _owner_min_rows: int
    _child_max_params: int
    _min_distinct: int
    _min_distinct_ratio: float
    _max_pipelined_ratio: float
    _max_think: float
    _boundary_max_think: float
    _max_median_rows: int
    _duplicate_min: int
    _no_owner_min_run: int
    _max_tracks: int
    _warning_loop: float
    _warning_n: int
    _critical_loop: float
    _critical_n: int
    _report_interval: float
    _poll_min_interval: float
    _poll_max_jitter: float
    _text_max_chars: int
    _shape_budget: int
    _stream_budget: int
    _max_reports: int
    _smallest_reportable: int

    def __init__(self, settings_like, emit: Callable[[Finding], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recent: deque[Finding] = deque(maxlen=settings_like.keep)
        self.reconfigure(settings_like)
        self._emit = emit
        self._clock = clock
        self._connections: dict[int, _Scope] = {}
        self._applications: dict[int | tuple, _Scope] = {}
        # Oldest activity first, kept lazily: a stream is moved to the end when a flush or the
        # budget finds it active since it was queued (`queued_done`), not at every statement.
        # An idle segment behind a busy one may so end up to one idle gap late, never early.
        # Keyed by the stream itself: an identity hashes for free, where a (scope key, trace
        # id) tuple would be hashed anew at every look-up.
        self._streams: OrderedDict[_Stream, _Stream] = OrderedDict()
        self._shapes: OrderedDict[tuple[str, int], _Shape] = OrderedDict()  # LRU
        # The latest _shape() answer and the event fields it was found for.
        self._last_shape: _Shape | None = None
        self._last_fingerprint = ""
        self._last_normalized = ""
        self._reports: OrderedDict[tuple, _Report] = OrderedDict()  # by last emission
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._shape_bytes = 0
        self._stream_bytes = 0
        self._last_traceparent: str | None = None
        self._last_trace: str | None = None

    def reconfigure(self, settings_like) -> None:
        """Apply (re)loaded thresholds; open segments and findings so far stay."""
        s = settings_like
        self._enabled = s.enabled
        self._include_writes = s.include_writes
        self._include_catalog = s.include_catalog
        self._correlate = s.correlate_connections
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
        self._boundary_max_think = s.boundary_max_think_ms / 1000.0
        self._max_median_rows = s.max_median_rows
        self._duplicate_min = s.duplicate_min
        self._no_owner_min_run = s.no_owner_min_run
        self._max_tracks = s.max_tracks
        self._warning_loop = s.warning_loop_ms / 1000.0
        self._warning_n = s.warning_n
        self._critical_loop = s.critical_loop_ms / 1000.0
        self._critical_n = s.critical_n
        self._report_interval = s.report_interval_seconds
        self._poll_min_interval = s.poll_min_interval_ms / 1000.0
        self._poll_max_jitter = s.poll_max_jitter_ratio
        self._text_max_chars = s.sql_text_max_chars
        budget = s.max_memory_bytes
        self._shape_budget = budget // 4
        self._stream_budget = budget // 2
        self._max_reports = max(1, budget // 4 // (REPORT_BYTES + 4 * s.sql_text_max_chars))
        self._smallest_reportable = min(self._min_distinct, self._no_owner_min_run,
                                        self._duplicate_min)
        if self._recent.maxlen != s.keep:
            self._recent = deque(self._recent, maxlen=s.keep)

    # -- bus interface ----------------------------------------------------------------------
    def on_statement(self, ev: StatementDone) -> None:
        if not self._enabled:
            return
        conn_id = ev.session.conn_id
        conn = self._connections.get(conn_id)
        if conn is None:
            conn = self._connections[conn_id] = _Scope(conn_id, shared=False)
        if ev.kind == "txn" or ev.tag == "EMPTY":
            self._soft_boundary(conn, ev)
            return
        if not ev.fingerprint:
            return
        shape = self._shape(ev)
        if shape.soft_boundary:
            self._soft_boundary(conn, ev)
            return
        if shape.reads == "catalog" and not self._include_catalog:
            # Driver or tool introspection, not the application's data access.
            for stream in conn.streams.values():
                stream.busy += ev.done_at - ev.sent_at
            return
        trace = self._trace(ev.tags) if ev.tags else None
        stream = self._stream_for(conn, ev, trace, MAX_STREAMS_PER_CONNECTION)
        group = self._observe(stream, ev, shape, None)
        if self._correlate:
            application = self._application(conn, ev.session)
            app_stream = self._stream_for(application, ev, trace, MAX_STREAMS_PER_APPLICATION)
            app_group = self._observe(app_stream, ev, shape, group)
            if group is not None:
                group.app_group = app_group
            if app_group is not None and (conn.last_fingerprint == ev.fingerprint
                                          or conn.last_done <= app_group.owner_done):
                app_group.dedicated += 1
        if shape.reads != "none" and ev.kind in ("select", "dml"):
            # Session set-up (SHOW, `SELECT current_schema()`) does not take a connection from
            # a loop; data access does.
            conn.last_fingerprint = ev.fingerprint
            conn.last_done = ev.done_at
        if self._stream_bytes > self._stream_budget:
            self._shed_streams(ev.done_at)

    def on_session_closed(self, ev: SessionClosed) -> None:
        conn = self._connections.pop(ev.session.conn_id, None)
        if conn is not None:
            for stream in list(conn.streams.values()):
                self._end_stream(stream, ev.at)

    def on_sessions_active(self, ev: SessionsActive) -> None:
        """Sessions waiting on the server: their segments (and their applications') are not idle."""
        for conn_id in ev.conn_ids:
            conn = self._connections.get(conn_id)
            if conn is None:
                continue
            scopes = (conn, conn.application) if conn.application is not None else (conn,)
            for scope in scopes:
                for stream in scope.streams.values():
                    if ev.until > stream.active_at:
                        stream.active_at = ev.until

    def flush(self, now: float | None = None) -> None:
        """End segments idle for longer than the idle gap and emit the roll-ups that are due."""
        if now is None:
            now = self._clock()
        streams = self._streams
        while streams:
            stream = next(iter(streams.values()))
            if now - stream.last_active() > self._idle_gap:
                self._end_stream(stream, now)
            elif not self._requeued(stream):
                break
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

    def retained_bytes(self) -> int:
        """The estimate held against max_memory_bytes: shapes, open segments and roll-up keys."""
        return (self._shape_bytes + self._stream_bytes
                + len(self._reports) * (REPORT_BYTES + 4 * self._text_max_chars))

    # -- segments ---------------------------------------------------------------------------
    def _shape(self, ev: StatementDone) -> _Shape:
        # One fingerprint covers IN lists of any length (`IN ($1)` ... `IN ($1, ..., $500)`),
        # which differ in what matters here: the key adds the normalized text's hash (a str
        # caches its hash, and the fingerprinter hands out the same text object each time).
        normalized = ev.normalized
        last = self._last_shape
        if (last is not None and normalized is self._last_normalized
                and ev.fingerprint == self._last_fingerprint):
            # The same statement again (a loop's next child): its shape is already the most
            # recently used one, so the table's order stays as the look-up would leave it.
            return last
        key = (ev.fingerprint, hash(normalized))
        shapes = self._shapes
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = _Shape(ev, self._text_max_chars)
            self._shape_bytes += shape.bytes
            while self._shape_bytes > self._shape_budget and len(shapes) > 1:
                _, evicted = shapes.popitem(last=False)
                self._shape_bytes -= evicted.bytes
        else:
            shapes.move_to_end(key)
        self._last_shape = shape
        self._last_fingerprint = ev.fingerprint
        self._last_normalized = normalized
        return shape

    def _trace(self, tags: dict[str, str]) -> str | None:
        # Consecutive statements of a request carry the same traceparent: validate it once.
        traceparent = tags.get("traceparent")
        if traceparent != self._last_traceparent:
            self._last_traceparent = traceparent
            self._last_trace = trace_id(tags)
        return self._last_trace

    def _application(self, conn: _Scope, session: Session) -> _Scope:
        scope = conn.application
        # The last look-up holds while its scope has streams (so it is the one registered under
        # its key) and the key's parts are unchanged: a session's user, database and address
        # are, its application_name may not be.
        if (scope is not None and scope.streams and conn.application_session is session
                and conn.application_name == session.application_name):
            return scope
        host = session.client_addr.rsplit(":", 1)[0]
        key = ("app", session.application_name, session.user, session.database, host)
        scope = self._applications.get(key)
        if scope is None:
            scope = self._applications[key] = _Scope(key, shared=True)
        conn.application = scope
        conn.application_session = session
        conn.application_name = session.application_name
        return scope

    def _stream_for(self, scope: _Scope, ev: StatementDone, trace: str | None,
                    max_streams: int) -> _Stream:
        stream = scope.newest
        if stream is None or stream.trace != trace:
            stream = scope.streams.get(trace)
        if stream is not None and (
            ev.sent_at - stream.last_done > self._idle_gap
            or stream.seq >= self._segment_max_events
            or ev.done_at - stream.started_at > self._segment_max_seconds
        ):
            self._end_stream(stream, ev.done_at)
            stream = None
        if stream is None:
            if len(scope.streams) >= max_streams:
                self._end_stream(next(iter(scope.streams.values())), ev.done_at)
            stream = _Stream(scope, trace, ev.session, ev.sent_at)
            if not scope.streams and scope.shared:
                self._applications[scope.key] = scope
            scope.streams[trace] = self._streams[stream] = scope.newest = stream
            self._stream_bytes += stream.bytes
        else:
            if stream is not scope.newest:  # moving the newest would be a no-op
                scope.streams.move_to_end(trace)
                scope.newest = stream
        return stream

    def _requeued(self, stream: _Stream) -> bool:
        """Move `stream` to the end of the activity order if it was active since it was queued."""
        last_active = stream.last_active()
        if last_active <= stream.queued_done:
            return False
        stream.queued_done = last_active
        self._streams.move_to_end(stream)
        return True

    def _end_stream(self, stream: _Stream, now: float) -> None:
        scope = stream.scope
        del scope.streams[stream.trace]
        if scope.newest is stream:
            scope.newest = None
        del self._streams[stream]
        self._stream_bytes -= stream.bytes
        if scope.shared and not scope.streams:
            self._applications.pop(scope.key, None)
        for track in stream.tracks.values():
            if track.group is not None:
                self._judge(stream, track, track.group, now)

    def _shed_streams(self, now: float) -> None:
        """Over the byte budget: judge the least recently active segments now and forget them."""
        while self._stream_bytes > self._stream_budget and self._streams:
            stream = next(iter(self._streams.values()))
            if not self._requeued(stream):
                self._end_stream(stream, now)

    @staticmethod
    def _soft_boundary(conn: _Scope, ev: StatementDone) -> None:
        """A transaction statement or a pool check-out/reset: the request may go on after it."""
        for stream in conn.streams.values():
            stream.seq += 1  # breaks a strict no-owner run
            stream.boundaries += 1
            stream.busy += ev.done_at - ev.sent_at

    # -- owners and children ----------------------------------------------------------------
    def _observe(self, stream: _Stream, ev: StatementDone, shape: _Shape,
                 conn_group: _Group | None) -> _Group | None:
        """Count `ev` in `stream`; returns the group it joined as a child, if any."""
        stream.seq += 1
        stream.statements += 1
        # Statements completed after this one was sent: its rows came in chunks (Execute with a
        # row limit, PortalSuspended) while the client ran them.
        streamed = ev.sent_at < stream.last_done
        if ev.done_at > stream.last_done:
            stream.last_done = ev.done_at
        if shape.reads == "none":
            if shape.fetches_cursor:
                self._observe_cursor_fetch(stream, ev, shape)
            return None  # reads no relation: nothing a loop could batch
        if shape.declares_cursor:
            self._declare_cursor(stream, ev.fingerprint, shape)
        kind = ev.kind
        group = None
        if ((kind == "select" or (kind == "dml" and self._include_writes))
                and not shape.array_lookup
                and ev.n_params <= self._child_max_params
                and shape.placeholders <= self._child_max_params):
            group = self._observe_child(stream, ev, shape, conn_group)
        if kind == "select":
            self._observe_owner(stream, ev, shape, ev.fingerprint, self._owner_min_rows)
            # A pipelined select completes after statements sent before it, not ahead of
            # statements sent after it: only an unpipelined one can have streamed.
            if streamed and not ev.pipelined and not stream.scope.shared:
                self._adopt_streamed_children(stream, ev)
        stream.busy += ev.done_at - ev.sent_at
        return group

    def _adopt_streamed_children(self, stream: _Stream, ev: StatementDone) -> None:
        """A streamed owner is recorded when its last chunk arrives, after the children run on
        its first chunks: the no-owner groups they formed since it was sent are its loop."""
        owner = stream.owners.get(ev.fingerprint) if stream.owners else None
        if owner is None or owner.exec_id != stream.seq:
            return  # too few rows to own a loop
        for track in stream.tracks.values():
            group = track.group
            if (group is None or group.owner is not None or group.first_sent < ev.sent_at
                    or track.fingerprint == owner.fingerprint):
                continue
            track.owner = owner
            owner.streamed = True
            group.adopt(owner)

    def _observe_owner(self, stream: _Stream, ev: StatementDone, shape: _Shape,
                       fingerprint: str, min_rows: int) -> None:
        """An execution of the owner `fingerprint` (the statement's, or its cursor's DECLARE)."""
        owners = stream.owners
        owner = owners.get(fingerprint) if owners else None
        if owner is None:
            if ev.rows < min_rows:
                return
            if len(owners) >= self._owner_ring:
                owners.popitem(last=False)
            else:
                stream.bytes += OWNER_BYTES
                self._stream_bytes += OWNER_BYTES
            owner = owners[fingerprint] = _Owner(fingerprint, shape)
        elif len(owners) > 1:
            owners.move_to_end(fingerprint)
        owner.shape = shape
        owner.streamed = False  # until its children say otherwise (_adopt_streamed_children)
        owner.exec_id = stream.seq
        owner.rows = ev.rows
        owner.executions += 1
        owner.total_rows += ev.rows
        owner.conn_id = ev.session.conn_id
        owner.done_at = ev.done_at
        stream.owner_seq = stream.seq

    def _declare_cursor(self, stream: _Stream, fingerprint: str, shape: _Shape) -> None:
        cursors = stream.cursors
        if shape.cursor_name in cursors:
            del cursors[shape.cursor_name]
        elif len(cursors) >= MAX_CURSORS_PER_STREAM:
            cursors.popitem(last=False)
        else:
            stream.bytes += CURSOR_BYTES
            self._stream_bytes += CURSOR_BYTES
        cursors[shape.cursor_name] = _Cursor(fingerprint, shape)

    def _observe_cursor_fetch(self, stream: _Stream, ev: StatementDone, shape: _Shape) -> None:
        """A FETCH: the first from a cursor is an execution of the owner its DECLARE stands for
        (one FETCH stands for a cursor declared before the segment); the next ones hand out more
        rows of that execution, so the loop over them is one group however small the chunks."""
        cursor = stream.cursors.get(shape.cursor_name) if stream.cursors else None
        if cursor is None:
            self._declare_cursor(stream, ev.fingerprint, shape)
            cursor = stream.cursors[shape.cursor_name]
        if not cursor.fetched:
            cursor.fetched = True
            # A cursor read row by row is an owner from its first row: its rows add up.
            self._observe_owner(stream, ev, cursor.shape, cursor.fingerprint, 1)
            owner = stream.owners.get(cursor.fingerprint)
            if owner is not None:
                owner.chunked = True
            return
        owner = stream.owners.get(cursor.fingerprint) if stream.owners else None
        if owner is not None:
            owner.rows += ev.rows
            owner.total_rows += ev.rows
            owner.done_at = ev.done_at
            stream.owner_seq = stream.seq

    def _newest_owner(self, stream: _Stream, child_fingerprint: str) -> _Owner | None:
        for owner in reversed(stream.owners.values()):
            if owner.fingerprint != child_fingerprint and (owner.rows >= self._owner_min_rows
                                                           or owner.chunked):
                return owner
        return None

    def _observe_child(self, stream: _Stream, ev: StatementDone, shape: _Shape,
                       conn_group: _Group | None) -> _Group:
        fingerprint = ev.fingerprint
        seq = stream.seq
        tracks = stream.tracks
        track = tracks.get(fingerprint)
        if track is None:
            if len(tracks) >= self._max_tracks:
                _, evicted = tracks.popitem(last=False)
                self._forget(stream, evicted.group)
                if evicted.group is not None:
                    self._judge(stream, evicted, evicted.group, ev.done_at)
            else:
                stream.bytes += TRACK_BYTES
                self._stream_bytes += TRACK_BYTES
            track = tracks[fingerprint] = _Track(fingerprint, shape)
        elif len(tracks) > 1:  # one track (a loop's only child): already the newest
            tracks.move_to_end(fingerprint)

        if track.owner is None and stream.owner_seq > track.last_seq:
            track.owner = self._newest_owner(stream, fingerprint)
        group = track.group
        owner = track.owner
        if (owner is not None and owner.streamed and group is not None and group.owner is owner
                and group.key == owner.exec_id and group.n >= owner.rows):
            # A child for every row of a streamed owner's last execution: the next one belongs
            # to its next execution, which is recorded after its own first children.
            owner = track.owner = None
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
                    and owner_track.group is not None
                    # A loop step of its own owner (see the module docstring), not a request's
                    # top-level query that happened to bind to an earlier page's owner.
                    and owner_track.shape.placeholders
                    and owner_track.group.last_new):
                outer = owner_track.group
                key = outer.key
            else:
                key = owner.exec_id
        # A page walk starts or ends a group of its own: the same fingerprint run per owner row
        # before or after one owner's pages is a loop still.
        if group is None or group.key != key or (group.n and shape.page_walk != group.page_walk):
            if group is not None:
                self._forget(stream, group)
                self._judge(stream, track, group, ev.done_at)
            group = track.group = _Group(key, owner, outer, ev, stream.boundaries)
        if owner is None and stream.scope.shared:
            # Without an owner no child is foreign, so the group never spans connections and is
            # never judged: its executions are only counted (against the byte budget too).
            group.n += 1
        else:
            group.add(ev, stream.boundaries, stream.statements,
                      0.0 if stream.scope.shared else stream.busy)
        if shape.page_walk:
            group.page_walk = True
        stream.bytes += EVENT_BYTES
        self._stream_bytes += EVENT_BYTES
        if owner is not None:
            group.count_owner_executions(owner)
            if (stream.scope.shared and ev.session.conn_id != group.owner_conn
                    and (conn_group is None or conn_group.owner is None
                         or conn_group.owner.fingerprint != owner.fingerprint)):
                group.foreign += 1
        track.last_seq = seq
        return group

    def _forget(self, stream: _Stream, group: _Group | None) -> None:
        """A closed group's executions no longer count against the budget."""
        if group is not None:
            released = group.n * EVENT_BYTES
            stream.bytes -= released
            self._stream_bytes -= released

    # -- judging ----------------------------------------------------------------------------
    def _judge(self, stream: _Stream, track: _Track, group: _Group, now: float) -> None:
        app_group = group.app_group
        try:
            if stream.scope.shared:
                group.verdict = self._judge_group(stream, track, group, now)
                if not group.verdict:
                    # Not one loop over the connections: each connection's part stands alone.
                    for deferred in group.deferred:
                        self._judge_group(*deferred, now)
            elif (app_group is not None and app_group.spans_connections()
                  and (group.owner is None
                       or (group.owner.conn_id == app_group.owner_conn
                           and group.owner_done == app_group.owner_done))):
                # Part of an async fan-out: the application's stream judges the whole first.
                if app_group.verdict is None:
                    app_group.deferred.append((stream, track, group))
                elif not app_group.verdict:
                    self._judge_group(stream, track, group, now)
            else:
                self._judge_group(stream, track, group, now)
        finally:
            # A judged group may still be some open group's `outer`: let go of what it points
            # to, or a chain of nested loops would keep every group (and its text) alive.
            group.outer = None
            group.app_group = None
            group.deferred = []

    def _judge_group(self, stream: _Stream, track: _Track, group: _Group, now: float) -> bool:
        """Report what `group` is, if anything; true when it was reported as an N+1 loop."""
        n = group.n
        if n < self._smallest_reportable:
            return False
        shared = stream.scope.shared
        if shared and not group.spans_connections():
            return False  # on one connection: that connection's stream judges it
        gaps = group.gaps
        think = statistics.median(gaps) if gaps else 0.0  # sorts them: once per judgement
        if gaps:
            if think > self._max_think:
                return False  # a loop doing real work between queries
            if group.crossed > len(gaps) // 2 and (
                    think > self._boundary_max_think
                    or sum(sorted([group.adjacent, *group.between.values()])[-2:])
                    < BOUNDARY_MIN_REGULAR_RATIO * len(gaps)
                    or not self._covers_owner_rows(group)):
                # Requests that each check out a pooled connection, not one loop: a loop checks
                # out quickly, runs the same statements per row in the same order, and runs for
                # most of the owner's rows.
                return False
        if group.pipelined > self._max_pipelined_ratio * n:
            return False  # a batch: executemany or a pipeline
        # Polling: the connection sleeps between repeats of one statement.
        polling = (group.interleaved <= (1.0 - POLL_STEADY_RATIO) * len(gaps)
                   and self._periodic(gaps, think))
        if (group.max_repeat >= self._duplicate_min and not shared and not polling
                and not track.shape.locking):
            self._judge_duplicates(stream, track, group, now)

        distinct = len(group.by_params)
        owner, owner_rows = group.owner, group.owner_rows
        if (owner is not None and group.outer is not None and group.outer.owner is not None
                and n <= group.owner_execs):
            owner, owner_rows = group.outer.owner, group.outer.owner_rows
        if owner is None:
            if shared or distinct < self._no_owner_min_run:
                return False
            confidence = "low"
        else:
            if distinct < self._min_distinct or owner_rows < self._owner_min_rows:
                return False
            confidence = "high" if distinct <= owner_rows else "medium"
            if confidence != "high" and (group.crossed or shared):
                return False  # beyond the owner's rows, across boundaries: unrelated requests
        if polling and confidence != "high":
            return False  # a poller's moving key; a loop over the owner's rows may be steady too
        if distinct < self._min_distinct_ratio * n:
            return False
        if statistics.median(group.rows) >= self._max_median_rows:
            return False  # pagination or chunked reads
        shape = track.shape
        if group.page_walk and (not shape.equality_key or _full_pages(group.rows)):
            return False  # a cursor walk: each page is keyed by the previous one
        if shared and stream.trace is None:
            # Nothing but timing ties these connections together: a fan-out starts as the
            # owner's rows arrive and keeps going without pauses.
            long_gaps = sum(1 for gap in gaps if gap > self._max_think)
            if (group.lead > self._max_think
                    or long_gaps > CROSS_MAX_LONG_GAP_RATIO * len(gaps)
                    or group.dedicated < CROSS_MIN_DEDICATED_RATIO * n
                    or not self._covers_owner_rows(group)):
                return False
        loop_time = group.last_done - group.first_sent
        self._report(stream, "n_plus_one", owner, track, group, n, group.child_time, loop_time,
                     loop_time - group.slowest, max(0.0, loop_time - group.child_time),
                     confidence, now)
        return True

    @staticmethod
    def _covers_owner_rows(group: _Group) -> bool:
        """The children ran for most of the owner's rows, as a loop over them does."""
        if group.owner is None:
            return True
        return group.n >= LOOP_MIN_ROW_COVERAGE * (group.owner_rows / max(1, group.owner_execs))

    def _periodic(self, gaps: list[float], median: float) -> bool:
        """Steady gaps of at least poll_min_interval: a poller sleeping between runs. `median`:
        the gaps' median."""
        if len(gaps) < 4:
            return False
        if median < self._poll_min_interval:
            return False
        tolerance = self._poll_max_jitter * median
        steady = sum(1 for gap in gaps if abs(gap - median) <= tolerance)
        return steady >= POLL_STEADY_RATIO * len(gaps)

    def _judge_duplicates(self, stream: _Stream, track: _Track, group: _Group,
                          now: float) -> None:
        n = repeated = 0
        child_time = waste = 0.0
        first_sent, last_done = group.last_done, group.first_sent
        for same in group.by_params.values():
            count = same.count
            if count >= self._duplicate_min:
                n += count
                repeated += 1
                child_time += same.seconds
                waste += same.seconds * (count - 1) / count
                first_sent = min(first_sent, same.first_sent)
                last_done = max(last_done, same.last_done)
        if group.owner is None and 2 * n < group.n:
            # Without an owner the group is the whole segment: a few chance repeats among many
            # distinct keys (a busy connection serving independent lookups) are not a duplicate.
            return
        # Identical parameter signatures are a fact, not an inference: always high confidence.
        self._report(stream, "duplicate", group.owner, track, group, n, child_time,
                     last_done - first_sent, waste, 0.0, "high", now, repeated)

    def _severity(self, n: int, seconds: float) -> str:
        if seconds >= self._critical_loop or n >= self._critical_n:
            return "critical"
        if seconds >= self._warning_loop or n >= self._warning_n:
            return "warning"
        return "info"

    def _report(self, stream: _Stream, kind: str, owner: _Owner | None, track: _Track,
                group: _Group, n: int, child_time: float, loop_time: float, waste: float,
                app_time: float, confidence: str, now: float, parameter_sets: int = 1) -> None:
        """`parameter_sets`: for a duplicate, how many parameter sets were repeated."""
        session = stream.session
        # A loop costs its wall time; a duplicate costs what its repeats ran (not the span
        # they are spread over).
        severity = self._severity(n, loop_time if kind == "n_plus_one" else waste)
        self._count(kind, track.fingerprint, session.application_name, severity)
        owner_fingerprint = owner.fingerprint if owner is not None else None
        # Per application too: two services running the same loop are two problems, and a
        # roll-up must not credit one service's occurrences to the other's name.
        key = (kind, owner_fingerprint, track.fingerprint, _route(group.tags),
               session.application_name)
        report = self._reports.get(key)
        if report is not None and report.pending is not None:
            pending = report.pending
            loops = pending.iterations
            pending.iterations = loops + 1
            pending.n_total += n
            pending.n_max = max(pending.n_max, n)
            pending.n = round(pending.n_total / pending.iterations)
            pending.child_time_ms = _mean(pending.child_time_ms, loops, child_time * 1000.0)
            pending.loop_time_ms = _mean(pending.loop_time_ms, loops, loop_time * 1000.0)
            pending.waste_ms = _mean(pending.waste_ms, loops, waste * 1000.0)
            pending.app_time_ms = _mean(pending.app_time_ms, loops, app_time * 1000.0)
            pending.waste_total_ms += waste * 1000.0
            pending.connections = max(pending.connections, len(group.conns))
            if _SEVERITY_RANK[severity] > _SEVERITY_RANK[pending.severity]:
                pending.severity = severity
            if _CONFIDENCE_RANK[confidence] > _CONFIDENCE_RANK[pending.confidence]:
                pending.confidence = confidence
            pending.tags = group.tags
            pending.suggestion = _suggestion(kind, pending.stack, owner, track.shape,
                                             pending.n, parameter_sets, _rows_per_loop(group))
            return
        first_seen = _wall_time(session, group.first_sent)
        stack = _stack(group.tags, session.application_name, track.shape,
                       owner.shape if owner is not None else None)
        finding = Finding(
            kind=kind,
            owner_fingerprint=owner_fingerprint,
            owner_sql=owner.shape.text if owner is not None else None,
            child_fingerprint=track.fingerprint,
            child_sql=track.shape.text,
            n=n,
            iterations=1,
            n_max=n,
            n_total=n,
            child_time_ms=child_time * 1000.0,
            loop_time_ms=loop_time * 1000.0,
            waste_ms=waste * 1000.0,
            app_time_ms=app_time * 1000.0,
            waste_total_ms=waste * 1000.0,
            connections=len(group.conns),
            severity=severity,
            confidence=confidence,
            application_name=session.application_name,
            user=session.user,
            database=session.database,
            client_addr=session.client_addr,
            tags=group.tags,
            stack=stack,
            suggestion=_suggestion(kind, stack, owner, track.shape, n, parameter_sets,
                                   _rows_per_loop(group)),
            first_seen=first_seen,
        )
        if report is None:
            while len(self._reports) >= self._max_reports:
                _, oldest = self._reports.popitem(last=False)
                if oldest.pending is not None:
                    self._publish(oldest.pending)
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


# -- statement shapes ---------------------------------------------------------------------------
def _is_pool_reset(sql: str) -> bool:
    if len(sql) > _RESET_TEXT_MAX_CHARS:
        return False
    statements = [" ".join(part.split()).upper() for part in sql.split(";")]
    statements = [statement for statement in statements if statement]
    return bool(statements) and all(s in _POOL_RESET_STATEMENTS for s in statements)


def _reads(normalized: str) -> str:
    """"catalog" (only system catalogs), "none" (no relation at all) or "tables"."""
    relations: list[tuple[str | None, str]] = []
    functions = False
    if len(normalized) <= MAX_PARSED_CHARS:
        try:
            tree = pg.parse_sql_json(normalized)
        except Exception:  # pglast.parser.ParseError, or text the lexer fallback described
            tree = None
        if tree is not None:
            ctes = {json.loads(f'"{name}"') for name in _CTE_NAME.findall(tree)}
            for schema, name in _RANGE_VAR.findall(tree):
                if schema or name not in ctes:
                    relations.append((schema or None, name))
            functions = '"RangeFunction"' in tree
            if not relations:
                return "tables" if functions else "none"
            return "catalog" if all(_is_catalog(*r) for r in relations) else "tables"
    names = [name.replace('"', "").replace(" ", "") for name in _RELATION.findall(normalized)]
    if names and all(_is_catalog(*_split_name(name)) for name in names):
        return "catalog"
    return "tables"


def _split_name(name: str) -> tuple[str | None, str]:
    schema, _, relation = name.rpartition(".")
    return (schema or None), relation


def _is_catalog(schema: str | None, name: str) -> bool:
    if schema is not None:
        return schema.lower() in _CATALOG_SCHEMAS
    return name.lower().startswith("pg_")


def _full_pages(rows: list[int]) -> bool:
    """Every page but one came back with the same number of rows: the page size."""
    page = max(rows)
    return page >= 2 and sum(1 for r in rows if r == page) >= len(rows) - 1


def _mean(mean: float, count: int, value: float) -> float:
    return (mean * count + value) / (count + 1)


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


def _asks(head: str) -> str:
    """The aggregate ("count", "max"...) of one key's rows the statement asks for, "exists" for
    an existence check, else ""."""
    if _GROUP_BY.search(head):
        return ""  # already grouped: one row per group, not one number per key
    aggregate = _AGGREGATE.search(head)
    if aggregate is not None:
        return aggregate.group(1).lower()
    if _EXISTS.search(head):
        return "exists"
    return ""


def _key_column(normalized: str) -> str | None:
    match = _KEY_COLUMN.search(normalized)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).rsplit(".", 1)[-1].strip()


# -- suggestions --------------------------------------------------------------------------------
def _stack_of(text: str) -> str:
    for word in _WORD.findall(text.lower()):
        stack = _STACK_WORDS.get(word)
        if stack is not None:
            return stack
    return ""


def _stack(tags: dict[str, str], application_name: str, child: _Shape,
           owner: _Shape | None) -> str:
    """The client's stack, from what it says about itself first, then from how its SQL looks."""
    framework = tags.get("framework") or tags.get("db_framework")
    if framework and (stack := _stack_of(framework)):
        return stack
    if child.style:
        return child.style
    if owner is not None and owner.style:
        return owner.style
    if "action" in tags and "controller" in tags:
        return "rails"  # marginalia / Rails query log tags carry no framework key
    if stack := _stack_of(application_name):
        return stack
    driver = tags.get("db_driver")
    if driver:
        if driver.lower().startswith(("pg:", "pg ", "node-postgres")) or driver.lower() == "pg":
            return "node"
        return _stack_of(driver)
    return ""


def _rows_per_loop(group: _Group) -> int:
    """The rows each execution of the group's owner returned, on average (0 without one)."""
    return group.owner_rows // group.owner_execs if group.owner_execs else 0


def _suggestion(kind: str, stack: str, owner: _Owner | None, child: _Shape, n: int,
                parameter_sets: int = 1, owner_rows: int = 0) -> str:
    child_table = child.table or "the child table"
    if kind == "duplicate" and parameter_sets <= 1:
        return (f"The same query on {child_table} ran {n} times with identical parameters: run it "
                f"once and reuse the result (move it out of the loop or cache it per request).")
    column = child.key_column or "id"
    owner_table = owner.shape.table if owner is not None else None
    per = f"one per {owner_table} row" if owner_table else "one per key"
    batched = f"SELECT ... FROM {child_table} WHERE {column} = ANY($1)"
    bare_table, bare_column = child_table.replace('"', ""), column.replace('"', "")
    if kind == "duplicate":
        # A few keys each looked up again and again, as a loop over many rows that share them
        # does (each book's author): a many-to-one relationship loaded row by row.
        loop = (f"The same query on {child_table} ran {n} times for only {parameter_sets} "
                f"distinct parameter sets, {per}, each one repeated")
    elif owner_table and n < owner_rows:
        # Rows sharing a key loaded it once (an ORM's identity map): one per distinct key.
        loop = (f"Each loop ran {n} queries on {child_table} for {owner_rows} {owner_table} "
                f"rows, one per distinct key")
    else:
        loop = f"Each loop ran {n} queries on {child_table}, {per}"
    fixes = {
        "sqlalchemy": "eager-load the relationship with SQLAlchemy selectinload() (one IN query "
                      "for all the rows), or joinedload() for a many-to-one; lazy=\"raise\" "
                      "finds the others",
        "django": "load the relationship with Django prefetch_related() (select_related() for a "
                  "foreign key to one row)",
        "rails": "preload the association with Rails includes(:association) (or preload / "
                 "eager_load); strict_loading finds the others",
        "hibernate": "fetch the association with a JPQL JOIN FETCH or an @EntityGraph, or batch "
                     "the lazy loads with @BatchSize / hibernate.default_batch_fetch_size",
        "jdbc": f"fetch them in one query, {batched.replace('$1', '?')} with "
                f"Connection.createArrayOf (with JPA/Hibernate: JOIN FETCH or @BatchSize)",
        "prisma": "load the relation in the parent query with Prisma include: { relation: true } "
                  "instead of a findUnique/findFirst per row",
        "peewee": "load the relation with peewee prefetch(parents, children) (one query per "
                  "level), or select both models over a join, Child.select(Child, Parent)"
                  ".join(Parent)",
        "sequelize": "load the association in the parent findAll with Sequelize include: "
                     "[{ model: ... }]",
        "typeorm": "load the relation in the parent query with TypeORM relations: [...] or "
                   "leftJoinAndSelect",
        "knex": f"fetch them in one query with all the keys, Knex whereIn('{bare_column}', keys) "
                f"or Drizzle inArray({bare_table}.{bare_column}, keys) (Drizzle's relational "
                f"queries load a relation with with: {{ relation: true }})",
        "node": f"batch the per-row lookups with DataLoader, whose batch function runs one "
                f"{batched} with all the keys",
        "gorm": "preload the association with GORM Preload(\"Association\") (one IN query)",
        "go": f"fetch them in one query, {batched} with a slice of all the keys (pgx encodes a "
              f"[]int64 as an array)",
    }
    if child.asks:
        fix = _grouped_fix(child.asks, stack, child_table, column)
    else:
        fix = fixes.get(stack, f"fetch them in one query: {batched} with all the keys (or IN (...))")
    if kind != "duplicate" and not child.asks and owner_table == child.table:
        # The loop reads the owner's own table by key: its rows again, or a self-referencing
        # relationship (a parent row); the wire cannot tell them apart.
        again = _READ_AGAIN.get(stack, "a column loaded lazily, or a refresh of each row")
        return (f"{loop}, on the table the owner query read: if these are its rows again "
                f"({again}), select what the loop needs in that query; if it is a "
                f"self-referencing relationship, {fix}.")
    return f"{loop}: {fix}."


# How a loop comes to read the rows its owner query returned once more, by stack.
_READ_AGAIN: Final = {
    "django": "a field left out by only() or defer(), or refresh_from_db() per row",
    "sqlalchemy": "a column left out by load_only() or deferred(), or session.refresh() per row",
    "rails": "a column left out by select(), or reload per row",
    "hibernate": "a lazy @Basic attribute, or refresh() per row",
}


def _grouped_fix(asks: str, stack: str, table: str, column: str) -> str:
    """The fix for a loop asking one aggregate or one existence check per row: answer it for
    every key at once (loading the rows eagerly to count them would fetch them all)."""
    if asks != "exists":
        argument = "*" if asks == "count" else "..."
        grouped = (f"SELECT {column}, {asks}({argument}) FROM {table} WHERE {column} = ANY($1) "
                   f"GROUP BY {column}")
        fixes = {
            "django": "annotate the parent queryset instead, .annotate(n=Count(\"relation\")) "
                      "(or Sum / Max ...), so the parent query returns the number with each row",
            "sqlalchemy": "add it to the parent query as a correlated scalar subquery "
                          "(select(func.count()).where(...).scalar_subquery()), or a "
                          "column_property, or run one GROUP BY query for all the keys",
            "rails": "use a counter_cache, or one grouped query for all the rows, "
                     "Model.where(key: ids).group(:key).count",
            "peewee": "compute it in the parent query, Parent.select(Parent, "
                      "fn.COUNT(Child.id)).join(Child, JOIN.LEFT_OUTER).group_by(Parent)",
            "typeorm": "count in the parent query with TypeORM's QueryBuilder "
                       "loadRelationCountAndMap(\"parent.childCount\", \"parent.children\")",
            "sequelize": "compute it in the parent findAll, attributes: { include: "
                         "[[sequelize.fn('COUNT', ...), 'n']] } with include and group",
        }
        verb = "answer it"
    else:
        grouped = f"SELECT DISTINCT {column} FROM {table} WHERE {column} = ANY($1)"
        fixes = {
            "django": "annotate the parent queryset instead, "
                      ".annotate(has=Exists(Model.objects.filter(key=OuterRef(\"pk\"))))",
            "sqlalchemy": "add it to the parent query as a correlated EXISTS "
                          "(select(...).where(...).exists()), or run one query for all the keys",
            "rails": "load the keys that have rows in one query, "
                     "Model.where(key: ids).distinct.pluck(:key)",
        }
        verb = "check them"
    generic = f"{verb} for all the keys in one query, {grouped}"
    if stack == "jdbc":
        generic = generic.replace("$1", "?") + " with Connection.createArrayOf"
    return fixes.get(stack, generic)
