"""Faults around a real pgscout: the upstream restarted or killed under open sessions, a client
hanging up mid-statement, and a connection storm.

Owns: what an application sees when the database or its own connection fails in the middle of
work (with proxy.cancel_on_client_hangup on and off) (an error, never a hang and never a short result that looks complete), and what the proxy
process keeps afterwards (file descriptors, memory, its other sessions).
Must not: restart or kill the shared `pg` cluster (every test here runs on a private cluster of
its own, with max_connections raised for the storm), or read the proxy's internals: every check
goes through a client, pg_stat_activity, /proc or the admin endpoints.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import threading
import time

import asyncpg
import psycopg
import pytest

from pgharness import APP_DATABASE, PgCluster, PgscoutFactory, rss_bytes, wait_until

# The storm holds 500 sessions at once, plus pgscout's control connection and the bystanders.
STORM_MAX_CONNECTIONS = 600
BIG_TABLE_ROWS = 500_000
CONNECT_TIMEOUT_SECONDS = 2
# After 2,000 sessions and 500 held at once, what the proxy may keep: pymalloc and the event
# loop keep freed memory for reuse instead of returning it to the OS, so RSS settles above where
# it started, at the peak's high-water mark (about 20 MB for 500 sessions; 4,000 sessions in
# waves of 40 grow the data plane by 2 MB in all, so it is a plateau, not a leak).
STORM_RSS_SLACK_BYTES = 32 * 1024 * 1024
STORM_FD_SLACK = 4


@pytest.fixture(scope="module")
def cluster():
    """A cluster this module may stop, kill and restart, with room for the storm."""
    private = PgCluster()
    try:
        private.create()
        with open(private.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"max_connections = {STORM_MAX_CONNECTIONS}\n")
        private.restart()
        private.psql("-c", "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS note "
                           f"FROM generate_series(1, {BIG_TABLE_ROWS}) g",
                     dsn=private.dsn("trust_user", APP_DATABASE))
        yield private
    finally:
        private.destroy()


@pytest.fixture
def proxy(cluster):
    """A pgscout in front of the private cluster, which is up and accepting connections."""
    _ensure_up(cluster)
    factory = PgscoutFactory(cluster)
    try:
        yield factory(env={"PGSCOUT_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT_SECONDS)})
    finally:
        factory.cleanup()


def _accepts_sessions(cluster: PgCluster) -> bool:
    try:
        with psycopg.connect(cluster.dsn(connect_timeout=2)) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def _ensure_up(cluster: PgCluster) -> None:
    if not _accepts_sessions(cluster):
        if not _postmaster_alive(cluster):
            cluster.start()
        assert wait_until(lambda: _accepts_sessions(cluster), timeout=30), cluster.log_tail()


def _postmaster_pid(cluster: PgCluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().splitlines()[0])


def _postmaster_alive(cluster: PgCluster) -> bool:
    try:
        return _is_running(_postmaster_pid(cluster))
    except (FileNotFoundError, ValueError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _kill_whole_server(cluster: PgCluster) -> None:
    """SIGKILL the postmaster and every backend: the machine-level crash (OOM killer, node loss).
    Killing the postmaster alone would let a busy backend finish its result undisturbed."""
    postmaster = _postmaster_pid(cluster)
    children = _children(postmaster)
    os.kill(postmaster, signal.SIGKILL)
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_until(lambda: not any(_is_running(pid) for pid in [postmaster, *children]), timeout=10)
    # The dead postmaster may linger as a zombie (nothing reaps it in a container), and a new
    # postmaster refuses lock files naming a live PID: remove them, as an operator would.
    (cluster.data_dir / "postmaster.pid").unlink()
    for lock in cluster.socket_dir.glob(".s.PGSQL.*.lock"):
        lock.unlink()


def _is_running(pid: int) -> bool:
    """True for a live process; false for a gone one and for a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _direct_activity(cluster: PgCluster, pid: int) -> tuple[str, str] | None:
    """(state, query) of backend `pid` as the server itself reports it, None once it is gone."""
    with psycopg.connect(cluster.dsn(connect_timeout=5)) as conn:
        return conn.execute("select state, query from pg_stat_activity where pid = %s", (pid,)).fetchone()


def _metric(proxy, name: str) -> float:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(body))


# -- restart -------------------------------------------------------------------------------------

