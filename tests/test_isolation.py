"""Observation never disturbs the traffic: a bystander session's latency while large or hostile SQL
runs through the same pgscout, and pgscout's memory through inputs that would grow a proxy
bounded by entries rather than bytes.

Owns: the verdicts: the bystander's p99 within 3x its idle p99 (or idle + 20 ms), no gap over
1 s, /healthz answering, RSS within half the pod's limit. The attacks are in tests/attacks.py.
Must not: read pgscout's internals: what a user sees is the bystander's latency, pgscout's RSS
(data-plane and analysis processes together) and what /metrics and /api say.
"""

from __future__ import annotations

import json
import time

import pytest

from attacks import (DISTINCT_LARGE_STATEMENTS, LATENCY_ATTACKS, PIPELINED_SYNCS, Bystander, p99,
                     run_client)
from pgharness import APP_DATABASE, rss_bytes

MIB = 1024 * 1024
POD_MEMORY_LIMIT = 256 * MIB  # what deploy/kubernetes ships

pytestmark = pytest.mark.slow


@pytest.fixture
def bystander(pgscout):
    watcher = Bystander(pgscout.dsn("trust_user", APP_DATABASE))
    watcher.start()
    time.sleep(2.0)
    idle = watcher.measure()
    yield watcher, idle
    watcher.stop()


@pytest.mark.parametrize("attack", list(LATENCY_ATTACKS))
def test_a_bystander_does_not_notice_large_or_hostile_sql(pgscout, bystander, attack):
    watcher, idle = bystander
    run_client(pgscout.dsn("trust_user", APP_DATABASE), LATENCY_ATTACKS[attack])
    time.sleep(0.5)  # the analysis of what was just sent still runs: the bystander must not care
    during = watcher.measure()
    budget = max(3 * p99(idle), p99(idle) + 0.020)
    assert p99(during) <= budget, (attack, p99(idle), p99(during))
    assert max(during) < 1.0, (attack, max(during))
    status, _ = pgscout.admin_get("/healthz", timeout=1.0)
    assert status == 200


def test_distinct_large_statements_keep_memory_bounded_and_responses_capped(pgscout, bystander):
    watcher, idle = bystander
    run_client(pgscout.dsn("trust_user", APP_DATABASE), DISTINCT_LARGE_STATEMENTS)
    assert rss_bytes(pgscout.process.pid) < POD_MEMORY_LIMIT / 2
    started = time.perf_counter()
    status, body = pgscout.admin_get("/api/fingerprints?limit=1000", timeout=30)
    assert status == 200
    assert len(body) < 8 * MIB
    assert time.perf_counter() - started < 5
    assert rss_bytes(pgscout.process.pid) < POD_MEMORY_LIMIT / 2
    assert any(entry["calls"] for entry in json.loads(body)["fingerprints"])
    assert max(watcher.measure()) < 1.0


def test_pipelined_syncs_behind_a_slow_statement_cost_no_memory_per_message(pgscout, bystander):
    watcher, idle = bystander
    before = rss_bytes(pgscout.process.pid)
    run_client(pgscout.dsn("trust_user", APP_DATABASE), PIPELINED_SYNCS)
    assert rss_bytes(pgscout.process.pid) - before < 64 * MIB
    # 7.2 million 5-byte messages each way: decoding them one by one kept the loop busy for
    # seconds; runs of identical messages are decoded at once.
    assert max(watcher.measure()) < 1.0
