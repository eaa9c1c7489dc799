"""/readyz means a session can be established through pgscout (TCP, TLS and startup), learnt from
the sessions themselves between probes; pgscout_upstream_connect_errors_total counts every such
failure; pgscout_upstream_up follows a server that stops within moments.

Owns: readiness and the upstream-failure signals as Kubernetes and Prometheus see them, against
the real PostgreSQL of the `pg` fixture (stopped, SIGSTOPped and misconfigured for TLS here).
Must not: leave the shared server stopped or frozen (every test restores it in `finally`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import psycopg
import pytest

from pgharness import APP_DATABASE, UNCERTIFIED_LOOPBACK, Pgscout, wait_until

CONNECT_TIMEOUT_SECONDS = 1.0
FAST = {"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)}


def metric(proxy, name: str) -> float | None:
    status, text = proxy.admin_get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def probes_in_server_log(pg) -> int:
    return len(re.findall(r"connection authorized: .*application_name=pgscout-readiness",
                          pg.log_file.read_text(errors="replace")))


def test_tls_verification_failure_makes_pgscout_unready_and_is_counted(pg, start_pgscout):
    # The server's certificate does not name 127.0.0.2: verify-full must refuse every session.
    upstream = pg.upstream_url(host=UNCERTIFIED_LOOPBACK, sslmode="verify-full", sslrootcert=pg.ca_cert)
    proxy = start_pgscout(upstream=upstream, env=FAST)
    status, body = proxy.admin_get("/readyz")
    assert status == 503, body
    assert "certificate verification failed" in body and "sslmode=verify-full" in body, body
    assert metric(proxy, "pgscout_upstream_connect_errors_total") == 0  # a probe is not a session
    with pytest.raises(psycopg.OperationalError, match="certificate verification failed"):
        psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
    assert metric(proxy, "pgscout_upstream_connect_errors_total") == 1


def test_a_frozen_server_makes_pgscout_unready(pg, start_pgscout):
    """SIGSTOP: the kernel still completes TCP handshakes, but no startup is ever answered."""
    proxy = start_pgscout(env=FAST)
    assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 200, timeout=5)
    postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    try:
        time.sleep(3.5)  # let the last evidence age
        started = time.monotonic()
        status, body = proxy.admin_get("/readyz")
        print(f"\n/readyz on a frozen server: {status} after {time.monotonic() - started:.2f} s: {body.strip()}")
        assert status == 503, body
        assert "did not answer a session startup" in body, body
    finally:
        os.kill(postmaster, signal.SIGCONT)
    assert wait_until(lambda: proxy.admin_get("/readyz")[0] == 200, timeout=10)


def test_sessions_feed_readiness_between_probes(pg, start_pgscout):
    proxy = start_pgscout(env=FAST)
    before = probes_in_server_log(pg)
    assert proxy.admin_get("/readyz")[0] == 200  # no session yet: a probe of its own
    assert wait_until(lambda: probes_in_server_log(pg) == before + 1, timeout=5)
    # While sessions keep starting, /readyz answers from them and probes nothing.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
        status, body = proxy.admin_get("/readyz")
        assert status == 200 and "accepts sessions" in body, body
        time.sleep(0.2)
    assert probes_in_server_log(pg) == before + 1

    # A session's failure makes it unready at once, before any probe would have run.
    pg.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
        status, body = proxy.admin_get("/readyz")
        assert status == 503 and "could not connect" in body, body
        assert metric(proxy, "pgscout_upstream_connect_errors_total") == 1
    finally:
        pg.start()
    psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
    assert proxy.admin_get("/readyz")[0] == 200  # the session that worked says so


def test_upstream_up_follows_a_server_that_stops_within_moments(pg, start_pgscout):
    proxy = start_pgscout(env=FAST)  # control.refresh_seconds stays at its 30 s default
    assert wait_until(lambda: metric(proxy, "pgscout_upstream_up") == 1, timeout=5)
    pg.stop()
    try:
        stopped = time.monotonic()
        assert wait_until(lambda: metric(proxy, "pgscout_upstream_up") == 0, timeout=5)
        print(f"\npgscout_upstream_up went 0 {time.monotonic() - stopped:.2f} s after the server stopped")
    finally:
        pg.start()


class ForwardOnlyPgscout(Pgscout):
    @property
    def argv(self) -> list[str]:
        return [*super().argv, "--forward-only"]


def test_forward_only_keeps_readiness_counts_and_budgets_but_observes_no_statement(pg, tmp_path):
    """What the README says --forward-only keeps and drops."""
    config = tmp_path / "pgscout.yaml"
    config.write_text("budgets:\n  - {name: fwd, application_name: fwd-app, max_connections: 1}\n")
    proxy = ForwardOnlyPgscout(pg.upstream_url(), config=config).start()
    try:
        dsn = proxy.dsn("trust_user", APP_DATABASE, application_name="fwd-app")
        with psycopg.connect(dsn) as first, psycopg.connect(dsn):
            assert first.execute("SELECT 41 + 1").fetchone() == (42,)
            status, body = proxy.admin_get("/readyz")
            assert status == 200 and "accepts sessions" in body, body
            report = json.loads(proxy.admin_get("/api/connections")[1])
            assert [(r["state"], r["count"]) for r in report["live"]] == [("starting", 2)]
            budget, = report["budgets"]
            assert (budget["current"], budget["over_budget"]) == (2, True)
        assert json.loads(proxy.admin_get("/api/fingerprints")[1])["fingerprints"] == []
    finally:
        proxy.cleanup()
