"""The edges of the protocol, spoken the same way to PostgreSQL directly and through pgscout: the
client must see the same bytes, the same close, the same order and the same committed rows.

Owns: cancel ordering, startup-phase refusals, clients that send and then close or half-close,
the startup timeout, proxy.max_message_bytes never changing the stream, pgscout as its own
upstream, running out of file descriptors, SCRAM channel binding across pgscout, and which
connections present the upstream URL's client certificate.
Must not: mock the database or read the proxy's internals, except where a test says why (the
self-loop on accepted connections, which no outside arrangement can provoke once the start-up
check refuses the obvious ones).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import trustme

import wirebuild as w
from pgharness import (APP_DATABASE, LOOPBACK, SUPERUSER, PgCluster, Pgscout, PgscoutFactory,
                       free_port, wait_until, write_serving_certificate)

TERMINATE = b"X\0\0\0\x04"
CLOSED = "<closed>"
QUIET = "<still open>"


# -- raw protocol helpers ------------------------------------------------------------------------

def startup_packet(user: str, database: str, version: int = 3 << 16, **options: str) -> bytes:
    params = {"user": user, "database": database, **options}
    body = struct.pack("!i", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def read_to_close(sock: socket.socket, quiet: float = 3.0) -> tuple[bytes, str]:
    """Everything received until the peer closes (EOF or reset alike) or is quiet for `quiet` s."""
    received, closed = w.read_until_closed_or_quiet(sock, quiet)
    return received, CLOSED if closed else QUIET


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!i", data, pos + 1)[0]
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def read_until(sock: socket.socket, kind: bytes, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    sock.settimeout(timeout)
    data = b""
    while True:
        complete = messages(data)
        if complete and complete[-1][0] == kind and _whole(data):
            return complete
        chunk = sock.recv(65536)
        assert chunk, f"closed before {kind!r}: {complete}"
        data += chunk


def _whole(data: bytes) -> bool:
    pos = 0
    while len(data) - pos >= 5:
        pos += 1 + struct.unpack_from("!i", data, pos + 1)[0]
    return pos == len(data)


def error_fields(body: bytes) -> dict[str, str]:
    """Severity, SQLSTATE, message and detail of an ErrorResponse; the server's source file, line
    and routine (F, L, R) say where in PostgreSQL's code it was raised, not what the client sees."""
    fields = {}
    for item in body.split(b"\0"):
        if item[:1] in (b"S", b"C", b"M", b"D"):
            fields[item[:1].decode()] = item[1:].decode()
    return fields


def client_view(data: bytes) -> object:
    """What a client makes of a refusal: the error's fields, or the raw bytes of anything else."""
    if data[:1] == b"E" and len(data) >= 5 and struct.unpack_from("!i", data, 1)[0] == len(data) - 1:
        return ("ErrorResponse", error_fields(data[5:]))
    return data


