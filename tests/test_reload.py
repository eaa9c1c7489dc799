"""SIGHUP reloads the config file without dropping connections; a bad file keeps the old config."""

from __future__ import annotations

import asyncio
import signal

import asyncpg

import psycopg
import pytest

from pgharness import wait_until


def _write(path, threshold_ms: int, budget_max: int, enforce: bool) -> None:
    path.write_text(
        f"slowlog:\n  threshold_ms: {threshold_ms}\n"
        f"budgets:\n  - name: reload-app\n    application_name: reload-app\n"
        f"    max_connections: {budget_max}\n    enforce: {'true' if enforce else 'false'}\n")


def _events(proxy, name: str) -> list[dict]:
    return [line for line in proxy.logs() if line.get("event") == name]


def test_sighup_applies_thresholds_and_budgets_live_and_rejects_a_bad_file(tmp_path, start_pgscout):
    config = tmp_path / "pgscout.yaml"
    _write(config, threshold_ms=60000, budget_max=10, enforce=False)
    proxy = start_pgscout(config=config)
    dsn = proxy.dsn("trust_user", "app", application_name="reload-app")
    with psycopg.connect(dsn, autocommit=True) as held:
        held.execute("select pg_sleep(0.2)")
        assert not _events(proxy, "slow_query")

        _write(config, threshold_ms=100, budget_max=1, enforce=True)
        proxy.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _events(proxy, "config_reloaded"), 5)

        # The held connection survived the reload and now sees the new threshold.
        held.execute("select pg_sleep(0.2)")
        assert wait_until(lambda: _events(proxy, "slow_query"), 5)
        # The budget now enforces one connection for this application: the held one.
        with pytest.raises(asyncpg.TooManyConnectionsError) as refused:  # SQLSTATE 53300
            asyncio.run(asyncpg.connect(dsn))
        assert 'budget "reload-app" allows 1 connections' in str(refused.value)

        config.write_text("slowlog:\n  threshold_ms: not-a-number\n")
        proxy.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _events(proxy, "config_reload_failed"), 5)
        failure = _events(proxy, "config_reload_failed")[0]
        assert "slowlog.threshold_ms" in failure["error"]
        # The previous configuration stays in force.
        held.execute("select pg_sleep(0.15)")
        assert wait_until(lambda: len(_events(proxy, "slow_query")) == 2, 5)


def test_sighup_reports_settings_that_need_a_restart(tmp_path, start_pgscout):
    config = tmp_path / "pgscout.yaml"
    config.write_text("metrics:\n  top_k: 50\n")
    proxy = start_pgscout(config=config)
    config.write_text("metrics:\n  top_k: 5\n")
    proxy.send_signal(signal.SIGHUP)
    assert wait_until(lambda: _events(proxy, "config_reloaded"), 5)
    assert _events(proxy, "config_reloaded")[0]["needs_restart"] == ["metrics.top_k"]
    with psycopg.connect(proxy.dsn("trust_user", "app")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