async def test_fast_restart_ends_open_sessions_with_an_error_and_new_ones_follow_the_server(cluster, proxy):
    idle_psycopg = psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True)
    busy_psycopg = psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True)
    idle_asyncpg = await asyncpg.connect(proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None))
    busy_outcome: list[BaseException | object] = []

    def sleep_through_the_restart():
        try:
            busy_outcome.append(busy_psycopg.execute("select pg_sleep(30)").fetchone())
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            busy_outcome.append(exc)

    busy = threading.Thread(target=sleep_through_the_restart, daemon=True)
    try:
        assert await idle_asyncpg.fetchval("select 1") == 1
        busy.start()
        assert wait_until(lambda: (_direct_activity(cluster, busy_psycopg.info.backend_pid) or ("",))[0]
                          == "active", timeout=5)
        stopped_at = time.monotonic()
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(busy.join, 10)
        assert not busy.is_alive(), "a statement in flight hung through the restart"
        assert time.monotonic() - stopped_at < 10
        assert isinstance(busy_outcome[0], psycopg.OperationalError), busy_outcome
        with pytest.raises(psycopg.OperationalError):
            idle_psycopg.execute("select 1")
        # asyncpg saw the server's FATAL and the close already: it says so instead of sending.
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError,
                            asyncpg.InterfaceError)):
            await asyncio.wait_for(idle_asyncpg.fetchval("select 1"), 10)
        assert idle_asyncpg.is_closed()

        assert await asyncio.to_thread(wait_until, lambda: proxy.admin_get("/readyz")[0] == 503, 5)
        refused_at = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="could not connect"):
            psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)).close()
        assert time.monotonic() - refused_at < CONNECT_TIMEOUT_SECONDS + 1

        await asyncio.to_thread(cluster.start)
        # The very first attempt after the server is back must work: no stale state in the proxy.
        with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as conn:
            assert conn.execute("select count(*) from big").fetchone() == (BIG_TABLE_ROWS,)
        fresh = await asyncpg.connect(proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None))
        assert await fresh.fetchval("select $1::int * 2", 21) == 42
        await fresh.close()
        assert await asyncio.to_thread(wait_until, lambda: proxy.admin_get("/readyz")[0] == 200, 5)
    finally:
        idle_psycopg.close()
        busy_psycopg.close()
        idle_asyncpg.terminate()
        if not cluster.is_running():
            cluster.start()


# -- upstream killed under a large result --------------------------------------------------------

KILLS = {
    "pg_terminate_backend": lambda cluster, pid: cluster.psql("-c", f"select pg_terminate_backend({pid})"),
    "sigkill_backend": lambda cluster, pid: os.kill(pid, signal.SIGKILL),
    "sigkill_whole_server": lambda cluster, pid: _kill_whole_server(cluster),
}


def _stream_copy(conn, progress: list[int], killed: threading.Event) -> int:
    with conn.cursor().copy("COPY big TO STDOUT") as copy:
        for _row in copy.rows():
            progress[0] += 1
            _read_slowly(progress[0], killed)
    return progress[0]


def _stream_select(conn, progress: list[int], killed: threading.Event) -> int:
    for _row in conn.cursor().stream("select id, note from big"):
        progress[0] += 1
        _read_slowly(progress[0], killed)
    return progress[0]


def _read_slowly(rows: int, killed: threading.Event) -> None:
    """Keep the backend blocked on a full socket until the kill, then drain at full speed."""
    if rows % 2000 == 0 and not killed.is_set():
        time.sleep(0.01)


@pytest.mark.parametrize("how", list(KILLS))
@pytest.mark.parametrize("stream", [_stream_copy, _stream_select], ids=["copy_to_stdout", "select"])
def test_a_killed_upstream_mid_result_is_an_error_not_a_short_result(cluster, proxy, how, stream):
    conn = psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True)
    backend_pid = conn.info.backend_pid
    progress = [0]
    killed = threading.Event()
    outcome: list[BaseException | int] = []

    def read():
        try:
            outcome.append(stream(conn, progress, killed))
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: progress[0] >= 20_000, timeout=20), "the result never started"
        state, query = _direct_activity(cluster, backend_pid)
        assert state == "active" and "big" in query, "the backend finished before it could be killed"
        KILLS[how](cluster, backend_pid)
        killed.set()
        reader.join(20)
        assert not reader.is_alive(), f"the client hung after the upstream was killed ({how})"
        assert isinstance(outcome[0], psycopg.OperationalError), (
            f"the client was handed {outcome[0]!r} rows of {BIG_TABLE_ROWS} as a complete result")
        assert progress[0] < BIG_TABLE_ROWS
        assert conn.closed or conn.broken
    finally:
        killed.set()
        conn.close()
        _ensure_up(cluster)
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as fresh:
        assert fresh.execute("select count(*) from big").fetchone() == (BIG_TABLE_ROWS,)


# -- client hangs up mid-statement ---------------------------------------------------------------