def open_session(host: str, port: int, user: str = "trust_user", database: str = APP_DATABASE):
    """A raw session after ReadyForQuery: (socket, backend pid, secret key)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(startup_packet(user, database))
    for kind, body in read_until(sock, b"Z"):
        if kind == b"K":
            pid, key = struct.unpack("!i", body[:4])[0], body[4:]
    return sock, pid, key


def metric(proxy: Pgscout, name: str) -> float:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body
    found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", body, re.MULTILINE)
    return sum(float(value) for value in found)


def routes(pg: PgCluster, proxy: Pgscout) -> dict[str, tuple[str, int]]:
    return {"direct": (pg.host, pg.port), "proxy": (proxy.host, proxy.port)}


def set_server(pg: PgCluster, setting: str, value: str) -> None:
    pg.psql("-c", f"alter system set {setting} = '{value}'", "-c", "select pg_reload_conf()")
    assert wait_until(lambda: pg.psql("-c", f"show {setting}").stdout.strip() == value, 5)


# -- 1. cancel ordering --------------------------------------------------------------------------

def test_a_cancel_for_an_idle_session_is_delivered_before_its_connection_closes(pg, pgscout):
    """libpq and asyncpg read the cancel connection to EOF, then go on: PostgreSQL closes it only
    once the backend was signalled, so the cancel can never hit the next statement."""
    cancelled = {}
    for route, (host, port) in routes(pg, pgscout).items():
        sock, pid, key = open_session(host, port)
        hits = 0
        with sock:
            for _ in range(10):
                with socket.create_connection((host, port), timeout=10) as cancel:
                    cancel.sendall(struct.pack("!iii", 12 + len(key), 80877102, pid) + key)
                    assert read_to_close(cancel) == (b"", CLOSED)
                sock.sendall(query("select pg_sleep(0.3)"))
                reply = read_until(sock, b"Z")
                hits += any(kind == b"E" and error_fields(body)["C"] == "57014" for kind, body in reply)
        cancelled[route] = hits
    assert cancelled == {"direct": 0, "proxy": 0}


def test_a_cancel_for_a_busy_session_still_cancels_it(pg, pgscout):
    sock, pid, key = open_session(pgscout.host, pgscout.port)
    with sock:
        sock.sendall(query("select pg_sleep(30)"))
        time.sleep(0.3)
        started = time.monotonic()
        with socket.create_connection((pgscout.host, pgscout.port), timeout=10) as cancel:
            cancel.sendall(struct.pack("!iii", 16, 80877102, pid) + key)
            assert read_to_close(cancel) == (b"", CLOSED)
        reply = read_until(sock, b"Z")
        assert [error_fields(body)["C"] for kind, body in reply if kind == b"E"] == ["57014"]
        assert time.monotonic() - started < 5


# -- 2. startup-phase refusals -------------------------------------------------------------------

REFUSALS = {
    # node-postgres on connect() then end() at once: Terminate before any StartupMessage.
    "terminate_first": TERMINATE,
    "five_bytes_of_text": b"hello",
    "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "length_below_8": struct.pack("!i", 3) + b"\0" * 8,
    "length_2_gb": struct.pack("!i", 0x7FFFFFFF) + b"\0" * 8,
    "length_over_10004": struct.pack("!ii", 10005, 3 << 16) + b"\0" * 9997,
    "protocol_2": struct.pack("!ii", 8, 2 << 16),
    "protocol_4": startup_packet(SUPERUSER, "postgres", version=4 << 16),
    "cancel_of_12_bytes": struct.pack("!iii", 12, 80877102, 1),
    "direct_tls_client_hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 32,
    "startup_layout_error": struct.pack("!ii", 10004, 3 << 16) + b"\0" * 9996,
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_startup_refusals_are_postgresqls_own(pg, pgscout, name):
    seen = {}
    for route, (host, port) in routes(pg, pgscout).items():
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(REFUSALS[name])
            started = time.monotonic()
            data, how = read_to_close(sock)
            seen[route] = (client_view(data), how, time.monotonic() - started < 1.0)
    assert seen["proxy"] == seen["direct"]
    assert seen["direct"][1:] == (CLOSED, True)


def test_a_silent_refusal_is_logged_and_counted(pgscout):
    before = metric(pgscout, "pgscout_startup_errors_total")
    with socket.create_connection((pgscout.host, pgscout.port), timeout=10) as sock:
        sock.sendall(TERMINATE)
        assert read_to_close(sock) == (b"", CLOSED)
    assert wait_until(lambda: metric(pgscout, "pgscout_startup_errors_total") == before + 1, 5)
    assert any("invalid length of startup packet" in line.get("reason", "")
               for line in pgscout.logs() if line.get("event") == "startup_failed")


def test_repeated_encryption_requests_get_the_postmasters_answers():
    """A server without TLS answers 'N', as pgscout does without client TLS; what follows must be
    the same: a second request is an unknown protocol, bytes sent with a request a refusal."""
    cluster = PgCluster().create()
    factory = PgscoutFactory(cluster)
    try:
        set_server(cluster, "ssl", "off")
        proxy = factory()
        ssl_request = struct.pack("!ii", 8, 80877103)
        cases = {
            "ssl_then_ssl_again": [ssl_request, ssl_request],
            "ssl_with_data_behind_it": [ssl_request + startup_packet(SUPERUSER, "postgres")],
        }
        for name, writes in cases.items():
            seen = {}
            for route, (host, port) in routes(cluster, proxy).items():
                with socket.create_connection((host, port), timeout=10) as sock:
                    answers = []
                    for data in writes[:-1]:
                        sock.sendall(data)
                        answers.append(sock.recv(1))
                    sock.sendall(writes[-1])
                    rest, how = read_to_close(sock)
                    if rest[:1] in (b"N", b"S"):  # the answer to the last request, then the rest
                        answers.append(rest[:1])
                        rest = rest[1:]
                    seen[route] = (answers, client_view(rest), how)
            assert seen["proxy"] == seen["direct"], name
            assert seen["direct"][-1] == CLOSED and seen["direct"][1][0] == "ErrorResponse", name
    finally:
        factory.cleanup()
        cluster.destroy()


# -- 10a. startup timeout ------------------------------------------------------------------------

def test_clients_that_never_finish_startup_are_dropped_silently_at_the_timeout(pg, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_PROXY_STARTUP_TIMEOUT_SECONDS": "1"})
    set_server(pg, "authentication_timeout", "1s")
    try:
        scram = startup_packet("scram_user", APP_DATABASE)
        for name, data in {"silent": b"", "half_a_packet": struct.pack("!i", 8) + b"\0",
                           "no_password": scram}.items():
            seen = {}
            for route, (host, port) in routes(pg, proxy).items():
                socks = [socket.create_connection((host, port), timeout=10) for _ in range(20)]
                started = time.monotonic()
                for sock in socks:
                    sock.sendall(data)
                outcomes = {read_to_close(sock, quiet=5) for sock in socks}
                elapsed = time.monotonic() - started
                for sock in socks:
                    sock.close()
                assert 0.8 < elapsed < 3, (name, route, elapsed)
                seen[route] = outcomes
            assert seen["proxy"] == seen["direct"], name
            assert len(seen["direct"]) == 1 and next(iter(seen["direct"]))[1] == CLOSED
    finally:
        set_server(pg, "authentication_timeout", "1min")
    assert metric(proxy, "pgscout_startup_errors_total") >= 40
    assert any("proxy.startup_timeout_seconds" in line.get("reason", "") for line in proxy.logs()
               if line.get("event") == "startup_failed")
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# -- 3. a client that sends and closes -----------------------------------------------------------

@pytest.fixture
def inserts(pg):
    pg.psql("-c", "create table if not exists edge_inserts (route text, n int)",
            dsn=pg.dsn("trust_user", APP_DATABASE))
    yield lambda route: int(pg.psql("-c", f"select count(*) from edge_inserts where route = '{route}'",
                                    dsn=pg.dsn("trust_user", APP_DATABASE)).stdout)
    pg.psql("-c", "drop table edge_inserts", dsn=pg.dsn("trust_user", APP_DATABASE))


@pytest.mark.parametrize("ending", ["terminate_and_close", "close", "shutdown_write"])
@pytest.mark.parametrize("upstream_leg", ["plaintext", "tls"])
def test_statements_sent_before_a_close_run_to_completion(pg, pgscout, start_pgscout, inserts, ending,
                                                          upstream_leg):
    """A TLS upstream leg cannot be half-closed: pgscout closes it behind the client's bytes."""
    proxy = pgscout if upstream_leg == "plaintext" else start_pgscout(upstream=pg.upstream_url(sslmode="require"))
    counts = {}
    for route, (host, port) in routes(pg, proxy).items():
        sessions = [open_session(host, port)[0] for _ in range(20)]
        for n, sock in enumerate(sessions):
            sock.sendall(query(f"insert into edge_inserts select '{route}-{ending}', {n} "
                               f"from pg_sleep(0.3)") + (TERMINATE if ending == "terminate_and_close" else b""))
            if ending == "shutdown_write":
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.close()
        wait_until(lambda: inserts(f"{route}-{ending}") == 20, 10, interval=0.2)
        counts[route] = inserts(f"{route}-{ending}")
        for sock in sessions:
            sock.close()
    assert counts == {"direct": 20, "proxy": 20}


