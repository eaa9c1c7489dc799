"""pgscout's memory under traffic that would grow an unbounded proxy: a result far larger than
the client reads, a COPY FROM STDIN faster than the server takes it, and 100,000 distinct
statement shapes.

Owns: the proxy process's resident memory (VmRSS from /proc) and the fingerprint caps as an
operator sees them on /metrics. (The metric series count is tested elsewhere.)
Must not: read the proxy's internals; the clients are raw sockets so the test, not a driver,
decides how fast each side reads and writes.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time

import psycopg
import pytest

from pgharness import APP_DATABASE, rss_bytes, wait_until

MIB = 1024 * 1024
# Flow control keeps a few write buffers (256 KiB high-water mark by default) per leg; anything
# near the size of the result would mean pgscout is buffering what the client has not read.
STREAMING_RSS_BUDGET = 50 * MIB
SHAPES_RSS_BUDGET = 25 * MIB
MAX_FINGERPRINTS = 500
FINGERPRINT_CACHE_SIZE = 1000


class PeakRss(threading.Thread):
    """Samples a process's RSS every 20 ms until stopped; `peak` is the largest sample."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_bytes(pid)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        self.join(5)


def _metric(proxy, name: str) -> float:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(body))


def _message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


def _query(sql: str) -> bytes:
    return _message(b"Q", sql.encode() + b"\0")


