"""Benchmark harness: pgscout against direct connections, PgBouncer and a bare forwarder, side by side.

    python benchmarks/run.py [--duration S] [--rounds N] [--only W,...] [--upstream URL] [--out FILE]

Starts PostgreSQL (unless --upstream names one), PgBouncer in session mode, the bare uvloop
forwarder, pgscout observing and pgscout --forward-only, runs every workload against all five in
interleaved rounds (direct, PgBouncer, bare, pgscout, forward-only, direct, ...) so drift on a
shared machine hits every target alike, and prints a Markdown table of medians, min-max, ratios
and targets; then, with every server stopped, the per-stage profile of observing one statement
(perstatement.py).

Owns: the command line, the round loop, progress output and writing the results file.
Must not: measure (workloads.py), start servers (targets.py) or format numbers (report.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The benchmark starts PostgreSQL and pgscout exactly as the integration tests do.
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pgharness import interrupt_on_termination  # noqa: E402

import pgbouncer  # noqa: E402
import perstatement  # noqa: E402
from report import Results, machine_description, render_table  # noqa: E402
from targets import BenchEnvironment  # noqa: E402
from workloads import MB, Parameters, Runner, all_workloads, targets_for  # noqa: E402

# Statements the stage profile decodes and analyses per second of --duration (a few seconds).
PROFILED_STATEMENTS_PER_SECOND = 8_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pgscout vs direct vs PgBouncer vs a bare forwarder benchmarks")
    parser.add_argument("--duration", type=int, default=30, help="seconds per timed workload run (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians (default 3)")
    parser.add_argument("--only", help="comma-separated workloads: prepared, simple, latency, large, churn, "
                                       "copy, orm, memory (default: all)")
    parser.add_argument("--upstream", metavar="URL",
                        help="benchmark this PostgreSQL (libpq URL with user and database, trust auth for the "
                             "memory workload's raw clients) instead of starting one; its pgbench_*, bench_rows, "
                             "copy_sink and orm_* tables are dropped and recreated")
    parser.add_argument("--out", metavar="FILE", help="also write the table, machine and command here (Markdown)")
    parser.add_argument("--copy-mb", type=float, default=1000, help="COPY size in MB, each way (default 1000)")
    parser.add_argument("--idle-connections", type=int, default=1000,
                        help="idle sessions opened for the memory workload (default 1000)")
    parser.add_argument("--slow-reader-mb", type=float, default=2000,
                        help="result size the slow reader drains, in MB (default 2000)")
    parser.add_argument("--slow-reader-mbps", type=float, default=20,
                        help="rate the slow reader reads at, in MB/s (default 20)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    load_at_start = os.getloadavg()
    interrupt_on_termination()
    workdir = Path(tempfile.mkdtemp(prefix="pgscout-bench-"))
    env = BenchEnvironment(args.upstream, max_clients=args.idle_connections)
    try:
        progress("starting PostgreSQL, PgBouncer, the bare forwarder and both pgscouts, loading data")
        env.start()
        progress("started")
        params = Parameters(duration=args.duration, copy_bytes=int(args.copy_mb * MB),
                            idle_connections=args.idle_connections,
                            slow_reader_bytes=int(args.slow_reader_mb * MB),
                            slow_reader_bytes_per_second=args.slow_reader_mbps * MB, workdir=workdir)
        workloads = all_workloads(Runner(env, params))
        if args.only:
            wanted = [key.strip() for key in args.only.split(",") if key.strip()]
            unknown = sorted(set(wanted) - {workload.key for workload in workloads})
            if unknown:
                print(f"unknown workload(s) {', '.join(unknown)}; choose from "
                      f"{', '.join(workload.key for workload in workloads)}", file=sys.stderr)
                return 2
            workloads = [workload for workload in workloads if workload.key in wanted]
        results = Results()
        try:
            for round_number in range(1, args.rounds + 1):
                for workload in workloads:
                    for target in targets_for(workload, env.targets):
                        measured = workload.run(target)
                        results.add(target.name, measured)
                        shown = ", ".join(f"{key}={value:,.1f}" for key, value in measured.items())
                        progress(f"round {round_number}/{args.rounds} {workload.key} {target.name}: {shown}")
        except Exception:
            print(env.failure_report(), file=sys.stderr)
            raise
        table = render_table([workload.rows for workload in workloads], results,
                             [target.name for target in env.targets])
        machine = machine_description(pgbouncer.version(), env.psql("SHOW server_version"),
                                      pgbench_version(env), load_at_start)
    finally:
        env.close()
        shutil.rmtree(workdir, ignore_errors=True)
    progress("timing each stage of observation in process (benchmarks/perstatement.py)")
    stages = perstatement.stage_table(PROFILED_STATEMENTS_PER_SECOND * args.duration)
    print(table)
    print(stages)
    print(machine)
    if args.out:
        Path(args.out).write_text(results_document(command, args, table, stages, machine))
        progress(f"wrote {args.out}")
    return 0


def pgbench_version(env: BenchEnvironment) -> str:
    return subprocess.run([env.bin("pgbench"), "--version"], capture_output=True, text=True).stdout.strip()


def results_document(command: str, args: argparse.Namespace, table: str, stages: str,
                     machine: str) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rounds = "1 round" if args.rounds == 1 else f"medians of {args.rounds} rounds, (min–max) in brackets"
    return (
        "# pgscout benchmark results\n\n"
        f"Run {when} with:\n\n```\n{command}\n```\n\n"
        f"{args.duration} s per timed run, {rounds}; targets run interleaved within each round. "
        "Each ratio (x) is the median of the rounds' own ratios, measured side by side under the "
        "same load: the machine's speed drifts between rounds, and a ratio of medians taken from "
        "different rounds would measure the drift.\n\n"
        "## Machine\n\n"
        f"{machine}\n"
        "## Results\n\n"
        f"{table}\n"
        "MB = 10^6 bytes. MB/s of DataRows counts the row messages the client receives "
        "(computed from the table's contents). Added latency is each round's p50/p99 minus direct's "
        "in the same round. Memory is the VmRSS of the proxy's processes (pgscout's data plane and "
        "analysis process together); direct has no proxy to measure. "
        "It is measured on a freshly started proxy of each kind (a heap grown by earlier workloads "
        "would hide what new sessions cost). Each idle session has run one query, so PgBouncer holds "
        "a server connection for it as pgscout does. "
        "The observed/forward-only column is workload 9: the cost of observation. "
        "bare uvloop is benchmarks/bare.py, a uvloop forwarder that only copies bytes between its two "
        "legs with pgscout's write-buffer flow control: the floor for any asyncio proxy, so the "
        "observed/bare and forward-only/bare columns are what pgscout costs beyond it. "
        "CPU per statement is the time of the proxy's processes over the pgbench run "
        "(from /proc/<pid>/stat) divided by the transactions pgbench processed, one statement each: "
        "data-plane is the process the harness started (pgscout's data plane, PgBouncer, bare), its "
        "user time (its own code) and system time (the kernel's work for its sockets) apart; analysis "
        "is pgscout's analysis process, user + system, counted until it is idle after the run.\n\n"
        "## Where observation's CPU goes\n\n"
        "benchmarks/perstatement.py: the stages of observing one statement timed in process on "
        "synthetic pgbench -S streams, no sockets. With warm caches they are a lower bound on the "
        "CPU rows above; under load the other processes evict the data plane's memory between "
        "two chunks of a session, and the row with the caches swept (4 MiB read before each "
        "chunk) shows what the decoder then costs: its price there is the cache lines it touches "
        "more than the instructions it runs.\n\n"
        f"{stages}"
    )


_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
