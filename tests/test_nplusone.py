"""N+1 detector behaviour from hand-built StatementDone sequences (no network, no database).

The SQL below is what the ORMs send, already normalized: SQLAlchemy's lazy loader puts the
parameter first (`$1::INTEGER = books.author_id`), Django inlines literals (simple protocol, so
`n_params` is 0), psycopg executemany and pipelines mark statements `pipelined`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import pytest

from pgscout.dataplane.events import Session, SessionClosed, SessionsActive, StatementDone
from pgscout.analysis.fingerprint import fingerprint_text
from pgscout.analysis import nplusone
from pgscout.analysis.nplusone import NPlusOneDetector
from pgscout.settings import NPlusOneSettings

AUTHORS = "SELECT authors.id, authors.name FROM authors"
BOOKS = "SELECT books.id, books.title FROM books WHERE $1::INTEGER = books.author_id"
REVIEWS = "SELECT reviews.id, reviews.body FROM reviews WHERE $1::INTEGER = reviews.book_id"
TAGS = "SELECT tags.id, tags.name FROM tags WHERE $1::INTEGER = tags.author_id"
SETTINGS_ROW = "SELECT settings.value FROM settings WHERE settings.id = $1"
USER_BY_ID = "SELECT users.id, users.email FROM users WHERE users.id = $1"
ALL_BOOKS = "SELECT books.id, books.user_id, books.title FROM books"
ORDERS_OF_USER = "SELECT orders.id FROM orders WHERE orders.user_id = $1"
PRODUCT_BY_ID = "SELECT products.id FROM products WHERE products.id = $1"
SESSION_BY_TOKEN = "SELECT sessions.user_id FROM sessions WHERE sessions.token = $1"
UPDATE_BOOK = "UPDATE books SET title = $1 WHERE books.id = $2"
INSERT_BOOK = "INSERT INTO books (author_id, title) VALUES ($1, $2)"
NEXT_JOB = ("SELECT jobs.id FROM jobs WHERE jobs.state = $1 ORDER BY jobs.id LIMIT $2 "
            "FOR UPDATE SKIP LOCKED")
FINISH_JOB = "UPDATE jobs SET state = $1 WHERE jobs.id = $2"
PAGE = "SELECT events.id FROM events WHERE events.id > $1 ORDER BY events.id LIMIT $2"
DJANGO_BOOKS = 'SELECT "books"."id" FROM "books" WHERE "books"."author_id" = $1'


def fingerprint(sql: str) -> str:
    return hashlib.blake2b(sql.encode(), digest_size=8).hexdigest()


def in_list(n: int) -> str:
    return "SELECT books.id FROM books WHERE books.author_id IN (%s)" % ", ".join(
        f"${i}" for i in range(1, n + 1))


class Harness:
    """A detector, the findings it emitted and a monotonic clock that the clients advance."""

    def __init__(self, **overrides) -> None:
        self.now = 1000.0
        self.findings: list[nplusone.Finding] = []
        settings = dataclasses.replace(NPlusOneSettings(), **overrides)
        self.detector = NPlusOneDetector(settings, self.findings.append, clock=lambda: self.now)
        self._conn_ids = itertools.count(1)

    def connection(self, application_name: str = "shop-web", host: str = "10.1.0.1") -> Client:
        return Client(self, next(self._conn_ids), application_name, host)

    def idle(self, seconds: float) -> None:
        self.now += seconds
        self.detector.flush(self.now)

    def of_kind(self, kind: str) -> list[nplusone.Finding]:
        return [f for f in self.findings if f.kind == kind]


class Client:
    """One client connection: `run` completes one statement `think` seconds after the last."""

    def __init__(self, harness: Harness, conn_id: int, application_name: str, host: str) -> None:
        self.harness = harness
        self.session = Session(conn_id, f"{host}:{50000 + conn_id}", user="shop", database="shopdb",
                               application_name=application_name, opened_at=harness.now,
                               opened_wall=1_700_000_000.0, txn_status="I")

    def run(self, sql: str, *params, rows: int = 1, kind: str = "select", took: float = 0.001,
            think: float = 0.0005, pipelined: bool = False, txn: str = "I",
            tags: dict | None = None, inline: bool = False, tag: str | None = None,
            fp: str | None = None) -> None:
        sent = self.harness.now + think
        self.deliver(self.event(sql, *params, sent=sent, done=sent + took, rows=rows, kind=kind,
                                pipelined=pipelined, txn=txn, tags=tags, inline=inline, tag=tag,
                                fp=fp))

    def event(self, sql: str, *params, sent: float, done: float, rows: int = 1,
              kind: str = "select", pipelined: bool = False, txn: str = "I",
              tags: dict | None = None, inline: bool = False, tag: str | None = None,
              fp: str | None = None) -> StatementDone:
        """One completed statement with explicit times (for connections running at once)."""
        if tag is None:
            tag = f"SELECT {rows}" if kind == "select" else "UPDATE 1"
        return StatementDone(
            self.session, sql, 0, not inline, sent, done, tag, rows, None,
            # The fingerprinter hashes the literal-bearing text of a simple query; for Bind it
            # is the decoder's hash of the parameter bytes.
            hash((sql, params)) if inline else hash(params),
            0 if inline else len(params), None, pipelined, txn,
            fingerprint=fp or fingerprint(sql), normalized=sql, kind=kind, tags=dict(tags or {}))

    def deliver(self, ev: StatementDone) -> None:
        self.harness.now = max(self.harness.now, ev.done_at)
        self.session.txn_status = ev.txn_status
        self.harness.detector.on_statement(ev)

    def begin(self, **kw) -> None:
        self.run("BEGIN", kind="txn", tag="BEGIN", txn="T", **kw)

    def commit(self, **kw) -> None:
        self.run("COMMIT", kind="txn", tag="COMMIT", txn="I", **kw)

    def close(self) -> None:
        self.harness.detector.on_session_closed(SessionClosed(self.session, self.harness.now,
                                                              "client"))


def lazy_load(client: Client, parents: int = 10, child: str = BOOKS, child_rows: int = 1,
              **kw) -> None:
    """SQLAlchemy lazy="select": one parent query, then one child query per parent row."""
    client.run(AUTHORS, rows=parents, **kw)
    for author_id in range(parents):
        client.run(child, author_id, rows=child_rows, **kw)


# -- flagged ------------------------------------------------------------------------------------
def test_lazy_loading_loop_is_reported_once_its_segment_ends():
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=10)
    assert h.findings == []
    h.idle(1.5)
    [finding] = h.findings
    assert finding.kind == "n_plus_one"
    assert (finding.owner_fingerprint, finding.owner_sql) == (fingerprint(AUTHORS), AUTHORS)
    assert (finding.child_fingerprint, finding.child_sql) == (fingerprint(BOOKS), BOOKS)
    assert (finding.n, finding.iterations) == (10, 1)
    assert (finding.severity, finding.confidence) == ("info", "high")
    assert (finding.application_name, finding.user, finding.database, finding.client_addr) == (
        "shop-web", "shop", "shopdb", "10.1.0.1:50001")
    assert finding.child_time_ms == pytest.approx(10.0)
    assert finding.loop_time_ms == pytest.approx(10 * 1.0 + 9 * 0.5)
    assert finding.waste_ms == pytest.approx(finding.loop_time_ms - 1.0)
    assert finding.first_seen == pytest.approx(1_700_000_000.0, abs=1.0)
    assert finding.app_time_ms == pytest.approx(9 * 0.5)  # the app's own time between children
    assert (finding.n_max, finding.n_total, finding.connections) == (10, 10, 1)
    assert finding.waste_total_ms == pytest.approx(finding.waste_ms)
    # `$1::INTEGER = books.author_id` is how SQLAlchemy's lazy loader writes it.
    assert finding.stack == "sqlalchemy"
    for words in ("10 queries on books", "one per authors row", "selectinload", "joinedload"):
        assert words in finding.suggestion
    assert json.loads(json.dumps(finding.to_dict()))["child_sql"] == BOOKS


def test_a_child_running_longer_than_the_idle_gap_does_not_split_its_loop():
    """The 6th lookup waits 3 s on a lock: the data plane says each second that the connection
    is waiting on the server, so the flushes meanwhile do not take it for an idle client."""
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=12)
    for author in range(5):
        client.run(BOOKS, author)
    sent = h.now + 0.0005
    for _ in range(3):
        h.now += 1.0
        h.detector.on_sessions_active(SessionsActive(h.now + 2.0, (client.session.conn_id,)))
        h.detector.flush(h.now)
    client.deliver(client.event(BOOKS, 5, sent=sent, done=h.now + 0.1))
    for author in range(6, 12):
        client.run(BOOKS, author)
    h.idle(3.0)  # the idle gap after the last look counted it as waiting
    assert [(f.kind, f.n) for f in h.findings] == [("n_plus_one", 12)]


def test_a_connection_waiting_on_the_server_keeps_its_segment_only_while_it_waits():
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=10)
    # Seen waiting on the server 0.5 s after the last child, counting as such for 2 s more.
    h.detector.on_sessions_active(SessionsActive(h.now + 2.5, (client.session.conn_id,)))
    h.idle(3.4)  # 0.9 s after that
    assert h.findings == []
    h.idle(0.2)
    assert [f.n for f in h.findings] == [10]


def test_loop_inside_a_transaction_is_reported_once_the_connection_goes_idle():
    h = Harness()
    client = h.connection()
    client.begin()
    lazy_load(client, txn="T")
    client.commit()
    assert h.findings == []  # a transaction end is a soft boundary: the request may go on
    h.idle(1.5)
    assert [f.n for f in h.findings] == [10]


def test_django_lazy_loop_with_inline_literals_is_reported():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=8, inline=True)
    for author_id in range(8):
        client.run(DJANGO_BOOKS, author_id, inline=True)
    h.idle(1.5)
    [finding] = h.findings
    assert finding.n == 8
    assert finding.stack == "django"
    assert '"books"' in finding.suggestion and "prefetch_related" in finding.suggestion


@pytest.mark.parametrize("first_relationship_rows", [0, 3])
def test_two_relationships_per_parent_are_two_findings_against_the_parent(first_relationship_rows):
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(BOOKS, author_id, rows=first_relationship_rows)
        client.run(TAGS, author_id, rows=1)
    h.idle(1.5)
    found = {(f.owner_sql, f.child_sql): f for f in h.of_kind("n_plus_one")}
    assert set(found) == {(AUTHORS, BOOKS), (AUTHORS, TAGS)}
    assert all(f.n == 10 and f.confidence == "high" for f in found.values())


@pytest.mark.parametrize("books_per_author", [3, 8])
def test_nested_parent_child_grandchild_reports_both_levels(books_per_author):
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=6)
    book_ids = itertools.count()
    for author_id in range(6):
        client.run(BOOKS, author_id, rows=books_per_author)
        for _ in range(books_per_author):
            client.run(REVIEWS, next(book_ids), rows=2)
    h.idle(1.5)
    found = {(f.owner_sql, f.child_sql): f for f in h.of_kind("n_plus_one")}
    assert set(found) == {(AUTHORS, BOOKS), (BOOKS, REVIEWS)}
    assert found[AUTHORS, BOOKS].n == 6
    assert found[BOOKS, REVIEWS].n == 6 * books_per_author
    assert found[BOOKS, REVIEWS].confidence == "high"


@pytest.mark.parametrize("in_transactions", [True, False])
def test_same_pattern_on_a_pooled_connection_counts_iterations_without_merging(in_transactions):
    h = Harness()
    client = h.connection()
    route = {"route": "/authors"}
    for _ in range(5):
        if in_transactions:
            client.begin(tags=route)
        lazy_load(client, txn="T" if in_transactions else "I", tags=route)
        if in_transactions:
            client.commit(tags=route)
        h.now += 0.05  # back to back: no idle gap between requests
    h.idle(1.5)
    [first] = h.findings
    assert (first.n, first.iterations, first.tags["route"]) == (10, 1, "/authors")
    h.idle(60)
    [first, rollup] = h.findings
    # 10 per request: nothing merged, the loops counted apart.
    assert (rollup.n, rollup.iterations, rollup.n_max, rollup.n_total) == (10, 4, 10, 40)
    assert rollup.loop_time_ms == pytest.approx(first.loop_time_ms)  # per loop, not summed
    assert rollup.waste_total_ms == pytest.approx(4 * rollup.waste_ms)
    assert "Each loop ran 10 queries" in rollup.suggestion
    assert rollup.first_seen == first.first_seen
    assert h.detector.recent()[0]["iterations"] == 4


SHOP_AUTHORS = "SELECT authors.id, authors.name FROM authors WHERE authors.shop_id = $1"
SALES_REPORT = ("SELECT authors.name, count(books.id) AS books FROM authors JOIN books "
                "ON books.author_id = authors.id GROUP BY authors.name")


@pytest.mark.parametrize("parent", [AUTHORS, SHOP_AUTHORS])
@pytest.mark.parametrize("earlier_page", ["eager", "report"])
def test_pooled_requests_after_another_page_are_still_counted_per_request(parent, earlier_page):
    """The demo app's traffic on its one pooled connection: an eager page (the same parent
    query, then one IN loader returning 40 rows) or a report (a multi-row select) first, then
    lazy pages. The lazy page's parent query binds as a child of that earlier owner; it is not a
    loop over it (no parameters, or the same ones each request), so each of its executions still
    opens a new group for the books: 4 loops of 10, not one group of 40 with 10 distinct keys
    (no N+1 at all, and a false duplicate)."""
    h = Harness()
    client = h.connection()
    params = () if parent == AUTHORS else (7,)
    if earlier_page == "eager":
        client.run(parent, *params, rows=10)
        client.run(in_list(10), *range(10), rows=40)
    else:
        client.run(SALES_REPORT, rows=10)
    for _ in range(4):
        h.now += 0.2  # the traffic's pause between requests: no idle gap
        client.run(parent, *params, rows=10)
        for author_id in range(10):
            client.run(BOOKS, author_id, rows=4)  # 4 books each: an owner candidate too
    h.idle(1.5)
    h.idle(60)
    assert h.of_kind("duplicate") == []
    first, rollup = h.findings
    assert (first.owner_sql, first.child_sql) == (parent, BOOKS)
    assert (first.n, first.iterations) == (10, 1)
    assert (rollup.n, rollup.iterations, rollup.n_max) == (10, 3, 10)


def test_lazy_pages_after_a_segment_ended_during_a_slow_report_are_counted_per_request():
    """The once-a-second flush ends a segment whose last statement completed over the idle gap
    ago, although the connection may be running a slow statement (the demo's report sleeps
    0.6 s; a CPU-starved app adds to the gap before it): the next segment then opens with the
    report, the lazy page's parent query binds as its child, and the lazy pages that follow
    must still be loops of their own."""
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=10, child_rows=4)
    last = h.now
    report = client.event(SALES_REPORT, sent=last + 0.45, done=last + 1.05, rows=10)
    h.now = last + 1.02
    h.detector.flush(h.now)  # the tick, while the report runs
    client.deliver(report)
    for _ in range(4):
        h.now += 0.2
        lazy_load(client, parents=10, child_rows=4)
    h.idle(1.5)
    h.idle(60)
    assert h.of_kind("duplicate") == []
    assert sum(f.iterations for f in h.findings) == 5
    assert {f.n for f in h.findings} == {10}


def test_requests_interleaved_on_one_connection_are_separated_by_traceparent():
    h = Harness()
    client = h.connection()
    request_a = {"traceparent": "00-" + "a" * 32 + "-" + "1" * 16 + "-01", "route": "/a"}
    request_b = {"traceparent": "00-" + "b" * 32 + "-" + "2" * 16 + "-01", "route": "/b"}
    client.run(AUTHORS, rows=6, tags=request_a)
    client.run(AUTHORS, rows=7, tags=request_b)
    for author_id in range(7):
        if author_id < 6:
            client.run(BOOKS, author_id, tags=request_a)
        client.run(BOOKS, 100 + author_id, tags=request_b)
    h.idle(1.5)
    found = {f.tags["route"]: f for f in h.findings}
    assert {route: f.n for route, f in found.items()} == {"/a": 6, "/b": 7}
    assert all(f.confidence == "high" for f in found.values())


def test_write_loops_are_reported_only_with_include_writes():
    for include_writes, expected in ((False, 0), (True, 1)):
        h = Harness(include_writes=include_writes)
        client = h.connection()
        client.run(AUTHORS, rows=10)
        for book_id in range(10):
            client.run(UPDATE_BOOK, "t", book_id, kind="dml")
        h.idle(1.5)
        assert len(h.of_kind("n_plus_one")) == expected


# -- not flagged --------------------------------------------------------------------------------
def test_selectinload_and_joinedload_are_not_reported():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    client.run(in_list(10), *range(10), rows=25)  # selectinload: one IN query for all parents
    client.run("SELECT authors.id, books.id FROM authors LEFT OUTER JOIN books "
               "ON authors.id = books.author_id", rows=40)  # joinedload
    h.idle(1.5)
    assert h.findings == []


def test_chunked_in_and_any_loaders_are_not_reported():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=1000)
    any_chunk = "SELECT books.id FROM books WHERE books.author_id = ANY($1)"
    for chunk in range(10):
        client.run(any_chunk, f"chunk-{chunk}", rows=30)  # one array parameter per chunk
    for chunk in range(10):
        client.run(in_list(100), *range(chunk * 100, chunk * 100 + 100), rows=30,
                   fp="in-list-fp")
    h.idle(1.5)
    assert h.findings == []


@pytest.mark.parametrize("include_writes", [False, True])
def test_executemany_is_a_batch_not_a_loop(include_writes):
    h = Harness(include_writes=include_writes)
    client = h.connection()
    client.run(AUTHORS, rows=50)
    # psycopg >= 3.1 and asyncpg send executemany as a pipeline; the last one waits for Sync.
    for author_id in range(50):
        client.run(INSERT_BOOK, author_id, "t", kind="dml", pipelined=author_id < 49, think=0)
    for author_id in range(50):
        client.run(BOOKS, author_id, pipelined=author_id < 49, think=0)
    h.idle(1.5)
    assert h.findings == []


def test_pipelined_lookups_are_not_reported():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(BOOKS, author_id, pipelined=True, think=0)
    h.idle(1.5)
    assert h.findings == []


@pytest.mark.parametrize("with_owner", [False, True])
def test_keyset_pagination_is_not_reported(with_owner):
    h = Harness()
    client = h.connection()
    if with_owner:
        client.run(AUTHORS, rows=10)
    for page in range(20):
        client.run(PAGE, page * 100, 100, rows=100)
    client.run(PAGE, 2000, 100, rows=37)
    h.idle(1.5)
    assert h.findings == []


def test_queue_worker_polling_one_row_at_a_time_is_not_reported():
    h = Harness()
    client = h.connection("worker")
    for job_id in range(40):
        client.begin()
        client.run(NEXT_JOB, "queued", 1, rows=1, txn="T")
        client.run(FINISH_JOB, "done", job_id, kind="dml", txn="T")
        client.commit()
    for _ in range(40):  # autocommit polling of an empty queue
        client.run(NEXT_JOB, "queued", 1, rows=0, think=0.1)
    h.idle(1.5)
    assert h.findings == []


def test_loop_with_200_ms_of_work_between_queries_is_not_reported():
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=10, think=0.2)
    h.idle(1.5)
    assert h.findings == []


@pytest.mark.parametrize("pool_resets", [False, True])
def test_pooled_connection_serving_many_small_unrelated_requests_is_not_reported(pool_resets):
    h = Harness()
    client = h.connection()
    ids = itertools.count()
    for _ in range(300):
        user_id = next(ids)
        client.run(SESSION_BY_TOKEN, f"token-{user_id}")
        client.run(USER_BY_ID, user_id)
        client.run(ORDERS_OF_USER, user_id, rows=3)
        client.run(PRODUCT_BY_ID, next(ids))
        client.run(PRODUCT_BY_ID, next(ids))
        if pool_resets:
            client.run("ROLLBACK", kind="txn", tag="ROLLBACK")  # SQLAlchemy reset on return
        h.now += 0.02
    h.idle(1.5)
    assert h.findings == []


def test_detector_switched_off_reports_nothing():
    h = Harness(enabled=False)
    lazy_load(h.connection())
    h.idle(1.5)
    assert h.findings == []


# -- duplicates ---------------------------------------------------------------------------------
def test_same_query_with_same_parameters_in_a_loop_is_a_duplicate_not_n_plus_one():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(BOOKS, author_id)
        client.run(SETTINGS_ROW, 42)
    h.idle(1.5)
    assert [(f.kind, f.child_sql) for f in h.findings] == [
        ("n_plus_one", BOOKS), ("duplicate", SETTINGS_ROW)]
    duplicate = h.of_kind("duplicate")[0]
    assert (duplicate.n, duplicate.owner_sql, duplicate.confidence) == (10, AUTHORS, "high")
    assert duplicate.waste_ms == pytest.approx(9.0)
    assert "10 times with identical parameters" in duplicate.suggestion


def test_many_to_one_loaded_per_row_is_a_duplicate_that_says_how_few_keys_there_were():
    """Each book's author, looked up per book: 4 authors, each 5 times (Sequelize findByPk in a
    loop, a lazy many-to-one): not an N+1 (too few distinct keys), but the repeats of each."""
    h = Harness()
    client = h.connection()
    client.run(ALL_BOOKS, rows=20)
    for book in range(20):
        client.run(USER_BY_ID, book // 5)
    h.idle(1.5)
    [duplicate] = h.findings
    assert (duplicate.kind, duplicate.n, duplicate.owner_sql) == ("duplicate", 20, ALL_BOOKS)
    assert duplicate.suggestion.startswith(
        "The same query on users ran 20 times for only 4 distinct parameter sets, one per books "
        "row, each one repeated: fetch them in one query: SELECT ... FROM users WHERE id = ANY($1)")
    assert "identical parameters" not in duplicate.suggestion


def test_many_to_one_loaded_once_per_key_says_how_many_rows_the_keys_came_from():
    """SQLAlchemy's identity map loads each book's author once: 8 queries for 40 books. An N+1
    (8 distinct keys, none repeated), but not one query per book row."""
    h = Harness()
    client = h.connection()
    client.run(ALL_BOOKS, rows=40)
    for author in range(8):
        client.run(USER_BY_ID, author)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.kind, finding.n) == ("n_plus_one", 8)
    assert finding.suggestion.startswith(
        "Each loop ran 8 queries on users for 40 books rows, one per distinct key: ")


def test_repeated_identical_query_without_owner_is_a_duplicate():
    h = Harness()
    client = h.connection()
    for _ in range(6):
        client.run(USER_BY_ID, 7)
    client.run(USER_BY_ID, 8)
    client.run(USER_BY_ID, 8)  # twice is below duplicate_min
    h.idle(1.5)
    [duplicate] = h.findings
    assert (duplicate.kind, duplicate.n, duplicate.owner_sql) == ("duplicate", 6, None)


def test_chance_repeats_among_many_independent_lookups_are_not_a_duplicate():
    """A busy connection serving single-row lookups by random key (pgbench -S, an API's
    GET /users/:id): a key drawn three times among hundreds is chance, not a duplicate."""
    h = Harness()
    client = h.connection()
    for user_id in [*range(200), 7, 7]:
        client.run(USER_BY_ID, user_id)
    h.idle(1.5)
    assert h.of_kind("duplicate") == []


# -- no owner visible ---------------------------------------------------------------------------
@pytest.mark.parametrize("run_length, reported", [(9, False), (10, True)])
def test_strict_run_without_owner_needs_ten_distinct_executions(run_length, reported):
    h = Harness()
    client = h.connection()
    for author_id in range(run_length):
        client.run(BOOKS, author_id)
    h.idle(1.5)
    if not reported:
        assert h.findings == []
        return
    [finding] = h.findings
    assert (finding.owner_fingerprint, finding.owner_sql) == (None, None)
    assert (finding.n, finding.confidence) == (10, "low")
    assert "one per key" in finding.suggestion


def test_run_without_owner_broken_by_another_statement_is_not_reported():
    h = Harness()
    client = h.connection()
    for author_id in range(12):
        client.run(BOOKS, author_id)
        if author_id == 5:
            client.run(USER_BY_ID, 1)
    h.idle(1.5)
    assert h.findings == []


# -- severity and confidence --------------------------------------------------------------------
@pytest.mark.parametrize("parents, took, severity", [
    (5, 0.001, "info"),
    (19, 0.001, "info"),
    (20, 0.001, "warning"),
    (5, 0.011, "warning"),  # loop >= 50 ms
    (99, 0.001, "warning"),
    (100, 0.001, "critical"),
    (6, 0.09, "critical"),  # loop >= 500 ms
])
def test_severity_follows_loop_time_and_size(parents, took, severity):
    h = Harness()
    lazy_load(h.connection(), parents=parents, took=took)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.n, finding.severity) == (parents, severity)


def test_more_distinct_children_than_owner_rows_is_medium_confidence():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=3)
    for author_id in range(6):
        client.run(BOOKS, author_id)
    h.idle(1.5)
    [finding] = h.findings
    assert finding.confidence == "medium"


def test_owner_needs_two_rows_and_children_need_five_distinct_parameters():
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=4)
    h.idle(1.5)
    client.run(AUTHORS, rows=1)
    for author_id in range(6):
        client.run(BOOKS, author_id)
    h.idle(1.5)
    assert h.findings == []


def test_mostly_repeated_parameters_are_not_an_n_plus_one():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in (1, 2, 3, 4, 5, 1, 2):  # 5 distinct of 7: ratio 0.71 < 0.8
        client.run(BOOKS, author_id)
    h.idle(1.5)
    assert h.of_kind("n_plus_one") == []


def test_children_with_more_than_eight_bound_values_are_not_tracked():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(in_list(9), *range(author_id, author_id + 9), fp="in9")
    h.idle(1.5)
    assert h.findings == []


# -- segment boundaries -------------------------------------------------------------------------
@pytest.mark.parametrize("gap, reported_n", [(0.8, [6]), (1.2, [])])
def test_idle_gap_over_one_second_ends_the_segment(gap, reported_n):
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(6):
        client.run(BOOKS, author_id, think=gap if author_id == 3 else 0.0005)
    h.idle(1.5)
    assert [f.n for f in h.findings] == reported_n


def test_flush_ends_only_segments_idle_past_the_gap():
    h = Harness()
    lazy_load(h.connection())
    h.idle(0.9)
    assert h.findings == []
    h.idle(0.2)
    assert len(h.findings) == 1


def test_transaction_end_is_a_soft_boundary():
    h = Harness()
    client = h.connection()
    client.begin()
    client.run(AUTHORS, rows=10, txn="T")
    for author_id in range(3):
        client.run(BOOKS, author_id, txn="T")
    client.commit()
    client.begin()
    for author_id in range(3, 6):
        client.run(BOOKS, author_id, txn="T")
    client.commit()
    h.idle(1.5)
    assert [f.n for f in h.findings] == [6]


def test_rollback_to_savepoint_keeps_the_segment():
    h = Harness()
    client = h.connection()
    client.begin()
    client.run(AUTHORS, rows=10, txn="T")
    for author_id in range(3):
        client.run(BOOKS, author_id, txn="T")
    client.run("SAVEPOINT sa_1", kind="txn", tag="SAVEPOINT", txn="T")
    client.run("ROLLBACK TO SAVEPOINT sa_1", kind="txn", tag="ROLLBACK", txn="T")
    for author_id in range(3, 6):
        client.run(BOOKS, author_id, txn="T")
    client.commit()
    h.idle(1.5)
    assert [f.n for f in h.findings] == [6]


def test_failed_transaction_rolled_back_keeps_the_loop():
    h = Harness()
    client = h.connection()
    client.begin()
    client.run(AUTHORS, rows=10, txn="T")
    for author_id in range(6):
        client.run(BOOKS, author_id, txn="E" if author_id == 5 else "T")
    client.run("ROLLBACK", kind="txn", tag="ROLLBACK", txn="I")
    h.idle(1.5)
    assert [f.n for f in h.findings] == [6]


ASYNCPG_RELEASE = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"


@pytest.mark.parametrize("sql, kind, tag", [
    ("SELECT $1", "select", "SELECT 1"),  # pool_pre_ping
    ("", "other", "EMPTY"),  # asyncpg / psycopg_pool check
    ("DISCARD ALL", "utility", "DISCARD ALL"),  # PgBouncer server_reset_query
    ("RESET ALL", "utility", "RESET"),  # asyncpg pool release, statement by statement
    ("deallocate all", "utility", "DEALLOCATE ALL"),
    (ASYNCPG_RELEASE, "select", "RESET"),  # asyncpg pool release as one event
])
def test_pool_checkout_and_reset_statements_between_every_child_keep_the_loop(sql, kind, tag):
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(BOOKS, author_id)
        client.run(sql, kind=kind, tag=tag, pipelined=sql == ASYNCPG_RELEASE)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.n, finding.confidence) == (10, "high")


def test_segment_rolls_over_after_segment_max_events():
    h = Harness(segment_max_events=8)
    lazy_load(h.connection(), parents=10)
    h.idle(1.5)
    assert [f.n for f in h.findings] == [7]  # the owner plus 7 children fill the first segment


def test_closing_the_connection_reports_at_once_and_forgets_it():
    h = Harness()
    client = h.connection()
    lazy_load(client)
    client.close()
    assert len(h.findings) == 1
    assert h.detector._connections == {}
    # The application's stream may still collect children of other connections for a while.
    h.idle(1.5)
    assert h.detector._streams == {} and h.detector._applications == {}


# -- emission, recent(), counts() ---------------------------------------------------------------
def test_rollup_keeps_the_worst_severity_and_a_quiet_key_is_reported_at_once_again():
    h = Harness()
    client = h.connection()
    lazy_load(client, parents=5)
    h.idle(1.5)
    lazy_load(client, parents=120)
    h.idle(1.5)
    lazy_load(client, parents=5)
    h.idle(1.5)
    assert len(h.findings) == 1
    h.idle(60)
    rollup = h.findings[-1]
    assert (rollup.iterations, rollup.n_total, rollup.n_max, rollup.severity) == (
        2, 125, 120, "critical")
    assert rollup.n == 62  # per loop
    h.idle(61)  # a whole interval without occurrences
    lazy_load(client, parents=5)
    h.idle(1.5)
    assert [(f.iterations, f.n_total) for f in h.findings] == [(1, 5), (2, 125), (1, 5)]


def test_recent_is_newest_first_and_keeps_only_keep():
    h = Harness(keep=2)
    client = h.connection()
    for child in (BOOKS, TAGS, REVIEWS):
        lazy_load(client, child=child)
        h.idle(1.5)
    assert [f["child_sql"] for f in h.detector.recent()] == [REVIEWS, TAGS]


def test_counts_every_occurrence_by_kind_child_application_and_severity(monkeypatch):
    monkeypatch.setattr(nplusone, "MAX_COUNTED_LABEL_SETS", 2)
    h = Harness()
    client = h.connection("billing")
    for child in (BOOKS, BOOKS, TAGS, REVIEWS):
        lazy_load(client, child=child)
        h.idle(1.5)
    assert h.detector.counts() == {
        ("n_plus_one", fingerprint(BOOKS), "billing", "info"): 2,
        ("n_plus_one", fingerprint(TAGS), "billing", "info"): 1,
        ("n_plus_one", "other", "billing", "info"): 1,
    }


# -- memory bounds ------------------------------------------------------------------------------
def test_ten_thousand_distinct_children_keep_tracks_within_max_tracks():
    h = Harness(segment_max_events=20_000)  # one segment holds them all
    client = h.connection()
    client.run(AUTHORS, rows=10_000)
    for i in range(10_000):
        client.run(f"SELECT c{i}.id FROM c{i} WHERE c{i}.parent_id = $1", i, think=0)
    streams = list(h.detector._streams.values())
    assert len(streams) == 2  # the connection's and its application's
    assert all(len(stream.tracks) == 256 and len(stream.owners) <= 8 for stream in streams)


def test_many_traced_requests_on_one_connection_keep_streams_bounded():
    h = Harness()
    client = h.connection()
    for request in range(1000):
        trace = {"traceparent": f"00-{request + 1:032x}-{1:016x}-01"}
        client.run(USER_BY_ID, request, tags=trace)
    assert len(h.detector._streams) <= (nplusone.MAX_STREAMS_PER_CONNECTION
                                        + nplusone.MAX_STREAMS_PER_APPLICATION)


# -- pools that check out per query (issue 13, class 1) -----------------------------------------
def test_engine_connect_per_query_with_a_transaction_around_each_child_is_reported():
    """SQLAlchemy `with engine.connect()` per statement: BEGIN, the child, ROLLBACK on return."""
    h = Harness()
    client = h.connection()
    client.begin()
    client.run(AUTHORS, rows=12, txn="T")
    client.run("ROLLBACK", kind="txn", tag="ROLLBACK")
    for author_id in range(12):
        client.begin()
        client.run(BOOKS, author_id, rows=3, txn="T")
        client.run("ROLLBACK", kind="txn", tag="ROLLBACK")
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.n, finding.confidence, finding.owner_sql) == (12, "high", AUTHORS)


def test_soft_boundaries_break_a_run_without_owner():
    """Lookups each in their own check-out, with no owner: independent requests."""
    h = Harness()
    client = h.connection()
    for user_id in range(40):
        client.run(USER_BY_ID, user_id)
        client.run(ASYNCPG_RELEASE, tag="RESET", pipelined=True)
    h.idle(1.5)
    assert h.findings == []


def test_unrelated_requests_after_a_listing_across_boundaries_are_not_reported():
    """A listing of 10 rows, then 30 single-row requests, each in its own transaction: more
    distinct keys than the owner had rows, so not a loop over it."""
    h = Harness()
    client = h.connection()
    client.begin()
    client.run(AUTHORS, rows=10, txn="T")
    client.commit()
    for user_id in range(30):
        client.begin()
        client.run(PRODUCT_BY_ID, user_id, txn="T")
        client.commit()
    h.idle(1.5)
    assert h.findings == []


def test_a_loop_reading_its_owners_table_again_is_told_both_fixes():
    """session.refresh() per row, or a deferred column: the owner's rows read again by key,
    which on the wire looks like a self-referencing many-to-one (a category's parent)."""
    reload = ("SELECT authors.id, authors.name, authors.bio FROM authors "
              "WHERE authors.id = $1::INTEGER")
    h = Harness()
    client = h.connection("shop-web")
    lazy_load(client, parents=10, child=reload)
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")
    assert finding.suggestion.startswith(
        "Each loop ran 10 queries on authors, one per authors row, on the table the owner query "
        "read: if these are its rows again (a column left out by load_only() or deferred(), or "
        "session.refresh() per row), select what the loop needs in that query; if it is a "
        "self-referencing relationship, eager-load the relationship with SQLAlchemy "
        "selectinload()"), finding.suggestion


@pytest.mark.parametrize("chunk", [4, 10])
def test_a_loop_over_a_server_side_cursors_chunks_is_one_loop(chunk):
    """Django's iterator(chunk_size=...), psycopg named cursors: DECLARE, then each FETCH hands
    out a chunk of the owner's rows; the lazy loads over all of them are one loop, the DECLARE's
    query its owner, however small the chunks."""
    declare = ('DECLARE "_django_curs_1_sync_1" NO SCROLL CURSOR WITH HOLD FOR '
               'SELECT "authors"."id", "authors"."name" FROM "authors"')
    fetch = f'FETCH FORWARD {chunk} FROM "_django_curs_1_sync_1"'
    h = Harness()
    client = h.connection("shop-web")
    client.run(declare, kind="utility", tag="DECLARE CURSOR", rows=0, inline=True)
    for first in range(0, 20, chunk):
        rows = min(chunk, 20 - first)
        client.run(fetch, kind="utility", tag=f"FETCH {rows}", rows=rows, inline=True)
        for author_id in range(first, first + rows):
            client.run(DJANGO_BOOKS, author_id, rows=3)
    client.run(fetch, kind="utility", tag="FETCH 0", rows=0, inline=True)
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")
    assert (finding.n, finding.iterations, finding.confidence) == (20, 1, "high")
    assert finding.owner_sql == declare


@pytest.mark.parametrize("after", [0, 2])
def test_the_loop_over_a_streamed_owners_rows_is_one_loop_with_it(after):
    """asyncpg cursors, SQLAlchemy yield_per/stream_scalars over asyncpg: the owner's Executes
    hand out chunks (PortalSuspended) and it is recorded when its last chunk completes, after the
    loads of the first chunks' rows; `after` loads of the last chunk's rows follow it."""
    h = Harness()
    client = h.connection("shop-web")
    owner_sent = h.now = h.now + 0.001
    for author_id in range(20 - after):
        client.run(BOOKS, author_id, rows=3)
    client.deliver(client.event(AUTHORS, sent=owner_sent, done=h.now + 0.0002, rows=20))
    for author_id in range(20 - after, 20):
        client.run(BOOKS, author_id, rows=3)
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")
    assert (finding.n, finding.confidence, finding.owner_sql) == (20, "high", AUTHORS)


def test_two_loops_over_streamed_owners_in_a_row_are_two_loops():
    """asyncpg cursor loops, one after the other: the second owner is recorded after its own
    first children, which come after a child for every row of the first."""
    h = Harness()
    client = h.connection("shop-web")
    for _ in range(2):
        client.begin()
        owner_sent = h.now = h.now + 0.001
        for author_id in range(18):
            client.run(BOOKS, author_id, rows=3, txn="T")
        client.deliver(client.event(AUTHORS, sent=owner_sent, done=h.now + 0.0002, rows=20,
                                    txn="T"))
        for author_id in range(18, 20):
            client.run(BOOKS, author_id, rows=3, txn="T")
        client.commit()
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")  # the first occurrence; the second waits for its roll-up
    assert (finding.n, finding.confidence) == (20, "high")
    assert sum(h.detector.counts().values()) == 2


def test_cursors_with_the_same_chunk_size_are_owners_apart():
    """Two iterator() calls in one request: the FETCHes share a fingerprint (the cursor's name
    is not in it), each loop is its own DECLARE's."""
    h = Harness()
    client = h.connection("shop-web")
    for cursor, owner, child in (("c_a", AUTHORS, BOOKS), ("c_b", "SELECT books.id FROM books",
                                                           REVIEWS)):
        declare = f'DECLARE "{cursor}" NO SCROLL CURSOR WITH HOLD FOR {owner}'
        fetch = f'FETCH FORWARD 10 FROM "{cursor}"'
        client.run(declare, kind="utility", tag="DECLARE CURSOR", rows=0, inline=True)
        for first in (0, 10):
            client.run(fetch, kind="utility", tag="FETCH 10", rows=10, inline=True, fp="fetch-10")
            for key in range(first, first + 10):
                client.run(child, key, rows=2)
        client.run(fetch, kind="utility", tag="FETCH 0", rows=0, inline=True, fp="fetch-10")
    h.idle(1.5)
    assert sorted((f.owner_sql[:16], f.n) for f in h.of_kind("n_plus_one")) == [
        ('DECLARE "c_a" NO', 20), ('DECLARE "c_b" NO', 20)]


def test_a_cursor_read_one_row_at_a_time_owns_its_loop():
    """psycopg's fetchone() on a named cursor, Django's iterator(chunk_size=1)."""
    declare = 'DECLARE "one" CURSOR FOR SELECT authors.id FROM authors'
    h = Harness()
    client = h.connection("shop-web")
    client.run(declare, kind="utility", tag="DECLARE CURSOR", rows=0, inline=True)
    for author_id in range(20):
        client.run('FETCH FORWARD 1 FROM "one"', kind="utility", tag="FETCH 1", inline=True)
        client.run(BOOKS, author_id, rows=3)
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")
    assert (finding.n, finding.confidence, finding.owner_sql) == (20, "high", declare)


# -- keyset pagination, cursor walks (class 2) --------------------------------------------------
KEYSET_PAGE = ("SELECT reviews.id, reviews.body FROM reviews WHERE reviews.id > $1::INTEGER "
               "ORDER BY reviews.id LIMIT $2::INTEGER")
ROW_KEYSET_PAGE = ("SELECT id, created_at FROM events WHERE (created_at, id) < ($1, $2) "
                   "ORDER BY created_at DESC, id DESC LIMIT 25")
OFFSET_PAGE = 'SELECT "events"."id" FROM "events" ORDER BY "events"."id" LIMIT $1 OFFSET $2'
TENANT_PAGE = ("SELECT id FROM events WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3")


@pytest.mark.parametrize("page_sql", [KEYSET_PAGE, ROW_KEYSET_PAGE, OFFSET_PAGE, TENANT_PAGE])
@pytest.mark.parametrize("with_owner", [False, True])
def test_small_keyset_pages_are_not_reported(page_sql, with_owner):
    h = Harness()
    client = h.connection()
    if with_owner:
        client.run(AUTHORS, rows=12)
    for page in range(24):
        client.run(page_sql, "tenant-1", page * 25, 25, rows=25)
    client.run(page_sql, "tenant-1", 600, 25, rows=0)
    h.idle(1.5)
    assert h.findings == []


def test_offset_pages_after_a_first_page_without_offset_are_not_reported():
    """Django's Paginator: page 1 has no OFFSET and shares the later pages' fingerprint, so the
    first page's shape alone does not show a cursor walk."""
    page_one = 'SELECT "events"."id" FROM "events" ORDER BY "events"."id" LIMIT 20'
    fp, first, _ = fingerprint_text(page_one)
    later_fp, later, _ = fingerprint_text(page_one + " OFFSET 20")
    assert later_fp == fp and "OFFSET" in later and "OFFSET" not in first
    h = Harness()
    client = h.connection()
    client.run('SELECT COUNT(*) AS "__count" FROM "events"', inline=True)
    client.run(first, 20, rows=20, inline=True, fp=fp)
    for page in range(1, 13):
        client.run(later, 20, page * 20, rows=20 if page < 12 else 7, inline=True, fp=fp)
    h.idle(1.5)
    assert h.findings == []


@pytest.mark.parametrize("walk_first", [True, False])
def test_a_query_walked_as_pages_and_run_per_owner_row_is_a_loop_there(walk_first):
    """Pages of one author's books (OFFSET), and the first page of each author's books, in
    either order: the page walk is a group of its own."""
    first = "SELECT books.id FROM books WHERE books.author_id = $1 ORDER BY books.id LIMIT $2"
    paged = first + " OFFSET $3"
    h = Harness()
    client = h.connection("shop-web")

    def walk() -> None:
        client.run(first, 7, 2, rows=2, fp="books-page")
        for offset in (2, 4):
            client.run(paged, 7, 2, offset, rows=2, fp="books-page")

    if walk_first:
        walk()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(first, author_id, 2, rows=2, fp="books-page")
    if not walk_first:
        walk()
    h.idle(1.5)
    finding, = h.of_kind("n_plus_one")
    # After the loop, the walk's first page (no OFFSET) is one more lookup like the others.
    assert finding.n == (10 if walk_first else 11)


def test_single_row_cursor_walk_without_owner_is_not_reported():
    h = Harness()
    client = h.connection("worker")
    for last_id in range(30):
        client.run(PAGE, last_id, 1, rows=1)
    h.idle(1.5)
    assert h.findings == []


def test_per_parent_top_n_with_a_range_filter_is_still_a_loop():
    """An equality key per parent plus a range: pages that are not full are a loop's children."""
    recent = ("SELECT books.id FROM books WHERE books.author_id = $1 AND books.year > $2 "
              "ORDER BY books.year DESC LIMIT $3")
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(recent, author_id, 2000, 3, rows=author_id % 4)
    h.idle(1.5)
    assert [f.child_sql for f in h.of_kind("n_plus_one")] == [recent]


# -- polling (class 3) --------------------------------------------------------------------------
COUNT_QUEUED = "SELECT count(*) FROM jobs WHERE jobs.state = $1"


def test_polling_every_30_ms_is_not_a_duplicate():
    h = Harness()
    client = h.connection("poller")
    for _ in range(40):  # 1.2 s of polling
        client.run(COUNT_QUEUED, "queued", think=0.03)
    h.idle(1.5)
    assert h.findings == []


def test_polling_for_new_rows_with_a_moving_key_is_not_a_loop():
    h = Harness()
    client = h.connection("poller")
    client.run(AUTHORS, rows=10)
    for last_seen in range(40):
        client.run("SELECT events.id FROM events WHERE events.id = $1", last_seen, rows=0,
                   think=0.03)
    h.idle(1.5)
    assert h.findings == []


def test_duplicate_severity_comes_from_the_time_the_repeats_took():
    """25 repeats of a 1 ms query spread over 1.2 s of loop: ~24 ms avoidable, a warning by N
    (>= 20) but not critical by the span."""
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=25)
    for author_id in range(25):
        client.run(BOOKS, author_id, think=0.02)
        client.run(SETTINGS_ROW, 42, think=0.02)
    h.idle(1.5)
    [duplicate] = h.of_kind("duplicate")
    assert duplicate.waste_ms == pytest.approx(24.0)
    assert duplicate.severity == "warning"


