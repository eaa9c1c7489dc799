"""The admin port as Prometheus, curl and a browser meet it: /metrics negotiation, HEAD, 401s,
POST-only routes, and the metric naming conventions (labels, states, counters).

Owns: what a scraper or an operator sees on the real admin port of a real pgscout in front of
real PostgreSQL.
Must not: look inside the proxy process.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
import uuid

import psycopg
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pgharness import APP_DATABASE, wait_until
from pgscout.exposition.history import HISTORY_SECONDS, SAMPLE_SECONDS, History

TOKEN = "exposition-token"
OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def request(proxy, method: str, path: str, headers: dict[str, str] | None = None):
    """(status, headers with lower-case names, raw body) of one request on the admin port."""
    connection = http.client.HTTPConnection(proxy.host, proxy.admin_port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_metrics_negotiate_openmetrics_and_gzip_like_prometheus_client(start_pgscout):
    proxy = start_pgscout()
    status, headers, body = request(proxy, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in headers
    plain = body.decode()
    assert "pgscout_build_info" in plain

    # What Prometheus sends: OpenMetrics preferred, and gzip.
    status, headers, body = request(proxy, "GET", "/metrics",
                                    {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in headers["vary"]
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"pgscout_build", "pgscout_upstream_connect_errors", "pgscout_statements"} <= names
    print(f"\n/metrics: {len(plain)} bytes as text, {len(body)} bytes as gzipped OpenMetrics")
    assert len(body) < len(plain) / 3


def test_head_answers_without_a_body(start_pgscout):
    proxy = start_pgscout()
    for path in ("/healthz", "/", "/metrics", "/api/overview"):
        status, headers, body = request(proxy, "HEAD", path)
        assert (status, body) == (200, b""), path
        assert int(headers["content-length"]) > 0, path
    _, get_headers, get_body = request(proxy, "GET", "/")
    _, head_headers, _ = request(proxy, "HEAD", "/")
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))


def test_a_401_names_the_bearer_scheme(start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_ADMIN_TOKEN": TOKEN})
    status, headers, body = request(proxy, "GET", "/metrics")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="pgscout"'
    assert TOKEN.encode() not in body
    status, headers, _ = request(proxy, "GET", "/api/overview", {"Authorization": "Bearer wrong"})
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="pgscout", error="invalid_token"'
    assert request(proxy, "GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert request(proxy, "GET", "/healthz")[0] == 200


def test_methods_a_route_does_not_answer_get_405_with_allow(start_pgscout):
    proxy = start_pgscout()
    status, headers, _ = request(proxy, "POST", "/metrics")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, _ = request(proxy, "GET", "/api/reset")
    assert (status, headers["allow"]) == (405, "POST")
    assert request(proxy, "DELETE", "/nowhere")[0] == 404


def test_metric_labels_follow_one_convention(start_pgscout, tmp_path):
    application = f"conv-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "pgscout.yaml"
    config.write_text(f"budgets:\n  - {{name: conv, application_name: {application}, max_connections: 9}}\n")
    proxy = start_pgscout(config=config)
    dsn = proxy.dsn("trust_user", APP_DATABASE, application_name=application)
    with psycopg.connect(dsn) as connection, psycopg.connect(dsn) as aborted:
        connection.execute("SELECT g\n  FROM generate_series(1, 3) g\n WHERE g   > %s", (1,)).fetchall()
        aborted.execute("SELECT 1")
        try:
            aborted.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass
        _, _, body = request(proxy, "GET", "/metrics")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    budget, = [s for s in samples["pgscout_budget_info"] if s.labels["budget"] == "conv"]
    assert budget.labels["application"] == application and "application_name" not in budget.labels
    labels = {name for series in samples.values() for sample in series for name in sample.labels}
    assert "application_name" not in labels

    states = {s.labels["state"]: s.value for s in samples["pgscout_client_connections"]
              if s.labels["application"] == application}
    # psycopg's connection sits in a transaction after its SELECT (autocommit off).
    assert states == {"idle in transaction": 1, "idle in transaction (aborted)": 1}

    assert "pgscout_client_connection_opens_per_second" not in samples
    opened, = [s for s in samples["pgscout_client_connections_opened_total"]
               if s.labels["application"] == application]
    assert opened.value == 2

    queries = [s.labels["query"] for s in samples["pgscout_fingerprint_info"]]
    spread, = [q for q in queries if "generate_series" in q]
    assert spread.startswith("SELECT g FROM generate_series($") and spread.endswith("g WHERE g > $1"), spread
    assert not [q for q in queries if "\n" in q or "  " in q]


def fingerprints(proxy, headers=None) -> dict:
    status, _, body = request(proxy, "GET", "/api/fingerprints", headers)
    assert status == 200, body
    return json.loads(body)


def test_reset_forgets_statement_statistics_like_pg_stat_statements_reset(start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_ADMIN_TOKEN": TOKEN})
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
        connection.execute("SELECT 'before the reset'")
        assert wait_until(lambda: fingerprints(proxy, bearer)["tracked"] >= 1, timeout=5)
        assert fingerprints(proxy, bearer)["stats_reset"] is None
        _, _, overview = request(proxy, "GET", "/api/overview", bearer)
        statements_before = json.loads(overview)["statements"]

        # Protected like the rest, and only by POST from the page's own origin (or no browser).
        status, headers, _ = request(proxy, "POST", "/api/reset")
        assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="pgscout"')
        status, _, _ = request(proxy, "POST", "/api/reset",
                               {**bearer, "Origin": "http://evil.example", "Host": "127.0.0.1"})
        assert status == 403
        assert fingerprints(proxy, bearer)["tracked"] >= 1

        started = time.time()
        status, _, body = request(proxy, "POST", "/api/reset", bearer)
        assert status == 200, body
        assert json.loads(body)["stats_reset"] >= started
        after = fingerprints(proxy, bearer)
        assert (after["tracked"], after["fingerprints"], after["other"]["calls"]) == (0, [], 0)
        assert after["stats_reset"] >= started

        connection.execute("SELECT 'after the reset'")
        assert wait_until(lambda: [f["calls"] for f in fingerprints(proxy, bearer)["fingerprints"]] == [1],
                          timeout=5)
    # The process's own counters keep counting: Prometheus rates see no reset.
    _, _, overview = request(proxy, "GET", "/api/overview", bearer)
    assert json.loads(overview)["statements"] >= statements_before + 1


def test_history_serves_samples_taken_since_start(start_pgscout):
    proxy = start_pgscout()
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
        deadline = time.monotonic() + SAMPLE_SECONDS + 1
        while time.monotonic() < deadline:
            connection.execute("SELECT 1")
            time.sleep(0.01)
    status, _, body = request(proxy, "GET", "/api/history")
    assert status == 200
    history = json.loads(body)
    assert (history["sample_seconds"], history["history_seconds"]) == (SAMPLE_SECONDS, HISTORY_SECONDS)
    samples = history["samples"]
    assert len(samples) >= 2
    assert samples[-1]["statements"] > samples[0]["statements"]
    assert samples[-1]["now"] - samples[0]["now"] >= SAMPLE_SECONDS * 0.9
    assert samples[-1]["latency_buckets"][-1][0] == "+Inf"


def test_history_keeps_fifteen_minutes_and_no_more():
    readings = iter(range(10_000))
    history = History(lambda: {"now": next(readings)})
    for _ in range(1000):
        history.sample()
    kept = history.samples()
    assert len(kept) == HISTORY_SECONDS / SAMPLE_SECONDS == 180
    assert [kept[0]["now"], kept[-1]["now"]] == [820, 999]
