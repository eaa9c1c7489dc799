"""Missing index behind an N+1 child query or a slow statement.

Owns: picking the candidates (the child query of every N+1 finding, and every SELECT, UPDATE or
DELETE of at least `min_statement_ms`) whose single table is filtered by equality on columns
(sqlshape.equality_filter); the queue of catalog look-ups they need (`requests()`, answered by
the composition root over the catalog connection with `resolve`), each (database, table,
columns) looked up at most once per CACHE_SECONDS; and the verdict: exactly one such table in
that database, holding every filtered column, with at least `min_table_rows` rows (estimated),
no valid index whose first column is one of them, and a filter selective enough for an index to
serve it (MIN_DISTINCT_VALUES; without statistics, only an N+1 child's key is judged). Then the finding names the table, the
column, the existing indexes and the CREATE INDEX CONCURRENTLY that would serve the filter.
Must not: await anything or talk to the server itself (it only receives look-up results), keep
more than MAX_PENDING look-ups waiting or CACHE_ENTRIES answers, or see raw SQL.
"""

from __future__ import annotations

from collections import OrderedDict

from pgscout.analysis import sqlshape
from pgscout.analysis.bus import StatementObserver
from pgscout.analysis.findings import Findings, application_of, cut
from pgscout.dataplane.events import StatementDone

# An index serves an equality filter when each value matches a small share of the rows: a column
# with fewer distinct values (a status, a flag) is read faster by a scan.
MIN_DISTINCT_VALUES = 20
MAX_PENDING = 64
CACHE_ENTRIES = 1024
CACHE_SECONDS = 300.0

LookupKey = tuple[str, str | None, str, tuple[str, ...]]  # database, schema, table, columns


class _Context:
    __slots__ = ("application", "source", "statement", "duration_ms", "severity")

    def __init__(self, application: dict, source: str, statement: str, duration_ms: float,
                 severity: str) -> None:
        self.application = application
        self.source = source
        self.statement = statement
        self.duration_ms = duration_ms
        self.severity = severity


class MissingIndexes(StatementObserver):
    def __init__(self, findings: Findings, min_statement_ms: float, min_table_rows: int) -> None:
        self._findings = findings
        self.reconfigure(min_statement_ms, min_table_rows)
        self._pending: OrderedDict[LookupKey, _Context] = OrderedDict()
        self._in_flight: dict[LookupKey, _Context] = {}
        self._answers: OrderedDict[LookupKey, tuple[float, list[dict]]] = OrderedDict()

    def reconfigure(self, min_statement_ms: float, min_table_rows: int) -> None:
        self._min_seconds = min_statement_ms / 1000
        self._min_rows = min_table_rows

    def on_statement(self, ev: StatementDone) -> None:
        if ev.duration < self._min_seconds or ev.sqlstate is not None or ev.kind not in ("select", "dml"):
            return
        self._candidate(ev.session.database, ev.fingerprint, ev.normalized,
                        _Context(application_of(ev.session, ev.tags), "slow_statement",
                                 ev.normalized, ev.duration * 1000, "warning"),
                        ev.done_at)

    def on_nplusone(self, finding, now: float) -> None:
        """An N+1 finding (analysis/nplusone.py Finding): its child query is the candidate."""
        application = {"application_name": finding.application_name, "user": finding.user,
                       "database": finding.database}
        self._candidate(finding.database, finding.child_fingerprint, finding.child_sql,
                        _Context(application, "n_plus_one", finding.child_sql,
                                 finding.child_time_ms,
                                 "critical" if finding.severity == "critical" else "warning"),
                        now)

    def _candidate(self, database: str, fingerprint: str, normalized: str, context: _Context,
                   now: float) -> None:
        trees = sqlshape.statements(fingerprint, normalized)
        shape = sqlshape.equality_filter(trees) if trees else None
        if shape is None:
            return
        key = (database, *shape)
        answer = self._answers.get(key)
        if answer is not None and now - answer[0] < CACHE_SECONDS:
            self._judge(key, answer[1], context)
            return
        if key in self._in_flight:
            return
        if key in self._pending or len(self._pending) < MAX_PENDING:
            self._pending[key] = context

    def requests(self) -> list[LookupKey]:
        """The look-ups to run now (each answered once with `resolve`)."""
        keys = list(self._pending)
        self._in_flight.update(self._pending)
        self._pending.clear()
        return keys

    def resolve(self, key: LookupKey, tables: list[dict] | None, now: float) -> None:
        """`tables`: one dict per table of that name in the database (schema, table, rows,
        columns_present, indexed, indexes, distinct_values); None when the look-up failed (tried again later)."""
        context = self._in_flight.pop(key, None)
        if tables is None or context is None:
            return
        self._answers[key] = (now, tables)
        self._answers.move_to_end(key)
        while len(self._answers) > CACHE_ENTRIES:
            self._answers.popitem(last=False)
        self._judge(key, tables, context)

    def _judge(self, key: LookupKey, tables: list[dict], context: _Context) -> None:
        if len(tables) != 1:
            return  # no such table, or one per schema: which one the session meant is unknown
        table = tables[0]
        if not table["columns_present"] or table["indexed"] or table["rows"] < self._min_rows:
            return
        distinct = table["distinct_values"]
        # Without statistics only an N+1 child is judged: a lookup per parent row is by key.
        if (distinct is None and context.source != "n_plus_one") or (
                distinct is not None and distinct < MIN_DISTINCT_VALUES):
            return
        database, _, _, columns = key
        qualified = f"{table['schema']}.{table['table']}"
        evidence = {
            "table": qualified,
            "column": columns[0],
            "filtered_columns": list(columns),
            "rows_estimate": table["rows"],
            "existing_indexes": [cut(index) for index in table["indexes"]],
            "distinct_values": None if distinct is None else round(distinct),
            "source": context.source,
            "statement": cut(context.statement),
            "duration_ms": round(context.duration_ms, 1),
        }
        suggestion = (f"CREATE INDEX CONCURRENTLY ON {qualified} ({columns[0]}); no index leads "
                      f"with {columns[0]}, so every lookup by it scans the table"
                      + (" (a foreign key column is not indexed by the constraint itself)"
                         if context.source == "n_plus_one" else ""))
        self._findings.record("missing_index", f"{database}/{qualified}/{columns[0]}",
                              context.severity, context.application, evidence, suggestion)