# -- driver and tool introspection --------------------------------------------------------------
ASYNCPG_TYPEINFO = """WITH RECURSIVE typeinfo_tree(oid, ns, name, kind, basetype, elemtype, depth)
AS (SELECT ti.oid, ti.ns, ti.name, ti.kind, ti.basetype, ti.elemtype, $1
    FROM (SELECT t.oid, ns.nspname AS ns, t.typname AS name, t.typtype AS kind,
                 t.typbasetype AS basetype, t.typelem AS elemtype
          FROM pg_catalog.pg_type AS t
          INNER JOIN pg_catalog.pg_namespace ns ON (ns.oid = t.typnamespace)) AS ti
    WHERE ti.oid = any($2::oid[])
    UNION ALL
    SELECT ti.oid, ti.ns, ti.name, ti.kind, ti.basetype, ti.elemtype, tt.depth + $3
    FROM (SELECT t.oid, ns.nspname AS ns, t.typname AS name, t.typtype AS kind,
                 t.typbasetype AS basetype, t.typelem AS elemtype
          FROM pg_catalog.pg_type AS t
          INNER JOIN pg_catalog.pg_namespace ns ON (ns.oid = t.typnamespace)) ti,
         typeinfo_tree tt
    WHERE ti.oid = tt.elemtype)
SELECT DISTINCT *, basetype::regtype::text AS basetype_name FROM typeinfo_tree ORDER BY depth DESC"""
PSQL_DESCRIBE = """SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.~) $1 COLLATE pg_catalog.default
AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3"""
PSQL_COLUMNS = """SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attnum > $2 AND NOT a.attisdropped
ORDER BY a.attnum"""
TYPE_BY_OID = "SELECT typname, oid, typarray FROM pg_type t WHERE t.oid = $1::regtype"


