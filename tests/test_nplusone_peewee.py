"""N+1 detection for peewee, end to end through a real pgscout against real PostgreSQL.

Owns: the NPLUSONE.md scenarios as peewee sends them over psycopg2, which writes every value
into the text (a simple Query per statement), with every table aliased `t1`, `t2`...; and that
its findings name peewee's own fixes.
Must not: create tables (the bookshop of tests/orm_models.py is mapped as it is).
"""

from __future__ import annotations

import contextlib

import peewee as pw
import pytest

from orm_models import AUTHORS, BOOKS_PER_AUTHOR
from pgharness import APP_DATABASE
from test_nplusone_e2e import (app_name, assert_not_flagged, bookshop, findings,  # noqa: F401
                              only)  # (app_name and bookshop are fixtures)

database = pw.PostgresqlDatabase(None)


class Author(pw.Model):
    name = pw.TextField()

    class Meta:
        database = database
        table_name = "np_authors"


class Book(pw.Model):
    author = pw.ForeignKeyField(Author, backref="books", column_name="author_id")
    title = pw.TextField()

    class Meta:
        database = database
        table_name = "np_books"


@contextlib.contextmanager
def peewee_through(proxy, app: str):
    database.init(APP_DATABASE, user="trust_user", host=proxy.host, port=proxy.port,
                  application_name=app, sslmode="disable")
    database.connect()
    try:
        yield
    finally:
        database.close()


def test_backref_in_a_loop_is_flagged_with_peewees_fix(pgscout, bookshop, app_name):
    with peewee_through(pgscout, app_name):
        assert {len(list(author.books)) for author in Author.select().order_by(Author.id)} == {
            BOOKS_PER_AUTHOR}

    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"], finding["stack"]) == ("n_plus_one", AUTHORS, "peewee")
    assert 'FROM "np_books" AS "t1"' in finding["child_sql"]
    assert "prefetch(" in finding["suggestion"], finding["suggestion"]


def test_count_per_row_is_flagged_with_a_grouped_parent_query(pgscout, bookshop, app_name):
    with peewee_through(pgscout, app_name):
        assert {author.books.count() for author in Author.select()} == {BOOKS_PER_AUTHOR}

    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"]) == ("n_plus_one", AUTHORS)
    assert "fn.COUNT(" in finding["suggestion"], finding["suggestion"]


@pytest.mark.parametrize("loader", ["prefetch", "join"])
def test_eager_loading_is_not_flagged(pgscout, bookshop, app_name, loader):
    with peewee_through(pgscout, app_name):
        if loader == "prefetch":
            authors = pw.prefetch(Author.select(), Book.select())
            assert sum(len(list(author.books)) for author in authors) == AUTHORS * BOOKS_PER_AUTHOR
        else:
            books = Book.select(Book, Author).join(Author)
            assert len({book.author.name for book in books}) == AUTHORS

    assert_not_flagged(pgscout, app_name)