def test_a_client_that_ends_with_terminate_is_not_cancelled_by_the_hang_up_policy(pg, start_pgscout,
                                                                                  inserts):
    """proxy.cancel_on_client_hangup cancels a statement whose client vanished; a client whose
    last message was Terminate ended cleanly, and its statement runs to completion as directly."""
    proxy = start_pgscout(env={"PGSCOUT_PROXY_CANCEL_ON_CLIENT_HANGUP": "true"})
    counts = {}
    for route, (host, port) in routes(pg, proxy).items():
        sessions = [open_session(host, port)[0] for _ in range(5)]
        for n, sock in enumerate(sessions):
            sock.sendall(query(f"insert into edge_inserts select '{route}-goodbye', {n} "
                               f"from pg_sleep(0.3)") + TERMINATE)
            sock.close()
        wait_until(lambda: inserts(f"{route}-goodbye") == 5, 10, interval=0.2)
        time.sleep(0.5)  # a cancel would have landed by now
        counts[route] = inserts(f"{route}-goodbye")
    assert counts == {"direct": 5, "proxy": 5}
    assert metric(proxy, "pgscout_cancel_requests_total") == 0


def test_a_half_closed_client_receives_its_results_until_the_server_closes(pg, pgscout):
    seen = {}
    for route, (host, port) in routes(pg, pgscout).items():
        sock, _, _ = open_session(host, port)
        with sock:
            sock.sendall(query("select pg_sleep(0.3), 'after the half-close'"))
            sock.shutdown(socket.SHUT_WR)
            data, how = read_to_close(sock, quiet=5)
        seen[route] = ([kind for kind, _ in messages(data)], b"after the half-close" in data, how)
    assert seen["proxy"] == seen["direct"] == ([b"T", b"D", b"C", b"Z"], True, CLOSED)


