"""The workloads: what each one runs against a target, what it measures and its target from the brief.

Owns: the pgbench invocations and custom scripts, COPY out/in through psql, driving the ORM
request loop, the memory measurements, the proxy processes' CPU time over a pgbench run (from
/proc), parsing their output into numbers, and each workload's rows (metrics and goals) in the
results table.
Must not: start or stop servers (targets.py), or aggregate across rounds (report.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgharness import child_pids, run_client

import memory
import orm_nplusone
from report import (DIRECT, Metric, WorkloadRows, at_least_vs_pgbouncer, at_most,
                    not_above_pgbouncer)
from targets import BenchEnvironment, Target

CLIENTS = ["-c", "8", "-j", "2"]
LARGE_RESULT_CLIENTS = ["-c", "4", "-j", "2"]
LARGE_RESULT_SIZES = {"1k": 1_000, "100k": 100_000}
COPY_PAYLOAD_BYTES = 1000
# Rows of the slow-reader result sit in the proxy's write buffers at most up to their high-water
# marks (256 KiB per leg by default); growth beyond a few MB would mean the result is buffered.
SLOW_READER_MAX_GROWTH_MB = 64
MB = 1e6
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_TRANSACTIONS = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# /proc/<pid>/stat fields, numbered as in proc(5), counted from field 3 (the first after the
# command name, which may itself hold spaces and parentheses).
_UTIME, _STIME, _CUTIME, _CSTIME = (number - 3 for number in (14, 15, 16, 17))
# The analysis process works through the records of a run after pgbench has finished; its CPU
# counts until it has been idle this long (no clock tick in it), which also keeps that tail out of
# the next target's run.
ANALYSIS_IDLE_SECONDS = 0.2
ANALYSIS_SETTLE_TIMEOUT_SECONDS = 30.0


@dataclass
class Parameters:
    duration: int
    copy_bytes: int
    idle_connections: int
    slow_reader_bytes: int
    slow_reader_bytes_per_second: float
    workdir: Path


@dataclass(frozen=True)
class ProxyCpu:
    """CPU seconds a proxy's processes have used since they started."""

    # The process the harness started (pgscout's data plane, PgBouncer, bare): user time is its
    # own code (pgscout's decoding is all there), system time the kernel's work for its sockets.
    user: float
    system: float
    # Its children (pgscout's analysis process), user + system, with those that exited and were
    # waited for, so that a restarted analysis process does not take its predecessor's time.
    children: float


def proxy_cpu(pid: int) -> ProxyCpu:
    fields = _stat_fields(pid)
    live_children = 0
    for child in child_pids(pid):
        try:
            child_fields = _stat_fields(child)
        except FileNotFoundError:  # gone since listed; in cutime/cstime once waited for
            continue
        live_children += int(child_fields[_UTIME]) + int(child_fields[_STIME])
    children = int(fields[_CUTIME]) + int(fields[_CSTIME]) + live_children
    return ProxyCpu(int(fields[_UTIME]) / CLOCK_TICKS_PER_SECOND,
                    int(fields[_STIME]) / CLOCK_TICKS_PER_SECOND, children / CLOCK_TICKS_PER_SECOND)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    return text[text.rindex(")") + 2:].split()


def settled_proxy_cpu(target: Target) -> ProxyCpu:
    """The target's CPU once its analysis process (if any) has caught up with the run."""
    sample = proxy_cpu(target.pid)
    if not target.has_analysis_process:
        return sample
    deadline = time.monotonic() + ANALYSIS_SETTLE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(ANALYSIS_IDLE_SECONDS)
        later = proxy_cpu(target.pid)
        if later.children == sample.children:
            return later
        sample = later
    raise RuntimeError(f"{target.name}'s analysis process was still busy "
                       f"{ANALYSIS_SETTLE_TIMEOUT_SECONDS:g} s after pgbench finished")


@dataclass(frozen=True)
class Workload:
    key: str
    rows: WorkloadRows
    run: Callable[[Target], dict[str, float]]
    needs_proxy_process: bool = False  # memory is measured on a proxy process, so not on direct