class RawSession:
    """A client that speaks the protocol itself, one typed message at a time."""

    def __init__(self, proxy, **params: str):
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=30)
        self.buffer = b""
        body = struct.pack("!i", 3 << 16) + b"".join(
            key.encode() + b"\0" + value.encode() + b"\0"
            for key, value in {"user": "trust_user", "database": APP_DATABASE, **params}.items()) + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.until(b"Z")

    def next_message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack_from("!i", self.buffer, 1)[0]
                if len(self.buffer) >= 1 + length:
                    message = (self.buffer[:1], self.buffer[5:1 + length])
                    self.buffer = self.buffer[1 + length:]
                    return message
            chunk = self.sock.recv(1 << 20)
            assert chunk, "pgscout closed the connection"
            self.buffer += chunk

    def until(self, type_byte: bytes) -> list[tuple[bytes, bytes]]:
        messages = [self.next_message()]
        while messages[-1][0] != type_byte:
            messages.append(self.next_message())
        return messages

    def hang_up(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@pytest.fixture
def proxy(start_pgscout):
    return start_pgscout()


def _settle(pid: int) -> int:
    time.sleep(0.3)
    return rss_bytes(pid)


def test_a_slow_reader_of_a_300_mb_result_does_not_grow_the_proxy(pg, proxy):
    pid = proxy.process.pid
    warm = RawSession(proxy)
    warm.sock.sendall(_query("select repeat('x', 1000) from generate_series(1, 2000)"))
    warm.until(b"Z")
    baseline = _settle(pid)

    session = RawSession(proxy, application_name="slow-reader")
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    session.sock.sendall(_query("select repeat('x', 1000) from generate_series(1, 300000)"))
    received = 0
    with PeakRss(pid) as rss:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = session.sock.recv(16 * 1024)
            assert chunk, "pgscout closed the connection of a slow reader"
            if not received:
                assert chunk[:1] == b"T", chunk[:20]  # RowDescription, then the rows
            received += len(chunk)
            time.sleep(0.02)
    assert 0 < received < 20 * MIB, "the reader read a lot faster than intended"
    assert rss.peak < baseline + STREAMING_RSS_BUDGET, (
        f"RSS peaked at {rss.peak / MIB:.1f} MiB (baseline {baseline / MIB:.1f} MiB) while a client "
        f"had read {received / MIB:.1f} MiB of a ~300 MiB result")
    session.hang_up()
    warm.sock.sendall(_query("select 1"))
    assert any(t == b"D" for t, _ in warm.until(b"Z")), "another session stopped working"


@pytest.fixture
def slow_sink(pg):
    """A table that takes about 1 MB/s of 1 KB rows: a trigger sleeps 1 ms per row."""
    pg.psql(
        "-c", "DROP TABLE IF EXISTS slow_sink",
        "-c", "CREATE TABLE slow_sink (line text)",
        "-c", "CREATE OR REPLACE FUNCTION slow_sink_row() RETURNS trigger LANGUAGE plpgsql AS "
              "$$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$",
        "-c", "CREATE TRIGGER slow_sink_row BEFORE INSERT ON slow_sink FOR EACH ROW "
              "EXECUTE FUNCTION slow_sink_row()",
        dsn=pg.dsn("trust_user", APP_DATABASE))
    return "slow_sink"


def _push_copy(session: RawSession, table: str, seconds: float) -> int:
    """Send CopyData as fast as the sockets take it for `seconds`; returns the bytes sent."""
    session.sock.sendall(_query(f"COPY {table} FROM STDIN"))
    assert session.next_message()[0] == b"G"  # CopyInResponse
    rows = _message(b"d", (("y" * 999) + "\n").encode() * 64)  # 64 KB per CopyData
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session.sock.sendall(rows)
        sent += len(rows)
    return sent


def _copy_backends(pg, application_name: str) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        return direct.execute("select count(*) from pg_stat_activity where application_name = %s",
                              (application_name,)).fetchone()[0]


def test_a_copy_in_faster_than_the_server_is_held_back_at_the_client(pg, proxy, slow_sink):
    """The client pushes as fast as the sockets let it; pgscout must stop reading the client,
    not queue what it sends."""
    pid = proxy.process.pid
    baseline = _settle(pid)
    session = RawSession(proxy, application_name="fast-copy-in")
    with PeakRss(pid) as rss:
        sent = _push_copy(session, slow_sink, seconds=8)
    # 8 s at ~1 MB/s plus the socket buffers on the way; far from what the client could push.
    assert sent < 40 * MIB, f"the client pushed {sent / MIB:.0f} MiB in 8 s past a 1 MB/s server"
    assert rss.peak < baseline + STREAMING_RSS_BUDGET, (
        f"RSS peaked at {rss.peak / MIB:.1f} MiB (baseline {baseline / MIB:.1f} MiB) "
        f"while a client pushed {sent / MIB:.1f} MiB of COPY data")
    session.hang_up()
    assert wait_until(lambda: _copy_backends(pg, "fast-copy-in") == 0, timeout=15), (
        "the COPY went on after its client hung up")
    with psycopg.connect(pg.dsn("trust_user", APP_DATABASE)) as direct:
        assert direct.execute(f"select count(*) from {slow_sink}").fetchone() == (0,)


def test_hanging_up_mid_copy_in_under_backpressure_cancels_within_2_s_when_configured(pg, start_pgscout,
                                                                                     slow_sink):
    """proxy.cancel_on_client_hangup (off by default, as PostgreSQL notices nothing either)."""
    proxy = start_pgscout(env={"PGSCOUT_PROXY_CANCEL_ON_CLIENT_HANGUP": "true"})
    session = RawSession(proxy, application_name="copy-in-hangs-up")
    _push_copy(session, slow_sink, seconds=3)
    session.hang_up()
    hung_up_at = time.monotonic()
    assert wait_until(lambda: _copy_backends(pg, "copy-in-hangs-up") == 0, timeout=15)
    assert time.monotonic() - hung_up_at < 2.0, (
        f"the backend kept taking COPY data for {time.monotonic() - hung_up_at:.1f} s after its "
        f"client hung up")


@pytest.mark.slow
def test_100000_statement_shapes_stay_under_the_fingerprint_caps(start_pgscout):
    capped = start_pgscout(env={
        "PGSCOUT_STATEMENTS_MAX_FINGERPRINTS": str(MAX_FINGERPRINTS),
        "PGSCOUT_STATEMENTS_FINGERPRINT_CACHE_SIZE": str(FINGERPRINT_CACHE_SIZE),
    })
    pid = capped.process.pid
    session = RawSession(capped, application_name="many-shapes")
    batch = 2000

    def run_shapes(first: int, count: int) -> None:
        for start in range(first, first + count, batch):
            # A CTE name is part of the fingerprint: every statement is a shape of its own.
            session.sock.sendall(b"".join(_query(f"with c{i} as (select {i}) select * from c{i}")
                                          for i in range(start, start + batch)))
            for _ in range(batch):
                session.until(b"Z")

    run_shapes(0, 2 * FINGERPRINT_CACHE_SIZE)  # fill both caps before measuring
    baseline = _settle(pid)
    statements_before = _metric(capped, "pgscout_statements_total")
    with PeakRss(pid) as rss:
        run_shapes(2 * FINGERPRINT_CACHE_SIZE, 100_000)
    # Analysis runs beside the traffic, not in its way: 100,000 new shapes (a pglast parse each)
    # take it some seconds to catch up with, and none may be shed at this pace.
    assert wait_until(lambda: _metric(capped, "pgscout_statements_total") >= statements_before + 100_000, 60)
    assert _metric(capped, "pgscout_analysis_records_shed_total") == 0
    assert _metric(capped, "pgscout_fingerprints_tracked") <= MAX_FINGERPRINTS
    assert _metric(capped, "pgscout_fingerprint_cache_entries") <= FINGERPRINT_CACHE_SIZE
    assert rss.peak < baseline + SHAPES_RSS_BUDGET, (
        f"RSS grew from {baseline / MIB:.1f} to {rss.peak / MIB:.1f} MiB over 100,000 shapes")
    with psycopg.connect(capped.dsn("trust_user", APP_DATABASE)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