@pytest.mark.parametrize("include_catalog, reported", [(False, 0), (True, 1)])
def test_catalog_only_statements_are_neither_owners_nor_children(include_catalog, reported):
    h = Harness(include_catalog=include_catalog)
    client = h.connection()
    client.run(ASYNCPG_TYPEINFO, 0, "{23}", 1, rows=12)  # asyncpg's type introspection
    for type_oid in range(12):
        client.run(TYPE_BY_OID, type_oid)  # psycopg's TypeInfo.fetch
    client.run(PSQL_DESCRIBE, "books", rows=6)  # psql \d books
    for relation_oid in range(6):
        client.run(PSQL_COLUMNS, relation_oid, 0, rows=4)
    h.idle(1.5)
    assert len(h.findings) >= reported
    if not include_catalog:
        assert h.findings == []


def test_introspection_between_an_owner_and_its_children_changes_nothing():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    client.run(ASYNCPG_TYPEINFO, 0, "{23}", 1, rows=3)  # a new type seen on the first child
    lazy_children = [(BOOKS, author_id) for author_id in range(10)]
    for sql, author_id in lazy_children:
        client.run(sql, author_id)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.owner_sql, finding.n) == (AUTHORS, 10)


def test_statements_reading_no_relation_are_not_children():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=20)
    for value in range(20):  # a driver test suite's round trips
        client.run("SELECT $1::int4", value)
    h.idle(1.5)
    assert h.findings == []


