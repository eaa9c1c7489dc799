"""pgscout's statements relate to pg_stat_statements through the normalized text, as the README
says, and pgscout's latency (measured at the proxy) is at least the server's execution time.

Owns: a cluster of its own with pg_stat_statements preloaded (the shared one has no
shared_preload_libraries), driven through pgscout by psycopg with literals, parameters, comments
and line breaks.
Must not: depend on the shared `pg` cluster's settings.
"""

from __future__ import annotations

import json
import re

import psycopg
import pytest

from pgharness import APP_DATABASE, Pgscout, PgCluster
from pgscout.demo import localpg

# The README's join, word for word apart from the parameter.
README_JOIN = """
SELECT queryid, calls, total_exec_time / calls AS mean_exec_ms
  FROM pg_stat_statements
 WHERE btrim(regexp_replace(regexp_replace(query, '/\\*.*?\\*/', '', 'g'), '\\s+', ' ', 'g'))
       = %s
"""
CALLS = 20


@pytest.fixture(scope="module")
def cluster():
    cluster = PgCluster().create()
    try:
        cluster.stop()
        localpg.append_settings(cluster.data_dir, "pg_stat_statements",
                                {"shared_preload_libraries": "'pg_stat_statements'"})
        cluster.start()
        cluster.psql("-c", "CREATE EXTENSION pg_stat_statements", dsn=cluster.dsn("postgres", APP_DATABASE))
        yield cluster
    finally:
        cluster.destroy()


def test_normalized_text_joins_pgscout_statements_to_pg_stat_statements(cluster):
    proxy = Pgscout(cluster.upstream_url()).start()
    try:
        with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
            connection.execute("CREATE TABLE orders (id int PRIMARY KEY, customer_id int)")
            connection.execute("INSERT INTO orders SELECT g, g % 7 FROM generate_series(1, 500) g")
            for i in range(CALLS):
                connection.execute("SELECT * FROM orders WHERE customer_id = %s", (i % 7,)).fetchall()
                connection.execute(f"/* controller='orders' */ SELECT count(*)\n  FROM orders\n"
                                   f" WHERE id > {i}").fetchall()
        status, body = proxy.admin_get("/api/fingerprints?limit=1000")
        assert status == 200
        ours = {re.sub(r"\s+", " ", f["normalized"]).strip(): f
                for f in json.loads(body)["fingerprints"] if "orders" in f["normalized"]}
    finally:
        proxy.cleanup()

    with psycopg.connect(cluster.dsn("postgres", APP_DATABASE)) as direct:
        for text in ("SELECT * FROM orders WHERE customer_id = $1",
                     "SELECT count(*) FROM orders WHERE id > $1"):
            assert text in ours, list(ours)
            rows = direct.execute(README_JOIN, (text,)).fetchall()
            assert len(rows) == 1, (text, rows)
            _, calls, mean_exec_ms = rows[0]
            assert calls == ours[text]["calls"] == CALLS
            # Measured at the proxy: network, planning and the result's transfer on top.
            assert ours[text]["mean_seconds"] * 1000 >= mean_exec_ms