# -- 7. proxy.max_message_bytes never changes what is forwarded ----------------------------------

def test_messages_over_max_message_bytes_pass_whole_both_ways(pg, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_PROXY_MAX_MESSAGE_BYTES": "1048576"})
    big = "x" * 2_000_000
    seen = {}
    for route, dsn in pg.route_dsns(proxy).items():
        with psycopg.connect(dsn) as conn:
            value = conn.execute("select repeat('y', 2000000), 1").fetchone()
            echoed = conn.execute(f"select length('{big}'), md5('{big}')").fetchone()
            bound = conn.execute("select md5(%s)", (big,)).fetchone()
            seen[route] = (value, echoed, bound)
            assert conn.execute("select 42").fetchone() == (42,)
    assert seen["proxy"] == seen["direct"]
    assert seen["direct"][0] == ("y" * 2_000_000, 1)
    assert metric(proxy, "pgscout_decoder_desyncs_total") == 0


def test_a_length_postgresql_rejects_is_postgresqls_to_reject(pg, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_PROXY_MAX_MESSAGE_BYTES": "1048576"})
    seen = {}
    for route, (host, port) in routes(pg, proxy).items():
        sock, _, _ = open_session(host, port)
        with sock:
            sock.sendall(b"Q" + struct.pack("!i", 0x7FFFFFFF) + b"select")
            data, how = read_to_close(sock)
        seen[route] = (client_view(data), how)
    assert seen["proxy"] == seen["direct"]
    assert seen["direct"][1] == CLOSED
    assert wait_until(lambda: metric(proxy, "pgscout_decoder_desyncs_total") == 1, 5)


# -- 4. pgscout as its own upstream --------------------------------------------------------------

def test_an_upstream_that_is_pgscouts_own_listener_is_refused_at_start(tmp_path):
    proxy = Pgscout("unset", workdir=tmp_path)
    for listen_host, upstream_host in (("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "localhost"),
                                       ("0.0.0.0", "127.0.0.1")):
        proxy.host = listen_host
        proxy.upstream = f"postgresql://postgres@{upstream_host}:{proxy.port}/postgres?sslmode=disable"
        with pytest.raises(AssertionError, match="exited 1 before listening"):
            proxy.start()
        lines = [line for line in proxy.logs() if line.get("event") == "cannot_start"]
        assert len(lines) == 1, proxy.output()
        assert "pgscout's own listener" in lines[0]["error"] and "DATABASE_URL" in lines[0]["error"]
        assert len(proxy.stdout().splitlines()) <= 5, proxy.output()


def test_accepting_one_of_its_own_upstream_connections_refuses_the_session(pg):
    """In-process, because no outside arrangement gets past the start-up check: the server's
    upstream is re-pointed at its own port after start (as a changed DNS answer would)."""
    from pgscout.dataplane.server import Server
    from pgscout.settings import load_settings

    async def scenario():
        port = free_port()
        settings = load_settings(None, {}, {"proxy.listen": f"127.0.0.1:{port}",
                                            "proxy.upstream": pg.upstream_url()})
        server = Server(settings, lambda record: None, lambda event: None, observing=False)
        await server.start()
        looped = dataclasses.replace(settings.proxy.upstream, port=port)
        server.settings = dataclasses.replace(settings, proxy=dataclasses.replace(settings.proxy, upstream=looped))
        errors = []
        for sslmode in ("disable", "prefer", "disable"):
            try:
                conn = await psycopg.AsyncConnection.connect(
                    f"postgresql://trust_user@127.0.0.1:{port}/{APP_DATABASE}?sslmode=disable")
                await conn.close()
            except psycopg.OperationalError as exc:
                errors.append(str(exc))
            server.settings = dataclasses.replace(server.settings, proxy=dataclasses.replace(
                server.settings.proxy, upstream=dataclasses.replace(looped, sslmode=sslmode)))
        sessions = len(server.relays)
        await server.drain()
        return errors, server.self_loops_total, sessions

    errors, loops, sessions = asyncio.run(scenario())
    assert len(errors) == 3 and all("pgscout's own listener" in error for error in errors), errors
    assert loops == 3 and sessions == 0


# -- 10b. file descriptors -----------------------------------------------------------------------

class LimitedPgscout(Pgscout):
    """pgscout started under `prlimit`, as a container with a low descriptor limit would."""

    def __init__(self, upstream: str, soft: int, hard: int, **kwargs):
        super().__init__(upstream, **kwargs)
        self.nofile = f"--nofile={soft}:{hard}"

    @property
    def argv(self) -> list[str]:
        return ["prlimit", self.nofile, "--", *super().argv]


def soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_and_logged(pg, tmp_path):
    proxy = LimitedPgscout(pg.upstream_url(), 256, 4096, workdir=tmp_path).start()
    try:
        assert soft_fd_limit(proxy.process.pid) == 4096
        [line] = [line for line in proxy.logs() if line.get("event") == "file_descriptor_limit"]
        assert (line["soft_limit_at_start"], line["soft_limit"], line["hard_limit"]) == (256, 4096, 4096)
    finally:
        proxy.cleanup()


def healthy(proxy: Pgscout) -> bool:
    try:
        return proxy.admin_get("/healthz", timeout=1)[0] == 200
    except OSError:  # reset while descriptors are short
        return False


def test_running_out_of_descriptors_is_logged_counted_and_survived(pg, tmp_path):
    proxy = LimitedPgscout(pg.upstream_url(), 64, 64, workdir=tmp_path).start()
    try:
        hogs = [socket.create_connection((proxy.host, proxy.port), timeout=10) for _ in range(120)]
        assert wait_until(lambda: any(line.get("event") == "accept_failed" for line in proxy.logs()), 10)
        waiting = socket.create_connection((proxy.host, proxy.port), timeout=10)  # in the backlog
        time.sleep(1.5)
        for sock in hogs:
            sock.close()
        assert wait_until(lambda: healthy(proxy), 10)
        assert metric(proxy, "pgscout_accept_fd_exhausted_total") >= 1
        with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        with waiting:  # the client that waited in the backlog is served once descriptors free up
            waiting.sendall(startup_packet("trust_user", APP_DATABASE))
            assert read_until(waiting, b"Z")[-1][0] == b"Z"
        failures = [line for line in proxy.logs() if line.get("event") == "accept_failed"]
        assert len(failures) == 1, failures  # once per interval, however many retries
        assert proxy.process.poll() is None
    finally:
        proxy.cleanup()


# -- 8. SCRAM channel binding across two TLS legs ------------------------------------------------

@pytest.fixture
def tls_pgscout(pg, start_pgscout, tmp_path):
    """pgscout terminating client TLS (its own CA) with a verify-full TLS leg to the server."""
    cert, key, ca_file = write_serving_certificate(tmp_path)
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=pg.ca_cert),
                          env={"PGSCOUT_PROXY_CLIENT_TLS_CERT": str(cert),
                               "PGSCOUT_PROXY_CLIENT_TLS_KEY": str(key)})
    proxy.ca_file = str(ca_file)
    return proxy


def test_scram_expecting_channel_binding_gets_an_error_that_says_what_to_set(pg, tls_pgscout):
    dsn = tls_pgscout.dsn("scram_user", APP_DATABASE, sslmode="verify-full", sslrootcert=tls_pgscout.ca_file)
    with pytest.raises(psycopg.OperationalError) as error:
        psycopg.connect(dsn).close()
    assert "channel_binding=disable" in str(error.value) and "cannot cross pgscout" in str(error.value)
    result = pg.psql("-c", "select 1", dsn=dsn, check=False)
    assert result.returncode != 0 and "channel_binding=disable" in result.stderr
    with psycopg.connect(dsn + "&channel_binding=disable") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
                            ).fetchone() == ("scram_user", True)
    wrong = tls_pgscout.dsn("scram_user", APP_DATABASE, password="wrong", sslmode="verify-full",
                            sslrootcert=tls_pgscout.ca_file, channel_binding="disable")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()