# -- across connections (class 4) ---------------------------------------------------------------
def gather_over_pool(clients: list[Client], child: str, keys: list, start: float,
                     took: float = 0.001, reset: str | None = ASYNCPG_RELEASE,
                     tags: dict | None = None) -> None:
    """asyncio.gather of one `child` per key over a pool of len(clients) connections: each
    connection runs the next waiting key as soon as it is back in the pool (after its reset).
    Events are delivered in the order they complete, as the bus would."""
    free_at = [start] * len(clients)
    events = []
    for key in keys:
        slot = min(range(len(clients)), key=free_at.__getitem__)
        sent = free_at[slot] + 0.0002
        done = sent + took
        events.append(clients[slot].event(child, key, sent=sent, done=done, rows=2, tags=tags))
        free_at[slot] = done + 0.0004
        if reset is not None:
            events.append(clients[slot].event(reset, sent=done + 0.0001, done=done + 0.0003,
                                              tag="RESET", pipelined=True))
    for ev in sorted(events, key=lambda ev: ev.done_at):
        _deliver(clients, ev)


def _deliver(clients: list[Client], ev: StatementDone) -> None:
    next(c for c in clients if c.session is ev.session).deliver(ev)


@pytest.mark.parametrize("reset", [ASYNCPG_RELEASE, None])
def test_children_gathered_over_a_pool_of_four_are_one_finding(reset):
    h = Harness()
    pool = [h.connection("async-api") for _ in range(4)]
    pool[0].run(AUTHORS, rows=24)
    gather_over_pool(pool, BOOKS, list(range(24)), start=h.now, took=0.002, reset=reset)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.kind, finding.owner_sql, finding.child_sql) == ("n_plus_one", AUTHORS, BOOKS)
    assert (finding.n, finding.connections, finding.confidence) == (24, 4, "high")


