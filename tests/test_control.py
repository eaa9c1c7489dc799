"""pgscout's control connection and `pgscout budget`, against the real PostgreSQL of the `pg` fixture."""

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys

import asyncpg
import pytest

from pgharness import free_port
from pgscout.control.limits import UpstreamLimits
from pgscout.settings import parse_upstream_url
from pgscout.control.sizing import add_budget_command, budget_report


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def info(self, event, **fields):
        self.lines.append(("info", event, fields))

    def warning(self, event, **fields):
        self.lines.append(("warning", event, fields))


def upstream(pg, user="postgres", password=None):
    return dataclasses.replace(parse_upstream_url(pg.upstream_url()), user=user, password=password)


def unreachable():
    return parse_upstream_url(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?sslmode=disable")


async def superuser_connection(pg):
    # connect_timeout=None: asyncpg would send it to the server as a setting.
    return await asyncpg.connect(pg.dsn(connect_timeout=None))


async def test_limits_match_the_server_settings(pg):
    limits = UpstreamLimits(upstream(pg), refresh_seconds=30, log=RecordingLog())
    await limits.refresh()
    snapshot = limits.snapshot()
    await limits.stop()
    direct = await superuser_connection(pg)
    try:
        expected = {name: await direct.fetchval(f"SHOW {name}")
                    for name in ("max_connections", "superuser_reserved_connections", "server_version")}
    finally:
        await direct.close()
    assert snapshot["ok"] is True and snapshot["last_error"] is None
    assert snapshot["max_connections"] == int(expected["max_connections"]) == 200
    assert snapshot["superuser_reserved_connections"] == int(expected["superuser_reserved_connections"])
    assert snapshot["reserved_connections"] == 0  # PostgreSQL 15 has no reserved_connections
    assert snapshot["server_version"] == expected["server_version"]
    assert snapshot["available_connections"] == 200 - snapshot["superuser_reserved_connections"]
    assert isinstance(snapshot["checked_at"], float)


async def no_other_clients(limits):
    """Wait until backends of connections closed by earlier tests have exited."""
    async with asyncio.timeout(10):
        while True:
            await limits.refresh()
            if limits.snapshot()["client_backends"] == 0:
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("control_user, exact", [("postgres", True), ("trust_user", False)])
async def test_client_backends_count_every_client_of_the_server(pg, control_user, exact):
    # Without pg_read_all_stats (trust_user) other roles' backends are counted all the same.
    limits = UpstreamLimits(upstream(pg, user=control_user), refresh_seconds=30, log=RecordingLog())
    await no_other_clients(limits)
    other = await asyncpg.connect(pg.dsn("md5_user", connect_timeout=None))
    try:
        await limits.refresh()
        snapshot = limits.snapshot()
    finally:
        await other.close()
        await limits.stop()
    assert snapshot["client_backends"] == 1
    assert snapshot["client_backends_exact"] is exact


async def test_unreachable_upstream_is_reported_not_raised_and_logged_once(pg):
    log = RecordingLog()
    target = unreachable()
    limits = UpstreamLimits(target, refresh_seconds=30, log=log)
    await limits.refresh()
    await limits.refresh()
    snapshot = limits.snapshot()
    assert snapshot["ok"] is False
    assert snapshot["max_connections"] is None
    assert snapshot["last_error"].startswith(f"pgscout control connection to {target.display()} failed:")
    assert "refused" in snapshot["last_error"].lower()
    assert [line[1] for line in log.lines] == ["control_connection_failed"]


async def test_rejected_credentials_say_which_user_and_how_to_fix_it(pg):
    limits = UpstreamLimits(upstream(pg, user="md5_user"), refresh_seconds=30, log=RecordingLog())
    await limits.refresh()
    error = limits.snapshot()["last_error"]
    assert limits.snapshot()["ok"] is False
    assert "as user md5_user was rejected" in error
    assert 'password authentication failed for user "md5_user"' in error
    assert "PGUSER/PGPASSWORD" in error
    with_password = UpstreamLimits(upstream(pg, user="md5_user", password="md5-secret"),
                                   refresh_seconds=30, log=RecordingLog())
    await with_password.refresh()
    await with_password.stop()
    assert with_password.snapshot()["ok"] is True


async def test_reconnects_when_the_control_connection_dies(pg):
    log = RecordingLog()
    limits = UpstreamLimits(upstream(pg), refresh_seconds=30, log=log)
    await limits.refresh()
    direct = await superuser_connection(pg)
    try:
        terminated = await direct.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pgscout-control'")
    finally:
        await direct.close()
    assert terminated >= 1  # ours, and any earlier test's that has not finished exiting
    await limits.refresh()
    await limits.stop()
    assert limits.snapshot()["ok"] is True
    assert log.lines == []


async def test_background_task_reads_and_stops(pg):
    limits = UpstreamLimits(upstream(pg), refresh_seconds=0.05, log=RecordingLog())
    limits.start()
    try:
        async with asyncio.timeout(10):
            while limits.snapshot()["checked_at"] is None:
                await asyncio.sleep(0.01)
            first = limits.snapshot()["checked_at"]
            while limits.snapshot()["checked_at"] == first:  # it keeps refreshing
                await asyncio.sleep(0.01)
    finally:
        await limits.stop()
    assert limits.snapshot()["ok"] is True


async def test_budget_report_prints_the_verdict(pg):
    text, code = await budget_report(upstream(pg), pool_size=5, max_overflow=10, workers=2, replicas=2)
    assert code == 0
    assert text.startswith(f"Upstream 127.0.0.1:{pg.port}: PostgreSQL 15")
    assert "max_connections 200" in text
    assert "Verdict: OK" in text
    text, code = await budget_report(upstream(pg), pool_size=5, max_overflow=10, workers=4, replicas=6)
    assert code == 1
    assert "Verdict: OVER" in text


async def test_budget_report_without_a_server(pg):
    text, code = await budget_report(unreachable(), pool_size=5, max_overflow=10, workers=1, replicas=1)
    assert code == 2
    assert text.startswith("pgscout budget: cannot read the server's limits: pgscout control connection to")


def test_budget_command_end_to_end(pg, capsys, monkeypatch):
    for variable in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"):
        monkeypatch.delenv(variable, raising=False)
    parser = argparse.ArgumentParser(prog="pgscout")
    add_budget_command(parser.add_subparsers(dest="command"))
    url = pg.upstream_url()
    args = parser.parse_args(["budget", "--pool-size", "5", "--max-overflow", "10", "--workers", "4",
                              "--replicas", "6", "--upstream", url])
    assert args.handler(args) == 1
    assert "Verdict: OVER" in capsys.readouterr().out


async def test_an_unresolvable_host_is_said_in_words(pg):
    target = parse_upstream_url("postgresql://postgres@no-such-host.invalid/postgres?sslmode=disable")
    limits = UpstreamLimits(target, refresh_seconds=30, log=RecordingLog())
    await limits.refresh()
    error = limits.snapshot()["last_error"]
    assert "cannot resolve host 'no-such-host.invalid'" in error, error
    assert "Unknown error" not in error


@pytest.mark.parametrize("command", ["budget", "run"])
def test_an_upstream_that_is_not_a_url_is_refused_in_words(command):
    result = subprocess.run([sys.executable, "-m", "pgscout", command, "--upstream", "not a url"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PGSCOUT_ADMIN_LISTEN": "127.0.0.1:0"})
    assert result.returncode != 0
    assert ("proxy.upstream: expected a postgresql:// URL or HOST:PORT, got 'not a url'"
            in result.stderr), result.stderr


def test_budget_does_not_count_its_own_control_connection(pg):
    """With nothing else connected, `pgscout budget` sees zero other clients."""
    async def settle():
        limits = UpstreamLimits(upstream(pg), refresh_seconds=30, log=RecordingLog())
        await no_other_clients(limits)
        await limits.stop()
    asyncio.run(settle())
    result = subprocess.run([sys.executable, "-m", "pgscout", "budget", "--upstream", pg.upstream_url()],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "0 client connection(s) open right now" in result.stdout, result.stdout
