"""Observation end to end: slow log, statement stats, transactions, connection budgets, /metrics.

Owns: what an operator reads from a real pgscout in front of real PostgreSQL, driven by real
clients (psycopg 3, asyncpg, psql): the `slow_query` log line and /api/slow, /api/fingerprints,
the transaction and budget series in /metrics, /api/connections, `promtool check metrics` on a
real scrape, and the bound on series when clients send 100,000 distinct statement shapes.
Must not: look inside the proxy process (only its API, metrics and logs), or rely on another
test's traffic (each test filters by its own application_name or runs its own pgscout).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgharness import APP_DATABASE, wait_until
from pgscout.analysis.fingerprint import fingerprint_text

PROMTOOL = "/usr/bin/promtool"
SECRET = "hunter2-" + uuid.uuid4().hex
ADMIN_PAGES = ("/metrics", "/api/fingerprints?limit=1000", "/api/slow", "/api/nplusone",
               "/api/connections", "/api/overview")


@pytest.fixture
def app_name(request):
    return f"obs-{request.node.name[5:40]}-{uuid.uuid4().hex[:6]}"


def proxy_dsn(proxy, app: str, **params) -> str:
    return proxy.dsn("trust_user", APP_DATABASE, application_name=app, **params)


def api(proxy, path: str) -> dict:
    status, body = proxy.admin_get(path)
    assert status == 200, body
    return json.loads(body)


def scrape(proxy) -> str:
    status, text = proxy.admin_get("/metrics")
    assert status == 200
    return text


def samples(text: str, name: str, **labels: str) -> list:
    """Samples called `name` whose labels include `labels`."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float:
    found = samples(text, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


def fingerprints_of(proxy, app: str, sort: str = "calls") -> list[dict]:
    return [entry for entry in api(proxy, f"/api/fingerprints?sort={sort}&limit=1000")["fingerprints"]
            if app in entry["applications"]]


def slow_records(proxy, app: str) -> list[dict]:
    return [record for record in api(proxy, "/api/slow")["slow_queries"]
            if record["application_name"] == app]


def logged(proxy, event: str, **fields) -> list[dict]:
    return [line for line in proxy.logs() if line.get("event") == event
            and all(line.get(key) == wanted for key, wanted in fields.items())]


# -- slow log ---------------------------------------------------------------------------------

def test_slow_statement_is_logged_with_its_context(pgscout, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        backend_pid = connection.info.backend_pid
        connection.execute("select pg_sleep(1)")

    assert wait_until(lambda: logged(pgscout, "slow_query", application_name=app_name), timeout=5)
    line = logged(pgscout, "slow_query", application_name=app_name)[0]
    assert line["level"] == "warning"
    assert line["normalized"] == "select pg_sleep($1)"
    assert line["fingerprint"] == fingerprint_text("SELECT pg_sleep(1)")[0]
    assert 1000 <= line["duration_ms"] < 5000
    assert (line["user"], line["database"], line["backend_pid"]) == ("trust_user", APP_DATABASE, backend_pid)
    record = next(record for record in slow_records(pgscout, app_name))
    assert {key: record[key] for key in line if key in record} == \
        {key: line[key] for key in line if key in record}


def test_secret_literals_and_parameters_never_leave_pgscout(pgscout, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        connection.execute(f"SELECT pg_sleep(0.6), 'password={SECRET}' AS credentials")
        connection.execute("SELECT pg_sleep(0.6), %s::text AS credentials", (f"password={SECRET}",))

    assert wait_until(lambda: len(slow_records(pgscout, app_name)) == 2, timeout=5)
    literal, bound = reversed(slow_records(pgscout, app_name))  # /api/slow is newest first
    assert literal["normalized"] == "SELECT pg_sleep($1), $2 AS credentials"
    # The bound value keeps its $1; the literal is numbered after it.
    assert bound["normalized"] == "SELECT pg_sleep($2), $1::text AS credentials"
    # log_parameters is off by default: no values at all, not even redacted ones.
    assert "parameters" not in literal and "parameters" not in bound
    for page in ADMIN_PAGES:
        assert SECRET not in pgscout.admin_get(page)[1], page
    assert SECRET not in pgscout.output()


# -- statement statistics ---------------------------------------------------------------------

def test_literal_and_bound_forms_share_one_fingerprint_with_calls_and_rows(pgscout, app_name):
    query = "SELECT g AS obs_rows FROM generate_series(1, 10) g WHERE g > {}"
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        assert len(connection.execute(query.format(3)).fetchall()) == 7
        assert len(connection.execute(query.format("%s"), (8,)).fetchall()) == 2
        assert len(connection.execute(query.format("%s"), (0,)).fetchall()) == 10

    entry, = fingerprints_of(pgscout, app_name)
    assert entry["fingerprint"] == fingerprint_text(query.format(3))[0] == fingerprint_text(query.format("$1"))[0]
    assert entry["normalized"] == "SELECT g AS obs_rows FROM generate_series($1, $2) g WHERE g > $3"
    assert (entry["calls"], entry["rows"], entry["errors"], entry["kind"]) == (3, 19, {}, "select")
    assert entry["max_seconds"] <= entry["total_seconds"]


def test_failing_statement_counts_under_its_sqlstate(pgscout, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        connection.execute("SELECT 10 / g AS obs_ratio FROM generate_series(1, 2) g")
        for _ in range(2):
            with pytest.raises(psycopg.errors.DivisionByZero):
                connection.execute("SELECT 10 / g AS obs_ratio FROM generate_series(0, 2) g")
        with pytest.raises(psycopg.errors.UndefinedTable):
            connection.execute("SELECT * FROM obs_no_such_table")

    by_sql = {entry["normalized"]: entry for entry in fingerprints_of(pgscout, app_name)}
    ratio = by_sql["SELECT $1 / g AS obs_ratio FROM generate_series($2, $3) g"]
    assert (ratio["calls"], ratio["errors"]) == (3, {"22012": 2})
    assert by_sql["SELECT * FROM obs_no_such_table"]["errors"] == {"42P01": 1}
    text = scrape(pgscout)
    assert value(text, "pgscout_statement_errors_total", sqlstate="22012") >= 2
    assert value(text, "pgscout_statement_errors_total", sqlstate="42P01") >= 1


def test_sort_keys_order_the_fingerprints(pgscout, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name), autocommit=True) as connection:
        # Column names make these shapes this test's own (aliases and literals would not).
        for _ in range(5):
            connection.execute("SELECT often FROM (VALUES (1)) v(often)")
        connection.execute("SELECT slowest FROM (VALUES (pg_sleep(0.05))) v(slowest)")
        connection.execute("SELECT many FROM generate_series(1, 500) many")
        with pytest.raises(psycopg.errors.DivisionByZero):
            connection.execute("SELECT 1 / failing FROM (VALUES (0)) v(failing)")

    first = {}
    for sort in ("calls", "total_time", "mean_time", "rows", "errors"):
        entries = fingerprints_of(pgscout, app_name, sort)
        first[sort] = entries[0]["normalized"]
        key = {"calls": lambda e: e["calls"], "total_time": lambda e: e["total_seconds"],
               "mean_time": lambda e: e["mean_seconds"], "rows": lambda e: e["rows"],
               "errors": lambda e: sum(e["errors"].values())}[sort]
        everything = api(pgscout, f"/api/fingerprints?sort={sort}&limit=1000")["fingerprints"]
        assert [key(e) for e in everything] == sorted((key(e) for e in everything), reverse=True)
    assert first["calls"] == "SELECT often FROM (VALUES ($1)) v(often)"
    assert first["total_time"] == first["mean_time"] == \
        "SELECT slowest FROM (VALUES (pg_sleep($1))) v(slowest)"
    assert first["rows"] == "SELECT many FROM generate_series($1, $2) many"
    assert first["errors"] == "SELECT $1 / failing FROM (VALUES ($2)) v(failing)"
    status, body = pgscout.admin_get("/api/fingerprints?sort=bogus")
    assert status == 400 and "calls" in body
    assert len(api(pgscout, "/api/fingerprints?sort=calls&limit=2")["fingerprints"]) == 2


def test_multi_statement_simple_query_is_one_entry_timed_whole(pg, pgscout, app_name):
    """PostgreSQL sends the results of a multi-statement Query in one flush: the time of each
    statement is not on the wire, so the Query is reported whole, never one statement charged
    with its neighbour's time."""
    pg.psql("-c", "SET application_name = 'obs_multi'; SELECT pg_sleep(0.3); "
                  "SELECT obs_second FROM generate_series(1, 3) obs_second",
            dsn=proxy_dsn(pgscout, app_name))

    entries = fingerprints_of(pgscout, "obs_multi")
    assert [(e["normalized"], e["calls"], e["rows"]) for e in entries] == [
        ("SET application_name = $1; SELECT pg_sleep($2); "
         "SELECT obs_second FROM generate_series($3, $4) obs_second", 1, 4)]
    assert entries[0]["total_seconds"] >= 0.3


# -- transactions -----------------------------------------------------------------------------

def test_transaction_outcomes_and_idle_time_show_in_metrics(pgscout, app_name):
    with psycopg.connect(proxy_dsn(pgscout, app_name)) as connection:
        connection.execute("SELECT 1")
        time.sleep(0.3)  # the application thinks inside its transaction
        connection.commit()
        connection.execute("SELECT 1")
        connection.commit()
        connection.execute("SELECT 1")
        connection.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero):
            connection.execute("SELECT 1 / 0")
        connection.rollback()

    text = scrape(pgscout)
    outcomes = {outcome: value(text, "pgscout_transactions_total", application=app_name, outcome=outcome)
                for outcome in ("commit", "rollback", "aborted")}
    assert outcomes == {"commit": 2, "rollback": 1, "aborted": 1}
    assert value(text, "pgscout_transaction_idle_seconds_count", application=app_name) == 4
    assert 0.3 <= value(text, "pgscout_transaction_idle_seconds_sum", application=app_name) < 2
    assert value(text, "pgscout_transaction_idle_seconds_bucket", application=app_name, le="0.25") == 3
    assert value(text, "pgscout_transaction_duration_seconds_count", application=app_name) == 4


# -- connections and budgets ------------------------------------------------------------------

async def test_budget_warns_enforces_and_reports_states(start_pgscout, tmp_path, app_name):
    config = tmp_path / "pgscout.yaml"
    config.write_text(f"budgets:\n  - name: obs-web\n    application_name: {app_name}\n"
                      f"    max_connections: 5\n    enforce: true\n")
    proxy = start_pgscout(config=config)
    dsn = proxy_dsn(proxy, app_name, connect_timeout=None)
    connections = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        assert wait_until(lambda: logged(proxy, "budget_warning", budget="obs-web"), timeout=5)
        warning = logged(proxy, "budget_warning", budget="obs-web")[0]
        assert (warning["level"], warning["current"], warning["max_connections"]) == ("warning", 4, 5)

        connections.append(await asyncpg.connect(dsn))
        with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
            await asyncpg.connect(dsn)
        assert refused.value.sqlstate == "53300"
        assert '"obs-web"' in str(refused.value)
        assert logged(proxy, "budget_exceeded", budget="obs-web")

        in_transaction = connections[0].transaction()
        await in_transaction.start()
        await connections[0].fetchval("SELECT 1")
        sleeping = asyncio.create_task(connections[1].fetchval("SELECT pg_sleep(1.5)"))
        await asyncio.sleep(0.3)

        report = await asyncio.to_thread(api, proxy, "/api/connections")
        states = {row["state"]: row["count"] for row in report["live"] if row["application"] == app_name}
        assert states == {"idle in transaction": 1, "active": 1, "idle": 3}
        budget, = report["budgets"]
        assert (budget["name"], budget["current"], budget["max_connections"], budget["refused_total"]) == \
            ("obs-web", 5, 5, 1)
        text = await asyncio.to_thread(scrape, proxy)
        assert value(text, "pgscout_budget_connections", budget="obs-web") == 5
        assert value(text, "pgscout_budget_max_connections", budget="obs-web") == 5
        assert value(text, "pgscout_budget_refused_total", budget="obs-web") == 1
        assert value(text, "pgscout_client_connections", application=app_name,
                     state="idle in transaction") == 1
        await sleeping
        await in_transaction.rollback()
    finally:
        for connection in connections:
            await connection.close()

    # A closed connection frees its place in the budget.
    assert wait_until(lambda: api(proxy, "/api/connections")["budgets"][0]["current"] == 0, timeout=5)
    (await asyncpg.connect(dsn)).terminate()


# -- the /metrics exposition ------------------------------------------------------------------

async def test_promtool_accepts_a_real_scrape_after_a_mixed_workload(pgscout, app_name):
    connection = await asyncpg.connect(proxy_dsn(pgscout, app_name, connect_timeout=None))
    try:
        authors = await connection.fetch("SELECT g AS id FROM generate_series(1, 12) g")
        for author in authors:  # an N+1 loop, so the findings series has a sample
            await connection.fetch("SELECT g FROM generate_series(1, $1::int) g", author["id"])
        async with connection.transaction():
            await connection.execute("SELECT pg_sleep(0.55)")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await connection.fetch("SELECT 1 / 0")
        await connection.executemany("SELECT $1::int", [(i,) for i in range(10)])
    finally:
        await connection.close()
    await asyncio.sleep(0.2)

    text = scrape(pgscout)
    assert samples(text, "pgscout_nplusone_findings_total", application=app_name)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# -- cardinality ------------------------------------------------------------------------------

TOP_K = 50
MAX_FINGERPRINTS = 5000
DISTINCT_SHAPES = 100_000
BATCH = 2000
# Series one client application adds (statement counters and latency histogram, connection
# states and opens, lifetime histogram).
APPLICATION_SERIES = 60


def shape(i: int) -> str:
    # Column names are part of a fingerprint (literals and aliases are not), and need no table.
    return f"SELECT c{i} FROM (VALUES (1)) v(c{i})"


def test_distinct_query_shapes_cannot_blow_up_the_series(start_pgscout, app_name):
    """100,000 distinct fingerprints; the exposition stays bounded by metrics.top_k.

    top_k and max_fingerprints are the defaults, set explicitly because the bound is derived
    from them.
    """
    assert len({fingerprint_text(shape(i))[0] for i in range(DISTINCT_SHAPES)}) == DISTINCT_SHAPES
    proxy = start_pgscout(env={"PGSCOUT_METRICS_TOP_K": str(TOP_K),
                               "PGSCOUT_STATEMENTS_MAX_FINGERPRINTS": str(MAX_FINGERPRINTS)})
    baseline = series(scrape(proxy))

    started = time.monotonic()
    with psycopg.connect(proxy_dsn(proxy, app_name), autocommit=True, prepare_threshold=None) as connection:
        for start in range(0, DISTINCT_SHAPES, BATCH):
            with connection.pipeline():
                for i in range(start, start + BATCH):
                    connection.execute(shape(i))
            if start % 20_000 == 0:
                scrape(proxy)  # scrapes along the way make some fingerprints sticky labels
    elapsed = time.monotonic() - started

    assert wait_until(lambda: value(scrape(proxy), "pgscout_statements_total",
                                    application=app_name) >= DISTINCT_SHAPES, timeout=30)
    text = scrape(proxy)
    per_fingerprint = labelled_series(text)
    total = series(text)
    fixed = total - sum(per_fingerprint.values())
    print(f"\n{DISTINCT_SHAPES} distinct shapes sent in {elapsed:.1f} s: {total} series in /metrics "
          f"({len(per_fingerprint)} labelled fingerprints with {max(per_fingerprint.values())} "
          f"series each, {fixed} others; {baseline} before the flood; top_k={TOP_K}, "
          f"max_fingerprints={MAX_FINGERPRINTS})")
    assert len(per_fingerprint) <= TOP_K
    # Series without a fingerprint label: the idle proxy's, plus this one application's.
    assert fixed <= baseline + APPLICATION_SERIES
    assert total <= TOP_K * max(per_fingerprint.values()) + baseline + APPLICATION_SERIES
    assert value(text, "pgscout_fingerprints_tracked") <= MAX_FINGERPRINTS
    # The flood is counted under "other" (less what was exported under a label before).
    assert value(text, "pgscout_fingerprint_calls_total", fingerprint="other") >= 0.99 * DISTINCT_SHAPES
    assert api(proxy, "/api/fingerprints?limit=1000")["tracked"] <= MAX_FINGERPRINTS


def series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def labelled_series(text: str) -> dict[str, int]:
    """For each fingerprint with a label of its own, the number of series carrying it."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get("fingerprint")
            if label is not None and label != "other":
                counts[label] = counts.get(label, 0) + 1
    return counts


def test_a_budget_that_is_not_enforced_says_it_is_over(start_pgscout, tmp_path, app_name):
    config = tmp_path / "pgscout.yaml"
    config.write_text(f"budgets:\n  - {{name: obs-soft, application_name: {app_name}, max_connections: 2}}\n")
    proxy = start_pgscout(config=config)
    connections = [psycopg.connect(proxy_dsn(proxy, app_name)) for _ in range(4)]
    try:
        budget, = api(proxy, "/api/connections")["budgets"]
        assert (budget["current"], budget["over_budget"]) == (4, True)
        assert wait_until(lambda: logged(proxy, "budget_exceeded", budget="obs-soft"), timeout=5)
        exceeded = logged(proxy, "budget_exceeded", budget="obs-soft")
        # Rate-limited: one record for passing the limit, not one per session over it.
        assert [(e["current"], e["over_by"], e["enforce"], e["level"]) for e in exceeded] == \
            [(3, 1, False, "warning")]
    finally:
        for connection in connections:
            connection.close()
    assert wait_until(lambda: not api(proxy, "/api/connections")["budgets"][0]["over_budget"], timeout=5)
