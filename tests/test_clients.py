"""Real clients through pgscout against a real PostgreSQL, each result compared with a direct connection.

Owns: the promise that an application sees no difference when DATABASE_URL points at pgscout, for
psql, pgbench, psycopg 3, asyncpg and SQLAlchemy, including COPY, LISTEN/NOTIFY, pipelining,
large values and cancellation.
Must not: look inside the proxy (only what a client can observe), or share tables between the
direct and the proxied run (each route gets its own names, so the order of tests never matters).
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import io
import os
import re
import threading
import time

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from sqlalchemy import orm

from pgharness import APP_DATABASE

ROUTES = ("direct", "proxy")


@pytest.fixture
def app_dsns(pg, pgscout):
    return pg.route_dsns(pgscout)


@pytest.fixture
def asyncpg_dsns(pg, pgscout):
    return pg.route_dsns(pgscout, connect_timeout=None)


def run_on_both_routes(dsns: dict[str, str], scenario):
    """Run `scenario(route, dsn)` directly, then through the proxy; return both results."""
    return {route: scenario(route, dsns[route]) for route in ROUTES}


async def run_on_both_routes_async(dsns: dict[str, str], scenario):
    return {route: await scenario(route, dsns[route]) for route in ROUTES}


# -- psql ---------------------------------------------------------------------------------------


def test_psql_single_command(pg, app_dsns):
    sql = "SELECT current_user, current_database(), 6 * 7, 'héllo'::text, NULL IS NULL"
    outputs = run_on_both_routes(app_dsns, lambda route, dsn: pg.psql("-c", sql, dsn=dsn).stdout)
    assert outputs["direct"] == f"trust_user|{APP_DATABASE}|42|héllo|t\n"
    assert outputs["proxy"] == outputs["direct"]


def test_psql_multi_statement_script(pg, app_dsns):
    def scenario(route, dsn):
        table = f"psql_script_{route}"
        script = f"""
            DROP TABLE IF EXISTS {table};
            CREATE TABLE {table} (id int PRIMARY KEY, label text);
            BEGIN;
            INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 50) g;
            UPDATE {table} SET label = upper(label) WHERE id % 10 = 0;
            COMMIT;
            SELECT count(*), sum(id) FROM {table};
            SELECT label FROM {table} WHERE id IN (10, 11) ORDER BY id;
            \\echo done
            DROP TABLE {table};
        """
        return pg.psql("-q", dsn=dsn, input=script).stdout

    outputs = run_on_both_routes(app_dsns, scenario)
    assert outputs["direct"] == "50|1275\nROW 10\nrow 11\ndone\n"
    assert outputs["proxy"] == outputs["direct"]


def test_psql_copy_in_and_out(pg, app_dsns, tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text("".join(f"{n},name {n},\"quoted, {n}\"\n" for n in range(1, 2001)))

    def scenario(route, dsn):
        table = f"psql_copy_{route}"
        exported = tmp_path / f"export_{route}.csv"
        pg.psql(
            "-c", f"DROP TABLE IF EXISTS {table}",
            "-c", f"CREATE TABLE {table} (id int, name text, note text)",
            "-c", f"\\copy {table} FROM '{source}' WITH (FORMAT csv)",
            "-c", f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{exported}' WITH (FORMAT csv)",
            dsn=dsn,
        )
        count = pg.psql("-c", f"SELECT count(*) FROM {table}", dsn=dsn).stdout
        pg.psql("-c", f"DROP TABLE {table}", dsn=dsn)
        return count, exported.read_text()

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == ("2000\n", source.read_text())
    assert results["proxy"] == results["direct"]


# -- pgbench ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_mode", ["simple", "prepared"])
def test_pgbench_runs_clean(pg, app_dsns, query_mode):
    clients, transactions = 2, 25

    def scenario(route, dsn):
        # Both routes share the pgbench_* table names, so each run initializes its own copy first.
        pg.pgbench("-i", "-q", "-s", "1", dsn=dsn)
        result = pg.pgbench("-M", query_mode, "-c", str(clients), "-t", str(transactions), "-n", dsn=dsn)
        processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", result.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
        assert processed, result.stdout
        return (int(processed.group(1)), int(processed.group(2)), int(failed.group(1)) if failed else 0)

    results = run_on_both_routes(app_dsns, scenario)
    expected = clients * transactions
    assert results["direct"] == (expected, expected, 0)
    assert results["proxy"] == results["direct"]


# -- psycopg 3 ----------------------------------------------------------------------------------


def test_psycopg_simple_query_protocol(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            # No parameters: psycopg sends a simple Query message.
            rows = conn.execute("SELECT g, g * g, repeat('x', g) FROM generate_series(1, 5) g").fetchall()
            status = conn.info.transaction_status
        return rows, status

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"][0] == [(n, n * n, "x" * n) for n in range(1, 6)]
    assert results["proxy"] == results["direct"]


def test_psycopg_server_side_binding_types(app_dsns):
    params = (
        42, "text with 'quotes' and ünïcode", b"\x00\xffbinary", decimal.Decimal("12345.6789"),
        datetime.datetime(2024, 2, 29, 12, 30, 45, tzinfo=datetime.timezone.utc), None, [1, 2, 3],
        Jsonb({"a": [1, {"b": None}]}), True,
    )

    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT %s::int, %s::text, %s::bytea, %s::numeric, %s::timestamptz, %s::text,"
                " %s::int[], %s::jsonb, %s::bool",
                params,
            ).fetchone()
            binary_row = conn.cursor(binary=True).execute("SELECT %s::int + 1, %b::bytea", (41, b"\x01\x02")).fetchone()
        return row, binary_row

    results = run_on_both_routes(app_dsns, scenario)
    row, binary_row = results["direct"]
    assert row[:5] == params[:5] and row[5] is None and row[6] == [1, 2, 3]
    assert row[7] == {"a": [1, {"b": None}]} and row[8] is True
    assert binary_row == (42, b"\x01\x02")
    assert results["proxy"] == results["direct"]


def test_psycopg_prepared_statements(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            values = [conn.execute("SELECT %s::int * 2", (n,), prepare=True).fetchone()[0] for n in range(10)]
            prepared = conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int * 2%%'"
            ).fetchone()[0]
        return values, prepared

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == ([n * 2 for n in range(10)], 1)
    assert results["proxy"] == results["direct"]


def test_psycopg_executemany(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TEMP TABLE items (id int PRIMARY KEY, name text)")
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO items VALUES (%s, %s)", [(n, f"item {n}") for n in range(500)])
                cur.executemany("UPDATE items SET name = %s WHERE id = %s", [("even", n) for n in range(0, 500, 2)])
            return conn.execute("SELECT count(*), sum(id), count(*) FILTER (WHERE name = 'even') FROM items").fetchone()

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == (500, sum(range(500)), 250)
    assert results["proxy"] == results["direct"]


def test_psycopg_pipeline_mode(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE events (id int, kind text)")
            with conn.pipeline():
                cursors = []
                for n in range(20):
                    conn.execute("INSERT INTO events VALUES (%s, %s)", (n, "even" if n % 2 == 0 else "odd"))
                    cursors.append(conn.execute("SELECT count(*) FROM events WHERE id <= %s", (n,)))
                with pytest.raises(pg_errors.UndefinedTable):
                    with conn.pipeline():
                        conn.execute("SELECT * FROM no_such_table")
                        conn.execute("SELECT 1")
            counts = [cur.fetchone()[0] for cur in cursors]
            kinds = conn.execute("SELECT kind, count(*) FROM events GROUP BY kind ORDER BY kind").fetchall()
            return counts, kinds

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == (list(range(1, 21)), [("even", 10), ("odd", 10)])
    assert results["proxy"] == results["direct"]


def test_psycopg_copy_from_and_to_stdin(app_dsns):
    rows = [(n, f"name\t{n}", None if n % 7 == 0 else n * 1.5) for n in range(5000)]

    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TEMP TABLE copied (id int, name text, score float8)")
            with conn.cursor() as cur:
                with cur.copy("COPY copied (id, name, score) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                with cur.copy("COPY (SELECT * FROM copied ORDER BY id) TO STDOUT") as copy:
                    copy.set_types(["int4", "text", "float8"])
                    copied_back = list(copy.rows())
                with cur.copy("COPY (SELECT id FROM copied WHERE id < 3 ORDER BY id) TO STDOUT") as copy:
                    raw = b"".join(bytes(chunk) for chunk in copy)
        return copied_back, raw

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == (rows, b"0\n1\n2\n")
    assert results["proxy"] == results["direct"]


def test_psycopg_named_cursor_fetches_in_chunks(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            chunks = []
            with conn.cursor(name=f"walker_{route}") as cur:
                cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 1000) g ORDER BY g")
                while chunk := cur.fetchmany(300):
                    chunks.append(len(chunk))
                    last = chunk[-1]
            with conn.cursor(name="iterated") as cur:
                cur.itersize = 64
                cur.execute("SELECT g FROM generate_series(1, 200) g")
                total = sum(row[0] for row in cur)
            conn.commit()
        return chunks, last, total

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"][0] == [300, 300, 300, 100]
    assert results["direct"][1][0] == 1000 and results["direct"][2] == sum(range(1, 201))
    assert results["proxy"] == results["direct"]


def test_psycopg_listen_notify_between_connections(app_dsns):
    def scenario(route, dsn):
        channel = f"pgscout_{route}"
        with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as notifier:
            listener.execute(f"LISTEN {channel}")
            for n in range(3):
                notifier.execute("SELECT pg_notify(%s, %s)", (channel, f"payload {n}"))
            received = [
                (note.channel, note.payload, note.pid == notifier.info.backend_pid)
                for note in listener.notifies(timeout=10, stop_after=3)
            ]
        return [(channel_name.removesuffix(route), payload, same) for channel_name, payload, same in received]

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == [("pgscout_", f"payload {n}", True) for n in range(3)]
    assert results["proxy"] == results["direct"]


def test_psycopg_transactions_and_rollback(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TEMP TABLE ledger (amount int)")
            conn.commit()
            with conn.transaction():
                conn.execute("INSERT INTO ledger VALUES (1)")
                with pytest.raises(RuntimeError):
                    with conn.transaction():  # a savepoint, rolled back alone
                        conn.execute("INSERT INTO ledger VALUES (100)")
                        raise RuntimeError("abandon the savepoint")
                conn.execute("INSERT INTO ledger VALUES (2)")
            conn.execute("INSERT INTO ledger VALUES (1000)")
            in_transaction = conn.info.transaction_status
            conn.rollback()
            return in_transaction, conn.execute("SELECT coalesce(sum(amount), 0) FROM ledger").fetchone()[0]

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == (psycopg.pq.TransactionStatus.INTRANS, 3)
    assert results["proxy"] == results["direct"]


def test_psycopg_error_then_connection_keeps_working(app_dsns):
    def scenario(route, dsn):
        outcomes = []
        with psycopg.connect(dsn) as conn:
            with pytest.raises(pg_errors.DivisionByZero) as error:
                conn.execute("SELECT 1 / %s", (0,))
            outcomes.append((error.value.sqlstate, conn.info.transaction_status))
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            outcomes.append(conn.execute("SELECT 'alive'").fetchone()[0])
            conn.commit()
            conn.autocommit = True
            with pytest.raises(pg_errors.SyntaxError):
                conn.execute("SELEC broken")
            outcomes.append(conn.execute("SELECT %s::text", ("still alive",)).fetchone()[0])
        return outcomes

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == [("22012", psycopg.pq.TransactionStatus.INERROR), "alive", "still alive"]
    assert results["proxy"] == results["direct"]


def test_psycopg_multi_statement_simple_query(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE multi (n int); INSERT INTO multi VALUES (1), (2); SELECT sum(n) FROM multi;"
                        " SELECT 'second', 2")
            result_sets = []
            while True:
                result_sets.append((cur.statusmessage, cur.fetchall() if cur.description else None))
                if not cur.nextset():
                    break
        return result_sets

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == [
        ("CREATE TABLE", None), ("INSERT 0 2", None), ("SELECT 1", [(3,)]), ("SELECT 1", [("second", 2)]),
    ]
    assert results["proxy"] == results["direct"]


@pytest.mark.slow
def test_psycopg_100mb_bytea_round_trip(app_dsns):
    payload = os.urandom(100 * 1024 * 1024)
    expected_digest = hashlib.sha256(payload).hexdigest()

    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TEMP TABLE blobs (data bytea)")
            conn.execute("INSERT INTO blobs VALUES (%b)", (payload,))
            server_digest = conn.execute("SELECT encode(sha256(data), 'hex') FROM blobs").fetchone()[0]
            data = conn.cursor(binary=True).execute("SELECT data FROM blobs").fetchone()[0]
            text_length = conn.execute("SELECT length(data) FROM blobs").fetchone()[0]
        return server_digest, hashlib.sha256(data).hexdigest(), text_length

    results = run_on_both_routes(app_dsns, scenario)
    assert results["direct"] == (expected_digest, expected_digest, len(payload))
    assert results["proxy"] == results["direct"]


def test_psycopg_cancel_from_another_thread(app_dsns):
    def scenario(route, dsn):
        with psycopg.connect(dsn) as conn:
            cancelled_at = []

            def cancel_soon():
                time.sleep(0.5)
                cancelled_at.append(time.monotonic())
                conn.cancel()

            canceller = threading.Thread(target=cancel_soon)
            canceller.start()
            with pytest.raises(pg_errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            returned_after = time.monotonic() - cancelled_at[0]
            canceller.join()
            conn.rollback()
            alive = conn.execute("SELECT 1").fetchone()[0]
        return returned_after, alive

    results = run_on_both_routes(app_dsns, scenario)
    for route in ROUTES:
        returned_after, alive = results[route]
        assert returned_after < 1.0, f"{route}: the cancelled query returned {returned_after:.2f} s after cancel()"
        assert alive == 1


# -- asyncpg ------------------------------------------------------------------------------------


async def test_asyncpg_fetch_and_prepared_statements(asyncpg_dsns):
    async def scenario(route, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT g, g::text || '!' AS label FROM generate_series(1, $1::int) g", 5)
            statement = await conn.prepare("SELECT $1::int + $2::int")
            sums = [await statement.fetchval(n, n) for n in range(5)]
            row = await conn.fetchrow("SELECT $1::text AS a, $2::bytea AS b, $3::float8[] AS c", "x", b"\x00\x01", [1.5, None])
        finally:
            await conn.close()
        return [tuple(r) for r in rows], sums, tuple(row)

    results = await run_on_both_routes_async(asyncpg_dsns, scenario)
    assert results["direct"] == (
        [(n, f"{n}!") for n in range(1, 6)], [0, 2, 4, 6, 8], ("x", b"\x00\x01", [1.5, None]),
    )
    assert results["proxy"] == results["direct"]


async def test_asyncpg_executemany_and_copy(asyncpg_dsns):
    records = [(n, f"record {n}") for n in range(2000)]

    async def scenario(route, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TEMP TABLE staged (id int, label text)")
            await conn.executemany("INSERT INTO staged VALUES ($1, $2)", records[:100])
            await conn.copy_records_to_table("staged", records=records[100:], columns=["id", "label"])
            count = await conn.fetchval("SELECT count(*) FROM staged")
            exported = io.BytesIO()
            await conn.copy_from_query("SELECT id, label FROM staged WHERE id < $1 ORDER BY id", 3,
                                       output=exported, format="csv")
        finally:
            await conn.close()
        return count, exported.getvalue()

    results = await run_on_both_routes_async(asyncpg_dsns, scenario)
    assert results["direct"] == (2000, b"0,record 0\n1,record 1\n2,record 2\n")
    assert results["proxy"] == results["direct"]


async def test_asyncpg_cursor_with_prefetch(asyncpg_dsns):
    async def scenario(route, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                seen = [row[0] async for row in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=50)]
                cursor = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
                first = await cursor.fetch(10)
                await cursor.forward(80)
                rest = await cursor.fetch(50)
        finally:
            await conn.close()
        return seen, [r[0] for r in first], [r[0] for r in rest]

    results = await run_on_both_routes_async(asyncpg_dsns, scenario)
    assert results["direct"] == (list(range(1, 1001)), list(range(1, 11)), list(range(91, 101)))
    assert results["proxy"] == results["direct"]


async def test_asyncpg_listener(asyncpg_dsns):
    async def scenario(route, dsn):
        channel = f"asyncpg_{route}"
        listener, notifier = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        received: asyncio.Queue = asyncio.Queue()
        try:
            await listener.add_listener(channel, lambda conn, pid, chan, payload: received.put_nowait(payload))
            for n in range(3):
                await notifier.execute(f"NOTIFY {channel}, 'message {n}'")
            payloads = [await asyncio.wait_for(received.get(), timeout=10) for _ in range(3)]
        finally:
            await listener.close()
            await notifier.close()
        return payloads

    results = await run_on_both_routes_async(asyncpg_dsns, scenario)
    assert results["direct"] == ["message 0", "message 1", "message 2"]
    assert results["proxy"] == results["direct"]


async def test_asyncpg_timeout_cancels_the_query(asyncpg_dsns, pg):
    monitor = await asyncpg.connect(pg.dsn(connect_timeout=None))

    async def scenario(route, dsn):
        conn = await asyncpg.connect(dsn)
        try:
            backend_pid = conn.get_server_pid()
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetch("SELECT pg_sleep(30)", timeout=0.5)
            returned_after = time.monotonic() - started

            async def backend_is_sleeping():
                return await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", backend_pid
                )

            deadline = time.monotonic() + 1.0
            while await backend_is_sleeping() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            still_sleeping = await backend_is_sleeping()
            alive = await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        return returned_after, still_sleeping, alive

    try:
        results = await run_on_both_routes_async(asyncpg_dsns, scenario)
    finally:
        await monitor.close()
    for route in ROUTES:
        returned_after, still_sleeping, alive = results[route]
        assert returned_after < 1.5, f"{route}: fetch returned {returned_after:.2f} s after it started"
        assert still_sleeping == 0, f"{route}: pg_sleep still running on the server 1 s after the timeout"
        assert alive == 1


# -- SQLAlchemy 2 ORM ---------------------------------------------------------------------------


class Base(orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    books: orm.Mapped[list[Book]] = orm.relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "book"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("author.id"))
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")


def test_sqlalchemy_orm(pg, pgscout):
    def scenario(route, dsn):
        schema = f"orm_{route}"
        pg.psql("-c", f"DROP SCHEMA IF EXISTS {schema} CASCADE", "-c", f"CREATE SCHEMA {schema}",
                dsn=pg.dsn("trust_user", APP_DATABASE))
        engine = sa.create_engine(
            dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            connect_args={"options": f"-c search_path={schema}"},
        )
        try:
            Base.metadata.create_all(engine)
            with orm.Session(engine) as session:
                for a in range(3):
                    session.add(Author(name=f"author {a}", books=[Book(title=f"book {a}.{b}") for b in range(a + 1)]))
                session.commit()
            with orm.Session(engine) as session:
                lazy = [
                    (author.name, [book.title for book in author.books])
                    for author in session.scalars(sa.select(Author).order_by(Author.id))
                ]
            with orm.Session(engine) as session:
                eager = [
                    (author.name, [book.title for book in author.books])
                    for author in session.scalars(
                        sa.select(Author).options(orm.selectinload(Author.books)).order_by(Author.id)
                    )
                ]
                joined = session.execute(
                    sa.select(Book.title, Author.name).join(Book.author).where(Author.name == "author 2").order_by(Book.id)
                ).all()
            with orm.Session(engine) as session:
                session.add(Author(name="doomed"))
                session.flush()
                session.rollback()
                remaining = session.scalar(sa.select(sa.func.count()).select_from(Author))
        finally:
            engine.dispose()
        return lazy, eager, [tuple(row) for row in joined], remaining

    results = run_on_both_routes(pg.route_dsns(pgscout), scenario)
    expected_tree = [(f"author {a}", [f"book {a}.{b}" for b in range(a + 1)]) for a in range(3)]
    assert results["direct"] == (
        expected_tree, expected_tree, [(f"book 2.{b}", "author 2") for b in range(3)], 3,
    )
    assert results["proxy"] == results["direct"]
