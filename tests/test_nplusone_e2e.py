"""N+1 detection end to end: real ORMs and drivers, through a real pgscout, against real PostgreSQL.

Owns: every scenario of the NPLUSONE.md design note, driven the way applications produce it
(SQLAlchemy 2 ORM on psycopg 3 and on asyncpg, psycopg 3 and asyncpg directly), and the verdict
a user reads: `/api/nplusone`, the `n_plus_one` log lines and the `pgscout_nplusone_findings`
counter, each filtered by the test's own application_name.
Must not: look inside the proxy process (only its API, metrics and logs), or depend on another
test's traffic (each test has its own application_name; the schema comes from tests/orm_models).

Findings are emitted when a request segment is evaluated: at transaction end, pool reset or
connection close. Every test ends its requests and closes its connections, then waits until
/api/connections shows none of its sessions left, so that every segment has been judged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, orm
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from orm_models import (AUTHORS, BOOKS, BOOKS_PER_AUTHOR, JOBS, REVIEWS, Author, Book, Job,
                        Review, create_bookshop, reset_jobs)
from pgharness import APP_DATABASE, run_client, wait_until
from pgscout.analysis.fingerprint import fingerprint_text

# What SQLAlchemy's loaders send, written by hand: a finding must name exactly these shapes.
AUTHORS_SQL = "SELECT np_authors.id, np_authors.name FROM np_authors ORDER BY np_authors.id"
BOOKS_OF_AUTHOR_SQL = ("SELECT np_books.id, np_books.author_id, np_books.title FROM np_books "
                       "WHERE $1 = np_books.author_id ORDER BY np_books.id")
PROFILE_OF_AUTHOR_SQL = ("SELECT np_profiles.id, np_profiles.author_id, np_profiles.bio "
                         "FROM np_profiles WHERE $1 = np_profiles.author_id")
REVIEWS_OF_BOOK_SQL = ("SELECT np_reviews.id, np_reviews.book_id, np_reviews.stars, "
                       "np_reviews.body FROM np_reviews WHERE $1 = np_reviews.book_id "
                       "ORDER BY np_reviews.id")
# The same shapes as a hand-written application would send them.
RAW_AUTHORS_SQL = "SELECT id, name FROM np_authors ORDER BY id"
RAW_BOOKS_SQL = "SELECT id, title FROM np_books WHERE author_id = $1 ORDER BY id"


def fingerprint(sql: str) -> str:
    return fingerprint_text(sql)[0]


@pytest.fixture(scope="module")
def bookshop(pg):
    create_bookshop(sqlalchemy_url(pg.dsn("trust_user", APP_DATABASE)))


@pytest.fixture
def app_name(request):
    """A fresh application_name per test: every reading below is filtered by it."""
    return f"np-{request.node.name[5:40]}-{uuid.uuid4().hex[:6]}"


def sqlalchemy_url(dsn: str, driver: str = "psycopg") -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def proxy_dsn(proxy, app: str, **params) -> str:
    return proxy.dsn("trust_user", APP_DATABASE, application_name=app, **params)


def orm_engine(proxy, app: str, **kwargs) -> sa.Engine:
    return sa.create_engine(sqlalchemy_url(proxy_dsn(proxy, app)), **kwargs)


def async_orm_engine(proxy, app: str, **kwargs):
    # SQLAlchemy's asyncpg dialect takes neither libpq parameters nor server settings in the URL.
    url = proxy.dsn("trust_user", APP_DATABASE, sslmode=None, connect_timeout=None)
    return create_async_engine(sqlalchemy_url(url, "asyncpg"),
                               connect_args={"server_settings": {"application_name": app}},
                               **kwargs)


def api(proxy, path: str) -> dict:
    status, body = proxy.admin_get(path)
    assert status == 200, body
    return json.loads(body)


def sessions_of(proxy, app: str) -> int:
    return sum(row["count"] for row in api(proxy, "/api/connections")["live"]
               if row["application"] == app)


def findings(proxy, app: str, kind: str | None = None) -> list[dict]:
    """The findings for `app` once all of its sessions are closed (so every segment was judged)."""
    assert wait_until(lambda: sessions_of(proxy, app) == 0, timeout=10), \
        f"sessions of {app} still open"
    return [finding for finding in api(proxy, "/api/nplusone")["findings"]
            if finding["application_name"] == app and (kind is None or finding["kind"] == kind)]


def logged_findings(proxy, app: str) -> list[dict]:
    return [line for line in proxy.logs()
            if line.get("event") == "n_plus_one" and line.get("application_name") == app]


def counted_findings(proxy, app: str) -> dict[str, float]:
    """pgscout_nplusone_findings for `app`, summed by kind, once all of its sessions are closed
    (a client's close ends its session when the server has closed its end too)."""
    assert wait_until(lambda: sessions_of(proxy, app) == 0, timeout=10), \
        f"sessions of {app} still open"
    status, text = proxy.admin_get("/metrics")
    assert status == 200
    by_kind: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "pgscout_nplusone_findings":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["application"] == app:
                kind = sample.labels["finding"]
                by_kind[kind] = by_kind.get(kind, 0) + sample.value
    return by_kind


def only(items: list[dict]) -> dict:
    assert len(items) == 1, json.dumps(items, indent=1)
    return items[0]


def by_child(items: list[dict]) -> dict[str, dict]:
    assert len({item["child_fingerprint"] for item in items}) == len(items), json.dumps(items, indent=1)
    return {item["child_fingerprint"]: item for item in items}


def assert_loop(finding: dict, owner_sql: str, child_sql: str, n: int,
                fix: str = "selectinload") -> None:
    assert finding["kind"] == "n_plus_one"
    assert finding["owner_fingerprint"] == fingerprint(owner_sql), finding["owner_sql"]
    assert finding["child_fingerprint"] == fingerprint(child_sql), finding["child_sql"]
    # The SQL shown is the normalized shape of what ran: it fingerprints back to the same query.
    assert fingerprint(finding["owner_sql"]) == finding["owner_fingerprint"]
    assert fingerprint(finding["child_sql"]) == finding["child_fingerprint"]
    assert finding["n"] == n
    assert finding["user"] == "trust_user" and finding["database"] == APP_DATABASE
    assert fix in finding["suggestion"], finding["suggestion"]


def assert_not_flagged(proxy, app: str, *statements: str) -> None:
    """No finding for `app`, although pgscout saw each of `statements` from it."""
    assert findings(proxy, app) == [], json.dumps(findings(proxy, app), indent=1)
    assert logged_findings(proxy, app) == []
    seen = {entry["fingerprint"]: entry
            for entry in api(proxy, "/api/fingerprints?sort=calls&limit=1000")["fingerprints"]}
    for sql in statements:
        entry = seen.get(fingerprint(sql))
        assert entry is not None and app in entry["applications"], f"pgscout never saw {sql!r}"


# -- must flag --------------------------------------------------------------------------------

@pytest.mark.parametrize("binding", ["server", "client"])
def test_lazy_loading_in_a_loop_is_flagged(pgscout, bookshop, app_name, binding):
    """Client-side binding (psycopg's ClientCursor, as Django uses) inlines the ids as literals."""
    cursor_factory = psycopg.ClientCursor if binding == "client" else psycopg.Cursor
    engine = orm_engine(pgscout, app_name, connect_args={"cursor_factory": cursor_factory})
    cursor_types = set()
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, *rest: cursor_types.add(type(cursor)))
    with orm.Session(engine) as session:
        for author in session.scalars(sa.select(Author).order_by(Author.id)):
            assert len(author.books) == BOOKS_PER_AUTHOR
        session.commit()
    engine.dispose()
    assert cursor_types == {cursor_factory}

    finding = only(findings(pgscout, app_name))
    assert_loop(finding, AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, n=AUTHORS)
    assert finding["confidence"] == "high"
    assert finding["iterations"] == 1
    assert "np_books" in finding["suggestion"]
    logged = only(logged_findings(pgscout, app_name))
    assert logged["child_fingerprint"] == finding["child_fingerprint"]
    assert logged["level"] == "warning"
    assert counted_findings(pgscout, app_name) == {"n_plus_one": 1}