def _sasl_expecting_binding(host: str, port: int, ca_file: str) -> tuple[list[bytes], dict[str, str], str]:
    """Over TLS, answer AuthenticationSASL with gs2 flag 'y' (as libpq does when it sees no
    -PLUS offer); returns the mechanisms offered, the ErrorResponse's fields and the close."""
    raw = socket.create_connection((host, port), timeout=10)
    raw.sendall(struct.pack("!ii", 8, 80877103))
    assert raw.recv(1) == b"S"
    with ssl.create_default_context(cafile=ca_file).wrap_socket(raw, server_hostname=LOOPBACK) as sock:
        sock.sendall(startup_packet("scram_user", APP_DATABASE))
        [(kind, body)] = read_until(sock, b"R")
        mechanisms = [name for name in body[4:].split(b"\0") if name]
        first = b"y,,n=,r=pgscoutedgetestnonce"
        body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        sock.sendall(b"p" + struct.pack("!i", len(body) + 4) + body)
        data, how = read_to_close(sock)
    [(kind, body)] = messages(data)
    assert kind == b"E", data
    return mechanisms, error_fields(body), how


def test_channel_binding_expected_is_refused_with_the_servers_sqlstate(pg, tls_pgscout):
    """Directly, the server (which offers -PLUS on TLS) calls 'y' a downgrade; through pgscout,
    which cannot pass -PLUS on, pgscout answers: the same FATAL 28000, a message saying what to do."""
    direct = _sasl_expecting_binding(pg.host, pg.port, str(pg.ca_cert))
    through = _sasl_expecting_binding(tls_pgscout.host, tls_pgscout.port, tls_pgscout.ca_file)
    assert direct[0] == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"] and through[0] == [b"SCRAM-SHA-256"]
    assert (direct[1]["S"], direct[1]["C"], direct[2]) == (through[1]["S"], through[1]["C"], through[2]) \
        == ("FATAL", "28000", CLOSED)
    assert "channel_binding=disable" in through[1]["M"], through


