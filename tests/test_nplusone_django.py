"""N+1 detection for Django's ORM, end to end through a real pgscout against real PostgreSQL.

Owns: the NPLUSONE.md scenarios as Django sends them: Django 5 on psycopg 3 binds on the client
by default, so every lazy load is a simple Query with the key written into the text (and a
`LIMIT 21` on a foreign key's get), where the SQLAlchemy tests send `$1` and a Bind.
Must not: create tables (the bookshop of tests/orm_models.py is mapped unmanaged), or configure
Django anywhere but the `django_models` fixture (settings are once per process).
"""

from __future__ import annotations

import contextlib

import django
import pytest
from django.conf import settings

from orm_models import AUTHORS, BOOKS_PER_AUTHOR
from pgharness import APP_DATABASE, LOOPBACK
from test_nplusone_e2e import (app_name, assert_not_flagged, bookshop, findings,  # noqa: F401
                              only)  # (app_name and bookshop are fixtures)

AUTHORS_SQL = 'SELECT "np_authors"."id", "np_authors"."name" FROM "np_authors" ORDER BY "np_authors"."id" ASC'


@pytest.fixture(scope="module")
def django_models(bookshop):  # noqa: F811 (the fixture imported above)
    if not settings.configured:
        # The host and port are the proxy's, set per test (the connection reads them when it opens).
        settings.configure(DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": APP_DATABASE, "USER": "trust_user",
            "HOST": LOOPBACK, "PORT": 0}}, INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
    from django.db import models

    class Author(models.Model):
        name = models.TextField()

        class Meta:
            app_label = "bookshop"
            db_table = "np_authors"
            managed = False

    class Book(models.Model):
        author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
        title = models.TextField()

        class Meta:
            app_label = "bookshop"
            db_table = "np_books"
            managed = False

    return Author, Book


@contextlib.contextmanager
def django_through(proxy, app: str, **options):
    """Django's default connection, opened through `proxy` as `app`, closed at the end (as at a
    request's end with CONN_MAX_AGE = 0)."""
    from django.db import connection
    connection.close()
    connection.settings_dict.update(HOST=proxy.host, PORT=str(proxy.port), OPTIONS={
        "application_name": app, "sslmode": "disable", **options})
    try:
        yield
    finally:
        connection.close()


def assert_django_loop(finding: dict, child_table: str, n: int) -> None:
    assert finding["kind"] == "n_plus_one", finding
    assert finding["n"] == n
    assert f'FROM "{child_table}"' in finding["child_sql"], finding["child_sql"]
    assert "prefetch_related()" in finding["suggestion"], finding["suggestion"]


def test_reverse_foreign_key_in_a_loop_is_flagged(pgscout, django_models, app_name):
    Author, _ = django_models
    with django_through(pgscout, app_name):
        for author in Author.objects.order_by("id"):
            assert len(list(author.books.all())) == BOOKS_PER_AUTHOR

    finding = only(findings(pgscout, app_name))
    assert_django_loop(finding, "np_books", AUTHORS)
    assert finding["owner_sql"] == AUTHORS_SQL


def test_foreign_key_in_a_loop_is_flagged(pgscout, django_models, app_name):
    _, Book = django_models
    with django_through(pgscout, app_name):
        # One book per author, so each get of an author is a different one (LIMIT 21 and all).
        books = Book.objects.order_by("author_id", "id").distinct("author_id")
        assert len({book.author.name for book in books}) == AUTHORS

    assert_django_loop(only(findings(pgscout, app_name)), "np_authors", AUTHORS)


@pytest.mark.parametrize("loader", ["prefetch_related", "select_related"])
def test_eager_loading_is_not_flagged(pgscout, django_models, app_name, loader):
    Author, Book = django_models
    with django_through(pgscout, app_name):
        if loader == "prefetch_related":
            authors = Author.objects.order_by("id").prefetch_related("books")
            assert sum(len(author.books.all()) for author in authors) == AUTHORS * BOOKS_PER_AUTHOR
        else:
            books = Book.objects.order_by("id").select_related("author")
            assert len({book.author.name for book in books}) == AUTHORS

    assert_not_flagged(pgscout, app_name)


@pytest.mark.parametrize("chunk_size", [4, 100])
def test_a_loop_over_iterator_chunks_is_one_loop(pgscout, django_models, app_name, chunk_size):
    """iterator() reads through a server-side cursor: DECLARE, then a FETCH per chunk."""
    Author, _ = django_models
    with django_through(pgscout, app_name):
        authors = Author.objects.order_by("id").iterator(chunk_size=chunk_size)
        assert {len(list(author.books.all())) for author in authors} == {BOOKS_PER_AUTHOR}

    finding = only(findings(pgscout, app_name))
    assert_django_loop(finding, "np_books", AUTHORS)
    assert (finding["iterations"], finding["confidence"]) == (1, "high")
    assert finding["owner_sql"].startswith("DECLARE "), finding["owner_sql"]
    assert finding["owner_sql"].endswith(AUTHORS_SQL), finding["owner_sql"]


@pytest.mark.parametrize("server_side_binding", [False, True])
def test_walking_a_paginators_pages_is_not_flagged(pgscout, django_models, app_name,
                                                   server_side_binding):
    """Page 1 is `LIMIT 5`, the others `LIMIT 5 OFFSET n`: one fingerprint, a cursor walk. With
    server-side binding the filter's value is bound, the same on every page, and LIMIT and
    OFFSET are still written into the text."""
    from django.core.paginator import Paginator
    _, Book = django_models
    with django_through(pgscout, app_name, server_side_binding=server_side_binding):
        pages = Paginator(Book.objects.filter(author_id__gt=0).order_by("id"), BOOKS_PER_AUTHOR)
        assert pages.num_pages == AUTHORS >= 10  # a run long enough to be flagged without owner
        assert sum(len(pages.page(number).object_list) for number in pages.page_range) \
            == AUTHORS * BOOKS_PER_AUTHOR

    assert_not_flagged(pgscout, app_name)


def test_a_deferred_field_per_row_is_flagged_with_the_owner_query_as_its_fix(
        pgscout, django_models, app_name):
    Author, _ = django_models
    with django_through(pgscout, app_name):
        assert len({author.name for author in Author.objects.only("id").order_by("id")}) == AUTHORS

    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"]) == ("n_plus_one", AUTHORS)
    assert finding["child_sql"].startswith('SELECT "np_authors"."id", "np_authors"."name" FROM')
    # No relationship to prefetch: the loop reloads the owner's own rows.
    assert "only() or defer()" in finding["suggestion"], finding["suggestion"]


def test_count_per_row_is_flagged_with_an_annotation_as_its_fix(pgscout, django_models, app_name):
    Author, _ = django_models
    with django_through(pgscout, app_name):
        assert {author.books.count() for author in Author.objects.order_by("id")} == {
            BOOKS_PER_AUTHOR}

    finding = only(findings(pgscout, app_name))
    assert (finding["kind"], finding["n"]) == ("n_plus_one", AUTHORS)
    assert finding["child_sql"].startswith('SELECT COUNT(*) AS "__count" FROM "np_books"')
    # Prefetching the books would load every row to count them.
    assert ".annotate(n=Count(" in finding["suggestion"], finding["suggestion"]
    assert "prefetch_related" not in finding["suggestion"]