class Runner:
    """State the workloads share across targets and rounds: script files, result sizes, the COPY file."""

    def __init__(self, env: BenchEnvironment, params: Parameters) -> None:
        self.env = env
        self.params = params
        self.scripts: dict[str, Path] = {}
        self.result_bytes: dict[str, int] = {}
        self.copy_file: Path | None = None

    # -- pgbench --------------------------------------------------------------------------
    def pgbench(self, target: Target, *args: str) -> str:
        argv = [self.env.bin("pgbench"), "-n", "-T", str(self.params.duration), *args, target.url()]
        return run_client(argv, timeout=self.params.duration + 300).stdout

    def tps(self, target: Target, *args: str) -> float:
        return _tps(self.pgbench(target, *args))

    def select_statements(self, target: Target, key: str, *args: str) -> tuple[str, dict[str, float]]:
        """A pgbench -S run (one statement per transaction) and, through a proxy, what its
        processes spent per statement: `key.data_plane_user_us` and `key.data_plane_system_us`,
        and `key.analysis_cpu_us` for pgscout's analysis process."""
        if target.pid is None:
            return self.pgbench(target, "-S", *args), {}
        before = settled_proxy_cpu(target)
        output = self.pgbench(target, "-S", *args)
        after = settled_proxy_cpu(target)
        statements = _transactions(output)
        per_statement = {
            f"{key}.data_plane_user_us": (after.user - before.user) / statements * 1e6,
            f"{key}.data_plane_system_us": (after.system - before.system) / statements * 1e6,
        }
        if target.has_analysis_process:
            per_statement[f"{key}.analysis_cpu_us"] = (after.children - before.children) / statements * 1e6
        return output, per_statement

    def select_prepared(self, target: Target) -> dict[str, float]:
        output, cpu = self.select_statements(target, "prepared", "-M", "prepared", *CLIENTS)
        return {"prepared.tps": _tps(output), **cpu}

    def select_simple(self, target: Target) -> dict[str, float]:
        output, cpu = self.select_statements(target, "simple", "-M", "simple", *CLIENTS)
        return {"simple.tps": _tps(output), **cpu}

    def latency(self, target: Target) -> dict[str, float]:
        log_dir = self.params.workdir / f"latency-{target.name}-{time.monotonic_ns()}"
        log_dir.mkdir()
        _, cpu = self.select_statements(target, "latency", "-M", "prepared", "-c", "1", "-j", "1", "-l",
                                        f"--log-prefix={log_dir / 'tx'}")
        # Per-transaction log: client_id transaction_no latency_us script_no epoch epoch_us
        latencies = sorted(int(line.split()[2]) for log in log_dir.iterdir() for line in log.read_text().splitlines())
        for log in log_dir.iterdir():
            log.unlink()
        log_dir.rmdir()
        if not latencies:
            raise RuntimeError(f"pgbench logged no transactions against {target.name}")
        return {"latency.p50": _percentile(latencies, 50), "latency.p99": _percentile(latencies, 99), **cpu}

    def large_results(self, target: Target) -> dict[str, float]:
        measured = {}
        for name, rows in LARGE_RESULT_SIZES.items():
            if name not in self.scripts:
                self.scripts[name] = self.params.workdir / f"rows_{name}.sql"
                self.scripts[name].write_text(f"SELECT id, payload FROM bench_rows WHERE id <= {rows};\n")
                # DataRow bytes: type 1 + length 4 + column count 2 + two column lengths 8 + values.
                self.result_bytes[name] = int(self.env.psql(
                    "SELECT sum(15 + octet_length(id::text) + octet_length(payload)) "
                    f"FROM bench_rows WHERE id <= {rows}"))
            tps = self.tps(target, "-f", str(self.scripts[name]), "-M", "prepared", *LARGE_RESULT_CLIENTS)
            measured[f"large.{name}.tps"] = tps
            measured[f"large.{name}.mbps"] = tps * self.result_bytes[name] / MB
        return measured

    def churn(self, target: Target) -> dict[str, float]:
        return {"churn.cps": self.tps(target, "-C", "-S", "-M", "simple", *CLIENTS)}

    # -- COPY ----------------------------------------------------------------------------
    def copy(self, target: Target) -> dict[str, float]:
        rows = max(1, self.params.copy_bytes // (COPY_PAYLOAD_BYTES + 8))
        size = copy_text_bytes(rows, COPY_PAYLOAD_BYTES)
        if self.copy_file is None:
            self.copy_file = self.params.workdir / "copy_in.tsv"
            write_copy_file(self.copy_file, rows, COPY_PAYLOAD_BYTES)
        psql = [self.env.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.url()]
        out_sql = f"COPY (SELECT g, repeat('x', {COPY_PAYLOAD_BYTES}) FROM generate_series(1, {rows}) g) TO STDOUT"
        out_seconds = _timed(psql + ["-c", out_sql], stdin=subprocess.DEVNULL)
        self.env.psql("TRUNCATE copy_sink")
        with open(self.copy_file, "rb") as source:
            in_seconds = _timed(psql + ["-c", "COPY copy_sink FROM STDIN"], stdin=source)
        return {"copy.out.mbps": size / out_seconds / MB, "copy.in.mbps": size / in_seconds / MB}

    # -- ORM ------------------------------------------------------------------------------
    def orm(self, target: Target) -> dict[str, float]:
        served = orm_nplusone.serve_requests(target.url("postgresql+psycopg"), self.params.duration)
        return {"orm.rps": served["requests_per_second"]}

    # -- memory ---------------------------------------------------------------------------
    def memory(self, target: Target) -> dict[str, float]:
        with self.env.fresh_proxy(target.name) as fresh:
            address = (fresh.pid, fresh.host, fresh.port, fresh.user, fresh.database)
            idle = asyncio.run(memory.idle_connections_kb(*address, self.params.idle_connections))
            slow = asyncio.run(memory.slow_reader_peak_mb(*address, self.params.slow_reader_bytes,
                                                          self.params.slow_reader_bytes_per_second))
        return {"memory.kb_per_idle": idle["kb_per_idle"], "memory.baseline_mb": idle["baseline_mb"],
                "memory.idle_mb": idle["idle_mb"], "memory.slow_peak_growth_mb": slow["peak_growth_mb"]}


def _tps(pgbench_output: str) -> float:
    return float(_pgbench_number(_TPS, "tps", pgbench_output))


def _transactions(pgbench_output: str) -> int:
    transactions = int(_pgbench_number(_TRANSACTIONS, "transactions processed", pgbench_output))
    if transactions == 0:
        raise RuntimeError(f"pgbench processed no transactions:\n{pgbench_output}")
    return transactions


def _pgbench_number(pattern: re.Pattern[str], what: str, pgbench_output: str) -> str:
    match = pattern.search(pgbench_output)
    if match is None:
        raise RuntimeError(f"no {what} line in pgbench output:\n{pgbench_output}")
    return match.group(1)


def _timed(argv: list[str], stdin) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return elapsed


def _percentile(ordered: list[int], percent: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return float(ordered[int(rank) - 1])


def copy_text_bytes(rows: int, payload: int) -> int:
    """Bytes of COPY text for ids 1..rows, each line `id<TAB>payload<NL>`."""
    digits = 0
    width, low = 1, 1
    while low <= rows:
        high = min(rows, low * 10 - 1)
        digits += (high - low + 1) * width
        width, low = width + 1, low * 10
    return digits + rows * (payload + 2)


def write_copy_file(path: Path, rows: int, payload: int) -> None:
    tail = "\t" + "x" * payload + "\n"
    batch = 10_000
    with open(path, "w") as out:
        for start in range(1, rows + 1, batch):
            out.write("".join(f"{row}{tail}" for row in range(start, min(rows, start + batch - 1) + 1)))


def all_workloads(runner: Runner) -> list[Workload]:
    params = runner.params
    copy_size = f"{params.copy_bytes / MB:,.0f} MB"
    slow_reader = f"{params.slow_reader_bytes / MB:,.0f} MB at {params.slow_reader_bytes_per_second / MB:g} MB/s"
    throughput_vs_bouncer = at_least_vs_pgbouncer(1.0)
    bulk_vs_bouncer = at_least_vs_pgbouncer(0.9)
    return [
        Workload("prepared", WorkloadRows("1. pgbench -S -M prepared -c 8 -j 2", (
            Metric("prepared.tps", "TPS", True, goal=throughput_vs_bouncer),
            *cpu_per_statement_rows("prepared"))), runner.select_prepared),
        Workload("simple", WorkloadRows("2. pgbench -S -M simple -c 8 -j 2 (literals inline)", (
            Metric("simple.tps", "TPS", True, goal=throughput_vs_bouncer),
            *cpu_per_statement_rows("simple"))), runner.select_simple),
        Workload("latency", WorkloadRows("3. pgbench -S -M prepared -c 1 (per-transaction log)", (
            Metric("latency.p50", "p50 latency µs", False),
            Metric("latency.p99", "p99 latency µs", False),
            Metric("latency.added_p50", "added p50 µs over direct", False, goal=not_above_pgbouncer(),
                   over_direct_of="latency.p50"),
            Metric("latency.added_p99", "added p99 µs over direct", False, over_direct_of="latency.p99"),
            *cpu_per_statement_rows("latency"),
        )), runner.latency),
        Workload("large", WorkloadRows("4. large results (custom script, -M prepared -c 4 -j 2)", (
            Metric("large.1k.tps", "1,000 rows: TPS", True, goal=bulk_vs_bouncer),
            Metric("large.1k.mbps", "1,000 rows: MB/s of DataRows", True, 1, goal=bulk_vs_bouncer),
            Metric("large.100k.tps", "100,000 rows: TPS", True, 1, goal=bulk_vs_bouncer),
            Metric("large.100k.mbps", "100,000 rows: MB/s of DataRows", True, 1, goal=bulk_vs_bouncer),
        )), runner.large_results),
        Workload("churn", WorkloadRows("5. connection churn pgbench -C -S -c 8 -j 2", (
            Metric("churn.cps", "connections/s", True, goal=throughput_vs_bouncer),)), runner.churn),
        Workload("copy", WorkloadRows(f"6. COPY of {copy_size} through psql", (
            Metric("copy.out.mbps", "COPY TO STDOUT MB/s", True, 1, goal=bulk_vs_bouncer),
            Metric("copy.in.mbps", "COPY FROM STDIN MB/s", True, 1, goal=bulk_vs_bouncer),
        )), runner.copy),
        Workload("orm", WorkloadRows("7. SQLAlchemy lazy loading, N+1 per request (1 client)", (
            Metric("orm.rps", "requests/s", True),)), runner.orm),
        Workload("memory", WorkloadRows("8. proxy memory (VmRSS)", (
            Metric("memory.baseline_mb", "RSS MB of a freshly started proxy", False, 1),
            Metric("memory.idle_mb", "RSS MB with the idle sessions open", False, 1),
            Metric("memory.kb_per_idle", f"KB per idle session ({params.idle_connections} open, one query each)", False, 1, goal=at_most(30, "KB")),
            Metric("memory.slow_peak_growth_mb", f"peak RSS growth MB, slow reader ({slow_reader})", False, 1,
                   goal=at_most(SLOW_READER_MAX_GROWTH_MB, "MB")),
        )), runner.memory, needs_proxy_process=True),
    ]


def cpu_per_statement_rows(key: str) -> tuple[Metric, ...]:
    """The cost itself, not only its share of a saturated machine: per statement, so it compares
    across targets that ran different numbers of statements. User and system apart: the system
    share is the kernel's work for the sockets, the user share each proxy's own code."""
    return (Metric(f"{key}.data_plane_user_us", "data-plane user CPU µs per statement", False, 1),
            Metric(f"{key}.data_plane_system_us", "data-plane system CPU µs per statement", False, 1),
            Metric(f"{key}.analysis_cpu_us", "analysis CPU µs per statement", False, 1))


def targets_for(workload: Workload, targets: list[Target]) -> list[Target]:
    return [target for target in targets if not (workload.needs_proxy_process and target.name == DIRECT)]
