"""Inputs that would let observation disturb traffic or grow memory, and a bystander to see it.

Owns: the attacks (each a Python program run as its own client process, so the attacker's client
work does not share the measuring process's GIL) and the bystander session that measures what
another application would notice. Shared by tests/test_isolation.py and benchmarks/isolation.py.
Must not: assert anything (the tests do) or start servers (pgharness does).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
import threading
import time

import psycopg

class Bystander(threading.Thread):
    """`select 1` in a loop on its own session; records each round trip and the gaps."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.connection = psycopg.connect(dsn, autocommit=True)
        self.latencies: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.perf_counter()
            self.connection.execute("select 1").fetchone()
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.002)

    def measure(self) -> list[float]:
        taken = self.latencies
        self.latencies = []
        return taken

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.connection.close()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def run_client(dsn: str, program: str, timeout: float = 120) -> str:
    """Run `program` (Python, with `dsn` and psycopg available) in its own process."""
    code = f"import psycopg, sys\ndsn = {dsn!r}\n" + textwrap.dedent(program)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


LATENCY_ATTACKS = {
    # What psql -f, Rails structure loads and execute(script) send: one Query, many statements.
    "12,000 select 1 in one Query": """
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 1;" * 12000)
    """,
    "a 3,000-INSERT seed script as one Query": """
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("create temporary table seed (id int, name text, email text)")
            conn.execute("".join(
                f"insert into seed values ({i}, 'name number {i}', 'user{i}@example.com');"
                for i in range(3000)))
    """,
    "40 statements of 2,000 nested subqueries": """
        nested = "select " + "(select " * 2000 + "1" + ")" * 2000
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(40):
                try:
                    conn.execute(nested)
                except psycopg.Error:
                    pass  # PostgreSQL refuses it (stack depth), as it should
    """,
}



# 3,000 distinct ~100 KB statements: a proxy that keeps whole texts grows by gigabytes.
DISTINCT_LARGE_STATEMENTS = """
        padding = "x" * 100_000
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(3000):
                conn.execute(f"select {i} as n{i}, length('{padding}{i}')")
    """

# 4 sessions each pipeline 9 MB of Sync messages behind pg_sleep: the server answers each, so
# pgscout must track them, and without one object per message.
PIPELINED_SYNCS = """
        import socket, struct, threading
        host, port = dsn.split("@")[1].split("/")[0].split(":")

        def message(kind, body):
            return kind + struct.pack("!i", len(body) + 4) + body

        def session():
            sock = socket.create_connection((host, int(port)))
            params = b"user\\0trust_user\\0database\\0app\\0\\0"
            sock.sendall(struct.pack("!ii", len(params) + 8, 196608) + params)
            buffer = b""
            while b"Z\\0\\0\\0\\x05I" not in buffer:
                buffer += sock.recv(65536)
            # One 6-byte ReadyForQuery answers each Sync: read them while sending.
            expected = 6 * 1_800_000
            received = [0]

            def read():
                while received[0] < expected:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    received[0] += len(chunk)

            reader = threading.Thread(target=read)
            reader.start()
            sock.sendall(message(b"Q", b"select pg_sleep(2)\\0") + message(b"S", b"") * 1_800_000)
            reader.join()
            sock.close()
            if received[0] < expected:
                sys.exit(f"only {received[0]} bytes came back")

        threads = [threading.Thread(target=session) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    """