def _startup_packet(**params: str) -> bytes:
    body = struct.pack("!i", 3 << 16) + b"".join(
        key.encode() + b"\0" + value.encode() + b"\0" for key, value in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _read_until_ready(sock: socket.socket) -> bytes:
    received = b""
    while not _ends_with_ready(received):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed during startup: {received!r}"
        received += chunk
    return received


def _ends_with_ready(data: bytes) -> bool:
    pos = 0
    last = b""
    while len(data) - pos >= 5:
        length = struct.unpack_from("!i", data, pos + 1)[0]
        if len(data) - pos < 1 + length:
            return False
        last = data[pos:pos + 1]
        pos += 1 + length
    return pos == len(data) and last == b"Z"


def _hang_up_mid_statement(proxy, cluster) -> int:
    """A raw session that starts `select pg_sleep(30)` and then resets its connection (as when
    the application process dies); returns the backend pid."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(_startup_packet(user="trust_user", database=APP_DATABASE, application_name="hangs-up"))
    startup = _read_until_ready(sock)
    backend_pid = struct.unpack_from("!i", startup, startup.index(b"K\0\0\0\x0c") + 5)[0]
    sleep = b"select pg_sleep(30)\0"
    sock.sendall(b"Q" + struct.pack("!i", len(sleep) + 4) + sleep)
    assert wait_until(lambda: _direct_activity(cluster, backend_pid) == ("active", "select pg_sleep(30)"),
                      timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return backend_pid


def test_client_hanging_up_mid_statement_leaves_its_statement_running_by_default(cluster, proxy):
    """PostgreSQL does not notice a client that went away while a statement runs (unless
    client_connection_check_interval is set), so neither does pgscout by default."""
    cancels_before = _metric(proxy, "pgscout_cancel_requests_total")
    backend_pid = _hang_up_mid_statement(proxy, cluster)
    time.sleep(2)
    assert _direct_activity(cluster, backend_pid) == ("active", "select pg_sleep(30)")
    assert _metric(proxy, "pgscout_cancel_requests_total") == cancels_before
    cluster.psql("-c", f"select pg_cancel_backend({backend_pid})")


def test_client_hanging_up_mid_statement_cancels_its_backend_when_configured(cluster):
    _ensure_up(cluster)
    factory = PgscoutFactory(cluster)
    try:
        proxy = factory(env={"PGSCOUT_PROXY_CANCEL_ON_CLIENT_HANGUP": "true"})
        cancels_before = _metric(proxy, "pgscout_cancel_requests_total")
        backend_pid = _hang_up_mid_statement(proxy, cluster)
        hung_up_at = time.monotonic()
        assert wait_until(lambda: _direct_activity(cluster, backend_pid) is None, timeout=5), (
            f"backend {backend_pid} still there: {_direct_activity(cluster, backend_pid)}")
        assert time.monotonic() - hung_up_at < 2.0, "the backend outlived its client by more than 2 s"
        assert _metric(proxy, "pgscout_cancel_requests_total") == cancels_before + 1
        assert "canceling statement due to user request" in cluster.log_tail()
    finally:
        factory.cleanup()


# -- connection storm ----------------------------------------------------------------------------

def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Bystander(threading.Thread):
    """A session that keeps working through everything else and checks every answer."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stopping = threading.Event()
        self.verified = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                value = 0
                while not self.stopping.is_set():
                    value += 1
                    answer = conn.execute("select %s::int * 2", (value,)).fetchone()[0]
                    if answer != value * 2:
                        self.failures.append(f"select {value} * 2 returned {answer}")
                    self.verified += 1
                    time.sleep(0.005)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(repr(exc))


async def _session(dsn: str, value: int, gate: asyncio.Semaphore) -> asyncpg.Connection:
    async with gate:
        conn = await asyncpg.connect(dsn, timeout=30)
        assert await conn.fetchval("select $1::int + 1", value) == value + 1
        return conn


@pytest.mark.slow
async def test_connection_storm_leaves_no_descriptors_or_memory_behind(cluster, proxy):
    dsn = proxy.dsn("trust_user", APP_DATABASE, connect_timeout=None)
    pid = proxy.process.pid
    gate = asyncio.Semaphore(50)
    # Warm up: the first sessions import and allocate what every later one reuses.
    for conn in await asyncio.gather(*(_session(dsn, i, gate) for i in range(100))):
        await conn.close()
    await asyncio.sleep(0.5)
    fds_before, rss_before = _open_fds(pid), rss_bytes(pid)

    bystander = Bystander(proxy.dsn("trust_user", APP_DATABASE))
    bystander.start()
    try:
        for wave in range(10):  # 2,000 sessions opened, used and closed, 200 at a time
            conns = await asyncio.gather(*(_session(dsn, wave * 1000 + i, gate) for i in range(200)))
            await asyncio.gather(*(conn.close() for conn in conns))
        held = await asyncio.gather(*(_session(dsn, i, gate) for i in range(500)))
        try:
            assert _metric(proxy, "pgscout_client_connections") >= 500
            peak_fds = _open_fds(pid)
            assert peak_fds >= fds_before + 1000, "500 sessions should hold two sockets each"
            assert all(r == i + 1 for i, r in enumerate(
                await asyncio.gather(*(conn.fetchval("select $1::int + 1", i) for i, conn in enumerate(held)))))
        finally:
            await asyncio.gather(*(conn.close() for conn in held))
    finally:
        bystander.stopping.set()
        await asyncio.to_thread(bystander.join, 10)

    assert not bystander.failures, bystander.failures
    assert bystander.verified > 50
    assert await asyncio.to_thread(wait_until, lambda: _open_fds(pid) <= fds_before + STORM_FD_SLACK, 10), (
        f"fds: {fds_before} before the storm, {_open_fds(pid)} after")
    assert await asyncio.to_thread(wait_until, lambda: _metric(proxy, "pgscout_client_connections") == 0, 5)
    rss_after = rss_bytes(pid)
    assert rss_after <= rss_before + STORM_RSS_SLACK_BYTES, (
        f"RSS {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after 2,500 sessions")
    assert proxy.process.poll() is None