def test_gathered_traced_requests_over_one_pool_are_told_apart():
    h = Harness()
    pool = [h.connection("async-api") for _ in range(4)]
    traces = [{"traceparent": f"00-{t:032x}-{1:016x}-01", "route": f"/r{t}"} for t in (1, 2)]
    pool[0].run(AUTHORS, rows=10, tags=traces[0])
    pool[1].run(AUTHORS, rows=10, tags=traces[1])
    gather_over_pool(pool[:2], BOOKS, list(range(10)), start=h.now, tags=traces[0])
    gather_over_pool(pool[2:], BOOKS, list(range(10)), start=h.now - 0.004, tags=traces[1])
    h.idle(1.5)
    assert sorted((f.tags["route"], f.n) for f in h.findings) == [("/r1", 10), ("/r2", 10)]


def test_two_connections_running_the_same_loop_at_once_are_two_loops():
    h = Harness()
    web1, web2 = h.connection("shop-web"), h.connection("shop-web")
    start = h.now
    events = [web1.event(AUTHORS, sent=start, done=start + 0.001, rows=12),
              web2.event(AUTHORS, sent=start + 0.0005, done=start + 0.0015, rows=12)]
    for author_id in range(12):
        for client, offset in ((web1, 0.001), (web2, 0.0015)):
            sent = start + offset + 0.0002 + author_id * 0.0012
            events.append(client.event(BOOKS, author_id, sent=sent, done=sent + 0.001))
    for ev in sorted(events, key=lambda ev: ev.done_at):
        _deliver([web1, web2], ev)
    h.idle(1.5)
    assert h.detector.counts() == {("n_plus_one", fingerprint(BOOKS), "shop-web", "info"): 2}
    assert [f.n for f in h.findings] == [12]


