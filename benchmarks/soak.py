"""Soak test: many clients through pgscout for minutes, with clients killed mid-statement and
the upstream restarted twice, every answer checked against its known value.

    python benchmarks/soak.py --minutes 10 [--clients 20] [--seed N]

Starts a throwaway PostgreSQL and a pgscout exactly as the integration tests do, runs `--clients`
asyncpg clients, restarts the server (pg_ctl -m fast) at one and two thirds of the run, and
prints counts: statements sent, answers verified, errors seen by kind, wrong answers. Exits 1
if any answer was wrong, a client hung, or pgscout died or kept a session or a backend.

Owns: the workload, its expected values and the tallies.
Must not: accept a wrong answer as an error (a short or altered result is the failure this
exists to catch), or run in CI (it takes minutes by design).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import random
import sys
import time
from pathlib import Path

import asyncpg
import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pgharness import APP_DATABASE, PgCluster, Pgscout, interrupt_on_termination, wait_until  # noqa: E402

LEDGER_ROWS = 10_000
# No statement of the workload takes this long on a healthy path: past it, a client counts as hung.
STATEMENT_TIMEOUT_SECONDS = 30
KILL_PROBABILITY = 0.02
WRONG_RESULTS_SHOWN = 10


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.verified = 0
        self.wrong: list[str] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.client_kills = 0
        self.sessions = 0

    def check(self, what: str, got: object, expected: object) -> None:
        if got == expected:
            self.verified += 1
        else:
            self.wrong.append(f"{what}: got {got!r}, expected {expected!r}")


# -- one statement each, with its expected value ------------------------------------------------

async def doubled(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> None:
    value = rng.randint(-10**9, 10**9)
    tally.check("select $1 * 2", await conn.fetchval("select $1::bigint * 2", value), value * 2)


async def ledger_sum(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> None:
    upto = rng.randint(1, LEDGER_ROWS)
    tally.check(f"sum of ledger up to {upto}",
                await conn.fetchval("select sum(amount) from ledger where id <= $1", upto),
                upto * (upto + 1) // 2)


async def large_result(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> None:
    count = rng.randint(1_000, 50_000)
    rows = await conn.fetch("select g, md5(g::text) from generate_series(1, $1) g", count)
    tally.check(f"{count}-row result", (len(rows), rows[-1][1] if rows else None),
                (count, hashlib.md5(str(count).encode()).hexdigest()))


async def copy_round_trip(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> None:
    records = [(i, f"row-{rng.getrandbits(64):x}") for i in range(rng.randint(1, 5_000))]
    async with conn.transaction():
        await conn.execute("create temp table if not exists soak_copy (id int, note text) on commit delete rows")
        await conn.copy_records_to_table("soak_copy", records=records)
        received = bytearray()

        async def collect(chunk: bytes) -> None:
            received.extend(chunk)

        await conn.copy_from_query("select id, note from soak_copy order by id", output=collect)
    expected = "".join(f"{i}\t{note}\n" for i, note in records).encode()
    tally.check(f"COPY round trip of {len(records)} rows", hashlib.sha256(received).hexdigest(),
                hashlib.sha256(expected).hexdigest())


async def simple_protocol_batch(conn: asyncpg.Connection, rng: random.Random, tally: Tally) -> None:
    """Several statements in one simple Query (no parameters: asyncpg sends it as text)."""
    value = rng.randint(1, 10**6)
    await conn.execute(f"create temp table if not exists soak_batch (v int); "
                       f"truncate soak_batch; insert into soak_batch values ({value}), ({value + 1})")
    tally.check("simple-protocol batch", await conn.fetchval("select sum(v) from soak_batch"), 2 * value + 1)


WORKLOAD = [doubled, doubled, ledger_sum, ledger_sum, large_result, copy_round_trip, simple_protocol_batch]


# -- clients -------------------------------------------------------------------------------------

async def kill_mid_statement(conn: asyncpg.Connection, rng: random.Random) -> None:
    """The application process dies while a statement runs: the socket just closes."""
    statement = rng.choice(["select pg_sleep(5)", "select g, md5(g::text) from generate_series(1, 2000000) g"])
    running = asyncio.ensure_future(conn.fetch(statement))
    await asyncio.sleep(rng.uniform(0, 0.3))
    conn.terminate()
    try:
        await running
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        pass


async def client(dsn: str, number: int, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed * 1000 + number)
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(dsn, timeout=10, command_timeout=STATEMENT_TIMEOUT_SECONDS)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            tally.errors[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.2)
            continue
        tally.sessions += 1
        try:
            for _ in range(rng.randint(1, 300)):
                if time.monotonic() >= deadline:
                    break
                if rng.random() < KILL_PROBABILITY:
                    tally.client_kills += 1
                    await kill_mid_statement(conn, rng)
                    break
                tally.sent += 1
                await rng.choice(WORKLOAD)(conn, rng, tally)
        except TimeoutError:
            tally.errors["statement hung (timeout)"] += 1
        # InternalClientError: asyncpg's own state machine after the server's unsolicited FATAL
        # at a restart (MagicStack/asyncpg#1069, seen without any proxy too).
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            tally.errors[f"statement: {type(exc).__name__}"] += 1
        finally:
            conn.terminate()


async def restarts(cluster: PgCluster, minutes: float, started: float, log: list[str]) -> None:
    for third in (1, 2):
        await asyncio.sleep(max(0.0, started + minutes * 60 * third / 3 - time.monotonic()))
        began = time.monotonic()
        await asyncio.to_thread(cluster.restart)
        log.append(f"upstream restart {third} took {time.monotonic() - began:.1f} s")


async def soak(proxy: Pgscout, cluster: PgCluster, minutes: float, clients: int, seed: int) -> tuple[Tally, list[str]]:
    tally = Tally()
    log: list[str] = []
    dsn = proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None)
    started = time.monotonic()
    deadline = started + minutes * 60
    await asyncio.gather(restarts(cluster, minutes, started, log),
                         *(client(dsn, n, deadline, seed, tally) for n in range(clients)))
    return tally, log


# -- the process around it -----------------------------------------------------------------------

def proxy_resources(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss // 1024


def leftover_backends(cluster: PgCluster) -> int:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return conn.execute("select count(*) from pg_stat_activity where datname = %s and "
                            "backend_type = 'client backend'", (APP_DATABASE,)).fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgscout soak test (minutes; not part of CI)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    interrupt_on_termination()
    cluster = PgCluster().create()
    proxy = Pgscout(cluster.upstream_url(), env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": "2"})
    try:
        cluster.psql("-c", "CREATE TABLE ledger (id int PRIMARY KEY, amount int NOT NULL)",
                     "-c", f"INSERT INTO ledger SELECT g, g FROM generate_series(1, {LEDGER_ROWS}) g",
                     dsn=cluster.dsn("trust_user", APP_DATABASE))
        proxy.start()
        pid = proxy.process.pid
        fds_before, rss_before = proxy_resources(pid)
        print(f"soak: {args.clients} clients for {args.minutes:g} min through pgscout pid {pid}", flush=True)
        tally, log = asyncio.run(soak(proxy, cluster, args.minutes, args.clients, args.seed))
        alive = proxy.process.poll() is None
        drained = alive and wait_until(lambda: leftover_backends(cluster) == 0, timeout=10)
        fds_after, rss_after = proxy_resources(pid) if alive else (-1, -1)
    finally:
        proxy.stop()
        cluster.destroy()

    for line in log:
        print(line)
    print(f"client sessions:      {tally.sessions}")
    print(f"statements sent:      {tally.sent}")
    print(f"answers verified:     {tally.verified}")
    print(f"clients killed:       {tally.client_kills}")
    print(f"wrong answers:        {len(tally.wrong)}")
    for wrong in tally.wrong[:WRONG_RESULTS_SHOWN]:
        print(f"  {wrong}")
    print("errors seen:")
    for kind, count in tally.errors.most_common():
        print(f"  {count:7d}  {kind}")
    print(f"pgscout: {'alive' if alive else 'DIED'}, fds {fds_before} -> {fds_after}, "
          f"RSS {rss_before} -> {rss_after} MiB, backends left behind: {'none' if drained else 'SOME'}")
    hung = tally.errors["statement hung (timeout)"]
    return 0 if not tally.wrong and not hung and alive and drained else 1


if __name__ == "__main__":
    sys.exit(main())