def _sasl_first_message(sock: socket.socket, gs2_flag: bytes) -> tuple[list[bytes], bytes, bytes, str]:
    """On a plaintext connection, start SCRAM for scram_user with gs2 flag `gs2_flag`; returns the
    mechanisms offered, the answer's type and body, and how the connection stood after it."""
    sock.sendall(startup_packet("scram_user", APP_DATABASE))
    [(kind, body)] = read_until(sock, b"R")
    mechanisms = [name for name in body[4:].split(b"\0") if name]
    first = gs2_flag + b",,n=,r=pgscoutedgetestnonce"
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
    sock.sendall(b"p" + struct.pack("!i", len(body) + 4) + body)
    data, how = read_to_close(sock, quiet=1.0)
    [(kind, body)] = messages(data)
    return mechanisms, kind, body, how


def test_binding_expected_on_a_plaintext_leg_to_a_tls_upstream_says_what_to_set(pg, start_pgscout):
    """node-postgres with enableChannelBinding: true sends gs2 flag 'y' on a plaintext socket too.
    Directly over plaintext the server goes on (AuthenticationSASLContinue); behind pgscout the
    server is on TLS, offered -PLUS (pgscout hid it) and would refuse 'y' as a downgrade with a
    bare "channel binding negotiation error". That cannot succeed (the proof covers the flag), so
    pgscout answers itself, with the server's FATAL 28000 and what to set. A client sending 'n'
    (libpq on plaintext) is untouched."""
    proxy = start_pgscout(upstream=pg.upstream_url(sslmode="verify-full", sslrootcert=pg.ca_cert))
    with socket.create_connection((pg.host, pg.port), timeout=10) as sock:
        mechanisms, kind, body, _ = _sasl_first_message(sock, b"y")
    assert mechanisms == [b"SCRAM-SHA-256"] and kind == b"R" and struct.unpack("!i", body[:4]) == (11,)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        mechanisms, kind, body, how = _sasl_first_message(sock, b"y")
    assert mechanisms == [b"SCRAM-SHA-256"] and kind == b"E" and how == CLOSED, body
    fields = error_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000"), fields
    assert "cannot cross pgscout" in fields["M"] and "enableChannelBinding: false" in fields["M"], fields
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        _, kind, body, _ = _sasl_first_message(sock, b"n")
    assert kind == b"R" and struct.unpack("!i", body[:4]) == (11,)
    with psycopg.connect(proxy.dsn("scram_user", APP_DATABASE)) as conn:  # channel_binding=prefer
        assert conn.execute("select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
                            ).fetchone() == ("scram_user", True)


