"""The application `pgscout demo` runs through the proxy: a small bookshop on SQLAlchemy ORM.

Owns: the demo's schema (authors, books, reviews in the `pgscout_demo` schema, so a real database
given with --upstream is never touched outside it), seeding and dropping it over a direct
connection, and the request loop run through pgscout with psycopg 3: a lazy-loading page (an N+1
over a foreign key without an index), the same page fixed with selectinload, a slow report, a pool
that outgrows its connection budget, and once, a deploy whose migration builds an index the
blocking way while the app writes, then the same migration done the safe way.
Must not: import the proxy (it is an ordinary client of it), or touch anything outside its schema.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import ForeignKey, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

SCHEMA = "pgscout_demo"
APP_NAME = "demo-app"
POOL_APP_NAME = "demo-pool"
POOL_SIZE = 6  # the demo's budget allows fewer, so the pool outgrows it
AUTHORS, BOOKS_PER_AUTHOR, REVIEWS_PER_BOOK = 40, 4, 3
AUTHORS_PER_PAGE = 25  # N for the N+1: at 20 or more children it is a warning
REPORT_EVERY_REQUESTS = 5
THINK_SECONDS = 1.5  # between requests: longer than the detector's 1 s idle gap
MIGRATION_APP_NAME = "demo-migrate"
MIGRATION_HOLD_SECONDS = 0.8  # the rest of the migration's transaction (a backfill, say)


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    country: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author")  # lazy="select": the N+1


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    # No index: PostgreSQL does not index a foreign key by itself (the demo's missing index).
    author_id: Mapped[int] = mapped_column(ForeignKey(Author.id))
    title: Mapped[str]
    year: Mapped[int]
    author: Mapped[Author] = relationship(back_populates="books")
    reviews: Mapped[list[Review]] = relationship(back_populates="book")


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey(Book.id), index=True)
    stars: Mapped[int]
    body: Mapped[str]
    book: Mapped[Book] = relationship(back_populates="reviews")


def conninfo(host: str, port: int, database: str | None, user: str | None, password: str | None,
             **options: str | None) -> str:
    """A libpq connection string; None values are left out (libpq's defaults apply)."""
    given = {"host": host, "port": port, "dbname": database, "user": user, "password": password,
             **options}
    return make_conninfo(**{key: value for key, value in given.items() if value is not None})


def _engine(dsn: str, application_name: str, pool_size: int) -> Engine:
    return create_engine(
        "postgresql+psycopg://",
        # The schema on the search path keeps the SQL pgscout shows as short as the app's own.
        creator=lambda: psycopg.connect(dsn, application_name=application_name,
                                        options=f"-c search_path={SCHEMA}"),
        pool_size=pool_size, max_overflow=0)


class Bookshop:
    """`setup()` and `teardown()` go straight to the database; `serve()` goes through pgscout."""

    def __init__(self, direct_dsn: str, proxy_dsn: str) -> None:
        self._direct_dsn = direct_dsn
        self._proxy_dsn = proxy_dsn

    def setup(self) -> None:
        engine = _engine(self._direct_dsn, "pgscout-demo-setup", 1)
        try:
            with engine.begin() as connection:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
                connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
                Base.metadata.create_all(connection)
            with Session(engine) as session, session.begin():
                session.add_all(_seed_authors())
            with engine.begin() as connection:
                # Row estimates for the catalog, as autovacuum would give a real database.
                connection.execute(text("ANALYZE"))
        finally:
            engine.dispose()

    def teardown(self) -> None:
        engine = _engine(self._direct_dsn, "pgscout-demo-setup", 1)
        try:
            with engine.begin() as connection:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        finally:
            engine.dispose()

    def serve(self, stopping: threading.Event) -> None:
        """Handle requests until `stopping` is set; the first round shows every problem once."""
        app = _engine(self._proxy_dsn, APP_NAME, 2)
        pool = _engine(self._proxy_dsn, POOL_APP_NAME, POOL_SIZE)
        try:
            request = 0
            while not stopping.is_set():
                with Session(app) as session:
                    authors_page_lazy(session)
                with Session(app) as session:
                    authors_page_eager(session)
                if request % REPORT_EVERY_REQUESTS == 0:
                    with Session(app) as session:
                        top_rated_report(session)
                    busy_hour(pool)
                if request == 1:
                    deploy(self._proxy_dsn, app, concurrently=False)
                    deploy(self._proxy_dsn, app, concurrently=True)
                request += 1
                stopping.wait(THINK_SECONDS)
        finally:
            app.dispose()
            pool.dispose()


def _seed_authors() -> list[Author]:
    authors = []
    for a in range(1, AUTHORS + 1):
        books = [Book(title=f"Book {b} by author {a}", year=1950 + (a * 7 + b) % 70,
                      reviews=[Review(stars=1 + (a + b + r) % 5, body=f"Review {r}")
                               for r in range(REVIEWS_PER_BOOK)])
                 for b in range(1, BOOKS_PER_AUTHOR + 1)]
        authors.append(Author(name=f"Author {a}", country=("UK", "FR", "JP", "BR")[a % 4], books=books))
    return authors


def authors_page_lazy(session: Session) -> list[tuple[str, int]]:
    """Each `author.books` access lazily runs one query per author: the N+1."""
    authors = session.scalars(select(Author).order_by(Author.id).limit(AUTHORS_PER_PAGE))
    return [(author.name, len(author.books)) for author in authors]


def authors_page_eager(session: Session) -> list[tuple[str, int]]:
    """The fix: selectinload fetches every page author's books in one `= ANY(...)` query."""
    authors = session.scalars(select(Author).options(selectinload(Author.books))
                              .order_by(Author.id).limit(AUTHORS_PER_PAGE))
    return [(author.name, len(author.books)) for author in authors]


def top_rated_report(session: Session) -> list:
    """A report that takes 300 ms; pg_sleep stands in for a heavy aggregation."""
    return session.execute(text(
        "WITH heavy AS (SELECT pg_sleep(0.3)) "
        "SELECT a.name, avg(r.stars) AS stars, count(*) AS reviews "
        "FROM authors a JOIN books b ON b.author_id = a.id "
        "JOIN reviews r ON r.book_id = b.id CROSS JOIN heavy "
        "GROUP BY a.name ORDER BY stars DESC LIMIT 10")).all()


def busy_hour(pool: Engine) -> None:
    """Check out every pooled connection at once, as a traffic spike would."""
    everyone_connected = threading.Barrier(POOL_SIZE)

    def count_books() -> int:
        try:
            with pool.connect() as connection:
                everyone_connected.wait(timeout=30)
                return connection.execute(select(func.count()).select_from(Book)).scalar_one()
        except BaseException:
            everyone_connected.abort()  # the others must not wait for a connection that failed
            raise

    with ThreadPoolExecutor(POOL_SIZE) as workers:
        for result in [workers.submit(count_books) for _ in range(POOL_SIZE)]:
            result.result()


def deploy(proxy_dsn: str, app: Engine, *, concurrently: bool) -> None:
    """A migration adding an index on reviews while the app saves a review. Without
    CONCURRENTLY the index build's lock, held to the end of the migration's transaction, makes
    the save wait; with it (outside a transaction block, as it must be) the save goes on."""
    built = threading.Event()

    def migrate() -> None:
        with psycopg.connect(proxy_dsn, application_name=MIGRATION_APP_NAME, autocommit=True,
                             options=f"-c search_path={SCHEMA}") as connection:
            connection.execute("DROP INDEX IF EXISTS reviews_stars")
            if concurrently:
                connection.execute("CREATE INDEX CONCURRENTLY reviews_stars ON reviews (stars)")
                built.set()
                return
            with connection.transaction():
                connection.execute("CREATE INDEX reviews_stars ON reviews (stars)")
                built.set()
                connection.execute("SELECT pg_sleep(%s)", (MIGRATION_HOLD_SECONDS,))

    migration = threading.Thread(target=migrate, name="demo-migration")
    migration.start()
    try:
        built.wait(30)
        with Session(app) as session, session.begin():
            session.add(Review(book_id=1, stars=5, body="Saved during the deploy"))
    finally:
        built.set()
        migration.join(30)
