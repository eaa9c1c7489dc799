"""Isolation benchmark: what a bystander session notices while large or hostile SQL runs.

    python benchmarks/isolation.py [--out FILE]

Starts PostgreSQL, pgscout observing, pgscout --forward-only and the bare uvloop forwarder (the
floor for any asyncio proxy), and for each attack of tests/attacks.py measures, on each target in
turn (direct, pgscout, forward-only, bare), the bystander's
`select 1` p99 idle and during the attack, its longest round trip, and the proxy's peak RSS (both
pgscout processes). Prints a Markdown table.

Owns: the command line, the loop over attacks and targets, and the table.
Must not: define attacks (tests/attacks.py) or start servers differently from the tests.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from attacks import (DISTINCT_LARGE_STATEMENTS, LATENCY_ATTACKS, PIPELINED_SYNCS,  # noqa: E402
                     Bystander, p99, run_client)
from pgharness import APP_DATABASE, PgCluster, Pgscout, make_dsn, rss_bytes  # noqa: E402
from targets import BareForwarder, ForwardOnlyPgscout  # noqa: E402

ATTACKS = {**LATENCY_ATTACKS, "3,000 distinct ~100 KB statements": DISTINCT_LARGE_STATEMENTS,
           "4 sessions pipelining 36 MB of Sync behind pg_sleep": PIPELINED_SYNCS}


class PeakRss(threading.Thread):
    def __init__(self, pid: int | None):
        super().__init__(daemon=True)
        self.pid = pid
        self.start_rss = rss_bytes(pid) if pid else 0
        self.peak = self.start_rss
        self.stopping = threading.Event()

    def run(self) -> None:
        while self.pid and not self.stopping.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))


def measure(dsn: str, pid: int | None, program: str) -> dict[str, float]:
    bystander = Bystander(dsn)
    bystander.start()
    time.sleep(2.0)
    idle = bystander.measure()
    memory = PeakRss(pid)
    memory.start()
    started = time.perf_counter()
    run_client(dsn, program, timeout=600)
    elapsed = time.perf_counter() - started
    time.sleep(0.5)
    during = bystander.measure()
    memory.stopping.set()
    memory.join()
    bystander.stop()
    return {"attack_s": elapsed, "idle_p99_ms": 1000 * p99(idle), "p99_ms": 1000 * p99(during),
            "max_ms": 1000 * max(during), "rss_mib": memory.start_rss / 2**20,
            "peak_rss_mib": memory.peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="FILE", help="also write the table here")
    args = parser.parse_args()
    cluster = PgCluster().create()
    observed = Pgscout(cluster.upstream_url()).start()
    forward_only = ForwardOnlyPgscout(cluster.upstream_url()).start()
    bare = BareForwarder(cluster.host, cluster.port).start()
    targets = {"direct": (cluster.dsn("trust_user", APP_DATABASE), None),
               "pgscout": (observed.dsn("trust_user", APP_DATABASE), observed.process.pid),
               "pgscout forward-only": (forward_only.dsn("trust_user", APP_DATABASE),
                                        forward_only.process.pid),
               "bare forwarder": (make_dsn(bare.host, bare.port, "trust_user", APP_DATABASE, None),
                                  bare.pid)}
    lines = ["| attack | target | attack s | bystander p99 idle ms | p99 during ms | max ms | "
             "RSS MiB before | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    try:
        for attack, program in ATTACKS.items():
            for name, (dsn, pid) in targets.items():
                result = measure(dsn, pid, program)
                lines.append(
                    f"| {attack} | {name} | {result['attack_s']:.2f} | {result['idle_p99_ms']:.2f} | "
                    f"{result['p99_ms']:.2f} | {result['max_ms']:.1f} | "
                    + (f"{result['rss_mib']:.1f} | {result['peak_rss_mib']:.1f} |" if pid else "— | — |"))
                print(lines[-1], flush=True)
    finally:
        observed.cleanup()
        forward_only.cleanup()
        bare.stop()
        cluster.destroy()
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
