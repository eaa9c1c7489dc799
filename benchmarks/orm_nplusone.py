"""An ORM request loop with an N+1 in every request: SQLAlchemy lazy loading over psycopg 3.

Each request lists a page of authors, then touches each author's books, which lazy loading turns
into one SELECT per author: the N+1 burst pgscout's detector is built to find. Run one request
after another for a while and print the request rate as JSON:

    python benchmarks/orm_nplusone.py postgresql+psycopg://user@host:port/db --duration 5

Owns: the ORM schema and data (`create_schema`) and the request loop.
Must not: batch or eager-load anything; the N+1 is the point.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from sqlalchemy import ForeignKey, String, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

AUTHORS = 1000
BOOKS_PER_AUTHOR = 5
AUTHORS_PER_REQUEST = 10


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "orm_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="select")


class Book(Base):
    __tablename__ = "orm_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("orm_authors.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    author: Mapped[Author] = relationship(back_populates="books")


def create_schema(url: str) -> None:
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(insert(Author), [{"id": author_id, "name": f"author {author_id}"}
                                         for author_id in range(1, AUTHORS + 1)])
        session.execute(insert(Book), [{"author_id": author_id, "title": f"book {book} by author {author_id}"}
                                       for author_id in range(1, AUTHORS + 1) for book in range(BOOKS_PER_AUTHOR)])
        session.commit()
    engine.dispose()


def serve_requests(url: str, duration: float) -> dict[str, float]:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    pages = random.Random(0)
    requests = 0
    started = time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        with Session(engine) as session:
            offset = pages.randrange(AUTHORS - AUTHORS_PER_REQUEST)
            authors = session.scalars(select(Author).order_by(Author.id).offset(offset).limit(AUTHORS_PER_REQUEST)).all()
            titles = [book.title for author in authors for book in author.books]
            assert len(titles) == AUTHORS_PER_REQUEST * BOOKS_PER_AUTHOR, titles
        requests += 1
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {"requests": requests, "seconds": elapsed, "requests_per_second": requests / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="SQLAlchemy URL, postgresql+psycopg://...")
    parser.add_argument("--duration", type=float, required=True, help="seconds to run requests for")
    args = parser.parse_args()
    print(json.dumps(serve_requests(args.url, args.duration)))


if __name__ == "__main__":
    main()
