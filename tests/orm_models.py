"""SQLAlchemy models and fixture data for the end-to-end N+1 and observation tests.

Owns: a small bookshop schema (authors -> books -> reviews, authors -> profiles, and a jobs queue)
under table names prefixed `np_`, so no other test module's tables collide with it; creating and
filling it through a direct connection; and the sizes the tests reason about.
Must not: connect through pgscout (the schema is set up behind the proxy's back, so setup
statements never show up in what the tests observe), or import anything from `proxy`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncAttrs

AUTHORS = 12
BOOKS_PER_AUTHOR = 5
REVIEWS_PER_BOOK = 10
BOOKS = AUTHORS * BOOKS_PER_AUTHOR
REVIEWS = BOOKS * REVIEWS_PER_BOOK
JOBS = 20


class Base(AsyncAttrs, orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "np_authors"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    books: orm.Mapped[list[Book]] = orm.relationship(back_populates="author", order_by="Book.id")
    profile: orm.Mapped[Profile] = orm.relationship(back_populates="author")


class Profile(Base):
    __tablename__ = "np_profiles"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("np_authors.id"), unique=True)
    bio: orm.Mapped[str]
    author: orm.Mapped[Author] = orm.relationship(back_populates="profile")


class Book(Base):
    __tablename__ = "np_books"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("np_authors.id"), index=True)
    title: orm.Mapped[str]
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")
    reviews: orm.Mapped[list[Review]] = orm.relationship(back_populates="book", order_by="Review.id")


class Review(Base):
    __tablename__ = "np_reviews"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    book_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("np_books.id"), index=True)
    stars: orm.Mapped[int]
    body: orm.Mapped[str]
    book: orm.Mapped[Book] = orm.relationship(back_populates="reviews")


class Job(Base):
    __tablename__ = "np_jobs"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    status: orm.Mapped[str] = orm.mapped_column(index=True)
    payload: orm.Mapped[str]


def create_bookshop(direct_url: str) -> None:
    """Drop and recreate the schema, then fill it with the fixture data (sizes above)."""
    engine = sa.create_engine(direct_url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with orm.Session(engine) as session:
            book_id = review_id = 0
            for author_id in range(1, AUTHORS + 1):
                session.add(Author(id=author_id, name=f"author {author_id}"))
                session.add(Profile(id=author_id, author_id=author_id, bio=f"bio {author_id}"))
            session.flush()
            for author_id in range(1, AUTHORS + 1):
                for _ in range(BOOKS_PER_AUTHOR):
                    book_id += 1
                    session.add(Book(id=book_id, author_id=author_id, title=f"book {book_id}"))
            session.flush()
            for book_id in range(1, BOOKS + 1):
                for _ in range(REVIEWS_PER_BOOK):
                    review_id += 1
                    session.add(Review(id=review_id, book_id=book_id, stars=review_id % 5 + 1,
                                       body=f"review {review_id}"))
            session.add_all(Job(id=job_id, status="queued", payload=f"job {job_id}")
                            for job_id in range(1, JOBS + 1))
            session.commit()
        with engine.begin() as connection:
            # Types a driver has to introspect (asyncpg's typeinfo_tree, psycopg's TypeInfo).
            connection.exec_driver_sql("DROP TYPE IF EXISTS np_shelf, np_mood CASCADE")
            connection.exec_driver_sql("CREATE TYPE np_mood AS ENUM ('happy', 'sad')")
            connection.exec_driver_sql(
                "CREATE TYPE np_shelf AS (mood np_mood, moods np_mood[], label text)")
    finally:
        engine.dispose()


def reset_jobs(direct_url: str) -> None:
    engine = sa.create_engine(direct_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.update(Job).values(status="queued"))
    finally:
        engine.dispose()
