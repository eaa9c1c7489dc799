"""The demo application for deploy/docker-compose.yml: a small bookshop API whose database traffic
goes through its pgscout sidecar, with the problems pgscout is there to show.

Owns: the schema and seed data, three HTTP endpoints and a traffic driver that calls them.
- GET /authors         the N+1: SQLAlchemy's default lazy loading runs one books query per author;
- GET /authors/eager   the same answer with selectinload: two queries, whatever the author count;
- GET /report          a slow report query (pg_sleep stands in for a missing index).
Every request uses SQLAlchemy's connection pool (pool_size 5), as a web app would.
Must not: be mistaken for pgscout code; it only produces traffic worth looking at.

Usage: python app.py serve            (HTTP on :8000; DATABASE_URL points at the sidecar)
       python app.py drive URL        (calls URL's endpoints forever, in a realistic mix)
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import ForeignKey, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

AUTHORS = 25
BOOKS_PER_AUTHOR = 4


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    # lazy="select" is SQLAlchemy's default, spelled out because it is the N+1 on display.
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="select")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    title: Mapped[str]
    author: Mapped[Author] = relationship(back_populates="books")


def make_engine():
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)


def wait_for_database(engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def seed(engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        if session.scalar(select(func.count()).select_from(Author)):
            return
        for a in range(1, AUTHORS + 1):
            author = Author(name=f"Author {a}")
            author.books = [Book(title=f"Book {a}.{b}") for b in range(1, BOOKS_PER_AUTHOR + 1)]
            session.add(author)


def authors_lazy(engine) -> list[dict]:
    with Session(engine) as session:
        authors = session.scalars(select(Author).order_by(Author.id)).all()
        return [{"name": author.name, "books": len(author.books)} for author in authors]


def authors_eager(engine) -> list[dict]:
    with Session(engine) as session:
        query = select(Author).options(selectinload(Author.books)).order_by(Author.id)
        return [{"name": author.name, "books": len(author.books)} for author in session.scalars(query)]


def report(engine) -> list[dict]:
    # The one-row subquery sleeps once per report, standing in for a scan a missing index causes.
    query = text(
        "SELECT authors.name, count(books.id) AS books "
        "FROM authors JOIN books ON books.author_id = authors.id CROSS JOIN (SELECT pg_sleep(0.6)) AS scan "
        "GROUP BY authors.name ORDER BY books DESC, authors.name"
    )
    with engine.connect() as connection:
        return [{"name": row.name, "books": row.books} for row in connection.execute(query)]


ROUTES = {"/authors": authors_lazy, "/authors/eager": authors_eager, "/report": report}


def serve(port: int = 8000) -> None:
    engine = make_engine()
    wait_for_database(engine)
    seed(engine)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, {"ok": True})
            elif self.path in ROUTES:
                self._reply(200, ROUTES[self.path](engine))
            else:
                self._reply(404, {"error": "not found", "routes": sorted(ROUTES)})

        def _reply(self, status: int, body) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass  # pgscout's logs are the interesting ones here

    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


def drive(base_url: str) -> None:
    """Mostly the N+1 page, sometimes its fixed twin, now and then the slow report."""
    mix = ["/authors"] * 6 + ["/authors/eager"] * 3 + ["/report"]
    while True:
        try:
            urllib.request.urlopen(base_url + random.choice(mix), timeout=10).read()
        except OSError as error:
            print(f"drive: {error}", file=sys.stderr)
            time.sleep(2)
        time.sleep(random.uniform(0.1, 0.5))


def exit_on_sigterm() -> None:
    """As a container's PID 1, Python gets no default action for SIGTERM: the kernel drops it, and
    `docker stop` waits its whole timeout before SIGKILL. Exit at once instead (the pooled
    connections close with the process, which pgscout logs as connection_closed)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


if __name__ == "__main__":
    exit_on_sigterm()
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command == "serve":
        serve()
    elif command == "drive" and len(sys.argv) == 3:
        drive(sys.argv[2].rstrip("/"))
    else:
        sys.exit(__doc__)