def test_concurrent_unrelated_requests_over_a_pool_are_not_reported():
    """Four connections serve requests arriving at random: listings, single-row lookups."""
    import random
    rng = random.Random(7)
    h = Harness()
    pool = [h.connection("shop-web") for _ in range(4)]
    free_at = [h.now] * 4
    arrival = h.now
    events = []
    for request in range(400):
        arrival += rng.expovariate(1 / 0.008)
        slot = min(range(4), key=free_at.__getitem__)
        sent = max(arrival, free_at[slot])
        statements = ([(AUTHORS, (), 10)] if request % 10 == 0 else
                      [(SESSION_BY_TOKEN, (f"t{request}",), 1), (USER_BY_ID, (request,), 1)]
                      if request % 3 else [(PRODUCT_BY_ID, (rng.randrange(10_000),), 1)])
        for sql, params, rows in statements:
            events.append(pool[slot].event(sql, *params, sent=sent, done=sent + 0.001, rows=rows))
            sent += 0.0015
        events.append(pool[slot].event("ROLLBACK", sent=sent, done=sent + 0.0002, kind="txn",
                                       tag="ROLLBACK"))
        free_at[slot] = sent + 0.0003
    for ev in sorted(events, key=lambda ev: ev.done_at):
        _deliver(pool, ev)
    h.idle(1.5)
    assert h.findings == []