def test_two_relationships_per_parent_are_two_findings(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        for author in session.scalars(sa.select(Author).order_by(Author.id)):
            assert author.books and author.profile.bio
        session.commit()
    engine.dispose()

    found = by_child(findings(pgscout, app_name))
    assert set(found) == {fingerprint(BOOKS_OF_AUTHOR_SQL), fingerprint(PROFILE_OF_AUTHOR_SQL)}
    assert_loop(found[fingerprint(BOOKS_OF_AUTHOR_SQL)], AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, AUTHORS)
    assert_loop(found[fingerprint(PROFILE_OF_AUTHOR_SQL)], AUTHORS_SQL, PROFILE_OF_AUTHOR_SQL, AUTHORS)


def test_nested_authors_books_reviews_flags_both_levels(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        for author in session.scalars(sa.select(Author).order_by(Author.id)):
            for book in author.books:
                assert len(book.reviews) > 0
        session.commit()
    engine.dispose()

    found = by_child(findings(pgscout, app_name, kind="n_plus_one"))
    assert set(found) == {fingerprint(BOOKS_OF_AUTHOR_SQL), fingerprint(REVIEWS_OF_BOOK_SQL)}
    assert_loop(found[fingerprint(BOOKS_OF_AUTHOR_SQL)], AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, AUTHORS)
    # The review loop runs inside the book loop: one finding for the whole request, owned by
    # the book query, although each book query returned only a few rows.
    assert_loop(found[fingerprint(REVIEWS_OF_BOOK_SQL)], BOOKS_OF_AUTHOR_SQL, REVIEWS_OF_BOOK_SQL, BOOKS)
    assert counted_findings(pgscout, app_name) == {"n_plus_one": 2}


def test_same_pattern_across_pooled_requests_is_counted_per_request(start_pgscout, bookshop, app_name):
    proxy = start_pgscout(env={"PGSCOUT_NPLUSONE_REPORT_INTERVAL_SECONDS": "1"})
    requests = 4
    engine = orm_engine(proxy, app_name, pool_size=1, max_overflow=0)
    backends = set()
    for _ in range(requests):
        with orm.Session(engine) as session:
            backends.add(session.connection().connection.dbapi_connection.info.backend_pid)
            for author in session.scalars(sa.select(Author).order_by(Author.id)):
                assert author.books
            session.commit()
    assert len(backends) == 1, "the pool was meant to reuse one connection"
    engine.dispose()

    assert counted_findings(proxy, app_name) == {"n_plus_one": requests}
    # The first request is reported at once, the others in the next roll-up.
    assert wait_until(lambda: len(findings(proxy, app_name)) == 2, timeout=5)
    rollup, first = findings(proxy, app_name)
    assert first["iterations"] == 1 and first["n"] == AUTHORS
    # Per loop N and the number of loops, apart.
    assert (rollup["iterations"], rollup["n"], rollup["n_max"]) == (requests - 1, AUTHORS, AUTHORS)
    assert rollup["n_total"] == AUTHORS * (requests - 1)
    assert rollup["child_fingerprint"] == first["child_fingerprint"] == fingerprint(BOOKS_OF_AUTHOR_SQL)


@pytest.mark.parametrize("first_page", ["eager", "report"])
def test_lazy_pages_after_other_pages_on_one_pooled_connection_are_each_flagged(
        start_pgscout, bookshop, app_name, first_page):
    """deploy/demo-app's traffic, back to back on one pooled connection (pool_pre_ping, a
    Session per request closed without commit): the page that opens the segment is not the lazy
    one. The lazy page's parent query then binds as a child of that page's multi-row select; it
    used to make the books loops of all later lazy pages one group (no N+1, a false duplicate)
    until the segment ended, which in the demo stack is up to a minute away."""
    proxy = start_pgscout(env={"PGSCOUT_NPLUSONE_REPORT_INTERVAL_SECONDS": "1"})
    engine = orm_engine(proxy, app_name, pool_size=1, max_overflow=0, pool_pre_ping=True)
    backends = set()

    def lazy() -> None:
        with orm.Session(engine) as session:
            backends.add(session.connection().connection.dbapi_connection.info.backend_pid)
            assert sum(len(author.books) for author in session.scalars(
                sa.select(Author).order_by(Author.id))) == BOOKS

    def eager() -> None:
        with orm.Session(engine) as session:
            authors = session.scalars(sa.select(Author).order_by(Author.id).options(
                orm.selectinload(Author.books))).all()
            assert sum(len(author.books) for author in authors) == BOOKS

    def report() -> None:
        with engine.connect() as connection:
            assert len(connection.execute(sa.text(
                "SELECT author_id, count(*) FROM np_books GROUP BY author_id ORDER BY author_id"
            )).all()) == AUTHORS

    pages = [eager if first_page == "eager" else report,
             lazy, lazy, eager, lazy, report, lazy]
    for page in pages:
        page()
        time.sleep(0.1)  # the demo's traffic pauses 0.1-0.5 s: less than the idle gap
    assert len(backends) == 1, "the pool was meant to reuse one connection"
    engine.dispose()

    lazy_pages = pages.count(lazy)
    assert counted_findings(proxy, app_name) == {"n_plus_one": lazy_pages}
    assert wait_until(lambda: len(findings(proxy, app_name)) == 2, timeout=5)
    rollup, first = findings(proxy, app_name)
    assert_loop(first, AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, n=AUTHORS)
    assert (rollup["iterations"], rollup["n"], rollup["n_max"]) == (lazy_pages - 1, AUTHORS, AUTHORS)


def test_interleaved_requests_are_separated_by_traceparent(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name, pool_size=1, max_overflow=0)
    traces = {"a": uuid.uuid4().hex, "b": uuid.uuid4().hex}
    current = {"trace": None}

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def add_traceparent(conn, cursor, statement, parameters, context, executemany):
        trace = current["trace"]
        if trace is None:
            return statement, parameters
        span = uuid.uuid4().hex[:16]
        return f"{statement} /*traceparent='00-{trace}-{span}-01'*/", parameters

    with engine.connect() as connection:
        request_a, request_b = orm.Session(connection), orm.Session(connection)

        def as_request(name, work):
            current["trace"] = traces[name]
            try:
                return work()
            finally:
                current["trace"] = None

        load_authors = sa.select(Author).order_by(Author.id)
        authors_a = as_request("a", lambda: request_a.scalars(load_authors).all())
        authors_b = as_request("b", lambda: request_b.scalars(load_authors).all())
        # Both requests walk the same authors on the one connection, statement by statement:
        # without the trace ids every book query would run twice in one stream.
        for author_a, author_b in zip(authors_a, authors_b):
            as_request("a", lambda: author_a.books)
            as_request("b", lambda: author_b.books)
        connection.commit()
    engine.dispose()

    assert counted_findings(pgscout, app_name) == {"n_plus_one": 2}
    finding = only(findings(pgscout, app_name))  # the second request waits for the roll-up
    assert_loop(finding, AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, n=AUTHORS)
    assert finding["tags"]["traceparent"].split("-")[1] in traces.values()


def test_same_loop_in_two_applications_is_reported_for_each(pgscout, bookshop, app_name):
    applications = [f"{app_name}-web", f"{app_name}-worker"]
    for application in applications:
        engine = orm_engine(pgscout, application)
        with orm.Session(engine) as session:
            for author in session.scalars(sa.select(Author).order_by(Author.id)):
                assert author.profile
            session.commit()
        engine.dispose()

    for application in applications:
        assert_loop(only(findings(pgscout, application)), AUTHORS_SQL, PROFILE_OF_AUTHOR_SQL, AUTHORS)


async def test_async_lazy_loading_with_asyncpg_is_flagged(pgscout, bookshop, app_name):
    engine = async_orm_engine(pgscout, app_name)
    async with AsyncSession(engine) as session:
        for author in (await session.scalars(sa.select(Author).order_by(Author.id))).all():
            assert len(await author.awaitable_attrs.books) == BOOKS_PER_AUTHOR
        await session.commit()
    await engine.dispose()

    assert_loop(only(findings(pgscout, app_name)), AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, n=AUTHORS)


async def test_asyncpg_loop_is_flagged(pgscout, bookshop, app_name):
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        for author in await connection.fetch(RAW_AUTHORS_SQL):
            await connection.fetch(RAW_BOOKS_SQL, author["id"])
    finally:
        await connection.close()

    assert_loop(only(findings(pgscout, app_name)), RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS,
                fix="author_id = ANY($1)")


@pytest.mark.parametrize("prefetch", [4, 5])
async def test_a_loop_over_an_asyncpg_cursor_is_one_loop(pgscout, bookshop, app_name, prefetch):
    """A cursor reads its rows in chunks (Execute with a row limit, PortalSuspended), so the
    owner completes after the loop's first loads; 12 rows in chunks of 4 or 5 end on a full or a
    short chunk."""
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        async with connection.transaction():
            async for author in connection.cursor(RAW_AUTHORS_SQL, prefetch=prefetch):
                await connection.fetch(RAW_BOOKS_SQL, author["id"])
    finally:
        await connection.close()

    finding = only(findings(pgscout, app_name))
    assert_loop(finding, RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS, fix="author_id = ANY($1)")
    assert finding["confidence"] == "high"


async def test_asyncpg_loop_with_literals_in_the_text_is_flagged(pgscout, bookshop, app_name):
    """asyncpg prepares every statement, so an id formatted into the text is an extended-protocol
    statement with nothing bound: each lookup is told apart by its text, not by its (empty) Bind."""
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        for author in await connection.fetch(RAW_AUTHORS_SQL):
            await connection.fetch(
                f"SELECT id, title FROM np_books WHERE author_id = {author['id']} ORDER BY id")
    finally:
        await connection.close()

    finding = only(findings(pgscout, app_name))
    assert finding["kind"] == "n_plus_one", finding
    assert finding["n"] == AUTHORS
    assert finding["child_fingerprint"] == fingerprint(
        "SELECT id, title FROM np_books WHERE author_id = 1 ORDER BY id")


@pytest.mark.parametrize("binding", ["server", "client"])
def test_psycopg_loop_is_flagged(pgscout, bookshop, app_name, binding):
    cursor_factory = psycopg.ClientCursor if binding == "client" else psycopg.Cursor
    with psycopg.connect(proxy_dsn(pgscout, app_name), cursor_factory=cursor_factory) as connection:
        cursor = connection.cursor()
        for (author_id, _) in cursor.execute(RAW_AUTHORS_SQL).fetchall():
            cursor.execute("SELECT id, title FROM np_books WHERE author_id = %s ORDER BY id",
                           (author_id,)).fetchall()

    assert_loop(only(findings(pgscout, app_name)), RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS,
                fix="author_id = ANY($1)")


def test_a_loop_whose_child_waits_longer_than_the_idle_gap_is_one_loop(pgscout, bookshop, app_name):
    """The 6th lookup runs 2.5 s (a lock wait, a cold cache): the segment is not ended under it
    by the once-a-second flush, which would report 5 children and lose the other 7."""
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        authors = connection.execute(RAW_AUTHORS_SQL).fetchall()
        for index, (author_id, _) in enumerate(authors):
            connection.execute(
                "SELECT id, title FROM np_books WHERE author_id = %s AND pg_sleep(%s) IS NOT NULL",
                (author_id, 2.5 if index == 5 else 0.0)).fetchall()

    [finding] = findings(pgscout, app_name)
    assert (finding["kind"], finding["n"]) == ("n_plus_one", AUTHORS)


# -- duplicates -------------------------------------------------------------------------------

def test_same_query_with_same_parameters_is_a_duplicate_not_n_plus_one(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        authors = session.scalars(sa.select(Author).order_by(Author.id)).all()
        for _ in authors:
            # A per-row lookup of the same thing, bypassing the identity map as a raw query does.
            session.execute(sa.select(Book).where(Book.author_id == authors[0].id)).all()
        session.commit()
    engine.dispose()

    duplicate = only(findings(pgscout, app_name))
    assert duplicate["kind"] == "duplicate"
    assert duplicate["child_sql"].startswith("SELECT np_books.id")
    assert duplicate["n"] == AUTHORS
    assert "identical parameters" in duplicate["suggestion"]
    assert counted_findings(pgscout, app_name) == {"duplicate": 1}


# -- must not flag ----------------------------------------------------------------------------

@pytest.mark.parametrize("loader", [orm.selectinload, orm.joinedload])
def test_eager_loading_is_not_flagged(pgscout, bookshop, app_name, loader):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        query = sa.select(Author).order_by(Author.id).options(
            loader(Author.books).options(loader(Book.reviews)), loader(Author.profile))
        authors = session.scalars(query).unique().all()
        assert sum(len(book.reviews) for author in authors for book in author.books) == REVIEWS
        session.commit()
    engine.dispose()

    assert_not_flagged(pgscout, app_name)


async def test_selectinload_with_asyncpg_is_not_flagged(pgscout, bookshop, app_name):
    engine = async_orm_engine(pgscout, app_name)
    async with AsyncSession(engine) as session:
        query = sa.select(Author).order_by(Author.id).options(
            orm.selectinload(Author.books).selectinload(Book.reviews))
        authors = (await session.scalars(query)).all()
        assert sum(len(author.books) for author in authors) == BOOKS
        await session.commit()
    await engine.dispose()

    assert_not_flagged(pgscout, app_name, AUTHORS_SQL)


def test_chunked_any_loader_is_not_flagged(pgscout, bookshop, app_name):
    chunk_sql = "SELECT id, body FROM np_reviews WHERE id = ANY($1) AND stars = 5"
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM np_reviews ORDER BY id")]
        for start in range(0, len(ids), 100):
            rows = connection.execute(chunk_sql.replace("$1", "%s"), (ids[start:start + 100],)).fetchall()
            assert 0 < len(rows) < 100

    assert_not_flagged(pgscout, app_name, chunk_sql)


def test_psycopg_executemany_is_not_flagged(pgscout, bookshop, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        cursor = connection.cursor()
        author_ids = [row[0] for row in cursor.execute(RAW_AUTHORS_SQL)]
        cursor.executemany("SELECT id, title FROM np_books WHERE author_id = %s ORDER BY id",
                           [(author_id,) for author_id in author_ids], returning=True)

    assert_not_flagged(pgscout, app_name, RAW_BOOKS_SQL)


async def test_asyncpg_executemany_is_not_flagged(pgscout, bookshop, app_name):
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        authors = await connection.fetch(RAW_AUTHORS_SQL)
        await connection.executemany("UPDATE np_books SET title = title WHERE author_id = $1",
                                     [(author["id"],) for author in authors])
        await connection.executemany("SELECT id, title FROM np_books WHERE author_id = $1",
                                     [(author["id"],) for author in authors])
    finally:
        await connection.close()

    assert_not_flagged(pgscout, app_name, "SELECT id, title FROM np_books WHERE author_id = $1")


def test_psycopg_pipeline_is_not_flagged(pgscout, bookshop, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        author_ids = [row[0] for row in connection.execute(RAW_AUTHORS_SQL)]
        with connection.pipeline():
            cursors = [connection.execute(
                "SELECT id, title FROM np_books WHERE author_id = %s ORDER BY id", (author_id,))
                for author_id in author_ids]
        assert sum(len(cursor.fetchall()) for cursor in cursors) == BOOKS

    assert_not_flagged(pgscout, app_name, RAW_BOOKS_SQL)


def test_psycopg_pipeline_read_row_by_row_is_not_flagged(pgscout, bookshop, app_name):
    """Each fetch inside the pipeline Flushes and waits, but one Sync ends them all: the
    specification's batch (statements sharing a Sync)."""
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        author_ids = [row[0] for row in connection.execute(RAW_AUTHORS_SQL)]
        with connection.pipeline():
            books = [connection.execute(
                "SELECT id, title FROM np_books WHERE author_id = %s ORDER BY id",
                (author_id,)).fetchall() for author_id in author_ids]
        assert sum(map(len, books)) == BOOKS

    assert_not_flagged(pgscout, app_name, RAW_BOOKS_SQL)


def test_keyset_pagination_is_not_flagged(pgscout, bookshop, app_name):
    page_sql = "SELECT id, body FROM np_reviews WHERE id > $1 ORDER BY id LIMIT 100"
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        # The page loop starts from a multi-row query, as a listing page would.
        assert len(session.scalars(sa.select(Author).order_by(Author.id)).all()) == AUTHORS
        last_id, pages = 0, 0
        while True:
            page = session.execute(sa.text(page_sql.replace("$1", ":last")), {"last": last_id}).all()
            if not page:
                break
            last_id, pages = page[-1].id, pages + 1
        assert pages == REVIEWS // 100
        session.commit()
    engine.dispose()

    assert_not_flagged(pgscout, app_name, page_sql)


def test_queue_worker_polling_one_row_at_a_time_is_not_flagged(pg, pgscout, bookshop, app_name):
    reset_jobs(sqlalchemy_url(pg.dsn("trust_user", APP_DATABASE)))
    claim = sa.select(Job).where(Job.status == "queued").order_by(Job.id).limit(1) \
        .with_for_update(skip_locked=True)
    engine = orm_engine(pgscout, app_name)
    done = 0
    with orm.Session(engine) as session:
        while (job := session.scalars(claim).first()) is not None:
            job.status = "done"
            session.commit()
            done += 1
    engine.dispose()
    assert done == JOBS

    assert_not_flagged(pgscout, app_name)


def test_loop_doing_real_work_between_queries_is_not_flagged(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        for author in session.scalars(sa.select(Author).order_by(Author.id).limit(6)):
            assert author.books
            time.sleep(0.2)
        session.commit()
    engine.dispose()

    assert_not_flagged(pgscout, app_name, BOOKS_OF_AUTHOR_SQL)


def test_pooled_connection_serving_small_unrelated_requests_is_not_flagged(pgscout, bookshop, app_name):
    engine = orm_engine(pgscout, app_name, pool_size=1, max_overflow=0)
    lookups = [lambda session, i: session.get(Author, i),
               lambda session, i: session.get(Book, i),
               lambda session, i: session.get(Review, i * 7),
               lambda session, i: session.scalars(sa.select(Job).where(Job.id == i)).first()]
    for request in range(40):
        with orm.Session(engine) as session:
            assert lookups[request % len(lookups)](session, request // len(lookups) + 1) is not None
            session.commit()
    engine.dispose()

    assert_not_flagged(pgscout, app_name)


# -- pools that check out per query, async fan-out (issue 13) ---------------------------------

def wait_for_findings(proxy, app: str, count: int = 1, kind: str | None = None) -> list[dict]:
    """Findings judged per application wait for the idle gap after the last statement."""
    assert wait_until(lambda: len(findings(proxy, app, kind)) >= count, timeout=10), \
        f"{app}: {findings(proxy, app)}"
    return findings(proxy, app, kind)


async def asyncpg_pool(proxy, app: str, size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(proxy_dsn(proxy, app, connect_timeout=None),
                                     min_size=size, max_size=size)


async def test_asyncpg_pool_fetch_per_row_is_flagged(pgscout, bookshop, app_name):
    """pool.fetch checks a connection out per query; its release runs asyncpg's reset script
    (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`) between children."""
    pool = await asyncpg_pool(pgscout, app_name, size=2)
    try:
        for author in await pool.fetch(RAW_AUTHORS_SQL):
            assert len(await pool.fetch(RAW_BOOKS_SQL, author["id"])) == BOOKS_PER_AUTHOR
    finally:
        await pool.close()

    finding = only(wait_for_findings(pgscout, app_name))
    assert_loop(finding, RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS, fix="author_id = ANY($1)")
    assert finding["confidence"] == "high"


def test_sqlalchemy_engine_connect_per_query_is_flagged(pgscout, bookshop, app_name):
    """Each statement in its own `with engine.connect()`: BEGIN, the query, ROLLBACK on return."""
    engine = orm_engine(pgscout, app_name)
    with engine.connect() as connection:
        authors = connection.execute(sa.text(RAW_AUTHORS_SQL)).all()
    for author in authors:
        with engine.connect() as connection:
            connection.execute(sa.text(RAW_BOOKS_SQL.replace("$1", ":author")),
                               {"author": author.id}).all()
    engine.dispose()

    finding = only(findings(pgscout, app_name))
    assert_loop(finding, RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS, fix="author_id = ANY($1)")


async def test_children_gathered_over_a_pool_of_four_are_one_finding(pgscout, bookshop, app_name):
    pool = await asyncpg_pool(pgscout, app_name, size=4)
    try:
        authors = await pool.fetch(RAW_AUTHORS_SQL)
        books = await asyncio.gather(*(pool.fetch(RAW_BOOKS_SQL, author["id"])
                                       for author in authors))
        assert sum(map(len, books)) == BOOKS
    finally:
        await pool.close()

    finding = only(wait_for_findings(pgscout, app_name))
    assert_loop(finding, RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS, fix="author_id = ANY($1)")
    assert finding["connections"] > 1
    assert counted_findings(pgscout, app_name) == {"n_plus_one": 1}


# -- cursor walks and polling ------------------------------------------------------------------

@pytest.mark.parametrize("with_owner", [False, True])
def test_keyset_pages_of_25_are_not_flagged(pgscout, bookshop, app_name, with_owner):
    engine = orm_engine(pgscout, app_name)
    with orm.Session(engine) as session:
        if with_owner:
            assert len(session.scalars(sa.select(Author).order_by(Author.id)).all()) == AUTHORS
        last_id, pages = 0, 0
        while page := session.scalars(sa.select(Review).where(Review.id > last_id)
                                      .order_by(Review.id).limit(25)).all():
            last_id, pages = page[-1].id, pages + 1
        assert pages == REVIEWS // 25
        session.commit()
    engine.dispose()

    assert_not_flagged(pgscout, app_name)


async def test_asyncpg_keyset_pages_of_25_are_not_flagged(pgscout, bookshop, app_name):
    page_sql = "SELECT id, body FROM np_reviews WHERE id > $1 ORDER BY id LIMIT 25"
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        last_id = 0
        while page := await connection.fetch(page_sql, last_id):
            last_id = page[-1]["id"]
    finally:
        await connection.close()

    assert_not_flagged(pgscout, app_name, page_sql)


def test_polling_every_30_ms_is_not_flagged(pgscout, bookshop, app_name):
    poll_sql = "SELECT count(*) FROM np_jobs WHERE status = $1"
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            connection.execute(poll_sql.replace("$1", "%s"), ("failed",)).fetchone()
            time.sleep(0.03)

    assert_not_flagged(pgscout, app_name, poll_sql)


# -- driver and tool introspection -------------------------------------------------------------

async def test_asyncpg_type_introspection_is_not_an_owner(pgscout, bookshop, app_name):
    """asyncpg introspects np_shelf (WITH RECURSIVE typeinfo_tree ..., several rows), then the
    app runs unrelated lookups: they are no loop over the introspection's rows."""
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        assert await connection.fetchval("SELECT ('happy', '{sad}', 'x')::np_shelf") is not None
        for book_id in range(1, 9):
            await connection.fetch("SELECT id, title FROM np_books WHERE id = $1", book_id)
    finally:
        await connection.close()

    assert_not_flagged(pgscout, app_name)


def test_psycopg_type_info_and_sqlalchemy_reflection_are_not_flagged(pgscout, bookshop, app_name):
    from psycopg.types.composite import CompositeInfo, register_composite
    from psycopg.types.enum import EnumInfo, register_enum

    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        for name in [row[0] for row in connection.execute(
                "SELECT typname FROM pg_catalog.pg_type WHERE typnamespace = "
                "'pg_catalog'::regnamespace AND typtype = 'b' ORDER BY oid LIMIT 20")]:
            assert psycopg.types.TypeInfo.fetch(connection, name) is not None
        register_enum(EnumInfo.fetch(connection, "np_mood"), connection)
        register_composite(CompositeInfo.fetch(connection, "np_shelf"), connection)
    engine = sa.create_engine(sqlalchemy_url(proxy_dsn(pgscout, app_name)))
    with engine.connect() as connection:
        reflect(connection)
    engine.dispose()

    assert_not_flagged(pgscout, app_name)


def reflect(connection: sa.Connection) -> None:
    """What schema tools do: reflect every table, then inspect each one by one."""
    metadata = sa.MetaData()
    metadata.reflect(connection)
    assert "np_books" in metadata.tables
    inspector = sa.inspect(connection)
    for table in inspector.get_table_names():
        inspector.get_columns(table), inspector.get_indexes(table)
        inspector.get_foreign_keys(table), inspector.get_pk_constraint(table)


async def test_sqlalchemy_reflection_over_asyncpg_is_not_flagged(pgscout, bookshop, app_name):
    engine = async_orm_engine(pgscout, app_name)
    async with engine.connect() as connection:
        await connection.run_sync(reflect)
    await engine.dispose()

    assert_not_flagged(pgscout, app_name)


def test_psql_describe_and_pg_dump_are_not_flagged(pg, pgscout, bookshop, app_name):
    dsn = proxy_dsn(pgscout, app_name)
    for command in (r"\d np_*", r"\d+ np_books", r"\dt+", r"\di", r"\dT+", r"\l", r"\dn"):
        pg.psql("-c", command, dsn=dsn)
    run_client([pg.bin("pg_dump"), "--schema-only", "-d", dsn])

    assert_not_flagged(pgscout, app_name)


async def test_concurrent_unrelated_requests_over_a_pool_are_not_flagged(pgscout, bookshop, app_name):
    """Eight async workers share a pool of four: listings, single-row lookups of every kind."""
    pool = await asyncpg_pool(pgscout, app_name, size=4)

    async def worker(number: int) -> None:
        for request in range(15):
            kind = (number + request) % 5
            if kind == 0:
                await pool.fetch(RAW_AUTHORS_SQL)
            elif kind == 1:
                await pool.fetchrow("SELECT id, title FROM np_books WHERE id = $1",
                                    (number * 15 + request) % BOOKS + 1)
            elif kind == 2:
                await pool.fetchrow("SELECT id, body FROM np_reviews WHERE id = $1",
                                    (number * 37 + request * 11) % REVIEWS + 1)
            elif kind == 3:
                async with pool.acquire() as connection:
                    async with connection.transaction():
                        await connection.fetchrow("SELECT id, name FROM np_authors WHERE id = $1",
                                                  request % AUTHORS + 1)
            else:
                await pool.fetchrow("SELECT id, status FROM np_jobs WHERE id = $1",
                                    request % JOBS + 1)
            await asyncio.sleep(0.002 * (number % 3))

    try:
        await asyncio.gather(*(worker(number) for number in range(8)))
    finally:
        await pool.close()
    await asyncio.sleep(2.5)  # past the idle gap: the application's stream is judged too

    assert_not_flagged(pgscout, app_name)


async def test_two_async_sessions_lazy_loading_at_once_are_two_loops(pgscout, bookshop, app_name):
    engine = async_orm_engine(pgscout, app_name)

    async def request() -> None:
        async with AsyncSession(engine) as session:
            for author in (await session.scalars(sa.select(Author).order_by(Author.id))).all():
                assert len(await author.awaitable_attrs.books) == BOOKS_PER_AUTHOR
            await session.commit()

    await asyncio.gather(request(), request())
    await engine.dispose()

    assert wait_until(lambda: counted_findings(pgscout, app_name) == {"n_plus_one": 2}, timeout=10), \
        (counted_findings(pgscout, app_name), findings(pgscout, app_name))
    assert_loop(findings(pgscout, app_name)[-1], AUTHORS_SQL, BOOKS_OF_AUTHOR_SQL, n=AUTHORS)


def test_polling_for_new_rows_every_30_ms_is_not_flagged(pgscout, bookshop, app_name):
    tail_sql = "SELECT id, body FROM np_reviews WHERE id = $1"
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        connection.execute(RAW_AUTHORS_SQL).fetchall()  # a multi-row select first
        for last_seen in range(40):
            connection.execute(tail_sql.replace("$1", "%s"), (REVIEWS + last_seen,)).fetchall()
            time.sleep(0.03)

    assert_not_flagged(pgscout, app_name, tail_sql)


# -- the fix for the client's stack ------------------------------------------------------------

@pytest.mark.parametrize("suffix, comment, stack, fix", [
    ("", "/*framework='django%3A4.2.7',db_driver='psycopg%3A3.2'*/", "django", "prefetch_related"),
    ("-node", "", "node", "DataLoader"),
    ("-go", "", "go", "author_id = ANY($1)"),
    ("", "/*application='Shop',controller='authors',action='index'*/", "rails", "includes("),
])
def test_suggestion_follows_the_clients_stack(pgscout, bookshop, app_name, suffix, comment, stack,
                                              fix):
    """Told from sqlcommenter tags, else from application_name."""
    app = app_name + suffix
    with psycopg.connect(proxy_dsn(pgscout, app)) as connection:
        for (author_id, _) in connection.execute(RAW_AUTHORS_SQL + comment).fetchall():
            connection.execute("SELECT id, title FROM np_books WHERE author_id = %s ORDER BY id"
                               + comment.replace("%", "%%"), (author_id,)).fetchall()

    finding = only(findings(pgscout, app))
    assert_loop(finding, RAW_AUTHORS_SQL, RAW_BOOKS_SQL, n=AUTHORS, fix=fix)
    assert finding["stack"] == stack


async def test_gather_with_an_async_session_per_child_is_one_finding(pgscout, bookshop, app_name):
    """SQLAlchemy's async pool grows to four connections during the gather; each task runs its
    query in its own session (BEGIN, the query, ROLLBACK)."""
    engine = async_orm_engine(pgscout, app_name, pool_size=4, max_overflow=0)
    async with AsyncSession(engine) as session:
        author_ids = (await session.scalars(sa.select(Author.id).order_by(Author.id))).all()

    async def books_of(author_id: int) -> list[Book]:
        async with AsyncSession(engine) as session:
            return (await session.scalars(sa.select(Book).where(Book.author_id == author_id)
                                          .order_by(Book.id))).all()

    assert sum(map(len, await asyncio.gather(*map(books_of, author_ids)))) == BOOKS
    await engine.dispose()

    finding = only(wait_for_findings(pgscout, app_name))
    assert finding["n"] == AUTHORS and finding["connections"] > 1, finding
    assert finding["child_sql"].startswith("SELECT np_books.id"), finding