def test_md5_and_trust_over_two_tls_legs_are_untouched(tls_pgscout):
    for user in ("md5_user", "trust_user"):
        dsn = tls_pgscout.dsn(user, APP_DATABASE, sslmode="verify-full", sslrootcert=tls_pgscout.ca_file)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)


# -- 9. the upstream client certificate ----------------------------------------------------------

@pytest.fixture(scope="module")
def cert_cluster(tmp_path_factory):
    """A cluster that lets `cert_user` in with a client certificate only (`cert` auth)."""
    cluster = PgCluster().create()
    try:
        files = tmp_path_factory.mktemp("client-cert")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(cluster.data_dir / "client-ca.pem"))
        client = ca.issue_cert("client.invalid", common_name="cert_user")
        client.cert_chain_pems[0].write_to_path(str(files / "client.crt"))
        client.private_key_pem.write_to_path(str(files / "client.key"))
        (files / "client.key").chmod(0o600)
        subprocess.run(["chown", "postgres:postgres", str(cluster.data_dir / "client-ca.pem")], check=True)
        with open(cluster.data_dir / "postgresql.conf", "a") as conf:
            conf.write("ssl_ca_file = 'client-ca.pem'\n")
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(f"hostssl all cert_user {LOOPBACK}/32 cert\n" + hba.read_text())
        cluster.psql("-c", "create role cert_user login")
        cluster.restart()
        cluster.client_cert, cluster.client_key = files / "client.crt", files / "client.key"
        yield cluster
    finally:
        cluster.destroy()


def _cert_upstream(cluster: PgCluster) -> str:
    return (f"postgresql://cert_user@{LOOPBACK}:{cluster.port}/postgres?sslmode=verify-full"
            f"&sslrootcert={cluster.ca_cert}&sslcert={cluster.client_cert}&sslkey={cluster.client_key}")


def test_the_upstream_certificate_serves_only_the_control_connection(cert_cluster):
    factory = PgscoutFactory(cert_cluster)
    try:
        proxy = factory(upstream=_cert_upstream(cert_cluster))
        direct_without_certificate = cert_cluster.dsn("cert_user", "postgres", sslmode="verify-full",
                                                      sslrootcert=cert_cluster.ca_cert)
        with pytest.raises(psycopg.OperationalError) as direct:
            psycopg.connect(direct_without_certificate).close()
        with pytest.raises(psycopg.OperationalError) as through:
            psycopg.connect(proxy.dsn("cert_user", "postgres")).close()
        assert "certificate" in str(direct.value) and "certificate" in str(through.value)
        # The control connections do present it (their user is the URL's): they are let in
        # (the data plane's, and the analysis process's catalog connection).
        assert wait_until(lambda: int(cert_cluster.psql(
            "-c", "select count(*) from pg_stat_activity where application_name = 'pgscout-control' "
                  "and usename = 'cert_user'").stdout.strip()) >= 1, 10)

        opted_in = factory(upstream=_cert_upstream(cert_cluster),
                           env={"PGSCOUT_PROXY_UPSTREAM_CERT_FOR_SESSIONS": "true"})
        with psycopg.connect(opted_in.dsn("cert_user", "postgres")) as conn:
            assert conn.execute("select current_user").fetchone() == ("cert_user",)
    finally:
        factory.cleanup()