def test_correlation_across_connections_can_be_switched_off():
    h = Harness(correlate_connections=False)
    pool = [h.connection("async-api") for _ in range(4)]
    pool[0].run(AUTHORS, rows=24)
    gather_over_pool(pool, BOOKS, list(range(24)), start=h.now)
    assert h.detector._applications == {}
    h.idle(1.5)
    # The owner's connection sees only a quarter of the loop, across resets: not enough.
    assert h.of_kind("n_plus_one") == []


# -- suggestions for the client's stack ---------------------------------------------------------
@pytest.mark.parametrize("child, application_name, tags, stack, words", [
    (BOOKS, "shop-web", {}, "sqlalchemy", ["selectinload", "joinedload"]),
    (DJANGO_BOOKS, "shop-web", {}, "django", ["prefetch_related", "select_related"]),
    (USER_BY_ID, "shop-web", {"framework": "django:4.2.7"}, "django", ["prefetch_related"]),
    ('SELECT "books".* FROM "books" WHERE "books"."author_id" = $1', "shop-web", {}, "rails",
     ["includes(:association)"]),
    (USER_BY_ID, "shop-web", {"application": "Shop", "controller": "authors", "action": "index"},
     "rails", ["includes("]),
    ("select b1_0.id,b1_0.title from books b1_0 where b1_0.author_id=$1", "PostgreSQL JDBC Driver",
     {}, "hibernate", ["JOIN FETCH", "@BatchSize"]),
    (USER_BY_ID, "PostgreSQL JDBC Driver", {}, "jdbc", ["createArrayOf", "id = ANY(?)"]),
    ('SELECT "public"."Book"."id" FROM "public"."Book" WHERE "public"."Book"."authorId" = $1 '
     'LIMIT $2 OFFSET $3', "shop-web", {}, "prisma", ["include: {"]),
    ('SELECT "id", "title" FROM "Books" AS "Book" WHERE "Book"."authorId" = $1', "shop-web", {},
     "sequelize", ["include: [{"]),
    # Knex, and Drizzle: lower-case keywords, every identifier quoted.
    ('select * from "books" where "author_id" = $1', "shop-web", {}, "knex",
     ["whereIn('author_id', keys)", "inArray(books.author_id, keys)"]),
    ('select "id", "author_id", "title" from "books" where "books"."author_id" = $1', "shop-web",
     {}, "knex", ["whereIn('author_id', keys)"]),
    # Hand-written lower-case SQL names no stack.
    ("select * from books where author_id = $1", "shop-web", {}, "",
     ["SELECT ... FROM books WHERE author_id = ANY($1)"]),
    (USER_BY_ID, "orders-node", {}, "node", ["DataLoader", "id = ANY($1)"]),
    (USER_BY_ID, "shop-web", {"db_driver": "pg:8.11.3"}, "node", ["DataLoader"]),
    ('SELECT * FROM "books" WHERE "books"."author_id" = $1 AND "books"."deleted_at" IS NULL',
     "shop-web", {}, "gorm", ['Preload("Association")']),
    (USER_BY_ID, "billing-go", {}, "go", ["id = ANY($1)", "slice"]),
    (USER_BY_ID, "shop-web", {}, "", ["SELECT ... FROM users WHERE id = ANY($1)", "IN (...)"]),
])
def test_suggestion_names_the_fix_for_the_clients_stack(child, application_name, tags, stack,
                                                        words):
    h = Harness()
    client = h.connection(application_name)
    client.run(AUTHORS, rows=10, tags=tags)
    for key in range(10):
        client.run(child, key, 10, 0, tags=tags) if "OFFSET" in child else client.run(
            child, key, tags=tags)
    h.idle(1.5)
    [finding] = h.findings
    assert finding.stack == stack
    for word in words:
        assert word in finding.suggestion, finding.suggestion


DJANGO_AUTHORS = 'SELECT "authors"."id", "authors"."name" FROM "authors"'


