"""The analysis process behind the data plane: traffic never waits for it, and it comes back.

Owns: what a user sees when analysis falls behind (statements still complete at once, what could
not be analysed is counted as shed), when the analysis process dies (it is started again and
observation resumes), and that an admin request made right after traffic sees that traffic.
Must not: look inside either process: pgscout's own /metrics, the clients and the process table.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import time

import psycopg

from pgharness import APP_DATABASE, child_pids, wait_until
from pgscout.histogram import Histogram


def metric(proxy, name: str) -> float:
    status, body = proxy.admin_get("/metrics", timeout=15)
    assert status == 200, body
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(body))


def analysis_pid(proxy) -> int:
    assert wait_until(lambda: child_pids(proxy.process.pid), timeout=10)
    [pid] = child_pids(proxy.process.pid)
    return pid


def test_a_stopped_analysis_process_costs_traffic_nothing_and_what_it_missed_is_counted(start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_STATEMENTS_ANALYSIS_BACKLOG_BYTES": "65536"})
    pid = analysis_pid(proxy)
    padding = "x" * 1000
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
            for i in range(3000):
                connection.execute(f"select {i}, '{padding}'")
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    analysed = metric(proxy, "pgscout_statements_total")
    shed = metric(proxy, "pgscout_analysis_records_shed_total")
    assert shed > 0
    assert analysed + shed == 3000
    assert elapsed < 30


def test_the_analysis_process_only_runs_on_cpu_nothing_else_wants(start_pgscout):
    """A wake-up of the data plane or of a backend never waits for analysis to end its slice."""
    proxy = start_pgscout()
    pid = analysis_pid(proxy)
    assert wait_until(lambda: os.sched_getscheduler(pid) == os.SCHED_IDLE, timeout=10)
    assert os.sched_getscheduler(proxy.process.pid) == os.SCHED_OTHER
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: child_pids(proxy.process.pid) not in ([], [pid]), timeout=10)
    [restarted] = child_pids(proxy.process.pid)
    assert wait_until(lambda: os.sched_getscheduler(restarted) == os.SCHED_IDLE, timeout=10)


def test_an_analysis_process_that_dies_is_started_again(start_pgscout):
    proxy = start_pgscout()
    old = analysis_pid(proxy)
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: child_pids(proxy.process.pid) not in ([], [old]), timeout=10)
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
        connection.execute("select 1").fetchone()
    # Until the new process is up, /metrics says analysis is unavailable (503).
    assert wait_until(lambda: proxy.admin_get("/metrics")[0] == 200, timeout=15)
    assert metric(proxy, "pgscout_analysis_restarts_total") == 1
    assert any(entry["event"] == "analysis_exited" for entry in proxy.logs())


def test_a_restarted_analysis_process_knows_the_sessions_opened_before_it(start_pgscout):
    """A pool's connections outlive an analysis process that dies: the new one is told who they
    are, or their statements would count under no application for as long as they live."""
    proxy = start_pgscout()
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, application_name="long-lived"),
                         autocommit=True) as connection:
        connection.execute("select 1")
        old = analysis_pid(proxy)
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: child_pids(proxy.process.pid) not in ([], [old]), timeout=10)
        assert wait_until(lambda: proxy.admin_get("/metrics")[0] == 200, timeout=15)
        for i in range(20):
            connection.execute(f"select {i}")
        connection.execute("set application_name = 'renamed'")
        connection.execute("select 'after the rename'")
        # The SET counts under its new name: its ParameterStatus comes before its completion.
        assert wait_until(lambda: metric(
            proxy, 'pgscout_statements_total{application="renamed"}') == 2, timeout=10)
    assert metric(proxy, 'pgscout_statements_total{application="long-lived"}') == 20
    assert metric(proxy, 'pgscout_statements_total{application=""}') == 0


def test_a_request_right_after_traffic_sees_that_traffic(start_pgscout):
    proxy = start_pgscout()
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, application_name="seen"),
                         autocommit=True) as connection:
        for i in range(500):
            connection.execute(f"with c{i} as (select {i}) select * from c{i}")
    assert metric(proxy, 'pgscout_statements_total') == 500


def test_a_histogram_survives_the_trip_to_the_analysis_process():
    """Connection lifetimes travel in the data plane's snapshot; compiled, a class pickles only
    what it says it does."""
    histogram = Histogram((1.0, 2.0))
    histogram.observe(1.5)
    copy = pickle.loads(pickle.dumps(histogram))
    assert (copy.cumulative(), copy.sum, copy.count) == (histogram.cumulative(), 1.5, 1)