@pytest.mark.parametrize("owner, child, words, not_words", [
    # Django's `author.books.count()` and `.exists()` per row: the parent queryset annotated.
    (DJANGO_AUTHORS, 'SELECT COUNT(*) AS "__count" FROM "books" WHERE "books"."author_id" = $1',
     ['12 queries on "books"', ".annotate(n=Count("], ["prefetch_related"]),
    (DJANGO_AUTHORS, 'SELECT $1 AS "a" FROM "books" WHERE "books"."author_id" = $2 LIMIT $3',
     ["Exists(", "OuterRef"], ["prefetch_related"]),
    # SQLAlchemy's Query.count() wraps the query; a correlated subquery replaces the loop.
    (AUTHORS, "SELECT count(*) AS count_1 FROM (SELECT books.id AS books_id FROM books "
     "WHERE $1::INTEGER = books.author_id) AS anon_1", ["scalar_subquery"], ["selectinload"]),
    # TypeORM's countBy per row.
    ('SELECT "Author"."id" AS "Author_id" FROM "authors" "Author"',
     'SELECT COUNT($2) AS "cnt" FROM "books" "Book" WHERE (("Book"."author_id" = $1))',
     ["loadRelationCountAndMap"], []),
    # Unknown stack: the grouped query, written out.
    (AUTHORS, "SELECT max(orders.total) FROM orders WHERE orders.user_id = $1",
     ["SELECT user_id, max(...) FROM orders WHERE user_id = ANY($1) GROUP BY user_id"], []),
    (AUTHORS, "SELECT EXISTS (SELECT 1 FROM orders WHERE orders.user_id = $1)",
     ["SELECT DISTINCT user_id FROM orders WHERE user_id = ANY($1)"], []),
    # Already grouped: one row per group is a row set like any other.
    (AUTHORS, "SELECT orders.status, count(*) FROM orders WHERE orders.user_id = $1 "
     "GROUP BY orders.status", ["WHERE user_id = ANY($1)", "IN (...)"], ["GROUP BY user_id"]),
])
def test_a_count_or_exists_per_row_is_fixed_by_one_grouped_query_not_eager_loading(
        owner, child, words, not_words):
    h = Harness()
    client = h.connection("shop-web")
    client.run(owner, rows=12)
    for key in range(12):
        client.run(child, key)
    h.idle(1.5)
    [finding] = h.findings
    assert finding.kind == "n_plus_one"
    for word in words:
        assert word in finding.suggestion, finding.suggestion
    for word in not_words:
        assert word not in finding.suggestion, finding.suggestion


# -- memory in bytes ----------------------------------------------------------------------------
def test_3000_distinct_100_kb_statements_keep_the_detector_small():
    """Issue 10: each distinct statement used to be kept whole in the shape table."""
    import gc
    import tracemalloc

    budget = 4 * 1024 * 1024
    h = Harness(max_memory_bytes=budget)
    client = h.connection()
    filler = "x" * 100_000

    def statements():
        for i in range(3000):
            sql = f"SELECT t{i}.id FROM t{i} WHERE t{i}.k = $1 AND t{i}.note <> '{filler}'"
            yield client.event(sql, i, sent=h.now, done=h.now + 0.0001, rows=3)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for ev in statements():
            client.deliver(ev)
            h.now += 0.0005
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert h.detector.retained_bytes() <= budget
    assert retained < 2 * budget, f"{retained / 1e6:.1f} MB retained"
    assert all(len(shape.text) <= 500 for shape in h.detector._shapes.values())


def test_chunked_in_lists_of_a_few_keys_are_batches():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=50)
    for chunk in range(10):
        client.run(in_list(5), *range(chunk * 5, chunk * 5 + 5), rows=12)
    h.idle(1.5)
    assert h.findings == []


def test_in_list_beside_a_per_row_key_is_still_a_child():
    child = ("SELECT books.id FROM books WHERE books.author_id = $1 "
             "AND books.state IN ($2, $3)")
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    for author_id in range(10):
        client.run(child, author_id, "new", "used")
    h.idle(1.5)
    assert [f.child_sql for f in h.findings] == [child]


def test_queue_worker_claiming_rows_after_an_owner_is_not_a_duplicate():
    """A worker that read its configuration (several rows), then claims jobs one at a time."""
    h = Harness()
    client = h.connection("worker")
    client.run("SELECT settings.key, settings.value FROM settings", rows=6)
    for job_id in range(20):
        client.begin()
        client.run(NEXT_JOB, "queued", 1, rows=1, txn="T")
        client.run(FINISH_JOB, "done", job_id, kind="dml", txn="T")
        client.commit()
    h.idle(1.5)
    assert h.findings == []


def test_loop_with_30_ms_of_steady_work_per_row_is_still_a_loop():
    """Under max_think_ms, steady per-row work is no poller: the keys are the owner's rows."""
    h = Harness()
    lazy_load(h.connection(), parents=10, think=0.03)
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.kind, finding.n, finding.confidence) == ("n_plus_one", 10, "high")


def test_check_out_per_row_from_a_fifo_pool_is_one_finding():
    """psycopg_pool hands connections out in turn: a sequential loop with one check-out per
    row runs its children round-robin over the pool, one at a time."""
    h = Harness()
    pool = [h.connection("sync-api") for _ in range(4)]
    pool[0].run(AUTHORS, rows=12)
    for author_id in range(12):
        client = pool[author_id % 4]
        client.run(BOOKS, author_id, think=0.0008)
        client.run("", kind="other", tag="EMPTY", think=0.0001)  # the pool's check on return
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.n, finding.connections, finding.confidence) == (12, 4, "high")


def test_an_in_list_sharing_the_fingerprint_of_a_per_row_lookup_changes_nothing():
    """IN lists of any length share one fingerprint with a single `IN ($1)`: what a statement
    is must come from its own text, not from the first text seen with that fingerprint."""
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=12)
    client.run(in_list(12), *range(12), rows=60, fp="books-by-author")  # selectinload, earlier
    h.idle(1.5)
    client.run(AUTHORS, rows=12)
    for author_id in range(12):
        client.run(in_list(1), author_id, rows=5, fp="books-by-author")
    h.idle(1.5)
    [finding] = h.findings
    assert (finding.n, finding.child_fingerprint) == (12, "books-by-author")


def test_two_relationships_per_parent_with_a_check_out_per_query_are_two_findings():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=10)
    client.run(ASYNCPG_RELEASE, tag="RESET", pipelined=True)
    for author_id in range(10):
        for child in (BOOKS, TAGS):
            client.run(child, author_id)
            client.run(ASYNCPG_RELEASE, tag="RESET", pipelined=True)
    h.idle(1.5)
    assert sorted((f.child_sql, f.n) for f in h.findings) == [(BOOKS, 10), (TAGS, 10)]


def test_nested_loops_with_a_check_out_per_query_report_both_levels():
    h = Harness()
    client = h.connection()
    client.run(AUTHORS, rows=6)
    book_ids = itertools.count()
    for author_id in range(6):
        client.run(BOOKS, author_id, rows=3)
        client.run("DISCARD ALL", kind="utility", tag="DISCARD ALL")
        for _ in range(3):
            client.run(REVIEWS, next(book_ids), rows=2)
            client.run("DISCARD ALL", kind="utility", tag="DISCARD ALL")
    h.idle(1.5)
    found = {(f.owner_sql, f.child_sql): f.n for f in h.of_kind("n_plus_one")}
    assert found == {(AUTHORS, BOOKS): 6, (BOOKS, REVIEWS): 18}



@pytest.mark.parametrize("text, error", [
    ("nplusone:\n  boundary_max_think_ms: 80\n",
     "nplusone.boundary_max_think_ms: must not exceed nplusone.max_think_ms (80 > 50)"),
    ("nplusone:\n  max_memory_bytes: 1000\n", "nplusone.max_memory_bytes: must be at least"),
    ("nplusone:\n  poll_max_jitter_ratio: 2\n",
     "nplusone.poll_max_jitter_ratio: must be between 0 and 1"),
    ("nplusone:\n  include_catalog: maybe\n", "nplusone.include_catalog: expected true or false"),
])
def test_bad_detector_settings_name_the_field(tmp_path, text, error):
    from pgscout.settings import ConfigError, load_settings

    path = tmp_path / "pgscout.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        load_settings(str(path), {})
